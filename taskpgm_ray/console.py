"""What a person sees during a run: one live progress line per stage, the framework output in log files.

Per stage the console shows one live line (k/n, ETA and the stage's own numbers) that becomes a one-line
summary when the stage ends; then the stage table and where the results are. Everything else (Ray, Ray Train
and Tune, DeepSpeed, transformers, W&B, Python warnings; the driver's and every Ray worker's) goes to
``<output_dir>/logs/<stage>.log``:

- the driver's stdout and stderr file descriptors point at the running stage's file, so output from Python,
  C extensions and child processes (compilers, the W&B service) lands there;
- Ray forwards every worker's stdout and stderr to the driver (``ray.init(log_to_driver=True)``), prefixed
  with the task or actor and its pid; ``RAY_DEDUP_LOGS=0`` keeps each line instead of folding repeats
  (``LOG_ENV``: the switches set for log files).

``-v`` leaves stdout and stderr alone: the framework output streams as before and no log files are written.
``-q`` prints only the final table and errors. A failed stage's log tail is printed with the error.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

QUIET, NORMAL, VERBOSE = "quiet", "normal", "verbose"
TAIL_LINES = 20  # lines of a failed stage's log printed with the error
LOG_SETTLE_S = 1.0  # on a failure, time for Ray to forward the workers' last lines before the tail is read
# The libraries' own switches for log files (unless already set): Ray keeps every forwarded worker line
# (RAY_DEDUP_LOGS, read when Ray is imported) without colour codes; no tqdm bars from transformers and the hub
# (the workers get it via cluster.PROPAGATED_ENV) or datasets: carriage-return redraws, unreadable in a file.
LOG_ENV = {"RAY_DEDUP_LOGS": "0", "RAY_COLOR_PREFIX": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


class StageProgress:
    """One stage's live line: a bar with k/n and ETA, and the stage's own numbers (``info``).

    Stage code calls ``start``, ``update`` and ``note``; a silent instance (``StageProgress()``) does nothing,
    so stage functions take ``progress: StageProgress | None`` and work the same without a console.
    """

    def __init__(self, console: Any = None, name: str = "", *, live: bool = False):
        self.name = name
        self._console = console  # rich Console for notes; None: silent
        self._bar = None  # rich Progress while the stage runs (live mode only)
        self._task = None  # the bar's task id
        if console is not None and live and console.is_terminal:  # elsewhere (a pipe, a file): the lines only
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn(f"{name:<9}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=console, transient=True,
                                 redirect_stdout=False, redirect_stderr=False)  # sys.stdout/err: the stage's log

    def __enter__(self) -> StageProgress:
        if self._bar is not None:
            self._task = self._bar.add_task(self.name, total=None, info="")
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def start(self, total: int | None, done: int = 0, info: str = "") -> None:
        """The stage's size is known: ``total`` units, ``done`` of them already (cached; not in the ETA)."""
        if self._bar is not None:
            self._bar.reset(self._task, total=total, completed=done, info=info)

    def update(self, done: int | None = None, *, total: int | None = None, info: str | None = None) -> None:
        """``done`` units finished so far (and ``info``, the stage's own numbers)."""
        if self._bar is not None:
            fields = {} if info is None else {"info": info}
            self._bar.update(self._task, completed=done, total=total, **fields)

    def note(self, text: str) -> None:
        """A line that stays (printed above the live line), e.g. a failed unit of work."""
        if self._console is not None:
            self._console.print(f"{self.name:<9} {text}", soft_wrap=True, highlight=False)


class LogRouter:
    """Points this process's stdout and stderr (file descriptors 1 and 2) at one log file per stage."""

    def __init__(self, log_dir: str | os.PathLike):
        self.log_dir = Path(log_dir)
        self.current: Path | None = None  # the file fds 1 and 2 write to now
        self._saved: tuple[int, int] | None = None  # duplicates of the original fds 1 and 2

    def terminal(self) -> tuple[TextIO, TextIO]:
        """Text streams on the original stdout and stderr (made before any switch): what the person sees."""
        if self._saved is None:
            self._save()
        encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
        out, err = (os.fdopen(os.dup(fd), "w", buffering=1, encoding=encoding, errors="replace")
                    for fd in self._saved)
        return out, err

    def switch(self, name: str) -> Path:
        """From now on fds 1 and 2 append to ``<log_dir>/<name>.log``; returns its path."""
        if self._saved is None:
            self._save()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / f"{name}.log"
        _flush_std()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        self.current = path
        return path

    def close(self) -> None:
        """Give fds 1 and 2 back to the terminal; drop log files that stayed empty."""
        if self._saved is None:
            return
        _flush_std()
        for fd, saved in zip((1, 2), self._saved):
            os.dup2(saved, fd)
            os.close(saved)
        self._saved, self.current = None, None
        for path in self.log_dir.glob("*.log"):
            if path.stat().st_size == 0:
                path.unlink()

    def _save(self) -> None:
        _flush_std()
        self._saved = (os.dup(1), os.dup(2))


class RunConsole:
    """The console of one command: stage lines and live progress for a person, the rest to ``<output_dir>/logs``.

    Args:
        verbosity: ``"quiet"`` (the final table and errors), ``"normal"``, ``"verbose"`` (framework output
            streams to the terminal, no live lines, no log files).
        console: a rich Console for the person's lines (default: one on stdout).
    """

    def __init__(self, verbosity: str = NORMAL, *, console: Any = None):
        if verbosity not in (QUIET, NORMAL, VERBOSE):
            raise ValueError(f"verbosity: expected quiet, normal or verbose, got {verbosity!r}")
        self.verbosity = verbosity
        self._console = console  # rich Console for the person (made on first use)
        self._router: LogRouter | None = None  # set while the framework output goes to log files
        self.log_dir: Path | None = None  # where the stage logs go (None: not routed)
        self.failed_log: Path | None = None  # the log of the stage that raised, for the failure tail
        self._traceback_at = (0, 0)  # where in failed_log the driver's traceback went (bytes from, to)

    @property
    def console(self) -> Any:
        """The rich Console the person reads (the terminal, even while fds 1 and 2 point at a log)."""
        if self._console is None:
            from rich.console import Console

            self._console = Console()
        return self._console

    def route_logs(self, log_dir: str | os.PathLike) -> None:
        """Send the framework output to ``log_dir/<stage>.log`` from the next stage on.

        Not with ``-v``, and not when stdout and stderr are not this process's fds 1 and 2 (a caller that
        captures them, such as pytest, keeps what it captures).
        """
        if self._router is not None or self.verbosity == VERBOSE or not _is_fd(sys.stdout, 1) \
                or not _is_fd(sys.stderr, 2):
            return
        from rich.console import Console

        for key, value in LOG_ENV.items():
            os.environ.setdefault(key, value)
        self._router = LogRouter(log_dir)
        self.log_dir = self._router.log_dir
        out, _ = self._router.terminal()
        # rich measures the terminal on fds 0-2; with 1 and 2 on a log and no terminal on stdin, ask ``out``.
        width = os.get_terminal_size(out.fileno()).columns if out.isatty() else None
        self._console = Console(file=out, width=width)
        self.line(f"[dim]logs: {self.log_dir}/<stage>.log (-v streams them here)[/dim]")

    @contextmanager
    def stage(self, name: str) -> Iterator[StageProgress]:
        """Run a stage: its output to ``<stage>.log`` (when routed) and a live line on the console."""
        log = self._router.switch(name) if self._router is not None else None
        live = self.verbosity == NORMAL
        progress = StageProgress(self.console if self.verbosity != QUIET else None, name, live=live)
        with progress:
            try:
                yield progress
            except BaseException:
                if log is not None:  # the driver's traceback into the stage's log (fd 2), not into its tail
                    _flush_std()
                    start = log.stat().st_size
                    traceback.print_exc()
                    _flush_std()
                    self.failed_log, self._traceback_at = log, (start, log.stat().st_size)
                raise

    def line(self, text: str) -> None:
        """A line for the person (not with ``-q``); rich markup allowed."""
        if self.verbosity != QUIET:
            self.console.print(text, soft_wrap=True, highlight=False)

    def final(self, renderable: Any) -> None:
        """The end of a run (the stage table, where the results are; text as is): printed even with ``-q``."""
        text = isinstance(renderable, str)
        self.console.print(renderable, soft_wrap=text, markup=not text, highlight=False)

    def failure_tail(self) -> list[str]:
        """The failed stage's log path and its last ``TAIL_LINES`` lines of framework output (the driver's
        traceback, also there, left out: the error line says it); empty if no routed stage failed.

        Call it before ``close``: it waits ``LOG_SETTLE_S`` for Ray to forward the workers' last lines.
        """
        if self.failed_log is None or not self.failed_log.exists():
            return []
        if self._router is not None:
            time.sleep(LOG_SETTLE_S)
        data = self.failed_log.read_bytes()
        start, end = self._traceback_at
        lines = (data[:start] + data[end:]).decode(errors="replace").splitlines()[-TAIL_LINES:]
        where = f"{self.failed_log} (with the traceback)"
        if not lines:
            return [f"log: {where}"]
        return [f"last {len(lines)} lines of {where}:", *(f"  {line}" for line in lines)]

    def close(self) -> None:
        """Give stdout and stderr back (idempotent); later output reaches the terminal again.

        While routed, a Ray this process connected to is shut down first, so its last forwarded lines and its
        shutdown messages land in the log rather than on the terminal at exit.
        """
        if self._router is None:
            return
        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        self._router.close()
        self._router = None


def _is_fd(stream: Any, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        return False


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass

"""The console a person reads: stage lines once, framework output in <output_dir>/logs/, -v and -q, failure tails."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from rich.console import Console

from taskpgm_ray import console as console_module
from taskpgm_ray.cli import main
from taskpgm_ray.console import NORMAL, QUIET, VERBOSE, LogRouter, RunConsole


def test_router_sends_fds_1_and_2_to_one_log_per_stage_and_gives_them_back(tmp_path, capfd):
    router = LogRouter(tmp_path / "logs")
    router.switch("probes")
    os.write(1, b"stdout of the driver\n")
    os.write(2, b"stderr of the driver\n")
    subprocess.run(["sh", "-c", "echo a child process; echo its stderr >&2"], check=True)
    router.switch("train")
    os.write(2, b"a line of the next stage\n")
    router.switch("tune")  # nothing printed: dropped at close
    router.close()
    os.write(1, b"back on the terminal\n")

    probes = (tmp_path / "logs" / "probes.log").read_text()
    assert probes.splitlines() == ["stdout of the driver", "stderr of the driver", "a child process", "its stderr"]
    assert (tmp_path / "logs" / "train.log").read_text() == "a line of the next stage\n"
    assert not (tmp_path / "logs" / "tune.log").exists()
    seen = capfd.readouterr()
    assert seen.out == "back on the terminal\n" and seen.err == ""


def _ui(verbosity: str) -> tuple[RunConsole, io.StringIO]:
    buf = io.StringIO()
    return RunConsole(verbosity, console=Console(file=buf, width=100)), buf


def test_stage_lines_are_printed_once_and_quiet_keeps_only_the_final_table():
    ui, buf = _ui(NORMAL)
    with ui.stage("probes") as progress:  # not a terminal: the live bar draws nothing, the lines stay
        progress.start(3, done=1)
        progress.update(2, info="1 failed")
        progress.note("task 'sort' failed after 2 retries (RuntimeError)")
        progress.update(3)
    ui.line("probes    3/3 proxies")
    ui.final("mixture  runs/x/mixture.json")
    assert buf.getvalue().splitlines() == ["probes    task 'sort' failed after 2 retries (RuntimeError)",
                                           "probes    3/3 proxies", "mixture  runs/x/mixture.json"]

    ui, buf = _ui(QUIET)
    with ui.stage("probes") as progress:
        progress.start(3)
        progress.note("task 'sort' failed")
    ui.line("probes    3/3 proxies")
    ui.final("mixture  runs/x/mixture.json")
    assert buf.getvalue() == "mixture  runs/x/mixture.json\n"


def _process_streams(monkeypatch) -> None:
    """sys.stdout and sys.stderr on fds 1 and 2, as in a terminal (pytest's capture re-sets them after fixtures)."""
    monkeypatch.setattr(sys, "stdout", open(1, "w", closefd=False))
    monkeypatch.setattr(sys, "stderr", open(2, "w", closefd=False))
    monkeypatch.setattr(console_module, "LOG_SETTLE_S", 0.0)


def test_a_failed_stage_keeps_its_traceback_in_its_log_and_the_tail_shows_the_rest(tmp_path, capfd, monkeypatch):
    _process_streams(monkeypatch)
    ui = RunConsole(NORMAL)
    ui.route_logs(tmp_path / "logs")
    with pytest.raises(RuntimeError, match="the worker died"):
        with ui.stage("train"):
            for i in range(30):
                os.write(2, f"(RayTrainWorker pid=1) step {i}\n".encode())
            raise RuntimeError("the worker died")
    tail = ui.failure_tail()
    ui.close()

    log = tmp_path / "logs" / "train.log"
    assert tail[0] == f"last 20 lines of {log} (with the traceback):" and len(tail) == 21
    assert tail[1] == "  (RayTrainWorker pid=1) step 10" and tail[-1] == "  (RayTrainWorker pid=1) step 29"
    assert log.read_text().splitlines()[-1] == "RuntimeError: the worker died"  # in the log, not in the tail
    seen = capfd.readouterr()
    assert "step 0" in log.read_text() and "step" not in seen.out + seen.err  # framework lines: the log only
    assert seen.out == f"logs: {tmp_path / 'logs'}/<stage>.log (-v streams them here)\n"


def test_verbose_streams_the_framework_output_and_writes_no_logs(tmp_path, capfd, monkeypatch):
    _process_streams(monkeypatch)
    ui = RunConsole(VERBOSE)
    ui.route_logs(tmp_path / "logs")
    with ui.stage("probes"):
        os.write(2, b"(train_probe pid=7) Setting accelerator to CPU\n")
    ui.close()
    assert capfd.readouterr().err == "(train_probe pid=7) Setting accelerator to CPU\n"
    assert not (tmp_path / "logs").exists()


def test_verbose_and_quiet_together_is_a_usage_error(capsys):
    assert main(["run", "--test-mode", "-v", "-q"]) == 2
    assert "give -v/--verbose or -q/--quiet, not both" in capsys.readouterr().err
    assert main(["-q", "run", "--test-mode", "--verbose", "--help"]) == 0  # before and after the command: no clash

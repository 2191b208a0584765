"""The ``taskpgm`` command: a flat map of command names to typed functions (CONTRACT.md).

Every error reaches the user as one line and a non-zero exit; ``--debug`` shows the traceback.
Heavy imports (torch, Ray, DeepSpeed) happen inside the commands that need them.
Commands that run stages print one line per stage and keep the framework output in ``<output_dir>/logs/``
(``taskpgm_ray.console``); ``-v`` streams it instead, ``-q`` prints only the final table and errors.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from taskpgm_ray.cli_mixture import export, solve
from taskpgm_ray.config import Config, load_config
from taskpgm_ray.console import NORMAL, QUIET, VERBOSE, RunConsole, StageProgress
from taskpgm_ray.errors import BadInput

EXIT_BAD_INPUT = 2


SET_HELP = ("Override a config field, e.g. --set train.steps=50 or --set tasks.0.max_examples=500 "
            "(repeatable; VALUE is YAML).")
COMMAND_SETS = "taskpgm.set"  # ctx.meta key: the --set values given after the command name
COMMAND_VERBOSITY = "taskpgm.verbosity"  # ctx.meta key: -v / -q given after the command name
VERBOSE_HELP = "Stream Ray's, DeepSpeed's, transformers' and W&B's output here instead of <output_dir>/logs/."
QUIET_HELP = "Print only the final table and errors."


def _config(config: str | None, test_mode: bool, output_dir: str | None) -> Config:
    """Load CONFIG (or the shipped test config) with the ``--set`` overrides and ``--output-dir``.

    ``--set`` may come before the command (``taskpgm --set K=V run C``) or after it (``taskpgm run C --set K=V``);
    the later one wins.
    """
    import yaml

    if config is not None and test_mode:
        raise click.UsageError("give CONFIG or --test-mode, not both")
    ctx = click.get_current_context()
    overrides = {}
    for item in (*(ctx.find_root().params.get("set_") or ()), *ctx.meta.get(COMMAND_SETS, ())):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise click.BadParameter(f"{item!r}: VALUE is not valid YAML ({getattr(exc, 'problem', exc)})",
                                     param_hint="--set") from None
    cfg = load_config(config, test_mode=test_mode, overrides=overrides)
    if output_dir:
        cfg.output_dir = output_dir
    return cfg


def _remember_sets(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> None:
    ctx.meta[COMMAND_SETS] = value


def _remember_verbosity(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta.setdefault(COMMAND_VERBOSITY, set()).add(param.name)


def _verbosity(flags: set[str]) -> str | None:
    if {"verbose", "quiet"} <= flags:
        raise click.UsageError("give -v/--verbose or -q/--quiet, not both")
    return VERBOSE if "verbose" in flags else QUIET if "quiet" in flags else None


def _ui() -> RunConsole:
    """The command's console, at the verbosity given before or after the command name (the later wins)."""
    ctx = click.get_current_context()
    root = ctx.find_root()
    ui = root.ensure_object(dict).setdefault("ui", RunConsole())
    ui.verbosity = _verbosity(ctx.meta.get(COMMAND_VERBOSITY, set())) \
        or _verbosity({k for k in ("verbose", "quiet") if root.params.get(k)}) or NORMAL
    return ui


@contextmanager
def _stage(cfg: Config, name: str) -> Iterator[StageProgress]:
    """One stage command: framework output to ``<output_dir>/logs/<name>.log``, a live line on the console."""
    ui = _ui()
    ui.route_logs(Path(cfg.output_dir) / "logs")
    with ui.stage(name) as progress:
        yield progress


def stage_options(f):
    """The options every stage command takes: CONFIG, --test-mode, --output-dir, --set, -v, -q."""
    f = click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_remember_verbosity,
                     help=QUIET_HELP)(f)
    f = click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=_remember_verbosity,
                     help=VERBOSE_HELP)(f)
    f = click.option("--set", "set_", multiple=True, metavar="KEY=VALUE", expose_value=False,
                     callback=_remember_sets, help=SET_HELP)(f)
    f = click.option("--output-dir", type=click.Path(file_okay=False), default=None,
                     help="Run directory (overrides the config's output_dir).")(f)
    f = click.option("--test-mode", is_flag=True,
                     help="Use the shipped single-node config configs/test.yaml.")(f)
    f = click.argument("config", required=False, type=click.Path(dir_okay=False))(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
@click.option("--set", "set_", multiple=True, metavar="KEY=VALUE", help=SET_HELP + " Also after the command.")
@click.option("-v", "--verbose", is_flag=True, help=VERBOSE_HELP + " Also after the command.")
@click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP + " Also after the command.")
@click.version_option(package_name="taskpgm_ray")
@click.pass_context
def cli(ctx: click.Context, debug: bool, set_: tuple[str, ...], verbose: bool, quiet: bool) -> None:
    """TaskPGM on Ray: learn how much of each task to fine-tune on, then run the fine-tune."""
    ctx.ensure_object(dict)["debug"] = debug


# --------------------------------------------------------------------------------------------------
# stage 1: tasks


@cli.group()
def tasks() -> None:
    """Show the tasks a config resolves to, or write the synthetic benchmark suite."""


@tasks.command("list")
@stage_options
def tasks_list(config: str | None, test_mode: bool, output_dir: str | None) -> None:
    """Load every task, print source, sizes and content hash, and write tasks.json."""
    from rich.console import Console
    from rich.table import Table

    from taskpgm_ray.tasks import load_tasks, write_manifest

    cfg = _config(config, test_mode, output_dir)
    loaded = load_tasks(cfg)
    path = write_manifest(loaded, cfg.output_dir)
    table = Table(title=f"{len(loaded)} tasks")
    for col in ("task", "source", "train", "probe", "eval", "hash"):
        table.add_column(col, justify="right" if col in ("train", "probe", "eval") else "left")
    for t in loaded:
        s = t.sizes
        table.add_row(t.name, t.source, str(s["train"]), str(s["probe"]), str(s["eval"]), t.hash)
    Console().print(table)
    click.echo(f"wrote {path}")


@tasks.command("synth")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Directory to write: new, empty, or a suite this command wrote earlier (replaced whole).")
@click.option("--spec", "spec_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Suite spec (skills, templates, sizes, roles); default: the shipped one.")
@click.option("--random-world", "world", default=None, type=int, metavar="SEED",
              help="Write the generated world random_world(SEED) instead of a spec file; its spec is saved as "
                   "DIR/spec.yaml (print it with `taskpgm tasks world SEED`).")
@click.option("--seed", default=None, type=int, help="Suite seed (default: the spec's, else 7).")
@click.option("--scale", default=1.0, show_default=True, type=float, help="Multiply every task size.")
def tasks_synth(out: str, spec_path: str | None, world: int | None, seed: int | None, scale: float) -> None:
    """Write the synthetic benchmark suite as HF DatasetDicts (train / validation / test).

    DIR must be new, empty, or a suite this command wrote earlier (its suite.json manifest and nothing
    else of yours). Such a suite is replaced as a whole: the new one is built in a hidden
    .DIR.incomplete-* folder beside DIR, removed on any failure or Ctrl-C, and swapped in only when
    complete. Any other DIR is refused and left untouched.
    """
    from taskpgm_ray.tasks.synthetic import load_spec, spec_from_dict, write_suite

    if not 0 < scale < float("inf"):
        raise click.BadParameter(f"must be > 0, got {scale}", param_hint="--scale")
    files = {}
    if world is not None:
        from taskpgm_ray.tasks.worlds import random_world, world_yaml

        if spec_path is not None:
            raise click.UsageError("give --spec or --random-world, not both")
        spec = spec_from_dict(random_world(world), source=f"random_world({world})")
        files["spec.yaml"] = world_yaml(world)
    else:
        spec = load_spec(spec_path)
    seed = seed if seed is not None else (spec.seed if spec.seed is not None else 7)
    manifest = write_suite(out, seed, scale=scale, spec=spec, files=files)
    for t in manifest["tasks"]:
        train = "eval_only " if t.get("eval_only") else f"train={t['sizes']['train']:<5}"
        click.echo(f"{t['name']:<10} {t['skill']:<8} {t['role']:<15} score={str(t['score']).lower():<5} "
                   f"{train} validation={t['sizes']['validation']} test={t['sizes']['test']}")
    click.echo(f"wrote {len(manifest['tasks'])} tasks to {out} (manifest: {Path(out) / 'suite.json'})")


@tasks.command("world")
@click.argument("seed", type=int)
@click.option("--flan", is_flag=True, help="The FLAN-like world flan_world(SEED): many templated tasks and one "
              "held-out (eval_only) template per skill.")
def tasks_world(seed: int, flan: bool) -> None:
    """Print the generated world random_world(SEED) as a suite spec (YAML), e.g. to edit and pass to --spec."""
    from taskpgm_ray.tasks.worlds import flan_world_yaml, world_yaml

    click.echo((flan_world_yaml if flan else world_yaml)(seed), nl=False)


# --------------------------------------------------------------------------------------------------
# stages 2-8


@cli.command()
@stage_options
@click.option("--resume", is_flag=True, help="Continue an interrupted run where it stopped.")
def run(config: str | None, test_mode: bool, output_dir: str | None, resume: bool) -> None:
    """The whole pipeline: tasks, probes, estimate, tune, train, report."""
    from taskpgm_ray.pipeline import Pipeline

    cfg = _config(config, test_mode, output_dir)
    ui = _ui()
    ui.route_logs(Path(cfg.output_dir) / "logs")
    Pipeline(cfg, resume=resume, ui=ui).run()


@cli.command()
@stage_options
def probe(config: str | None, test_mode: bool, output_dir: str | None) -> None:
    """Stage 2: one LoRA proxy fine-tune per task (cached per task)."""
    from taskpgm_ray.distributed.probes import probe_command

    cfg = _config(config, test_mode, output_dir)
    with _stage(cfg, "probes") as progress:
        result = probe_command(cfg, progress=progress)
    _ui().final(f"{len(result['probes'])} proxies ({len(result['trained'])} trained, {len(result['cached'])} cached) "
                f"in {Path(cfg.output_dir) / 'probes'}")


@cli.command()
@stage_options
def estimate(config: str | None, test_mode: bool, output_dir: str | None) -> None:
    """Stages 3-5: every proxy scores every probe set; likelihoods.npz, signal checks and the energy's mixture."""
    from rich.markup import escape

    from taskpgm_ray.distributed.estimation import estimate_command
    from taskpgm_ray.pipeline import select_mixture

    cfg = _config(config, test_mode, output_dir)
    with _stage(cfg, "estimate") as progress:
        result = estimate_command(cfg, progress=progress)
        path = select_mixture(cfg.output_dir, tune=False)
    ui = _ui()
    for line in result["signal"]["warnings"]:
        ui.line(f"[yellow]warning:[/yellow] {escape(line)}")
    ui.final(f"wrote {path} (signal checks: {Path(cfg.output_dir) / 'estimate' / 'signal.json'})")


@cli.command()
@stage_options
@click.option("--mixture", "mixture_path", required=True, type=click.Path(dir_okay=False),
              help="mixture.json to train on.")
def train(config: str | None, test_mode: bool, output_dir: str | None, mixture_path: str) -> None:
    """Stage 6: fine-tune the target model on a mixture (Ray Train + DeepSpeed)."""
    from taskpgm_ray.train import read_mixture_weights, train_command

    cfg = _config(config, test_mode, output_dir)
    read_mixture_weights(mixture_path)  # exists, parses, format: refused before tasks load or anything is written
    with _stage(cfg, "train") as progress:
        summary = train_command(cfg, mixture_path, progress=progress)
    _ui().final(f"mean eval loss {summary['eval_loss_mean']:.4f}")


@cli.command("tune")
@stage_options
def tune_cmd(config: str | None, test_mode: bool, output_dir: str | None) -> None:
    """Stage 7: Ray Tune over the energy hyperparameters (needs a finished estimate)."""
    from taskpgm_ray.mixture_file import load_sums
    from taskpgm_ray.pipeline import Pipeline, select_mixture, selected_certainty
    from taskpgm_ray.tune import run_tune, write_best_mixture

    cfg = _config(config, test_mode, output_dir)
    pipe = Pipeline(cfg)
    out = Path(cfg.output_dir)
    if not (out / "likelihoods.npz").exists():
        raise click.UsageError(f"{out / 'likelihoods.npz'} not found: run `taskpgm estimate` first")
    with _stage(cfg, "tune") as progress:
        result = run_tune(cfg, pipe.tasks, load_sums(out), progress=progress)
        write_best_mixture(result["best"], pipe.tasks, out / "tune" / "best.json", inputs_hash=pipe.tune_key(),
                           weight_unit=cfg.train.weight_unit)
        select_mixture(out, tune=True)
        selected_certainty(cfg, pipe.tasks)  # active estimation: the stop rule's bound for the selected mixture
    best = result["best"]
    _ui().final(f"best: {best['method']} {best['hyperparameters']} validation loss {best['validation_loss']:.4f}; "
                f"{len(result['trials'])} trials in {out / 'tune' / 'results.json'}")


@cli.command()
@stage_options
@click.option("--mixture", "mixtures", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="Also compare this mixture file (repeatable; named by its file stem).")
@click.option("--seeds", "seeds", multiple=True, type=int,
              help="Fine-tune seeds (repeatable, e.g. --seeds 0 --seeds 1; default: train.seed).")
def compare(config: str | None, test_mode: bool, output_dir: str | None, mixtures: tuple[str, ...],
            seeds: tuple[int, ...]) -> None:
    """The run's TaskPGM mixture vs uniform, size and temperature: same budget, scored on the test split."""
    from taskpgm_ray.compare import compare_command

    cfg = _config(config, test_mode, output_dir)
    with _stage(cfg, "compare") as progress:
        results = compare_command(cfg, mixtures=list(mixtures), seeds=list(seeds) or None, progress=progress)
    out = Path(cfg.output_dir) / "compare"
    ui = _ui()
    ui.final((out / "summary.md").read_text().rstrip())
    ui.final(f"wrote {out / 'results.json'} and {out / 'compare.png'} ({results['seconds']:.0f}s)")


# solve and export work on files alone, no config or Ray: they live in cli_mixture.py
cli.add_command(solve)
cli.add_command(export)


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
def report(run_dir: str) -> None:
    """Plots and tables of a finished run (RUN_DIR/report)."""
    from taskpgm_ray.report import make_report, run_tracking

    make_report(run_dir, tracking=run_tracking(run_dir))
    click.echo(f"wrote {Path(run_dir) / 'report'}")


@cli.group("config")
def config_group() -> None:
    """Show the configuration a run would use."""


@config_group.command("show")
@stage_options
def config_show(config: str | None, test_mode: bool, output_dir: str | None) -> None:
    """Print CONFIG as YAML after --set and --output-dir, every field included (defaults too)."""
    import yaml

    cfg = _config(config, test_mode, output_dir)
    click.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False), nl=False)


@cli.command("config-doc")
def config_doc() -> None:
    """Print the configuration reference (markdown)."""
    from taskpgm_ray.config import reference_markdown

    click.echo(reference_markdown())


# --------------------------------------------------------------------------------------------------
# entry point


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that every ``finally`` on the way
    out runs (a half-written suite's temporary folder removed, a suite being replaced put back)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input (:class:`BadInput`) is one line on stderr and exit code 2, never a traceback (unless
    --debug). Any other failure, a ``KeyError`` or ``ValueError`` from inside included, is exit 1 naming its type,
    after the last lines of the failed stage's log (with the traceback) and its path. Ctrl-C is exit 130 and SIGTERM
    exit 143, each after the clean-up a failure gets (no temporary folder left, a suite being replaced put back).
    """
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("TASKPGM_DEBUG") == "1"
    ui = RunConsole()  # the commands set its verbosity; errors below go out after it gives stdout/stderr back
    on_term = threading.current_thread() is threading.main_thread()  # only there may a signal handler be set
    before = signal.signal(signal.SIGTERM, _raise_terminated) if on_term else None
    try:
        cli.main(args=args, prog_name="taskpgm", standalone_mode=False, obj={"ui": ui})
        return 0
    except _Terminated:
        ui.close()
        click.echo("taskpgm: terminated", err=True)
        return 128 + int(signal.SIGTERM)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        ui.close()
        click.echo("taskpgm: aborted", err=True)
        return 130
    except click.ClickException as exc:
        ui.close()
        if debug:
            raise
        exc.show()
        return exc.exit_code
    except BadInput as exc:  # ours alone: ConfigError, TaskError, SpecError, a bad file, flag or mixture
        ui.close()
        if debug:
            raise
        click.echo(f"taskpgm: error: {_one_line(exc)}", err=True)
        return EXIT_BAD_INPUT
    except Exception as exc:  # anything else is our bug or the environment's: still one line, after the log's tail
        tail = ui.failure_tail()
        ui.close()
        if debug:
            raise
        for line in tail:
            click.echo(line, err=True)
        click.echo(f"taskpgm: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)",
                   err=True)
        return 1
    finally:
        ui.close()
        if on_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)


if __name__ == "__main__":
    sys.exit(main())

"""``taskpgm run``: every stage in order, each keyed by a content hash of its inputs and settings.

``<output_dir>/stages.json`` records, per stage, the key it last completed with. A re-run skips stages
whose key is unchanged and whose artefacts exist, so changing a training setting re-runs training and the
report only. Stages cache inside too (adapters per task, scores per shard, Ray Train checkpoints), so
``--resume`` continues an interrupted stage where it stopped; without it an interrupted training stage
starts afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskpgm_ray.config import Config
from taskpgm_ray.console import RunConsole, StageProgress
from taskpgm_ray.errors import BadInput
from taskpgm_ray.hashing import digest
from taskpgm_ray.io import atomic_write_json, atomic_write_text

# Settings that change where or how fast a stage runs, never its result: left out of the stage keys.
RESOURCE_FIELDS = {
    "probes": {"num_gpus", "num_cpus", "max_retries"},
    "estimation": {"num_actors", "num_gpus_per_actor", "num_cpus_per_actor", "max_actor_restarts"},
    "train": {"use_gpu", "cpus_per_worker", "max_failures", "audit_samples"},
    "tune": {"max_concurrent", "enabled"},  # enabled: only the select stage reads it
}
# Settings of the final fine-tune that Tune's short trials do not use.
FINAL_TRAIN_ONLY = {"steps", "eval_every", "checkpoint_every"}


def settings(cfg: Config, section: str, drop: set[str] = frozenset()) -> dict[str, Any]:
    """A config section as a dict, without its resource fields (and ``drop``)."""
    d = dataclasses.asdict(getattr(cfg, section))
    return {k: v for k, v in d.items() if k not in RESOURCE_FIELDS.get(section, set()) | set(drop)}


@dataclass
class Stage:
    """One pipeline stage: a key, the artefacts that prove it done, and the function that makes them."""

    name: str
    key: Callable[[], str]  # computed lazily: a key may depend on the previous stage's artefacts
    outputs: list[str]  # relative to the run directory
    run: Callable[[], Any]  # returns what the stage's console line summarises


class Pipeline:
    """The stages of one run directory and their bookkeeping in ``stages.json``."""

    def __init__(self, cfg: Config, *, resume: bool = False, ui: RunConsole | None = None):
        self.cfg = cfg
        self.resume = resume
        self.out = Path(cfg.output_dir).resolve()
        self.ui = ui or RunConsole()
        self._progress = StageProgress()  # the running stage's live line (silent between stages)
        self._state_path = self.out / "stages.json"  # {stage: {"key", "status", "seconds"}}
        self._state: dict[str, dict] = json.loads(self._state_path.read_text()) if self._state_path.exists() else {}
        self._tasks = None  # loaded once, shared by every stage
        self._evaluation = None
        self.timings: list[tuple[str, str, float]] = []  # (stage, status, seconds) for the summary table

    # -- shared inputs -------------------------------------------------------------------------------
    @property
    def tasks(self):
        if self._tasks is None:
            from taskpgm_ray.tasks import load_tasks

            self._tasks = load_tasks(self.cfg)
        return self._tasks

    @property
    def evaluation(self):
        """The evaluation sets (``evaluation:``, a suite's ``eval_only`` tasks), checked apart from the tasks."""
        if self._evaluation is None:
            from taskpgm_ray.tasks import check_apart, load_evaluation

            self._evaluation = load_evaluation(self.cfg)
            check_apart(self.tasks, self._evaluation)
        return self._evaluation

    def tasks_key(self) -> str:
        """The training tasks (what the probes and every later stage learn from)."""
        return digest([(t.name, t.hash) for t in self.tasks], dataclasses.asdict(self.cfg.splits))

    def manifest_key(self) -> str:
        """``tasks.json``: the tasks, and the evaluation sets when there are any (which only Tune, the final
        fine-tune's scores and compare read: they reach those keys through ``task_scores``)."""
        held = [(e.name, e.hash) for e in self.evaluation]
        return digest(self.tasks_key(), held) if held else self.tasks_key()

    def probes_key(self) -> str:
        from taskpgm_ray.models import model_fingerprint

        # The proxies' base model (proxy_model, or the target when unset) and its weights, not the target's.
        proxy = self.cfg.proxy
        return digest(self.tasks_key(), dataclasses.asdict(proxy), model_fingerprint(proxy),
                      settings(self.cfg, "probes"))

    def caps_key(self) -> list[float] | None:
        """The repetition caps every mixture is solved under (they depend on the final fine-tune's budget)."""
        from taskpgm_ray.distributed.solve import mixture_caps

        caps = mixture_caps(self.cfg, self.tasks)
        return None if caps is None else [round(float(c), 12) for c in caps]

    def task_scores(self) -> list:
        """What the selection metric counts (``tasks[*].score``, or the evaluation sets and their contents): Tune
        ranks trials by it, and the train stage's summary reports it (``eval_loss_scored``, ``test_loss_scored``)."""
        scores = [(t.name, t.score) for t in self.tasks]
        return scores + [(e.name, e.hash) for e in self.evaluation] if self.evaluation else scores

    def task_utilities(self, unaries: list[str]) -> list[tuple[str, float | None]] | None:
        """``tasks[*].utility`` when one of ``unaries`` (the unary terms a solve may use) is the utility, else None:
        no other unary reads them."""
        return [(t.name, t.utility) for t in self.tasks] if "utility" in unaries else None

    def solve_settings(self) -> list:
        """What a solve of the config's energy reads besides the estimation sums: every energy setting, the
        repetition caps and, with the utility unary, the tasks' utilities."""
        return [dataclasses.asdict(self.cfg.energy), self.caps_key(), self.task_utilities([self.cfg.energy.unary])]

    def sums_key(self) -> str:
        """What the estimation sums (``likelihoods.npz``, ``jsd.npz``, the signal sums) depend on: the proxies and
        the scoring settings; and when scoring stops on the mixture (``estimation.stop_when_stable``,
        ``estimation.active``), everything the solve that decides it reads. Active estimation also asks for at least
        two units per actor a round, so there ``num_actors`` changes which units are scored."""
        from taskpgm_ray.config import active_estimation

        e = self.cfg.estimation
        active = active_estimation(self.cfg, len(self.tasks))
        parts = [self.probes_key(), settings(self.cfg, "estimation")]
        if active or e.stop_when_stable is not None:
            parts.append(self.solve_settings())
        if active:
            parts.append(e.num_actors)
        return digest(*parts)

    def estimate_key(self) -> str:
        # train.weight_unit: estimate/mixture.json records what its weights count.
        return digest(self.sums_key(), self.solve_settings(), self.cfg.train.weight_unit)

    def target_key(self) -> list:
        """The target model (the one Tune's trials and the final fine-tune train) and its weights."""
        from taskpgm_ray.models import model_fingerprint

        return [dataclasses.asdict(self.cfg.model), model_fingerprint(self.cfg.model)]

    def tune_key(self) -> str:
        from taskpgm_ray.tune import trial_steps

        # Tune searches beta (as beta/lam), the affinity, kernel, tau, budget (and unary, prior strength when
        # listed): the energy's own values of those never reach a trial.
        t = self.cfg.tune
        searched = {"beta", "affinity", "kernel", "tau", "budget"} | ({"unary"} if t.unaries else set()) \
            | ({"prior_strength"} if t.prior_strengths else set())
        energy = {k: v for k, v in dataclasses.asdict(self.cfg.energy).items() if k not in searched}
        utilities = self.task_utilities(t.unaries or [self.cfg.energy.unary])
        return digest(self.sums_key(), energy, utilities, self.task_scores(), self.target_key(),
                      settings(self.cfg, "tune"), settings(self.cfg, "train", FINAL_TRAIN_ONLY), trial_steps(self.cfg),
                      self.caps_key())

    def select_key(self) -> str:
        # The whole file, not only its weights: select copies it, and the report and exports read the rest.
        source = self.out / ("tune/best.json" if self.cfg.tune.enabled else "estimate/mixture.json")
        return digest(self.cfg.tune.enabled, json.loads(source.read_text()))

    def train_key(self) -> str:
        mixture = json.loads((self.out / "mixture.json").read_text())
        return digest(self.tasks_key(), mixture["weights"], self.target_key(), settings(self.cfg, "train"),
                      self.task_scores())

    def report_key(self) -> str:
        # The report also shows `taskpgm compare`'s results when there are any (compare runs outside the stages).
        compare = self.out / "compare" / "results.json"
        return digest({name: rec["key"] for name, rec in self._state.items() if name != "report"},
                      hashlib.sha256(compare.read_bytes()).hexdigest() if compare.exists() else None)

    # -- the stages ----------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        cfg = self.cfg
        stages = [
            Stage("tasks", self.manifest_key, ["tasks.json"], self._run_tasks),
            Stage("probes", self.probes_key, ["probes"], self._run_probes),
            Stage("estimate", self.estimate_key, ["likelihoods.npz", "estimate/mixture.json"], self._run_estimate),
        ]
        if cfg.tune.enabled:
            stages.append(Stage("tune", self.tune_key, ["tune/results.json", "tune/best.json"], self._run_tune))
        stages += [
            Stage("select", self.select_key, ["mixture.json"], self._run_select),
            Stage("train", self.train_key, ["train/summary.json", "train/checkpoint"], self._run_train),
            Stage("report", self.report_key, ["report/summary.json"], self._run_report),
        ]
        return stages

    def _run_tasks(self) -> str:
        from taskpgm_ray.models import ensure_proxy_tokenizer, ensure_run_tokenizer
        from taskpgm_ray.tasks import write_manifest

        write_manifest(self.tasks, self.out, self.evaluation)
        ensure_run_tokenizer(self.cfg.model, self.out)
        ensure_proxy_tokenizer(self.cfg, self.out)
        sizes = {split: sum(t.sizes[split] for t in self.tasks) for split in ("train", "probe", "eval")}
        held = (f"; {len(self.evaluation)} evaluation sets ({sum(len(e.eval) for e in self.evaluation):,} "
                f"validation, {sum(len(e.test) for e in self.evaluation):,} test examples)" if self.evaluation else "")
        return (f"{len(self.tasks)} tasks: {sizes['train']:,} train, {sizes['probe']:,} probe, "
                f"{sizes['eval']:,} eval examples{held}")

    def _run_probes(self) -> str:
        from taskpgm_ray.distributed.probes import probe_command

        result = probe_command(self.cfg, tasks=self.tasks, progress=self._progress)
        n = len(result["probes"])
        return f"{n}/{n} proxies ({len(result['trained'])} trained, {len(result['cached'])} cached)"

    def _run_estimate(self) -> str:
        from taskpgm_ray.distributed.estimation import estimate_command

        p = estimate_command(self.cfg, tasks=self.tasks, progress=self._progress)
        line = f"{p['shards_used']}/{p['shards_total']} shards scored ({p['shards_cached']} cached)"
        changes = [row["l1_change"] for row in p["trajectory"] if row["l1_change"] is not None]
        if changes:
            line += f"; mixture L1 change {changes[-1]:.2g} at the last shard"
        return line + ("; stopped early: the mixture is stable" if p["stopped_early"] else "")

    def print_signal(self) -> None:
        """The estimate stage's verdict, in plain words: proxies that learned, the affinity's SNR, warnings."""
        from rich.markup import escape

        path = self.out / "estimate" / "signal.json"
        if not path.exists():
            return
        signal = json.loads(path.read_text())
        snr = signal.get("affinity", {}).get("snr")
        self.ui.line(f"signal: {signal['learned']}/{len(signal['tasks'])} proxies learned their task"
                     + (f"; PMI affinity signal-to-noise {snr:.1f}" if snr is not None else "")
                     + f" ({path.relative_to(self.out)})")
        for w in signal["warnings"]:
            self.ui.line(f"[yellow]warning:[/yellow] {escape(w)}")

    def _run_tune(self) -> str:
        from taskpgm_ray.mixture_file import load_sums
        from taskpgm_ray.tracking import trial_name
        from taskpgm_ray.tune import run_tune, write_best_mixture

        result = run_tune(self.cfg, self.tasks, load_sums(self.out), resume=self.resume, progress=self._progress,
                          evaluation=self.evaluation)
        best = result["best"]
        write_best_mixture(best, self.tasks, self.out / "tune" / "best.json", inputs_hash=self.tune_key(),
                           weight_unit=self.cfg.train.weight_unit)
        failed = sum(t["status"] == "error" for t in result["trials"])
        return (f"{len(result['trials'])} trials{f' ({failed} failed)' if failed else ''}; best "
                f"{trial_name(best['params']).removeprefix('trial-')}, validation loss {best['validation_loss']:.4f}")

    def _run_select(self) -> str:
        path = select_mixture(self.out, tune=self.cfg.tune.enabled)
        certainty = selected_certainty(self.cfg, self.tasks)
        source = "tune/best.json" if self.cfg.tune.enabled else "estimate/mixture.json"
        line = f"{path.name} = {source} ({json.loads(path.read_text())['method']})"
        if certainty is not None:
            line += f"; within {certainty['declared_l1']:.2g} L1 of its full-scoring mixture (90%)"
        return line

    def _run_train(self) -> str:
        from taskpgm_ray.train import train_command

        if not self.resume:  # a fresh run: do not continue a half-finished fine-tune of an older mixture
            shutil.rmtree(self.out / "train", ignore_errors=True)
        s = train_command(self.cfg, self.out / "mixture.json", tasks=self.tasks, evaluation=self.evaluation,
                          progress=self._progress)
        loss = s["loss_curve"][-1] if s.get("loss_curve") else float("nan")
        return (f"step {s['steps']}/{self.cfg.train.steps}, loss {loss:.4f}, eval loss {s['eval_loss_mean']:.4f}, "
                f"{s['throughput']['tokens_per_s']:,.0f} tokens/s")

    def _run_report(self) -> str:
        from taskpgm_ray.report import make_report

        make_report(self.out, tracking=self.cfg.tracking)
        return f"report/summary.md and {len(list((self.out / 'report').glob('*.png')))} plots"

    # -- orchestration -------------------------------------------------------------------------------
    def is_done(self, stage: Stage, key: str) -> bool:
        rec = self._state.get(stage.name, {})
        return rec.get("key") == key and rec.get("status") == "done" and \
            all((self.out / o).exists() for o in stage.outputs)

    def run(self, *, until: str | None = None) -> list[tuple[str, str, float]]:
        """Run every stage not already done with the same key (through ``until`` when given); return
        (stage, status, seconds) rows.

        The console gets one line per stage (live while it runs), then the stage table and where the results
        are; the stage's framework output goes to ``logs/<stage>.log`` when the console routes it there.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(_yaml(self.cfg.to_dict()))
        stages = self.stages()
        if until is not None:
            names = [st.name for st in stages]
            if until not in names:
                raise BadInput(f"unknown stage {until!r}; stages: {', '.join(names)}")
            stages = stages[: names.index(until) + 1]
        try:
            for stage in stages:
                self._run_stage(stage)
        except BaseException:
            self.print_table()
            raise
        self.print_table()
        if until is None:
            self.print_where()
        return self.timings

    def _run_stage(self, stage: Stage) -> None:
        """One stage: skipped when done with the same key, else run and recorded; its console line."""
        with self.ui.stage(stage.name) as progress:
            key = stage.key()  # inside: loading the tasks or hashing weights may print
            if self.is_done(stage, key):
                self.timings.append((stage.name, "cached", 0.0))
                self.ui.line(f"[dim]{stage.name:<9} up to date (key {key})[/dim]")
                return
            self._record(stage.name, key, "running", 0.0)
            start = time.time()
            self._progress = progress
            try:
                summary = stage.run()
            except BaseException:
                self._record(stage.name, key, "failed", time.time() - start)
                self.timings.append((stage.name, "failed", time.time() - start))
                raise
            finally:
                self._progress = StageProgress()
            seconds = time.time() - start
            self._record(stage.name, key, "done", seconds)
            self.timings.append((stage.name, "done", seconds))
        self.ui.line(f"[bold]{stage.name:<9}[/bold] {summary or 'done'}")
        if stage.name == "estimate":
            self.print_signal()

    def _record(self, name: str, key: str, status: str, seconds: float) -> None:
        self._state[name] = {"key": key, "status": status, "seconds": round(seconds, 2)}
        atomic_write_json(self._state_path, self._state)

    def print_table(self) -> None:
        from rich.table import Table

        table = Table()
        table.add_column("stage")
        table.add_column("status")
        table.add_column("seconds", justify="right")
        for name, status, seconds in self.timings:
            table.add_row(name, status, f"{seconds:.1f}")
        table.add_row("total", "", f"{sum(s for _, _, s in self.timings):.1f}")
        self.ui.final(f"taskpgm run: {_shown(self.out)}")  # not the table's title: rich wraps a long title
        self.ui.final(table)

    def print_where(self) -> None:
        """Where the mixture, the report, the W&B runs and the logs are (printed even with ``-q``)."""
        from taskpgm_ray.tracking import resolve_tracking

        self.ui.final(f"mixture  {_shown(self.out / 'mixture.json')}")
        self.ui.final(f"report   {_shown(self.out / 'report' / 'summary.md')}")
        tracking = resolve_tracking(self.cfg.tracking, self.out)
        if tracking.wandb == "offline":
            self.ui.final(f"W&B      offline, group {tracking.group}; upload: wandb sync $(find {_shown(self.out)} "
                          f"-type d -name 'offline-run-*')")
        elif tracking.wandb == "online":
            self.ui.final(f"W&B      project {tracking.project}, group {tracking.group}")
        if self.ui.log_dir is not None:
            self.ui.final(f"logs     {_shown(self.ui.log_dir.resolve())}")


def select_mixture(run_dir: str | Path, *, tune: bool) -> Path:
    """``mixture.json``, the mixture the run recommends: Tune's best trial (``tune/best.json``) when Tune is on,
    else the energy's mixture from the estimate stage (``estimate/mixture.json``). One writer, one source."""
    run_dir = Path(run_dir)
    source = run_dir / ("tune/best.json" if tune else "estimate/mixture.json")
    if not source.exists():
        raise BadInput(f"{source} not found: run `taskpgm {'tune' if tune else 'estimate'}` first")
    atomic_write_text(run_dir / "mixture.json", source.read_text())
    return run_dir / "mixture.json"


def mixture_energy(mixture: dict[str, Any], base: Any) -> Any:
    """The energy (``EnergyConfig``) a TaskPGM ``mixture.json`` was solved with: its ``hyperparameters`` and
    ``affinity`` over ``base`` (the config's energy, for fields a file leaves out); None for a baseline."""
    if mixture.get("method") != "taskpgm":
        return None
    hyper = mixture.get("hyperparameters") or {}
    given = {f.name: hyper[f.name] for f in dataclasses.fields(base) if f.name in hyper and f.name != "affinity"}
    return dataclasses.replace(base, **given, affinity=mixture.get("affinity") or base.affinity)


def selected_certainty(cfg: Config, tasks: list) -> dict[str, Any] | None:
    """With ``estimation.active``, the stop rule's bound for the mixture the run selected (``mixture.json``).

    The estimate stage's bound (``estimate/progress.json``) is for the config's energy; when the selected mixture
    is a TaskPGM trial with another energy, the rule's last check is redone for that energy
    (``estimation.active_certainty``) and written to ``select/certainty.json`` (with the energy and the weights it
    is for), which the report shows beside the mixture. None (and no file) otherwise: a baseline was selected, or
    the energy is the config's, whose bound the report takes from the estimate stage.
    """
    from taskpgm_ray.distributed.active_driver import active_certainty

    out = Path(cfg.output_dir)
    path = out / "select" / "certainty.json"
    path.unlink(missing_ok=True)  # never leave a bound for an earlier selection beside this one
    if not cfg.estimation.active:
        return None
    energy = mixture_energy(json.loads((out / "mixture.json").read_text()), cfg.energy)
    progress = json.loads((out / "estimate" / "progress.json").read_text()) \
        if (out / "estimate" / "progress.json").exists() else {}
    stage = progress.get("certainty") or {}
    if energy is None or dataclasses.asdict(energy) == stage.get("energy"):
        return None
    certainty = active_certainty(cfg, tasks, energy)
    if certainty is not None:
        atomic_write_json(path, certainty)
    return certainty


def _shown(path: Path) -> str:
    """``path`` as the console shows it: relative to the working directory when under it, else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


def run_pipeline(cfg: Config, *, resume: bool = False) -> list[tuple[str, str, float]]:
    """The whole job: tasks, probes, estimate, tune, train, report."""
    return Pipeline(cfg, resume=resume).run()

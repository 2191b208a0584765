"""Stage 7: Ray Tune over the energy hyperparameters, with the baselines as reference trials.

A trial solves the mixture from the cached estimation sums (no model runs), then fine-tunes with the
unchanged Ray Train + DeepSpeed trainer for ``tune.trial_steps`` (default: the final ``train.steps``) and reports
the mean validation loss over the scored tasks (``tasks[*].score``), which is what trials are ranked by.
RAY_NOTES: a trial is a function that builds a ``TorchTrainer`` and calls ``.fit()``; trial drivers take
almost no CPU and concurrency is capped by the cluster, so a 2-core machine never deadlocks.

Ray touch-points:
  ``tune.with_parameters`` / ``with_resources``  cfg, tasks, sums and the examples' reference to every trial;
                                                 ``TRIAL_CPU`` for the trial driver
  ``tune.Tuner`` (``Tuner.restore``)     the search: ``BasicVariantGenerator`` or ``OptunaSearch`` capped by
                                         ``max_concurrent``, ``ASHAScheduler``; ``--resume`` restores it
  ``_trial``                             ``build_trainer(callbacks=[TuneReportCallback()]).fit()``,
                                         ``tune.get_context().get_trial_id()``
  ``tune.Callback``                      the live line (``trial_progress``), on the driver
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from taskpgm_ray.config import Config, EnergyConfig
from taskpgm_ray.console import StageProgress
from taskpgm_ray.errors import BadInput
from taskpgm_ray.io import atomic_write_json
from taskpgm_ray.tasks import TaskData

TRIAL_CPU = 0.01  # RAY_NOTES: 0 is rejected, 1 (the default) starves the trial's own Train workers
TRIAL_MIXTURE = "mixture.json"  # under tune/trials/<trial id>/: the weights the trial trains on, and how it got them
METRIC = "eval_loss_scored"  # what trials are ranked by: mean validation loss over the tasks with score: true


# --------------------------------------------------------------------------------------------------
# the search space


def search_space(cfg: Config) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(Tune param_space for TaskPGM trials, the baselines as ``points_to_evaluate``)."""
    from ray import tune

    t = cfg.tune
    lo, hi = t.ratio_range
    space: dict[str, Any] = {
        "kind": "taskpgm",
        "ratio": tune.loguniform(lo, hi) if hi > lo else lo,
        "affinity": tune.choice(t.affinities),
        "kernel": tune.choice(t.kernels),
        "tau": tune.choice(t.taus),
        "unary": tune.choice(t.unaries) if t.unaries else cfg.energy.unary,
        "prior_strength": tune.choice(t.prior_strengths) if t.prior_strengths else cfg.energy.prior_strength,
        "budget": tune.choice(t.budgets) if t.budgets else None,
        "temperature": None,
    }
    if t.search == "grid":
        ratios = np.geomspace(lo, hi, max(1, t.num_samples)).tolist()
        space.update(ratio=tune.grid_search(ratios), affinity=tune.grid_search(t.affinities),
                     kernel=tune.grid_search(t.kernels))
    base = {"ratio": 1.0, "affinity": None, "kernel": None, "tau": None, "unary": None, "prior_strength": None,
            "budget": None, "temperature": None}
    points = []
    if t.baselines:
        points = [{**base, "kind": "uniform"}, {**base, "kind": "size"}]
        points += [{**base, "kind": "temperature", "temperature": T} for T in temperature_candidates(cfg)]
    return space, points


def taskpgm_trials(cfg: Config) -> int:
    """How many TaskPGM trials the search runs (a grid: every combination of its axes)."""
    t = cfg.tune
    if t.search == "grid":
        return max(1, t.num_samples) * len(t.affinities) * len(t.kernels)
    return t.num_samples


def temperature_candidates(cfg: Config) -> list[float]:
    """The temperatures Tune tries: ``tune.temperatures``, or as many as TaskPGM's trials (the same search
    budget) at the midpoints of equal steps on a log scale over ``tune.temperature_range``."""
    t = cfg.tune
    if t.temperatures is not None:
        return [float(T) for T in t.temperatures]
    k = max(1, taskpgm_trials(cfg))
    lo, hi = np.log(t.temperature_range[0]), np.log(t.temperature_range[1])
    return [round(float(np.exp(lo + (hi - lo) * (i + 0.5) / k)), 4) for i in range(k)]


def trial_energy(cfg: EnergyConfig, params: dict[str, Any]) -> EnergyConfig:
    """The energy settings of a TaskPGM trial: lam fixed at the config's, beta = ratio * lam."""
    lam = cfg.lam if cfg.lam > 0 else 1.0
    return dataclasses.replace(
        cfg, beta=float(params["ratio"]) * lam, lam=lam, affinity=params["affinity"], kernel=params["kernel"],
        tau=float(params["tau"]), unary=params["unary"], budget=params["budget"],
        prior_strength=float(params.get("prior_strength", cfg.prior_strength)),
    )


def trial_weights(params: dict[str, Any], sums: dict[str, Any], cfg: Config,
                  tasks: list[TaskData]) -> tuple[dict[str, float], dict[str, Any]]:
    """The mixture a trial trains on, and its description (method, hyperparameters, energy)."""
    from taskpgm_ray.distributed.solve import constrained, mixture_caps, solve_from_sums
    from taskpgm_ray.mixture import baseline_weights

    names = [t.name for t in tasks]
    sizes = np.array([len(t.train) for t in tasks], dtype=float)
    if params["kind"] != "taskpgm":
        # One protocol: a baseline trains within the same caps and floor as TaskPGM's solution.
        w = baseline_weights(params["kind"], sizes, temperature=params.get("temperature"))
        desc = {"method": params["kind"], "affinity": None, "energy": None, "kkt_residual": None,
                "hyperparameters": {"temperature": params["temperature"]} if params["temperature"] else {}}
        return constrained(dict(zip(names, map(float, w))), cfg, tasks), desc
    energy = trial_energy(cfg.energy, params)
    utilities = [t.utility for t in tasks] if energy.unary == "utility" else None
    weights, sol, _ = solve_from_sums(sums["loglik_sum"], sums["count"], sums.get("jsd_sum"),
                                      sums.get("jsd_count"), energy, utilities=utilities,
                                      signal=sums.get("signal"), max_weights=mixture_caps(cfg, tasks),
                                      sizes=[len(t.train) for t in tasks])
    hyper = {**{k: v for k, v in dataclasses.asdict(energy).items() if k != "affinity"},
             "ratio": float(params["ratio"])}
    desc = {"method": "taskpgm", "affinity": energy.affinity, "energy": float(sol.energy),
            "kkt_residual": float(sol.kkt_residual), "hyperparameters": hyper}
    return dict(zip(names, map(float, weights))), desc


# --------------------------------------------------------------------------------------------------
# the trial


def _trial(params: dict[str, Any], *, cfg: Config, tasks: list[TaskData], sums: dict[str, Any],
           run_dir: str, task_data: list[Any], evaluation: list[TaskData] = ()) -> None:
    """One Tune trial: solve (cheap), then a short Ray Train + DeepSpeed fine-tune reporting to Tune.

    ``task_data[0]`` is the examples' object-store reference (``put_task_data``), put once for every trial; it is
    wrapped in a list because ``tune.with_parameters`` resolves a bare reference to its value."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from taskpgm_ray.tracking import trial_tracking
    from taskpgm_ray.train import build_trainer

    weights, desc = trial_weights(params, sums, cfg, tasks)
    # W&B: the pipeline's group; the trial's runs named by its hyperparameters, which go in their config.
    cfg = dataclasses.replace(cfg, tracking=trial_tracking(cfg.tracking, run_dir, params, desc["hyperparameters"]))
    # A trial evaluates `trial_evals` times (ASHA's rungs) and keeps no intermediate checkpoints.
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, cpus_per_worker=cfg.tune.trial_cpus_per_worker, checkpoint_every=0,
        eval_every=max(1, trial_steps(cfg) // min(cfg.tune.trial_evals, trial_steps(cfg)))))
    trial_dir = Path(run_dir) / "tune" / "trials" / tune.get_context().get_trial_id()
    # Recorded before training: results.json reports these, never a solve redone afterwards.
    atomic_write_json(trial_dir / TRIAL_MIXTURE, {"weights": weights, **desc})
    trainer = build_trainer(cfg, tasks, weights, run_dir=str(trial_dir), name="train",
                            steps=trial_steps(cfg), num_workers=cfg.tune.trial_workers,
                            callbacks=[TuneReportCallback()], task_data=task_data[0], evaluation=evaluation)
    trainer.fit()


def trial_steps(cfg: Config) -> int:
    """Training steps of one trial: ``tune.trial_steps``, or the final fine-tune's ``train.steps``."""
    return cfg.tune.trial_steps or cfg.train.steps


def max_concurrent_trials(cfg: Config) -> int:
    """Trials that fit at once: each needs ``trial_workers`` Train workers of ``cpus_per_worker`` (and GPUs)."""
    from taskpgm_ray.distributed.cluster import cluster_resources

    have = cluster_resources()
    per_trial_cpu = cfg.tune.trial_workers * cfg.tune.trial_cpus_per_worker
    fit = math.floor(have["CPU"] / (per_trial_cpu + TRIAL_CPU) + 1e-9)
    if cfg.train.use_gpu:
        fit = min(fit, math.floor(have["GPU"] / cfg.tune.trial_workers + 1e-9))
    if fit < 1:
        raise BadInput(f"tune.trial_workers: a trial needs {per_trial_cpu:g} CPUs for its Train workers but the "
                       f"cluster has {have['CPU']:g}; lower tune.trial_workers or tune.trial_cpus_per_worker")
    # More than fits would leave trial drivers holding CPUs their Train workers wait for: a hang, not a speed-up.
    return min(cfg.tune.max_concurrent, fit) if cfg.tune.max_concurrent else fit


def trial_progress(progress: StageProgress, total: int | None) -> Any:
    """A Tune callback (it runs on the driver) showing trials finished k/n and the best so far on ``progress``."""
    from ray.tune import Callback

    from taskpgm_ray.tracking import trial_name

    class TrialProgress(Callback):
        # Tune pickles its callbacks with the experiment state: the live line stays out (closures too).
        def __init__(self, progress: StageProgress, total: int | None) -> None:
            self.progress, self.total = progress, total

        def __getstate__(self) -> dict:
            return {"progress": StageProgress(), "total": self.total}

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            scored = [(t.last_result[METRIC], t) for t in trials
                      if isinstance(t.last_result.get(METRIC), float) and math.isfinite(t.last_result[METRIC])]
            best = min(scored, key=lambda x: x[0]) if scored else None
            self.progress.update(sum(t.is_finished() for t in trials),
                                 total=max(self.total or 0, len(trials)) or None,
                                 info=f"best so far {trial_name(best[1].config).removeprefix('trial-')}: "
                                      f"{best[0]:.4f}" if best else "")

    return TrialProgress(progress, total)


def run_tune(cfg: Config, tasks: list[TaskData], sums: dict[str, Any], *, resume: bool = False,
             progress: StageProgress | None = None, evaluation: list[TaskData] = ()) -> dict[str, Any]:
    """Search, write ``tune/results.json``, and return ``{"best": ..., "trials": [...]}``.

    ``sums`` holds the estimation sums (``loglik_sum``, ``count``, optional ``jsd_sum``, ``jsd_count``);
    ``progress`` is the stage's live line (trials k/n, the best so far); with ``evaluation`` sets, trials are
    ranked on their validation part alone.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from taskpgm_ray.distributed.cluster import init_ray
    from taskpgm_ray.train.launch import put_task_data, scored_names

    init_ray()
    out = Path(cfg.output_dir).resolve()
    concurrent = max_concurrent_trials(cfg)
    space, points = search_space(cfg)
    n_taskpgm = 1 if cfg.tune.search == "grid" else cfg.tune.num_samples  # a grid's size comes from its axes
    if cfg.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = tune.search.ConcurrencyLimiter(
            OptunaSearch(points_to_evaluate=points or None, metric=METRIC, mode="min", seed=cfg.train.seed),
            max_concurrent=concurrent)
    else:  # RAY_NOTES: with a search algorithm, cap concurrency on it; max_concurrent_trials is ignored
        searcher = BasicVariantGenerator(points_to_evaluate=points or None, max_concurrent=concurrent,
                                         random_state=cfg.train.seed)
    evals = min(cfg.tune.trial_evals, trial_steps(cfg))
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max(evals, cfg.tune.asha_grace),
                              grace_period=cfg.tune.asha_grace, reduction_factor=2)
    # The examples go to the object store once; every trial's Train workers fetch them by reference.
    task_data = [put_task_data([*tasks, *evaluation])]  # in a list: with_parameters would resolve a bare reference
    trainable = tune.with_resources(
        tune.with_parameters(_trial, cfg=cfg, tasks=tasks, sums=sums, run_dir=str(out), task_data=task_data,
                             evaluation=list(evaluation)),
        {"cpu": TRIAL_CPU})
    storage = out / "tune" / "ray"
    started = time.time()
    total = None if cfg.tune.search == "grid" else n_taskpgm + len(points)
    progress = progress or StageProgress()
    progress.start(total)
    if resume and tune.Tuner.can_restore(str(storage / "search")):
        tuner = tune.Tuner.restore(str(storage / "search"), trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(metric=METRIC, mode="min", search_alg=searcher,
                                        scheduler=scheduler, num_samples=n_taskpgm + len(points),
                                        reuse_actors=True),  # one trial driver process per concurrent slot, reused
            run_config=tune.RunConfig(name="search", storage_path=str(storage),
                                      callbacks=[trial_progress(progress, total)]),
        )
    grid = tuner.fit()
    trials = []
    for r in grid:
        params = dict(r.config)
        m = r.metrics or {}
        trained = _trained_on(out, m.get("trial_id"))  # None: the trial failed before it recorded its mixture
        desc = {k: (trained or {}).get(k) for k in ("method", "affinity", "hyperparameters", "energy",
                                                    "kkt_residual")}
        trials.append({
            "trial_id": m.get("trial_id"), "kind": params["kind"], "params": params, **desc,
            "weights": (trained or {}).get("weights"),
            "validation_loss": m.get(METRIC), "validation_loss_all": m.get("eval_loss_mean"),
            "validation_loss_per_task": {t.name: m.get(f"eval_loss/{t.name}") for t in [*tasks, *evaluation]},
            "iterations": m.get("training_iteration"),
            # When the trial ran (Unix seconds), from Tune's own clock: its last result's timestamp (whole
            # seconds) less its total running time. Trials that overlap ran side by side.
            "wall_time": ({"start": m["timestamp"] - m["time_total_s"], "end": float(m["timestamp"])}
                          if m.get("timestamp") is not None and m.get("time_total_s") is not None else None),
            "status": "error" if r.error else ("stopped_early" if (m.get("training_iteration") or 0) < evals
                                               else "completed"),
            "error": str(r.error).splitlines()[0] if r.error else None,
        })
    ok = [t for t in trials if t["validation_loss"] is not None and math.isfinite(t["validation_loss"])
          and t["weights"] is not None]
    if not ok:
        raise RuntimeError(f"tune: no trial reported a validation loss ({len(trials)} trials; see {storage})")
    best = min(ok, key=lambda t: t["validation_loss"])
    result = {"best": best, "trials": trials, "seconds": time.time() - started,
              "max_concurrent": concurrent,
              "metric": f"{METRIC} (mean validation loss over the "
                        f"{'evaluation sets' if evaluation else 'scored tasks'}: "
                        f"{', '.join(scored_names(tasks, evaluation))})"}
    atomic_write_json(out / "tune" / "results.json", result)
    return result


def _trained_on(out: Path, trial_id: str | None) -> dict[str, Any] | None:
    """The mixture a trial recorded before training (``tune/trials/<id>/mixture.json``), or None."""
    path = out / "tune" / "trials" / str(trial_id) / TRIAL_MIXTURE
    return json.loads(path.read_text()) if trial_id and path.exists() else None


def write_best_mixture(best: dict[str, Any], tasks: list[TaskData], path: str | Path, *, inputs_hash: str,
                       weight_unit: str = "examples") -> None:
    """Write the best trial's mixture (format of ``mixture.json``, CONTRACT.md), validation loss in its
    hyperparameters: ``tune/best.json``, which the select step makes the run's ``mixture.json``."""
    from taskpgm_ray.mixture_file import write_mixture

    hyper = {**best["hyperparameters"], "selected_by": "tune", "validation_loss": best["validation_loss"],
             "metric": METRIC}
    write_mixture(path, weights=best["weights"], method=best["method"], affinity=best["affinity"],
                  hyperparameters=hyper, energy=best["energy"], kkt_residual=best["kkt_residual"],
                  sizes={t.name: len(t.train) for t in tasks}, inputs_hash=inputs_hash, weight_unit=weight_unit)

"""``taskpgm compare``: does the mixture pay for itself? The run's TaskPGM mixture against uniform, size and
temperature sampling, each fine-tuned with the same budget and scored on the TEST split.

Every method gets the run's final fine-tune (``train``: steps x micro batch x accumulation x workers, the
same learning rate and schedule); per seed, ``train.seed`` is the seed. Scores are the per-task mean
response-token NLL on each task's test split, which no selection ever saw (Tune selects on the validation
split); the metric is their mean over the scored tasks (``tasks[*].score``), or with evaluation sets
(``evaluation:``, a suite's ``eval_only`` tasks) over those, each once. One protocol: every mixture
trains within the same caps and floor (``solve.constrained``), and results.json records the weights trained
and the tokens. Which mixtures:

- ``taskpgm``: the best TaskPGM trial of ``tune/results.json`` when Tune ran, else ``estimate/mixture.json``;
- ``uniform``, ``size``; ``temperature`` with T chosen on validation (the best temperature trial of Tune; the
  middle of Tune's candidates without one);
- ``pick``: the run's ``mixture.json``, what the select stage handed the user;
- the ablations of the TaskPGM trial's energy, solved from the run's sums: ``taskpgm-no-pairwise`` (lam 0),
  ``taskpgm-no-unary`` (beta 0) and ``paper`` (``config.PAPER_ENERGY``);
- every ``--mixture FILE``, by its file stem.

Each fine-tune is cached under ``compare/runs/`` by (weights, train settings, tasks, seed): a re-run only trains
what is new, and methods with the same weights share one fine-tune. Writes ``compare/results.json``
(CONTRACT.md), ``compare/summary.md`` and ``compare/compare.png``.

Ray touch-points (in ``compare_command``): ``ray.put`` (the tasks, once), ``ray.remote(_fit).options`` (one task per
fine-tune, each building a ``TorchTrainer`` through ``build_trainer``), ``ray.wait`` / ``ray.get``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from taskpgm_ray.config import Config
from taskpgm_ray.console import StageProgress
from taskpgm_ray.errors import BadInput
from taskpgm_ray.figures import plot_compare
from taskpgm_ray.io import atomic_write_json, atomic_write_text
from taskpgm_ray.tasks import TaskData

FORMAT = "taskpgm-compare/1"
METRIC = "mean test loss over scored tasks"
EVALUATION_METRIC = "mean test loss over the evaluation sets (each set once)"
BASELINES = ("uniform", "size", "temperature")
FIT_CPU = 0.01  # the driver task of one fine-tune holds almost nothing; its Train workers hold the CPUs


# --------------------------------------------------------------------------------------------------
# which mixtures


def run_mixtures(cfg: Config, tasks: list[TaskData], extra: list[str | Path] = ()) -> dict[str, dict[str, Any]]:
    """``{method: {"weights": {task: w}, "source": str, ...}}``: taskpgm, the baselines, the run's pick, the
    ablations and the ``extra`` files, each as the fine-tune trains it (``solve.constrained``: the same caps
    and floor for every method)."""
    from taskpgm_ray.distributed.solve import constrained
    from taskpgm_ray.mixture import baseline_weights
    from taskpgm_ray.mixture_file import read_mixture
    from taskpgm_ray.tune import temperature_candidates, trial_energy

    out_dir = Path(cfg.output_dir)
    names = [t.name for t in tasks]
    sizes = np.array([len(t.train) for t in tasks], dtype=float)
    tune = _read_json(out_dir / "tune" / "results.json")
    trials = [t for t in (tune or {}).get("trials", []) if _finite(t.get("validation_loss"))]
    mixtures: dict[str, dict[str, Any]] = {}

    taskpgm_trials = [t for t in trials if t["kind"] == "taskpgm"]
    energy = cfg.energy
    if taskpgm_trials:
        best = min(taskpgm_trials, key=lambda t: t["validation_loss"])
        mixtures["taskpgm"] = {"weights": best["weights"], "source": "tune/results.json (best TaskPGM trial)",
                               "hyperparameters": best["hyperparameters"], "validation_loss": best["validation_loss"]}
        energy = trial_energy(cfg.energy, best["params"])
    elif (out_dir / "estimate" / "mixture.json").exists():
        m = read_mixture(str(out_dir / "estimate" / "mixture.json"))
        mixtures["taskpgm"] = {"weights": m["weights"], "source": "estimate/mixture.json",
                               "hyperparameters": m.get("hyperparameters")}
    else:
        raise BadInput(f"{out_dir}: no TaskPGM mixture (neither tune/results.json nor "
                       f"estimate/mixture.json); run `taskpgm run` (or `taskpgm estimate`) first")

    for kind in ("uniform", "size"):
        mixtures[kind] = {"weights": dict(zip(names, map(float, baseline_weights(kind, sizes)))), "source": kind}
        tried = [t for t in trials if t["kind"] == kind]
        if tried:
            mixtures[kind]["validation_loss"] = tried[0]["validation_loss"]
    temps = [t for t in trials if t["kind"] == "temperature"]
    if temps:
        best_t = min(temps, key=lambda t: t["validation_loss"])
        T, source, val = float(best_t["params"]["temperature"]), "chosen on validation by Tune", \
            best_t["validation_loss"]
    else:
        candidates = temperature_candidates(cfg)
        T, source, val = candidates[len(candidates) // 2], "the middle of Tune's candidates (no trials)", None
    mixtures["temperature"] = {"weights": dict(zip(names, map(float, baseline_weights("temperature", sizes,
                                                                                      temperature=T)))),
                               "source": f"T = {T:g}, {source}", "temperature": T, "validation_loss": val}
    if (out_dir / "mixture.json").exists():  # what the select stage handed the user
        m = read_mixture(str(out_dir / "mixture.json"))
        mixtures["pick"] = {"weights": m["weights"], "source": f"mixture.json (method {m.get('method')!r})"}
    if (out_dir / "likelihoods.npz").exists():
        mixtures.update(_ablations(cfg, tasks, energy))
    for path in extra:
        stem = Path(path).stem
        if stem in mixtures:
            raise BadInput(f"--mixture {path}: its name {stem!r} clashes with a built-in method; rename the file")
        m = read_mixture(str(path))
        mixtures[stem] = {"weights": m["weights"], "source": str(path)}
    for m in mixtures.values():
        m["weights"] = constrained(m["weights"], cfg, tasks)
    return mixtures


def _ablations(cfg: Config, tasks: list[TaskData], energy) -> dict[str, dict[str, Any]]:
    """TaskPGM's chosen energy without its pairwise term (lam 0: the unary and the prior alone), without its
    unary (beta 0), and the paper's energy (``config.PAPER_ENERGY``), solved from the run's sums."""
    from taskpgm_ray.config import PAPER_ENERGY
    from taskpgm_ray.distributed.solve import mixture_caps, solve_from_sums
    from taskpgm_ray.mixture_file import load_sums

    sums = load_sums(cfg.output_dir)
    if sums["tasks"] != [t.name for t in tasks]:
        return {}
    variants = {"taskpgm-no-pairwise": dataclasses.replace(energy, lam=0.0),
                "taskpgm-no-unary": dataclasses.replace(energy, beta=0.0),
                "paper": dataclasses.replace(energy, affinity="pmi", budget=None, **PAPER_ENERGY)}
    utilities = [t.utility for t in tasks]
    out = {}
    for name, e in variants.items():
        weights, _, _ = solve_from_sums(sums["loglik_sum"], sums["count"], sums.get("jsd_sum"), sums.get("jsd_count"),
                                        e, utilities=utilities if e.unary == "utility" else None,
                                        signal=sums.get("signal"), max_weights=mixture_caps(cfg, tasks),
                                        sizes=[len(t.train) for t in tasks])
        out[name] = {"weights": dict(zip(sums["tasks"], map(float, weights))),
                     "source": f"the TaskPGM energy's ablation (beta {e.beta:g}, lam {e.lam:g}, unary {e.unary}, "
                               f"prior {e.prior})"}
    return out


# --------------------------------------------------------------------------------------------------
# the fine-tunes


def _fit(cfg: Config, tasks: list[TaskData], weights: dict[str, float], run_dir: str,
         evaluation: list[TaskData]) -> dict:
    """One fine-tune scored on the test split (runs as a Ray task so several can share the cluster)."""
    from taskpgm_ray.train import build_trainer

    result = build_trainer(cfg, tasks, weights, run_dir=run_dir, name="compare", eval_split="test",
                           evaluation=evaluation).fit()
    if result.return_value is None:
        raise RuntimeError(f"compare fine-tune in {run_dir} returned no summary ({result.error})")
    return result.return_value


def compare_command(cfg: Config, *, mixtures: list[str | Path] = (), seeds: list[int] | None = None,
                    tasks: list[TaskData] | None = None, evaluation: list[TaskData] | None = None,
                    progress: StageProgress | None = None) -> dict[str, Any]:
    """Fine-tune every mixture with the run's budget for every seed, score on test, write ``compare/``.

    ``progress`` is the live line: fine-tunes finished k/n (cached ones count as finished). ``tasks`` and
    ``evaluation`` default to the config's.

    Raises:
        BadInput: a scored task without test examples, a bad mixture file, a train config that does not fit, or no
            TaskPGM mixture in the run yet.
    """
    import ray

    from taskpgm_ray.distributed.cluster import cluster_resources, init_ray
    from taskpgm_ray.hashing import digest
    from taskpgm_ray.models import ensure_run_tokenizer
    from taskpgm_ray.tasks import load_evaluation, load_tasks
    from taskpgm_ray.train.launch import scored_names
    from taskpgm_ray.train.validation import validate_mixture

    t0 = time.perf_counter()
    tasks = load_tasks(cfg) if tasks is None else tasks
    evaluation = load_evaluation(cfg) if evaluation is None else evaluation
    scored = scored_names(tasks, evaluation)
    missing = [t.name for t in tasks if not t.test and t.name in scored]
    if missing:
        raise BadInput(f"compare scores on each task's test split; task(s) {', '.join(map(repr, missing))} have "
                       f"none: give them a source with a 'test' split, or add an `evaluation:` section")
    methods = run_mixtures(cfg, tasks, mixtures)
    for m in methods.values():
        validate_mixture(m["weights"], tasks, cfg)  # every problem before any worker starts
    seeds = list(seeds) if seeds else [cfg.train.seed]
    out_dir = Path(cfg.output_dir).resolve()
    ensure_run_tokenizer(cfg.model, out_dir)
    init_ray()
    from taskpgm_ray.tracking import resolve_tracking

    # every fine-tune joins the run's W&B group (its own run directory would start a new one)
    cfg = dataclasses.replace(cfg, tracking=resolve_tracking(cfg.tracking, out_dir))
    tc = cfg.train
    have = cluster_resources()
    per_fit = tc.num_workers * tc.cpus_per_worker + FIT_CPU
    if per_fit > have["CPU"] + 1e-9:
        raise BadInput(f"train: a fine-tune needs {per_fit:g} CPUs but the cluster has {have['CPU']:g}")
    fit = ray.remote(_fit).options(num_cpus=FIT_CPU, max_retries=0)
    # once in the object store, not pickled into every fine-tune's arguments
    tasks_ref, evaluation_ref = ray.put(tasks), ray.put(list(evaluation))

    summaries: dict[tuple[int, str], dict] = {}
    pending: dict[Any, list[tuple[int, str, Path]]] = {}
    by_key: dict[str, Any] = {}  # one fine-tune per distinct (weights, settings, seed): e.g. the pick is a trial's
    for seed in seeds:
        scfg = dataclasses.replace(cfg, train=dataclasses.replace(tc, seed=seed, checkpoint_every=0))
        for method, m in methods.items():
            key = digest(m["weights"], dataclasses.asdict(scfg.train), dataclasses.asdict(cfg.model),
                         [(t.name, t.hash) for t in [*tasks, *evaluation]])
            run_dir = out_dir / "compare" / "runs" / f"{method}-seed{seed}-{key}"
            path = run_dir / "summary.json"
            # a finished fine-tune of these weights under any method's name (the pick is one of the trials)
            cached = next(iter(sorted((out_dir / "compare" / "runs").glob(f"*-seed{seed}-{key}/summary.json"))), None)
            if cached is not None:
                summaries[(seed, method)] = json.loads(cached.read_text())
                if not path.exists():
                    atomic_write_json(path, summaries[(seed, method)])
            elif key in by_key:
                pending[by_key[key]].append((seed, method, path))
            else:
                by_key[key] = fit.remote(scfg, tasks_ref, m["weights"], str(run_dir), evaluation_ref)
                pending[by_key[key]] = [(seed, method, path)]
    progress = progress or StageProgress()
    waiting = sum(len(v) for v in pending.values())
    progress.start(len(summaries) + waiting, done=len(summaries))
    while pending:  # Ray runs as many fine-tunes side by side as the cluster's CPUs allow
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        summary = ray.get(ref)
        for seed, method, path in pending.pop(ref):
            atomic_write_json(path, summary)
            summaries[(seed, method)] = summary
        progress.update(len(summaries), info=f"last finished: {method}, seed {seed}")

    metric = EVALUATION_METRIC if evaluation else METRIC
    results = _results(scored, methods, seeds, summaries, metric)
    results["seconds"] = time.perf_counter() - t0
    atomic_write_json(out_dir / "compare" / "results.json", results)
    atomic_write_text(out_dir / "compare" / "summary.md", summary_markdown(results))
    plot_compare(results, out_dir / "compare" / "compare.png")
    return results


# --------------------------------------------------------------------------------------------------
# results


def _scored_mean(per_task: dict[str, float], scored: list[str]) -> float:
    return float(np.mean([per_task[n] for n in scored]))


def _results(scored, methods, seeds, summaries, metric: str = METRIC) -> dict[str, Any]:
    """The ``taskpgm-compare/1`` document, plus curves, steps to uniform's loss and the trial/final ranks."""
    rows = []
    for seed in seeds:
        row: dict[str, Any] = {"seed": seed, "test_loss": {}, "per_task": {}, "weights": {}, "curves": {},
                               "accuracy": {}, "tokens": {}}
        for method, m in methods.items():
            s = summaries[(seed, method)]
            row["test_loss"][method] = _scored_mean(s["eval_loss_per_task"], scored)
            row["per_task"][method] = {k: float(v) for k, v in s["eval_loss_per_task"].items()}
            row["accuracy"][method] = _scored_mean(s["eval_accuracy_per_task"], scored)
            row["weights"][method] = {k: float(v) for k, v in m["weights"].items()}
            row["tokens"][method] = int(sum(s.get("tokens_per_task", {}).values()))
            row["curves"][method] = [[h["step"], _scored_mean(h["eval_loss_per_task"], scored)] for h in s["history"]]
        target = row["test_loss"]["uniform"]
        final = max(step for step, _ in row["curves"]["uniform"])
        row["steps_to_uniform"] = {
            method: next((step for step, loss in curve if loss <= target + 1e-12), None)
            for method, curve in row["curves"].items()}
        row["steps_to_uniform_fraction"] = {k: (v / final if v is not None else None)
                                            for k, v in row["steps_to_uniform"].items()}
        best_baseline = min(BASELINES, key=lambda b: row["test_loss"][b])
        row["best_baseline"] = best_baseline
        row["taskpgm_wins"] = row["test_loss"]["taskpgm"] < row["test_loss"][best_baseline]
        if "pick" in row["test_loss"]:
            row["pick_regret"] = row["test_loss"]["pick"] - row["test_loss"][best_baseline]
        val = {k: m.get("validation_loss") for k, m in methods.items() if _finite(m.get("validation_loss"))}
        if len(val) >= 3:  # does the ranking of the (shorter) Tune trials predict the final one?
            keys = sorted(val)
            row["trial_final_spearman"] = _spearman([val[k] for k in keys], [row["test_loss"][k] for k in keys])
        rows.append(row)
    return {
        "format": FORMAT, "metric": metric, "scored_tasks": scored, "seeds": rows,
        "methods": {k: {kk: vv for kk, vv in m.items() if kk != "weights"} for k, m in methods.items()},
        "taskpgm_wins": sum(r["taskpgm_wins"] for r in rows),
        "mean_test_loss": {k: float(np.mean([r["test_loss"][k] for r in rows])) for k in methods},
    }


def _spearman(a: list[float], b: list[float]) -> float | None:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if np.std(ra) == 0 or np.std(rb) == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def summary_markdown(results: dict[str, Any]) -> str:
    """A table per seed: test loss per method (scored mean), steps to reach uniform's final loss, the winner."""
    methods = list(results["methods"])
    lines = [f"# taskpgm compare: {results['metric']}", "",
             f"Scored tasks: {', '.join(results['scored_tasks'])}. Lower is better; every method has the same "
             f"budget. TaskPGM beats the best baseline in {results['taskpgm_wins']} of {len(results['seeds'])} "
             f"seed(s).", "",
             "| seed | " + " | ".join(methods) + " | best baseline | TaskPGM wins | "
             "steps to uniform's loss (TaskPGM) |",
             "| --- | " + " | ".join("---" for _ in methods) + " | --- | --- | --- |"]
    for r in results["seeds"]:
        steps = r["steps_to_uniform"]["taskpgm"]
        frac = r["steps_to_uniform_fraction"]["taskpgm"]
        lines.append(f"| {r['seed']} | " + " | ".join(f"{r['test_loss'][m]:.4f}" for m in methods) +
                     f" | {r['best_baseline']} | {'yes' if r['taskpgm_wins'] else 'no'} | " +
                     (f"{steps} ({frac:.0%})" if steps is not None else "never") + " |")
    lines.append("| mean | " + " | ".join(f"{results['mean_test_loss'][m]:.4f}" for m in methods) + " | | | |")
    lines += ["", "Where each mixture comes from: " + "; ".join(f"{k}: {m['source']}" for k, m in
                                                              results["methods"].items()), ""]
    return "\n".join(lines)

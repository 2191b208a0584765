"""Benchmark: do short Tune trials rank mixtures like full-length ones? (issue 23 item 4)

    .venv/bin/python benchmarks/short_trials.py RUN_DIR [RUN_DIR ...] [--fractions 0.125 0.25 0.5] [--out DIR]

The configs rank short Tune trials (``configs/gpu-8b.yaml``: 150-step trials for a 1,000-step fine-tune;
``configs/test.yaml``: 20 of 120), but a quality-benchmark run (``benchmarks/quality.py``, ``runs/quality*/seed-S``)
runs its Tune trials at the full ``train.steps``. This script takes such finished run directories and re-trains
every trial's mixture (``tune/results.json``: its ``weights``, exactly what the trial trained on) as a SHORT trial
of each fraction of ``train.steps``, set up exactly as ``tune._trial`` sets up a trial whose ``tune.trial_steps``
is that many steps: ``train.cpus_per_worker = tune.trial_cpus_per_worker``, ``checkpoint_every = 0``,
``eval_every = steps // min(tune.trial_evals, steps)``, ``num_workers = tune.trial_workers``, the learning-rate
schedule over the short length (``build_trainer(steps=...)``: warm-up then cosine decay to its end), the run's
``train.seed``, scored on the VALIDATION split with Tune's metric (``tune.METRIC``: the mean validation loss over
the scored tasks, the last evaluation). Nothing else changes: the run's config (``RUN_DIR/config.yaml``), its
tasks (the generated data under ``RUN_DIR/data``, checked against ``RUN_DIR/tasks.json``).

Per run directory and fraction it reports the Spearman rank correlation between the short trials' validation
losses and the full-length trials' (``tune/results.json``), whether the short ranking picks the same best trial,
and the regret: the full-length validation loss of the short ranking's pick minus the best full-length one. For
scale, the gap between the best and the second-best full-length trial is reported too. ``--fractions 1`` re-runs
the full length itself: how far a re-run of the same trial moves its loss (the ranking's own noise floor).

The fine-tunes run as Ray tasks side by side like ``taskpgm compare`` (``ray.remote(_fit).options(num_cpus=0.01)``,
each Train worker ``tune.trial_cpus_per_worker`` CPUs: two 0.9-CPU trials share 2 cores). Each short fine-tune's
summary is cached under ``RUN_DIR/short_trials/<fraction>-<digest>/summary.json`` (digest: weights, train settings,
model, tasks), so a re-run resumes. Writes ``benchmarks/results/short_trials.{json,txt}`` (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A shared 2-core machine: a Train worker's start (torch + DeepSpeed imports) can exceed Ray's 60 s default.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FIT_CPU = 0.01  # the driver task of one fine-tune holds almost nothing; its Train workers hold the CPUs (RAY_NOTES)
DEFAULT_FRACTIONS = (0.125, 0.25, 0.5)


# --------------------------------------------------------------------------------------------------
# one run directory


def load_run(run_dir: Path) -> dict[str, Any]:
    """The run's config, tasks and finished full-length trials."""
    from taskpgm_ray.config import load_config
    from taskpgm_ray.tasks import load_tasks
    from taskpgm_ray.tune import trial_steps

    for need in ("config.yaml", "tune/results.json", "tasks.json"):
        if not (run_dir / need).exists():
            raise SystemExit(f"{run_dir}: no {need}: not a finished run directory (run the pipeline through tune)")
    cfg = load_config(run_dir / "config.yaml")
    if Path(cfg.output_dir).resolve() != run_dir.resolve():
        # the config names its own run directory (tokenizer, data): use it where it now is
        cfg = dataclasses.replace(cfg, output_dir=str(run_dir.resolve()))
    results = json.loads((run_dir / "tune" / "results.json").read_text())
    full_steps = cfg.train.steps
    if trial_steps(cfg) != full_steps:
        raise SystemExit(f"{run_dir}: its Tune trials ran {trial_steps(cfg)} steps, not train.steps = {full_steps}: "
                         f"their losses are not full-length")
    tasks = load_tasks(cfg)
    manifest = {t["name"]: t.get("hash") for t in json.loads((run_dir / "tasks.json").read_text())["tasks"]}
    mine = {t.name: t.hash for t in tasks}
    if mine != manifest:
        raise SystemExit(f"{run_dir}: the tasks loaded from config.yaml differ from tasks.json (names or hashes): "
                         f"the data is not what Tune trained on")
    trials, skipped = [], []
    for t in results["trials"]:
        loss = t.get("validation_loss")
        if t.get("status") == "completed" and t.get("weights") and isinstance(loss, (int, float)) \
                and math.isfinite(loss):
            trials.append(t)
        else:
            skipped.append({"trial_id": t.get("trial_id"), "status": t.get("status")})
    if len(trials) < 2:
        raise SystemExit(f"{run_dir}: {len(trials)} completed trial(s) with a validation loss; need at least 2")
    return {"dir": run_dir, "cfg": cfg, "tasks": tasks, "trials": trials, "skipped": skipped,
            "full_steps": full_steps}


def short_config(cfg, steps: int):
    """The run's config as ``tune._trial`` sets it for a trial of ``steps`` steps (W&B off: a benchmark)."""
    t = cfg.tune
    train = dataclasses.replace(cfg.train, cpus_per_worker=t.trial_cpus_per_worker, checkpoint_every=0,
                                eval_every=max(1, steps // min(t.trial_evals, steps)),
                                steps=steps, num_workers=t.trial_workers)
    return dataclasses.replace(cfg, train=train, tracking=dataclasses.replace(cfg.tracking, wandb="disabled"))


def trial_label(t: dict[str, Any]) -> str:
    p = t.get("params") or {}
    if t["kind"] == "temperature":
        return f"temperature T={p.get('temperature'):g}"
    if t["kind"] == "taskpgm":
        return f"taskpgm ratio={p.get('ratio', 0):.3g} prior={p.get('prior_strength')}"
    return t["kind"]


def _fit(cfg, tasks, weights: dict[str, float], run_dir: str, task_data: list) -> dict:
    """One short trial scored on the validation split (a Ray task, so several share the cluster)."""
    from taskpgm_ray.train import build_trainer

    result = build_trainer(cfg, tasks, weights, run_dir=run_dir, name="short", steps=cfg.train.steps,
                           num_workers=cfg.train.num_workers, eval_split="eval", task_data=task_data[0]).fit()
    if result.return_value is None:
        raise RuntimeError(f"short trial in {run_dir} returned no summary ({result.error})")
    return result.return_value


# --------------------------------------------------------------------------------------------------
# read-outs


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rho with average ranks for ties; None when either side is constant."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a), rankdata(b)
    if np.std(ra) == 0 or np.std(rb) == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def readout(trials: list[dict], short: list[float]) -> dict[str, Any]:
    full = [float(t["validation_loss"]) for t in trials]
    best_full, pick = int(np.argmin(full)), int(np.argmin(short))
    ordered = sorted(full)
    return {"spearman": spearman(short, full), "same_best": pick == best_full,
            "regret": full[pick] - full[best_full],
            "best_full": trial_label(trials[best_full]), "short_pick": trial_label(trials[pick]),
            "gap_best_second": ordered[1] - ordered[0]}


# --------------------------------------------------------------------------------------------------
# main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="finished quality-benchmark run directories "
                        "(runs/quality*/seed-S) whose Tune trials ran the full train.steps")
    parser.add_argument("--fractions", type=float, nargs="+", default=list(DEFAULT_FRACTIONS),
                        help="short-trial lengths as fractions of train.steps (default 1/8 1/4 1/2; 1: a re-run)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="where short_trials.{json,txt} go (default benchmarks/results)")
    args = parser.parse_args()
    if any(not 0 < f <= 1 for f in args.fractions):
        parser.error("--fractions: each must be in (0, 1]")
    command = "python benchmarks/short_trials.py " + " ".join(sys.argv[1:])
    t0 = time.time()

    import ray

    from taskpgm_ray.distributed.cluster import cluster_resources, init_ray
    from taskpgm_ray.hashing import digest
    from taskpgm_ray.io import atomic_write_json
    from taskpgm_ray.models import ensure_run_tokenizer
    from taskpgm_ray.train.launch import put_task_data
    from taskpgm_ray.train.validation import validate_mixture

    runs = [load_run(d) for d in args.run_dirs]
    jobs = []  # (run index, fraction, steps, trial index, cfg, run dir of the fine-tune)
    for i, run in enumerate(runs):
        ensure_run_tokenizer(run["cfg"].model, run["dir"].resolve())
        for f in args.fractions:
            steps = max(1, int(run["full_steps"] * f))
            scfg = short_config(run["cfg"], steps)
            for j, t in enumerate(run["trials"]):
                validate_mixture(t["weights"], run["tasks"], scfg)  # every problem before any worker starts
                key = digest(t["weights"], dataclasses.asdict(scfg.train), dataclasses.asdict(scfg.model),
                             [(x.name, x.hash) for x in run["tasks"]])
                jobs.append((i, f, steps, j, scfg, run["dir"].resolve() / "short_trials" / f"{f:g}-{key}"))

    summaries: dict[tuple[int, float, int], dict] = {}
    todo = []
    for job in jobs:
        path = job[5] / "summary.json"
        if path.exists():
            summaries[job[:2] + (job[3],)] = json.loads(path.read_text())
        else:
            todo.append(job)
    print(f"{len(jobs)} short trials over {len(runs)} run dir(s); {len(jobs) - len(todo)} cached, "
          f"{len(todo)} to train", flush=True)
    if todo:
        init_ray(num_cpus=2)
        have = cluster_resources()
        per_trial = [short_config(run["cfg"], 1).train for run in runs]
        need = max(tc.num_workers * tc.cpus_per_worker + FIT_CPU for tc in per_trial)
        side_by_side = math.floor(have["CPU"] / need + 1e-9)
        if side_by_side < 1:
            raise SystemExit(f"a trial needs {need:g} CPUs but the cluster has {have['CPU']:g}")
        print(f"{side_by_side} short trial(s) side by side ({need:g} CPUs each of {have['CPU']:g})", flush=True)
        fit = ray.remote(_fit).options(num_cpus=FIT_CPU, max_retries=0)
        refs = {}
        shared = {i: (ray.put(runs[i]["tasks"]), [put_task_data(runs[i]["tasks"], "eval")])
                  for i in {job[0] for job in todo}}  # once per run in the object store
        # shortest first: every fraction of every run gets results early, and the cache fills from the cheap end
        queue = sorted(todo, key=lambda j: (j[2], j[0], j[3]))
        done = 0
        while queue or refs:
            # Only as many in flight as fit (like Tune's max_concurrent): every submitted fit starts a driver
            # and a Train controller that wait for CPUs, which on a small machine only costs memory and time.
            while queue and len(refs) < side_by_side:
                job = queue.pop(0)
                i, f, steps, j, scfg, fdir = job
                if fdir.exists():  # an interrupted earlier attempt (no summary.json): no checkpoint to resume
                    shutil.rmtree(fdir)
                tasks_ref, data = shared[i]
                refs[fit.remote(scfg, tasks_ref, runs[i]["trials"][j]["weights"], str(fdir), data)] = job
            (ref,), _ = ray.wait(list(refs), num_returns=1)
            i, f, steps, j, scfg, fdir = refs.pop(ref)
            summary = ray.get(ref)
            atomic_write_json(fdir / "summary.json", summary)
            summaries[(i, f, j)] = summary
            done += 1
            print(f"[{done}/{len(todo)} {time.time() - t0:.0f}s] {runs[i]['dir']} {f:g} ({steps} steps) "
                  f"{trial_label(runs[i]['trials'][j])}: {summary['eval_loss_scored']:.4f} "
                  f"(full {runs[i]['trials'][j]['validation_loss']:.4f})", flush=True)

    rows, per_run = [], []
    for i, run in enumerate(runs):
        rec = {"run": str(run["dir"]), "full_steps": run["full_steps"], "skipped_trials": run["skipped"],
               "trials": [{"label": trial_label(t), "trial_id": t.get("trial_id"), "kind": t["kind"],
                           "full_validation_loss": t["validation_loss"], "short_validation_loss": {}}
                          for t in run["trials"]], "fractions": {}}
        for f in args.fractions:
            steps = max(1, int(run["full_steps"] * f))
            short = []
            for j in range(len(run["trials"])):
                s = summaries[(i, f, j)]
                assert s["eval_split"] == "eval" and s["steps"] == steps, (s["eval_split"], s["steps"], steps)
                short.append(float(s["eval_loss_scored"]))
                rec["trials"][j]["short_validation_loss"][f"{f:g}"] = short[-1]
            r = {"fraction": f, "steps": steps, **readout(run["trials"], short)}
            rec["fractions"][f"{f:g}"] = r
            rows.append({"run": str(run["dir"]), "n_trials": len(run["trials"]), **r})
        per_run.append(rec)

    def rel(p: str) -> str:
        try:
            return str(Path(p).relative_to(ROOT))
        except ValueError:
            return p

    by_fraction = {}
    for f in args.fractions:
        rs = [r for r in rows if r["fraction"] == f]
        rhos = [r["spearman"] for r in rs if r["spearman"] is not None]
        by_fraction[f"{f:g}"] = {"runs": len(rs), "mean_spearman": float(np.mean(rhos)) if rhos else None,
                                 "same_best": f"{sum(r['same_best'] for r in rs)}/{len(rs)}",
                                 "mean_regret": float(np.mean([r["regret"] for r in rs])),
                                 "max_regret": float(np.max([r["regret"] for r in rs]))}
    minutes = (time.time() - t0) / 60
    lines = [f"# {command}",
             f"# every completed Tune trial of each run re-trained as a short trial (tune._trial's settings, its own "
             f"LR schedule over the short length), ranked by the mean VALIDATION loss over the scored tasks, "
             f"against the full-length trials of tune/results.json; regret = full-length loss of the short pick - best "
             f"full-length; gap = best vs second-best full-length; {minutes:.1f} min", "",
             "| run | fraction | steps | trials | spearman | same best | regret | gap best-second | short pick |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        rho = f"{r['spearman']:.3f}" if r["spearman"] is not None else "—"
        lines.append(f"| {rel(r['run'])} | {r['fraction']:g} | {r['steps']} | {r['n_trials']} | {rho} | "
                     f"{'yes' if r['same_best'] else 'no'} | {r['regret']:+.4f} | {r['gap_best_second']:.4f} | "
                     f"{r['short_pick']} |")
    lines += ["", "| fraction | runs | mean spearman | same best | mean regret | max regret |",
              "| --- | --- | --- | --- | --- | --- |"]
    for f, b in by_fraction.items():
        rho = f"{b['mean_spearman']:.3f}" if b["mean_spearman"] is not None else "—"
        lines.append(f"| {f} | {b['runs']} | {rho} | {b['same_best']} | {b['mean_regret']:+.4f} | "
                     f"{b['max_regret']:+.4f} |")
    for rec in per_run:
        fr = list(rec["fractions"])
        lines += ["", f"{rel(rec['run'])} ({rec['full_steps']} steps full; validation loss per trial"
                  + (f"; skipped {len(rec['skipped_trials'])} not completed" if rec["skipped_trials"] else "") + "):",
                  "", "| trial | " + " | ".join(f"{f} ({rec['fractions'][f]['steps']} steps)" for f in fr)
                  + " | full |",
                  "| --- | " + " | ".join("---" for _ in fr) + " | --- |"]
        for t in sorted(rec["trials"], key=lambda t: t["full_validation_loss"]):
            lines.append(f"| {t['label']} | " + " | ".join(f"{t['short_validation_loss'][f]:.4f}" for f in fr) +
                         f" | {t['full_validation_loss']:.4f} |")
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "short_trials.json").write_text(json.dumps(
        {"command": command, "fractions": args.fractions, "rows": rows, "by_fraction": by_fraction, "runs": per_run,
         "minutes": minutes}, indent=1, default=float))
    (args.out / "short_trials.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""Benchmark (issue #8): does the TaskPGM mixture earn its compute?

    .venv/bin/python benchmarks/quality.py [--seeds 0 1 2 3 4] [--quick]

Per seed (a fresh synthetic suite ``synthetic.seed = S`` and fresh proxy / model / sampler seeds ``S``):
probes -> estimation -> Ray Tune on the VALIDATION split (TaskPGM energy search + uniform, size and several
temperature-sampling trials) -> the chosen TaskPGM mixture, uniform, size and the best temperature (chosen on
validation) are each fine-tuned with the SAME final budget (steps x global batch) and evaluated on the TEST
split every ``eval_every`` steps. Quality is the mean over the CLEAN tasks (noise tasks excluded: their targets
are random; they are still reported per task). Every stage is cached under ``runs/quality/seed-S`` (the
pipeline's stage keys, plus one summary per final fine-tune), so a re-run resumes.

Writes ``benchmarks/results/quality.{json,png,txt}`` (``--quick``: a tiny smoke run into /tmp/quality-quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
# A shared 2-core machine: a Train worker's start (torch + DeepSpeed imports) can exceed Ray's 60 s default.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ("taskpgm", "uniform", "size", "temperature")
BASELINES = ("uniform", "size", "temperature")
TRIAL_CPU = 0.01

# --------------------------------------------------------------------------------------------------
# configuration


def settings(quick: bool) -> dict:
    """Everything the benchmark fixes (recorded in quality.json's config block)."""
    if quick:
        return {"scale": 0.25, "probe_steps": 10, "num_samples": 2, "trial_steps": 20, "temperatures": [2.0],
                "final_steps": 40, "final_eval_every": 10, "micro_batch": 8, "bootstrap": 5, "max_eval": 16}
    return {"scale": 0.5, "probe_steps": 40, "num_samples": 4, "trial_steps": 60,
            "temperatures": [2.0, 5.0], "final_steps": 300, "final_eval_every": 20, "micro_batch": 16,
            "bootstrap": 20, "max_eval": 48}


def seed_config(seed: int, s: dict, out_root: Path):
    from taskpgm_ray.config import config_from_dict

    data = {
        "output_dir": str((out_root / f"seed-{seed}").resolve()),
        "synthetic": {"seed": seed, "scale": s["scale"]},  # all 12 suite tasks
        "splits": {"probe_fraction": 0.1, "max_probe": 12, "min_probe": 4, "max_eval": s["max_eval"], "seed": seed},
        "model": {"name": "tiny", "tokenizer": "byte", "max_length": 48,
                  "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128,
                           "seed": seed}},
        "probes": {"steps": s["probe_steps"], "batch_size": 16, "lr": 3.0e-3, "lora_rank": 8, "num_cpus": 1,
                   "seed": seed},
        "estimation": {"num_actors": 2, "shard_size": 12, "batch_size": 24, "jsd": True, "jsd_top_k": 8,
                       "bootstrap": s["bootstrap"]},
        "energy": {"affinity": "pmi", "kernel": "psd", "beta": 1.0, "lam": 1.0},
        # Tune trials use these train settings; eval_every = trial_steps: one validation eval per trial.
        "train": {"num_workers": 1, "cpus_per_worker": 0.9, "zero_stage": 2, "steps": s["final_steps"],
                  "micro_batch_size": s["micro_batch"], "lr": 3.0e-3, "warmup_steps": 10,
                  "eval_every": s["trial_steps"], "checkpoint_every": 0, "seed": seed},
        "tune": {"num_samples": s["num_samples"], "search": "random", "affinities": ["pmi", "jsd"],
                 "kernels": ["psd", "exp"], "taus": [0.5, 1.0, 2.0], "ratio_range": [0.01, 100.0],
                 "trial_steps": s["trial_steps"], "trial_workers": 1, "trial_cpus_per_worker": 0.9,
                 "baselines": True, "temperatures": s["temperatures"]},
        "tracking": {"wandb": "disabled"},
        "offline": True,
    }
    return config_from_dict(data, source=str(ROOT / "benchmarks" / "quality.py"))


# --------------------------------------------------------------------------------------------------
# one seed


def run_front_stages(cfg) -> object:
    """tasks, probes, estimate, tune through the Pipeline's stage cache; returns the pipeline."""
    from taskpgm_ray.pipeline import Pipeline

    pipe = Pipeline(cfg)
    pipe.out.mkdir(parents=True, exist_ok=True)
    for stage in pipe.stages():
        if stage.name not in ("tasks", "probes", "estimate", "tune"):
            continue
        key = stage.key()
        if pipe.is_done(stage, key):
            pipe.timings.append((stage.name, "cached", pipe._state[stage.name].get("seconds", 0.0)))
            continue
        pipe._record(stage.name, key, "running", 0.0)
        t0 = time.time()
        stage.run()
        pipe._record(stage.name, key, "done", time.time() - t0)
        pipe.timings.append((stage.name, "done", time.time() - t0))
        print(f"  stage {stage.name}: {time.time() - t0:.0f}s", flush=True)
    return pipe


def clean_mean(per_task: dict, clean: list[str]) -> float:
    return float(np.mean([per_task[n] for n in clean]))


def fit_remote():
    import ray

    @ray.remote(num_cpus=TRIAL_CPU)
    def _fit(cfg, tasks, weights, run_dir, name):
        from taskpgm_ray.train import build_trainer

        return build_trainer(cfg, tasks, weights, run_dir=run_dir, name=name).fit().return_value

    return _fit


def final_trainings(cfg, tasks, weights_by_method: dict, s: dict) -> dict:
    """Fine-tune every method with the same budget, evaluating on TEST; cached per (method, weights, settings)."""
    import ray

    from taskpgm_ray.pipeline import digest

    test_tasks = [dataclasses.replace(t, eval=list(t.test)) for t in tasks]  # eval split := the suite's test
    assert all(t.eval for t in test_tasks), "every suite task must have a test split"
    tc = dataclasses.replace(cfg.train, steps=s["final_steps"], eval_every=s["final_eval_every"], checkpoint_every=0,
                             num_workers=1, cpus_per_worker=0.9)
    fcfg = dataclasses.replace(cfg, train=tc)
    out, pending = {}, {}
    fit = fit_remote()
    for method, weights in weights_by_method.items():
        key = digest(weights, dataclasses.asdict(tc), dataclasses.asdict(cfg.model),
                     [(t.name, t.hash) for t in test_tasks])
        run_dir = Path(cfg.output_dir) / "final" / f"{method}-{key}"
        summary_path = run_dir / "summary.json"
        if summary_path.exists():
            out[method] = json.loads(summary_path.read_text())
            continue
        pending[fit.remote(fcfg, test_tasks, weights, str(run_dir), "final")] = (method, summary_path)
    while pending:  # Ray runs two 1-worker fits at once (2 x (0.9 + 0.01) CPU)
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        method, path = pending.pop(ref)
        summary = ray.get(ref)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary))
        out[method] = summary
        print(f"  final {method}: test loss (all tasks) {summary['eval_loss_mean']:.4f}", flush=True)
    return out


def run_seed(seed: int, s: dict, out_root: Path) -> dict:
    from taskpgm_ray.pipeline import load_sums

    t_seed = time.time()
    cfg = seed_config(seed, s, out_root)
    pipe = run_front_stages(cfg)
    tasks = pipe.tasks
    names = [t.name for t in tasks]
    suite = json.loads((Path(cfg.output_dir) / "data" / f"synthetic-{seed}" / "suite.json").read_text())
    roles = {t["name"]: t["role"] for t in suite["tasks"]}
    clean = [n for n in names if roles[n] != "noise"]
    tune_res = json.loads((Path(cfg.output_dir) / "tune" / "results.json").read_text())
    trials = tune_res["trials"]
    for tr in trials:  # selection metric: mean VALIDATION loss over the clean tasks
        per = tr.get("validation_loss_per_task") or {}
        ok = all(per.get(n) is not None and math.isfinite(per[n]) for n in clean)
        tr["validation_loss_clean"] = clean_mean(per, clean) if ok else None

    def best(kind):
        cand = [t for t in trials if t["kind"] == kind and t["validation_loss_clean"] is not None]
        if not cand:
            raise RuntimeError(f"seed {seed}: no finished {kind} trial in tune/results.json")
        return min(cand, key=lambda t: t["validation_loss_clean"])

    chosen = {k: best(k) for k in METHODS}
    weights = {k: chosen[k]["weights"] for k in METHODS}
    t_final = time.time()
    summaries = final_trainings(cfg, tasks, weights, s)
    final_seconds = time.time() - t_final

    rec: dict = {"seed": seed, "test_loss": {}, "test_accuracy": {}, "test_loss_all_tasks": {},
                 "steps_to_uniform": {}, "per_task": {}, "weights": weights}
    for m in METHODS:
        sm = summaries[m]
        rec["test_loss"][m] = clean_mean(sm["eval_loss_per_task"], clean)
        rec["test_accuracy"][m] = clean_mean(sm["eval_accuracy_per_task"], clean)
        rec["test_loss_all_tasks"][m] = sm["eval_loss_mean"]
        rec["per_task"][m] = {"loss": sm["eval_loss_per_task"], "accuracy": sm["eval_accuracy_per_task"]}
        rec.setdefault("history", {})[m] = [
            {"step": h["step"], "test_loss_clean": clean_mean(h["eval_loss_per_task"], clean),
             "test_accuracy_clean": clean_mean(h["eval_accuracy_per_task"], clean)} for h in sm["history"]]
    target = rec["test_loss"]["uniform"]
    for m in METHODS:
        hit = [h["step"] for h in rec["history"][m] if h["test_loss_clean"] <= target + 1e-12]
        rec["steps_to_uniform"][m] = hit[0] if hit else None

    def role_mass(w, pred):
        return float(sum(w[n] for n in names if pred(roles[n])))

    u = 1.0 / len(names)
    rec["planted"] = {
        m: {"noise": role_mass(weights[m], lambda r: r == "noise"),
            "near_duplicate": role_mass(weights[m], lambda r: r == "near_duplicate"),
            "high_value": role_mass(weights[m], lambda r: r == "high_value"),
            "low_value": role_mass(weights[m], lambda r: r == "low_value"),
            "regular": role_mass(weights[m], lambda r: r == "regular")} for m in METHODS}
    p = rec["planted"]
    rec["planted"]["ratios_vs_uniform"] = {
        "noise": p["taskpgm"]["noise"] / p["uniform"]["noise"],
        "near_duplicate_over_one_task": p["taskpgm"]["near_duplicate"] / u,
        "high_value": p["taskpgm"]["high_value"] / p["uniform"]["high_value"]}
    rec["chosen"] = {
        "taskpgm": {"params": chosen["taskpgm"]["params"], "hyperparameters": chosen["taskpgm"]["hyperparameters"],
                    "validation_loss_clean": chosen["taskpgm"]["validation_loss_clean"],
                    "validation_loss_all": chosen["taskpgm"]["validation_loss"]},
        "temperature": {"temperature": chosen["temperature"]["params"]["temperature"],
                        "validation_loss_clean": chosen["temperature"]["validation_loss_clean"]},
        "tune_best_overall_kind": tune_res["best"]["kind"]}
    rec["validation_loss_clean"] = {m: chosen[m]["validation_loss_clean"] for m in METHODS}
    rec["tune_trials"] = [{"kind": t["kind"], "params": t["params"], "status": t["status"],
                           "validation_loss_clean": t["validation_loss_clean"],
                           "validation_loss_all": t["validation_loss"],
                           "validation_loss_per_task": t["validation_loss_per_task"],
                           "weights": t["weights"]} for t in trials]
    sums = load_sums(cfg.output_dir)
    L = sums["loglik_sum"] / np.maximum(sums["count"], 1)[None, :]
    rec["likelihood_matrix"] = {"tasks": sums["tasks"], "L": np.round(L, 4).tolist()}
    rec["roles"] = roles
    rec["sizes"] = {t.name: len(t.train) for t in tasks}
    rec["seconds"] = {**{name: secs for name, _, secs in pipe.timings}, "final": final_seconds,
                      "total": time.time() - t_seed}
    return rec


# --------------------------------------------------------------------------------------------------
# summary, table, plot


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def summarize(seeds: list[dict], s: dict) -> dict:
    out: dict = {"n_seeds": len(seeds), "test_loss": {}, "test_accuracy": {}, "steps_to_uniform": {}}
    for m in METHODS:
        out["test_loss"][m] = dict(zip(("mean", "std"), mean_std([r["test_loss"][m] for r in seeds])))
        out["test_accuracy"][m] = dict(zip(("mean", "std"), mean_std([r["test_accuracy"][m] for r in seeds])))
        st = [r["steps_to_uniform"][m] for r in seeds]
        out["steps_to_uniform"][m] = {"values": st, "reached": sum(x is not None for x in st)}
    wins = [r["test_loss"]["taskpgm"] < min(r["test_loss"][b] for b in BASELINES) for r in seeds]
    out["taskpgm_wins_vs_best_baseline"] = int(sum(wins))
    out["wins_per_baseline"] = {b: int(sum(r["test_loss"]["taskpgm"] < r["test_loss"][b] for r in seeds))
                                for b in BASELINES}
    frac = [r["steps_to_uniform"]["taskpgm"] / s["final_steps"] if r["steps_to_uniform"]["taskpgm"] else None
            for r in seeds]
    noise = [r["planted"]["ratios_vs_uniform"]["noise"] for r in seeds]
    dup = [r["planted"]["ratios_vs_uniform"]["near_duplicate_over_one_task"] for r in seeds]
    hv = [r["planted"]["ratios_vs_uniform"]["high_value"] for r in seeds]
    need = math.ceil(0.8 * len(seeds))
    out["targets"] = {
        "wins": {"target": f">= {need} of {len(seeds)} seeds", "value": int(sum(wins)), "met": sum(wins) >= need},
        "steps_fraction": {"target": "<= 0.70 of the final steps (every seed)", "values": frac,
                           "met": all(f is not None and f <= 0.70 for f in frac)},
        "noise_weight_vs_uniform": {"target": "<= 0.25 (every seed)", "values": noise,
                                    "met": all(x <= 0.25 for x in noise)},
        "near_duplicate_cluster_vs_one_uniform_task": {"target": "<= 1.5 (every seed)", "values": dup,
                                                       "met": all(x <= 1.5 for x in dup)},
        "high_value_weight_vs_uniform": {"target": "(reported, no target)", "values": hv},
    }
    # where TaskPGM loses/gains: per-role mean test-loss difference to the best baseline of each seed
    diff: dict = {}
    for r in seeds:
        bb = min(BASELINES, key=lambda b: r["test_loss"][b])
        for n, role in r["roles"].items():
            d = r["per_task"]["taskpgm"]["loss"][n] - r["per_task"][bb]["loss"][n]
            diff.setdefault(role, []).append(d)
            diff.setdefault(f"task:{n}", []).append(d)
    out["taskpgm_minus_best_baseline_test_loss"] = {k: float(np.mean(v)) for k, v in diff.items()}
    out["seconds_per_seed"] = [round(r["seconds"]["total"], 1) for r in seeds]
    return out


def fmt(x, nd=3):
    return "—" if x is None else f"{x:.{nd}f}"


def table(seeds: list[dict], summary: dict, s: dict, total_seconds: float) -> str:
    lines = ["# benchmarks/quality.py: TaskPGM vs baselines, mean TEST loss over the clean tasks (noise excluded)",
             f"# {len(seeds)} seeds, 12-task synthetic suite (scale {s['scale']}), tiny model, "
             f"{s['final_steps']} steps x {s['micro_batch']} examples for every method; "
             f"hyperparameters chosen on validation only; {total_seconds / 60:.1f} min total", "",
             "| seed | TaskPGM | uniform | size | temperature (T) | TaskPGM wins | steps to uniform's loss "
             "(TaskPGM / size / temp) | noise w (x unif) | dup cluster (x one task) | high-value w (x unif) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in seeds:
        tl, st, ra = r["test_loss"], r["steps_to_uniform"], r["planted"]["ratios_vs_uniform"]
        win = tl["taskpgm"] < min(tl[b] for b in BASELINES)
        lines.append(
            f"| {r['seed']} | {fmt(tl['taskpgm'])} | {fmt(tl['uniform'])} | {fmt(tl['size'])} | "
            f"{fmt(tl['temperature'])} ({r['chosen']['temperature']['temperature']:g}) | {'yes' if win else 'no'} | "
            f"{st['taskpgm']} / {st['size']} / {st['temperature']} | {ra['noise']:.2f} | "
            f"{ra['near_duplicate_over_one_task']:.2f} | {ra['high_value']:.2f} |".replace("None", "never"))
    tl = summary["test_loss"]
    lines.append("| mean ± std | " + " | ".join(
        f"{fmt(tl[m]['mean'])} ± {fmt(tl[m]['std'])}" for m in METHODS) +
        f" | {summary['taskpgm_wins_vs_best_baseline']}/{len(seeds)} | | | | |")
    ta = summary["test_accuracy"]
    lines += ["", "| exact-match accuracy (clean tasks) | " + " | ".join(METHODS) + " |",
              "| --- | --- | --- | --- | --- |"]
    for r in seeds:
        lines.append(f"| seed {r['seed']} | " + " | ".join(fmt(r["test_accuracy"][m]) for m in METHODS) + " |")
    lines.append("| mean ± std | " + " | ".join(f"{fmt(ta[m]['mean'])} ± {fmt(ta[m]['std'])}" for m in METHODS)
                 + " |")
    lines += ["", "| target | value | met |", "| --- | --- | --- |"]
    for name, t in summary["targets"].items():
        val = t.get("value", t.get("values"))
        if isinstance(val, list):
            val = ", ".join("never" if v is None else f"{v:.2f}" for v in val)
        lines.append(f"| {name}: {t['target']} | {val} | {t.get('met', '—')} |")
    d = summary["taskpgm_minus_best_baseline_test_loss"]
    lines += ["", "TaskPGM minus best baseline, test loss by role (negative = TaskPGM better): " +
              ", ".join(f"{k} {v:+.3f}" for k, v in d.items() if not k.startswith("task:"))]
    return "\n".join(lines) + "\n"


def plot(seeds: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    x = np.arange(len(seeds))
    width = 0.2
    for i, m in enumerate(METHODS):
        ax.bar(x + (i - 1.5) * width, [r["test_loss"][m] for r in seeds], width, label=m)
    ax.set_xticks(x, [f"seed {r['seed']}" for r in seeds])
    lo = min(r["test_loss"][m] for r in seeds for m in METHODS)
    hi = max(r["test_loss"][m] for r in seeds for m in METHODS)
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
    ax.set_ylabel("mean test loss, clean tasks (lower is better)")
    ax.set_title("test loss per seed and method")
    ax.legend(fontsize=8)
    ax = axes[1]
    roles = ("noise", "near_duplicate", "high_value", "low_value", "regular")
    x = np.arange(len(roles))
    for i, m in enumerate(METHODS):
        vals = np.array([[r["planted"][m][k] for k in roles] for r in seeds])
        ax.bar(x + (i - 1.5) * width, vals.mean(0), width, yerr=vals.std(0) if len(seeds) > 1 else None,
               label=m, capsize=2)
    u = 1 / 12
    ax.hlines([0.25 * 2 * u], -0.45, 0.45, colors="k", linestyles="--", label="target (noise, dup cluster)")
    ax.hlines([1.5 * u], 0.55, 1.45, colors="k", linestyles="--")
    ax.set_xticks(x, roles)
    ax.set_ylabel("total mixture weight (mean ± std over seeds)")
    ax.set_title("weight on the planted roles")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(seeds, s, out_dir: Path, total_seconds: float, args) -> None:
    summary = summarize(seeds, s)
    config = {
        **s, "seeds": args.seeds, "command": "python benchmarks/quality.py " + " ".join(sys.argv[1:]),
        "methods": list(METHODS),
        "quality_metric": "mean over the CLEAN tasks (roles near_duplicate, high_value, regular, low_value) of the "
                          "per-task mean response-token NLL on the suite's TEST split; noise tasks (random targets) "
                          "are excluded from means but recorded per task",
        "selection": "TaskPGM hyperparameters (tune.num_samples random trials over ratio/affinity/kernel/tau) and "
                     "the temperature T are chosen by the mean VALIDATION loss over the clean tasks, from the "
                     "run_tune trials (trial_steps each); no choice uses test data",
        "budget": f"every final fine-tune: {s['final_steps']} steps x {s['micro_batch']} examples (1 worker), "
                  f"same lr/warmup/seed; test eval every {s['final_eval_every']} steps",
        "steps_to_uniform": "first eval step whose clean mean test loss <= uniform's final clean mean test loss "
                            "(null: never)",
        "eval_split_note": "build_trainer accepts only eval_split 'eval'/'probe', so the final runs get TaskData "
                           "copies with eval := test and eval_split='eval'",
        "per_seed_settings": "synthetic.seed = splits.seed = probes.seed = model.tiny.seed = train.seed = S",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quality.json").write_text(json.dumps({"seeds": seeds, "config": config, "summary": summary},
                                                     indent=1, default=float))
    (out_dir / "quality.txt").write_text(table(seeds, summary, s, total_seconds))
    plot(seeds, out_dir / "quality.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny budgets: a smoke test (< 5 min)")
    args = parser.parse_args()
    if args.quick and args.seeds == [0, 1, 2, 3, 4]:
        args.seeds = [0]
    s = settings(args.quick)
    out_root = ROOT / "runs" / ("quality-quick" if args.quick else "quality")
    out_dir = Path("/tmp/quality-quick") if args.quick else ROOT / "benchmarks" / "results"

    from taskpgm_ray.distributed.cluster import init_ray

    init_ray(num_cpus=2)  # its worker setup hook keeps Ray Train's placement-group cleaner on this cluster
    t0 = time.time()
    seeds = []
    for seed in args.seeds:
        print(f"== seed {seed} ({time.time() - t0:.0f}s elapsed)", flush=True)
        rec = run_seed(seed, s, out_root)
        seeds.append(rec)
        print(f"== seed {seed}: clean test loss " + ", ".join(f"{m} {rec['test_loss'][m]:.4f}" for m in METHODS)
              + f"; {rec['seconds']['total']:.0f}s", flush=True)
        write_outputs(seeds, s, out_dir, time.time() - t0, args)  # after every seed: partial results survive
    print((out_dir / "quality.txt").read_text())


if __name__ == "__main__":
    main()

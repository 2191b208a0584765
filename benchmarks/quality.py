"""Benchmark: does the TaskPGM mixture earn its compute? A thin caller of `taskpgm run` and `taskpgm compare`.

    .venv/bin/python benchmarks/quality.py [--seeds 0 1 2 3 4] [--spec SPEC.yaml | --random-world W] [--quick]

Per seed S: a fresh synthetic suite from the spec (``synthetic.seed = S``; default spec: the shipped one), the
shipped pretrained base, proxy / split / training seeds S; then the product path, unchanged: the pipeline's
stages tasks -> probes -> estimate -> tune (TaskPGM trials and the uniform / size / temperature reference
trials, ranked on the VALIDATION split over the scored tasks) -> select, and ``taskpgm compare`` with seed S
(every method fine-tuned with the same budget, scored on the TEST split). Nothing here reads a task's name
or role to choose anything; roles (from the suite manifest) are read only to report the planted structure.

Reported under issue 21's protocol (every method within the same caps and floor, temperature with as many Tune
candidates as TaskPGM): the best TaskPGM trial against the best baseline; the product's pick (what the select
stage handed the user) against it and against the seed-to-seed std; the ablations (``taskpgm-no-pairwise``:
the same energy without its pairwise term, so what the pairwise term adds over the prior and the unary;
``taskpgm-no-unary``; ``paper``); tokens trained per method; the bounded information of every task against its
bound; deterministic (non-noise) tasks flagged ``output_only`` and whether a rule acted on them (the default:
none does); noise's weight against its prior share; exact match per task. Nothing here chooses a setting.

Writes ``benchmarks/results/quality.{json,txt,png}`` (``--quick``: a small smoke run into /tmp/quality-quick).
Run directories are cached under ``runs/quality/seed-S``: a re-run resumes. ``--variant NAME --set KEY=VALUE``
runs changed settings (to choose defaults: on the tuning range of worlds only) in their own directories,
starting from the plain run's proxies, and writes ``quality-<world>-NAME.*``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A shared 2-core machine: a Train worker's start (torch + DeepSpeed imports) can exceed Ray's 60 s default.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASELINES = ("uniform", "size", "temperature")


def settings(quick: bool) -> dict:
    """What the benchmark fixes (recorded in quality.json)."""
    if quick:
        return {"scale": 0.25, "probe_steps": 40, "max_probe": 8, "num_samples": 1, "prior_strengths": [0.3],
                "steps": 40, "eval_every": 20, "micro_batch": 8}
    return {"scale": 0.5, "probe_steps": 150, "max_probe": 16, "num_samples": 4, "prior_strengths": [0.1, 0.3, 1.0],
            "steps": 300, "eval_every": 30, "micro_batch": 16}


def seed_config(seed: int, s: dict, out_root: Path, spec: str | None, overrides: dict | None = None):
    from taskpgm_ray.config import config_from_dict

    data = {
        "output_dir": str((out_root / f"seed-{seed}").resolve()),
        "synthetic": {"seed": seed, "scale": s["scale"], "spec": str(Path(spec).resolve()) if spec else None},
        "splits": {"probe_fraction": 0.1, "max_probe": s["max_probe"], "min_probe": 4, "max_eval": 48, "seed": seed},
        "model": {"name": "synthetic-base", "tokenizer": "byte", "max_length": 48},
        "probes": {"steps": s["probe_steps"], "batch_size": 16, "lr": 1.0e-3, "lora_rank": 8, "num_cpus": 1,
                   "seed": seed},
        "estimation": {"num_actors": 2, "shard_size": 16, "batch_size": 32, "jsd": False, "bootstrap": 50},
        # energy: the defaults (clip kernel, information unary, temperature prior), as a user gets them
        "train": {"num_workers": 1, "cpus_per_worker": 0.9, "zero_stage": 2, "steps": s["steps"],
                  "micro_batch_size": s["micro_batch"], "lr": 2.0e-3, "warmup_steps": 10,
                  "eval_every": s["eval_every"], "checkpoint_every": 0, "repetition_cap": 8, "seed": seed},
        "tune": {"num_samples": s["num_samples"], "search": "random", "ratio_range": [0.1, 10.0],
                 "affinities": ["pmi"], "kernels": ["clip"], "prior_strengths": s["prior_strengths"],
                 "trial_steps": None, "trial_evals": 1, "trial_workers": 1, "trial_cpus_per_worker": 0.9,
                 "baselines": True},  # temperatures: as many as TaskPGM's trials (one protocol)
        "tracking": {"wandb": "disabled"},
        "offline": True,
    }
    return config_from_dict(data, source=str(ROOT / "benchmarks" / "quality.py"), overrides=overrides)


def _summary_of(compare_dir: Path, method: str, seed: int, per_task: dict[str, float]) -> dict:
    """The fine-tune behind a results.json row: a run directory may hold older fine-tunes of the same method
    (other weights), so match on the per-task test losses the row reports."""
    for path in compare_dir.glob(f"{method}-seed{seed}-*/summary.json"):
        summary = json.loads(path.read_text())
        if summary["eval_loss_per_task"] == per_task:
            return summary
    raise FileNotFoundError(f"{compare_dir}: no {method} fine-tune of seed {seed} matches compare/results.json")


def run_seed(seed: int, s: dict, out_root: Path, spec: str | None, summarize_only: bool = False,
             overrides: dict | None = None) -> dict:
    """The product path for one seed, then the planted-structure read-outs (``summarize_only``: read a finished
    run's artefacts instead of running anything)."""
    from taskpgm_ray.compare import compare_command
    from taskpgm_ray.pipeline import Pipeline
    from taskpgm_ray.tasks import load_tasks

    t0 = time.time()
    cfg = seed_config(seed, s, out_root, spec, overrides)
    out = Path(cfg.output_dir)
    if summarize_only:
        results = json.loads((out / "compare" / "results.json").read_text())
        tasks = load_tasks(cfg)
    else:
        pipe = Pipeline(cfg)
        pipe.run(until="select")
        tasks = pipe.tasks
        results = compare_command(cfg, seeds=[seed], tasks=tasks)
    manifest = json.loads(next((out / "data").glob(f"synthetic-{seed}-*/suite.json")).read_text())
    roles = {t["name"]: t["role"] for t in manifest["tasks"] if not t.get("eval_only")}  # the training tasks'
    held = [t["name"] for t in manifest["tasks"] if t.get("eval_only")]
    signal = json.loads((out / "estimate" / "signal.json").read_text())
    if any("nearest_informative" not in t for t in signal["tasks"].values()):  # written by an older version
        from taskpgm_ray.mixture.signal import signal_checks

        with np.load(out / "estimate" / "examples.npz") as f:
            examples = {k: f[k] for k in f.files}
        signal = signal_checks([str(t) for t in examples.pop("tasks")], examples, n_boot=100, seed=seed)
    default = json.loads((out / "estimate" / "mixture.json").read_text())["weights"]
    row = results["seeds"][0]
    names = list(default)
    u = 1.0 / len(names)
    dups = [n for n in names if roles[n] == "near_duplicate"]
    noise = [n for n in names if roles[n] == "noise"]
    scored = [n for n in results["scored_tasks"] if n in roles] or [t.name for t in tasks if t.score]
    from taskpgm_ray.distributed.solve import constrained
    from taskpgm_ray.mixture import baseline_weights

    q = baseline_weights("temperature", [len(t.train) for t in tasks], temperature=cfg.energy.prior_temperature)
    prior = constrained(dict(zip([t.name for t in tasks], map(float, q))), cfg, tasks)  # the prior share, in the caps
    pick = row["weights"].get("pick", row["weights"]["taskpgm"])
    compare_dir = out / "compare" / "runs"
    accuracy = {m: _summary_of(compare_dir, m, seed, row["per_task"][m])["eval_accuracy_per_task"]
                for m in row["test_loss"]}
    return {
        "seed": seed, "roles": roles, "evaluation_sets": held, "metric": results["metric"],
        "test_loss": row["test_loss"], "per_task": row["per_task"],
        "weights": row["weights"], "default_energy_weights": default, "curves": row["curves"],
        "steps_to_uniform": row["steps_to_uniform"], "steps_to_uniform_fraction": row["steps_to_uniform_fraction"],
        "best_baseline": row["best_baseline"], "taskpgm_wins": row["taskpgm_wins"],
        "trial_final_spearman": row.get("trial_final_spearman"), "exact_match": accuracy,
        "proxies": {n: {k: signal["tasks"][n].get(k) for k in ("gain", "gain_low", "gain_high", "learned",
                                                               "information", "information_low", "information_bound",
                                                               "output_only", "nearest",
                                                               "nearest_informative")} for n in names},
        "affinity_snr": signal.get("affinity", {}).get("snr"), "warnings": signal["warnings"],
        "near_duplicate_nn": {n: signal["tasks"][n]["nearest"] in dups for n in dups},
        "near_duplicate_nn_informative": {n: signal["tasks"][n].get("nearest_informative") in dups for n in dups},
        "noise_weight_vs_uniform": {n: default[n] / u for n in noise},
        "noise_weight_vs_prior": {n: pick[n] / prior[n] for n in noise},
        "prior_share": prior, "tokens": row.get("tokens", {}),
        "proxies_learn": {n: signal["tasks"][n]["gain"] >= 0.10 and signal["tasks"][n]["gain_low"] > 0
                          for n in scored},
        "chosen": results["methods"]["taskpgm"], "temperature": results["methods"]["temperature"]["source"],
        "seconds": time.time() - t0,
    }


def summarize(seeds: list[dict], s: dict) -> dict:
    """Means, seed-to-seed stds and the issue-21 read-outs over the seeds of one world."""
    from taskpgm_ray.config import EnergyConfig

    methods = list(seeds[0]["test_loss"])
    std = {m: float(np.std([r["test_loss"][m] for r in seeds], ddof=1)) if len(seeds) > 1 else None for m in methods}
    best_std = std[min(BASELINES, key=lambda b: np.mean([r["test_loss"][b] for r in seeds]))]
    regret = [r["test_loss"]["pick"] - r["test_loss"][r["best_baseline"]] for r in seeds if "pick" in r["test_loss"]]
    deterministic = [(r["seed"], n) for r in seeds for n, role in r["roles"].items() if role != "noise"]
    flagged = [(seed, n) for seed, n in deterministic if seeds_by(seeds, seed)["proxies"][n].get("output_only")]
    ratio = [p["information"] / p["information_bound"] for r in seeds for p in r["proxies"].values()
             if p.get("information") is not None and p.get("information_bound")]
    noise = [v for r in seeds for v in r["noise_weight_vs_prior"].values()]
    return {
        "mean_test_loss": {m: float(np.mean([r["test_loss"][m] for r in seeds])) for m in methods},
        "std_test_loss": std,
        "taskpgm_wins": f"{sum(r['taskpgm_wins'] for r in seeds)}/{len(seeds)}",
        "pick_regret": regret, "best_baseline_std": best_std,
        "pick_within_std": (all(x <= best_std for x in regret) if best_std is not None else None),
        "deterministic_flagged_output_only": [f"seed {seed}: {n}" for seed, n in flagged],
        "deterministic_pushed_below_prior_by_a_rule": len(flagged) if EnergyConfig().prior_skip_output_only else 0,
        "information_over_bound_max": max(ratio) if ratio else None,
        "noise_weight_vs_prior_share": noise,
        "proxies_learn": f"{sum(v for r in seeds for v in r['proxies_learn'].values())}/"
                         f"{sum(len(r['proxies_learn']) for r in seeds)}",
        "trial_final_spearman": [r["trial_final_spearman"] for r in seeds],
    }


def seeds_by(seeds: list[dict], seed: int) -> dict:
    return next(r for r in seeds if r["seed"] == seed)


def table(seeds: list[dict], summary: dict, s: dict, minutes: float, command: str) -> str:
    methods = list(seeds[0]["test_loss"])
    metric = seeds[0].get("metric", "mean test loss over scored tasks").replace("mean test", "mean TEST")
    lines = [f"# {command}",
             f"# {len(seeds)} seed(s); suite scale {s['scale']}; every method {s['steps']} steps x {s['micro_batch']} "
             f"examples within the same caps and floor; selection on validation only; {metric}; {minutes:.1f} min", "",
             "| seed | " + " | ".join(methods) + " | best baseline | TaskPGM wins | pick - best baseline |",
             "| --- | " + " | ".join("---" for _ in methods) + " | --- | --- | --- |"]
    for r in seeds:
        regret = r["test_loss"]["pick"] - r["test_loss"][r["best_baseline"]] if "pick" in r["test_loss"] else None
        lines.append(f"| {r['seed']} | " + " | ".join(f"{r['test_loss'][m]:.4f}" for m in methods) +
                     f" | {r['best_baseline']} | {'yes' if r['taskpgm_wins'] else 'no'} | " +
                     (f"{regret:+.4f}" if regret is not None else "—") + " |")
    lines.append("| mean ± std | " + " | ".join(
        f"{summary['mean_test_loss'][m]:.4f}" + (f" ± {summary['std_test_loss'][m]:.4f}"
                                                 if summary["std_test_loss"][m] is not None else "")
        for m in methods) + " | | | |")
    lines += ["", "Tokens trained per method (seed " + str(seeds[0]["seed"]) + "): " +
              ", ".join(f"{m} {v:,}" for m, v in seeds[0].get("tokens", {}).items()), ""]
    lines += ["| read-out | value |", "| --- | --- |"]
    for key in ("taskpgm_wins", "pick_regret", "best_baseline_std", "pick_within_std", "proxies_learn",
                "deterministic_flagged_output_only", "deterministic_pushed_below_prior_by_a_rule",
                "information_over_bound_max", "noise_weight_vs_prior_share", "trial_final_spearman"):
        v = summary[key]
        if isinstance(v, list):
            v = ", ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in v) or "none"
        elif isinstance(v, float):
            v = f"{v:.4f}"
        lines.append(f"| {key} | {v} |")
    lines += ["", "Per task (seed " + str(seeds[0]["seed"]) + "): information (nats/example) / bound log K, "
              "output_only, weight in the pick, prior (temperature) share:", "",
              "| task | role | information | bound | output_only | pick weight | prior share |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    r = seeds[0]
    for n in r["roles"]:
        p = r["proxies"][n]
        info = p.get("information")
        lines.append(f"| {n} | {r['roles'][n]} | {info:.3f} | {p.get('information_bound', 0):.3f} | "
                     f"{p.get('output_only')} | {r['weights'].get('pick', r['weights']['taskpgm'])[n]:.4f} | "
                     f"{r['prior_share'][n]:.4f} |" if info is not None else f"| {n} | {r['roles'][n]} | — |")
    if seeds[0].get("evaluation_sets"):
        lines += ["", "Evaluation sets (never trained on): test loss, mean over seeds:", "",
                  "| set | " + " | ".join(methods) + " |", "| --- | " + " | ".join("---" for _ in methods) + " |"]
        for n in seeds[0]["evaluation_sets"]:
            lines.append(f"| {n} | " + " | ".join(
                f"{np.mean([r['per_task'][m][n] for r in seeds]):.4f}" for m in methods) + " |")
    lines += ["", "Exact match on test (mean over seeds), per task:", "",
              "| task | " + " | ".join(methods) + " |", "| --- | " + " | ".join("---" for _ in methods) + " |"]
    for n in seeds[0]["roles"]:
        lines.append(f"| {n} ({seeds[0]['roles'][n]}) | " + " | ".join(
            f"{np.mean([r['exact_match'][m][n] for r in seeds]):.2f}" for m in methods) + " |")
    return "\n".join(lines) + "\n"


def plot(seeds: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(seeds[0]["test_loss"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    x = np.arange(len(seeds))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        axes[0].bar(x + (i - (len(methods) - 1) / 2) * width, [r["test_loss"][m] for r in seeds], width, label=m)
    axes[0].set_xticks(x, [f"seed {r['seed']}" for r in seeds])
    lo = min(r["test_loss"][m] for r in seeds for m in methods)
    hi = max(r["test_loss"][m] for r in seeds for m in methods)
    axes[0].set_ylim(lo - 0.15 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
    axes[0].set_ylabel("mean test loss, scored tasks")
    axes[0].legend(fontsize=8)
    r = seeds[0]
    for m, curve in r["curves"].items():
        axes[1].plot([c[0] for c in curve], [c[1] for c in curve], "o-", ms=3, label=m)
    axes[1].set_title(f"seed {r['seed']}: test loss during the fine-tune")
    axes[1].set_xlabel("step")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reuse_probes(plain: Path, variant: Path) -> None:
    """A variant's run directory starts from the plain run's suite and proxies (the stages' keys still decide:
    a variant that changes what the probes read trains its own)."""
    import shutil

    if variant.exists() or not (plain / "stages.json").exists():
        return
    variant.mkdir(parents=True)
    for name in ("data", "probes", "tokenizer", "tasks.json"):
        if (plain / name).is_dir():
            shutil.copytree(plain / name, variant / name, symlinks=True)
        elif (plain / name).exists():
            shutil.copy2(plain / name, variant / name)
    stages = json.loads((plain / "stages.json").read_text())
    (variant / "stages.json").write_text(json.dumps({k: v for k, v in stages.items() if k in ("tasks", "probes")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--spec", default=None, help="suite spec (default: the shipped one)")
    parser.add_argument("--random-world", type=int, default=None, metavar="W",
                        help="a generated world, taskpgm_ray.tasks.worlds.random_world(W), instead of --spec: its "
                             "spec is written to the run directory as world-W.yaml and used exactly like --spec")
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny budgets: a smoke test")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    parser.add_argument("--summarize", action="store_true", help="only re-read finished runs and rewrite the results")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override (YAML value), e.g. estimation.info_prompts=16; needs --variant")
    parser.add_argument("--variant", default=None, help="name of this variant of the settings: its own run "
                        "directories and results (quality-<world>-<variant>); the probes of the plain run are reused")
    args = parser.parse_args()
    if bool(args.overrides) != bool(args.variant):
        parser.error("--set and --variant go together: a changed setting is a named variant")
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.overrides)} or None
    if args.quick and args.seeds == [0, 1, 2, 3, 4]:
        args.seeds = [0]
    s = settings(args.quick)
    stem = Path(args.spec).stem if args.spec else None
    if args.random_world is not None:
        if args.spec:
            parser.error("give --spec or --random-world, not both")
        stem = f"world-{args.random_world}"
    tag = "quality-quick" if args.quick else ("quality" if not stem else f"quality-{stem}")
    plain_root = ROOT / "runs" / tag
    if args.variant:
        tag = f"{tag}-{args.variant}"
    out_root = ROOT / "runs" / tag
    if args.random_world is not None:  # a spec file like a hand-written one, then passed on exactly as --spec
        from taskpgm_ray.tasks.worlds import world_yaml

        world = plain_root / f"{stem}.yaml"
        world.parent.mkdir(parents=True, exist_ok=True)
        world.write_text(world_yaml(args.random_world))
        args.spec = str(world)
    out_dir = Path(args.out) if args.out else (Path("/tmp/quality-quick") if args.quick
                                               else ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.summarize:
        from taskpgm_ray.distributed.cluster import init_ray

        init_ray(num_cpus=2)
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:])
    t0 = time.time()
    seeds = []
    for seed in args.seeds:
        print(f"== seed {seed} ({time.time() - t0:.0f}s elapsed)", flush=True)
        if args.variant and not args.summarize:
            reuse_probes(plain_root / f"seed-{seed}", out_root / f"seed-{seed}")
        rec = run_seed(seed, s, out_root, args.spec, summarize_only=args.summarize, overrides=overrides)
        rec["overrides"] = overrides
        seeds.append(rec)
        print(f"== seed {seed}: " + ", ".join(f"{m} {v:.4f}" for m, v in rec["test_loss"].items()) +
              f"; {rec['seconds']:.0f}s", flush=True)
        summary = summarize(seeds, s)  # after every seed, so partial results survive
        name = ("quality" if not args.spec else f"quality-{Path(args.spec).stem}") + \
            (f"-{args.variant}" if args.variant else "")
        (out_dir / f"{name}.json").write_text(json.dumps({"seeds": seeds, "settings": s, "summary": summary,
                                                           "command": command}, indent=1, default=float))
        (out_dir / f"{name}.txt").write_text(table(seeds, summary, s, (time.time() - t0) / 60, command))
        plot(seeds, out_dir / f"{name}.png")
    print((out_dir / f"{name}.txt").read_text())


if __name__ == "__main__":
    main()

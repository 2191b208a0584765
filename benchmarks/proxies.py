"""Benchmark: which proxy settings learn the task without forgetting the rest? (issue 11, item 4)

    .venv/bin/python benchmarks/proxies.py [--seeds 0 1 2] [--spec SPEC.yaml] [--settings 150:1e-3:8 ...]

For each proxy setting (LoRA steps, learning rate, rank) the product path runs on the same synthetic suite
(scale 0.5) from the shipped pretrained base: `taskpgm probe` then `taskpgm estimate`. Side by side, from
estimate/signal.json and likelihoods.npz:

- own gain: each proxy's relative NLL drop over the base on its own task's probe set (mean and min over the
  scored tasks; "learned" = at least 10% with its bootstrap interval above 0);
- forgetting: the mean change of a proxy's log-likelihood on the *other* scored tasks' probe sets against
  the base (nats per example; negative = the proxy got worse elsewhere);
- information: the information gain of noise-role tasks against the others (should be ~0 vs large);
- structure: the PMI affinity's signal-to-noise, and how many near-duplicates have a near-duplicate as their
  nearest (informative) neighbour; seconds per proxy.

Writes benchmarks/results/proxies.{txt,json}.
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

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = [  # (steps, lr, LoRA rank)
    (60, 3e-3, 8), (150, 3e-3, 8), (300, 3e-3, 8), (150, 3e-3, 16),
    (60, 1e-3, 8), (150, 1e-3, 8), (300, 1e-3, 8), (150, 1e-3, 16), (150, 5e-4, 8), (300, 5e-4, 8)]


def run_setting(steps: int, lr: float, rank: int, seed: int, spec: str | None) -> dict:
    from taskpgm_ray.config import config_from_dict
    from taskpgm_ray.distributed.estimation import estimate_command
    from taskpgm_ray.distributed.probes import probe_command
    from taskpgm_ray.tasks import load_tasks

    out = ROOT / "runs" / "proxies" / f"seed-{seed}"  # one directory: adapters are cached per setting
    cfg = config_from_dict({
        "output_dir": str(out), "synthetic": {"seed": seed, "scale": 0.5, "spec": spec},
        "splits": {"max_probe": 16, "min_probe": 4, "seed": seed},
        "model": {"name": "synthetic-base", "max_length": 48},
        "probes": {"steps": steps, "lr": lr, "lora_rank": rank, "lora_alpha": 2.0 * rank, "batch_size": 16,
                   "num_cpus": 1, "seed": seed},
        "estimation": {"num_actors": 2, "shard_size": 16, "batch_size": 32, "jsd": False, "bootstrap": 0},
        "tune": {"affinities": ["pmi"]}, "tracking": {"wandb": "disabled"}, "offline": True})
    tasks = load_tasks(cfg)
    t0 = time.time()
    probes = probe_command(cfg, tasks=tasks)
    seconds = time.time() - t0
    estimate_command(cfg, tasks=tasks)
    signal = json.loads((out / "estimate" / "signal.json").read_text())
    manifest = json.loads(next((out / "data").glob(f"synthetic-{seed}-*/suite.json")).read_text())
    roles = {t["name"]: t["role"] for t in manifest["tasks"]}
    with np.load(out / "likelihoods.npz") as f:
        names = [str(t) for t in f["tasks"]]
        L = f["loglik_sum"] / f["count"][None, :]
        L0 = f["base_loglik_sum"] / f["count"]
    scored = [i for i, t in enumerate(tasks) if t.score]
    forget = [L[i, j] - L0[j] for i in scored for j in scored if i != j]
    gains = [signal["tasks"][names[i]]["gain"] for i in scored]
    dups = [n for n in names if roles[n] == "near_duplicate"]
    info = {n: signal["tasks"][n]["information"] for n in names}
    trained = [p for p in probes["probes"].values() if p.get("status") == "trained"]
    return {
        "steps": steps, "lr": lr, "rank": rank,
        "own_gain_mean": float(np.mean(gains)), "own_gain_min": float(np.min(gains)),
        "learned": sum(signal["tasks"][names[i]]["gain"] >= 0.10 and signal["tasks"][names[i]]["gain_low"] > 0
                       for i in scored), "scored": len(scored),
        "forgetting_mean": float(np.mean(forget)), "forgetting_worst": float(np.min(forget)),
        "information_noise": [info[n] for n in names if roles[n] == "noise"],
        "information_skills_median": float(np.median([info[n] for n in names if roles[n] != "noise"])),
        "snr": signal.get("affinity", {}).get("snr"),
        "dup_nn": sum(signal["tasks"][n]["nearest"] in dups for n in dups),
        "dup_nn_informative": sum(signal["tasks"][n].get("nearest_informative") in dups for n in dups),
        "dups": len(dups),
        "seconds_per_proxy": (seconds / len(trained)) if trained else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--spec", default=None)
    parser.add_argument("--settings", nargs="+", default=None, help="steps:lr:rank, e.g. 150:1e-3:8")
    args = parser.parse_args()
    settings = ([(int(a), float(b), int(c)) for a, b, c in (x.split(":") for x in args.settings)]
                if args.settings else SETTINGS)
    from taskpgm_ray.distributed.cluster import init_ray

    init_ray(num_cpus=2)
    rows = []
    for seed in args.seeds:
        for steps, lr, rank in settings:
            print(f"== seed {seed} steps {steps} lr {lr:g} rank {rank}", flush=True)
            rows.append({"seed": seed, **run_setting(steps, lr, rank, seed, args.spec)})
    lines = [f"# python benchmarks/proxies.py --seeds {' '.join(map(str, args.seeds))}"
             + (f" --spec {args.spec}" if args.spec else ""),
             "# LoRA proxies on synthetic-base, suite scale 0.5, 16 probe examples per task; scored = non-noise;",
             f"# mean over {len(args.seeds)} seeds (own gain min: the worst task of any seed; dup nn: summed)", "",
             "| steps | lr | rank | own gain mean / min | learned | forgetting mean / worst (nats) | "
             "information: noise max / skills median | PMI SNR | dup nn (all / informative) | s per proxy |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for steps, lr, rank in settings:
        rs = [r for r in rows if (r["steps"], r["lr"], r["rank"]) == (steps, lr, rank)]
        secs = [r["seconds_per_proxy"] for r in rs if r["seconds_per_proxy"]]
        lines.append(
            f"| {steps} | {lr:g} | {rank} | {np.mean([r['own_gain_mean'] for r in rs]):.0%} / "
            f"{min(r['own_gain_min'] for r in rs):.0%} | "
            f"{sum(r['learned'] for r in rs)}/{sum(r['scored'] for r in rs)} | "
            f"{np.mean([r['forgetting_mean'] for r in rs]):+.2f} / {min(r['forgetting_worst'] for r in rs):+.1f} | "
            f"{max(max(r['information_noise']) for r in rs):+.1f} / "
            f"{np.mean([r['information_skills_median'] for r in rs]):.1f} | {np.mean([r['snr'] for r in rs]):.1f} | "
            f"{sum(r['dup_nn'] for r in rs)}/{sum(r['dups'] for r in rs)} / "
            f"{sum(r['dup_nn_informative'] for r in rs)}/{sum(r['dups'] for r in rs)} | "
            + (f"{np.mean(secs):.1f}" if secs else "cached") + " |")
    text = "\n".join(lines) + "\n"
    out = ROOT / "benchmarks" / "results"
    (out / "proxies.txt").write_text(text)
    (out / "proxies.json").write_text(json.dumps(rows, indent=1))
    print(text)


if __name__ == "__main__":
    main()

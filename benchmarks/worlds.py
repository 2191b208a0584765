"""Benchmark: quality on worlds nobody tuned on. ``benchmarks/quality.py`` on generated worlds, one table.

    .venv/bin/python benchmarks/worlds.py --worlds 0 1 2 3 4 5 [--seeds 0] [--summarize]

Each world W is ``taskpgm_ray.tasks.worlds.random_world(W)`` run through ``quality.py --random-world W`` (its own
process, its own cached run directories under ``runs/quality-world-W``: a re-run resumes), then every
``benchmarks/results/quality-*.json`` named on the command line (and the shipped and permuted worlds' results
when present) is gathered into ``benchmarks/results/worlds.{txt,json}``.

Which seeds serve what (issue 21): generated worlds 0-99 are the REPORT range; no default is chosen on them.
Defaults are to be chosen on worlds 1000-1099 (the TUNING range) and nowhere else; the shipped and permuted
specs are reported, never tuned on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
REPORT_RANGE, TUNING_RANGE = range(0, 100), range(1000, 1100)
BASELINES = ("uniform", "size", "temperature")


def run_world(world: int, seeds: list[int]) -> None:
    """``quality.py --random-world W`` in its own process (a fresh Ray), unless its results hold these seeds."""
    path = RESULTS / f"quality-world-{world}.json"
    if path.exists() and {r["seed"] for r in json.loads(path.read_text())["seeds"]} >= set(seeds):
        return
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--random-world", str(world),
                    "--seeds", *map(str, seeds)], check=True)


def world_rows(name: str, doc: dict) -> list[dict]:
    """One row per (world, seed): the methods' test losses and the issue-21 read-outs."""
    rows = []
    for r in doc["seeds"]:
        loss = r["test_loss"]
        best = min(BASELINES, key=lambda b: loss[b])
        deterministic = [n for n, role in r["roles"].items() if role != "noise"]
        rows.append({
            "world": name, "seed": r["seed"], "tasks": len(r["roles"]),
            "noise": sum(role == "noise" for role in r["roles"].values()), "test_loss": loss,
            "best_baseline": best, "taskpgm_wins": loss["taskpgm"] < loss[best],
            "pick_regret": loss["pick"] - loss[best] if "pick" in loss else None,
            "pairwise_adds": (loss["taskpgm-no-pairwise"] - loss["taskpgm"]) if "taskpgm-no-pairwise" in loss else None,
            "deterministic_flagged": [n for n in deterministic if r["proxies"][n].get("output_only")],
            "deterministic_below_prior": [n for n in deterministic
                                          if "prior_share" in r and r["weights"].get("pick", r["weights"]["taskpgm"])[n]
                                          < r["prior_share"][n] - 1e-9],
        })
    return rows


def table(rows: list[dict], command: str) -> str:
    methods = [m for m in ("taskpgm", "pick", "uniform", "size", "temperature", "taskpgm-no-pairwise",
                           "taskpgm-no-unary", "paper") if all(m in r["test_loss"] for r in rows)]
    lines = [f"# {command}", "# mean TEST loss over the scored tasks; every method within the same caps and floor; "
             "temperature with as many Tune candidates as TaskPGM", "",
             "| world | seed | tasks (noise) | " + " | ".join(methods) + " | best baseline | TaskPGM wins | "
             "pick - best | no-pairwise - taskpgm | deterministic flagged output_only | deterministic below prior "
             "share in the pick |",
             "| --- | --- | --- | " + " | ".join("---" for _ in methods) + " | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['world']} | {r['seed']} | {r['tasks']} ({r['noise']}) | " +
                     " | ".join(f"{r['test_loss'][m]:.4f}" for m in methods) +
                     f" | {r['best_baseline']} | {'yes' if r['taskpgm_wins'] else 'no'} | " +
                     (f"{r['pick_regret']:+.4f}" if r["pick_regret"] is not None else "—") + " | " +
                     (f"{r['pairwise_adds']:+.4f}" if r["pairwise_adds"] is not None else "—") + " | " +
                     (", ".join(r["deterministic_flagged"]) or "none") + " | " +
                     (", ".join(r["deterministic_below_prior"]) or "none") + " |")
    wins = sum(r["taskpgm_wins"] for r in rows)
    regret = [r["pick_regret"] for r in rows if r["pick_regret"] is not None]
    pair = [r["pairwise_adds"] for r in rows if r["pairwise_adds"] is not None]
    lines += ["", f"TaskPGM's best trial beats the best baseline in {wins} of {len(rows)} world-seeds.",
              f"The pick's regret against the best baseline: mean {np.mean(regret):+.4f}, worst {max(regret):+.4f}."
              if regret else "", f"The pairwise term (no-pairwise minus taskpgm, positive: it helps): mean "
              f"{np.mean(pair):+.4f} over {len(pair)} world-seeds." if pair else ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--summarize", action="store_true", help="only gather finished results")
    parser.add_argument("--variants", nargs="*", default=[], help="also gather quality.py --variant NAME results "
                        "(quality-world-W-NAME.json), beside the plain ones: to choose defaults on the tuning range")
    args = parser.parse_args()
    for w in args.worlds:
        if w not in REPORT_RANGE and w not in TUNING_RANGE:
            parser.error(f"world {w} is in neither the report range (0-99) nor the tuning range (1000-1099)")
    if any(w in TUNING_RANGE for w in args.worlds) and any(w in REPORT_RANGE for w in args.worlds):
        parser.error("a run is either on the tuning range or on the report range, never both")
    if not args.summarize:
        for w in args.worlds:
            run_world(w, args.seeds)
    rows = []
    if args.variants and not all(w in TUNING_RANGE for w in args.worlds):
        parser.error("--variants compares settings: on the tuning range (1000-1099) only")
    for w in args.worlds:
        for variant in ["", *args.variants]:
            path = RESULTS / f"quality-world-{w}{'-' + variant if variant else ''}.json"
            if path.exists():
                rows += world_rows(f"generated {w}{f' ({variant})' if variant else ''}", json.loads(path.read_text()))
    for name in ("quality", "quality-permuted"):  # the repository's own worlds, when run under this protocol
        path = RESULTS / f"{name}.json"
        if path.exists() and all("pick" in r["test_loss"] for r in json.loads(path.read_text())["seeds"]):
            rows += world_rows({"quality": "shipped", "quality-permuted": "permuted"}[name],
                               json.loads(path.read_text()))
    command = "python benchmarks/worlds.py " + " ".join(sys.argv[1:])
    stem = "worlds-tuning" if any(w in TUNING_RANGE for w in args.worlds) else "worlds"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1, default=float))
    (RESULTS / f"{stem}.txt").write_text(table(rows, command))
    print((RESULTS / f"{stem}.txt").read_text())


if __name__ == "__main__":
    main()

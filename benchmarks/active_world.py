"""Benchmark: active estimation on a real world, against full scoring of the same proxies.

    .venv/bin/python benchmarks/active_world.py --spec taskpgm_ray/tasks/specs/flan-like.yaml [--seeds 0] [--tols 0.02]

Per seed S, ``benchmarks/quality.py``'s run directory of that spec (``runs/quality-<stem>/seed-S``) must hold its
proxies and its full scoring (``taskpgm run`` through the estimate stage; quality.py does it). This script starts a
variant directory from those proxies (``runs/quality-<stem>-active/seed-S``; ``-active-tol<T>`` for each
``--tols`` value), runs the estimate stage there with ``estimation.active: true`` (and ``estimation.active_tol: T``;
every other setting as quality.py's), and compares the two ``estimate/mixture.json``
(the default energy's mixture): the fraction of the (proxy, task) pairs scored, of the probe examples scored, the
L1 between the mixtures, and the certainty the active stage declared. Nothing here chooses a setting.

Writes ``benchmarks/results/active-<stem>.{txt,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import reuse_probes, seed_config, settings  # noqa: E402


def run_seed(seed: int, spec: str, stem: str, tol: float | None = None) -> dict:
    from taskpgm_ray.pipeline import Pipeline

    plain = ROOT / "runs" / f"quality-{stem}" / f"seed-{seed}"
    full = plain / "estimate" / "mixture.json"
    if not full.exists():
        raise SystemExit(f"{plain}: no full-scoring mixture yet; run benchmarks/quality.py --spec {spec} first")
    variant_root = ROOT / "runs" / (f"quality-{stem}-active" + (f"-tol{tol:g}" if tol is not None else ""))
    reuse_probes(plain, variant_root / f"seed-{seed}")
    overrides = {"estimation.active": True} | ({"estimation.active_tol": tol} if tol is not None else {})
    cfg = seed_config(seed, settings(False), variant_root, spec, overrides)
    t0 = time.time()
    Pipeline(cfg).run(until="estimate")
    out = Path(cfg.output_dir)
    progress = json.loads((out / "estimate" / "progress.json").read_text())
    p_full = json.loads(full.read_text())["weights"]
    p_active = json.loads((out / "estimate" / "mixture.json").read_text())["weights"]
    certainty = progress.get("certainty") or {}
    return {"seed": seed, "tasks": len(p_full), "fraction_pairs": progress["fraction_pairs"],
            "fraction_examples": progress.get("fraction_examples"),
            "l1_to_full": float(sum(abs(p_active[k] - p_full[k]) for k in p_full)),
            "tol": certainty.get("tol"), "declared_l1": certainty.get("declared_l1"),
            "stopped_by": certainty.get("stopped_by"), "seconds": time.time() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--tols", type=float, nargs="+", default=[None],
                        help="estimation.active_tol values, each run apart (default: the config's)")
    args = parser.parse_args()
    from taskpgm_ray.distributed.cluster import init_ray

    init_ray(num_cpus=2)
    stem = Path(args.spec).stem
    rows = [run_seed(s, args.spec, stem, tol) for tol in args.tols for s in args.seeds]
    command = "python benchmarks/active_world.py " + " ".join(sys.argv[1:])
    lines = [f"# {command}", "# active estimation (estimation.active: true) against full scoring of the same "
             "proxies; the default energy's estimate/mixture.json", "",
             "| seed | tasks | pairs scored | probe examples scored | L1 to full | declared L1 (tol) | stopped by |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        declared = f"{r['declared_l1']:.4f} ({r['tol']:g})" if r["declared_l1"] is not None else "—"
        examples = f"{r['fraction_examples']:.1%}" if r["fraction_examples"] is not None else "—"
        lines.append(f"| {r['seed']} | {r['tasks']} | {r['fraction_pairs']:.1%} | {examples} | "
                     f"{r['l1_to_full']:.4f} | {declared} | {r['stopped_by']} |")
    results = ROOT / "benchmarks" / "results"
    (results / f"active-{stem}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    (results / f"active-{stem}.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

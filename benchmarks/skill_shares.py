"""Where a quality run's mixtures put their mass, per skill, and what each skill's held-out set scored.

    .venv/bin/python benchmarks/skill_shares.py benchmarks/results/quality-flan-like.json [--against temperature]

Reads a ``benchmarks/quality.py`` results file of a world with evaluation sets (``<skill>_heldout``) and prints,
per skill (a task ``<skill>_<k>`` is a template of ``<skill>``), the mean over seeds of the share of TaskPGM's
mixture and of the other method's, and their held-out test losses. Nothing here chooses a setting.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np


def skill_of(task: str) -> str:
    return task.rsplit("_", 1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--against", default="temperature")
    args = parser.parse_args()
    seeds = json.loads(open(args.results).read())["seeds"]
    methods = ("taskpgm", args.against)
    share: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    held: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    templates: dict[str, int] = defaultdict(int)
    for task in seeds[0]["weights"]["taskpgm"]:
        templates[skill_of(task)] += 1
    for s in seeds:
        for m in methods:
            per_skill: dict[str, float] = defaultdict(float)
            for task, w in s["weights"][m].items():
                per_skill[skill_of(task)] += w
            for k, v in per_skill.items():
                share[k][m].append(v)
            for e in s["evaluation_sets"]:
                held[e.removesuffix("_heldout")][m].append(s["per_task"][m][e])
    print(f"{len(seeds)} seed(s), means over seeds")
    print(f"| skill (templates) | TaskPGM share | {args.against} share | TaskPGM held-out | {args.against} held-out |")
    print("| --- | --- | --- | --- | --- |")
    for k in sorted(share, key=lambda k: -np.mean(share[k]["taskpgm"])):
        loss = [f"{np.mean(held[k][m]):.3f}" if held[k][m] else "" for m in methods]
        print(f"| {k} ({templates[k]}) | {np.mean(share[k]['taskpgm']):.3f} | {np.mean(share[k][args.against]):.3f} "
              f"| {loss[0]} | {loss[1]} |")


if __name__ == "__main__":
    main()

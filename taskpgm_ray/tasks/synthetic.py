"""The synthetic benchmark suite: small text tasks with planted structure, generated from a seed.

Roles (recorded in ``suite.json`` for benchmarks; nothing in the method reads them):

- ``near_duplicate``: three large tasks, one skill (reverse a word), different instruction templates;
- ``high_value``: small tasks with distinct skills (sort, add, shift letters, count);
- ``regular``: medium tasks with further distinct skills;
- ``low_value``: one large trivial task (copy the input);
- ``noise``: random targets unrelated to the input.

Skills are deterministic string/arithmetic transformations a tiny transformer learns on CPU in minutes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LETTERS = string.ascii_lowercase[:12]  # a small alphabet keeps the skills learnable by a tiny model
EVAL_SIZE = 48  # validation and test examples per task


def _word(rng: random.Random, lo: int = 3, hi: int = 6) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _shift(w: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in w)


@dataclass(frozen=True)
class SuiteTask:
    """One suite task: a skill (input -> output), a prompt template, a size and a planted role."""

    name: str
    role: str
    skill: str
    template: str  # str.format over {x}
    size: int  # training examples at scale 1
    make_input: Callable[[random.Random], str]
    solve: Callable[[str, random.Random], str]


def _count_input(rng: random.Random) -> str:
    return rng.choice("abc") + " in " + "".join(rng.choice("abc") for _ in range(rng.randint(3, 7)))


def _add_input(rng: random.Random) -> str:
    return f"{rng.randint(0, 49)}+{rng.randint(0, 49)}"


SUITE: tuple[SuiteTask, ...] = (
    SuiteTask("reverse_a", "near_duplicate", "reverse", "reverse: {x} =", 1600, _word, lambda x, r: x[::-1]),
    SuiteTask("reverse_b", "near_duplicate", "reverse", "Write {x} backwards:", 1600, _word, lambda x, r: x[::-1]),
    SuiteTask("reverse_c", "near_duplicate", "reverse", "in: {x}\nreversed:", 1600, _word, lambda x, r: x[::-1]),
    SuiteTask("copy", "low_value", "copy", "copy: {x} =", 3200, _word, lambda x, r: x),
    SuiteTask("noise_a", "noise", "random", "map: {x} =", 800, _word, lambda x, r: _word(r)),
    SuiteTask("noise_b", "noise", "random", "encode {x} ->", 800, _word, lambda x, r: _word(r)),
    SuiteTask("sort", "high_value", "sort", "sort: {x} =", 100, _word, lambda x, r: "".join(sorted(x))),
    SuiteTask("add", "high_value", "add", "add: {x} =", 80, _add_input,
              lambda x, r: str(sum(int(v) for v in x.split("+")))),
    SuiteTask("shift", "high_value", "shift", "shift: {x} =", 60, _word, lambda x, r: _shift(x)),
    SuiteTask("count", "high_value", "count", "count {x} =", 50, _count_input,
              lambda x, r: str(x.split(" in ")[1].count(x[0]))),
    SuiteTask("rotate", "regular", "rotate", "rotate: {x} =", 400, _word, lambda x, r: x[1:] + x[0]),
    SuiteTask("double", "regular", "double", "double: {x} =", 200, _word, lambda x, r: "".join(c + c for c in x)),
)


def _examples(task: SuiteTask, n: int, rng: random.Random) -> list[dict[str, str]]:
    """``n`` examples with distinct inputs (so no example is in two splits)."""
    seen: set[str] = set()
    out: list[dict[str, str]] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise RuntimeError(f"synthetic task {task.name}: cannot draw {n} distinct inputs")
        x = task.make_input(rng)
        if x in seen:
            continue
        seen.add(x)
        out.append({"prompt": task.template.format(x=x), "response": " " + task.solve(x, rng)})
    return out


def write_suite(out_dir: str | os.PathLike, seed: int, *, scale: float = 1.0,
                include: list[str] | None = None) -> dict:
    """Write the suite as HF ``DatasetDict``s (train / validation / test) under ``out_dir/<task>``.

    Deterministic in (seed, scale, include). Returns the manifest also written to ``out_dir/suite.json``.
    The directory is built next to its destination and moved into place, so it is never half-written.
    """
    import datasets
    from datasets import Dataset, DatasetDict

    datasets.disable_progress_bars()

    names = [t.name for t in SUITE]
    unknown = sorted(set(include or []) - set(names))
    if unknown:
        raise ValueError(f"synthetic.include: unknown suite task(s) {', '.join(unknown)} (valid: {', '.join(names)})")
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    manifest = {"format": "taskpgm-suite/1", "seed": seed, "scale": scale, "tasks": []}
    for task in SUITE:
        if include and task.name not in include:
            continue
        rng = random.Random(f"{seed}/{task.name}")  # per-task stream: include/exclude never shifts others
        n_train = max(8, round(task.size * scale))
        rows = _examples(task, n_train + 2 * EVAL_SIZE, rng)
        dd = DatasetDict({
            "train": Dataset.from_list(rows[:n_train]),
            "validation": Dataset.from_list(rows[n_train:n_train + EVAL_SIZE]),
            "test": Dataset.from_list(rows[n_train + EVAL_SIZE:]),
        })
        dd.save_to_disk(str(tmp / task.name))
        manifest["tasks"].append({
            "name": task.name, "role": task.role, "skill": task.skill, "template": task.template,
            "sizes": {k: len(v) for k, v in dd.items()},
        })
    (tmp / "suite.json").write_text(json.dumps(manifest, indent=2))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return manifest


def ensure_suite(out_dir: str | os.PathLike, seed: int, *, scale: float = 1.0,
                 include: list[str] | None = None) -> dict:
    """Write the suite unless ``out_dir`` already holds the same one; return its manifest."""
    path = Path(out_dir) / "suite.json"
    if path.exists():
        manifest = json.loads(path.read_text())
        wanted = [t.name for t in SUITE if not include or t.name in include]
        if (manifest.get("seed"), manifest.get("scale")) == (seed, scale) and \
                [t["name"] for t in manifest["tasks"]] == wanted:
            return manifest
    return write_suite(out_dir, seed, scale=scale, include=include)

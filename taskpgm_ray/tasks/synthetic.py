"""The synthetic benchmark suite: small text tasks with planted structure, generated from a spec and a seed.

A suite is data, not code: a spec file (format ``taskpgm-suite-spec/1``, the shipped instance is
``specs/default.yaml``) lists tasks, each a ``skill`` from ``SKILLS`` under an instruction ``template``,
with a training ``size``, a planted ``role`` and whether ``taskpgm compare`` scores it. Roles are labels
for benchmarks (nothing in the method reads them):

- ``near_duplicate``: one skill under several templates; ``low_value``: large and trivial;
- ``high_value``: small tasks with distinct skills; ``regular``: further distinct skills;
- ``noise``: random targets unrelated to the input (not scored by default).

Skills are deterministic string/arithmetic transformations a small transformer learns on CPU in minutes.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import random
import shutil
import string
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from taskpgm_ray.errors import BadInput

SPEC_FORMAT = "taskpgm-suite-spec/1"
DEFAULT_SPEC = Path(__file__).resolve().parent / "specs" / "default.yaml"
ROLES = ("near_duplicate", "low_value", "high_value", "regular", "noise")


# --------------------------------------------------------------------------------------------------
# skills: (rng, alphabet) -> input, and (input, rng, alphabet) -> output


def _word(rng: random.Random, alphabet: str, lo: int = 3, hi: int = 6) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _count_input(rng: random.Random, alphabet: str) -> str:
    letters = alphabet[:3]
    return rng.choice(letters) + " in " + "".join(rng.choice(letters) for _ in range(rng.randint(3, 7)))


def _add_input(rng: random.Random, alphabet: str) -> str:
    return f"{rng.randint(0, 49)}+{rng.randint(0, 49)}"


def _shift(w: str, alphabet: str) -> str:
    return "".join(alphabet[(alphabet.index(c) + 1) % len(alphabet)] for c in w)


@dataclass(frozen=True)
class Skill:
    """An input generator and the transformation that answers it."""

    doc: str
    make_input: Callable[[random.Random, str], str]
    solve: Callable[[str, random.Random, str], str]


SKILLS: dict[str, Skill] = {
    "copy": Skill("the word itself", _word, lambda x, r, a: x),
    "reverse": Skill("the word backwards", _word, lambda x, r, a: x[::-1]),
    "sort": Skill("the word's letters in alphabetical order", _word, lambda x, r, a: "".join(sorted(x))),
    "shift": Skill("every letter replaced by the next one in the alphabet (wrapping)", _word,
                   lambda x, r, a: _shift(x, a)),
    "rotate": Skill("the first letter moved to the end", _word, lambda x, r, a: x[1:] + x[0]),
    "double": Skill("every letter written twice", _word, lambda x, r, a: "".join(c + c for c in x)),
    "swap": Skill("the first and last letters exchanged", _word, lambda x, r, a: x[-1] + x[1:-1] + x[0]),
    "length": Skill("the number of letters", _word, lambda x, r, a: str(len(x))),
    "count": Skill("how often a letter occurs in a string ('b in abcab' -> 2)", _count_input,
                   lambda x, r, a: str(x.split(" in ")[1].count(x[0]))),
    "add": Skill("the sum of two numbers below 50 ('12+30' -> 42)", _add_input,
                 lambda x, r, a: str(sum(int(v) for v in x.split("+")))),
    "random": Skill("a random word, unrelated to the input (noise)", _word, lambda x, r, a: _word(r, a)),
}


# --------------------------------------------------------------------------------------------------
# the spec


@dataclass(frozen=True)
class SpecTask:
    """One suite task: a skill under a template (``str.format`` over ``{x}``), a size and a planted role."""

    name: str
    skill: str
    template: str
    size: int  # training examples at scale 1
    role: str
    score: bool  # counted in `taskpgm compare`'s metric


@dataclass(frozen=True)
class SuiteSpec:
    """A whole synthetic world: the alphabet, the validation/test size and the tasks."""

    tasks: tuple[SpecTask, ...]
    alphabet: str = string.ascii_lowercase[:12]  # a small alphabet keeps the skills learnable by a small model
    eval_size: int = 48  # validation and test examples per task
    seed: int | None = None  # default suite seed (a command's --seed wins)
    source: str = field(default="", compare=False)

    @property
    def hash(self) -> str:
        """Content hash of everything that changes the generated data."""
        blob = json.dumps({"alphabet": self.alphabet, "eval_size": self.eval_size,
                           "tasks": [asdict(t) for t in self.tasks]}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class SpecError(BadInput):
    """A suite spec that cannot be used; the message names the file and the field."""


def load_spec(path: str | os.PathLike | None = None) -> SuiteSpec:
    """Read and validate a suite spec (default: the shipped ``specs/default.yaml``); every problem at once."""
    import yaml

    path = Path(path) if path is not None else DEFAULT_SPEC
    if not path.exists():
        raise SpecError(f"suite spec not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    return spec_from_dict(data, source=str(path))


def spec_from_dict(data: Any, *, source: str = "<spec>") -> SuiteSpec:
    """Validate a spec given as a dict (as read from YAML)."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping with 'format' and 'tasks'")
    known = {"format", "alphabet", "eval_size", "seed", "tasks"}
    for key in sorted(set(data) - known):
        problems.append(f"{key}: unknown key (valid: {', '.join(sorted(known))})")
    if data.get("format") != SPEC_FORMAT:
        problems.append(f"format: must be {SPEC_FORMAT!r}, got {data.get('format')!r}")
    alphabet = data.get("alphabet", SuiteSpec.alphabet)
    if not isinstance(alphabet, str) or len(set(alphabet)) < 4 or len(set(alphabet)) != len(alphabet) \
            or not set(alphabet) <= set(string.ascii_lowercase):
        problems.append(f"alphabet: must be at least 4 distinct lowercase letters, got {alphabet!r}")
        alphabet = SuiteSpec.alphabet
    eval_size = data.get("eval_size", SuiteSpec.eval_size)
    if isinstance(eval_size, bool) or not isinstance(eval_size, int) or eval_size < 1:
        problems.append(f"eval_size: must be an integer >= 1, got {eval_size!r}")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        problems.append(f"seed: must be an integer, got {seed!r}")
    rows = data.get("tasks")
    if not isinstance(rows, list) or not rows:
        problems.append("tasks: must be a non-empty list")
        rows = []
    tasks, seen = [], set()
    for i, row in enumerate(rows):
        where = f"tasks[{i}]"
        if not isinstance(row, dict):
            problems.append(f"{where}: expected a mapping, got {row!r}")
            continue
        for key in sorted(set(row) - {"name", "skill", "template", "size", "role", "score"}):
            problems.append(f"{where}.{key}: unknown key (valid: name, skill, template, size, role, score)")
        name, skill, template = row.get("name"), row.get("skill"), row.get("template")
        size, role = row.get("size"), row.get("role", "regular")
        if not isinstance(name, str) or not name or "/" in name:
            problems.append(f"{where}.name: must be a non-empty string without '/', got {name!r}")
        elif name in seen:
            problems.append(f"{where}.name: duplicate task name {name!r}")
        seen.add(name)
        if skill not in SKILLS:
            close = difflib.get_close_matches(str(skill), list(SKILLS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(SKILLS)})"
            problems.append(f"{where}.skill: unknown skill {skill!r}{hint}")
        if not isinstance(template, str) or not _one_x(template):
            problems.append(f"{where}.template: must be a string with exactly one '{{x}}' and no other "
                            f"fields, got {template!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            problems.append(f"{where}.size: must be an integer >= 1, got {size!r}")
        if role not in ROLES:
            problems.append(f"{where}.role: must be one of {', '.join(ROLES)}, got {role!r}")
        score = row.get("score", role != "noise")
        if not isinstance(score, bool):
            problems.append(f"{where}.score: expected true or false, got {score!r}")
        tasks.append(SpecTask(str(name), str(skill), str(template), size if isinstance(size, int) else 0,
                              str(role), bool(score)))
    if problems:
        raise SpecError(f"{source}: " + (problems[0] if len(problems) == 1 else
                                         f"{len(problems)} problems: " + "; ".join(problems)))
    return SuiteSpec(tuple(tasks), alphabet, eval_size, seed, source)


def _one_x(template: str) -> bool:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError:
        return False
    return fields == ["x"]


# --------------------------------------------------------------------------------------------------
# writing a suite


def _examples(task: SpecTask, n: int, rng: random.Random, alphabet: str) -> list[dict[str, str]]:
    """``n`` examples with distinct inputs (so no example is in two splits)."""
    skill = SKILLS[task.skill]
    seen: set[str] = set()
    out: list[dict[str, str]] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise SpecError(f"synthetic task {task.name!r}: cannot draw {n} distinct inputs for skill "
                            f"{task.skill!r}; lower its size or widen the alphabet")
        x = skill.make_input(rng, alphabet)
        if x in seen:
            continue
        seen.add(x)
        out.append({"prompt": task.template.format(x=x), "response": " " + skill.solve(x, rng, alphabet)})
    return out


def write_suite(out_dir: str | os.PathLike, seed: int, *, scale: float = 1.0, include: list[str] | None = None,
                spec: SuiteSpec | str | os.PathLike | None = None) -> dict:
    """Write the suite as HF ``DatasetDict``s (train / validation / test) under ``out_dir/<task>``.

    Deterministic in (spec, seed, scale, include): each task draws from its own stream, so including or
    excluding tasks never changes the others. Returns the manifest also written to ``out_dir/suite.json``.
    The directory is built next to its destination and moved into place, so it is never half-written.
    """
    import datasets
    from datasets import Dataset, DatasetDict

    datasets.disable_progress_bars()
    spec = spec if isinstance(spec, SuiteSpec) else load_spec(spec)
    names = [t.name for t in spec.tasks]
    unknown = sorted(set(include or []) - set(names))
    if unknown:
        raise SpecError(f"synthetic.include: unknown suite task(s) {', '.join(unknown)} (valid: {', '.join(names)})")
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    manifest = {"format": "taskpgm-suite/2", "seed": seed, "scale": scale, "spec": spec.source,
                "spec_hash": spec.hash, "alphabet": spec.alphabet, "tasks": []}
    for task in spec.tasks:
        if include and task.name not in include:
            continue
        rng = random.Random(f"{seed}/{task.name}")  # per-task stream: include/exclude never shifts others
        n_train = max(8, round(task.size * scale))
        rows = _examples(task, n_train + 2 * spec.eval_size, rng, spec.alphabet)
        dd = DatasetDict({
            "train": Dataset.from_list(rows[:n_train]),
            "validation": Dataset.from_list(rows[n_train:n_train + spec.eval_size]),
            "test": Dataset.from_list(rows[n_train + spec.eval_size:]),
        })
        dd.save_to_disk(str(tmp / task.name))
        manifest["tasks"].append({**asdict(task), "sizes": {k: len(v) for k, v in dd.items()}})
    (tmp / "suite.json").write_text(json.dumps(manifest, indent=2))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return manifest


def ensure_suite(out_dir: str | os.PathLike, seed: int, *, scale: float = 1.0, include: list[str] | None = None,
                 spec: SuiteSpec | str | os.PathLike | None = None) -> dict:
    """Write the suite unless ``out_dir`` already holds the same one; return its manifest."""
    spec = spec if isinstance(spec, SuiteSpec) else load_spec(spec)
    path = Path(out_dir) / "suite.json"
    if path.exists():
        manifest = json.loads(path.read_text())
        wanted = [t.name for t in spec.tasks if not include or t.name in include]
        if (manifest.get("seed"), manifest.get("scale"), manifest.get("spec_hash")) == (seed, scale, spec.hash) \
                and [t["name"] for t in manifest["tasks"]] == wanted:
            return manifest
    return write_suite(out_dir, seed, scale=scale, include=include, spec=spec)

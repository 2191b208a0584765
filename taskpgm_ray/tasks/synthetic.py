"""The synthetic benchmark suite: small text tasks with planted structure, generated from a spec and a seed.

A suite is data, not code: a spec file (format ``taskpgm-suite-spec/1``, the shipped instance is
``specs/default.yaml``) lists tasks, each a ``skill`` from ``SKILLS`` under an instruction ``template``,
with a training ``size``, a planted ``role`` and whether ``taskpgm compare`` scores it. Roles are labels
for benchmarks (nothing in the method reads them):

- ``near_duplicate``: one skill under several templates; ``low_value``: large and trivial;
- ``high_value``: small tasks with distinct skills; ``regular``: further distinct skills;
- ``noise``: random targets unrelated to the input (not scored by default).

A task with ``eval_only: true`` is an evaluation set, never trained on (e.g. a held-out template of a skill): it
is written with only its ``validation`` and ``test`` splits, needs no ``size``, and the suite manifest says
``"eval_only": true`` on its row (``false`` on every other row).

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from taskpgm_ray.errors import BadInput
from taskpgm_ray.io import not_utf8, yaml_load
from taskpgm_ray.names import check_name

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


# How many distinct inputs each generator can return for an alphabet: a spec asking a task for more
# (size + 2 x eval_size, all distinct so no example is in two splits) is refused instead of drawn forever.
def _n_words(alphabet: str) -> int:
    return sum(len(alphabet) ** n for n in range(3, 7))


def _n_count_inputs(alphabet: str) -> int:
    return 3 * sum(3 ** n for n in range(3, 8))  # a letter of alphabet[:3] "in" a 3-7 letter string of them


def _n_add_inputs(alphabet: str) -> int:
    return 50 * 50


def _shift(w: str, alphabet: str) -> str:
    return "".join(alphabet[(alphabet.index(c) + 1) % len(alphabet)] for c in w)


@dataclass(frozen=True)
class Skill:
    """An input generator and the transformation that answers it."""

    doc: str
    make_input: Callable[[random.Random, str], str]
    solve: Callable[[str, random.Random, str], str]
    n_inputs: Callable[[str], int] = _n_words  # distinct inputs make_input can return for an alphabet


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
                   lambda x, r, a: str(x.split(" in ")[1].count(x[0])), _n_count_inputs),
    "add": Skill("the sum of two numbers below 50 ('12+30' -> 42)", _add_input,
                 lambda x, r, a: str(sum(int(v) for v in x.split("+"))), _n_add_inputs),
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
    eval_only: bool = False  # an evaluation set: only validation and test splits, never trained on; size unused


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
                           "tasks": [_hashed(t) for t in self.tasks]}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _hashed(task: SpecTask) -> dict:
    """A task's part of the spec hash. ``eval_only`` enters only when true (and then ``size``, unused, leaves),
    so every spec without evaluation sets keeps the hash it had before the field existed."""
    row = asdict(task)
    if not row.pop("eval_only"):
        return row
    del row["size"]
    return {**row, "eval_only": True}


class SpecError(BadInput):
    """A suite spec that cannot be used; the message names the file and the field."""


def load_spec(path: str | os.PathLike | None = None) -> SuiteSpec:
    """Read and validate a suite spec (default: the shipped ``specs/default.yaml``); every problem at once."""
    import yaml

    path = Path(path) if path is not None else DEFAULT_SPEC
    if not path.exists():
        raise SpecError(f"suite spec not found: {path}")
    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: {not_utf8(exc, 'spec')}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{path}: invalid YAML{at}: {getattr(exc, 'problem', exc)}") from None
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
    tasks, seen = [], {}
    for i, row in enumerate(rows):
        where = f"tasks[{i}]"
        if not isinstance(row, dict):
            problems.append(f"{where}: expected a mapping, got {row!r}")
            continue
        for key in sorted(set(row) - {"name", "skill", "template", "size", "role", "score", "eval_only"}):
            problems.append(f"{where}.{key}: unknown key (valid: name, skill, template, size, role, score, eval_only)")
        name, skill, template = row.get("name"), row.get("skill"), row.get("template")
        size, role, eval_only = row.get("size"), row.get("role", "regular"), row.get("eval_only", False)
        if not isinstance(eval_only, bool):
            problems.append(f"{where}.eval_only: expected true or false, got {eval_only!r}")
        elif eval_only and role == "noise":
            problems.append(f"{where}.eval_only: an evaluation set cannot have role 'noise' (random targets leave "
                            f"nothing to evaluate); give it another role or drop eval_only")
        try:  # a task name is a folder of the suite: the project's one rule for such names
            check_name(name, f"{where}.name")
        except BadInput as exc:
            problems.append(str(exc))
        else:
            if name.casefold() in seen:  # the same folder on a case-insensitive file system
                same = seen[name.casefold()]
                also = f" (same folder as {same!r} on a case-insensitive file system)" if same != name else ""
                problems.append(f"{where}.name: duplicate task name {name!r}{also}")
            seen.setdefault(name.casefold(), name)
        if skill not in SKILLS:
            close = difflib.get_close_matches(str(skill), list(SKILLS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(SKILLS)})"
            problems.append(f"{where}.skill: unknown skill {skill!r}{hint}")
        if not isinstance(template, str) or not _one_x(template):
            problems.append(f"{where}.template: must be a string with exactly one '{{x}}' and no other "
                            f"fields, got {template!r}")
        if size is None and eval_only is not False:  # an evaluation set has no training split: no size needed
            size = 0
        elif isinstance(size, bool) or not isinstance(size, int) or size < 1:
            problems.append(f"{where}.size: must be an integer >= 1, got {size!r}")
        if role not in ROLES:
            problems.append(f"{where}.role: must be one of {', '.join(ROLES)}, got {role!r}")
        score = row.get("score", role != "noise")
        if not isinstance(score, bool):
            problems.append(f"{where}.score: expected true or false, got {score!r}")
        sized = isinstance(size, int) and not isinstance(size, bool) and (size >= 1 or eval_only is True)
        if skill in SKILLS and sized and isinstance(eval_size, int) and not isinstance(eval_size, bool) \
                and eval_size >= 1:
            problem = _capacity_problem(name, skill, 0 if eval_only is True else size, eval_size, alphabet)
            if problem:
                problems.append(f"{where}: {problem}")
        tasks.append(SpecTask(str(name), str(skill), str(template), size if isinstance(size, int) else 0,
                              str(role), bool(score), eval_only is True))
    if problems:
        raise SpecError(f"{source}: " + (problems[0] if len(problems) == 1 else
                                         f"{len(problems)} problems: " + "; ".join(problems)))
    return SuiteSpec(tuple(tasks), alphabet, eval_size, seed, source)


def _capacity_problem(name: object, skill: str, n_train: int, eval_size: int, alphabet: str,
                      scale: float | None = None) -> str | None:
    """Why a task cannot get ``n_train + 2 * eval_size`` distinct inputs from its skill, or None when it can
    (``n_train`` 0: an eval_only task)."""
    wanted, possible = n_train + 2 * eval_size, SKILLS[skill].n_inputs(alphabet)
    if wanted <= possible:
        return None
    train = f"{n_train} training examples (size x scale {scale:g})" if scale is not None else f"size {n_train}"
    widen = "widen the alphabet or " if SKILLS[skill].n_inputs is _n_words else ""
    if n_train == 0:
        return (f"eval_only task {name!r} wants {wanted} distinct inputs (2 x eval_size {eval_size}), but skill "
                f"{skill!r} has at most {possible} with alphabet {alphabet!r}; {widen}lower eval_size")
    return (f"task {name!r} wants {wanted} distinct inputs ({train} + 2 x eval_size {eval_size}), but skill "
            f"{skill!r} has at most {possible} with alphabet {alphabet!r}; {widen}lower the size or eval_size")


def _one_x(template: str) -> bool:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError:
        return False
    return fields == ["x"]


# --------------------------------------------------------------------------------------------------
# writing a suite


def _examples(task: SpecTask, n: int, rng: random.Random, alphabet: str) -> list[dict[str, str]]:
    """``n`` examples with distinct inputs (so no example is in two splits).

    The caller has checked that the skill has ``n`` distinct inputs; the attempts are bounded all the same
    (collisions grow as ``n`` nears that number), so no spec can make this loop spin forever.
    """
    skill = SKILLS[task.skill]
    seen: set[str] = set()
    out: list[dict[str, str]] = []
    limit = 50 * n + 1000
    for _ in range(limit):
        if len(out) == n:
            break
        x = skill.make_input(rng, alphabet)
        if x in seen:
            continue
        seen.add(x)
        out.append({"prompt": task.template.format(x=x), "response": " " + skill.solve(x, rng, alphabet)})
    if len(out) < n:
        raise SpecError(f"synthetic task {task.name!r}: drew only {len(out)} distinct inputs of the {n} wanted in "
                        f"{limit} attempts (skill {task.skill!r} has at most {skill.n_inputs(alphabet)} with "
                        f"alphabet {alphabet!r}); lower its size or widen the alphabet")
    return out


MANIFEST = "suite.json"  # written last: a folder holding it (as a taskpgm-suite manifest) is one this module wrote
MANIFEST_FORMAT = "taskpgm-suite/2"


def _own_suite(path: Path) -> dict | None:
    """The manifest of a suite this module wrote at ``path``, or None."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(manifest, dict) and str(manifest.get("format", "")).startswith("taskpgm-suite/") \
        and isinstance(manifest.get("tasks"), list) and all(isinstance(t, dict) for t in manifest["tasks"])
    return manifest if ok else None


def _check_replaceable(out: Path) -> None:
    """Refuse (``BadInput`` naming ``out``) unless ``out`` is absent, an empty folder, or a suite this module
    wrote that holds nothing else: writing a suite may replace only that, and never deletes anything else."""
    if out.is_symlink():
        raise BadInput(f"{out}: is a symbolic link; give the directory itself, or a new or empty directory")
    if not out.exists():
        return
    if not out.is_dir():
        raise BadInput(f"{out}: exists and is not a directory; give a new or empty directory for the suite")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    manifest = _own_suite(out)
    if manifest is None:
        raise BadInput(f"{out}: exists, is not empty and is not a suite written by `taskpgm tasks synth` (no "
                       f"{MANIFEST} manifest); refusing to replace it: give a new or empty directory")
    ours = {MANIFEST, *map(str, manifest.get("files", [])), *(str(t.get("name")) for t in manifest["tasks"])}
    foreign = [e for e in entries if e not in ours]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise BadInput(f"{out}: holds {shown} besides the suite written there earlier; refusing to replace it: "
                       f"move those away or give a new or empty directory")


def write_suite(out_dir: str | os.PathLike, seed: int, *, scale: float = 1.0, include: list[str] | None = None,
                spec: SuiteSpec | str | os.PathLike | None = None, files: dict[str, str] | None = None) -> dict:
    """Write the suite as HF ``DatasetDict``s (train / validation / test) under ``out_dir/<task>``; an eval_only
    task gets only validation and test, and each manifest row says ``eval_only``.

    Deterministic in (spec, seed, scale, include): each task draws from its own stream, so including or
    excluding tasks never changes the others. Returns the manifest also written to ``out_dir/suite.json``.
    ``files`` are extra text files (name -> content, e.g. the spec as ``spec.yaml``) written into the suite.

    ``out_dir`` must be absent, empty, or a suite written here earlier with nothing else in it (replaced as a
    whole); anything else is refused with ``BadInput`` and left untouched. The suite is built in a hidden
    ``.<name>.incomplete-*`` sibling and swapped into place only when complete; that folder is removed on
    every exit path (an error, Ctrl-C), so a failed write leaves nothing that looks like a dataset.
    """
    import uuid

    import datasets
    from datasets import Dataset, DatasetDict

    datasets.disable_progress_bars()
    spec = spec if isinstance(spec, SuiteSpec) else load_spec(spec)
    names = [t.name for t in spec.tasks]
    unknown = sorted(set(include or []) - set(names))
    if unknown:
        raise SpecError(f"synthetic.include: unknown suite task(s) {', '.join(unknown)} (valid: {', '.join(names)})")
    files = dict(files or {})
    for fname in files:
        check_name(fname, "write_suite(files=...)")
        if fname == MANIFEST or fname in names:
            raise BadInput(f"write_suite(files=...): {fname!r} is the manifest's or a task's name")
    tasks = [t for t in spec.tasks if not include or t.name in include]
    sizes = {t.name: 0 if t.eval_only else max(8, round(t.size * scale)) for t in tasks}
    problems = [p for t in tasks if (p := _capacity_problem(t.name, t.skill, sizes[t.name], spec.eval_size,
                                                            spec.alphabet, scale))]
    if problems:  # refused up front, before anything is drawn or written
        raise SpecError(f"{spec.source or '<spec>'}: " + "; ".join(problems))
    out = Path(out_dir).absolute()
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # hidden, and named for what it is: never mistaken for a dataset, even if a crash (SIGKILL) leaves it
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.with_name(f".{out.name}.incomplete-{token}")
    tmp.mkdir()
    old: Path | None = None
    try:
        manifest = {"format": MANIFEST_FORMAT, "seed": seed, "scale": scale, "spec": spec.source,
                    "spec_hash": spec.hash, "alphabet": spec.alphabet, "files": sorted(files), "tasks": []}
        for task in tasks:
            rng = random.Random(f"{seed}/{task.name}")  # per-task stream: include/exclude never shifts others
            n_train = sizes[task.name]
            rows = _examples(task, n_train + 2 * spec.eval_size, rng, spec.alphabet)
            # an evaluation set is never trained on, so it has no train split at all
            dd = DatasetDict({
                **({} if task.eval_only else {"train": Dataset.from_list(rows[:n_train])}),
                "validation": Dataset.from_list(rows[n_train:n_train + spec.eval_size]),
                "test": Dataset.from_list(rows[n_train + spec.eval_size:]),
            })
            dd.save_to_disk(str(tmp / task.name))
            manifest["tasks"].append({**asdict(task), "sizes": {k: len(v) for k, v in dd.items()}})
        for fname, text in files.items():
            (tmp / fname).write_text(text)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _check_replaceable(out)  # again: something may have appeared there while we wrote
        if out.exists() and not any(out.iterdir()):
            out.rmdir()
        elif out.exists():  # our own earlier suite: set it aside, swap the new one in, then delete it
            old = out.with_name(f".{out.name}.replaced-{token}")
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        with _signals_held():  # a second Ctrl-C (or SIGTERM) waits until the clean-up is done
            if old is not None and not out.exists():  # the swap failed half-way: put the earlier suite back
                os.replace(old, out)
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    return manifest


@contextmanager
def _signals_held() -> Iterator[None]:
    """Defer SIGINT and SIGTERM until the block ends, then deliver them. Python-level handlers, not a signal mask:
    a mask holds one thread only, and a signal to the process may land in another (Ray's, a library's)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    pending: list[int] = []
    before = {s: signal.signal(s, lambda signum, _frame: pending.append(signum)) for s in (signal.SIGINT,
                                                                                       signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


def ensure_suite(out_dir: str | os.PathLike, seed: int, *, scale: float = 1.0, include: list[str] | None = None,
                 spec: SuiteSpec | str | os.PathLike | None = None) -> dict:
    """Write the suite unless ``out_dir`` already holds the same one; return its manifest."""
    spec = spec if isinstance(spec, SuiteSpec) else load_spec(spec)
    manifest = _own_suite(Path(out_dir))
    if manifest is not None:
        wanted = [t.name for t in spec.tasks if not include or t.name in include]
        if (manifest.get("seed"), manifest.get("scale"), manifest.get("spec_hash")) == (seed, scale, spec.hash) \
                and [t.get("name") for t in manifest["tasks"]] == wanted:
            return manifest
    return write_suite(out_dir, seed, scale=scale, include=include, spec=spec)

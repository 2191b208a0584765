"""Generated synthetic worlds: random suite specs, so that defaults are chosen on worlds nobody hand-picked.

``random_world(seed)`` draws a spec dict (format ``taskpgm-suite-spec/1``, valid for ``spec_from_dict``):

- 5 to 9 skills from ``SKILLS`` (not ``random``), each under 1 to 4 instruction templates (one task per
  template; a skill with two or more is labelled ``near_duplicate``, one with a single template ``regular``);
- 0 to 3 noise tasks (skill ``random``, ``score: false``, role ``noise``);
- each task's size log-uniform on [40, 2400] independently of how many templates its skill has; the smallest
  and largest draws are pinned to the ends, so every world spans the full 60x; a skill with few distinct
  inputs (``add``) is kept to half of them;
- if the sizes add up to more than ``TOTAL_CAP`` (about the shipped ``default.yaml``'s 10,690), all are
  scaled down together (ratios kept), so a benchmark world costs about what the shipped one does;
- an alphabet of 8 to 16 lowercase letters (kept in alphabetical order, so ``shift`` means the next letter);
- ``eval_size`` 48; ``seed`` the world's seed (the default suite seed; a command's ``--seed`` wins).

``flan_world(seed)`` draws the paper's regime instead, FLAN-like: many templated tasks, with held-out
templates for evaluation:

- 8 to 10 skills, each under 1 to 10 training templates (one task per template), redrawn until there are at
  least 40 training tasks; 1 to 4 noise tasks;
- a skill's total size log-uniform on ``FLAN_SKILL_TOTAL``, drawn independently of how many templates it has,
  then split over its templates in random (flat Dirichlet) proportions; the noise tasks share one such total
  likewise; all scaled together so the world's training total is about ``TOTAL_CAP``, each task kept within
  [``FLAN_MIN_SIZE``, half its skill's distinct inputs];
- per skill ONE more template, distinct from every other, as the ``eval_only`` task ``<skill>_heldout``: an
  evaluation set (validation and test only), never trained on; role ``near_duplicate`` (another template of a
  trained skill).

The shipped instance is ``specs/flan-like.yaml`` = ``flan_world_yaml(FLAN_SEED)``.

Templates come from a small grammar (keywords, verbs, separators, prefixes, suffixes, newlines), so two
templates of one skill differ in wording and layout. Deterministic in ``seed``: one ``random.Random(seed)``.

    from taskpgm_ray.tasks.worlds import random_world, world_yaml
    spec = spec_from_dict(random_world(3), source="random_world(3)")   # or: taskpgm tasks world 3 > w.yaml
"""

from __future__ import annotations

import json
import math
import random
import string
from pathlib import Path

from taskpgm_ray.tasks.synthetic import SKILLS, SPEC_FORMAT

SIZE_RANGE = (40, 2400)  # training examples per task before the total cap: a 60x spread
TOTAL_CAP = 10_000  # training examples of a whole world at most (default.yaml: 10,690)
EVAL_SIZE = 48
WORLD_SKILLS = tuple(s for s in SKILLS if s != "random")

# flan_world: the FLAN-like regime (many templated tasks, a held-out template per skill)
FLAN_SKILLS = (8, 10)  # skills per world, of the 10 in WORLD_SKILLS
FLAN_TEMPLATES = (1, 10)  # training templates per skill
FLAN_MIN_TASKS = 40  # training tasks per world at least (template counts are redrawn until there are)
FLAN_NOISE = (1, 4)  # noise tasks per world
FLAN_SKILL_TOTAL = (100, 5000)  # a skill's training examples, log-uniform, before scaling to TOTAL_CAP
FLAN_MIN_SIZE = 10  # training examples per task at least
FLAN_SEED = 0  # the seed of the shipped instance
FLAN_SPEC = Path(__file__).resolve().parent / "specs" / "flan-like.yaml"  # flan_world_yaml(FLAN_SEED)

# Template grammar. Words a skill's instruction may use (the first is its name), then generic parts.
KEYWORDS: dict[str, tuple[str, ...]] = {
    "copy": ("copy", "repeat", "echo", "same"),
    "reverse": ("reverse", "backwards", "mirror", "flip"),
    "sort": ("sort", "order", "alphabetize", "arrange"),
    "shift": ("shift", "next letter", "advance", "step"),
    "rotate": ("rotate", "cycle", "turn", "roll"),
    "double": ("double", "twice", "stutter", "duplicate"),
    "swap": ("swap", "exchange ends", "switch", "trade ends"),
    "length": ("length", "size", "how long", "letters in"),
    "count": ("count", "tally", "how many", "occurrences"),
    "add": ("add", "sum", "plus", "total"),
    "random": ("map", "encode", "hash", "code", "cipher", "scramble"),
}
VERBS = ("Give", "Write", "Find", "Compute", "Return", "Show", "Output", "Tell me")
LEADS = ("", "Q: ", "Task: ", "> ", "# ", "Input: ", "Please ", "Now ")
SEPS = (" =", " ->", ":", " =>", " |", " ?", " is")
FIELD_NAMES = ("in", "input", "word", "x", "text", "given", "arg")
ANSWER_NAMES = ("out", "output", "answer", "result", "A", "y")


def _template(rng: random.Random, skill: str) -> str:
    """One instruction template for ``skill``: ``{x}`` exactly once, no other braces."""
    kw = rng.choice(KEYWORDS[skill])
    sep = rng.choice(SEPS)
    layout = rng.randrange(6)
    if layout == 0:  # "reverse: {x} ="
        return f"{rng.choice(LEADS)}{kw}: {{x}}{sep}"
    if layout == 1:  # "Write the reverse of {x}:"
        return f"{rng.choice(LEADS)}{rng.choice(VERBS)} the {kw} of {{x}}{rng.choice((':', ' ->', '?', ''))}"
    if layout == 2:  # "in: {x}\nreversed:"
        return f"{rng.choice(FIELD_NAMES)}: {{x}}\n{kw}{rng.choice((':', ' =', ' ->'))}"
    if layout == 3:  # "{x} | reverse ->"
        return f"{{x}}{rng.choice((' |', ',', ' ;', ' //'))} {kw}{sep}"
    if layout == 4:  # "[reverse] {x}\nanswer:"
        return f"[{kw}] {{x}}\n{rng.choice(ANSWER_NAMES)}:"
    return f"{rng.choice(VERBS).lower()} {kw} {rng.choice(('for', 'on', 'with'))} {{x}}{sep}"  # "give sum for {x} ="


def _fresh_template(rng: random.Random, skill: str, used: set[str], fallback: str) -> str:
    """A template for ``skill`` not in ``used`` (then added to it): a template names one task of a world."""
    for _ in range(100):
        template = _template(rng, skill)
        if template not in used:
            break
    else:  # practically unreachable (thousands of phrasings); still distinct and valid
        template = fallback
    used.add(template)
    return template


def _max_size(skill: str, alphabet: str) -> int:
    """Largest training size that keeps a task to half its skill's distinct inputs (a quick, reliable draw)."""
    return SKILLS[skill].n_inputs(alphabet) // 2 - 2 * EVAL_SIZE


def random_world(seed: int) -> dict:
    """A random suite spec dict (``taskpgm-suite-spec/1``), deterministic in ``seed``; see the module docstring."""
    rng = random.Random(seed)
    alphabet = "".join(sorted(rng.sample(string.ascii_lowercase, rng.randint(8, 16))))
    skills = rng.sample(WORLD_SKILLS, rng.randint(5, 9))
    rows: list[dict] = []
    for skill in skills:
        n = rng.randint(1, 4)
        role = "near_duplicate" if n >= 2 else "regular"
        rows += [{"name": f"{skill}_{k}", "skill": skill, "role": role} for k in range(1, n + 1)]
    rows += [{"name": f"noise_{k}", "skill": "random", "role": "noise", "score": False}
             for k in range(1, rng.randint(0, 3) + 1)]
    used: set[str] = set()
    for row in rows:  # distinct templates across the world: a template names one task
        row["template"] = _fresh_template(rng, row["skill"], used, f"{row['name']}: {{x}} =")

    lo, hi = SIZE_RANGE
    caps = [min(hi, _max_size(r["skill"], alphabet)) for r in rows]
    sizes = [math.exp(rng.uniform(math.log(lo), math.log(cap))) for cap in caps]
    # Pin the extremes so each world spans the whole range: the smallest draw to lo, the largest draw among
    # the tasks allowed to reach hi to hi.
    small = min(range(len(rows)), key=sizes.__getitem__)
    big = max((i for i in range(len(rows)) if caps[i] >= hi and i != small), key=sizes.__getitem__)
    sizes[small], sizes[big] = lo, hi
    factor = min(1.0, TOTAL_CAP / sum(sizes))  # one factor for all: the ratios, and so the spread, are kept
    for row, size in zip(rows, sizes):
        row["size"] = max(1, round(size * factor))

    rng.shuffle(rows)  # no planted structure in the order of the tasks
    keys = ("name", "skill", "template", "size", "role", "score")
    tasks = [{k: r[k] for k in keys if k in r} for r in rows]
    return {"format": SPEC_FORMAT, "alphabet": alphabet, "eval_size": EVAL_SIZE, "seed": seed, "tasks": tasks}


def flan_world(seed: int) -> dict:
    """A FLAN-like suite spec dict (``taskpgm-suite-spec/1``): many templated tasks and one held-out template per
    skill as an ``eval_only`` task; deterministic in ``seed``. See the module docstring."""
    rng = random.Random(seed)
    alphabet = "".join(sorted(rng.sample(string.ascii_lowercase, rng.randint(8, 16))))
    skills = rng.sample(WORLD_SKILLS, rng.randint(*FLAN_SKILLS))
    while True:  # redrawn as a whole, so each count stays uniform on FLAN_TEMPLATES given enough tasks
        counts = [rng.randint(*FLAN_TEMPLATES) for _ in skills]
        if sum(counts) >= FLAN_MIN_TASKS:
            break
    n_noise = rng.randint(*FLAN_NOISE)
    lo, hi = FLAN_SKILL_TOTAL
    totals = [math.exp(rng.uniform(math.log(lo), math.log(hi))) for _ in range(len(skills) + 1)]  # + noise's
    factor = TOTAL_CAP / sum(totals)  # one factor for all: the ratios between skills are kept

    rows: list[dict] = []
    for skill, n, total in zip([*skills, "random"], [*counts, n_noise], totals):
        shares = [rng.expovariate(1.0) for _ in range(n)]  # flat Dirichlet proportions over the templates
        cap = _max_size(skill, alphabet)
        sizes = [min(cap, max(FLAN_MIN_SIZE, round(total * factor * share / sum(shares)))) for share in shares]
        if skill == "random":  # the noise tasks share one total, like one more skill's templates
            rows += [{"name": f"noise_{k}", "skill": skill, "role": "noise", "score": False, "size": size}
                     for k, size in enumerate(sizes, 1)]
        else:
            role = "near_duplicate" if n >= 2 else "regular"
            rows += [{"name": f"{skill}_{k}", "skill": skill, "role": role, "size": size}
                     for k, size in enumerate(sizes, 1)]
    heldout = [{"name": f"{skill}_heldout", "skill": skill, "role": "near_duplicate", "eval_only": True}
               for skill in skills]
    used: set[str] = set()
    for row in rows + heldout:  # distinct across the world: a held-out template is none of the training ones
        row["template"] = _fresh_template(rng, row["skill"], used, f"{row['name']}: {{x}} =")

    rng.shuffle(rows)  # no planted structure in the order of the training tasks; the evaluation sets follow
    keys = ("name", "skill", "template", "size", "role", "score", "eval_only")
    tasks = [{k: r[k] for k in keys if k in r} for r in rows + heldout]
    return {"format": SPEC_FORMAT, "alphabet": alphabet, "eval_size": EVAL_SIZE, "seed": seed, "tasks": tasks}


def _spec_yaml(world: dict, header: list[str]) -> str:
    """A world dict as a YAML spec file laid out like ``specs/default.yaml`` (one task a line) under ``header``
    (comment lines); the eval_only tasks, if any, under a comment of their own."""

    def scalar(key: str, value: object) -> str:  # templates as JSON strings: valid YAML, newlines as \n
        return json.dumps(value) if key == "template" else str(value).lower() if isinstance(value, bool) else str(value)

    lines = [*header, *(f"{k}: {world[k]}" for k in ("format", "alphabet", "eval_size", "seed")), "tasks:"]
    for i, row in enumerate(world["tasks"]):
        if row.get("eval_only") and not any(r.get("eval_only") for r in world["tasks"][:i]):
            lines.append("  # held-out templates: evaluation sets (eval_only), never trained on")
        lines.append("  - {" + ", ".join(f"{k}: {scalar(k, v)}" for k, v in row.items()) + "}")
    return "\n".join(lines) + "\n"


def world_yaml(seed: int) -> str:
    """``random_world(seed)`` as a YAML spec file laid out like ``specs/default.yaml`` (one task a line), with a
    header saying where it came from."""
    return _spec_yaml(random_world(seed), [
        f"# A generated synthetic world: taskpgm_ray.tasks.worlds.random_world({seed}).",
        f"#   taskpgm tasks world {seed} > world.yaml    # this file",
        f"#   taskpgm tasks synth --out DIR --random-world {seed}"])


def flan_world_yaml(seed: int) -> str:
    """``flan_world(seed)`` as a YAML spec file (one task a line), with a header saying which seed and command
    produce it and what it holds."""
    world = flan_world(seed)
    train = [t for t in world["tasks"] if not t.get("eval_only")]
    skills = {t["skill"] for t in train} - {"random"}
    sizes = [t["size"] for t in train]
    n_noise = sum(t["skill"] == "random" for t in train)
    return _spec_yaml(world, [
        f"# A generated FLAN-like synthetic world: taskpgm_ray.tasks.worlds.flan_world({seed}), seed {seed}; "
        "this file:",
        f"#   python -c \"from taskpgm_ray.tasks.worlds import flan_world_yaml; print(flan_world_yaml({seed}), "
        f"end='')\" > FILE",
        f"# {len(train) - n_noise} training tasks over {len(skills)} skills (1-10 instruction templates each) and "
        f"{n_noise} noise task(s): {min(sizes)} to {max(sizes)}",
        f"# examples a task, {sum(sizes)} in all at scale 1; and one held-out template per skill: "
        f"{len(world['tasks']) - len(train)} eval_only tasks",
        f"# (validation and test only, {world['eval_size']} examples each), never trained on.",
        "#   taskpgm tasks synth --out DIR --spec FILE"])

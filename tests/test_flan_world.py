"""The FLAN-like regime (issue 22): many templated tasks, a held-out template per skill as an ``eval_only`` task."""

from __future__ import annotations

import json
import string

import datasets
import numpy as np
import pytest
import yaml

from taskpgm_ray.tasks.synthetic import (
    DEFAULT_SPEC,
    SKILLS,
    SPEC_FORMAT,
    SpecError,
    load_spec,
    spec_from_dict,
    write_suite,
)
from taskpgm_ray.tasks.worlds import (
    FLAN_MIN_SIZE,
    FLAN_SEED,
    FLAN_SPEC,
    TOTAL_CAP,
    WORLD_SKILLS,
    flan_world,
    flan_world_yaml,
    random_world,
)

SEEDS = range(60)


@pytest.fixture(scope="module")
def worlds() -> dict[int, dict]:
    return {seed: flan_world(seed) for seed in SEEDS}


def _split(world: dict) -> tuple[list[dict], list[dict]]:
    """(training tasks, eval_only tasks) of a world."""
    return ([t for t in world["tasks"] if not t.get("eval_only")], [t for t in world["tasks"] if t.get("eval_only")])


# --- flan_world --------------------------------------------------------------------------------------------------


def test_deterministic_in_the_seed_and_nothing_else():
    import random

    a = flan_world(5)
    random.seed(123)  # the global RNG plays no part
    random.random()
    assert flan_world(5) == a and flan_world_yaml(5) == flan_world_yaml(5)
    assert flan_world(6) != a


def test_counts_hold_for_every_seed(worlds):
    for seed, world in worlds.items():
        train, held = _split(world)
        noise = [t for t in train if t["skill"] == "random"]
        skilled = [t for t in train if t["skill"] != "random"]
        skills = {t["skill"] for t in skilled}
        assert len(skilled) >= 40 and len(skills) >= 8 and skills <= set(WORLD_SKILLS), seed
        for skill in skills:
            mine = [t for t in skilled if t["skill"] == skill]
            assert 1 <= len(mine) <= 10, (seed, skill)
            assert {t["role"] for t in mine} == {"near_duplicate" if len(mine) >= 2 else "regular"}
            assert all(t.get("score", True) for t in mine)
        # one held-out template per trained skill, and nothing else is eval_only
        assert sorted(t["skill"] for t in held) == sorted(skills), seed
        assert all(t["name"] == f"{t['skill']}_heldout" and "size" not in t and t["role"] != "noise" for t in held)
        assert 1 <= len(noise) <= 4 and all(t["role"] == "noise" and t["score"] is False for t in noise), seed
        names = [t["name"] for t in world["tasks"]]
        assert len(set(names)) == len(names)
        alphabet = world["alphabet"]
        assert 8 <= len(alphabet) <= 16 and list(alphabet) == sorted(set(alphabet))
        assert set(alphabet) <= set(string.ascii_lowercase) and world["eval_size"] == 48


def test_templates_distinct_and_the_heldout_one_is_new(worlds):
    for seed, world in worlds.items():
        train, held = _split(world)
        templates = [t["template"] for t in world["tasks"]]
        assert len(set(templates)) == len(templates), seed
        for t in templates:
            assert t.count("{x}") == 1 and "{" not in t.replace("{x}", "") and "}" not in t.replace("{x}", "")
        for h in held:
            assert h["template"] not in {t["template"] for t in train if t["skill"] == h["skill"]}


def test_sizes_total_and_capacity(worlds):
    totals = []
    for seed, world in worlds.items():
        train, _ = _split(world)
        assert all(isinstance(t["size"], int) and t["size"] >= FLAN_MIN_SIZE for t in train), seed
        for t in train:  # at most half a skill's distinct inputs, counting the 2 x eval_size held for evaluation
            assert t["size"] + 2 * world["eval_size"] <= SKILLS[t["skill"]].n_inputs(world["alphabet"]) // 2
        totals.append(sum(t["size"] for t in train))
    assert 0.75 * TOTAL_CAP < min(totals) and max(totals) < 1.05 * TOTAL_CAP  # about the shipped default's


def test_template_count_and_skill_size_are_independent(worlds):
    # How many templates a skill has and its total size are drawn independently: no strong correlation, and
    # every count from 1 to 10 occurs.
    pairs = []
    for world in worlds.values():
        train, _ = _split(world)
        for skill in {t["skill"] for t in train} - {"random"}:
            mine = [t["size"] for t in train if t["skill"] == skill]
            pairs.append((len(mine), np.log(sum(mine))))
    assert {n for n, _ in pairs} == set(range(1, 11))
    assert abs(np.corrcoef(np.array(pairs).T)[0, 1]) < 0.2


def test_every_world_validates_and_round_trips(worlds, tmp_path):
    for seed, world in worlds.items():
        spec = spec_from_dict(world, source=f"flan_world({seed})")
        assert world["format"] == SPEC_FORMAT and spec.seed == seed
        assert [t.eval_only for t in spec.tasks] == [bool(t.get("eval_only")) for t in world["tasks"]]
        assert all(t.size == 0 for t in spec.tasks if t.eval_only)
        path = tmp_path / f"f{seed}.yaml"
        path.write_text(flan_world_yaml(seed))
        assert yaml.safe_load(path.read_text()) == world
        assert load_spec(path) == spec  # the YAML file a person sees is the same world


def test_shipped_flan_like_yaml_is_the_generators_output():
    text = FLAN_SPEC.read_text()
    assert text == flan_world_yaml(FLAN_SEED), "regenerate it: see the command in its header"
    assert text.startswith(f"# A generated FLAN-like synthetic world: taskpgm_ray.tasks.worlds.flan_world({FLAN_SEED})")
    assert f"print(flan_world_yaml({FLAN_SEED}), end='')" in text.splitlines()[1]
    spec = load_spec(FLAN_SPEC)
    assert sum(t.eval_only for t in spec.tasks) >= 8 and sum(not t.eval_only for t in spec.tasks) >= 40


# --- the eval_only field -----------------------------------------------------------------------------------------

BASE = {"format": SPEC_FORMAT, "alphabet": "mnopqrst", "eval_size": 8, "tasks": [
    {"name": "s1", "skill": "sort", "template": "order {x} ->", "size": 40},
    {"name": "junk", "skill": "random", "template": "??? {x}", "size": 30, "role": "noise"},
    {"name": "s_held", "skill": "sort", "template": "{x} sorted is", "eval_only": True},
]}


def _with(i: int, **row) -> dict:
    tasks = [dict(t) for t in BASE["tasks"]]
    tasks[i].update(row)
    return {**BASE, "tasks": [{k: v for k, v in t.items() if v is not None} for t in tasks]}


@pytest.mark.parametrize("data, message", [
    (_with(2, eval_only="yes"), "tasks[2].eval_only: expected true or false, got 'yes'"),
    (_with(2, eval_only=1), "tasks[2].eval_only: expected true or false, got 1"),
    (_with(1, eval_only=True), "tasks[1].eval_only: an evaluation set cannot have role 'noise'"),
    (_with(2, eval_only=False), "tasks[2].size: must be an integer >= 1, got None"),  # size needed to train on
    (_with(2, size=-3), "tasks[2].size: must be an integer >= 1, got -3"),  # optional, but valid when given
    ({**_with(2, skill="add"), "eval_size": 1300},
     "tasks[2]: eval_only task 's_held' wants 2600 distinct inputs (2 x eval_size 1300), but skill 'add' has at "
     "most 2500 with alphabet 'mnopqrst'; lower eval_size"),
    (_with(0, evalonly=True), "tasks[0].evalonly: unknown key (valid: name, skill, template, size, role, score, "
                              "eval_only)"),
])
def test_bad_eval_only_names_the_field(data, message):
    with pytest.raises(SpecError) as info:
        spec_from_dict(data, source="s.yaml")
    assert str(info.value).startswith(f"s.yaml: {message}")


def test_eval_only_defaults_and_size_is_optional():
    spec = spec_from_dict(BASE)
    assert [(t.name, t.eval_only, t.size) for t in spec.tasks] == [("s1", False, 40), ("junk", False, 30),
                                                                    ("s_held", True, 0)]
    assert spec.tasks[2].role == "regular" and spec.tasks[2].score is True


def test_spec_hash_of_existing_specs_is_unchanged():
    # Computed by the code at HEAD e169171, before eval_only existed:
    #   .venv/bin/python -c "from taskpgm_ray.tasks.synthetic import load_spec, spec_from_dict;
    #     from taskpgm_ray.tasks.worlds import random_world;
    #     print(load_spec().hash, spec_from_dict(random_world(3)).hash)"
    assert load_spec(DEFAULT_SPEC).hash == "9fc91653f98f48bd"
    assert spec_from_dict(random_world(3)).hash == "af4fc3f7481785e1"
    # an explicit `eval_only: false` is the same spec as none; `true` is another; an eval_only task's size is unused
    plain = {**BASE, "tasks": BASE["tasks"][:2]}
    explicit = {**BASE, "tasks": [{**t, "eval_only": False} for t in BASE["tasks"][:2]]}
    assert spec_from_dict(plain).hash == spec_from_dict(explicit).hash
    assert spec_from_dict(BASE).hash != spec_from_dict(_with(2, eval_only=None, size=5)).hash
    assert spec_from_dict(_with(2, size=77)).hash == spec_from_dict(BASE).hash


# --- write_suite -------------------------------------------------------------------------------------------------


def test_write_suite_of_a_flan_world(tmp_path):
    world = flan_world(1)
    spec = spec_from_dict(world, source="flan_world(1)")
    manifest = write_suite(tmp_path / "suite", 3, scale=0.05, spec=spec)
    on_disk = json.loads((tmp_path / "suite" / "suite.json").read_text())
    assert on_disk == manifest
    rows = {r["name"]: r for r in manifest["tasks"]}
    assert list(rows) == [t["name"] for t in world["tasks"]]
    for task in world["tasks"]:
        row = rows[task["name"]]
        assert row["eval_only"] is bool(task.get("eval_only"))  # on every row, true or false
        dd = datasets.load_from_disk(str(tmp_path / "suite" / task["name"]))
        if row["eval_only"]:
            assert sorted(dd) == ["test", "validation"] and row["sizes"] == {"validation": 48, "test": 48}
        else:
            assert sorted(dd) == ["test", "train", "validation"]
            assert row["sizes"] == {"train": max(8, round(task["size"] * 0.05)), "validation": 48, "test": 48}
    # a held-out task: its own template, its skill's answers, inputs distinct across validation and test
    held = next(t for t in world["tasks"] if t.get("eval_only"))
    dd = datasets.load_from_disk(str(tmp_path / "suite" / held["name"]))
    before, after = held["template"].split("{x}")
    xs = []
    for ex in [*dd["validation"], *dd["test"]]:
        assert ex["prompt"].startswith(before) and ex["prompt"].endswith(after)
        x = ex["prompt"][len(before):len(ex["prompt"]) - len(after)]
        assert ex["response"] == " " + SKILLS[held["skill"]].solve(x, None, world["alphabet"])
        xs.append(x)
    assert len(set(xs)) == len(xs) == 96


def test_a_spec_without_eval_only_says_false_on_every_manifest_row(tmp_path):
    spec = spec_from_dict({**BASE, "tasks": BASE["tasks"][:2]})
    manifest = write_suite(tmp_path / "s", 1, spec=spec)
    assert [r["eval_only"] for r in manifest["tasks"]] == [False, False]
    assert all(sorted(datasets.load_from_disk(str(tmp_path / "s" / n))) == ["test", "train", "validation"]
               for n in ("s1", "junk"))

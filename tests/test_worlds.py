"""Generated synthetic worlds (issue 21 item 3): valid, varied, deterministic, about the shipped world's cost."""

from __future__ import annotations

import json
import string

import pytest
import yaml

from taskpgm_ray.tasks.synthetic import SKILLS, SPEC_FORMAT, load_spec, spec_from_dict
from taskpgm_ray.tasks.worlds import SIZE_RANGE, TOTAL_CAP, random_world, world_yaml

SEEDS = range(51)


@pytest.fixture(scope="module")
def worlds() -> dict[int, dict]:
    return {seed: random_world(seed) for seed in SEEDS}


def test_deterministic_in_the_seed_and_nothing_else():
    import random

    a = random_world(5)
    random.seed(123)  # the global RNG plays no part
    random.random()
    assert random_world(5) == a and world_yaml(5) == world_yaml(5)
    assert random_world(6) != a


def test_every_world_is_a_valid_spec_and_round_trips(worlds, tmp_path):
    for seed, world in worlds.items():
        spec = spec_from_dict(world, source=f"random_world({seed})")
        assert world["format"] == SPEC_FORMAT and spec.eval_size == 48 and spec.seed == seed
        path = tmp_path / f"w{seed}.yaml"
        path.write_text(world_yaml(seed))
        assert yaml.safe_load(path.read_text()) == world
        assert load_spec(path) == spec  # the YAML file a person sees is the same world


def test_world_structure(worlds):
    for seed, world in worlds.items():
        tasks = world["tasks"]
        names = [t["name"] for t in tasks]
        assert len(set(names)) == len(names), seed
        assert all(t["name"] == f"{t['skill']}_{t['name'].rsplit('_', 1)[1]}" or t["name"].startswith("noise_")
                   for t in tasks)
        skills = {t["skill"] for t in tasks} - {"random"}
        assert 5 <= len(skills) <= 9 and skills <= set(SKILLS)
        for skill in skills:
            mine = [t for t in tasks if t["skill"] == skill]
            assert 1 <= len(mine) <= 4
            assert {t["role"] for t in mine} == {"near_duplicate" if len(mine) >= 2 else "regular"}
            assert all(t.get("score", True) for t in mine)
        noise = [t for t in tasks if t["skill"] == "random"]
        assert len(noise) <= 3 and all(t["role"] == "noise" and t["score"] is False for t in noise)
        alphabet = world["alphabet"]
        assert 8 <= len(alphabet) <= 16 and set(alphabet) <= set(string.ascii_lowercase)
        assert list(alphabet) == sorted(set(alphabet))  # shift's "next letter" stays the alphabet's


def test_templates_are_varied_and_well_formed(worlds):
    every = []
    for world in worlds.values():
        templates = [t["template"] for t in world["tasks"]]
        assert len(set(templates)) == len(templates)
        for t in templates:
            assert t.count("{x}") == 1 and t.replace("{x}", "").count("{") == 0 and "}" not in t.replace("{x}", "")
        every += templates
    assert len(set(every)) > 0.8 * len(every)  # a grammar, not a short list
    assert any("\n" in t for t in every) and any(t.startswith("{x}") for t in every)


def test_sizes_span_the_range_and_the_total_is_capped(worlds):
    lo, hi = SIZE_RANGE
    assert hi / lo >= 30
    for seed, world in worlds.items():
        sizes = [t["size"] for t in world["tasks"]]
        assert all(isinstance(s, int) and 1 <= s <= hi for s in sizes)
        assert max(sizes) / min(sizes) >= 30, seed
        assert sum(sizes) <= TOTAL_CAP + len(sizes)  # rounding aside
        for t in world["tasks"]:  # at most half of a skill's distinct inputs: drawing stays quick
            assert t["size"] + 2 * world["eval_size"] <= SKILLS[t["skill"]].n_inputs(world["alphabet"]) // 2
    totals = [sum(t["size"] for t in w["tasks"]) for w in worlds.values()]
    assert min(totals) > 0.3 * TOTAL_CAP  # comparable to the shipped world's ~10,700


def test_template_count_does_not_decide_sizes(worlds):
    import numpy as np

    # A skill's number of templates and its tasks' sizes are drawn independently: no strong correlation.
    pairs = [(sum(u["skill"] == t["skill"] for u in w["tasks"]), np.log(t["size"]))
             for w in worlds.values() for t in w["tasks"] if t["skill"] != "random"]
    r = np.corrcoef(np.array(pairs).T)[0, 1]
    assert abs(r) < 0.3


def test_cli_random_world_writes_the_suite_and_its_spec(tmp_path, capsys):
    import datasets

    from taskpgm_ray.cli import main

    assert main(["tasks", "world", "4"]) == 0
    assert capsys.readouterr().out == world_yaml(4)
    out = tmp_path / "w"
    assert main(["tasks", "synth", "--out", str(out), "--random-world", "4", "--scale", "0.05"]) == 0
    manifest = json.loads((out / "suite.json").read_text())
    world = random_world(4)
    assert manifest["seed"] == 4 and manifest["files"] == ["spec.yaml"]
    assert [t["name"] for t in manifest["tasks"]] == [t["name"] for t in world["tasks"]]
    assert (out / "spec.yaml").read_text() == world_yaml(4)
    first = world["tasks"][0]
    dd = datasets.load_from_disk(str(out / first["name"]))
    assert len(dd["validation"]) == 48 and len(dd["train"]) == max(8, round(first["size"] * 0.05))
    # its own earlier suite (spec.yaml included) is replaced whole; --seed wins over the world's seed
    assert main(["tasks", "synth", "--out", str(out), "--random-world", "4", "--scale", "0.05", "--seed", "9"]) == 0
    assert json.loads((out / "suite.json").read_text())["seed"] == 9
    capsys.readouterr()
    assert main(["tasks", "synth", "--out", str(out), "--random-world", "4", "--spec", str(out / "spec.yaml")]) == 2
    assert "give --spec or --random-world, not both" in capsys.readouterr().err


def test_cli_flan_world_prints_its_spec_and_synth_lists_its_evaluation_sets(tmp_path, capsys):
    from taskpgm_ray.cli import main
    from taskpgm_ray.tasks.worlds import flan_world_yaml

    assert main(["tasks", "world", "--flan", "1"]) == 0
    assert capsys.readouterr().out == flan_world_yaml(1)
    spec = tmp_path / "flan.yaml"
    spec.write_text(flan_world_yaml(1))
    assert main(["tasks", "synth", "--out", str(tmp_path / "s"), "--spec", str(spec), "--scale", "0.05"]) == 0
    lines = capsys.readouterr().out.splitlines()
    held = [line for line in lines if "eval_only" in line]
    assert held and all("_heldout" in line and "validation=48 test=48" in line for line in held)

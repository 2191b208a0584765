"""Each stage's key holds exactly the settings the stage reads: flip one setting, see which stages re-run.

No Ray and no training: the keys are computed from the config, the generated suite and the small JSON
artefacts the later keys read (the mixtures estimate, Tune and select write). Every field of the energy and
estimation sections is flipped (a field added later too), with the stages expected per section.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing

import pytest

from taskpgm_ray.config import ConfigError, EnergyConfig, EstimationConfig, load_config
from taskpgm_ray.pipeline import Pipeline

ALL = {"tasks", "probes", "estimate", "tune", "select", "train"}
MODEL = {"probes", "estimate", "tune", "train"}  # test mode has no proxy_model: the target is the proxies' base

# (setting, new value, the stages whose key must change; every other stage's key must not)
FLIPS = [
    ("synthetic.seed", 8, ALL - {"select"}),  # the mixture files below are fixed, so select cannot see it
    ("splits.max_probe", 10, ALL - {"select"}),
    ("model.max_length", 40, MODEL),
    ("probes.lr", 2e-3, {"probes", "estimate", "tune"}),
    ("probes.num_cpus", 0.5, set()),
    ("probes.max_retries", 5, set()),
    ("proxy_model.max_length", 40, {"probes", "estimate", "tune"}),  # a proxy model of its own: not the target's
    ("tune.num_samples", 3, {"tune"}),
    ("tune.max_concurrent", 1, set()),
    ("tune.enabled", False, {"select"}),
    ("train.lr", 1e-3, {"tune", "train"}),
    ("train.eval_every", 30, {"train"}),  # the final fine-tune's alone: trials evaluate on their own schedule
    ("train.steps", 100, {"estimate", "tune", "train"}),  # the repetition caps follow the final budget
    ("train.repetition_cap", 4, {"estimate", "tune", "train"}),
    ("train.weight_unit", "tokens", {"estimate", "tune", "train"}),  # estimate/mixture.json records the unit
    ("train.cpus_per_worker", 0.5, set()),
    ("train.max_failures", 0, set()),
]


def _keys(tmp_path, overrides: dict) -> dict[str, str]:
    cfg = load_config(test_mode=True, overrides={"output_dir": str(tmp_path / "run"), **overrides})
    out = tmp_path / "run"
    for rel, w in (("estimate/mixture.json", 0.3), ("tune/best.json", 0.1), ("mixture.json", 0.2)):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        weights = {"reverse_a": w, "reverse_b": 1 - w}  # select hashes the file, train its weights
        (out / rel).write_text(json.dumps({"weights": weights}))
    p = Pipeline(cfg)
    return {"tasks": p.manifest_key(), "probes": p.probes_key(), "estimate": p.estimate_key(), "tune": p.tune_key(),
            "select": p.select_key(), "train": p.train_key()}


@pytest.fixture(scope="module")
def base_keys(tmp_path_factory):
    return _keys(tmp_path_factory.mktemp("base"), {})


@pytest.mark.parametrize("setting, value, changed", FLIPS, ids=[f[0] for f in FLIPS])
def test_flipping_a_setting_reruns_exactly_the_stages_that_read_it(tmp_path, base_keys, setting, value, changed):
    keys = _keys(tmp_path, {setting: value})
    rerun = {stage for stage in ALL if keys[stage] != base_keys[stage]}
    assert rerun == changed, f"{setting}: re-runs {sorted(rerun)}, expected {sorted(changed)}"


def test_the_same_config_in_another_directory_gives_the_same_keys(tmp_path, base_keys):
    assert _keys(tmp_path, {}) == base_keys


def test_an_evaluation_set_reruns_what_scores_and_not_the_proxies(tmp_path, base_keys):
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) + "\n" for i in range(8)))
    keys = _keys(tmp_path, {"evaluation": [{"name": "held", "source": "jsonl", "path": str(held)}]})
    assert {stage for stage in ALL if keys[stage] != base_keys[stage]} == {"tasks", "tune", "train"}
    held.write_text("".join(json.dumps({"prompt": f"p{i}", "response": f"s{i}"}) + "\n" for i in range(8)))
    again = _keys(tmp_path, {"evaluation": [{"name": "held", "source": "jsonl", "path": str(held)}]})
    assert {stage for stage in ALL if again[stage] != keys[stage]} == {"tasks", "tune", "train"}  # its content


# -- every field of the energy and estimation sections -------------------------------------------------------------

TUNE_SEARCHED = {"beta", "affinity", "kernel", "tau", "budget"}  # Tune's own values reach the trials, never these
ESTIMATION_RESOURCES = {"num_actors", "num_gpus_per_actor", "num_cpus_per_actor", "max_actor_restarts"}
SECTIONS = {"energy": EnergyConfig, "estimation": EstimationConfig}
COMPANIONS = {"estimation.active": {"estimation.jsd": False}}  # what a field needs beside it to be flipped at all


def expected_stages(section: str, name: str) -> set[str]:
    """The stages a flip of ``section.name`` re-runs in test mode (plain estimation: every probe shard scored)."""
    if section == "energy":  # the estimate stage solves the config's energy; Tune's trials the rest of it
        return {"estimate"} if name in TUNE_SEARCHED else {"estimate", "tune"}
    return set() if name in ESTIMATION_RESOURCES else {"estimate", "tune"}  # the sums every trial solves from


def _other_values(value, tp) -> list:
    """Values of type ``tp`` other than ``value``, plausible ones first (the loader decides which are valid)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        out = [None] if value is not None and type(None) in args else []
        return out + [v for a in args if a is not type(None) for v in _other_values(value, a)]
    if origin is typing.Literal:
        return [a for a in typing.get_args(tp) if a != value]
    if tp is bool:
        return [not value]
    if tp is int:
        return [2, 3] if value is None else [value + 1, value * 2, value - 1]
    if tp is float:
        return [0.1, 0.5] if value is None else [value * 2 or 0.5, value / 2]
    if tp is str:
        return ["x"] if value is None else [value + "x"]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return [{}] if value is None else [None]
    return []


def _flip(section: str, name: str, base: dict):
    """A value of ``section.name`` other than its value in test mode with ``base`` that the loader accepts."""
    cls = SECTIONS[section]
    value = getattr(getattr(load_config(test_mode=True, overrides=base), section), name)
    for other in _other_values(value, typing.get_type_hints(cls)[name]):
        try:
            load_config(test_mode=True, overrides={**base, f"{section}.{name}": other})
        except ConfigError:
            continue
        return other
    pytest.fail(f"{section}.{name}: no other valid value found for {value!r}; add one to _other_values")


FIELDS = [(section, f.name) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("section, name", FIELDS, ids=[f"{s}.{n}" for s, n in FIELDS])
def test_every_energy_and_estimation_field_is_in_the_keys_of_the_stages_that_read_it(tmp_path, base_keys,
                                                                                      section, name):
    base = COMPANIONS.get(f"{section}.{name}", {})
    value = _flip(section, name, base)
    if base:
        rerun = _rerun(tmp_path, base, f"{section}.{name}", value)
    else:
        keys = _keys(tmp_path, {f"{section}.{name}": value})
        rerun = {stage for stage in ALL if keys[stage] != base_keys[stage]}
    expected = expected_stages(section, name)
    assert rerun == expected, f"{section}.{name} = {value!r}: re-runs {sorted(rerun)}, expected {sorted(expected)}"


# -- settings that matter only with others: (base overrides, flipped setting, value, the stages it re-runs) --------

ACTIVE = {"estimation.jsd": False, "estimation.active": True}
PAIRS = [
    # the energy settings Tune searches only when their list is given
    ({"tune.unaries": ["information", "representativeness"]}, "energy.unary", "representativeness", {"estimate"}),
    ({"tune.prior_strengths": [0.1, 0.3]}, "energy.prior_strength", 0.6, {"estimate"}),
    (ACTIVE, "estimation.active_tol", 0.05, {"estimate", "tune"}),
    (ACTIVE, "estimation.num_actors", 1, {"estimate", "tune"}),  # a round asks for at least two units per actor
    # scoring that stops on the mixture: the sums Tune reads depend on every setting of that solve
    (ACTIVE, "energy.beta", 3.0, {"estimate", "tune"}),
    ({"estimation.stop_when_stable": {}}, "energy.kernel", "psd", {"estimate", "tune"}),
    # a proxy model of its own: the target model reaches Tune's trials and the final fine-tune, not the proxies
    ({"proxy_model": {"max_length": 48}}, "model.max_length", 40, {"tune", "train"}),
]


def _rerun(tmp_path, base: dict, setting: str, value) -> set[str]:
    before, after = _keys(tmp_path / "base", base), _keys(tmp_path / "flip", {**base, setting: value})
    return {stage for stage in ALL if before[stage] != after[stage]}


@pytest.mark.parametrize("base, setting, value, changed", PAIRS,
                         ids=[f"{p[1]}-with-{'-'.join(p[0])}" for p in PAIRS])
def test_settings_that_matter_with_others_are_keyed_with_them(tmp_path, base, setting, value, changed):
    rerun = _rerun(tmp_path, base, setting, value)
    assert rerun == changed, f"{setting} (with {base}): re-runs {sorted(rerun)}, expected {sorted(changed)}"


# -- tasks[*].score and tasks[*].utility: tasks from files (the synthetic suite's tasks carry no utility) ----------


def _file_tasks(tmp_path, unary: str) -> dict:
    tasks = []
    for i, name in enumerate(("alpha", "beta")):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": f"{name} {k}:", "response": f" {k * (i + 2)}"}) + "\n"
                                for k in range(40)))
        tasks.append({"name": name, "source": "jsonl", "path": str(path), "utility": float(i + 1)})
    return {"synthetic": None, "tasks": tasks, "energy.unary": unary, "train.repetition_cap": None}


TASK_FLIPS = [
    ("utility", "tasks.0.utility", 5.0, {"estimate", "tune"}),  # the unary term of every solve
    ("information", "tasks.0.utility", 5.0, set()),  # no unary reads it
    ("information", "tasks.0.score", False, {"tune", "train"}),  # Tune's metric; the summary's scored means
]


@pytest.mark.parametrize("unary, setting, value, changed", TASK_FLIPS, ids=[f"{f[1]}-{f[0]}" for f in TASK_FLIPS])
def test_task_scores_and_utilities_are_keyed_where_they_are_read(tmp_path, unary, setting, value, changed):
    rerun = _rerun(tmp_path, _file_tasks(tmp_path, unary), setting, value)
    assert rerun == changed, f"{setting} (unary {unary}): re-runs {sorted(rerun)}, expected {sorted(changed)}"


def test_tune_sees_the_utilities_when_it_searches_the_utility_unary(tmp_path):
    base = {**_file_tasks(tmp_path, "information"), "tune.unaries": ["information", "utility"]}
    assert _rerun(tmp_path, base, "tasks.1.utility", 0.5) == {"tune"}


def test_the_select_key_follows_the_whole_mixture_file_not_only_its_weights(tmp_path):
    cfg = load_config(test_mode=True, overrides={"output_dir": str(tmp_path / "run"), "tune.enabled": False})
    path = tmp_path / "run" / "estimate" / "mixture.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"weights": {"a": 1.0}, "weight_unit": "examples"}))
    before = Pipeline(cfg).select_key()
    path.write_text(json.dumps({"weights": {"a": 1.0}, "weight_unit": "tokens"}))
    assert Pipeline(cfg).select_key() != before


def test_the_report_key_follows_the_compare_results(tmp_path):
    cfg = load_config(test_mode=True, overrides={"output_dir": str(tmp_path / "run")})
    before = Pipeline(cfg).report_key()
    (tmp_path / "run" / "compare").mkdir(parents=True)
    (tmp_path / "run" / "compare" / "results.json").write_text("{}")
    assert Pipeline(cfg).report_key() != before

"""Each stage's key holds exactly the settings the stage reads: flip one setting, see which stages re-run.

No Ray and no training: the keys are computed from the config, the generated suite and the small JSON
artefacts the later keys read (the mixtures estimate, Tune and select write).
"""

from __future__ import annotations

import json

import pytest

from taskpgm_ray.config import load_config
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
    ("estimation.shard_size", 6, {"estimate", "tune"}),
    ("estimation.num_actors", 1, set()),
    ("energy.beta", 3.0, {"estimate"}),  # Tune searches beta: its own value never reaches a trial
    ("energy.prior", "none", {"estimate", "tune"}),
    ("energy.floor", 0.1, {"estimate", "tune"}),
    ("tune.num_samples", 3, {"tune"}),
    ("tune.max_concurrent", 1, set()),
    ("tune.enabled", False, {"select"}),
    ("train.lr", 1e-3, {"tune", "train"}),
    ("train.eval_every", 30, {"train"}),  # the final fine-tune's alone: trials evaluate on their own schedule
    ("train.steps", 100, {"estimate", "tune", "train"}),  # the repetition caps follow the final budget
    ("train.repetition_cap", 4, {"estimate", "tune", "train"}),
    ("train.cpus_per_worker", 0.5, set()),
    ("train.max_failures", 0, set()),
]


def _keys(tmp_path, overrides: dict) -> dict[str, str]:
    cfg = load_config(test_mode=True, overrides={"output_dir": str(tmp_path / "run"), **overrides})
    out = tmp_path / "run"
    for rel, w in (("estimate/mixture.json", 0.3), ("tune/best.json", 0.1), ("mixture.json", 0.2)):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        weights = {"reverse_a": w, "reverse_b": 1 - w}  # only the weights are read by the keys
        (out / rel).write_text(json.dumps({"weights": weights}))
    p = Pipeline(cfg)
    return {"tasks": p.tasks_key(), "probes": p.probes_key(), "estimate": p.estimate_key(), "tune": p.tune_key(),
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

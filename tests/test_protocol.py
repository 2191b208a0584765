"""One protocol for every method: the same caps and floor for every mixture trained, the same search budget."""

from __future__ import annotations

import numpy as np
import pytest

from taskpgm_ray.config import config_from_dict
from taskpgm_ray.mixture import baseline_weights, within_bounds


def test_within_bounds_is_the_identity_on_a_feasible_mixture():
    w = np.array([0.5, 0.3, 0.15, 0.05])
    assert np.array_equal(within_bounds(w, 0.05, 0.6), w / w.sum())


def test_within_bounds_meets_the_bounds_and_keeps_the_free_tasks_proportions():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 12))
        w = rng.dirichlet(np.full(n, 0.3))
        lo = np.full(n, rng.uniform(0, 0.9) / n)
        hi = np.maximum(rng.uniform(0.05, 1.0, n), lo)
        if hi.sum() < 1:
            hi = hi / hi.sum()
        p = within_bounds(w, lo, hi)
        assert abs(p.sum() - 1) < 1e-9 and np.all(p >= lo - 1e-9) and np.all(p <= hi + 1e-9)
        free = (p > lo + 1e-9) & (p < hi - 1e-9) & (w > 0)
        if free.sum() >= 2:  # tasks strictly inside their bounds keep their ratios to each other
            ratio = p[free] / w[free]
            assert np.allclose(ratio, ratio[0], rtol=1e-6)


def test_within_bounds_refuses_bounds_no_mixture_meets():
    with pytest.raises(ValueError, match="no mixture meets these bounds"):
        within_bounds([0.5, 0.5], 0.6, 1.0)
    with pytest.raises(ValueError, match="upper bounds of the tasks with positive weight"):
        within_bounds([1.0, 0.0], 0.0, [0.5, 1.0])


def _cfg(**tune):
    return config_from_dict({"synthetic": {"seed": 0, "scale": 0.25, "include": ["copy", "noise_a", "sort", "add"]},
                             "tune": tune, "train": {"steps": 400, "micro_batch_size": 4, "num_workers": 1,
                                                     "repetition_cap": 4}}, source="<test>")


def test_temperature_gets_as_many_candidates_as_taskpgm():
    from taskpgm_ray.tune import search_space, taskpgm_trials, temperature_candidates

    for k in (1, 3, 6):
        cfg = _cfg(num_samples=k)
        temps = temperature_candidates(cfg)
        assert len(temps) == taskpgm_trials(cfg) == k and len(set(temps)) == k
        lo, hi = cfg.tune.temperature_range
        assert all(lo < t < hi for t in temps)
        _, points = search_space(cfg)
        assert sorted(p["kind"] for p in points) == ["size", *["temperature"] * k, "uniform"]
    assert temperature_candidates(_cfg(num_samples=4, temperatures=[2.0])) == [2.0]  # a user's list is kept
    grid = _cfg(num_samples=2, search="grid", affinities=["pmi"], kernels=["clip", "exp"])
    assert len(temperature_candidates(grid)) == 4


def test_a_baseline_trial_trains_within_the_same_caps_and_floor_as_taskpgm():
    from taskpgm_ray.distributed.solve import fine_tune_bounds
    from taskpgm_ray.tasks import load_tasks
    from taskpgm_ray.tune import trial_weights

    cfg = _cfg(num_samples=1)
    tasks = load_tasks(cfg)
    lo, hi = fine_tune_bounds(cfg, tasks)
    sizes = [len(t.train) for t in tasks]
    assert hi is not None and np.any(baseline_weights("uniform", sizes) > hi)  # the caps bind for uniform
    assert np.any(baseline_weights("size", sizes) < lo)  # and the floor for size sampling
    for kind, T in (("uniform", None), ("size", None), ("temperature", 3.0)):
        w, desc = trial_weights({"kind": kind, "temperature": T}, {}, cfg, tasks)
        p = np.array([w[t.name] for t in tasks])
        assert desc["method"] == kind and abs(p.sum() - 1) < 1e-9
        assert np.all(p >= lo - 1e-12) and np.all(p <= hi + 1e-12), (kind, p, lo, hi)

"""The mixture sampler (pure numpy): determinism, disjoint ranks, epochs, units, the cap, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from taskpgm_ray.train.sampler import BLOCK, MixtureSampler, SamplerExhausted, draw_probabilities

NAMES = ["a", "b", "c", "d"]
SIZES = [50, 7, 300, 20]
WEIGHTS = [0.4, 0.1, 0.3, 0.2]


def make(**kw) -> MixtureSampler:
    args = {"names": NAMES, "sizes": SIZES, "weights": WEIGHTS, "seed": 3} | kw
    return MixtureSampler(args.pop("names"), args.pop("sizes"), args.pop("weights"), **args)


def pairs(tasks: np.ndarray, examples: np.ndarray) -> list[tuple[int, int]]:
    return list(zip(tasks.tolist(), examples.tolist()))


def test_deterministic_for_a_seed_and_independent_of_call_sizes():
    one = make().draw(5000)
    chunks = make()
    parts = [chunks.draw(n) for n in (1, 16, 999, 3984)]
    assert pairs(*one) == [p for part in parts for p in pairs(*part)]
    assert pairs(*make(seed=4).draw(200)) != pairs(*one)[:200]


def test_counts_follow_the_mixture_chi_square():
    s = make(seed=11)
    tasks, _ = s.draw(20000)
    observed = np.bincount(tasks, minlength=len(NAMES))
    assert s.samples_per_task() == dict(zip(NAMES, observed.tolist()))
    p_value = stats.chisquare(observed, np.array(WEIGHTS) * len(tasks)).pvalue
    assert p_value > 1e-3, (observed, p_value)


def test_ranks_are_disjoint_and_their_union_is_the_single_stream():
    world, n_global, steps = 3, 12, 40
    single = make()
    expected = pairs(*single.draw(n_global * steps))
    ranks = [make() for _ in range(world)]
    got: dict[int, tuple[int, int]] = {}
    for _ in range(steps):
        for r, s in enumerate(ranks):
            start = s.draws
            t, e = s.draw_rank(n_global, r, world)
            for j, p in enumerate(pairs(t, e)):
                got[start + r + j * world] = p  # draw g goes to rank g % world
    assert [got[g] for g in range(len(expected))] == expected


def test_without_replacement_within_an_epoch_then_reshuffled():
    s = MixtureSampler(["x", "y"], [13, 5], [0.5, 0.5], seed=0)
    tasks, examples = s.draw(400)
    seq = examples[tasks == 1]  # task y: consecutive blocks of 5 are permutations of range(5)
    epochs = [seq[i: i + 5] for i in range(0, len(seq) - len(seq) % 5, 5)]
    assert all(sorted(ep.tolist()) == list(range(5)) for ep in epochs)
    assert len({tuple(ep) for ep in epochs}) > 1  # a new permutation each epoch


def test_tokens_unit_matches_the_token_share():
    mean_tokens = np.array([10.0, 40.0, 5.0, 20.0])
    p = draw_probabilities(WEIGHTS, mean_tokens, "tokens")
    np.testing.assert_allclose(p * mean_tokens / (p * mean_tokens).sum(), WEIGHTS)
    s = make(unit="tokens", mean_tokens=mean_tokens, seed=5)
    tasks, _ = s.draw(50000)
    token_share = np.bincount(tasks, minlength=4) * mean_tokens
    np.testing.assert_allclose(token_share / token_share.sum(), WEIGHTS, atol=0.01)
    assert "weights count tokens" in s.describe()
    np.testing.assert_allclose(draw_probabilities(WEIGHTS, None, "examples"), WEIGHTS)


def test_repetition_cap_removes_a_task_and_renormalises():
    s = make(repetition_cap=2.0)
    tasks, _ = s.draw(600)  # capacity: 2 x 377 = 754
    counts = np.bincount(tasks, minlength=4)
    removed = [NAMES.index(n) for n in s.removed_tasks()]
    assert 1 in removed and len(s.events) == len(removed) and "reached the repetition cap" in s.events[0]
    for t in range(4):
        assert counts[t] == 2 * SIZES[t] if t in removed else counts[t] < 2 * SIZES[t]
    after = tasks[np.flatnonzero(tasks == 1)[-1] + 1:]
    assert not np.any(after == 1) and np.any(after == 2)  # b is never drawn again
    with pytest.raises(SamplerExhausted, match="repetition cap"):
        make(repetition_cap=1.0).draw(sum(SIZES) + 1)
    t, _ = make(repetition_cap=1.0).draw(sum(SIZES))  # exactly one epoch of everything fits
    assert np.bincount(t, minlength=4).tolist() == SIZES


def test_after_a_cap_removal_the_rest_keep_their_original_proportions():
    # x reaches its cap (5 draws) within the first few dozen draws; y and z (10^4 examples each) never do
    s = MixtureSampler(["x", "y", "z"], [5, 10_000, 10_000], [0.5, 0.3, 0.2], seed=2, repetition_cap=1.0)
    tasks, _ = s.draw(6000)
    assert s.removed_tasks() == ["x"]
    after = tasks[np.flatnonzero(tasks == 0)[-1] + 1:]
    observed = np.bincount(after, minlength=3)
    assert observed[0] == 0 and len(after) > 5000
    p_value = stats.chisquare(observed[1:], np.array([0.6, 0.4]) * len(after)).pvalue  # 0.3 : 0.2, renormalised
    assert p_value > 1e-3, (observed, p_value)
    # the test can fail: x's mass given to y alone (0.8 : 0.2) is rejected by the same statistic
    assert stats.chisquare(observed[1:], np.array([0.8, 0.2]) * len(after)).pvalue < 1e-3


def test_state_round_trip_continues_exactly():
    for kw, n_head, n_tail in (({}, BLOCK - 17, 3017), ({"repetition_cap": 3.0}, 60, 1000)):
        full = pairs(*make(**kw).draw(n_head + n_tail))
        first = make(**kw)
        head = pairs(*first.draw(n_head))  # stop inside a block / before the cap events
        state = json.loads(json.dumps(first.state_dict()))  # JSON-safe
        resumed = make(**kw)
        resumed.load_state_dict(state)
        assert head + pairs(*resumed.draw(n_tail)) == full
    with pytest.raises(ValueError, match="different mixture"):
        make(seed=9).load_state_dict(state)


def test_zero_weight_tasks_are_never_drawn_and_empty_positive_tasks_are_rejected():
    tasks, _ = MixtureSampler(["x", "y"], [4, 0], [1.0, 0.0], seed=0).draw(100)
    assert set(tasks.tolist()) == {0}
    with pytest.raises(ValueError, match="'y' has a positive weight but no training examples"):
        MixtureSampler(["x", "y"], [4, 0], [0.5, 0.5], seed=0)


def test_draws_per_second():
    import time

    s = MixtureSampler([f"t{i}" for i in range(50)], list(range(10, 60)), np.full(50, 0.02), seed=0)
    t0 = time.perf_counter()
    n = len(s.draw(1_000_000)[0])
    rate = n / (time.perf_counter() - t0)
    assert rate > 2e5, rate  # the benchmark targets >= 1e6/s; keep slack for loaded CI machines

"""The central optimiser and solve_from_sums without Ray or models: synthetic streams of shard sums."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from taskpgm_ray.config import PAPER_ENERGY, EnergyConfig, StableConfig
from taskpgm_ray.distributed.optimizer import MixtureOptimizer, ShardSums
from taskpgm_ray.distributed.solve import affinity_from_sums, solve_from_sums
from taskpgm_ray.mixture import energy_matrix, jsd_similarity, minimize_energy, pmi_affinity

N, SHARDS_PER_TASK, SHARD = 4, 10, 8
RULE = StableConfig(tol=0.01, patience=3, min_fraction=0.2)


def mean_loglik(seed=0):
    """A planted L: two near-duplicate tasks (0, 1), two distinct ones."""
    rng = np.random.default_rng(seed)
    L = -3.0 - rng.uniform(0, 0.5, (N, N))
    L[[0, 1], [1, 0]] = -3.1
    np.fill_diagonal(L, -2.0)
    return L


def info_sums(info):
    """Signal sums whose information unary is ``info / max(info)`` (one example per task, each with the bound
    ``max(info)``; no base sums)."""
    info = np.asarray(info, float)
    return {"information_sum": info, "base_information_sum": np.zeros(len(info)),
            "information_count": np.ones(len(info)),
            "information_sq_sum": info**2, "information_bound_sum": np.full(len(info), max(float(info.max()), 1e-9)),
            "information_tokens": np.ones(len(info))}


def stream(drift: float, seed=0):
    """Round-robin shards; each shard's per-example mean is L plus noise (stable) or plus a growing
    swing whose sign alternates (drift > 0: the running mean keeps moving)."""
    L, rng = mean_loglik(seed), np.random.default_rng(seed + 1)
    for r in range(SHARDS_PER_TASK):
        for j in range(N):
            means = L[:, j] + 0.001 * rng.standard_normal(N) + drift * (r + 1) * (-1) ** r * rng.uniform(0.5, 1, N)
            yield ShardSums(j, means * SHARD, SHARD)


def run(drift, stop=RULE):
    opt = MixtureOptimizer(N, N * SHARDS_PER_TASK, EnergyConfig(**PAPER_ENERGY), stop)
    first_stable = None
    for k, s in enumerate(stream(drift), start=1):
        status = opt.add(s)
        if status["stable"] and first_stable is None:
            first_stable = k
    return opt, first_stable


def test_stops_on_a_stable_stream_only_after_every_column_and_patience():
    opt, first = run(drift=0.0)
    assert first is not None
    # every column filled after N shards, then `patience` small changes, and at least min_fraction
    assert first >= max(N + RULE.patience, int(np.ceil(RULE.min_fraction * N * SHARDS_PER_TASK)))
    assert first <= 0.3 * N * SHARDS_PER_TASK
    traj = opt.trajectory()
    assert traj[0]["shards"] == N and traj[0]["l1_change"] is None
    assert all(abs(sum(t["weights"]) - 1) < 1e-9 for t in traj)


def test_does_not_stop_on_a_drifting_stream():
    opt, first = run(drift=0.5)
    assert first is None
    changes = [t["l1_change"] for t in opt.trajectory()[1:]]
    assert np.median(changes) > RULE.tol


def test_no_rule_never_stops_and_bootstrap_bands_bracket_the_estimate():
    opt, first = run(drift=0.0, stop=None)
    assert first is None and opt.fraction() == 1.0
    bands = opt.bootstrap(40, seed=0)
    w = np.array(opt.status()["weights"])
    lo, hi = np.array(bands["low"]), np.array(bands["high"])
    assert np.all(lo <= hi) and np.all(lo - 1e-6 <= w) and np.all(w <= hi + 1e-6)
    assert bands["unit"] == "shard within task" and bands["resamples"] == 40


def test_solve_from_sums_is_the_mixture_pipeline_on_means():
    L = mean_loglik()
    count = np.array([5, 6, 7, 8])
    e = EnergyConfig(beta=2.0, lam=1.0, **PAPER_ENERGY)
    w, sol, S = solve_from_sums(L * count, count, None, None, e)
    S_ref = energy_matrix(pmi_affinity(L), "psd", tau=e.tau, eps=e.eps)
    np.testing.assert_allclose(S, S_ref)
    np.testing.assert_allclose(w, minimize_energy(S_ref, beta=2.0, lam=1.0).weights, atol=1e-12)
    assert sol.kkt_residual < 1e-8

    jsd = np.full((N, N), 0.3)
    np.fill_diagonal(jsd, 0.0)
    A = affinity_from_sums(L, count, jsd * 100, 100, "jsd")
    np.testing.assert_allclose(A, jsd_similarity(jsd, "linear"))
    wj, _, _ = solve_from_sums(L, count, jsd * 100, 100, dataclasses.replace(e, affinity="jsd", kernel="exp"))
    assert abs(wj.sum() - 1) < 1e-9

    wb, solb, _ = solve_from_sums(L * count, count, None, None, dataclasses.replace(e, budget=2))
    assert np.count_nonzero(wb) <= 2 and abs(wb.sum() - 1) < 1e-9 and len(solb.extra["selected"]) == 2


def test_solve_from_sums_errors_name_the_problem():
    L, count = mean_loglik(), np.array([5, 0, 7, 8])
    with pytest.raises(ValueError, match=r"no probe examples scored for task column\(s\) \[1\]"):
        solve_from_sums(L, count, None, None, EnergyConfig())
    with pytest.raises(ValueError, match="needs JSD sums"):
        solve_from_sums(L, np.ones(N), None, None, EnergyConfig(affinity="jsd"))
    with pytest.raises(ValueError, match=r"needs a `utility` for every task; missing for task index\(es\) \[2\]"):
        solve_from_sums(L, np.ones(N), None, None, EnergyConfig(unary="utility", prior="none"),
                        utilities=[1.0, 0.5, None, 0.2])
    with pytest.raises(ValueError, match="unary 'information' needs each task's information"):
        solve_from_sums(L, np.ones(N), None, None, EnergyConfig())
    with pytest.raises(ValueError, match="prior 'temperature' needs the tasks' training sizes"):
        solve_from_sums(L, np.ones(N), None, None, EnergyConfig(), signal=info_sums(np.ones(N)))


def test_default_energy_is_the_documented_algorithm_box():
    """Normalised clipped PMI kernel, information unary, chi-square pull towards temperature sampling."""
    from taskpgm_ray.mixture import baseline_weights, eig_clip

    L, count, sizes = mean_loglik(), np.array([5, 6, 7, 8]), np.array([800, 800, 50, 3000])
    info = np.array([4.0, 3.0, 0.1, 6.0])
    e = EnergyConfig()
    w, sol, K = solve_from_sums(L * count[None, :], count, None, None, e, signal=info_sums(info), sizes=sizes)
    K_ref = eig_clip(pmi_affinity(L), e.eps)
    K_ref /= np.mean(np.diag(K_ref))
    np.testing.assert_allclose(K, K_ref, atol=1e-12)
    q = baseline_weights("temperature", sizes, temperature=e.prior_temperature)
    ref = minimize_energy(e.lam * K_ref + e.prior_strength * np.diag(1 / q), beta=e.beta, lam=1.0,
                          unary=info / info.max(), min_weight=e.floor / N)
    assert w.min() >= e.floor / N - 1e-12  # the floor: no task left out
    np.testing.assert_allclose(w, ref.weights, atol=1e-10)
    # a very strong prior is the prior itself; no prior and no pairwise term concentrates on the largest unary
    strong, _, _ = solve_from_sums(L * count[None, :], count, None, None,
                                   dataclasses.replace(e, prior_strength=1e6), signal=info_sums(info), sizes=sizes)
    np.testing.assert_allclose(strong, q, atol=1e-4)
    greedy, _, _ = solve_from_sums(L * count[None, :], count, None, None,
                                   dataclasses.replace(e, prior="none", lam=0.0, floor=0.0), signal=info_sums(info),
                                   sizes=sizes)
    assert np.argmax(greedy) == 3 and greedy[3] > 0.99


def test_the_output_only_switch_gives_such_a_task_only_the_floor_and_is_off_by_default():
    """Task 3 is the largest and its proxy learned its answers (NLL 6 -> 2) but no input dependence. Noise looks
    like that, and so does a skill beyond the proxy, so by default no rule acts on it: it keeps its prior share's
    pull. With ``prior_skip_output_only`` the prior's baseline gives it only the floor (the others share the
    rest in proportion), also when repetition caps push mass away from the others."""
    from taskpgm_ray.mixture import baseline_weights

    L, count, sizes = mean_loglik(), np.array([5, 6, 7, 8]), np.array([800, 800, 50, 3000])
    signal = {**info_sums([4.0, 3.0, 0.5, 0.0]), "base_loglik_sum": -6.0 * count}
    default, _, _ = solve_from_sums(L * count[None, :], count, None, None, EnergyConfig(), signal=signal,
                                    sizes=sizes)
    e = dataclasses.replace(EnergyConfig(), prior_skip_output_only=True)
    assert not EnergyConfig().prior_skip_output_only
    w, sol, K = solve_from_sums(L * count[None, :], count, None, None, e, signal=signal, sizes=sizes)
    q = baseline_weights("temperature", sizes, temperature=e.prior_temperature)
    lo = e.floor / N
    q_ref = np.append(q[:3] * (1 - lo) / q[:3].sum(), lo)
    np.testing.assert_allclose(sol.extra["q"], q_ref, atol=1e-12)
    ref = minimize_energy(e.lam * K + e.prior_strength * np.diag(1 / q_ref), beta=e.beta, lam=1.0,
                          unary=np.array([4.0, 3.0, 0.5, 0.0]) / 4.0, min_weight=lo)
    np.testing.assert_allclose(w, ref.weights, atol=1e-10)
    assert w[3] < 1.01 * lo
    caps = np.array([0.3, 0.3, 1.0, 1.0])  # the two informative tasks capped: the rest must go somewhere
    capped, _, _ = solve_from_sums(L * count[None, :], count, None, None, e, signal=signal, sizes=sizes,
                                   max_weights=caps)
    assert capped[3] < capped[2] and capped[3] < 0.2, capped
    kept, _, _ = solve_from_sums(L * count[None, :], count, None, None,
                                 dataclasses.replace(e, prior_skip_output_only=False), signal=signal, sizes=sizes)
    assert kept[3] > 2 * lo  # without the switch its 3,000 examples earn it a share
    # without a floor, the baseline gives it 0: the chi-square term holds it at 0
    bare, _, _ = solve_from_sums(L * count[None, :], count, None, None, dataclasses.replace(e, floor=0.0),
                                 signal=signal, sizes=sizes)
    assert bare[3] == 0.0 and abs(bare.sum() - 1) < 1e-9
    # a proxy that learned nothing (NLL unchanged) is no evidence of noise: the prior keeps it
    unlearned = {**signal, "base_loglik_sum": L[3, 3] * count}
    same, _, _ = solve_from_sums(L * count[None, :], count, None, None, e, signal=unlearned, sizes=sizes)
    np.testing.assert_allclose(same, kept, atol=1e-12)
    np.testing.assert_allclose(default, kept, atol=1e-12)  # the default: no rule reads the flag


def test_a_solve_that_did_not_converge_is_never_a_silent_mixture():
    L, count, sizes = mean_loglik(), np.array([5, 6, 7, 8]), np.array([800, 800, 50, 3000])
    info = np.array([4.0, 3.0, 0.1, 6.0])
    slow = dataclasses.replace(EnergyConfig(), method="first_order")
    import taskpgm_ray.mixture.taskpgm as box

    real = box.minimize_energy
    try:  # the solver's iteration limit hit: an error naming the residual, not a mixture.json
        box.minimize_energy = lambda *a, **k: real(*a, **{**k, "max_iter": 1})
        with pytest.raises(ValueError, match=r"solver 'first_order' did not reach the minimiser \(KKT residual"):
            solve_from_sums(L * count[None, :], count, None, None, slow, signal=info_sums(info), sizes=sizes)
    finally:
        box.minimize_energy = real
    with pytest.warns(UserWarning, match="closed_form is the paper's projection"):
        solve_from_sums(L * count[None, :], count, None, None,
                        dataclasses.replace(slow, method="closed_form", floor=0.0, prior="none"),
                        signal=info_sums(info), sizes=sizes)


def test_default_energy_no_rule_starves_a_skill_the_proxy_could_not_learn_and_noise_gets_no_more_than_its_prior():
    """Tasks 0 and 1 are learned skills (a long answer and a one-token label: both near log K, whatever the
    length); task 2 is a real skill beyond the proxy and task 3 noise: the proxy shows neither any information,
    so their unary is the same (0) and no rule reads the output-only flag by default (the solve is the one
    without it). Noise gets no more than its prior share. What the soft unary still does to task 2 (beta 1 puts
    it near the floor here) is Tune's to weigh on validation, against the temperature trials."""
    from taskpgm_ray.mixture import baseline_weights

    L, count, sizes = mean_loglik(), np.full(N, 16), np.array([800, 800, 400, 400])
    K = np.log(4)
    signal = {"base_loglik_sum": -6.0 * count, "information_sum": np.array([0.98, 0.95, 0.0, 0.0]) * K * count,
              "base_information_sum": np.zeros(N), "information_count": count,
              "information_sq_sum": np.array([0.98, 0.95, 0.01, 0.01]) ** 2 * K**2 * count,
              "information_bound_sum": K * count, "information_tokens": np.array([20, 1, 3, 5]) * count}
    e = EnergyConfig()
    w, sol, _ = solve_from_sums(L * count[None, :], count, None, None, e, signal=signal, sizes=sizes)
    q = baseline_weights("temperature", sizes, temperature=e.prior_temperature)
    np.testing.assert_allclose(sol.extra["u"], [1.0, 0.95 / 0.98, 0.0, 0.0])  # answer length does not decide
    flagged = {**signal, "information_sum": signal["information_sum"] * 1.0}
    assert output_only_flags(flagged, L, count)[2:].tolist() == [True, True]  # the diagnostic sees both
    unflagged = {k: v for k, v in signal.items() if k != "base_loglik_sum"}  # no flag can be computed
    w_ref, _, _ = solve_from_sums(L * count[None, :], count, None, None, e, signal=unflagged, sizes=sizes)
    np.testing.assert_array_equal(w, w_ref)  # so no rule acted on it
    assert w[3] <= q[3] + 1e-12 and w.min() >= e.floor / N - 1e-12


def output_only_flags(signal, L, count):
    from taskpgm_ray.mixture.signal import output_only

    return output_only(signal, np.diag(L) * count, count)

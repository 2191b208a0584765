"""Signal checks (taskpgm_ray.mixture.signal): gains, input-output information and the affinity's SNR."""

from __future__ import annotations

import numpy as np
import pytest

from taskpgm_ray.mixture import eig_clip, energy_matrix, minimize_energy, pmi_affinity
from taskpgm_ray.mixture.signal import (
    affinity_snr,
    info_nce,
    information_unary,
    input_information,
    output_only,
    proxy_gains,
)


def test_gain_and_its_interval_separate_a_learned_proxy_from_an_unlearned_one():
    rng = np.random.default_rng(0)
    base = -20 + rng.normal(0, 2, 40)
    learned = base + 8 + rng.normal(0, 1, 40)     # 40% better, consistently
    unlearned = base + rng.normal(0, 1, 40)       # the same as the base
    g = proxy_gains([learned, unlearned], [base, base], n_boot=300, seed=1)
    assert g[0].gain == pytest.approx(1 - (-learned.mean()) / (-base.mean()))
    assert 0.3 < g[0].low <= g[0].gain <= g[0].high
    assert g[1].low < 0 < g[1].high
    assert g[0].examples == 40


def test_information_is_bounded_by_log_k_zero_for_noise_and_blind_to_answer_length():
    """The rotated-pair statistic summed log-likelihood gaps over answer tokens: a 20-token answer scored 60 nats,
    a 1-token class label 3, though no mutual information here exceeds log K. The bounded estimate gives both
    skills nearly all of log K, noise about 0, and never more than log K."""
    rng = np.random.default_rng(0)
    K, m = 4, 64
    gap_long, gap_short = 60.0, 3.0  # own prompt vs another's: summed over 20 tokens / for 1 token
    long_skill = np.vstack([np.full(m, -2.0), np.full((K - 1, m), -2.0 - gap_long)])
    short_skill = np.vstack([np.full(m, -0.1), np.full((K - 1, m), -0.1 - gap_short)])
    noise = -12 + rng.normal(0, 0.3, (K, m))
    for scores in (long_skill, short_skill, noise, rng.normal(-5, 10, (K, m))):
        assert np.all(info_nce(scores) <= np.log(K) + 1e-12)
    i_long, i_short, i_noise = (info_nce(x).mean() for x in (long_skill, short_skill, noise))
    assert i_long == pytest.approx(np.log(K), abs=1e-9)
    assert i_short / np.log(K) > 0.85 and i_long / i_short < 1.15  # the old statistic: 20x apart
    assert abs(i_noise) < 0.1 * np.log(K)
    # a 4-class answer whose label other prompts share half the time: information, but less than log K
    shared = np.vstack([np.full(m, -0.1), np.where(rng.random((K - 1, m)) < 0.5, -0.1, -6.0)])
    assert 0.1 * np.log(K) < info_nce(shared).mean() < 0.8 * np.log(K)
    # by hand, one example: log q(y|x) - log mean_r q(y|x_r)
    col = np.array([[-1.0], [-2.0], [-3.0]])
    assert info_nce(col)[0] == pytest.approx(-1.0 - np.log(np.mean(np.exp([-1.0, -2.0, -3.0]))))


def test_information_unary_is_the_fraction_of_the_bound():
    sums = {"information_sum": np.array([10 * np.log(4), 5.0, -3.0]),
            "information_bound_sum": np.full(3, 10 * np.log(4)),
            "information_count": np.array([10, 10, 10])}
    u = information_unary(sums)
    assert u[0] == pytest.approx(1.0) and u[1] == pytest.approx(5 / (10 * np.log(4))) and u[2] == 0.0
    assert information_unary({**sums, "information_count": np.array([10, 0, 10])}) is None
    assert information_unary({k: v for k, v in sums.items() if k != "information_bound_sum"}) is None


def test_input_information_reports_the_estimate_its_interval_bound_and_per_token_value():
    rng = np.random.default_rng(1)
    own = np.log(4) - np.abs(rng.normal(0, 0.2, 40))
    base = rng.normal(0, 0.1, 40)
    (info,) = input_information([own], [base], [np.full(40, np.log(4))], [np.full(40, 5.0)], n_boot=300)
    assert info.proxy == pytest.approx(own.mean()) and info.base == pytest.approx(base.mean())
    assert info.low <= info.proxy <= info.high <= np.log(4)
    assert info.bound == pytest.approx(np.log(4)) and info.per_token == pytest.approx(own.sum() / 200)


def test_output_only_flags_learned_answers_that_ignore_the_prompt_and_nothing_else():
    """Answers learned, no input dependence: flagged (noise, or a skill beyond the proxy: it cannot tell them
    apart, which is why no rule acts on it by default). A real skill with a small, noisy probe set, and a proxy
    that learned nothing (no evidence either way) are not."""
    rng = np.random.default_rng(0)
    m, K = 16, 4
    base = -30 + rng.normal(0, 1, (4, m))
    own = np.stack([base[0] + 18,                  # answers' statistics learned (60% gain), no dependence
                    base[1] + 15,                  # skill, small and noisy probe set
                    base[2] + rng.normal(0, 1, m),  # unlearned proxy: the base's NLL
                    base[3] + 20])                 # a clean skill
    info_own = np.stack([rng.normal(0, 0.3, m), np.clip(0.8 + rng.normal(0, 0.8, m), None, np.log(K)),
                         rng.normal(0, 0.3, m), np.full(m, np.log(K) - 0.01)])
    sums = {"base_loglik_sum": base.sum(1), "information_sum": info_own.sum(1), "base_information_sum": np.zeros(4),
            "information_count": np.full(4, m), "information_sq_sum": (info_own**2).sum(1),
            "information_bound_sum": np.full(4, m * np.log(K))}
    assert output_only(sums, own.sum(1), np.full(4, m)).tolist() == [True, False, False, False]
    assert output_only({k: v for k, v in sums.items() if k != "base_loglik_sum"}, own.sum(1), np.full(4, m)) is None


def test_a_one_example_task_has_no_information_estimate():
    (info,) = input_information([np.array([-1.0])], [np.array([-2.0])], [np.array([1.0])], [np.array([3.0])])
    assert info.examples == 0 and np.isnan(info.gain)


def _per_example(L, m, noise, rng):
    return [L[:, j][:, None] + rng.normal(0, noise, (L.shape[0], m)) for j in range(L.shape[1])]


def test_snr_is_high_for_planted_clusters_and_low_for_pure_noise():
    rng = np.random.default_rng(0)
    n, m = 6, 24
    L = np.full((n, n), -10.0)
    for block in ((0, 1, 2), (3, 4, 5)):
        for i in block:
            for j in block:
                L[i, j] = -3.0
    clustered = affinity_snr(_per_example(L, m, 1.0, rng), n_boot=200)
    assert clustered.snr > 5
    assert all(clustered.nearest[i] in (0, 1, 2) for i in (0, 1, 2))
    assert np.allclose(clustered.affinity, pmi_affinity(np.stack([c.mean(1) for c in _per_example(
        L, m, 1.0, np.random.default_rng(0))], 1)))
    flat = affinity_snr(_per_example(np.full((n, n), -10.0), m, 1.0, rng), n_boot=200)
    assert flat.snr < 2
    assert min(flat.nearest_stability) < 0.9


@pytest.mark.parametrize("bad, message", [
    ([np.zeros((2, 3))], "affinity_snr needs at least 2 tasks, got 1"),
    ([np.zeros((2, 3)), np.zeros((3, 3))], r"per_example\[1\] must have shape \(2, m>=1\), got \(3, 3\)"),
    ([np.zeros((2, 3)), np.full((2, 3), np.nan)], r"per_example\[1\] contains NaN or inf"),
])
def test_snr_bad_input(bad, message):
    with pytest.raises(ValueError, match=message):
        affinity_snr(bad)


def test_gain_bad_input():
    with pytest.raises(ValueError, match=r"task 0: own and base must be 1-d arrays of the same length"):
        proxy_gains([np.zeros(3)], [np.zeros(4)])


def _is_nearest_psd(K: np.ndarray, S: np.ndarray, tol: float = 1e-8) -> bool:
    """Whether K is the Frobenius-nearest PSD matrix to the symmetric S: the projection onto the PSD cone, which is
    self-dual, so K is PSD, K - S is PSD and <K, K - S> = 0 (the optimality conditions; Higham 1988)."""
    scale = max(1.0, np.linalg.norm(S))
    return bool(np.linalg.eigvalsh(K).min() >= -tol * scale and np.linalg.eigvalsh(K - S).min() >= -tol * scale
                and abs(np.sum(K * (K - S))) <= tol * scale**2)


def test_eig_clip_is_the_nearest_psd_matrix_and_keeps_structure_the_shift_flattens():
    import scipy.linalg

    from taskpgm_ray.mixture import psd_shift

    rng = np.random.default_rng(0)
    L = rng.normal(-10, 3, (8, 8))
    S = pmi_affinity(L)
    K = eig_clip(S)
    assert np.allclose(K, K.T)
    assert _is_nearest_psd(K, S)
    # the paper's diagonal shift is PSD as well, but not the nearest: the check tells the two apart
    assert np.linalg.eigvalsh(S).min() < -1.0 and not _is_nearest_psd(psd_shift(S), S)
    assert np.linalg.norm(K - S) < np.linalg.norm(psd_shift(S) - S)
    # an independent route to the same matrix: (S + |S|) / 2, |S| = (S^2)^(1/2) the polar decomposition's factor
    assert np.allclose(K, (S + np.real(scipy.linalg.sqrtm(S @ S))) / 2, atol=1e-8 * np.linalg.norm(S))
    # and PSD matrices around K in every direction (its square root perturbed) are all farther from S
    vals, vecs = np.linalg.eigh(S)
    R = vecs * np.sqrt(np.maximum(vals, 0.0))  # R R^T = K
    for _ in range(20):
        C = R + 0.05 * rng.normal(size=R.shape)
        assert np.linalg.norm(C @ C.T - S) >= np.linalg.norm(K - S) - 1e-9
    # on the simplex the clipped all-ones component only shifts the energy by a constant
    u = np.full((8, 8), 1.0)
    w1 = minimize_energy(eig_clip(S + 0.0, eps=1e-6), beta=1, lam=1, unary=np.ones(8)).weights
    w2 = minimize_energy(eig_clip(S, eps=1e-6) + 3.0 * u, beta=1, lam=1, unary=np.ones(8)).weights
    assert np.allclose(w1, w2, atol=1e-8)
    assert np.allclose(energy_matrix(S, "clip", eps=0.0), K)


def test_information_evidence_is_a_lower_confidence_bound_above_zero():
    from taskpgm_ray.mixture.signal import information_evidence

    spread = np.tile([-1.0, 1.0], 20)  # mean 0, std 1
    per_task = [1.2 + 0.3 * spread,   # learned: clearly above 0
                0.0 + 0.05 * spread,  # not learned: around 0
                -3.0 + spread,        # noise a proxy memorised: below 0
                0.2 + spread]         # a hint, within its noise (the bound: 0.2 - 1.645 / sqrt(40) < 0)
    signal = {"information_sum": np.array([x.sum() for x in per_task]),
              "information_sq_sum": np.array([(x ** 2).sum() for x in per_task]),
              "information_count": np.array([len(x) for x in per_task])}
    assert information_evidence(signal).tolist() == [True, False, False, False]
    assert information_evidence({k: v for k, v in signal.items() if k != "information_sq_sum"}) is None


def test_an_unlearned_task_keeps_its_prior_share_and_noise_gets_no_more():
    from taskpgm_ray.mixture.taskpgm import taskpgm_mixture

    n = 5
    sizes = [400, 300, 200, 800, 50]  # task 3: a large skill the proxy did not learn; task 4: noise
    information = np.array([1.0, 1.0, 0.8, 0.0, 0.0])
    unlearned = np.array([False, False, False, True, True])
    L = np.full((n, n), -2.0) + np.eye(n)  # the pairwise term is off below (lam 0): only the unary and the prior
    common = {"lam": 0.0, "beta": 0.5, "unary": "information", "information": information, "sizes": sizes,
              "prior": "temperature", "prior_strength": 1.0, "floor": 0.0}
    zero = taskpgm_mixture(L, np.ones(n), **common)
    neutral = taskpgm_mixture(L, np.ones(n), unlearned=unlearned, **common)
    q = neutral.extra["q"]
    assert zero.weights[3] < q[3] - 0.01 and zero.weights[4] < q[4]  # zero information pushes them below
    np.testing.assert_allclose(neutral.weights[[3, 4]], q[[3, 4]], atol=1e-6)  # no evidence: the prior share
    assert neutral.weights[0] > q[0] and neutral.weights[2] < neutral.weights[1] * q[2] / q[1] + 1e-9
    assert neutral.weights.sum() == pytest.approx(1.0)

"""Signal checks (taskpgm_ray.mixture.signal): gains, input-output information and the affinity's SNR."""

from __future__ import annotations

import numpy as np
import pytest

from taskpgm_ray.mixture import eig_clip, energy_matrix, minimize_energy, pmi_affinity
from taskpgm_ray.mixture.signal import affinity_snr, information_gain, input_information, output_only, proxy_gains


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


def test_information_is_zero_for_noise_and_positive_for_a_skill():
    rng = np.random.default_rng(0)
    m = 30
    base, base_rot = -20 + rng.normal(0, 1, m), -20 + rng.normal(0, 1, m)
    skill, skill_rot = -2 + rng.normal(0, 0.5, m), -25 + rng.normal(0, 1, m)  # the answer needs the input
    noise, noise_rot = -12 + rng.normal(0, 1, m), -12 + rng.normal(0, 1, m)   # any answer is as likely
    info = input_information([skill, noise], [skill_rot, noise_rot], [base, base], [base_rot, base_rot],
                             n_boot=300)
    assert info[0].proxy == pytest.approx(np.mean(skill - skill_rot))
    assert info[0].gain > 20 and info[0].low > 0
    assert info[1].low < 0 < info[1].high
    gain = information_gain(np.array([np.sum(skill - skill_rot), 0.0]),
                            np.array([np.sum(base - base_rot), 0.0]), np.array([m, m]))
    assert gain[0] == pytest.approx(info[0].gain) and gain[1] == 0.0
    assert information_gain(np.zeros(2), np.zeros(2), np.array([3, 0])) is None
    # with the squared gains: the lower confidence bound, floored at 0 (noise gets nothing for sampling luck)
    d = [skill - skill_rot - (base - base_rot), noise - noise_rot - (base - base_rot)]
    lcb = information_gain(np.array([np.sum(skill - skill_rot), np.sum(noise - noise_rot)]),
                           np.array([np.sum(base - base_rot)] * 2), np.array([m, m]),
                           np.array([np.sum(x**2) for x in d]))
    se = d[0].std(ddof=1) / np.sqrt(m)
    assert lcb[0] == pytest.approx(d[0].mean() - 1.645 * se) and lcb[1] == 0.0


def test_output_only_flags_learned_answers_that_ignore_the_prompt_and_nothing_else():
    """Noise (answers learned, no input dependence) is flagged; a real skill with a small, noisy probe set (wide
    interval, clearly positive estimate) and a proxy that learned nothing (no evidence either way) are not."""
    rng = np.random.default_rng(0)
    m = 16
    base = -30 + rng.normal(0, 1, (4, m))
    own = np.stack([base[0] + 18,                  # noise: learned the answers' statistics (60% gain)
                    base[1] + 15,                  # skill, small and noisy probe set
                    base[2] + rng.normal(0, 1, m),  # unlearned proxy: the base's NLL
                    base[3] + 20])                 # a clean skill
    info_own = np.stack([rng.normal(0, 4, m), 8 + rng.normal(0, 12, m), rng.normal(0, 1, m), 20 + rng.normal(0, 1, m)])
    sums = {"base_loglik_sum": base.sum(1), "information_sum": info_own.sum(1), "base_information_sum": np.zeros(4),
            "information_count": np.full(4, m), "information_gain_sq_sum": (info_own**2).sum(1)}
    low = information_gain(sums["information_sum"], sums["base_information_sum"], sums["information_count"],
                           sums["information_gain_sq_sum"])
    assert low[0] == 0 and low[1] == 0 and low[3] > 0  # the skill's bound is 0 too: only its estimate differs
    assert output_only(sums, own.sum(1), np.full(4, m)).tolist() == [True, False, False, False]
    assert output_only({k: v for k, v in sums.items() if k != "base_loglik_sum"}, own.sum(1), np.full(4, m)) is None


def test_a_one_example_task_has_no_information_estimate():
    (info,) = input_information([np.array([-1.0])], [np.array([-2.0])], [np.array([-3.0])], [np.array([-3.0])])
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

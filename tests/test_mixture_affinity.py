"""Affinities, kernels, baselines and the bootstrap against slow independent references."""

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.special import log_softmax

from taskpgm_ray.mixture import (
    baseline_weights,
    bootstrap_weights,
    compress_topk,
    energy_matrix,
    exp_kernel,
    jsd_affinity,
    jsd_from_topk,
    jsd_similarity,
    minimize_energy,
    pairwise_jsd_sum,
    pairwise_jsd_sum_topk,
    pmi_affinity,
    psd_shift,
    symmetrize,
)


def test_pmi_affinity_formula_by_loops():
    rng = np.random.default_rng(0)
    L = -rng.uniform(0.5, 3, (5, 5))
    S = pmi_affinity(L)
    for a in range(5):
        for b in range(5):
            assert S[a, b] == pytest.approx(0.5 * ((L[a, b] - L[b, b]) + (L[b, a] - L[a, a])), abs=1e-14)
    assert np.all(np.diag(S) == 0) and np.array_equal(S, S.T)


def test_pmi_affinity_errors():
    with pytest.raises(ValueError, match=r"square \(n, n\)"):
        pmi_affinity(np.ones((2, 3)))
    L = -np.ones((3, 3))
    L[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"loglik_mean\[1, 2\] is not finite \(proxy 1 on task 2\)"):
        pmi_affinity(L)


def random_logprobs(n, T, V, rng, scale=1.0):
    return log_softmax(scale * rng.standard_normal((n, T, V)), axis=-1)


def test_jsd_exact_matches_scipy():
    rng = np.random.default_rng(1)
    lp = random_logprobs(4, 7, 50, rng, scale=3.0)
    lp[0, 0, :3] = -np.inf  # zero-probability tokens
    lp[0, 0] -= np.logaddexp.reduce(lp[0, 0])
    A = jsd_affinity(lp)
    P = np.exp(lp)
    for a in range(4):
        for b in range(4):
            ref = np.mean([jensenshannon(P[a, t], P[b, t]) ** 2 for t in range(7)])  # base e by default
            assert A[a, b] == pytest.approx(ref, abs=1e-12)
    assert np.all(np.diag(A) == 0)
    np.testing.assert_allclose(pairwise_jsd_sum(lp, chunk_elements=60), 7 * A, atol=1e-12)  # chunked path


def test_topk_with_full_support_is_exact():
    rng = np.random.default_rng(2)
    lp = random_logprobs(3, 5, 20, rng, scale=2.0)
    idx, val, tail = compress_topk(lp, 20)
    np.testing.assert_allclose(tail, 0, atol=1e-12)
    for support in ("union", "intersection"):
        np.testing.assert_allclose(
            pairwise_jsd_sum_topk(idx, val, support=support), pairwise_jsd_sum(lp), atol=1e-10
        )


def test_compress_topk_keeps_the_largest():
    rng = np.random.default_rng(3)
    lp = random_logprobs(2, 4, 30, rng)
    idx, val, tail = compress_topk(lp, 5)
    ref = np.argsort(-lp, axis=-1)[..., :5]
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_allclose(tail, 1 - np.exp(np.sort(lp, -1)[..., -5:]).sum(-1), atol=1e-12)


def test_topk_intersection_is_a_lower_bound_and_union_error_is_small_on_peaked():
    # The measurement of the docstring, small: vocab 32000, peaked distributions, b = a + noise.
    rng = np.random.default_rng(4)
    T, V = 24, 32000
    base = rng.standard_normal((T, V))
    la = log_softmax(8 * base, -1)
    lb = log_softmax(8 * (base + 0.3 * rng.standard_normal((T, V))), -1)
    exact = pairwise_jsd_sum(np.stack([la, lb]))[0, 1] / T
    for k in (16, 64):
        ia, va, _ = compress_topk(la[None], k)
        ib, vb, _ = compress_topk(lb[None], k)
        inter = jsd_from_topk(ia[0], va[0], ib[0], vb[0], support="intersection")
        union = jsd_from_topk(ia[0], va[0], ib[0], vb[0], support="union")
        per_token_exact = pairwise_jsd_sum(np.stack([la[:, None], lb[:, None]]).reshape(2, T, V)[:, :])
        assert np.all(
            inter
            <= np.array([pairwise_jsd_sum(np.stack([la[t : t + 1], lb[t : t + 1]]))[0, 1] for t in range(T)])
            + 1e-12
        )
        assert per_token_exact[0, 1] == pytest.approx(exact * T)
        assert abs(union.mean() - exact) / exact < (0.05 if k == 16 else 0.02)
    # on flat distributions the top-k lists miss most of the disagreement (documented)
    lf, lg = log_softmax(base, -1), log_softmax(base + rng.standard_normal((T, V)), -1)
    iff, vf, _ = compress_topk(lf[None], 16)
    ig, vg, _ = compress_topk(lg[None], 16)
    flat_exact = pairwise_jsd_sum(np.stack([lf, lg]))[0, 1] / T
    assert jsd_from_topk(iff[0], vf[0], ig[0], vg[0]).mean() < 0.5 * flat_exact


def test_pairwise_jsd_sum_topk_is_a_sum_over_shards():
    rng = np.random.default_rng(5)
    lp = random_logprobs(3, 10, 40, rng, scale=4.0)
    idx, val, _ = compress_topk(lp, 6)
    whole = pairwise_jsd_sum_topk(idx, val)
    halves = pairwise_jsd_sum_topk(idx[:, :4], val[:, :4]) + pairwise_jsd_sum_topk(
        idx[:, 4:], val[:, 4:], chunk_tokens=3
    )
    np.testing.assert_allclose(whole, halves, atol=1e-12)
    with pytest.raises(ValueError, match=r"idx must hold integer token ids"):
        pairwise_jsd_sum_topk(idx.astype(float), val)


def test_kernels_make_psd_matrices():
    rng = np.random.default_rng(6)
    L = -rng.uniform(0.5, 3, (8, 8))
    S = pmi_affinity(L)
    assert np.linalg.eigvalsh(S)[0] < 0  # PMI is indefinite (zero trace)
    for K in (
        psd_shift(S, 1e-3),
        exp_kernel(S, 0.5),
        energy_matrix(S, "psd"),
        energy_matrix(S, "exp", tau=2.0),
    ):
        assert np.allclose(K, K.T) and np.linalg.eigvalsh(K)[0] >= -1e-12
    assert np.linalg.eigvalsh(psd_shift(S, 1e-3))[0] == pytest.approx(1e-3, abs=1e-10)
    np.testing.assert_allclose(symmetrize(L), (L + L.T) / 2)
    J = np.array([[0, 0.2], [0.2, 0]])
    np.testing.assert_allclose(jsd_similarity(J), 1 - J / np.log(2))
    np.testing.assert_allclose(jsd_similarity(J, "exp", tau=0.5), np.exp(-J / 0.5))
    with pytest.raises(ValueError, match=r"unknown kernel 'cos'; choose one of psd, clip, exp"):
        energy_matrix(S, "cos")
    with pytest.raises(ValueError, match=r"kind='exp' needs tau > 0"):
        jsd_similarity(J, "exp")


def test_psd_shift_keeps_the_unary_effect():
    # On the simplex the shift adds c ||p||^2 and changes u^T p by a constant: check the energy identity.
    rng = np.random.default_rng(7)
    S = pmi_affinity(-rng.uniform(0.5, 3, (6, 6)))
    K = psd_shift(S)
    c = K[0, 0] - S[0, 0]
    p = rng.dirichlet(np.ones(6))
    assert p @ K @ p == pytest.approx(p @ S @ p + c * p @ p)
    assert K.sum(1) @ p == pytest.approx(S.sum(1) @ p + c)


def test_baselines():
    N = np.array([100, 400, 25])
    np.testing.assert_allclose(baseline_weights("uniform", N), [1 / 3] * 3)
    np.testing.assert_allclose(baseline_weights("size", N), N / N.sum())
    w = baseline_weights("temperature", N, temperature=2.0)
    np.testing.assert_allclose(w, np.sqrt(N) / np.sqrt(N).sum())
    assert baseline_weights("temperature", [1e300, 1.0], temperature=0.01)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"unknown baseline 'zipf'"):
        baseline_weights("zipf", N)
    with pytest.raises(ValueError, match=r"task 1 has size 0"):
        baseline_weights("size", [3, 0])
    with pytest.raises(ValueError, match=r"needs temperature=T"):
        baseline_weights("temperature", N)


def test_bootstrap_intervals_cover_and_shrink():
    rng = np.random.default_rng(8)
    n, shards = 4, 30
    true_L = -rng.uniform(1, 3, (n, n))
    count = rng.integers(5, 10, (shards, n)).astype(float)
    noise = rng.normal(0, 0.5, (shards, n, n)) * np.sqrt(count)[:, None, :]
    ll = true_L[None] * count[:, None, :] + noise

    def solve(A):
        return minimize_energy(energy_matrix(A, "psd", eps=1e-3), beta=1.0, lam=1.0).weights

    res = bootstrap_weights(ll, count, solve, n_boot=60, seed=0)
    point = pmi_affinity(ll.sum(0) / count.sum(0)[None, :])
    assert np.all(res.affinity_low <= point + 1e-12) and np.all(point <= res.affinity_high + 1e-12)
    assert np.all(res.weights_low <= res.weights_mean + 1e-12) and np.all(
        res.weights_mean <= res.weights_high + 1e-12
    )
    np.testing.assert_allclose(res.weights_samples.sum(1), 1)
    again = bootstrap_weights(ll, count, solve, n_boot=60, seed=0)
    np.testing.assert_array_equal(again.weights_samples, res.weights_samples)
    with pytest.raises(ValueError, match=r"count must have shape \(30, 4\)"):
        bootstrap_weights(ll, count[:, :3], solve)


def _large_pmi(n: int, seed: int = 1) -> np.ndarray:
    """A PMI affinity of n tasks in clusters of about 20 (above the dense limit when n > 500)."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, n // 20, n)
    L = -2.0 - rng.random((n, n)) - 0.5 * (group[:, None] != group[None, :])
    np.fill_diagonal(L, -1.0)
    return pmi_affinity(L)


@pytest.mark.parametrize("which", ["pmi", "exp"])
def test_lanczos_bound_for_large_n_is_below_the_smallest_eigenvalue_and_tight(monkeypatch, which):
    from taskpgm_ray.mixture.kernels import DENSE_EIG_LIMIT, min_eigenvalue_bound

    S = _large_pmi(600)
    A = S if which == "pmi" else np.exp(S / 2.0)  # PMI: one huge negative eigenvalue; exp: a clustered bottom
    assert A.shape[0] > DENSE_EIG_LIMIT
    with monkeypatch.context() as m:  # the large-n path never factorises the matrix
        m.setattr(np.linalg, "eigvalsh", lambda *a, **k: pytest.fail("dense eigvalsh called for n = 600"))
        bound = min_eigenvalue_bound(A)
    exact = np.linalg.eigvalsh(A)[0]
    assert bound <= exact and exact - bound <= 1e-8 * max(1.0, abs(exact)), (bound, exact)


def test_psd_shift_and_exp_kernel_for_large_n_are_psd_with_the_smallest_shift():
    S = _large_pmi(600)
    eps = 1e-6
    lam = np.linalg.eigvalsh(psd_shift(S, eps))[0]
    assert eps - 1e-9 * abs(np.linalg.eigvalsh(S)[0]) <= lam <= 2 * eps  # shifted to eps, not beyond
    for tau in (0.5, 2.0):  # exp(S / tau) is PD already at 0.5 (no shift), indefinite at 2 (lambda_min -1.28)
        raw = np.exp(S / tau)
        dense_shift = max(0.0, -np.linalg.eigvalsh(raw)[0]) + eps
        np.testing.assert_allclose(exp_kernel(S, tau, eps), raw + dense_shift * np.eye(600), rtol=0, atol=1e-9)
    minimize_energy(psd_shift(S, eps), beta=1.0, lam=1.0)  # the solver's own PSD check accepts it

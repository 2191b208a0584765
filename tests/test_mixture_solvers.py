"""minimize_energy against independent references: SLSQP, brute-force KKT checks, the paper's formula."""

import numpy as np
import pytest
from scipy.optimize import minimize

from taskpgm_ray.mixture import BlockLowRank, energy_matrix, minimize_energy, pmi_affinity


def energy(S, u, p, beta, lam):
    return 0.5 * lam * p @ S @ p - beta * u @ p


def random_psd(n, rank, rng, ridge=0.0):
    A = rng.standard_normal((n, rank))
    return A @ A.T / max(rank, 1) + ridge * np.eye(n)


def planted_pmi(n, rng, k=3):
    c = rng.integers(0, k, n)
    own = -rng.uniform(1, 3, n)
    gap = np.where(c[:, None] == c[None, :], rng.uniform(0.02, 0.1, (n, n)), rng.uniform(0.5, 2, (n, n)))
    L = own[None, :] - gap
    np.fill_diagonal(L, own)
    return energy_matrix(pmi_affinity(L), "psd", eps=1e-6)


def slsqp(S, u, beta, lam, lo=None, hi=None):
    """Independent slow reference: SLSQP on the same problem from many starts, best energy."""
    n = S.shape[0]
    lo = np.zeros(n) if lo is None else lo
    hi = np.full(n, np.inf) if hi is None else hi
    best = None
    for x0 in [np.full(n, 1 / n), np.eye(n)[0]]:
        x0 = np.clip(x0, lo, np.minimum(hi, 1))
        r = minimize(
            lambda p: energy(S, u, p, beta, lam),
            x0,
            jac=lambda p: lam * S @ p - beta * u,
            method="SLSQP",
            bounds=list(zip(lo, [None if not np.isfinite(h) else h for h in hi])),
            constraints=[{"type": "eq", "fun": lambda p: p.sum() - 1, "jac": lambda p: np.ones(n)}],
            options={"ftol": 1e-14, "maxiter": 1000},
        )
        if best is None or r.fun < best.fun:
            best = r
    return best


def assert_kkt(S, u, p, beta, lam, lo=None, hi=None, tol=1e-9):
    """Independent KKT check: feasibility, one multiplier nu for the free set, signs on the active sets."""
    n = S.shape[0]
    lo = np.zeros(n) if lo is None else np.broadcast_to(lo, (n,))
    hi = np.full(n, np.inf) if hi is None else np.broadcast_to(hi, (n,))
    assert abs(p.sum() - 1) < 1e-12
    assert np.all(p >= lo - 1e-15) and np.all(p <= hi + 1e-15)
    g = lam * S @ p - beta * u
    scale = abs(lam) * np.abs(S).max() + abs(beta) * np.abs(u).max()
    at_lo, at_hi = p <= lo + 1e-12, p >= hi - 1e-12
    free = ~at_lo & ~at_hi
    nu = np.median(g[free]) if free.any() else (g[at_lo].min() if at_lo.any() else g[at_hi].max())
    assert np.all(np.abs(g[free] - nu) <= tol * scale)
    assert np.all(g[at_lo & ~at_hi] >= nu - tol * scale)
    assert np.all(g[at_hi & ~at_lo] <= nu + tol * scale)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [2, 5, 12])
def test_exact_matches_slsqp_and_kkt(n, seed):
    rng = np.random.default_rng(seed)
    S = random_psd(n, rng.integers(1, n + 1), rng, ridge=0.01 * (seed % 2))
    u = rng.standard_normal(n)
    beta, lam = rng.uniform(0.1, 2), rng.uniform(0.1, 2)
    sol = minimize_energy(S, beta=beta, lam=lam, unary=u)
    ref = slsqp(S, u, beta, lam)
    assert sol.success and sol.method == "exact"
    assert sol.energy <= ref.fun + 1e-9
    assert sol.energy == pytest.approx(ref.fun, abs=1e-7)
    assert sol.kkt_residual <= 1e-9
    assert_kkt(S, u, sol.weights, beta, lam)


def test_exact_column_generation_path_large_n():
    rng = np.random.default_rng(0)
    S = planted_pmi(350, rng, k=6)  # n > 200 starts from a candidate subset
    for beta in (0.05, 1.0, 10.0):
        sol = minimize_energy(S, beta=beta, lam=1.0)
        assert sol.extra["rounds"] >= (2 if beta == 0.05 else 1)  # 0.05: the support outgrows the start
        assert sol.kkt_residual <= 1e-9
        assert_kkt(S, S.sum(1), sol.weights, beta, 1.0)
        assert sol.extra["gap"] <= 1e-9 * (np.abs(S).max() + np.abs(S.sum(1)).max())


def test_unary_defaults_to_row_sums():
    rng = np.random.default_rng(1)
    S = planted_pmi(20, rng)
    a = minimize_energy(S, beta=1.0, lam=0.5)
    b = minimize_energy(S, beta=1.0, lam=0.5, unary=S.sum(1))
    np.testing.assert_allclose(a.weights, b.weights, atol=1e-13)


def test_permutation_and_scale_invariance():
    rng = np.random.default_rng(2)
    n = 15
    S, u = random_psd(n, 6, rng), rng.standard_normal(n)
    base = minimize_energy(S, beta=1.0, lam=1.0, unary=u)
    perm = rng.permutation(n)
    permuted = minimize_energy(S[np.ix_(perm, perm)], beta=1.0, lam=1.0, unary=u[perm])
    np.testing.assert_allclose(permuted.weights, base.weights[perm], atol=1e-10)
    for c in (1e-8, 1e8):
        scaled = minimize_energy(c * S, beta=c, lam=1.0, unary=u)
        np.testing.assert_allclose(scaled.weights, base.weights, atol=1e-9)
        assert scaled.kkt_residual <= 1e-9
        assert scaled.energy == pytest.approx(c * base.energy, rel=1e-9)


def test_closed_form_is_the_papers_formula():
    rng = np.random.default_rng(3)
    n = 8
    S, u = random_psd(n, n, rng, ridge=0.1), rng.standard_normal(n)
    beta, lam = 0.7, 1.3
    sol = minimize_energy(S, beta=beta, lam=lam, unary=u, method="closed_form")
    # paper: p* = (lam S)^-1 (beta u - nu 1) with nu fixing sum(p) = 1, then projection onto the simplex
    Si = np.linalg.inv(lam * S)
    nu = (beta * np.ones(n) @ Si @ u - 1) / (np.ones(n) @ Si @ np.ones(n))
    p_eq = Si @ (beta * u - nu)
    np.testing.assert_allclose(sol.extra["unprojected"], p_eq, atol=1e-10)
    # sort-based Euclidean projection onto the simplex, written independently
    s = np.sort(p_eq)[::-1]
    k = np.max(np.flatnonzero(s - (np.cumsum(s) - 1) / np.arange(1, n + 1) > 0)) + 1
    np.testing.assert_allclose(sol.weights, np.maximum(p_eq - (s[:k].sum() - 1) / k, 0), atol=1e-12)
    exact = minimize_energy(S, beta=beta, lam=lam, unary=u)
    assert exact.energy <= sol.energy + 1e-12


def test_closed_form_equals_exact_when_interior():
    S = np.eye(3) + 0.1
    u = np.array([1.0, 1.1, 0.9])
    a = minimize_energy(S, beta=0.1, lam=1.0, unary=u, method="closed_form")
    b = minimize_energy(S, beta=0.1, lam=1.0, unary=u)
    assert np.all(b.weights > 0)
    np.testing.assert_allclose(a.weights, b.weights, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_first_order_and_blocks_agree_with_exact(seed):
    rng = np.random.default_rng(seed)
    S = planted_pmi(60, rng)
    exact = minimize_energy(S, beta=1.0, lam=1.0)
    fo = minimize_energy(S, beta=1.0, lam=1.0, method="first_order", tol=1e-10)
    assert fo.success and fo.energy == pytest.approx(exact.energy, abs=1e-9)
    bl = minimize_energy(S, beta=1.0, lam=1.0, method="blocks", max_iter=3000)
    assert bl.energy >= exact.energy - 1e-12
    assert bl.extra["lower_bound"] <= exact.energy + 1e-12  # the certificate is a valid bound
    assert bl.energy - exact.energy <= 1e-6 * abs(exact.energy)


def test_blocks_on_block_low_rank_matches_dense_exact():
    rng = np.random.default_rng(4)
    blocks = [random_psd(s, s, rng, 0.05) for s in (5, 7, 4, 6)]
    V = 0.3 * rng.standard_normal((22, 2))
    op = BlockLowRank(blocks, V)
    dense = op.to_dense()
    x = rng.standard_normal(22)
    np.testing.assert_allclose(op.matvec(x), dense @ x, atol=1e-12)
    np.testing.assert_allclose(
        op.matvec(np.stack([x, 2 * x], 1)), dense @ np.stack([x, 2 * x], 1), atol=1e-12
    )
    exact = minimize_energy(dense, beta=1.0, lam=1.0)
    bl = minimize_energy(op, beta=1.0, lam=1.0, method="blocks", max_iter=5000)
    assert bl.extra["n_blocks"] == 4
    assert bl.energy == pytest.approx(exact.energy, abs=1e-8)
    assert bl.extra["lower_bound"] <= exact.energy + 1e-12
    assert minimize_energy(op, beta=1.0, lam=1.0).energy == pytest.approx(exact.energy, abs=1e-12)


def test_degenerate_problems():
    # n = 1
    sol = minimize_energy(np.array([[2.0]]), beta=1.0, lam=1.0)
    assert sol.weights.tolist() == [1.0] and sol.energy == pytest.approx(1.0 - 2.0)
    # zero matrix: a linear program, mass on argmax u
    u = np.array([0.1, 0.5, -0.2, 0.3])
    sol = minimize_energy(np.zeros((4, 4)), beta=1.0, lam=1.0, unary=u)
    np.testing.assert_array_equal(sol.weights, [0, 1, 0, 0])
    # zero matrix and zero unary: E = 0, every point optimal
    sol = minimize_energy(np.zeros((3, 3)), beta=1.0, lam=1.0)
    assert sol.energy == 0 and sol.weights.sum() == pytest.approx(1)
    # ties in the LP: any split between the tied vertices is optimal
    sol = minimize_energy(np.zeros((3, 3)), beta=1.0, lam=1.0, unary=np.array([1.0, 1.0, 0.0]))
    assert sol.weights[2] == 0 and sol.kkt_residual <= 1e-12
    # rank 1 and a singular matrix with a linear term along its null space
    rng = np.random.default_rng(5)
    for S in (np.outer(v := rng.standard_normal(9), v), random_psd(9, 2, rng)):
        u = rng.standard_normal(9)
        sol = minimize_energy(S, beta=1.0, lam=1.0, unary=u)
        assert sol.kkt_residual <= 1e-9
        assert_kkt(S, u, sol.weights, 1.0, 1.0)
        assert sol.energy <= slsqp(S, u, 1.0, 1.0).fun + 1e-9
    # identical tasks (duplicated rows/columns)
    S = np.ones((4, 4))
    sol = minimize_energy(S, beta=1.0, lam=1.0)
    assert_kkt(S, S.sum(1), sol.weights, 1.0, 1.0)


def test_bounds_and_caps():
    rng = np.random.default_rng(6)
    n = 10
    S, u = random_psd(n, 4, rng), rng.standard_normal(n)
    lo, hi = np.full(n, 0.02), np.full(n, 0.3)
    hi[3] = 0.05
    for method in ("exact", "first_order"):
        sol = minimize_energy(
            S,
            beta=1.0,
            lam=1.0,
            unary=u,
            min_weight=0.02,
            max_weight=0.3,
            cap=np.where(np.arange(n) == 3, 0.05, np.inf),
            method=method,
            tol=1e-11,
        )
        assert_kkt(S, u, sol.weights, 1.0, 1.0, lo, hi, tol=1e-8)
        ref = slsqp(S, u, 1.0, 1.0, lo, hi)
        assert sol.energy <= ref.fun + 1e-9
    # unconstrained solution is sparse, so the lower bound must bind somewhere
    assert np.any(np.isclose(sol.weights, 0.02))


def test_exact_tight_bounds():
    S = np.eye(3)
    sol = minimize_energy(S, beta=1.0, lam=1.0, min_weight=[0.2, 0.3, 0.5])
    np.testing.assert_allclose(sol.weights, [0.2, 0.3, 0.5])


def test_readonly_and_noncontiguous_inputs_are_not_written():
    rng = np.random.default_rng(7)
    big = random_psd(20, 20, rng)
    S = big[::2, ::2]  # non-contiguous view
    u = rng.standard_normal(20)[::2]
    S_copy, u_copy = S.copy(), u.copy()
    S.flags.writeable = False
    for method in ("exact", "closed_form", "first_order", "blocks"):
        sol = minimize_energy(S, beta=1.0, lam=1.0, unary=u, method=method)
        assert sol.weights.sum() == pytest.approx(1.0)
    np.testing.assert_array_equal(S, S_copy)
    np.testing.assert_array_equal(u, u_copy)


@pytest.mark.parametrize(
    "S, kwargs, match",
    [
        (np.ones((2, 3)), {}, r"S must be a non-empty square matrix, got shape \(2, 3\)"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), {}, r"S contains NaN or inf \(first at \[0, 1\]\)"),
        (np.array([[1.0, 0.5], [0.0, 1.0]]), {}, r"S is not symmetric"),
        (
            np.array([[0.0, -0.3], [-0.3, 0.0]]),
            {},
            r"S is not positive semi-definite \(min eigenvalue -0\.3\); "
            r"turn the affinity into an energy matrix "
            r"with taskpgm_ray\.mixture\.energy_matrix\(kernel='psd' or 'exp'\)",
        ),
        (np.eye(2), {"lam": -1.0}, r"lam must be >= 0"),
        (np.eye(2), {"method": "magic"}, r"unknown method 'magic'; choose one of exact, closed_form"),
        (np.eye(2), {"unary": np.ones(3)}, r"unary must have shape \(2,\), got \(3,\)"),
        (np.eye(2), {"min_weight": 0.6}, r"infeasible bounds: the lower bounds sum to 1\.2 > 1"),
        (np.eye(2), {"max_weight": 0.4}, r"infeasible bounds: the upper bounds sum to 0\.8 < 1"),
        (np.eye(2), {"min_weight": 0.3, "max_weight": 0.2}, r"upper bound 0\.2 < lower bound 0\.3 at task 0"),
        (np.eye(2), {"min_weight": -0.1}, r"min_weight must be >= 0"),
        (
            np.eye(2),
            {"max_weight": 0.9, "method": "closed_form"},
            r"supported by method='exact' and 'first_order', not 'closed_form'",
        ),
    ],
)
def test_validation_errors(S, kwargs, match):
    kw = {"beta": 1.0, "lam": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        minimize_energy(S, **kw)


def test_large_n_checks_catch_asymmetric_and_indefinite():
    rng = np.random.default_rng(9)
    S = pmi_affinity(-rng.uniform(0.5, 3, (700, 700)))  # n > 500: randomised checks
    with pytest.raises(ValueError, match=r"S is not positive semi-definite \(min eigenvalue -"):
        minimize_energy(S, beta=1.0, lam=1.0)
    K = energy_matrix(S, "psd", eps=1e-6)
    K[3, 5] += 1e-3 * np.abs(K).max()
    with pytest.raises(ValueError, match=r"S is not symmetric"):
        minimize_energy(K, beta=1.0, lam=1.0)


def test_pmi_affinity_needs_the_kernel_step():
    L = np.array([[-1.0, -2.0, -2.5], [-1.8, -1.2, -2.0], [-2.2, -1.9, -0.9]])
    S = pmi_affinity(L)
    with pytest.raises(ValueError, match=r"energy_matrix\(kernel='psd' or 'exp'\)"):
        minimize_energy(S, beta=1.0, lam=1.0)
    assert minimize_energy(energy_matrix(S), beta=1.0, lam=1.0).success

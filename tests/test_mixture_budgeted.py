"""Budgeted selection against brute force over all subsets (n <= 8)."""

import itertools
import math

import numpy as np
import pytest
from scipy.optimize import minimize

from taskpgm_ray.mixture import energy_matrix, pmi_affinity, select_budgeted, select_budgeted_report


def restricted_min(S, u, A, beta, lam):
    """Independent reference for min over the simplex on A: SLSQP from several starts."""
    idx = list(A)
    Ss, us = S[np.ix_(idx, idx)], u[idx]
    best = np.inf
    for x0 in [np.full(len(idx), 1 / len(idx))]:  # convex: one start is enough
        r = minimize(
            lambda p: 0.5 * lam * p @ Ss @ p - beta * us @ p,
            x0,
            method="SLSQP",
            bounds=[(0, None)] * len(idx),
            options={"ftol": 1e-14, "maxiter": 500},
            constraints=[{"type": "eq", "fun": lambda p: p.sum() - 1}],
        )
        best = min(best, r.fun)
    return best


def problem(seed, n=6):
    rng = np.random.default_rng(seed)
    S = energy_matrix(pmi_affinity(-rng.uniform(0.5, 3, (n, n))), "psd", eps=1e-3)
    return S, S.sum(1)


@pytest.mark.parametrize("seed", range(3))
def test_greedy_against_brute_force(seed):
    S, u = problem(seed)
    n, beta, lam = S.shape[0], 1.0, 1.0
    e_ref = max(0.5 * lam * S[i, i] - beta * u[i] for i in range(n))
    f = {(): 0.0}
    for r in range(1, n + 1):
        for A in itertools.combinations(range(n), r):
            f[A] = e_ref - restricted_min(S, u, A, beta, lam)
    for k in (1, 2, 3):
        rep = select_budgeted_report(S, k, beta=beta, lam=lam, lazy=False, ratio_samples=30, seed=seed)
        A = tuple(sorted(rep.selected))
        assert len(A) <= k
        assert rep.values[-1] == pytest.approx(f[A], abs=1e-7)  # the set function is what we say
        opt = max(v for B, v in f.items() if len(B) <= k)
        # true submodularity ratio over the greedy prefixes and all R with |R| <= k
        gamma = np.inf
        for t in range(len(rep.selected)):
            L = tuple(sorted(rep.selected[:t]))
            rest = [j for j in range(n) if j not in L]
            for r in range(2, k + 1):
                for R in itertools.combinations(rest, r):
                    joint = f[tuple(sorted(L + R))] - f[L]
                    if joint > 1e-9:
                        gamma = min(gamma, sum(f[tuple(sorted(L + (j,)))] - f[L] for j in R) / joint)
        g = gamma if np.isfinite(gamma) else 1.0
        assert f[A] >= (1 - math.exp(-g)) * opt - 1e-7
        assert rep.gamma >= gamma - 1e-7  # the sampled estimate is a min over fewer sets
        if k == 1:
            assert f[A] == pytest.approx(opt, abs=1e-7)  # greedy is optimal for one pick
        # monotone set function, every pick has a non-negative gain
        assert all(b >= a - 1e-12 for a, b in zip(rep.values, rep.values[1:]))


def test_lazy_matches_plain_and_the_short_api():
    S, _ = problem(11, n=9)
    for k in (2, 4):
        lazy = select_budgeted_report(S, k, beta=1.0, lam=1.0, lazy=True)
        plain = select_budgeted_report(S, k, beta=1.0, lam=1.0, lazy=False)
        assert lazy.values[-1] >= plain.values[-1] - 1e-9 or lazy.selected == plain.selected
        assert select_budgeted(S, k, beta=1.0, lam=1.0) == sorted(lazy.selected)
        w = lazy.weights
        assert w.sum() == pytest.approx(1) and set(np.flatnonzero(w)) <= set(lazy.selected)
        assert 0 < lazy.bound <= 1


def test_budget_errors():
    S, _ = problem(0, n=4)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, n=4\], got 5"):
        select_budgeted(S, 5, beta=1.0, lam=1.0)
    with pytest.raises(ValueError, match=r"S is not positive semi-definite"):
        select_budgeted(pmi_affinity(-np.ones((3, 3)) - np.eye(3)), 2, beta=1.0, lam=1.0)

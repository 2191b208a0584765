"""Budgeted TaskPGM: choose at most k tasks.

Set function, for A a set of tasks:

    f(A) = E_ref - min_{p in simplex(A)} E(p),      E_ref = max_i E(e_i),   f(empty) = 0

where simplex(A) are the mixtures supported on A. f is monotone (a larger A has a larger simplex) and
f({i}) >= 0 = f(empty). It is not submodular in general; greedy then still guarantees
f(greedy) >= (1 - exp(-gamma)) f(OPT) with gamma the submodularity ratio (Das and Kempe, 2011):
gamma = min over greedy prefixes L and sets R (|R| <= k) disjoint from L of
sum_{j in R} [f(L + j) - f(L)] / [f(L + R) - f(L)].
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from taskpgm_ray.mixture.active_set import solve_dense
from taskpgm_ray.mixture.solvers import _check_energy_matrix, _check_vector


@dataclass
class BudgetedSelection:
    """The result of ``select_budgeted_report``.

    Attributes:
        selected: chosen tasks, in the order greedy picked them.
        weights: (n,) the minimiser of E on the simplex of the chosen tasks (0 elsewhere).
        values: f(A_t) after each pick, t = 1..len(selected).
        gamma: submodularity-ratio estimate: the min of the ratio over the greedy prefixes and
            ``ratio_samples`` random sets R per prefix (an upper estimate of the true ratio).
        bound: 1 - exp(-gamma), the greedy guarantee f(greedy) / f(OPT) that gamma implies.
        evaluations: how many restricted problems were solved.
    """

    selected: list[int]
    weights: np.ndarray
    values: list[float]
    gamma: float
    bound: float
    evaluations: int


class _SetFunction:
    """f(A) with a cache; each evaluation is an exact solve on the |A| x |A| subproblem."""

    def __init__(self, S, u, beta, lam):
        self.S, self.u, self.beta, self.lam = S, u, beta, lam
        self.scale = max(abs(lam) * float(np.abs(S).max()) + abs(beta) * float(np.abs(u).max()), 1e-300)
        self.e_ref = float(np.max(0.5 * lam * np.diag(S) - beta * u))
        self.cache: dict[frozenset, tuple[float, np.ndarray]] = {frozenset(): (0.0, np.zeros(0))}

    def solve(self, A) -> tuple[float, np.ndarray]:
        key = frozenset(A)
        if key not in self.cache:
            idx = np.array(sorted(key))
            a = self.lam / self.scale
            x, *_ = solve_dense(
                a * self.S[np.ix_(idx, idx)],
                -(self.beta / self.scale) * self.u[idx],
                np.full(idx.size, np.inf),
                1.0,
            )
            Sx = self.S[np.ix_(idx, idx)] @ x
            energy = 0.5 * self.lam * (x @ Sx) - self.beta * (self.u[idx] @ x)
            self.cache[key] = (self.e_ref - float(energy), x)
        return self.cache[key]

    def __call__(self, A) -> float:
        return self.solve(A)[0]


def select_budgeted_report(
    S: np.ndarray,
    k: int,
    *,
    beta: float,
    lam: float,
    unary: np.ndarray | None = None,
    lazy: bool = True,
    ratio_samples: int = 8,
    seed: int = 0,
) -> BudgetedSelection:
    """Greedy maximisation of f (see module docstring) under |A| <= k.

    ``lazy=True`` re-evaluates only the task with the best stale gain (Minoux's lazy greedy); it equals
    plain greedy when f is submodular and is a fast heuristic otherwise. ``lazy=False`` is plain greedy,
    for which the (1 - exp(-gamma)) guarantee is proved. Stops early when no task improves f.
    """
    S = _check_energy_matrix(S)
    n = S.shape[0]
    if not (isinstance(k, (int, np.integer)) and 1 <= k <= n):
        raise ValueError(f"k must be an integer in [1, n={n}], got {k!r}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    u = S.sum(1) if unary is None else _check_vector(unary, n, "unary")
    f = _SetFunction(S, u, beta, lam)
    A: list[int] = []
    values: list[float] = []
    value = 0.0
    tiny = 1e-12 * f.scale
    heap = [(-(f([j]) - value), j) for j in range(n)]
    heapq.heapify(heap)
    while len(A) < k and heap:
        if lazy:
            while True:
                _, j = heapq.heappop(heap)
                gain = f(A + [j]) - value
                if not heap or gain >= -heap[0][0] - tiny:
                    break
                heapq.heappush(heap, (-gain, j))
        else:
            gains = [(f(A + [j]) - value, j) for _, j in heap]
            gain, j = max(gains, key=lambda t: (t[0], -t[1]))
            heap = [(0.0, i) for _, i in heap if i != j]
        if gain <= tiny and A:
            break
        A.append(j)
        value += gain
        values.append(value)
    gamma = _ratio_estimate(f, A, n, k, ratio_samples, np.random.default_rng(seed))
    weights = np.zeros(n)
    weights[sorted(A)] = f.solve(A)[1]
    bound = 1.0 - float(np.exp(-gamma)) if np.isfinite(gamma) else 1.0 - float(np.exp(-1.0))
    return BudgetedSelection([int(j) for j in A], weights, values, gamma, bound, len(f.cache) - 1)


def _ratio_estimate(f, A, n, k, samples, rng) -> float:
    """min over greedy prefixes L and random R (2 <= |R| <= k, R disjoint from L) of the ratio."""
    gamma = np.inf
    for t in range(len(A)):
        L = A[:t]
        rest = np.setdiff1d(np.arange(n), L)
        if rest.size < 2 or k < 2:
            continue
        fL = f(L)
        for _ in range(samples):
            R = list(rng.choice(rest, size=int(rng.integers(2, min(k, rest.size) + 1)), replace=False))
            joint = f(L + R) - fL
            if joint > 1e-12 * f.scale:
                gamma = min(gamma, sum(f(L + [j]) - fL for j in R) / joint)
    return float(gamma)


def select_budgeted(
    S: np.ndarray, k: int, *, beta: float, lam: float, unary: np.ndarray | None = None
) -> list[int]:
    """At most k tasks chosen by lazy greedy on f(A) = E_ref - min over simplex(A) of E (sorted)."""
    return sorted(select_budgeted_report(S, k, beta=beta, lam=lam, unary=unary, ratio_samples=0).selected)

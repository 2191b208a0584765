"""The feasible set of every solver: the (box-capped) probability simplex.

    F = {p : lo <= p <= hi, sum(p) = 1}

Three exact operations on F, shared by the solvers: Euclidean projection, the linear minimiser
(Frank-Wolfe oracle), and the projected-gradient fixed-point residual used as the KKT certificate.
"""

from __future__ import annotations

import numpy as np


def project_capped_simplex(y: np.ndarray, lo: np.ndarray, hi: np.ndarray, mass: float = 1.0) -> np.ndarray:
    """Euclidean projection of ``y`` onto {lo <= x <= hi, sum x = mass}, exactly, in O(n log n).

    The projection is ``clip(y - theta, lo, hi)`` for the threshold ``theta`` solving
    ``phi(theta) = sum clip(y - theta, lo, hi) = mass``. ``phi`` is continuous, non-increasing and
    piecewise linear with breakpoints ``y - hi`` (a coordinate leaves its upper bound) and ``y - lo``
    (it reaches its lower bound); we sweep the sorted breakpoints and solve the linear piece.
    ``hi`` may contain ``inf``. Assumes ``sum lo <= mass <= sum hi``.
    """
    y = np.asarray(y, dtype=np.float64)
    upper_finite = np.isfinite(hi)
    # State for theta -> -inf: finite-capped coordinates sit at hi, uncapped ones are free (slope -1).
    const0 = hi[upper_finite].sum() + y[~upper_finite].sum()
    free0 = int((~upper_finite).sum())
    a = (y - hi)[upper_finite]
    b = y - lo
    theta = np.concatenate([a, b])
    dconst = np.concatenate([(y - hi)[upper_finite], lo - y])
    dfree = np.concatenate([np.ones(a.size), -np.ones(b.size)])
    order = np.argsort(theta, kind="stable")
    theta, dconst, dfree = theta[order], dconst[order], dfree[order]
    const = const0 + np.cumsum(dconst)
    free = free0 + np.cumsum(dfree)
    phi = const - free * theta  # phi just after each breakpoint (phi is continuous, so also at it)
    e = int(np.searchsorted(-phi, -mass, side="left"))  # first breakpoint with phi <= mass
    e = min(e, theta.size - 1)
    c_prev, k_prev = (const0, free0) if e == 0 else (const[e - 1], free[e - 1])
    t = (c_prev - mass) / k_prev if k_prev > 0 else theta[e]
    if e > 0 and k_prev > 0:
        t = min(max(t, theta[e - 1]), theta[e])
    return np.clip(y - t, lo, hi)


def linear_minimizer(g: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """argmin_{q in F} g^T q: start at lo, pour the remaining mass onto the smallest g up to hi."""
    q = lo.astype(np.float64).copy()
    remaining = 1.0 - q.sum()
    order = np.argsort(g, kind="stable")
    room = (hi - lo)[order]
    cum = np.cumsum(np.minimum(room, 1.0))  # capping room at 1 keeps inf out of the arithmetic
    take = np.clip(remaining - (cum - np.minimum(room, 1.0)), 0.0, np.minimum(room, 1.0))
    q[order] += take
    return q


def frank_wolfe_gap(p: np.ndarray, g: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """g^T p - min_{q in F} g^T q >= E(p) - min_F E for convex E with gradient g at p."""
    return float(g @ p - g @ linear_minimizer(g, lo, hi))


def kkt_residual(p: np.ndarray, g: np.ndarray, lo: np.ndarray, hi: np.ndarray, scale: float) -> float:
    """Relative KKT certificate ``|| p - proj_F(p - g / scale) ||_inf``.

    Zero exactly when the KKT conditions hold: some ``nu`` with ``g_i = nu`` where ``lo_i < p_i < hi_i``,
    ``g_i >= nu`` where ``p_i = lo_i`` and ``g_i <= nu`` where ``p_i = hi_i``. For a free coordinate it
    equals ``|g_i - nu| / scale``, for an active one the wrong-signed part of ``g_i - nu`` over ``scale``
    (``nu`` is the projection's threshold), so with ``scale = |lam| ||S||_max + |beta| ||u||_max`` it
    is a scale-free stationarity-plus-complementarity residual.
    """
    if scale <= 0:
        return 0.0
    return float(np.max(np.abs(p - project_capped_simplex(p - g / scale, lo, hi)), initial=0.0))

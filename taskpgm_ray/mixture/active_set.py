"""The exact minimiser of a convex quadratic on the box-capped simplex (active-set methods).

Problem, in shifted coordinates ``x = p - lo`` (so the lower bounds are 0):

    minimise   (1/2) x^T Q x + c^T x     subject to   0 <= x <= ub,   sum(x) = m

with Q symmetric PSD. Three layers:

* ``_pdas``: primal-dual active set (a semismooth Newton method): guess which coordinates sit at a
  bound, solve the equality-constrained KKT system on the rest, re-guess from the signs of the primal
  values and multipliers. A handful of linear solves when Q is well conditioned on the free set.
* ``_primal_active_set``: the textbook feasible-descent active-set method, one constraint at a time,
  with null-space steps when Q is singular on the free set (rank-1 S, zero S = a linear program). It
  is the safe fallback when PDAS cycles or meets a singular system.
* ``solve_box_simplex_qp``: column generation over an explicit candidate set, so that for large n only
  the rows of Q belonging to the (small) support are ever touched after one full gradient.
"""

from __future__ import annotations

import numpy as np

from taskpgm_ray.mixture.simplex import project_capped_simplex


def _kkt_solve(Qff: np.ndarray, rhs: np.ndarray, mass: float) -> tuple[np.ndarray, float] | None:
    """Solve [[Qff, -1], [1^T, 0]] [x; nu] = [rhs; mass]; None when the system is (near) singular."""
    f = Qff.shape[0]
    K = np.empty((f + 1, f + 1))
    K[:f, :f] = Qff
    K[:f, f] = -1.0
    K[f, :f] = 1.0
    K[f, f] = 0.0
    b = np.append(rhs, mass)
    try:
        sol = np.linalg.solve(K, b)
    except np.linalg.LinAlgError:
        return None
    if not np.all(np.isfinite(sol)):
        return None
    # A near-singular K solves to garbage without raising: check the residual.
    res = np.abs(K @ sol - b).max()
    if res > 1e-9 * (1.0 + np.abs(b).max() + np.abs(K).max() * np.abs(sol).max()):
        return None
    return sol[:f], float(sol[f])


def _pdas(Q, c, ub, mass, free, max_iter=60):
    """Primal-dual active set; returns (x, nu, iterations) or None if it cycles or hits a singular KKT."""
    n = c.size
    state = np.zeros(n, dtype=np.int8)  # 0 free, 1 at lower bound 0, 2 at upper bound ub
    state[~free] = 1
    tol = 1e-12
    seen = set()
    for it in range(1, max_iter + 1):
        F = np.flatnonzero(state == 0)
        U = np.flatnonzero(state == 2)
        x = np.zeros(n)
        x[U] = ub[U]
        rest = mass - x[U].sum()
        if F.size == 0:
            return None
        rhs = -c[F] - (Q[np.ix_(F, U)] @ ub[U] if U.size else 0.0)
        sol = _kkt_solve(Q[np.ix_(F, F)], rhs, rest)
        if sol is None:
            return None
        x[F], nu = sol
        g = Q @ x + c
        lam = g - nu
        new = state.copy()
        new[(state == 0) & (x < -tol)] = 1
        new[(state == 0) & (x > ub + tol)] = 2
        new[(state == 1) & (lam < -tol * (1 + abs(nu)))] = 0
        new[(state == 2) & (lam > tol * (1 + abs(nu)))] = 0
        if np.array_equal(new, state):
            return np.clip(x, 0.0, ub), nu, it
        key = new.tobytes()
        if key in seen:
            return None
        seen.add(key)
        state = new
    return None


def _descent_direction(Qff: np.ndarray, gf: np.ndarray) -> tuple[np.ndarray, bool]:
    """Minimiser of g^T d + d^T Q d / 2 over sum(d) = 0, or a descent ray if that is unbounded.

    Works in the eigenbasis of P Q P (P projects out the all-ones direction), so a singular Q is fine:
    components of the projected gradient in the null space give a zero-curvature descent ray.
    Returns (d, is_ray).
    """
    f = gf.size
    P = np.eye(f) - 1.0 / f
    w, V = np.linalg.eigh(P @ Qff @ P)
    r = V.T @ (gf - gf.mean())
    tol = 1e-12 * max(1.0, np.abs(w).max())
    null = w <= tol
    if np.abs(r[null]).max(initial=0.0) > 1e-12 * max(1.0, np.abs(r).max()):
        return -(V[:, null] @ r[null]), True
    coef = np.where(null, 0.0, -r / np.where(null, 1.0, w))
    return V @ coef, False


def _primal_active_set(Q, c, ub, mass, x0, max_iter=None):
    """Feasible descent active-set method from a feasible x0; returns (x, nu, iterations, success)."""
    n = c.size
    x = x0.copy()
    tol = 1e-12
    at_lo = x <= tol
    at_hi = (x >= ub - tol) & ~at_lo
    x[at_lo] = 0.0
    x[at_hi] = ub[at_hi]
    max_iter = max_iter or 20 * n + 100
    nu = 0.0
    for it in range(1, max_iter + 1):
        g = Q @ x + c
        F = np.flatnonzero(~at_lo & ~at_hi)
        d = np.zeros(n)
        is_ray = False
        if F.size > 1:
            d[F], is_ray = _descent_direction(Q[np.ix_(F, F)], g[F])
        if np.abs(d).max() <= 1e-14 * max(1.0, np.abs(x).max()) and not is_ray:
            # Stationary on the working set: check the multipliers of the active bounds.
            if F.size:
                nu = float(g[F].mean())
            else:
                lo_side = g[at_lo].min(initial=np.inf)
                hi_side = g[at_hi].max(initial=-np.inf)
                nu = float(lo_side if np.isfinite(lo_side) else hi_side)
            viol = np.zeros(n)
            viol[at_lo] = np.maximum(0.0, nu - g[at_lo])
            viol[at_hi] = np.maximum(0.0, g[at_hi] - nu)
            scale = 1.0 + np.abs(g).max()
            if viol.max() <= 1e-13 * scale:
                return x, nu, it, True
            # Release one bound; Bland's rule (lowest index) once iterations pile up, against cycling.
            bad = np.flatnonzero(viol > 1e-13 * scale)
            j = bad[0] if it > 2 * n else bad[np.argmax(viol[bad])]
            at_lo[j] = at_hi[j] = False
            continue
        # Ratio test: largest step keeping 0 <= x <= ub.
        with np.errstate(divide="ignore", invalid="ignore"):
            to_lo = np.where(d < 0, -x / d, np.inf)
            to_hi = np.where(d > 0, (ub - x) / d, np.inf)
        steps = np.minimum(to_lo, to_hi)
        j = int(np.argmin(steps))
        alpha = steps[j] if is_ray else min(1.0, steps[j])
        x = x + alpha * d
        if alpha == steps[j] and np.isfinite(alpha):
            if to_lo[j] <= to_hi[j]:
                x[j] = 0.0
                at_lo[j] = True
            else:
                x[j] = ub[j]
                at_hi[j] = True
        x = np.clip(x, 0.0, ub)
        # Keep sum(x) = mass exactly by absorbing rounding in the largest free coordinate.
        free = np.flatnonzero(~at_lo & ~at_hi)
        if free.size:
            k = free[np.argmax(x[free])]
            x[k] = np.clip(x[k] + mass - x.sum(), 0.0, ub[k])
    return x, nu, max_iter, False


def solve_dense(Q, c, ub, mass, free=None):
    """Exact minimiser on a dense (small or medium) problem: PDAS, falling back to primal active set."""
    n = c.size
    if free is None:
        free = np.ones(n, dtype=bool)
    out = _pdas(Q, c, ub, mass, free)
    if out is not None:
        x, nu, it = out
        return x, nu, it, "pdas"
    x0 = project_capped_simplex(np.where(free, mass / max(1, free.sum()), 0.0), np.zeros(n), ub, mass)
    x, nu, it, ok = _primal_active_set(Q, c, ub, mass, x0)
    return x, nu, it, "primal-active-set" if ok else "primal-active-set (iteration limit)"


def solve_box_simplex_qp(rows_t_times, diag_block, c, ub, mass, *, n_initial=200):
    """Column generation around ``solve_dense`` for large n.

    ``rows_t_times(idx, v)`` returns Q[idx, :]^T v (shape (n,)); ``diag_block(idx)`` returns
    Q[idx][:, idx].
    Coordinates outside the candidate set C stay at 0; after solving on C we compute the full gradient
    g = Q[C, :]^T x_C + c and add the coordinates with g_i < nu (they would enter the support), until none
    is left. Each round costs O(n |C|) plus a dense solve of size |C|.
    Returns (x, nu, iterations, info).
    """
    n = c.size
    movable = ub > 0
    if n <= n_initial:
        C = np.flatnonzero(movable)
    else:
        # Start from the coordinates most attractive at the centre of the feasible set.
        x_mid = project_capped_simplex(np.zeros(n), np.zeros(n), ub, mass)
        g_mid = rows_t_times(np.arange(n), x_mid) + c
        order = np.argsort(np.where(movable, g_mid, np.inf), kind="stable")
        C = np.sort(order[: min(n_initial, int(movable.sum()))])
    # The restricted problem must be feasible: add the largest caps until sum(ub_C) >= mass.
    if ub[C].sum() < mass:
        rest = np.setdiff1d(np.flatnonzero(movable), C)
        rest = rest[np.argsort(-ub[rest], kind="stable")]
        need = np.searchsorted(np.cumsum(ub[rest]), mass - ub[C].sum()) + 1
        C = np.sort(np.concatenate([C, rest[:need]]))
    total_it = 0
    rounds = 0
    prev_x = None
    while True:
        rounds += 1
        free = np.ones(C.size, dtype=bool) if prev_x is None else (prev_x > 0)
        xc, nu, it, how = solve_dense(diag_block(C), c[C], ub[C], mass, free=free)
        total_it += it
        x = np.zeros(n)
        x[C] = xc
        if C.size == int(movable.sum()):
            return x, nu, total_it, {"rounds": rounds, "candidates": int(C.size), "inner": how}
        support = C[xc > 0]
        g = rows_t_times(support, xc[xc > 0]) + c
        scale = 1.0 + np.abs(g).max()
        outside = np.ones(n, dtype=bool)
        outside[C] = False
        viol = np.flatnonzero(outside & movable & (g < nu - 1e-13 * scale))
        if viol.size == 0:
            return x, nu, total_it, {"rounds": rounds, "candidates": int(C.size), "inner": how}
        add = viol[np.argsort(g[viol], kind="stable")[: max(C.size, 64)]]
        # Remember the old support so the next dense solve starts warm (new columns start free).
        keep = np.zeros(n, dtype=bool)
        keep[support] = True
        keep[add] = True
        C = np.sort(np.concatenate([C, add]))
        prev_x = np.where(keep[C], 1.0, 0.0)

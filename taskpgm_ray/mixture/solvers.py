"""Minimise the TaskPGM energy over the probability simplex.

    E(p) = (lam / 2) p^T S p - beta u^T p,     p in F = {lo <= p <= hi, sum(p) = 1}

(lo = 0, hi = inf unless bounds are given). S must be symmetric positive semi-definite: build it from an
affinity with ``energy_matrix``. ``u`` defaults to the row sums of S ("representativeness").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from taskpgm_ray.mixture.active_set import solve_box_simplex_qp
from taskpgm_ray.mixture.block_matrix import BlockLowRank
from taskpgm_ray.mixture.simplex import frank_wolfe_gap, kkt_residual, project_capped_simplex

METHODS = ("exact", "closed_form", "first_order", "blocks")
_KERNEL_HINT = (
    "turn the affinity into an energy matrix with taskpgm_ray.mixture.energy_matrix(kernel='psd' or 'exp')"
)
_EXACT_CHECK_LIMIT = 500  # above: randomised symmetry and PSD checks, O(n^2) instead of O(n^3)
_DENSE_LIMIT = 20_000  # beyond this a dense S does not fit in memory comfortably; use BlockLowRank


@dataclass
class MixtureSolution:
    """The result of ``minimize_energy``.

    Attributes:
        weights: the mixture p, shape (n,), on the simplex (within the bounds).
        energy: E(p).
        kkt_residual: ``|| p - proj_F(p - grad E(p) / scale) ||_inf`` with
            ``scale = |lam| max|S| + |beta| max|u|``; 0 exactly at the minimiser
            (see ``simplex.kkt_residual``).
        method: the method used.
        iterations: linear solves (exact), iterations (first_order, blocks refinement), or 1.
        success: whether the method reached its tolerance.
        extra: method-specific numbers, e.g. the Frank-Wolfe gap and an energy lower bound.
    """

    weights: np.ndarray
    energy: float
    kkt_residual: float
    method: str
    iterations: int
    success: bool
    extra: dict = field(default_factory=dict)


def minimize_energy(
    S: np.ndarray | BlockLowRank,
    *,
    beta: float,
    lam: float,
    unary: np.ndarray | None = None,
    method: str = "exact",
    min_weight: float | np.ndarray | None = None,
    max_weight: float | np.ndarray | None = None,
    cap: np.ndarray | None = None,
    tol: float = 1e-9,
    max_iter: int | None = None,
    labels: np.ndarray | None = None,
    seed: int = 0,
) -> MixtureSolution:
    """Minimise ``E(p) = (lam/2) p^T S p - beta u^T p`` over the simplex (with optional bounds).

    Args:
        S: symmetric PSD energy matrix (n, n), or a ``BlockLowRank`` (first_order, blocks; exact and
            closed_form densify it up to n = 20000).
        beta, lam: weights of the unary and pairwise terms; ``lam >= 0`` keeps E convex.
        unary: u, shape (n,); ``None`` means the row sums of S.
        method: ``"exact"`` (active set on the KKT system, the true minimiser, O(n |support|) per
            round plus dense solves of the support size), ``"closed_form"`` (the paper's
            equality-constrained KKT solution projected onto the simplex; not the constrained minimiser
            in general), ``"first_order"`` (FISTA with restarts), ``"blocks"`` (within-block exact
            solves, a coarse problem over block masses, then first-order refinement).
        min_weight, max_weight: scalar or (n,) bounds lo <= p <= hi (exact and first_order only).
        cap: (n,) extra upper bounds, e.g. from a repetition cap ``p_i * budget <= cap_i * size_i``.
        tol: KKT residual target for the iterative methods.
        max_iter: iteration limit for first_order / the blocks refinement.
        labels: (n,) block ids for ``blocks`` on a dense S (default: k-means on a sketch of S's rows).
        seed: seed of that clustering.

    Raises:
        ValueError: S not square, not finite, not symmetric or not PSD (within tolerance); bad unary;
            ``lam < 0``; infeasible or unsupported bounds; unknown method.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not (np.isfinite(beta) and np.isfinite(lam)):
        raise ValueError(f"beta and lam must be finite, got beta={beta}, lam={lam}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0 (lam < 0 makes the energy non-convex), got {lam}")
    structured = isinstance(S, BlockLowRank)
    if structured and method in ("exact", "closed_form"):
        if S.shape[0] > _DENSE_LIMIT:
            raise ValueError(
                f"method={method!r} needs a dense S and n={S.shape[0]} > {_DENSE_LIMIT}; use method='blocks'"
            )
        S, structured = S.to_dense(), False
    if structured:
        _check_block_low_rank(S)
    else:
        S = _check_energy_matrix(S)
    n = S.shape[0]
    matvec = S.matvec if structured else (lambda x: S @ x)
    u = matvec(np.ones(n)) if unary is None else _check_vector(unary, n, "unary")
    lo, hi = _bounds(n, min_weight, max_weight, cap)
    bounded = bool(np.any(lo > 0) or np.any(np.isfinite(hi)))
    if bounded and method not in ("exact", "first_order"):
        raise ValueError(
            f"min_weight/max_weight/cap are supported by method='exact' and 'first_order', not {method!r}"
        )
    s_max = S.max_abs() if structured else float(np.abs(S).max())
    scale = abs(lam) * s_max + abs(beta) * float(np.abs(u).max())

    t0 = time.perf_counter()
    if scale == 0.0:  # E is identically 0: every feasible point is optimal
        p, iterations, success, extra = project_capped_simplex(np.zeros(n), lo, hi), 0, True, {}
    elif method == "exact":
        p, iterations, success, extra = _exact(S, lam, beta, u, lo, hi, scale, tol)
    elif method == "closed_form":
        p, iterations, success, extra = _closed_form(S, lam, beta, u)
    elif method == "first_order":
        from taskpgm_ray.mixture.first_order import fista

        x0 = project_capped_simplex(np.zeros(n), lo, hi)
        p, iterations, success, extra = fista(
            matvec, lam, beta, u, lo, hi, x0, scale, tol=tol, max_iter=max_iter or 20_000
        )
    else:
        from taskpgm_ray.mixture.blocks import solve_blocks

        p, iterations, success, extra = solve_blocks(
            S, lam, beta, u, scale, labels=labels, seed=seed, tol=tol, max_iter=max_iter or 500
        )
    Sp = matvec(p)
    g = lam * Sp - beta * u
    res = kkt_residual(p, g, lo, hi, scale)
    if method in ("exact", "first_order", "closed_form") or scale == 0.0:
        # closed_form is the paper's projection, not the constrained minimiser: it succeeds only when it is one
        success = success and res <= max(tol, 1e-12)
    extra.setdefault("gap", frank_wolfe_gap(p, g, lo, hi))
    energy = float(0.5 * lam * (p @ Sp) - beta * (u @ p))
    extra.setdefault("lower_bound", energy - extra["gap"])
    extra["seconds"] = time.perf_counter() - t0
    return MixtureSolution(p, energy, res, method, int(iterations), bool(success), extra)


def _exact(S, lam, beta, u, lo, hi, scale, tol):
    """Exact minimiser: active set (PDAS with a primal active-set fallback) + column generation."""
    n = S.shape[0]
    a = lam / scale  # Q = a S and c = -beta u / scale: the problem scaled to unit size
    c = -(beta / scale) * u
    if np.any(lo > 0):
        c = c + a * (S @ lo)
    mass = 1.0 - lo.sum()
    if mass <= 1e-15:
        return lo.copy(), 0, True, {}
    ub = hi - lo

    def rows_t_times(idx, v):
        return a * (v @ S) if idx.size == n else a * (v @ S[idx])

    def diag_block(idx):
        return a * S[np.ix_(idx, idx)]

    x, _, iterations, info = solve_box_simplex_qp(rows_t_times, diag_block, c, ub, mass)
    p = lo + x
    p = np.clip(p, lo, hi)
    return p, iterations, True, info


def _closed_form(S, lam, beta, u):
    """The paper's solution: [lam S, 1; 1^T, 0][p; nu] = [beta u; 1], then projection onto the simplex."""
    n = S.shape[0]
    K = np.zeros((n + 1, n + 1))
    K[:n, :n] = lam * S
    K[:n, n] = 1.0
    K[n, :n] = 1.0
    rhs = np.append(beta * u, 1.0)
    singular = False
    try:
        sol = np.linalg.solve(K, rhs)
        if not np.all(np.isfinite(sol)) or np.abs(K @ sol - rhs).max() > 1e-8 * (1 + np.abs(rhs).max()):
            raise np.linalg.LinAlgError
    except np.linalg.LinAlgError:
        singular = True  # pseudoinverse (minimum-norm least-squares) solution, as for a singular S
        sol = np.linalg.lstsq(K, rhs, rcond=None)[0]
    unprojected = sol[:n]
    p = project_capped_simplex(unprojected, np.zeros(n), np.full(n, np.inf))
    extra = {
        "unprojected": unprojected,
        "pseudoinverse": singular,
        "projection_distance": float(np.linalg.norm(p - unprojected)),
    }
    return p, 1, True, extra


def _check_energy_matrix(S) -> np.ndarray:
    S = np.asarray(S, dtype=np.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1] or S.shape[0] == 0:
        raise ValueError(f"S must be a non-empty square matrix, got shape {S.shape}")
    n = S.shape[0]
    if n > _DENSE_LIMIT:
        raise ValueError(
            f"dense S with n={n} > {_DENSE_LIMIT} tasks; pass a BlockLowRank and method='blocks'"
        )
    smax = max(float(S.max()), -float(S.min()))  # one pass each; NaN and inf propagate
    if not np.isfinite(smax):
        bad = np.argwhere(~np.isfinite(S))[0]
        raise ValueError(f"S contains NaN or inf (first at [{bad[0]}, {bad[1]}])")
    if smax == 0.0:
        return S
    asym = _asymmetry(S)
    if asym > 1e-10 * smax:
        raise ValueError(
            f"S is not symmetric (max |S - S^T| = {asym:.3g}); symmetrise it with "
            "taskpgm_ray.mixture.symmetrize or energy_matrix"
        )
    delta = 1e-9 * smax * max(1.0, np.sqrt(n))
    lam_min = _min_eigenvalue_if_negative(S, delta)
    if lam_min is not None:
        raise ValueError(f"S is not positive semi-definite (min eigenvalue {lam_min:.3g}); {_KERNEL_HINT}")
    return S


def _min_eigenvalue_if_negative(S: np.ndarray, delta: float) -> float | None:
    """The smallest eigenvalue of S if it is below -delta, else None.

    n <= 500: Cholesky of S + delta I (an exact test). Larger n: 30 Lanczos steps from a random start
    (30 products with S instead of an O(n^3) factorisation), which finds a clearly negative eigenvalue
    (an unshifted PMI affinity: its trace is 0) but can miss one that is tiny relative to the spread of
    the spectrum; the solution's KKT certificate is then a stationarity certificate only.
    """
    n = S.shape[0]
    if n <= _EXACT_CHECK_LIMIT:
        try:
            np.linalg.cholesky(S + delta * np.eye(n))
            return None
        except np.linalg.LinAlgError:
            return float(np.linalg.eigvalsh(S)[0])
    lam_min = _lanczos_min(S, steps=30)
    return lam_min if lam_min < -delta else None


def _lanczos_min(S: np.ndarray, steps: int) -> float:
    """Smallest Ritz value of S after ``steps`` Lanczos steps (full reorthogonalisation), random start."""
    n = S.shape[0]
    Q = np.zeros((steps + 1, n))
    q = np.random.default_rng(0).standard_normal(n)
    Q[0] = q / np.linalg.norm(q)
    alpha, beta = [], []
    for j in range(steps):
        w = S @ Q[j]
        alpha.append(float(Q[j] @ w))
        w -= Q[: j + 1].T @ (Q[: j + 1] @ w)
        w -= Q[: j + 1].T @ (Q[: j + 1] @ w)
        b = float(np.linalg.norm(w))
        if b < 1e-12 * abs(alpha[-1]) + 1e-300:
            break
        beta.append(b)
        Q[j + 1] = w / b
    k = len(alpha)
    T = np.diag(alpha) + np.diag(beta[: k - 1], 1) + np.diag(beta[: k - 1], -1)
    return float(np.linalg.eigvalsh(T)[0])


def _asymmetry(S: np.ndarray) -> float:
    """max |S - S^T|: exact for n <= 500; above, the lower bound ||(S - S^T) x||_inf / ||x||_1 from
    one random x (two passes over S instead of a transposed copy)."""
    n = S.shape[0]
    if n <= _EXACT_CHECK_LIMIT:
        return float(np.abs(S - S.T).max())
    x = np.random.default_rng(0).standard_normal(n)
    return float(np.abs(S @ x - x @ S).max() / np.abs(x).sum())


def _check_block_low_rank(S: BlockLowRank) -> None:
    smax = S.max_abs()
    lam_min = S.min_block_eigenvalue()
    if lam_min < -1e-9 * max(smax, np.finfo(float).tiny):
        raise ValueError(
            f"S is not positive semi-definite (a diagonal block has min eigenvalue {lam_min:.3g}); "
            + _KERNEL_HINT
        )


def _check_vector(v, n: int, name: str) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    if v.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(
            f"{name} contains NaN or inf (first at index {int(np.flatnonzero(~np.isfinite(v))[0])})"
        )
    return v


def _bounds(n, min_weight, max_weight, cap):
    """lo, hi arrays from the optional bounds; ValueError when they are malformed or infeasible."""
    lo = np.zeros(n) if min_weight is None else np.broadcast_to(np.asarray(min_weight, float), (n,)).copy()
    hi = (
        np.full(n, np.inf)
        if max_weight is None
        else np.broadcast_to(np.asarray(max_weight, float), (n,)).copy()
    )
    if cap is not None:
        cap = np.asarray(cap, dtype=np.float64)
        if cap.shape != (n,):
            raise ValueError(f"cap must have shape ({n},), got {cap.shape}")
        hi = np.minimum(hi, cap)  # +inf means no cap; NaN is caught below
    if np.any(np.isnan(lo)) or np.any(np.isnan(hi)) or np.any(np.isinf(lo)):
        raise ValueError("min_weight/max_weight/cap must not contain NaN (min_weight must be finite)")
    if np.any(lo < 0):
        raise ValueError(f"min_weight must be >= 0, got {lo.min():.3g} at task {int(np.argmin(lo))}")
    if np.any(hi < lo):
        i = int(np.flatnonzero(hi < lo)[0])
        raise ValueError(f"infeasible bounds: upper bound {hi[i]:.3g} < lower bound {lo[i]:.3g} at task {i}")
    if lo.sum() > 1 + 1e-12:
        raise ValueError(f"infeasible bounds: the lower bounds sum to {lo.sum():.6g} > 1")
    if hi.sum() < 1 - 1e-12:
        raise ValueError(f"infeasible bounds: the upper bounds sum to {hi.sum():.6g} < 1")
    return lo, hi

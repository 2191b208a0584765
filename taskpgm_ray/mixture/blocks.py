"""Block decomposition for 10^4-10^5 tasks.

1. Partition the tasks into blocks (the blocks of a ``BlockLowRank``, or k-means on a random sketch of
   the rows of a dense S).
2. Within each block b, solve the energy exactly on the block's simplex: q_b.
3. Restrict p to ``sum_b m_b q_b`` and solve the coarse problem over the block masses m exactly:
   ``E = (lam/2) m^T C m - beta w^T m`` with ``C_bc = q_b^T S_bc q_c`` and ``w_b = u_b^T q_b``.
4. Refine on the full problem with FISTA, started from the coarse solution.

The Frank-Wolfe gap ``g^T p - min_i g_i`` (g = grad E(p)) bounds ``E(p) - min E`` from above for
convex E, so every result carries a certified lower bound ``E(p) - gap``.
"""

from __future__ import annotations

import numpy as np

from taskpgm_ray.mixture.active_set import solve_dense
from taskpgm_ray.mixture.block_matrix import BlockLowRank
from taskpgm_ray.mixture.first_order import fista
from taskpgm_ray.mixture.simplex import frank_wolfe_gap


def _kmeans_labels(S: np.ndarray, n_blocks: int, seed: int) -> np.ndarray:
    """k-means (Lloyd, k-means++ start) on the rows of S @ G, G an (n, 16) Gaussian sketch."""
    rng = np.random.default_rng(seed)
    n = S.shape[0]
    X = S @ rng.standard_normal((n, 16))
    X /= np.linalg.norm(X, axis=1, keepdims=True) + 1e-300
    centers = [X[rng.integers(n)]]
    d2 = ((X - centers[0]) ** 2).sum(1)
    for _ in range(1, n_blocks):
        centers.append(X[rng.choice(n, p=d2 / d2.sum()) if d2.sum() > 0 else rng.integers(n)])
        d2 = np.minimum(d2, ((X - centers[-1]) ** 2).sum(1))
    C = np.array(centers)
    for _ in range(20):
        labels = np.argmin((X**2).sum(1)[:, None] - 2 * X @ C.T + (C**2).sum(1)[None, :], axis=1)
        for k in range(n_blocks):
            members = labels == k
            if members.any():
                C[k] = X[members].mean(0)
    return np.unique(labels, return_inverse=True)[1]


def _block_solve(Sbb: np.ndarray, ub: np.ndarray, lam: float, beta: float, scale: float) -> np.ndarray:
    """Exact minimiser of (lam/2) q^T Sbb q - beta ub^T q on the block's simplex."""
    k = Sbb.shape[0]
    if k == 1:
        return np.ones(1)
    x, _, _, _ = solve_dense((lam / scale) * Sbb, -(beta / scale) * ub, np.full(k, np.inf), 1.0)
    return x


def solve_blocks(S, lam, beta, u, scale, *, labels=None, seed=0, tol=1e-9, max_iter=500):
    """Block decomposition + coarse solve + FISTA refinement; returns (p, iterations, converged, extra)."""
    n = u.size
    structured = isinstance(S, BlockLowRank)
    if structured:
        labels = S.labels()
        matvec = S.matvec
    else:
        if labels is None:
            labels = _kmeans_labels(S, max(1, int(np.ceil(np.sqrt(n)))), seed)
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
        labels = np.unique(labels, return_inverse=True)[1]
        matvec = lambda x: S @ x  # noqa: E731
    n_blocks = int(labels.max()) + 1
    members = [np.flatnonzero(labels == b) for b in range(n_blocks)]

    # 2. within-block exact solves
    q = np.zeros(n)
    for b, idx in enumerate(members):
        Sbb = S.diagonal_block(b) if structured else S[np.ix_(idx, idx)]
        q[idx] = _block_solve(Sbb, u[idx], lam, beta, scale)

    # 3. coarse problem over block masses: C = P^T S P, P the (n, B) matrix with columns q_b
    if structured:
        V = S.low_rank
        Z = np.stack([V[idx].T @ q[idx] for idx in members], axis=1)  # (r, B)
        d = np.array([q[idx] @ S.blocks[b] @ q[idx] for b, idx in enumerate(members)])
        C = np.diag(d) + Z.T @ Z
    else:
        P = np.zeros((n, n_blocks))
        P[np.arange(n), labels] = q
        C = P.T @ (S @ P)
    C = 0.5 * (C + C.T)
    w = np.bincount(labels, weights=u * q, minlength=n_blocks)
    m, _, _, _ = solve_dense((lam / scale) * C, -(beta / scale) * w, np.full(n_blocks, np.inf), 1.0)
    p0 = q * m[labels]
    Sp0 = matvec(p0)
    e0 = float(0.5 * lam * (p0 @ Sp0) - beta * (u @ p0))
    lo, hi = np.zeros(n), np.full(n, np.inf)
    gap0 = frank_wolfe_gap(p0, lam * Sp0 - beta * u, lo, hi)

    # 4. first-order refinement on the full problem
    p, iterations, converged, info = fista(
        matvec, lam, beta, u, lo, hi, p0, scale, tol=tol, max_iter=max_iter
    )
    extra = {"n_blocks": n_blocks, "energy_coarse": e0, "gap_coarse": gap0, **info}
    return p, iterations, converged, extra

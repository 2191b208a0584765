"""The least-squares fits behind the likelihood completion (mixture/completion.py): shard offsets within
cells, and the additive + low-rank model ``mu + a_i + b_j + U_i . V_j`` by weighted alternating least squares.

Pure numpy; private to the completion (the estimator, its error model and their reasons: completion.py).
"""

from __future__ import annotations

import numpy as np


def _shard_offsets(ybar_s, cw, m, c, sweeps: int = 30, known_noise=None):
    """Fit ``y_ijs = mean_ij + d_js`` on cells with >= 2 scored shards; return d, corrected cell means,
    the per-example noise sigma_j^2 (pooled towards the all-task value) and each offset's variance."""
    n, _, n_shards = ybar_s.shape
    multi = (cw > 0).sum(2) >= 2  # (n, n): cells that see within-cell variation
    wm = cw * multi[:, :, None]
    den = wm.sum(0)  # (n, S) examples behind each offset
    est = den > 0
    d = np.zeros((n, n_shards))
    safe_m = np.maximum(m, 1e-300)
    for _ in range(sweeps):
        mean = (cw * (ybar_s - d[None])).sum(2) / safe_m
        d_new = np.where(est, (wm * (ybar_s - mean[:, :, None])).sum(0) / np.maximum(den, 1e-300), 0.0)
        w = c * est
        d_new -= (w * d_new).sum(1, keepdims=True) / np.maximum(w.sum(1, keepdims=True), 1e-300) * est
        if np.max(np.abs(d_new - d)) < 1e-12:
            d = d_new
            break
        d = d_new
    mean = (cw * (ybar_s - d[None])).sum(2) / safe_m
    resid = np.where(cw > 0, ybar_s - mean[:, :, None] - d[None], 0.0)
    ss = (wm * resid**2).sum((0, 2))  # (n,) per task: sum c r^2 over multi-shard cells
    dof = np.maximum((wm > 0).sum((0, 2)) - multi.sum(0) - np.maximum(est.sum(1) - 1, 0), 0)
    if dof.sum() > 0:
        pooled = ss.sum() / dof.sum()
    else:  # no cell with two scored shards anywhere: the scatter of cell means is all we have
        obs = m > 0
        pooled = float(np.var(mean[obs]) * np.median(m[obs])) if obs.sum() > 1 else 1.0
    pooled = max(pooled, 1e-12)
    prior_dof = 3.0
    noise_var = (ss + prior_dof * pooled) / (dof + prior_dof)
    if known_noise is not None:
        known = np.asarray(known_noise, dtype=np.float64)
        if known.shape != (n,) or np.any(known[np.isfinite(known)] <= 0):
            raise ValueError(f"noise_var must be (n,) = ({n},) values > 0 (NaN: unknown), got {known!r}")
        noise_var = np.where(np.isfinite(known), known, noise_var)
    # d_js is a mean of (shard mean - cell mean) over the multi-shard cells that scored shard s, each with
    # variance sigma_j^2 (1 / c_js - 1 / m_ij).
    inv = np.where(wm > 0, 1.0 / np.maximum(1.0 / np.maximum(cw, 1e-300) - 1.0 / safe_m[:, :, None], 1e-300), 0.0)
    d_var = np.where(est, noise_var[:, None] / np.maximum(inv.sum(0), 1e-300), 0.0)
    return d, mean, noise_var, d_var


def _fit_additive_low_rank(Yo, W, rank, ridge, max_iter, rng, tol=1e-7):
    """Weighted least squares for ``mu + a_i + b_j + U_i . V_j`` on the cells with W > 0."""
    n = Yo.shape[0]
    sw = W.sum()
    if sw <= 0:
        return {"pred": np.zeros((n, n)), "iterations": 0}
    lam = ridge * sw / (n * n)  # ridge in units of the mean cell weight
    lam_ab = 1e-3 * sw / (n * n)  # keeps unobserved rows/columns at 0
    mu = float((W * Yo).sum() / sw)
    a, b = np.zeros(n), np.zeros(n)
    row_w, col_w = W.sum(1), W.sum(0)
    for _ in range(3):  # the additive part alone, to start from
        a = (W * (Yo - mu - b[None, :])).sum(1) / (row_w + lam_ab)
        b = (W * (Yo - mu - a[:, None])).sum(0) / (col_w + lam_ab)
    # Start the factors from the top singular vectors of the zero-filled residual (scaled by the share of
    # cells seen): from small random factors, ALS with a ridge creeps and the loss looks converged.
    R = np.where(W > 0, Yo - mu - a[:, None] - b[None, :], 0.0) / max(float((W > 0).mean()), 1e-12)
    U, V = _top_factors(R, rank, rng)
    eye = np.eye(rank)
    prev = np.inf
    sweeps = 0
    while sweeps < max_iter:
        sweeps += 1
        # additive part given the low-rank part (a few Gauss-Seidel sweeps)
        E = Yo - U @ V.T
        for _ in range(3):
            mu = float((W * (E - a[:, None] - b[None, :])).sum() / sw)
            a = (W * (E - mu - b[None, :])).sum(1) / (row_w + lam_ab)
            b = (W * (E - mu - a[:, None])).sum(0) / (col_w + lam_ab)
        if rank:
            R = Yo - mu - a[:, None] - b[None, :]
            # (n, r, r) Gram matrices sum_j W_ij V_j V_j^T as one matrix product
            G = (W @ (V[:, :, None] * V[:, None, :]).reshape(n, -1)).reshape(n, rank, rank) + lam * eye
            U = np.linalg.solve(G, ((W * R) @ V)[:, :, None])[:, :, 0]
            G = (W.T @ (U[:, :, None] * U[:, None, :]).reshape(n, -1)).reshape(n, rank, rank) + lam * eye
            V = np.linalg.solve(G, ((W * R).T @ U)[:, :, None])[:, :, 0]
        pred = mu + a[:, None] + b[None, :] + U @ V.T
        loss = float((W * (Yo - pred) ** 2).sum() + lam * ((U**2).sum() + (V**2).sum()))
        if prev - loss <= tol * max(loss, 1e-300):
            break
        prev = loss
    return {"pred": mu + a[:, None] + b[None, :] + U @ V.T, "iterations": sweeps}


def _top_factors(R, rank, rng, power: int = 3):
    """``U V^T`` ~ the best rank-``rank`` approximation of R (randomised subspace iteration, O(n^2 rank))."""
    n = R.shape[0]
    if rank == 0:
        return np.zeros((n, 0)), np.zeros((n, 0))
    Q = np.linalg.qr(R @ rng.standard_normal((n, rank + 5)))[0]
    for _ in range(power):
        Q = np.linalg.qr(R @ np.linalg.qr(R.T @ Q)[0])[0]
    u, sv, vt = np.linalg.svd(Q.T @ R, full_matrices=False)
    root = np.sqrt(sv[:rank])
    return (Q @ u[:, :rank]) * root, vt[:rank].T * root

"""Confidence intervals for the affinity and the weights, by resampling probe shards.

The estimator accumulates per-shard sums: ``loglik_sum[s, i, j]`` (proxy i on the task-j examples of
shard s) and ``count[s, j]``. A bootstrap replicate draws the shards with replacement, re-forms
``L = sum loglik_sum / sum count`` (column-wise), the PMI affinity and the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from taskpgm_ray.mixture.affinity import pmi_affinity


@dataclass
class BootstrapResult:
    """Mean and percentile interval [low, high] per weight (n,) and per affinity entry (n, n)."""

    weights_mean: np.ndarray
    weights_low: np.ndarray
    weights_high: np.ndarray
    affinity_mean: np.ndarray
    affinity_low: np.ndarray
    affinity_high: np.ndarray
    weights_samples: np.ndarray  # (n_boot, n)
    n_boot: int
    level: float


def bootstrap_weights(
    loglik_sum: np.ndarray,
    count: np.ndarray,
    solve_fn: Callable[[np.ndarray], np.ndarray],
    *,
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.90,
) -> BootstrapResult:
    """Shard bootstrap of the PMI affinity and of ``solve_fn(affinity) -> weights``.

    Args:
        loglik_sum: (n_shards, n, n) per-shard log-likelihood sums.
        count: (n_shards, n) per-shard example counts per task.
        solve_fn: maps a PMI affinity (n, n) to weights (n,), e.g.
            ``lambda A: minimize_energy(energy_matrix(A), beta=1, lam=1).weights``.
        n_boot: replicates; seed: their seed; level: central interval mass (0.90 -> 5th/95th percentiles).
    Replicates in which some task gets no examples are redrawn.
    """
    ll = np.asarray(loglik_sum, dtype=np.float64)
    cnt = np.asarray(count, dtype=np.float64)
    if ll.ndim != 3 or ll.shape[1] != ll.shape[2]:
        raise ValueError(f"loglik_sum must have shape (n_shards, n, n), got {ll.shape}")
    if cnt.shape != ll.shape[:2]:
        raise ValueError(f"count must have shape {ll.shape[:2]} (n_shards, n), got {cnt.shape}")
    if np.any(cnt < 0) or np.any(cnt.sum(0) <= 0):
        raise ValueError("count must be >= 0 with at least one example per task over all shards")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n_shards, n = cnt.shape
    rng = np.random.default_rng(seed)
    W, A = [], []
    draws = 0
    while len(W) < n_boot:
        draws += 1
        if draws > 100 * n_boot:
            raise ValueError("too many replicates without examples of some task; use more shards")
        pick = rng.integers(0, n_shards, n_shards)
        c = cnt[pick].sum(0)
        if np.any(c <= 0):
            continue
        aff = pmi_affinity(ll[pick].sum(0) / c[None, :])
        A.append(aff)
        W.append(np.asarray(solve_fn(aff), dtype=np.float64))
    W, A = np.array(W), np.array(A)
    q = 100 * (1 - level) / 2
    return BootstrapResult(
        W.mean(0),
        np.percentile(W, q, axis=0),
        np.percentile(W, 100 - q, axis=0),
        A.mean(0),
        np.percentile(A, q, axis=0),
        np.percentile(A, 100 - q, axis=0),
        W,
        n_boot,
        level,
    )

"""Mixtures that need no proxies, always reported next to TaskPGM's."""

from __future__ import annotations

import numpy as np

KINDS = ("uniform", "size", "temperature")


def baseline_weights(kind: str, sizes, *, temperature: float | None = None) -> np.ndarray:
    """``uniform``: p_i = 1/n; ``size``: p_i ∝ N_i; ``temperature``: p_i ∝ N_i^(1/T).

    Args:
        kind: one of "uniform", "size", "temperature".
        sizes: (n,) training examples per task, all > 0.
        temperature: T > 0, required for (and only for) kind="temperature"; T = 1 is "size",
            T -> inf tends to "uniform".
    """
    if kind not in KINDS:
        raise ValueError(f"unknown baseline {kind!r}; choose one of {', '.join(KINDS)}")
    N = np.asarray(sizes, dtype=np.float64)
    if N.ndim != 1 or N.size == 0:
        raise ValueError(f"sizes must be a non-empty 1-d array, got shape {N.shape}")
    if not np.all(np.isfinite(N)) or np.any(N <= 0):
        i = int(np.flatnonzero(~(np.isfinite(N) & (N > 0)))[0])
        raise ValueError(f"sizes must be finite and > 0; task {i} has size {N[i]}")
    if kind == "temperature":
        if temperature is None:
            raise ValueError("kind='temperature' needs temperature=T (> 0)")
        if not (np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    elif temperature is not None:
        raise ValueError(f"temperature is only used by kind='temperature', not {kind!r}")
    if kind == "uniform":
        return np.full(N.size, 1.0 / N.size)
    if kind == "size":
        return N / N.sum()
    logw = np.log(N) / temperature  # in log space: N^(1/T) overflows for small T
    w = np.exp(logw - logw.max())
    return w / w.sum()


def within_bounds(weights, lo, hi=None) -> np.ndarray:
    """The mixture a fine-tune with per-task bounds trains on: ``p_i = clip(c * w_i, lo_i, hi_i)``, ``sum p = 1``.

    One protocol for every method: the repetition caps (``hi``) and the floor (``lo``) are constraints of the
    fine-tune, so uniform, size, temperature, a user's file and TaskPGM's solution all pass through this. It
    keeps the proportions of the tasks strictly inside their bounds (the scale ``c`` is found by bisection on
    the monotone ``sum clip(c w, lo, hi)``), and is the identity on a mixture already within them.

    Args:
        weights: (n,) non-negative, summing to a positive number.
        lo, hi: (n,) bounds (or scalars; ``hi=None``: no upper bound) with ``sum lo <= 1 <= sum hi``.

    Raises:
        ValueError: bounds that no mixture meets, or weights that are negative or all zero.
    """
    w = np.asarray(weights, dtype=np.float64)
    n = w.size
    lo = np.broadcast_to(np.asarray(lo, dtype=np.float64), (n,))
    hi = np.ones(n) if hi is None else np.minimum(1.0, np.broadcast_to(np.asarray(hi, dtype=np.float64), (n,)))
    if np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    if np.any(lo > hi + 1e-12) or lo.sum() > 1 + 1e-9 or hi.sum() < 1 - 1e-9:
        raise ValueError(f"no mixture meets these bounds (sum of lower bounds {lo.sum():.6g}, of upper bounds "
                         f"{hi.sum():.6g})")
    w = w / w.sum()
    if np.all(w >= lo - 1e-12) and np.all(w <= hi + 1e-12):
        return np.clip(w, lo, hi) / np.clip(w, lo, hi).sum()
    a, b = 0.0, 1.0
    while np.clip(b * w, lo, hi).sum() < 1.0 and b < 1e12:  # bracket the scale
        b *= 2.0
    if np.clip(b * w, lo, hi).sum() < 1.0 - 1e-9:
        raise ValueError("the upper bounds of the tasks with positive weight add up to less than 1")
    for _ in range(200):  # bisection to float precision
        c = 0.5 * (a + b)
        a, b = (c, b) if np.clip(c * w, lo, hi).sum() < 1.0 else (a, c)
    p = np.clip(b * w, lo, hi)
    return p / p.sum()

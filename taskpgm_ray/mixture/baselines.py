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

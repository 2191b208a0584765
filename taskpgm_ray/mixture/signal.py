"""Signal before mixture: did each proxy learn its task, and can the affinity be told from noise?

Pure numpy, from per-example response log-likelihoods on the probe sets (the estimate stage keeps them):

- ``proxy_gains``: each proxy's gain over the base model on its own probe set, as the relative drop of
  the mean response NLL, ``1 - NLL_proxy / NLL_base``, with a paired bootstrap interval over examples.
- ``input_information``: how much a model's answer depends on the question. For task j, pair every
  probe prompt with another example's response (a fixed rotation); then
  ``I = mean log p(y_k | x_k) - mean log p(y_k | x_{k+1})`` estimates the mutual information between
  input and output under the model (nats per example). A task whose targets do not depend on the input
  (noise) has ``I ~ 0`` under any model; fine-tuning on a real skill raises it. ``gain`` is the proxy's
  I minus the base model's: how much input-dependence fine-tuning on the task added.
- ``output_only``: tasks whose proxy learned the answers (own gain at least ``MIN_GAIN``) but added no
  input-output information (its lower bound is 0 and its estimate under ``MIN_GAIN`` of the base NLL): data
  whose targets ignore the prompt. The energy's prior gives them only the floor (``taskpgm_mixture(prior_skip=...)``).
- ``affinity_snr``: the PMI affinity's spread across task pairs over its sampling noise (bootstrap over
  each task's probe examples), and how often each task's nearest neighbour survives a resample.

References: the PMI affinity is DESIGN.md's (TaskPGM, arXiv 2507.12612); the bootstrap is the plain
percentile bootstrap (Efron & Tibshirani 1993).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from taskpgm_ray.mixture.affinity import pmi_affinity

# A proxy "learned" when its relative NLL gain over the base on its own probe set is at least this (the
# signal checks also ask its bootstrap interval to exclude 0); information under this share of the base NLL
# is negligible.
MIN_GAIN = 0.05


@dataclass
class ProxyGain:
    """One task's proxy against the base model on the task's own probe set (NLL in nats per example)."""

    base_nll: float
    proxy_nll: float
    gain: float  # 1 - proxy_nll / base_nll (relative drop); > 0 means the proxy learned something
    low: float  # bootstrap interval on gain
    high: float
    examples: int


@dataclass
class InputInformation:
    """Input-output dependence on one task's probe set (nats per example)."""

    proxy: float  # I under the task's proxy
    base: float  # I under the base model
    gain: float  # proxy - base
    low: float  # bootstrap interval on gain
    high: float
    examples: int


@dataclass
class AffinitySignal:
    """The PMI affinity, its bootstrap noise and the signal-to-noise ratio."""

    affinity: np.ndarray  # (n, n) PMI affinity from all examples
    noise: np.ndarray  # (n, n) bootstrap standard deviation of each entry
    snr: float  # std of the off-diagonal entries / RMS of their bootstrap std
    nearest: list[int]  # each task's nearest neighbour (largest off-diagonal affinity)
    nearest_stability: list[float]  # fraction of resamples that keep that nearest neighbour
    resamples: int
    extra: dict = field(default_factory=dict)


def information_gain(information_sum: np.ndarray, base_information_sum: np.ndarray, information_count: np.ndarray,
                     gain_sq_sum: np.ndarray | None = None, z: float = 1.645) -> np.ndarray | None:
    """Per task, the input-output information the proxy added over the base (nats per example).

    With ``gain_sq_sum`` (the sum of each example's squared gain) the result is the lower one-sided 95%
    confidence bound, floored at 0: ``max(0, mean - z * se)``, so a task whose gain cannot be told from 0
    (noise, or a proxy that learned only the answers' format) gets no credit for sampling luck.
    Returns None until every task has a rotated pair.
    """
    cnt = np.asarray(information_count, dtype=np.float64)
    if np.any(cnt <= 0):
        return None
    mean = (np.asarray(information_sum, dtype=np.float64) - np.asarray(base_information_sum)) / cnt
    if gain_sq_sum is None:
        return mean
    var = np.maximum(np.asarray(gain_sq_sum, dtype=np.float64) / cnt - mean**2, 0.0) * cnt / np.maximum(cnt - 1, 1)
    se = np.where(cnt > 1, np.sqrt(var / cnt), np.inf)
    return np.maximum(0.0, mean - z * se)


def output_only(signal: Mapping[str, np.ndarray], own_loglik_sum: np.ndarray, count: np.ndarray, *,
                min_gain: float = MIN_GAIN) -> np.ndarray | None:
    """Per task, whether its proxy learned the answers but not their dependence on the prompt.

    True where the own proxy's relative gain over the base, ``1 - NLL_proxy / NLL_base``, is at least
    ``min_gain``, the information gain's lower bound (``information_gain``) is 0, and its estimate is under
    ``min_gain`` of the base NLL: negligible, not merely uncertain (a small probe set of a real skill has a wide
    interval but a clearly positive estimate). A proxy that learned nothing is not flagged: no evidence is not
    evidence of noise.

    Args:
        signal: per-task sums as ``likelihoods.npz`` stores them: ``base_loglik_sum``, ``information_sum``,
            ``base_information_sum``, ``information_count`` and optionally ``information_gain_sq_sum``.
        own_loglik_sum: (n,) each task's own proxy's summed log-likelihood on its probe set (the diagonal).
        count: (n,) the probe examples in those sums.

    Returns:
        (n,) bool, or None when a sum is missing or some task has no rotated pair yet.
    """
    need = ("base_loglik_sum", "information_sum", "base_information_sum", "information_count")
    if any(signal.get(k) is None for k in need):
        return None
    low = information_gain(signal["information_sum"], signal["base_information_sum"], signal["information_count"],
                           signal.get("information_gain_sq_sum"))
    if low is None:
        return None
    count = np.maximum(np.asarray(count, dtype=np.float64), 1.0)
    base_nll = -np.asarray(signal["base_loglik_sum"], dtype=np.float64) / count
    proxy_nll = -np.asarray(own_loglik_sum, dtype=np.float64) / count
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(base_nll > 0, 1.0 - proxy_nll / base_nll, 0.0)
    mean = (np.asarray(signal["information_sum"], dtype=np.float64) - np.asarray(signal["base_information_sum"])) \
        / np.asarray(signal["information_count"], dtype=np.float64)
    return (gain >= min_gain) & (low <= 0) & (mean < min_gain * base_nll)


def _check_pairs(a: Sequence[np.ndarray], b: Sequence[np.ndarray], names: tuple[str, str]) -> None:
    if len(a) != len(b):
        raise ValueError(f"{names[0]} and {names[1]} must list the same tasks, got {len(a)} and {len(b)}")
    for j, (x, y) in enumerate(zip(a, b)):
        if np.shape(x) != np.shape(y) or np.ndim(x) != 1:
            raise ValueError(f"task {j}: {names[0]} and {names[1]} must be 1-d arrays of the same length, "
                             f"got shapes {np.shape(x)} and {np.shape(y)}")
        if len(x) and not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            raise ValueError(f"task {j}: log-likelihoods contain NaN or inf")


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    q = 100 * (1 - level) / 2
    return float(np.percentile(samples, q)), float(np.percentile(samples, 100 - q))


def proxy_gains(own: Sequence[np.ndarray], base: Sequence[np.ndarray], *, n_boot: int = 200,
                level: float = 0.90, seed: int = 0) -> list[ProxyGain]:
    """Each proxy's relative NLL gain over the base on its own probe set, with a paired bootstrap interval.

    Args:
        own: ``own[j]`` holds proxy j's response log-likelihood of each of task j's probe examples.
        base: ``base[j]`` the base model's, on the same examples in the same order.
        n_boot, level, seed: bootstrap resamples (over examples, paired), interval level, RNG seed.
    """
    _check_pairs(own, base, ("own", "base"))
    rng = np.random.default_rng(seed)
    out = []
    for x, b in zip(own, base):
        x, b = np.asarray(x, np.float64), np.asarray(b, np.float64)
        if len(x) == 0:
            out.append(ProxyGain(float("nan"), float("nan"), float("nan"), float("nan"), float("nan"), 0))
            continue
        base_nll, proxy_nll = -b.mean(), -x.mean()
        gain = 1.0 - proxy_nll / base_nll if base_nll > 0 else float("nan")
        idx = rng.integers(0, len(x), size=(n_boot, len(x)))
        bn, pn = -b[idx].mean(1), -x[idx].mean(1)
        boot = np.where(bn > 0, 1.0 - pn / np.where(bn > 0, bn, 1.0), np.nan)
        low, high = _interval(boot[np.isfinite(boot)], level) if np.isfinite(boot).any() else (np.nan, np.nan)
        out.append(ProxyGain(float(base_nll), float(proxy_nll), float(gain), low, high, len(x)))
    return out


def input_information(own: Sequence[np.ndarray], own_rotated: Sequence[np.ndarray], base: Sequence[np.ndarray],
                      base_rotated: Sequence[np.ndarray], *, n_boot: int = 200, level: float = 0.90,
                      seed: int = 0) -> list[InputInformation]:
    """Input-output information under each task's proxy and under the base, and the proxy's gain.

    ``own[j][k]`` is proxy j's log p(y_k | x_k) on task j's probe example k, ``own_rotated[j][k]`` its
    log p(y_k | x_k') for another example's prompt k' (the same pairing for the base). A task with fewer
    than two probe examples has no rotation: its entry is NaN with ``examples = 0``.
    """
    for a, b, names in ((own, own_rotated, ("own", "own_rotated")), (own, base, ("own", "base")),
                        (base, base_rotated, ("base", "base_rotated"))):
        _check_pairs(a, b, names)
    rng = np.random.default_rng(seed)
    out = []
    for x, xr, b, br in zip(own, own_rotated, base, base_rotated):
        dx = np.asarray(x, np.float64) - np.asarray(xr, np.float64)  # per-example information, proxy
        db = np.asarray(b, np.float64) - np.asarray(br, np.float64)  # and base
        if len(dx) < 2:
            out.append(InputInformation(*(float("nan"),) * 5, 0))
            continue
        idx = rng.integers(0, len(dx), size=(n_boot, len(dx)))
        low, high = _interval((dx - db)[idx].mean(1), level)
        out.append(InputInformation(float(dx.mean()), float(db.mean()), float((dx - db).mean()), low, high, len(dx)))
    return out


def affinity_snr(per_example: Sequence[np.ndarray], *, n_boot: int = 200, seed: int = 0) -> AffinitySignal:
    """Signal-to-noise of the PMI affinity, from every proxy's log-likelihood of every probe example.

    Args:
        per_example: ``per_example[j]`` is an (n, m_j) array: row i = proxy i's response log-likelihood of
            each of task j's m_j probe examples. The PMI affinity is ``pmi_affinity(L)`` with ``L[i, j]`` the
            row mean of ``per_example[j]``.
        n_boot, seed: bootstrap resamples of each task's examples (the same draw for every proxy).

    Returns:
        ``AffinitySignal``: ``snr`` below about 2 means the pattern across tasks is mostly sampling noise.
    """
    n = len(per_example)
    if n < 2:
        raise ValueError(f"affinity_snr needs at least 2 tasks, got {n}")
    cols = [np.asarray(c, np.float64) for c in per_example]
    for j, c in enumerate(cols):
        if c.ndim != 2 or c.shape[0] != n or c.shape[1] < 1:
            raise ValueError(f"per_example[{j}] must have shape ({n}, m>=1), got {c.shape}")
        if not np.all(np.isfinite(c)):
            raise ValueError(f"per_example[{j}] contains NaN or inf")
    L = np.stack([c.mean(1) for c in cols], axis=1)
    S = pmi_affinity(L)
    rng = np.random.default_rng(seed)
    boots = np.empty((n_boot, n, n))
    for b in range(n_boot):
        Lb = np.stack([c[:, rng.integers(0, c.shape[1], c.shape[1])].mean(1) for c in cols], axis=1)
        boots[b] = pmi_affinity(Lb)
    noise = boots.std(0)
    off = ~np.eye(n, dtype=bool)
    rms_noise = float(np.sqrt(np.mean(noise[off] ** 2)))
    spread = float(S[off].std()) if n > 2 else float(abs(S[0, 1]))
    snr = spread / rms_noise if rms_noise > 0 else float("inf")
    nearest = [int(np.argmax(np.where(off[i], S[i], -np.inf))) for i in range(n)]
    boot_nearest = np.argmax(np.where(off[None], boots, -np.inf), axis=2)  # (n_boot, n)
    stability = [float(np.mean(boot_nearest[:, i] == nearest[i])) for i in range(n)]
    return AffinitySignal(S, noise, snr, nearest, stability, n_boot)

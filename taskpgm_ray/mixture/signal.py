"""Signal before mixture: did each proxy learn its task, and can the affinity be told from noise?

Pure numpy, from per-example response log-likelihoods on the probe sets (the estimate stage keeps them):

- ``proxy_gains``: each proxy's gain over the base model on its own probe set, as the relative drop of
  the mean response NLL, ``1 - NLL_proxy / NLL_base``, with a paired bootstrap interval over examples.
- ``info_nce`` / ``input_information``: how much a model's answer depends on the question, as a bounded estimate
  of the input-output mutual information. For probe example k of task j, score its answer under its own prompt
  and under K - 1 other prompts of the same task; then
  ``I_k = log q(y_k | x_k) - log mean_{r<K} q(y_k | x_{k-r})`` (r = 0 is its own prompt). Its expectation is a
  lower bound on I(X; Y) for any model q (InfoNCE, van den Oord et al. 2018; Poole et al. 2019) and it never
  exceeds ``log K``, whatever the answer's length: a long answer cannot outweigh a short one. Noise (targets
  that ignore the input) has ``I ~ 0`` under any model; a skill the model has learned approaches ``log K``.
  ``information_unary`` is the task's mean ``I`` as a fraction of ``log K`` (in [0, 1]): the energy's
  ``information`` unary.
- ``output_only``: a diagnostic, never a rule by default: tasks whose proxy learned the answers (own gain at
  least ``MIN_GAIN``) but shows no input-output information (its lower bound is 0 and its estimate under
  ``MIN_GAIN`` of ``log K``). Noise looks like this, and so does a real skill beyond the proxy: a weak proxy's
  failure is not evidence about the target, so the energy only acts on it when told to
  (``energy.prior_skip_output_only``).
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
# signal checks also ask its bootstrap interval to exclude 0); information under this share of its bound log K
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
    """Input-output information on one task's probe set (nats per example, ``info_nce``)."""

    proxy: float  # I under the task's proxy
    base: float  # I under the base model
    gain: float  # proxy - base: what fine-tuning on the task added
    low: float  # bootstrap interval on the proxy's I
    high: float
    bound: float  # the mean of log K over the examples: I can never exceed it
    per_token: float  # the proxy's I per response token
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


def info_nce(scores: np.ndarray) -> np.ndarray:
    """Per-example bounded input-output information, ``I_k = s[0, k] - log mean_r exp(s[r, k])``.

    Args:
        scores: (K, m), ``scores[0, k] = log q(y_k | x_k)`` and ``scores[r, k] = log q(y_k | x')`` for K - 1
            other prompts x' of the same task (K >= 1).

    Returns:
        (m,) values, each at most ``log K`` (equality when the answer is far likelier under its own prompt).
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] < 1:
        raise ValueError(f"scores must have shape (K >= 1, m), got {s.shape}")
    top = s.max(axis=0)
    return s[0] - (top + np.log(np.exp(s - top).sum(axis=0))) + np.log(s.shape[0])


def information_unary(signal: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """Per task, the proxy's mean information as a fraction of its bound ``log K``, clipped to [0, 1].

    From the sums ``likelihoods.npz`` stores (``information_sum``, ``information_bound_sum``,
    ``information_count``); None until every task has examples scored under other prompts.
    """
    need = ("information_sum", "information_bound_sum", "information_count")
    if any(signal.get(k) is None for k in need):
        return None
    bound = np.asarray(signal["information_bound_sum"], dtype=np.float64)
    if np.any(np.asarray(signal["information_count"]) <= 0) or np.any(bound <= 0):
        return None
    return np.clip(np.asarray(signal["information_sum"], dtype=np.float64) / bound, 0.0, 1.0)


def information_evidence(signal: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """Per task, whether its proxy shows any input-output information: the one-sided 95% lower confidence bound of
    the mean information is above 0. Without it the proxy did not learn the task: a skill beyond the proxy and
    noise look alike here. None until every task has examples scored under other prompts."""
    need = ("information_sum", "information_sq_sum", "information_count")
    if any(signal.get(k) is None for k in need):
        return None
    cnt = np.asarray(signal["information_count"], dtype=np.float64)
    if np.any(cnt <= 0):
        return None
    return _lower_bound(np.asarray(signal["information_sum"], dtype=np.float64),
                        np.asarray(signal["information_sq_sum"], dtype=np.float64), cnt) > 0


def _lower_bound(total: np.ndarray, sq: np.ndarray, cnt: np.ndarray, z: float = 1.645) -> np.ndarray:
    """One-sided 95% lower confidence bound on a mean from its sum and sum of squares."""
    mean = total / cnt
    var = np.maximum(sq / cnt - mean**2, 0.0) * cnt / np.maximum(cnt - 1, 1)
    return mean - z * np.where(cnt > 1, np.sqrt(var / cnt), np.inf)


def output_only(signal: Mapping[str, np.ndarray], own_loglik_sum: np.ndarray, count: np.ndarray, *,
                min_gain: float = MIN_GAIN) -> np.ndarray | None:
    """Per task, whether its proxy learned the answers but shows no dependence of them on the prompt.

    True where the own proxy's relative gain over the base, ``1 - NLL_proxy / NLL_base``, is at least
    ``min_gain``, the information's lower confidence bound is at most 0, and its estimate is under ``min_gain``
    of its bound ``log K``. A proxy that learned nothing is not flagged. A diagnostic: noise looks like this, and
    so does a skill beyond the proxy (a proxy's failure says nothing about the target).

    Args:
        signal: per-task sums as ``likelihoods.npz`` stores them (``SIGNAL_ARRAYS``).
        own_loglik_sum: (n,) each task's own proxy's summed log-likelihood on its probe set (the diagonal).
        count: (n,) the probe examples in those sums.

    Returns:
        (n,) bool, or None when a sum is missing or some task has no other-prompt scores yet.
    """
    need = ("base_loglik_sum", "information_sum", "information_sq_sum", "information_bound_sum",
            "information_count")
    if any(signal.get(k) is None for k in need):
        return None
    cnt = np.asarray(signal["information_count"], dtype=np.float64)
    if np.any(cnt <= 0):
        return None
    total = np.asarray(signal["information_sum"], dtype=np.float64)
    low = _lower_bound(total, np.asarray(signal["information_sq_sum"], dtype=np.float64), cnt)
    fraction = total / np.maximum(np.asarray(signal["information_bound_sum"], dtype=np.float64), 1e-12)
    count = np.maximum(np.asarray(count, dtype=np.float64), 1.0)
    base_nll = -np.asarray(signal["base_loglik_sum"], dtype=np.float64) / count
    proxy_nll = -np.asarray(own_loglik_sum, dtype=np.float64) / count
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(base_nll > 0, 1.0 - proxy_nll / base_nll, 0.0)
    return (gain >= min_gain) & (low <= 0) & (fraction < min_gain)


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


def input_information(own: Sequence[np.ndarray], base: Sequence[np.ndarray], bound: Sequence[np.ndarray],
                      tokens: Sequence[np.ndarray], *, n_boot: int = 200, level: float = 0.90,
                      seed: int = 0) -> list[InputInformation]:
    """Input-output information under each task's proxy and under the base, with a bootstrap interval.

    ``own[j][k]`` is ``info_nce`` of task j's probe example k under proxy j, ``base[j][k]`` under the base,
    ``bound[j][k]`` its ``log K`` and ``tokens[j][k]`` its response tokens. A task with fewer than two such
    examples gets NaN with ``examples = 0``.
    """
    for a, b, names in ((own, base, ("own", "base")), (own, bound, ("own", "bound")), (own, tokens, ("own", "tokens"))):
        _check_pairs(a, b, names)
    rng = np.random.default_rng(seed)
    out = []
    for x, b, k, t in zip(own, base, bound, tokens):
        x, b = np.asarray(x, np.float64), np.asarray(b, np.float64)
        if len(x) < 2:
            out.append(InputInformation(*(float("nan"),) * 7, 0))
            continue
        idx = rng.integers(0, len(x), size=(n_boot, len(x)))
        low, high = _interval(x[idx].mean(1), level)
        out.append(InputInformation(float(x.mean()), float(b.mean()), float((x - b).mean()), low, high,
                                    float(np.mean(k)), float(x.sum() / max(1.0, float(np.sum(t)))), len(x)))
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


# The affinity "has signal" when its SNR is at least this (a proxy "learned": mixture.signal.MIN_GAIN).
MIN_SNR = 2.0


def signal_checks(names: list[str], examples: dict[str, np.ndarray], *, n_boot: int = 200,
                  seed: int = 0) -> dict:
    """Did each proxy learn its task, does each task's output depend on its input, and can the affinity be
    told from noise: the ``estimate/signal.json`` content, with plain-language ``warnings``."""
    n = len(names)
    col = [np.flatnonzero(examples["task"] == j) for j in range(n)]
    own = [examples["loglik"][j, c] for j, c in enumerate(col)]
    base = [examples["base"][c] for c in col]
    rot = [c[np.isfinite(examples["own_information"][c])] for c in col]
    gains = proxy_gains(own, base, n_boot=n_boot, seed=seed)
    info = input_information(*([examples[k][r] for r in rot] for k in ("own_information", "base_information",
                                                                       "information_bound", "n_tokens")),
                             n_boot=n_boot, seed=seed)
    # The affinity's signal-to-noise needs every proxy on every example (not so after active estimation).
    complete = bool(np.all(np.isfinite(examples["loglik"])))
    snr = affinity_snr([examples["loglik"][:, c] for c in col], n_boot=n_boot, seed=seed) \
        if n >= 2 and complete else None
    # The same per-task sums the energy sees, so that `output_only` here is what the solver would apply.
    x = [examples["own_information"][r] for r in rot]
    sums = {"base_loglik_sum": np.array([b.sum() for b in base]), "information_sum": np.array([v.sum() for v in x]),
            "information_sq_sum": np.array([np.sum(v**2) for v in x]),
            "information_bound_sum": np.array([examples["information_bound"][r].sum() for r in rot]),
            "information_count": np.array([len(r) for r in rot])}
    flagged = output_only(sums, np.array([o.sum() for o in own]), np.array([len(c) for c in col]))
    tasks, warnings = {}, []
    for j, name in enumerate(names):
        g, inf = gains[j], info[j]
        learned = bool(np.isfinite(g.low) and g.low > 0 and g.gain >= MIN_GAIN)
        tasks[name] = {"base_nll": g.base_nll, "proxy_nll": g.proxy_nll, "gain": g.gain, "gain_low": g.low,
                       "gain_high": g.high, "learned": learned, "examples": g.examples,
                       "information": inf.proxy, "information_low": inf.low, "information_high": inf.high,
                       "information_bound": inf.bound, "information_fraction": inf.proxy / inf.bound
                       if inf.bound > 0 else float("nan"), "information_per_token": inf.per_token,
                       "base_information": inf.base, "information_gain": inf.gain,
                       "output_only": bool(flagged is not None and flagged[j])}
        if snr is not None:
            # Under log-likelihood, a proxy that learned no input-output mapping (noise) hedges over every
            # answer and so looks near every task; the nearest *informative* task leaves those out.
            informative = [k for k in range(n) if k != j and np.isfinite(info[k].low) and info[k].low > 0]
            near = max(informative, key=lambda k: snr.affinity[j, k]) if informative else None
            tasks[name].update(nearest=names[snr.nearest[j]], nearest_stability=snr.nearest_stability[j],
                               nearest_informative=names[near] if near is not None else None)
        if not learned:
            warnings.append(f"the proxy of task {name!r} did not learn it: NLL {g.base_nll:.2f} -> {g.proxy_nll:.2f} "
                            f"nats/example ({g.gain:+.1%}, 90% interval {g.low:+.1%} to {g.high:+.1%}); raise "
                            f"probes.steps or probes.lr, or check the task's data")
        elif tasks[name]["output_only"]:
            warnings.append(f"task {name!r}: its proxy learned the answers (NLL {-g.gain:+.0%}) but not their "
                            f"dependence on the prompt (information {inf.proxy:+.2f} of at most {inf.bound:.2f} "
                            f"nats/example): its targets are noise, or a skill beyond the proxy (a proxy's "
                            f"failure is no evidence about the target); it keeps its prior share")
    out = {"tasks": tasks, "thresholds": {"min_gain": MIN_GAIN, "min_snr": MIN_SNR}, "resamples": n_boot,
           "interval": 0.90}
    if snr is not None:
        out["affinity"] = {"snr": snr.snr, "noise_rms": float(np.sqrt(np.mean(snr.noise[~np.eye(n, dtype=bool)] ** 2))),
                           "has_signal": bool(snr.snr >= MIN_SNR)}
        if snr.snr < MIN_SNR:
            warnings.append(f"the PMI affinity cannot be told from noise (signal-to-noise {snr.snr:.2f} < "
                            f"{MIN_SNR:g}): the mixture rests on sampling noise; add probe examples "
                            f"(splits.max_probe) or train the proxies longer")
    out["learned"] = sum(t["learned"] for t in tasks.values())
    out["warnings"] = warnings
    return out

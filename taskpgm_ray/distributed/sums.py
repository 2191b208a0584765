"""From scored shards to sums: a shard's column contribution, the totals in shard order, every example's scores
(for the signal checks) and the per-example noise active estimation's completion needs.

Ray touch-points: none.
"""

from __future__ import annotations

import numpy as np

from taskpgm_ray.distributed.optimizer import ShardSums
from taskpgm_ray.distributed.scoring import BASE, Shard, aligned_information, rot_key
from taskpgm_ray.distributed.shard_cache import jsd_pairs
from taskpgm_ray.mixture_file import SIGNAL_ARRAYS


def totals(sums: list[ShardSums], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                    dict[str, np.ndarray]]:
    """Column sums over shards in the given order: ``loglik_sum`` (n, n), ``count`` (n,), the JSD sums per
    proxy pair (n, n), the response tokens behind them per task (n,), and the signal sums per task."""
    loglik_sum, count = np.zeros((n, n)), np.zeros(n, dtype=np.int64)
    jsd_sum, tokens = np.zeros((n, n)), np.zeros(n, dtype=np.int64)
    rows = np.zeros((len(SIGNAL_ARRAYS), n))
    for s in sums:
        loglik_sum[:, s.task] += s.loglik
        count[s.task] += s.count
        rows[:, s.task] += s.signal_row()
        if s.jsd_sum is not None:
            jsd_sum += s.jsd_sum
            tokens[s.task] += s.tokens
    signal = dict(zip(SIGNAL_ARRAYS, rows))
    signal["information_count"] = signal["information_count"].astype(np.int64)
    return loglik_sum, count, jsd_sum, tokens, signal


def shard_sums(shard: Shard, rec: dict, order: list[str], jsd: bool, prompts: int) -> ShardSums:
    """A shard's column contribution for the proxies ``order`` (row i = proxy i; NaN for a proxy that did not
    score it, in active estimation), summed in example order, with the base model's sum and the own proxy's
    and base's input-output information sums (``aligned_information``)."""
    ll = rec["loglik"]
    loglik = np.array([float(np.sum(ll[h])) if h in ll else np.nan for h in order])
    pairs = jsd_pairs(rec, order) if jsd else None
    own, m = order[shard.task], len(shard.example_ids)
    info = {}
    own_info, base_info = aligned_information(ll, own, m, prompts), aligned_information(ll, BASE, m, prompts)
    if own_info is not None and base_info is not None:  # a shard of one example has no other prompt
        info = {"information": float(np.sum(own_info)), "base_information": float(np.sum(base_info)),
                "information_count": m, "information_sq": float(np.sum(own_info**2)),
                "information_bound": m * float(np.log(prompts_scored(ll, own, m, prompts))),
                "information_tokens": int(np.sum(rec["n_tokens"]))}
    return ShardSums(shard.task, loglik, m, pairs, int(np.sum(rec["n_tokens"])) if jsd else 0,
                     base=float(np.sum(ll[BASE])), **info)


def prompts_scored(ll: dict, key: str, m: int, prompts: int) -> int:
    """K of ``aligned_information``: the own prompt and the rotations of ``key`` present."""
    return 1 + sum(rot_key(r, key) in ll for r in range(1, min(prompts, m)))


def per_example(shards: list[Shard], used: list[int], records: dict, order: list[str],
                 prompts: int) -> dict[str, np.ndarray]:
    """Every scored probe example in shard order: ``task`` (M,) its column, ``loglik`` (n, M) every proxy's
    log-likelihood (NaN where that proxy did not score the shard), ``base`` (M,), the bounded information
    ``own_information`` / ``base_information`` (M,) under its task's proxy and the base (NaN where a one-example
    shard has none), its bound ``information_bound`` (M,, log K) and ``n_tokens`` (M,) response tokens."""
    task, loglik, base, own_info, base_info, bound, tokens = [], [], [], [], [], [], []
    for i in used:
        s, ll = shards[i], records[i]["loglik"]
        m, own = len(s.example_ids), order[s.task]
        task.append(np.full(m, s.task))
        loglik.append(np.stack([ll[h] if h in ll else np.full(m, np.nan) for h in order]))
        base.append(ll[BASE])
        x, b = aligned_information(ll, own, m, prompts), aligned_information(ll, BASE, m, prompts)
        own_info.append(x if x is not None else np.full(m, np.nan))
        base_info.append(b if b is not None else np.full(m, np.nan))
        bound.append(np.full(m, np.log(prompts_scored(ll, own, m, prompts))))
        tokens.append(np.asarray(records[i]["n_tokens"], dtype=np.float64))
    return {"task": np.concatenate(task), "loglik": np.concatenate(loglik, axis=1), "base": np.concatenate(base),
            "own_information": np.concatenate(own_info), "base_information": np.concatenate(base_info),
            "information_bound": np.concatenate(bound), "n_tokens": np.concatenate(tokens)}


def example_noise(by_task: list[list[Shard]], records: dict, order: list[str]) -> np.ndarray:
    """Per task, the per-example variance of the proxies' log-likelihoods around proxy + example effects
    (``sigma_j^2`` of mixture/completion.py), from the per-example scores of the proxies that scored each shard:
    two-way residuals pooled over the task's shards; NaN where no shard has two proxies and two examples.
    The shard sums alone cannot tell it from the tasks' real differences when a task has one shard."""
    out = np.full(len(by_task), np.nan)
    for j, shards in enumerate(by_task):
        ss = dof = 0.0
        for s in shards:
            ll = (records[s.index] or {"loglik": {}})["loglik"]
            Z = np.stack([ll[h] for h in order if h in ll]) if any(h in ll for h in order) else np.zeros((0, 0))
            k, m = Z.shape
            if k >= 2 and m >= 2:  # (k proxies, m examples)
                R = Z - Z.mean(1, keepdims=True) - Z.mean(0, keepdims=True) + Z.mean()
                ss, dof = ss + float((R**2).sum()), dof + (k - 1) * (m - 1)
        if dof and ss > 0:
            out[j] = ss / dof
    return out

"""The central optimiser: running estimation sums, a re-solved mixture after every shard, a stopping rule.

``MixtureOptimizer`` is a plain class (tested without Ray); the driver runs it as one Ray actor with
``ray.remote(MixtureOptimizer)``. Each shard result adds one column contribution: proxy i's summed
log-likelihood on the shard's examples of task j (and, with JSD, the summed pairwise JSD over its tokens).
Once every task's column has data, each update re-solves the mixture and records its L1 change; the
mixture is *stable* after ``patience`` consecutive changes below ``tol`` with at least ``min_fraction``
of the shards scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from taskpgm_ray.config import EnergyConfig, StableConfig
from taskpgm_ray.distributed.solve import solve_from_sums
from taskpgm_ray.mixture_file import SIGNAL_ARRAYS


@dataclass
class ShardSums:
    """One shard's contribution: column ``task`` of the likelihood matrix (and JSD sums over its tokens)."""

    task: int  # column j: the task whose probe examples the shard holds
    loglik: np.ndarray  # (n,) proxy i's summed response log-likelihood on the shard
    count: int  # examples in the shard
    jsd_sum: np.ndarray | None = None  # (n, n) summed per-token JSD between proxies
    tokens: int = 0  # response tokens in the shard
    base: float = 0.0  # the base model's summed response log-likelihood on the shard
    information: float = 0.0  # own proxy: sum over examples of the bounded information (mixture.signal.info_nce)
    base_information: float = 0.0  # the same under the base model
    information_count: int = 0  # examples in those sums (0 for a one-example shard: no other prompt)
    information_sq: float = 0.0  # sum over those examples of the own proxy's squared information
    information_bound: float = 0.0  # sum over those examples of log K (K prompts each answer was scored under)
    information_tokens: int = 0  # response tokens of those examples

    def signal_row(self) -> tuple[float, float, float, int, float, float, int]:
        """This shard's contribution to the per-task signal sums, in ``SIGNAL_ARRAYS`` order (likelihoods.npz's
        names)."""
        return (self.base, self.information, self.base_information, self.information_count, self.information_sq,
                self.information_bound, self.information_tokens)


class MixtureOptimizer:
    """Running sums and the mixture they imply, re-solved after every shard.

    Args:
        n: number of tasks (and proxies).
        total_shards: shards in the full scoring (for the fraction used).
        energy: the energy settings ``solve_from_sums`` uses.
        stop: the anytime stopping rule, or None to never call the mixture stable.
        utilities: per-task utilities for ``energy.unary == "utility"``.
        max_weights: per-task upper bounds on the weights (``solve.weight_caps``), or None.
        sizes: training examples per task (the energy's prior needs them).
    """

    def __init__(self, n: int, total_shards: int, energy: EnergyConfig, stop: StableConfig | None = None,
                 utilities: Sequence[float | None] | None = None, max_weights: np.ndarray | None = None,
                 sizes: Sequence[int] | None = None):
        self._n = n
        self._total = max(1, total_shards)
        self._energy = energy
        self._stop = stop
        self._utilities = utilities
        self._max_weights = max_weights  # per-task caps (repetition cap x data size / budget), or None
        self._sizes = sizes  # training examples per task, for the energy's size/temperature prior
        self._shards: list[ShardSums] = []  # every shard received, for the bootstrap
        self._loglik_sum = np.zeros((n, n))  # running column sums, arrival order
        self._count = np.zeros(n)
        self._jsd_sum = np.zeros((n, n))
        self._tokens = 0
        self._info = np.zeros((len(SIGNAL_ARRAYS), n))  # the signal sums (SIGNAL_ARRAYS) per task
        self._weights: np.ndarray | None = None  # the latest mixture (None until every column has data)
        self._streak = 0  # consecutive updates whose L1 change was below tol
        self._trajectory: list[dict] = []  # one entry per solved update

    def add(self, shard: ShardSums) -> dict:
        """Fold in one shard, re-solve when every column has data; return ``status()``."""
        self._shards.append(shard)
        self._loglik_sum[:, shard.task] += shard.loglik
        self._count[shard.task] += shard.count
        if shard.jsd_sum is not None:
            self._jsd_sum += shard.jsd_sum
            self._tokens += shard.tokens
        self._info[:, shard.task] += shard.signal_row()
        if np.all(self._count > 0) and self._ready():
            weights = self._solve(self._loglik_sum, self._count, self._jsd_sum, self._tokens, self._info)
            change = float(np.abs(weights - self._weights).sum()) if self._weights is not None else float("inf")
            self._streak = self._streak + 1 if self._stop is not None and change < self._stop.tol else 0
            self._weights = weights
            self._trajectory.append({"shards": len(self._shards), "fraction": self.fraction(),
                                     "l1_change": change if np.isfinite(change) else None,
                                     "weights": weights.tolist()})
        return self.status()

    def fraction(self) -> float:
        """Fraction of the full scoring's shards received so far."""
        return len(self._shards) / self._total

    def stable(self) -> bool:
        """Whether the stopping rule says the mixture has stopped moving."""
        s = self._stop
        return s is not None and self._streak >= s.patience and self.fraction() >= s.min_fraction

    def status(self) -> dict:
        """Shards received, fraction, the latest L1 change and mixture, and ``stable``."""
        last = self._trajectory[-1] if self._trajectory else {}
        return {"shards": len(self._shards), "fraction": self.fraction(), "l1_change": last.get("l1_change"),
                "weights": last.get("weights"), "stable": self.stable()}

    def trajectory(self) -> list[dict]:
        """Every solved update: shards so far, fraction, L1 change from the previous mixture, weights."""
        return list(self._trajectory)

    def bootstrap(self, n_boot: int, seed: int = 0, level: float = 0.90) -> dict | None:
        """Percentile bands on the weights from resampling each task's shards with replacement.

        A task with a single shard contributes no variability (shard_size sets the resolution).
        Returns None when ``n_boot`` is 0 or some column has no data.
        """
        if n_boot <= 0 or not np.all(self._count > 0) or not self._ready():
            return None
        rng = np.random.default_rng(seed)
        by_task = [[s for s in self._shards if s.task == j] for j in range(self._n)]
        samples = []
        for _ in range(n_boot):
            ll, cnt, jsd, tok = np.zeros((self._n, self._n)), np.zeros(self._n), np.zeros((self._n, self._n)), 0
            info = np.zeros((len(SIGNAL_ARRAYS), self._n))
            for j, group in enumerate(by_task):
                for k in rng.integers(0, len(group), len(group)):
                    s = group[k]
                    ll[:, j] += s.loglik
                    cnt[j] += s.count
                    info[:, j] += s.signal_row()
                    if s.jsd_sum is not None:
                        jsd += s.jsd_sum
                        tok += s.tokens
            samples.append(self._solve(ll, cnt, jsd, tok, info))
        W = np.array(samples)
        q = 100 * (1 - level) / 2
        return {"resamples": n_boot, "level": level, "unit": "shard within task",
                "mean": W.mean(0).tolist(), "std": W.std(0).tolist(),
                "low": np.percentile(W, q, axis=0).tolist(), "high": np.percentile(W, 100 - q, axis=0).tolist()}

    def _ready(self) -> bool:
        """Whether the energy's inputs exist yet (the information unary needs other-prompt scores per task)."""
        return self._energy.unary != "information" or bool(np.all(self._info[SIGNAL_ARRAYS.index("information_count")]
                                                                 > 0))

    def _solve(self, loglik_sum, count, jsd_sum, tokens, info) -> np.ndarray:
        jsd = (jsd_sum, tokens) if tokens > 0 else (None, None)
        weights, _, _ = solve_from_sums(loglik_sum, count, *jsd, self._energy, utilities=self._utilities,
                                        signal=dict(zip(SIGNAL_ARRAYS, info)), max_weights=self._max_weights,
                                        sizes=self._sizes)
        return weights

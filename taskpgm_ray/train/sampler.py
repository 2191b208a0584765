"""The mixture sampler: which training example every draw of the fine-tune sees. Pure numpy, no Ray.

One global stream of draws serves every rank: draw ``g`` goes to rank ``g % world_size``. Every rank computes
the same stream and keeps its slice, so ranks are disjoint and their union is the single-process stream.

The stream is a pure function of the seed and a few counters:

* the task of draw ``g`` is drawn in blocks of ``BLOCK`` draws; block ``k`` comes from a generator seeded by
  ``(seed, k, generation)``, where ``generation`` counts the tasks removed by the repetition cap so far;
* within a task, examples follow a permutation seeded by ``(seed, task, epoch)``, without replacement until
  the task is exhausted, then a fresh permutation (the next epoch).

So the state is just counters (``state_dict``): restoring them continues the stream exactly.

Weights count examples or tokens. With ``unit="tokens"`` task ``i`` is drawn with probability
``w_i / mean_tokens_i`` (normalised), so its expected share of the tokens drawn is ``w_i``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

BLOCK = 1 << 15  # task ids are drawn this many at a time (vectorised); the stream does not depend on callers


class SamplerExhausted(RuntimeError):
    """Every task with a positive weight reached the repetition cap: no draws are left."""


def draw_probabilities(weights: Sequence[float], mean_tokens: Sequence[float] | None = None,
                       unit: str = "examples") -> np.ndarray:
    """Per-task draw probabilities: the weights themselves (examples), or ``w_i / mean_tokens_i`` normalised."""
    w = np.asarray(weights, dtype=np.float64)
    if unit == "examples":
        p = w.copy()
    elif unit == "tokens":
        if mean_tokens is None:
            raise ValueError("weight_unit 'tokens' needs the mean token count of every task")
        p = w / np.maximum(np.asarray(mean_tokens, dtype=np.float64), 1e-12)
    else:
        raise ValueError(f"train.weight_unit: must be 'examples' or 'tokens', got {unit!r}")
    if p.sum() <= 0:
        raise ValueError("mixture: every weight is zero")
    return p / p.sum()


class MixtureSampler:
    """Draw (task, example) pairs from a weighted mixture of tasks.

    Args:
        names: task names (in the order used for task ids).
        sizes: training examples per task.
        weights: mixture weights (>= 0, summing to 1), in the unit ``unit``.
        seed: the stream's seed.
        unit: ``"examples"`` or ``"tokens"`` (what the weights count).
        mean_tokens: mean tokens per example of each task (needed for ``unit="tokens"``).
        repetition_cap: at most this many epochs over any task; a task that reaches it is removed and the
            remaining probabilities renormalised. ``None``: unlimited.

    Examples:
        >>> s = MixtureSampler(["a", "b"], [3, 5], [0.5, 0.5], seed=0)
        >>> tasks, examples = s.draw(8)   # the next 8 draws of the global stream
        >>> s.samples_per_task()["a"] + s.samples_per_task()["b"]
        8
    """

    def __init__(self, names: Sequence[str], sizes: Sequence[int], weights: Sequence[float], *, seed: int,
                 unit: str = "examples", mean_tokens: Sequence[float] | None = None,
                 repetition_cap: float | None = None):
        self.names = list(names)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.seed = int(seed)
        self.unit = unit
        self.probabilities = draw_probabilities(weights, mean_tokens, unit)  # fixed; caps renormalise over it
        if np.any((self.probabilities > 0) & (self.sizes < 1)):
            bad = self.names[int(np.flatnonzero((self.probabilities > 0) & (self.sizes < 1))[0])]
            raise ValueError(f"mixture: task {bad!r} has a positive weight but no training examples")
        n = len(self.names)
        # Draw limits under the cap: floor(cap * size) draws of a task, at least one.
        self.limits = (np.maximum(1, np.floor(repetition_cap * self.sizes)).astype(np.int64)
                       if repetition_cap is not None else None)
        self.repetition_cap = repetition_cap
        # -- the state (counters only) --
        self._draws = 0                                   # global draws so far
        self._generation = 0                              # tasks removed by the cap so far
        self._removed = np.zeros(n, dtype=bool)           # removed by the cap
        self._epoch = np.zeros(n, dtype=np.int64)         # current epoch of each task
        self._position = np.zeros(n, dtype=np.int64)      # next position in the epoch's permutation
        self._drawn = np.zeros(n, dtype=np.int64)         # draws of each task so far
        self.events: list[str] = []                       # human-readable cap events, for the logs
        # -- caches (derived from the state; never saved) --
        self._block_cache: tuple[int, int, np.ndarray] | None = None
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}

    # ----------------------------------------------------------------------------------------------
    # the stream

    def _active_probabilities(self) -> np.ndarray:
        p = np.where(self._removed, 0.0, self.probabilities)
        return p / p.sum()

    def _block(self, k: int) -> np.ndarray:
        """Task ids of block ``k`` under the current generation (a pure function of seed, k, generation)."""
        if self._block_cache is not None and self._block_cache[:2] == (k, self._generation):
            return self._block_cache[2]
        rng = np.random.default_rng([self.seed, k, self._generation, 0xB10C])
        cdf = np.cumsum(self._active_probabilities())
        tasks = np.searchsorted(cdf, rng.random(BLOCK) * cdf[-1], side="right")
        # Float round-off can push a draw past the last active task; map it to the last active one.
        tasks = np.minimum(tasks, int(np.flatnonzero(~self._removed & (self.probabilities > 0))[-1]))
        self._block_cache = (k, self._generation, tasks)
        return tasks

    def _permutations(self, task: int, first_epoch: int, n_epochs: int) -> np.ndarray:
        """Example orders of epochs ``first_epoch ..`` of ``task``, shape (n_epochs, size).

        Epoch ``e`` is the argsort of a counter-based (Philox) stream at counter ``e * ceil(size / 4)``: a pure
        function of (seed, task, epoch), yet many epochs come from one vectorised call (small tasks cycle often).
        """
        cached = self._perm_cache.get(task)
        if n_epochs == 1 and cached is not None and cached[0] == first_epoch:
            return cached[1][None]
        size = int(self.sizes[task])
        per_epoch = -(-size // 4)  # Philox counter steps per epoch; each step yields 4 uint64 (4 doubles)
        key = np.random.SeedSequence([self.seed, task, 0x5EED]).generate_state(2, dtype=np.uint64)
        bitgen = np.random.Philox(key=key)
        bitgen.advance(first_epoch * per_epoch)
        keys = np.random.Generator(bitgen).random(n_epochs * per_epoch * 4).reshape(n_epochs, per_epoch * 4)
        perms = np.argsort(keys[:, :size], axis=1)  # keys are distinct (53-bit floats): any sort agrees
        self._perm_cache[task] = (first_epoch + n_epochs - 1, perms[-1])
        return perms

    def _take_examples(self, task: int, count: int) -> np.ndarray:
        """The next ``count`` example indices of ``task``: its permutations, epoch after epoch."""
        size, epoch, pos = int(self.sizes[task]), int(self._epoch[task]), int(self._position[task])
        end = pos + count                       # measured from the start of the current epoch
        n_epochs = -(-end // size)              # epochs this take touches
        out = self._permutations(task, epoch, n_epochs).ravel()[pos:end]
        self._epoch[task] = epoch + end // size  # an exhausted epoch rolls over to a fresh permutation
        self._position[task] = end % size
        return out

    def _cap_cut(self, tasks: np.ndarray) -> tuple[int, int | None]:
        """Length of the prefix of ``tasks`` drawable before a task hits the cap, and that task (or None)."""
        if self.limits is None:
            return len(tasks), None
        left = self.limits - self._drawn
        counts = np.bincount(tasks, minlength=len(self.names))
        cut, who = len(tasks), None
        for t in np.flatnonzero((counts > 0) & (counts >= left)):
            at = int(np.flatnonzero(tasks == t)[left[t] - 1]) + 1  # the draw that reaches the limit, inclusive
            if at < cut or (at == cut and who is None):
                cut, who = at, int(t)
        return cut, who

    def draw(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next ``n`` draws of the global stream: (task ids, example indices), both int64 arrays of length n.

        Raises:
            SamplerExhausted: every task reached the repetition cap first.
        """
        task_parts, example_parts = [], []
        while n > 0:
            if not np.any(~self._removed & (self.probabilities > 0)):
                raise SamplerExhausted(f"every task reached the repetition cap ({self.repetition_cap:g} epochs) "
                                       f"after {self._draws} draws; raise train.repetition_cap or lower train.steps")
            k, offset = divmod(self._draws, BLOCK)
            tasks = self._block(k)[offset: offset + n]
            cut, capped = self._cap_cut(tasks)
            tasks = tasks[:cut]
            # Map task ids to example ids: group the draws by task (stable, so each task's draws keep their
            # order) and hand each group the next slice of that task's permutations.
            examples = np.empty(len(tasks), dtype=np.int64)
            order = np.argsort(tasks, kind="stable")
            counts = np.bincount(tasks, minlength=len(self.names))
            start = 0
            for t in np.flatnonzero(counts):
                c = int(counts[t])
                examples[order[start: start + c]] = self._take_examples(int(t), c)
                start += c
            self._drawn += counts
            self._draws += len(tasks)
            task_parts.append(tasks)
            example_parts.append(examples)
            n -= len(tasks)
            if capped is not None:
                self._remove(capped)
        if not task_parts:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(task_parts), np.concatenate(example_parts)

    def _remove(self, task: int) -> None:
        self._removed[task] = True
        self._generation += 1
        self._block_cache = None
        left = ~self._removed & (self.probabilities > 0)
        self.events.append(
            f"task {self.names[task]!r} reached the repetition cap ({self.repetition_cap:g} epochs, "
            f"{int(self._drawn[task])} draws) after {self._draws} draws; removed, the remaining "
            f"{int(left.sum())} task(s) renormalised")

    def draw_rank(self, n_global: int, rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The next ``n_global`` draws of the global stream; this rank keeps those with ``g % world_size == rank``."""
        start = self._draws
        tasks, examples = self.draw(n_global)
        mine = (start + np.arange(len(tasks))) % world_size == rank
        return tasks[mine], examples[mine]

    # ----------------------------------------------------------------------------------------------
    # bookkeeping and state

    @property
    def draws(self) -> int:
        """Global draws so far."""
        return self._draws

    def samples_per_task(self) -> dict[str, int]:
        """Draws of each task so far (all ranks together)."""
        return {name: int(c) for name, c in zip(self.names, self._drawn)}

    def removed_tasks(self) -> list[str]:
        return [name for name, r in zip(self.names, self._removed) if r]

    def describe(self) -> str:
        """One line for the logs: the unit and each task's draw probability."""
        probs = ", ".join(f"{name}={p:.4f}" for name, p in zip(self.names, self.probabilities))
        cap = f"; repetition cap {self.repetition_cap:g} epochs" if self.repetition_cap is not None else ""
        return f"mixture sampler: weights count {self.unit}; draw probabilities {probs}{cap}"

    def state_dict(self) -> dict[str, Any]:
        """Counters that, with the constructor's arguments, determine the rest of the stream (JSON-ready)."""
        return {"version": 1, "seed": self.seed, "names": self.names, "draws": self._draws,
                "generation": self._generation, "removed": self._removed.tolist(),
                "epoch": self._epoch.tolist(), "position": self._position.tolist(), "drawn": self._drawn.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` left off (same tasks and seed, else ``ValueError``)."""
        if state.get("names") != self.names or state.get("seed") != self.seed:
            raise ValueError("sampler state is from a different mixture (task names or seed differ); "
                             "start a fresh run directory")
        self._draws = int(state["draws"])
        self._generation = int(state["generation"])
        self._removed = np.asarray(state["removed"], dtype=bool)
        self._epoch = np.asarray(state["epoch"], dtype=np.int64)
        self._position = np.asarray(state["position"], dtype=np.int64)
        self._drawn = np.asarray(state["drawn"], dtype=np.int64)
        self._block_cache = None


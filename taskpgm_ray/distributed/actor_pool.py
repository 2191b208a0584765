"""The estimation actors: started on the first ``score`` call, kept for every later one (the rounds of active
estimation), a dead actor's shard re-queued; each result is merged into the records and the shard cache.

Ray touch-points:
  ``ray.remote(EstimationActor).options``  ``estimation.num_actors`` scoring actors (CPUs/GPUs each, restarts)
  ``ray.wait`` / ``ray.get``               results taken as they finish; a dead actor's shard is re-queued
  ``ray.kill``                             the actors, at the end of the stage
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from taskpgm_ray.config import Config
from taskpgm_ray.distributed.scoring import EstimationActor, EstimationError, Proxy, Shard
from taskpgm_ray.distributed.shard_cache import merge_record, write_shard

IN_FLIGHT_PER_ACTOR = 2  # a queued shard per actor hides the round trip to the driver
class ActorPool:
    """The estimation actors, started on the first ``score`` call and kept for every later one (the rounds
    of active estimation); each result is folded into ``records`` and written to the shard cache.

    Hand-written rather than ``ray.util.ActorPool``: a dead actor's shard goes back to the front of the
    queue, and a shard is scored under the keys it still lacks, with the top-k arrays it already has.
    """

    def __init__(self, cfg: Config, proxies: list[Proxy], records: dict, stats: dict, *,
                 tok_path: Callable[[], str], on_result: Callable[[int, list], None] | None):
        self._cfg = cfg
        self._proxies = proxies
        self._order = [p.hash for p in proxies]
        self._records = records  # shard index -> cached record (None until scored), updated in place
        self._stats = stats  # counters of progress.json, updated in place
        self._tok_path = tok_path  # the proxy tokenizer's path, made on first use
        self._on_result = on_result  # the test hook of estimate_command
        self._actors: list = []  # actor handles, by slot
        self._alive: set[int] = set()  # slots still usable
        self._deaths: dict[int, int] = {}  # slot -> times its actor died

    def _start(self, wanted: int) -> None:
        import ray

        e = self._cfg.estimation
        remote = ray.remote(EstimationActor).options(
            num_cpus=e.num_cpus_per_actor, num_gpus=e.num_gpus_per_actor,
            max_restarts=e.max_actor_restarts, max_task_retries=0)
        tok_path = self._tok_path()
        # Never start more actors than there are shards to score.
        self._actors = [remote.remote(asdict(self._cfg.proxy), tok_path, self._proxies, e.batch_size,
                                      e.jsd_top_k if e.jsd else 0, max(1, int(e.num_cpus_per_actor)),
                                      e.num_gpus_per_actor > 0) for _ in range(min(e.num_actors, wanted))]
        self._alive = set(range(len(self._actors)))
        self._deaths = dict.fromkeys(self._alive, 0)
        try:  # load up front so a bad adapter is one clear error, not a retry loop
            ray.get([a.load.remote() for a in self._actors])
        except ray.exceptions.RayTaskError as exc:
            raise EstimationError(str(getattr(exc, "cause", exc))) from None

    def score(self, todo: deque, *, after: Callable[[Shard, list[str]], None],
              stop: Callable[[], bool] = lambda: False) -> None:
        """Score every ``(shard, keys)`` in ``todo`` (until ``stop()``), calling ``after(shard, keys)`` on each."""
        import ray

        e = self._cfg.estimation
        order = self._order
        shard_dir = Path(self._cfg.output_dir) / "estimate" / "shards"
        if not self._actors:
            self._start(len(todo))
        inflight: dict[Any, tuple[int, Shard, list[str]]] = {}
        busy = dict.fromkeys(self._alive, 0)
        t_start = time.perf_counter()

        def dispatch() -> None:
            while todo and not stop():
                free = [a for a in sorted(self._alive) if busy[a] < IN_FLIGHT_PER_ACTOR]
                if not free:
                    return
                a = min(free, key=lambda k: busy[k])
                s, need = todo.popleft()
                rec = self._records[s.index]
                cached_topk = {h: rec["topk"][h] for h in order if rec and h in rec["topk"] and h not in need}
                ref = self._actors[a].score.remote(s, need, order if e.jsd else None, cached_topk if e.jsd else None)
                inflight[ref] = (a, s, need)
                busy[a] += 1

        dispatch()
        while inflight:
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            a, s, need = inflight.pop(ref)
            busy[a] -= 1
            try:
                res = ray.get(ref)
            except ray.exceptions.RayActorError:
                # The actor died (killed, OOM, node lost): its shard goes back to the front of the queue.
                self._stats["actor_failures"] += 1
                self._stats["requeued"] += 1
                todo.appendleft((s, need))
                self._deaths[a] += 1
                if self._deaths[a] > e.max_actor_restarts:
                    self._alive.discard(a)
                if not self._alive:
                    raise EstimationError(f"every estimation actor died (max_actor_restarts="
                                          f"{e.max_actor_restarts}); see the Ray logs") from None
                dispatch()
                continue
            except ray.exceptions.RayTaskError as exc:
                raise EstimationError(str(getattr(exc, "cause", exc))) from None
            self._records[s.index] = merge_record(self._records[s.index], res)
            write_shard(shard_dir / f"{s.key}.npz", s, self._records[s.index])
            after(s, need)
            self._stats["scored"] += 1
            self._stats["adapter_shard_scorings"] += len(res["loglik"])
            self._stats["forwards"] += res["forwards"]
            self._stats["tokens_scored"] += int(np.sum(self._records[s.index]["n_tokens"])) * len(res["loglik"])
            if self._on_result is not None:
                self._on_result(self._stats["scored"], self._actors)
            dispatch()
        self._stats["scoring_seconds"] += time.perf_counter() - t_start

    def close(self) -> None:
        """Kill the actors (a later ``score`` starts new ones)."""
        import ray

        for act in self._actors:
            ray.kill(act)
        self._actors = []

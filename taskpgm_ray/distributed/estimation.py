"""Stages 3-4: every proxy scores every task's probe set, on Ray actors, into the likelihood matrix.

The probe examples of all tasks are cut into shards (a contiguous block of one task's probe examples,
in a fixed order). ``EstimationActor``s hold the base model (the proxy model ``cfg.proxy``, with its own
tokenizer) and every adapter once, switch adapters with ``set_adapter``, and score a shard for any subset
of proxies: per example, the summed response log-likelihood, and per response token the top-k
next-token log-probabilities (for the JSD). A shard is scored in fixed batches of consecutive examples,
so its numbers do not depend on which actor ran it.

Cache: ``<output_dir>/estimate/shards/<key>.npz``, key = hash of the shard's examples and the scoring
settings. A file holds one row per proxy, keyed by the proxy's adapter hash, so a re-run scores only
the missing (proxy, shard) pairs: a new task's proxy on every shard, every proxy on the new task's
shards. For the JSD it also keeps each proxy's top-k arrays on the shard (int32 ids and float32
log-probabilities, T x k per proxy: about 8 k bytes per probe token per proxy), from which the pairs of
a new proxy with the cached ones are computed, plus the pairwise JSD sums for the proxies it has.

Besides the proxies, every shard is scored by the base model (key ``base``), and by the shard's own
proxy and the base with each prompt paired with the next example's response (keys ``rot:<hash>`` and
``rot:base``): the input-output information of ``taskpgm_ray.mixture.signal``. These n + 3 scorings per
shard (instead of n) feed the signal checks and the energy's ``information`` unary.

The driver feeds every result to the central optimiser (``optimizer.MixtureOptimizer``, one actor),
which re-solves the mixture; with ``estimation.stop_when_stable`` the driver stops handing out shards
once the optimiser calls the mixture stable. Shards go out round-robin over tasks so that every column
has data early. An actor that dies has its shards re-queued; final sums are formed in shard order, so
they are bit-identical whatever ran where.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from taskpgm_ray.config import Config
from taskpgm_ray.console import StageProgress
from taskpgm_ray.distributed.optimizer import MixtureOptimizer, ShardSums
from taskpgm_ray.io import atomic_savez, atomic_write_json
from taskpgm_ray.tasks import TaskData

SCORING_VERSION = 1  # bump when the scoring arithmetic changes: it invalidates every cached shard
BASE = "base"  # the cache key of the base model's scores (no adapter)
ROT = "rot:"  # prefix of a scoring with rotated pairs: prompt k with response k + 1 (input-output information)
IN_FLIGHT_PER_ACTOR = 2  # a queued shard per actor hides the round trip to the driver


class EstimationError(RuntimeError):
    """Estimation cannot proceed; the message names the task, example, adapter or setting at fault."""


@dataclass(frozen=True)
class Proxy:
    """A fine-tuned proxy: its task, its adapter hash (the cache key) and where it is on disk."""

    task: str
    hash: str
    path: str


@dataclass(frozen=True)
class Shard:
    """A contiguous block of one task's probe examples; ``index`` is its place in the round-robin order."""

    index: int
    task: int  # column j of the likelihood matrix
    task_name: str
    example_ids: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...]  # (prompt, response)
    key: str


def scoring_settings(cfg: Config) -> dict:
    """Everything that changes a shard's numbers (and so its cache key): the proxy model and its weights among them."""
    from taskpgm_ray.models import model_fingerprint

    e = cfg.estimation
    return {"model": asdict(cfg.proxy), "weights": model_fingerprint(cfg.proxy), "batch_size": e.batch_size,
            "jsd_top_k": e.jsd_top_k if e.jsd else 0, "version": SCORING_VERSION}


def make_shards(tasks: list[TaskData], shard_size: int, settings: dict) -> list[Shard]:
    """Cut every task's probe set into shards of ``shard_size`` and interleave them round-robin over tasks."""
    empty = [t.name for t in tasks if not t.probe]
    if empty:
        raise EstimationError(f"task(s) {', '.join(map(repr, empty))} have no probe examples; raise "
                              f"splits.probe_fraction / splits.min_probe or add data")
    blocks = [[t.probe[s : s + shard_size] for s in range(0, len(t.probe), shard_size)] for t in tasks]
    base = json.dumps(settings, sort_keys=True)
    shards: list[Shard] = []
    for r in range(max(len(b) for b in blocks)):
        for j, t in enumerate(tasks):
            if r >= len(blocks[j]):
                continue
            exs = blocks[j][r]
            h = hashlib.sha256(base.encode())
            for ex in exs:
                h.update(f"\x00{ex.id}\x00{ex.content_hash}".encode())
            shards.append(Shard(len(shards), j, t.name, tuple(ex.id for ex in exs),
                                tuple((ex.prompt, ex.response) for ex in exs), h.hexdigest()[:24]))
    return shards


# --------------------------------------------------------------------------------------------------
# the actor


class EstimationActor:
    """Holds the base model and every proxy once; scores a shard for any subset of the proxies.

    Args:
        model: ``asdict(ModelConfig)`` of the proxy model (``cfg.proxy``).
        tokenizer_path: the proxy model's tokenizer as saved in the run.
        proxies: every proxy the actor may be asked to score with.
        batch_size: examples per forward pass.
        top_k: top-k log-probabilities kept per response token for the JSD (0: no JSD).
        num_threads: torch intra-op threads (one per CPU the actor holds).
        use_gpu: put the model on the GPU Ray assigned.
    """

    def __init__(self, model: dict, tokenizer_path: str, proxies: list[Proxy], batch_size: int, top_k: int,
                 num_threads: int = 1, use_gpu: bool = False):
        import torch

        torch.set_num_threads(num_threads)
        self._model_cfg = model
        self._tokenizer_path = tokenizer_path
        self._proxies = {p.hash: p for p in proxies}
        self._batch_size = batch_size
        self._top_k = top_k
        self._device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self._tok = None  # loaded lazily, so a restarted actor reloads on its first call
        self._base = None  # the base model (wrapped in place by the PeftModel when there are LoRA proxies)
        self._peft = None  # one PeftModel holding every LoRA proxy as a named adapter
        self._full: dict[str, Any] = {}  # proxies that are whole fine-tuned models (probes.full_finetune)

    def load(self) -> int:
        """Load the tokenizer, the base model and every adapter (once); return the process id."""
        if self._tok is not None:
            return os.getpid()
        from transformers import AutoModelForCausalLM

        from taskpgm_ray.config import ModelConfig, TinyModelConfig
        from taskpgm_ray.models import build_model, load_tokenizer

        mc = ModelConfig(**{**self._model_cfg, "tiny": TinyModelConfig(**self._model_cfg["tiny"])})
        tok = load_tokenizer(self._tokenizer_path)
        on_gpu = self._device == "cuda"
        self._base = build_model(mc, tok, on_gpu=on_gpu).to(self._device).eval()
        for p in self._proxies.values():
            try:
                if (Path(p.path) / "adapter_config.json").exists():
                    if self._peft is None:
                        from peft import PeftModel

                        self._peft = PeftModel.from_pretrained(self._base, p.path, adapter_name=_adapter_name(p.hash))
                    else:
                        self._peft.load_adapter(p.path, adapter_name=_adapter_name(p.hash))
                else:
                    self._full[p.hash] = AutoModelForCausalLM.from_pretrained(p.path).to(self._device).eval()
            except Exception as exc:
                raise EstimationError(f"cannot load the adapter of task {p.task!r} from {p.path}: "
                                      f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        if self._peft is not None:
            self._peft.to(self._device).eval()
        self._tok = tok
        return os.getpid()

    def score(self, shard: Shard, hashes: list[str], pair_hashes: list[str] | None = None,
              cached_topk: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> dict:
        """Score ``shard`` under the keys ``hashes``; with ``pair_hashes``, also their pairwise JSD sums.

        A key is a proxy's adapter hash, ``base`` (the base model), or ``rot:<key>`` (that model on the
        shard's rotated pairs: prompt k with response k + 1). Top-k arrays are kept for proxies only.

        Returns ``{"loglik": {key: (m,) float64}, "topk": {hash: (idx (T, k) int32, logp (T, k) float32)},
        "n_tokens": (m,), "jsd_hashes", "jsd_sum": (b, b) or None, "forwards", "pid"}``.

        Raises:
            EstimationError: a non-finite log-likelihood, naming the example, its task and the adapter.
        """
        import torch

        from taskpgm_ray.models import collate, encode_example

        self.load()
        max_length, chat = self._model_cfg["max_length"], self._model_cfg.get("chat_template", False)

        def batches(pairs):
            encoded = [encode_example(self._tok, p, r, max_length, chat_template=chat) for p, r in pairs]
            return [collate(encoded[s : s + self._batch_size], self._tok.pad_token_id)
                    for s in range(0, len(encoded), self._batch_size)]

        straight, rotated = batches(shard.pairs), batches(rotate_pairs(shard.pairs))
        out: dict[str, Any] = {"loglik": {}, "topk": {}, "n_tokens": None, "forwards": 0, "pid": os.getpid()}
        with torch.inference_mode():
            for key in hashes:
                model_key = key.removeprefix(ROT)
                keep_topk = bool(self._top_k) and model_key == key and key != BASE
                ll, idx, logp, n_tok = [], [], [], []
                with self._model(model_key) as net:
                    for batch in rotated if key.startswith(ROT) else straight:
                        b_ll, b_idx, b_logp, b_n = self._score_batch(net, batch, keep_topk)
                        ll.append(b_ll)
                        idx.append(b_idx)
                        logp.append(b_logp)
                        n_tok.append(b_n)
                        out["forwards"] += 1
                ll = np.concatenate(ll)
                self._check_finite(ll, shard, model_key)
                out["loglik"][key] = ll
                if keep_topk:
                    out["topk"][key] = (np.concatenate(idx), np.concatenate(logp))
                if model_key == key:
                    out["n_tokens"] = np.concatenate(n_tok)
        out["jsd_hashes"], out["jsd_sum"] = None, None
        if self._top_k and pair_hashes:
            from taskpgm_ray.mixture import pairwise_jsd_sum_topk

            have = {**(cached_topk or {}), **out["topk"]}
            out["jsd_hashes"] = list(pair_hashes)
            out["jsd_sum"] = pairwise_jsd_sum_topk(np.stack([have[h][0] for h in pair_hashes]),
                                                   np.stack([have[h][1] for h in pair_hashes]))
        return out

    @contextlib.contextmanager
    def _model(self, key: str):
        """The network behind a key: the base (adapters disabled), a full proxy, or a LoRA adapter."""
        if key == BASE:
            if self._peft is None:
                yield self._base
            else:
                with self._peft.disable_adapter():
                    yield self._peft
        elif key in self._full:
            yield self._full[key]
        else:
            self._peft.set_adapter(_adapter_name(key))
            yield self._peft

    def _score_batch(self, net, batch: dict, keep_topk: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One forward pass: per-example response log-likelihood (B,), top-k ids/log-probs (T_resp, k), tokens (B,)."""
        import torch

        from taskpgm_ray.models import IGNORE_INDEX

        labels = batch["labels"].to(self._device)
        logits = net(input_ids=batch["input_ids"].to(self._device),
                     attention_mask=batch["attention_mask"].to(self._device), use_cache=False).logits
        target = labels[:, 1:]  # position t predicts token t + 1
        mask = target != IGNORE_INDEX  # (B, T-1): response tokens only
        logp = torch.log_softmax(logits[:, :-1][mask].float(), dim=-1)  # (T_resp, V), row-major over (B, T)
        tok_logp = logp.gather(-1, target[mask].unsqueeze(-1)).squeeze(-1).double()  # (T_resp,)
        row = mask.nonzero()[:, 0]  # example of each response token
        ll = torch.zeros(labels.shape[0], dtype=torch.float64, device=logp.device).index_add_(0, row, tok_logp)
        n_tok = mask.sum(1).cpu().numpy()
        if not keep_topk:
            return ll.cpu().numpy(), np.zeros((0, 0), np.int32), np.zeros((0, 0), np.float32), n_tok
        vals, idx = logp.topk(min(self._top_k, logp.shape[-1]), dim=-1)
        return ll.cpu().numpy(), idx.int().cpu().numpy(), vals.float().cpu().numpy(), n_tok

    def _check_finite(self, ll: np.ndarray, shard: Shard, h: str) -> None:
        bad = np.flatnonzero(~np.isfinite(ll))
        if bad.size:
            who = "the base model" if h == BASE else \
                f"the adapter of task {self._proxies[h].task!r} ({self._proxies[h].path})"
            raise EstimationError(
                f"non-finite log-likelihood {ll[bad[0]]} for probe example {shard.example_ids[bad[0]]!r} "
                f"(task {shard.task_name!r}) under {who}; "
                f"{bad.size} example(s) of this shard affected: check that model's training (lr, dtype)")


def _adapter_name(h: str) -> str:
    return f"p{h}"


def rotate_pairs(pairs: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """Prompt k with response k + 1 (cyclically): answers that belong to other inputs of the same task."""
    return [(pairs[k][0], pairs[(k + 1) % len(pairs)][1]) for k in range(len(pairs))]


# --------------------------------------------------------------------------------------------------
# the shard cache


def _read_shard(path: Path) -> dict | None:
    """A cached shard record, or None when absent or unreadable (then it is simply recomputed)."""
    if not path.exists():
        return None
    try:
        with np.load(path) as f:
            hashes = [str(h) for h in f["adapters"]]
            rec = {"loglik": {h: f["loglik"][i] for i, h in enumerate(hashes)}, "n_tokens": f["n_tokens"],
                   "topk": {}, "jsd_hashes": None, "jsd_sum": None}
            if "topk_idx" in f:
                with_topk = [str(h) for h in f["topk_adapters"]]
                rec["topk"] = {h: (f["topk_idx"][i], f["topk_logp"][i]) for i, h in enumerate(with_topk)}
            if "jsd_adapters" in f:
                rec["jsd_hashes"] = [str(h) for h in f["jsd_adapters"]]
                rec["jsd_sum"] = f["jsd_sum"]
        return rec
    except Exception:  # a foreign or damaged file: recompute rather than fail the stage
        return None


def _write_shard(path: Path, shard: Shard, rec: dict) -> None:
    hashes = sorted(rec["loglik"])
    arrays: dict[str, Any] = {"example_ids": np.array(shard.example_ids), "adapters": np.array(hashes),
                              "loglik": np.stack([rec["loglik"][h] for h in hashes]), "n_tokens": rec["n_tokens"]}
    with_topk = sorted(rec["topk"])
    if with_topk:
        arrays["topk_adapters"] = np.array(with_topk)
        arrays["topk_idx"] = np.stack([rec["topk"][h][0] for h in with_topk])
        arrays["topk_logp"] = np.stack([rec["topk"][h][1] for h in with_topk])
    if rec["jsd_hashes"] is not None:
        arrays["jsd_adapters"] = np.array(rec["jsd_hashes"])
        arrays["jsd_sum"] = rec["jsd_sum"]
    atomic_savez(path, **arrays)


def _merge(rec: dict | None, new: dict) -> dict:
    """A cached record updated with an actor's result (new rows win; the new JSD matrix replaces the old)."""
    rec = rec or {"loglik": {}, "topk": {}, "n_tokens": new["n_tokens"], "jsd_hashes": None, "jsd_sum": None}
    rec["loglik"].update(new["loglik"])
    rec["topk"].update(new["topk"])
    if new["n_tokens"] is not None:
        rec["n_tokens"] = new["n_tokens"]
    if new["jsd_hashes"] is not None:
        rec["jsd_hashes"], rec["jsd_sum"] = new["jsd_hashes"], new["jsd_sum"]
    return rec


def _jsd_pairs(rec: dict, order: list[str]) -> np.ndarray | None:
    """The (n, n) JSD sums for the proxies ``order`` from a record, or None if it does not cover them."""
    if rec["jsd_hashes"] is None or not set(order) <= set(rec["jsd_hashes"]):
        return None
    pos = [rec["jsd_hashes"].index(h) for h in order]
    return np.asarray(rec["jsd_sum"])[np.ix_(pos, pos)]


def shard_keys(shard: Shard, order: list[str]) -> list[str]:
    """What a shard is scored under: every proxy, the base, and (with two or more examples, so a rotation
    exists) its own task's proxy and the base on the rotated pairs."""
    keys = [*order, BASE]
    if len(shard.pairs) >= 2:
        keys += [ROT + order[shard.task], ROT + BASE]
    return keys


def _missing(rec: dict | None, keys: list[str], order: list[str], jsd: bool) -> list[str]:
    """The keys a record still lacks (a proxy also needs its top-k arrays when the JSD is on)."""
    if rec is None:
        return list(keys)
    proxies = set(order)
    return [h for h in keys if h not in rec["loglik"] or (jsd and h in proxies and h not in rec["topk"])]


# --------------------------------------------------------------------------------------------------
# the driver


def resolve_proxies(cfg: Config, tasks: list[TaskData]) -> list[Proxy]:
    """The finished probe adapter of every task, in task order; an error names each one missing."""
    from taskpgm_ray.distributed.probes import is_complete, probe_dir

    proxies, missing = [], []
    for t in tasks:
        d = probe_dir(cfg, t).resolve()
        if not is_complete(d):
            missing.append(f"{t.name!r} (expected at {d})")
        proxies.append(Proxy(t.name, d.name.rsplit("-", 1)[1], str(d)))
    if missing:
        raise EstimationError(f"no finished probe adapter for task(s) {', '.join(missing)}; "
                              f"run `taskpgm probe CONFIG` (stage 2) or `taskpgm run CONFIG` (every stage) first")
    return proxies


def estimate_command(cfg: Config, *, tasks: list[TaskData] | None = None,
                     on_result: Callable[[int, list], None] | None = None,
                     progress: StageProgress | None = None) -> dict:
    """Score every proxy on every probe set and write the likelihood matrix, affinities and mixture.

    Args:
        cfg: the run config (``estimation``, ``energy``, the proxy model, ``tracking``, ``output_dir``).
        tasks: already loaded tasks (default: ``load_tasks(cfg)``).
        on_result: test hook, called as ``on_result(results_so_far, actor_handles)`` after each newly
            scored shard (e.g. to kill an actor mid-run).
        progress: the stage's live line: shards k/n and the running mixture's L1 change.

    Writes (under ``output_dir``): ``likelihoods.npz`` (CONTRACT.md), ``jsd.npz`` (with ``estimation.jsd``),
    ``estimate/mixture.json`` (the config's energy), ``estimate/signal.json`` (signal checks),
    ``estimate/examples.npz`` (per-example scores), ``estimate/affinity.png``, ``estimate/progress.json``,
    ``estimate/shards/*.npz``, and a W&B run.

    Returns:
        the ``progress.json`` content plus the ``weights`` and the paths written.

    Raises:
        EstimationError: a task without probe examples, a missing or unloadable adapter, a non-finite
            log-likelihood, or every actor lost.
        ValueError: the actors ask for more CPUs/GPUs than the cluster has.
    """
    import ray

    from taskpgm_ray.distributed.cluster import init_ray, require_resources
    from taskpgm_ray.models import ensure_proxy_tokenizer
    from taskpgm_ray.tasks import load_tasks

    t0 = time.perf_counter()
    e = cfg.estimation
    tasks = load_tasks(cfg) if tasks is None else tasks
    names = [t.name for t in tasks]
    utilities = [t.utility for t in tasks]
    settings = scoring_settings(cfg)
    shards = make_shards(tasks, e.shard_size, settings)
    proxies = resolve_proxies(cfg, tasks)
    order = [p.hash for p in proxies]
    init_ray()
    require_resources(f"estimation ({e.num_actors} actors x {e.num_cpus_per_actor:g} CPU, "
                      f"{e.num_gpus_per_actor:g} GPU)", cpus=e.num_actors * e.num_cpus_per_actor,
                      gpus=e.num_actors * e.num_gpus_per_actor)
    out_dir = Path(cfg.output_dir)
    shard_dir = out_dir / "estimate" / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)

    # 1. the cache: what is already scored, and which (proxy, shard) pairs are missing
    records = {s.index: _read_shard(shard_dir / f"{s.key}.npz") for s in shards}
    todo = deque(s for s in shards if _missing(records[s.index], shard_keys(s, order), order, e.jsd)
                 or (e.jsd and _jsd_pairs(records[s.index], order) is None))
    pending = {s.index for s in todo}
    cached = [s for s in shards if s.index not in pending]
    progress = progress or StageProgress()
    progress.start(len(shards), done=len(cached))

    # 2. the central optimiser, fed the cached shards first (in round-robin order)
    from taskpgm_ray.distributed.solve import mixture_caps

    optimizer = ray.remote(MixtureOptimizer).options(num_cpus=0).remote(
        len(tasks), len(shards), cfg.energy, e.stop_when_stable, utilities, mixture_caps(cfg, tasks),
        [len(t.train) for t in tasks])
    sums: dict[int, ShardSums] = {}
    stats = {"scored": 0, "adapter_shard_scorings": 0, "forwards": 0, "requeued": 0, "actor_failures": 0,
             "tokens_scored": 0, "scoring_seconds": 0.0}
    try:
        status = {"stable": False}
        for s in cached:
            sums[s.index] = _shard_sums(s, records[s.index], order, e.jsd)
            status = ray.get(optimizer.add.remote(sums[s.index]))
            if status["stable"]:
                break

        # 3. the actors score what is missing, until done or the mixture is stable
        if todo and not status["stable"]:
            tok_path = str(ensure_proxy_tokenizer(cfg, out_dir).resolve())
            _run_actors(cfg, proxies, todo, records, sums, optimizer, status, stats, tok_path=tok_path,
                        on_result=on_result, progress=progress)
        trajectory = ray.get(optimizer.trajectory.remote())
        bands = ray.get(optimizer.bootstrap.remote(e.bootstrap, cfg.probes.seed))
    finally:
        ray.kill(optimizer)

    # 4. final sums in shard order (bit-identical whatever ran where), outputs
    used = sorted(sums)
    n = len(tasks)
    loglik_sum, count = np.zeros((n, n)), np.zeros(n, dtype=np.int64)
    jsd_by_task, tok_by_task = np.zeros((n, n, n)), np.zeros(n, dtype=np.int64)
    signal_sums = {k: np.zeros(n) for k in ("base_loglik_sum", "information_sum", "base_information_sum",
                                            "information_gain_sq_sum")}
    signal_sums["information_count"] = np.zeros(n, dtype=np.int64)
    for i in used:
        s = sums[i]
        loglik_sum[:, s.task] += s.loglik
        count[s.task] += s.count
        signal_sums["base_loglik_sum"][s.task] += s.base
        signal_sums["information_sum"][s.task] += s.information
        signal_sums["base_information_sum"][s.task] += s.base_information
        signal_sums["information_count"][s.task] += s.information_count
        signal_sums["information_gain_sq_sum"][s.task] += s.information_sq
        if s.jsd_sum is not None:
            jsd_by_task[s.task] += s.jsd_sum
            tok_by_task[s.task] += s.tokens
    examples = _per_example(shards, used, records, order)
    atomic_savez(out_dir / "estimate" / "examples.npz", tasks=np.array(names), **examples)
    signal = signal_checks(names, examples, n_boot=max(e.bootstrap, 100), seed=cfg.probes.seed)
    atomic_write_json(out_dir / "estimate" / "signal.json", signal)
    progress = {
        "tasks": names, "shards_total": len(shards), "shards_used": len(used), "shards_cached": len(cached),
        "fraction_used": len(used) / len(shards),
        "examples_used": int(count.sum()), "examples_total": int(sum(len(t.probe) for t in tasks)),
        "stopped_early": len(used) < len(shards), **stats, "trajectory": trajectory,
        "bootstrap": _named_bands(bands, names),
    }
    result = _write_outputs(cfg, tasks, loglik_sum, count, jsd_by_task if e.jsd else None,
                            tok_by_task if e.jsd else None, progress, signal_sums)
    progress["seconds"] = time.perf_counter() - t0
    atomic_write_json(out_dir / "estimate" / "progress.json", progress)
    _log_wandb(cfg, progress, result, signal)
    return {**progress, **result, "signal": signal}


def _shard_sums(shard: Shard, rec: dict, order: list[str], jsd: bool) -> ShardSums:
    """A shard's column contribution for the proxies ``order`` (row i = proxy i), summed in example order,
    with the base model's sum and the own proxy's and base's input-output information sums."""
    ll = rec["loglik"]
    loglik = np.array([float(np.sum(ll[h])) for h in order])
    pairs = _jsd_pairs(rec, order) if jsd else None
    own = order[shard.task]
    info = base_info = info_sq = 0.0
    info_count = 0
    if ROT + own in ll:  # a shard of one example has no rotation
        own_info, base_info_k = ll[own] - ll[ROT + own], ll[BASE] - ll[ROT + BASE]
        info, base_info = float(np.sum(own_info)), float(np.sum(base_info_k))
        info_sq = float(np.sum((own_info - base_info_k) ** 2))
        info_count = len(shard.example_ids)
    return ShardSums(shard.task, loglik, len(shard.example_ids), pairs, int(np.sum(rec["n_tokens"])) if jsd else 0,
                     base=float(np.sum(ll[BASE])), information=info, base_information=base_info,
                     information_count=info_count, information_sq=info_sq)


def _per_example(shards: list[Shard], used: list[int], records: dict, order: list[str]) -> dict[str, np.ndarray]:
    """Every scored probe example in shard order: ``task`` (M,) its column, ``loglik`` (n, M) every proxy's
    log-likelihood, ``base`` (M,), and ``own_rotated`` / ``base_rotated`` (M,) on the rotated pairs (NaN
    where a one-example shard has none)."""
    task, loglik, base, own_rot, base_rot = [], [], [], [], []
    for i in used:
        s, ll = shards[i], records[i]["loglik"]
        m = len(s.example_ids)
        task.append(np.full(m, s.task))
        loglik.append(np.stack([ll[h] for h in order]))
        base.append(ll[BASE])
        rotated = ROT + order[s.task] in ll
        own_rot.append(ll[ROT + order[s.task]] if rotated else np.full(m, np.nan))
        base_rot.append(ll[ROT + BASE] if rotated else np.full(m, np.nan))
    return {"task": np.concatenate(task), "loglik": np.concatenate(loglik, axis=1), "base": np.concatenate(base),
            "own_rotated": np.concatenate(own_rot), "base_rotated": np.concatenate(base_rot)}


# A proxy "learned" when its relative NLL gain over the base on its own probe set is at least this and its
# bootstrap interval excludes 0; the affinity "has signal" when its SNR is at least this.
MIN_GAIN = 0.05
MIN_SNR = 2.0


def signal_checks(names: list[str], examples: dict[str, np.ndarray], *, n_boot: int = 200,
                  seed: int = 0) -> dict:
    """Did each proxy learn its task, does each task's output depend on its input, and can the affinity be
    told from noise: the ``estimate/signal.json`` content, with plain-language ``warnings``."""
    from taskpgm_ray.mixture.signal import affinity_snr, input_information, proxy_gains

    n = len(names)
    col = [np.flatnonzero(examples["task"] == j) for j in range(n)]
    own = [examples["loglik"][j, c] for j, c in enumerate(col)]
    base = [examples["base"][c] for c in col]
    rot = [c[np.isfinite(examples["own_rotated"][c])] for c in col]
    gains = proxy_gains(own, base, n_boot=n_boot, seed=seed)
    info = input_information([examples["loglik"][j, r] for j, r in enumerate(rot)],
                             [examples["own_rotated"][r] for r in rot], [examples["base"][r] for r in rot],
                             [examples["base_rotated"][r] for r in rot], n_boot=n_boot, seed=seed)
    snr = affinity_snr([examples["loglik"][:, c] for c in col], n_boot=n_boot, seed=seed) if n >= 2 else None
    tasks, warnings = {}, []
    for j, name in enumerate(names):
        g, inf = gains[j], info[j]
        learned = bool(np.isfinite(g.low) and g.low > 0 and g.gain >= MIN_GAIN)
        tasks[name] = {"base_nll": g.base_nll, "proxy_nll": g.proxy_nll, "gain": g.gain, "gain_low": g.low,
                       "gain_high": g.high, "learned": learned, "examples": g.examples,
                       "information": inf.proxy, "base_information": inf.base, "information_gain": inf.gain,
                       "information_gain_low": inf.low, "information_gain_high": inf.high}
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
        elif np.isfinite(inf.high) and inf.high <= 0:
            warnings.append(f"task {name!r}: its proxy's answers depend on the input no more than the base's "
                            f"(information gain {inf.gain:+.2f} nats/example, 90% interval {inf.low:+.2f} to "
                            f"{inf.high:+.2f}): its targets look like noise, or the proxy learned only their format")
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


def _run_actors(cfg, proxies, todo, records, sums, optimizer, status, stats, *, tok_path, on_result, progress):
    """Hand the shards in ``todo`` to the actors; fold results into ``records``, ``sums``, ``status``, ``stats``."""
    import ray

    e = cfg.estimation
    order = [p.hash for p in proxies]
    shard_dir = Path(cfg.output_dir) / "estimate" / "shards"
    remote = ray.remote(EstimationActor).options(
        num_cpus=e.num_cpus_per_actor, num_gpus=e.num_gpus_per_actor,
        max_restarts=e.max_actor_restarts, max_task_retries=0)
    # Never start more actors than there are shards to score.
    actors = [remote.remote(asdict(cfg.proxy), tok_path, proxies, e.batch_size,
                            e.jsd_top_k if e.jsd else 0, max(1, int(e.num_cpus_per_actor)),
                            e.num_gpus_per_actor > 0) for _ in range(min(e.num_actors, len(todo)))]
    deaths = dict.fromkeys(range(len(actors)), 0)  # actor slot -> times it died
    alive = set(range(len(actors)))
    try:
        try:  # load up front so a bad adapter is one clear error, not a retry loop
            ray.get([a.load.remote() for a in actors])
        except ray.exceptions.RayTaskError as exc:
            raise EstimationError(str(getattr(exc, "cause", exc))) from None
        inflight: dict[Any, tuple[int, Shard]] = {}
        last_update = None  # the optimizer's answer to the previous shard, read for the live line when ready
        busy = dict.fromkeys(alive, 0)
        t_start = time.perf_counter()

        def dispatch() -> None:
            while todo and not status["stable"]:
                free = [a for a in sorted(alive) if busy[a] < IN_FLIGHT_PER_ACTOR]
                if not free:
                    return
                a = min(free, key=lambda k: busy[k])
                s = todo.popleft()
                rec = records[s.index]
                need = _missing(rec, shard_keys(s, order), order, e.jsd)
                cached_topk = {h: rec["topk"][h] for h in order if rec and h in rec["topk"] and h not in need}
                ref = actors[a].score.remote(s, need, order if e.jsd else None, cached_topk if e.jsd else None)
                inflight[ref] = (a, s)
                busy[a] += 1

        dispatch()
        while inflight:
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            a, s = inflight.pop(ref)
            busy[a] -= 1
            try:
                res = ray.get(ref)
            except ray.exceptions.RayActorError:
                # The actor died (killed, OOM, node lost): its shard goes back to the front of the queue.
                stats["actor_failures"] += 1
                stats["requeued"] += 1
                todo.appendleft(s)
                deaths[a] += 1
                if deaths[a] > e.max_actor_restarts:
                    alive.discard(a)
                if not alive:
                    raise EstimationError(f"every estimation actor died (max_actor_restarts="
                                          f"{e.max_actor_restarts}); see the Ray logs") from None
                dispatch()
                continue
            except ray.exceptions.RayTaskError as exc:
                raise EstimationError(str(getattr(exc, "cause", exc))) from None
            records[s.index] = _merge(records[s.index], res)
            _write_shard(shard_dir / f"{s.key}.npz", s, records[s.index])
            sums[s.index] = _shard_sums(s, records[s.index], order, e.jsd)
            update = optimizer.add.remote(sums[s.index])
            if e.stop_when_stable is not None:  # only the stopping rule needs the answer before going on
                status.update(ray.get(update))
            elif last_update is not None and ray.wait([last_update], timeout=0)[0]:  # the display: never wait
                status["l1_change"] = ray.get(last_update)["l1_change"]
            last_update = update
            l1 = status.get("l1_change")
            progress.update(len(sums), info=f"mixture L1 change {l1:.2g}" if l1 is not None else "")
            stats["scored"] += 1
            stats["adapter_shard_scorings"] += len(res["loglik"])
            stats["forwards"] += res["forwards"]
            stats["tokens_scored"] += int(np.sum(records[s.index]["n_tokens"])) * len(res["loglik"])
            if on_result is not None:
                on_result(stats["scored"], actors)
            dispatch()
        stats["scoring_seconds"] = time.perf_counter() - t_start
    finally:
        for act in actors:
            ray.kill(act)


def _named_bands(bands: dict | None, names: list[str]) -> dict | None:
    if bands is None:
        return None
    return {k: (dict(zip(names, v)) if isinstance(v, list) else v) for k, v in bands.items()}


def inputs_hash(names: list[str], loglik_sum: np.ndarray, count: np.ndarray, jsd_sum=None, tokens=None) -> str:
    """Hash of the likelihood inputs a mixture was solved from (``mixture.json``'s ``inputs_hash``)."""
    h = hashlib.sha256(json.dumps(names).encode())
    for a in (loglik_sum, count, jsd_sum, tokens):
        if a is not None:
            h.update(np.ascontiguousarray(np.asarray(a, dtype=np.float64)).tobytes())
    return h.hexdigest()[:16]


def _write_outputs(cfg, tasks, loglik_sum, count, jsd_by_task, tok_by_task, progress, signal_sums) -> dict:
    """likelihoods.npz, jsd.npz, the heatmap and the default-hyperparameter mixture.json."""
    from taskpgm_ray.distributed.solve import affinity_from_sums, mixture_caps, solve_from_sums
    from taskpgm_ray.mixture.signal import information_gain
    from taskpgm_ray.mixture_file import save_likelihoods, write_mixture
    from taskpgm_ray.report import plot_affinity

    out = Path(cfg.output_dir)
    names = [t.name for t in tasks]
    sizes = np.array([len(t.train) for t in tasks], dtype=np.int64)
    save_likelihoods(str(out / "likelihoods.npz"), names, loglik_sum, count, sizes, **signal_sums)
    jsd_sum = tokens = None
    written = {"likelihoods": str(out / "likelihoods.npz")}
    if jsd_by_task is not None:
        jsd_sum, tokens = jsd_by_task.sum(0), int(tok_by_task.sum())
        atomic_savez(out / "jsd.npz", tasks=np.array(names), jsd_sum=jsd_sum, token_count=np.int64(tokens),
                     jsd_sum_per_task=jsd_by_task, token_count_per_task=tok_by_task)
        written["jsd"] = str(out / "jsd.npz")
    e = cfg.energy
    weights, sol, _ = solve_from_sums(
        loglik_sum, count, jsd_sum, tokens, e, utilities=[t.utility for t in tasks],
        information=information_gain(signal_sums["information_sum"], signal_sums["base_information_sum"],
                                     signal_sums["information_count"], signal_sums["information_gain_sq_sum"]),
        max_weights=mixture_caps(cfg, tasks), sizes=sizes)
    affinity = affinity_from_sums(loglik_sum, count, jsd_sum, tokens, e.affinity)
    (out / "estimate").mkdir(parents=True, exist_ok=True)
    written["heatmap"] = str(plot_affinity(names, affinity, out / "estimate" / "affinity.png",
                                           f"{e.affinity} affinity (clustered order)"))
    hyper = {**{k: v for k, v in asdict(e).items() if k != "affinity"}, "fraction_used": progress["fraction_used"]}
    digest = inputs_hash(names, loglik_sum, count, jsd_sum if e.affinity == "jsd" else None,
                         tokens if e.affinity == "jsd" else None)
    named = dict(zip(names, map(float, weights)))
    write_mixture(out / "estimate" / "mixture.json", weights=named, method="taskpgm", affinity=e.affinity,
                  hyperparameters=hyper, energy=float(sol.energy), kkt_residual=float(sol.kkt_residual),
                  sizes=dict(zip(names, map(int, sizes))), inputs_hash=digest, weight_unit=cfg.train.weight_unit)
    written["mixture"] = str(out / "estimate" / "mixture.json")
    return {"weights": named, "energy": float(sol.energy), "kkt_residual": float(sol.kkt_residual),
            "inputs_hash": digest, "affinity": affinity.tolist(), "paths": written}


def _log_wandb(cfg: Config, progress: dict, result: dict, signal: dict) -> None:
    """Progress curve, heatmap, mixture and signal checks to W&B (offline unless configured online)."""
    from taskpgm_ray.tracking import wandb_run

    names = progress["tasks"]
    with wandb_run(cfg.tracking, cfg.output_dir, job_type="estimate",
                   config={"estimation": asdict(cfg.estimation), "energy": asdict(cfg.energy)}) as run:
        if run is None:
            return
        import wandb

        for row in progress["trajectory"]:
            run.log({"estimate/fraction": row["fraction"], "estimate/l1_change": row["l1_change"],
                     **{f"estimate/weight/{k}": v for k, v in zip(names, row["weights"])}}, step=row["shards"])
        run.log({"estimate/affinity": wandb.Image(result["paths"]["heatmap"])})
        rows = [[k, v["gain"], v["gain_low"], v["gain_high"], v["learned"], v["information_gain"]]
                for k, v in signal["tasks"].items()]
        run.log({"estimate/signal": wandb.Table(columns=["task", "gain", "gain_low", "gain_high", "learned",
                                                         "information_gain"], data=rows)})
        run.summary.update({"fraction_used": progress["fraction_used"], "energy": result["energy"],
                            "signal/learned": signal["learned"], "signal/warnings": len(signal["warnings"]),
                            **({"signal/affinity_snr": signal["affinity"]["snr"]} if "affinity" in signal else {}),
                            **{f"weight/{k}": v for k, v in result["weights"].items()}})

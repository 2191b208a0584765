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
proxy and the base with each prompt paired with the response r examples on, for r = 1 .. K - 1 (keys
``rot:<hash>``, ``rot2:<hash>``, ...; K = ``estimation.info_prompts``, at most the shard's size): the bounded
input-output information of ``taskpgm_ray.mixture.signal.info_nce``. These n + 1 + 2 (K - 1) scorings per
shard (instead of n) feed the signal checks and the energy's ``information`` unary.

The driver feeds every result to the central optimiser (``optimizer.MixtureOptimizer``, one actor),
which re-solves the mixture; with ``estimation.stop_when_stable`` the driver stops handing out shards
once the optimiser calls the mixture stable. Shards go out round-robin over tasks so that every column
has data early. An actor that dies has its shards re-queued; final sums are formed in shard order, so
they are bit-identical whatever ran where.

Ray touch-points:
  ``ray.remote(EstimationActor).options``  ``estimation.num_actors`` scoring actors (CPUs/GPUs each, restarts)
  ``ray.remote(MixtureOptimizer)``         the central optimiser, one actor, re-solving as sums arrive
  ``ray.wait`` / ``ray.get``               results taken as they finish; a dead actor's shard is re-queued
  ``ray.kill``                             actors and the optimiser released at the end of the stage
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
from taskpgm_ray.mixture_file import SIGNAL_ARRAYS
from taskpgm_ray.tasks import TaskData

SCORING_VERSION = 1  # bump when the scoring arithmetic changes: it invalidates every cached shard
BASE = "base"  # the cache key of the base model's scores (no adapter)
ROT = "rot:"  # prefix of a scoring with rotated pairs: prompt k with response k + r (input-output information)
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

        A key is a proxy's adapter hash, ``base`` (the base model), or ``rot_key(r, <key>)`` (that model on the
        shard's pairs rotated by r: prompt k with response k + r). Top-k arrays are kept for proxies only.

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

        inputs = {0: batches(shard.pairs)}  # rotation r -> its batches, built when first needed
        out: dict[str, Any] = {"loglik": {}, "topk": {}, "n_tokens": None, "forwards": 0, "pid": os.getpid()}
        with torch.inference_mode():
            for key in hashes:
                r, model_key = split_key(key)
                if r not in inputs:
                    inputs[r] = batches(rotate_pairs(shard.pairs, r))
                keep_topk = bool(self._top_k) and model_key == key and key != BASE
                ll, idx, logp, n_tok = [], [], [], []
                with self._model(model_key) as net:
                    for batch in inputs[r]:
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


def rotate_pairs(pairs: tuple[tuple[str, str], ...], r: int = 1) -> list[tuple[str, str]]:
    """Prompt k with response k + r (cyclically): answers that belong to other inputs of the same task."""
    return [(pairs[k][0], pairs[(k + r) % len(pairs)][1]) for k in range(len(pairs))]


def rot_key(r: int, key: str) -> str:
    """The cache key of ``key``'s model on the pairs rotated by ``r`` (``rot:`` for r = 1, then ``rot2:``, ...)."""
    return f"{ROT}{key}" if r == 1 else f"rot{r}:{key}"


def split_key(key: str) -> tuple[int, str]:
    """``(r, model key)`` of a cache key: r = 0 for a straight scoring."""
    head, sep, rest = key.partition(":")
    if sep and head.startswith("rot"):
        return int(head[3:] or 1), rest
    return 0, key


def aligned_information(ll: dict, key: str, m: int, prompts: int) -> np.ndarray | None:
    """(m,) ``info_nce`` of each example's answer under ``key``'s model, from its own prompt and the rotated
    scorings present (at most ``prompts`` prompts in all), or None when the shard has no rotation.

    ``ll[rot_key(r, key)][k]`` scores answer k + r under prompt k, so ``np.roll(., r)[k]`` is answer k under
    prompt k - r: every row of the stack scores the same answers."""
    from taskpgm_ray.mixture.signal import info_nce

    rows = [ll[key]] + [np.roll(ll[rot_key(r, key)], r) for r in range(1, min(prompts, m))
                        if rot_key(r, key) in ll]
    return info_nce(np.stack(rows)) if len(rows) > 1 else None


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


def shard_keys(shard: Shard, order: list[str], prompts: int) -> list[str]:
    """What a shard is scored under: every proxy, the base, and (with two or more examples, so a rotation
    exists) its own task's proxy and the base on the pairs rotated by 1 .. min(prompts, examples) - 1."""
    keys = [*order, BASE]
    for r in range(1, min(prompts, len(shard.pairs))):
        keys += [rot_key(r, order[shard.task]), rot_key(r, BASE)]
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
    """Score the proxies on the probe sets and write the likelihood matrix, affinities and mixture.

    Every proxy scores every probe shard, unless ``estimation.active``: then a first pass and the
    (proxy, shard) units ``mixture.active`` asks for, until the mixture is certain (``_estimate_active``).

    Args:
        cfg: the run config (``estimation``, ``energy``, the proxy model, ``tracking``, ``output_dir``).
        tasks: already loaded tasks (default: ``load_tasks(cfg)``).
        on_result: test hook, called as ``on_result(results_so_far, actor_handles)`` after each newly
            scored shard (e.g. to kill an actor mid-run).
        progress: the stage's live line: shards k/n and the running mixture's L1 change.

    Writes (under ``output_dir``): ``likelihoods.npz`` (CONTRACT.md), ``jsd.npz`` (with ``estimation.jsd``),
    ``estimate/mixture.json`` (the config's energy), ``estimate/signal.json`` (signal checks),
    ``estimate/examples.npz`` (per-example scores), ``estimate/affinity.png``, ``estimate/progress.json``
    (with ``fraction_pairs`` and the ``measured`` matrix), ``estimate/shards/*.npz``,
    ``estimate/active.json`` (``estimation.active``: the stop rule's state, for a resume), and a W&B run.

    Returns:
        the ``progress.json`` content plus the ``weights`` and the paths written.

    Raises:
        EstimationError: a task without probe examples, a missing or unloadable adapter, a non-finite
            log-likelihood, or every actor lost.
        ValueError: the actors ask for more CPUs/GPUs than the cluster has.
    """
    from taskpgm_ray.distributed.cluster import init_ray, require_resources
    from taskpgm_ray.models import ensure_proxy_tokenizer
    from taskpgm_ray.tasks import load_tasks

    t0 = time.perf_counter()
    e = cfg.estimation
    tasks = load_tasks(cfg) if tasks is None else tasks
    names = [t.name for t in tasks]
    n = len(tasks)
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
    progress = progress or StageProgress()
    stats = {"scored": 0, "adapter_shard_scorings": 0, "forwards": 0, "requeued": 0, "actor_failures": 0,
             "tokens_scored": 0, "scoring_seconds": 0.0}
    records = {s.index: _read_shard(shard_dir / f"{s.key}.npz") for s in shards}  # the cache
    pool = _ActorPool(cfg, proxies, records, stats, on_result=on_result,
                      tok_path=lambda: str(ensure_proxy_tokenizer(cfg, out_dir).resolve()))
    active = None
    try:
        if e.active:
            active = _estimate_active(cfg, tasks, shards, order, records, pool, progress)
            used, trajectory, bands = [s.index for s in shards], active["trajectory"], active["bands"]
            sums = {s.index: _shard_sums(s, records[s.index], order, False, e.info_prompts) for s in shards}
            cached = active["cached"]
        else:
            used, cached, sums, trajectory, bands = _estimate_full(cfg, tasks, shards, order, records, pool,
                                                                   progress, utilities)
    finally:
        pool.close()

    # final sums in shard order (bit-identical whatever ran where), outputs
    loglik_sum, count, jsd_sum, jsd_tokens, signal_sums = _totals([sums[i] for i in sorted(used)], n)
    probe_total = np.array([len(t.probe) for t in tasks])  # (n,) probe examples per task
    measured = np.broadcast_to(count / probe_total, (n, n)).copy()  # every proxy scored the shards used
    if active is not None:  # the solver sees the completed matrix; measured cells keep their exact sums
        loglik_sum, count, measured = active["loglik_sum"], active["count"], active["measured"]
    examples = _per_example(shards, sorted(used), records, order, e.info_prompts)
    atomic_savez(out_dir / "estimate" / "examples.npz", tasks=np.array(names), **examples)
    signal = signal_checks(names, examples, n_boot=max(e.bootstrap, 100), seed=cfg.probes.seed)
    atomic_write_json(out_dir / "estimate" / "signal.json", signal)
    units_total = n * len(shards)
    units_scored = sum(sum(h in records[i]["loglik"] for h in order) for i in used)
    progress = {
        "tasks": names, "shards_total": len(shards), "shards_used": len(used), "shards_cached": len(cached),
        "fraction_used": len(used) / len(shards) if active is None else units_scored / units_total,
        "examples_used": int(count.sum()), "examples_total": int(sum(len(t.probe) for t in tasks)),
        "stopped_early": len(used) < len(shards) or units_scored < units_total, **stats, "trajectory": trajectory,
        "bootstrap": _named_bands(bands, names),
        # Which entries of the likelihood matrix were measured: measured[i][j] = share of task j's probe
        # examples that proxy i scored (1: exact; 0: filled in by the completion of mixture/active.py).
        "active": bool(e.active), "fraction_pairs": float(np.mean(measured > 0)),
        "fraction_units": units_scored / units_total,
        "fraction_examples": float((measured * probe_total[None, :]).sum() / (n * probe_total.sum())),
        "measured": measured.tolist(),
        "certainty": active["certainty"] if active is not None else None,
    }
    result = _write_outputs(cfg, tasks, loglik_sum, count, jsd_sum if e.jsd and active is None else None,
                            jsd_tokens if e.jsd and active is None else None, progress, signal_sums, measured)
    progress["seconds"] = time.perf_counter() - t0
    atomic_write_json(out_dir / "estimate" / "progress.json", progress)
    _log_wandb(cfg, progress, result, signal)
    return {**progress, **result, "signal": signal}


def _estimate_full(cfg, tasks, shards, order, records, pool, progress, utilities):
    """Every proxy on every shard, fed to the central optimiser; with ``stop_when_stable``, until it is stable.

    Returns ``(used shard indices, cached shards, {index: ShardSums}, trajectory, bootstrap bands)``.
    """
    import ray

    from taskpgm_ray.distributed.solve import mixture_caps

    e = cfg.estimation
    # 1. the cache: what is already scored, and which (proxy, shard) pairs are missing
    todo = deque((s, _missing(records[s.index], shard_keys(s, order, e.info_prompts), order, e.jsd)) for s in shards
                 if _missing(records[s.index], shard_keys(s, order, e.info_prompts), order, e.jsd)
                 or (e.jsd and _jsd_pairs(records[s.index], order) is None))
    pending = {s.index for s, _ in todo}
    cached = [s for s in shards if s.index not in pending]
    progress.start(len(shards), done=len(cached))

    # 2. the central optimiser, fed the cached shards first (in round-robin order)
    optimizer = ray.remote(MixtureOptimizer).options(num_cpus=0).remote(
        len(tasks), len(shards), cfg.energy, e.stop_when_stable, utilities, mixture_caps(cfg, tasks),
        [len(t.train) for t in tasks])
    sums: dict[int, ShardSums] = {}
    status: dict = {"stable": False}
    last_update = None  # the optimizer's answer to the previous shard, read for the live line when ready
    try:
        for s in cached:
            sums[s.index] = _shard_sums(s, records[s.index], order, e.jsd, e.info_prompts)
            status = ray.get(optimizer.add.remote(sums[s.index]))
            if status["stable"]:
                break

        def after(s: Shard, keys: list[str]) -> None:
            nonlocal last_update
            sums[s.index] = _shard_sums(s, records[s.index], order, e.jsd, e.info_prompts)
            update = optimizer.add.remote(sums[s.index])
            if e.stop_when_stable is not None:  # only the stopping rule needs the answer before going on
                status.update(ray.get(update))
            elif last_update is not None and ray.wait([last_update], timeout=0)[0]:  # the display: never wait
                status["l1_change"] = ray.get(last_update)["l1_change"]
            last_update = update
            l1 = status.get("l1_change")
            progress.update(len(sums), info=f"mixture L1 change {l1:.2g}" if l1 is not None else "")

        # 3. the actors score what is missing, until done or the mixture is stable
        if todo and not status["stable"]:
            pool.score(todo, after=after, stop=lambda: status["stable"])
        trajectory = ray.get(optimizer.trajectory.remote())
        bands = ray.get(optimizer.bootstrap.remote(e.bootstrap, cfg.probes.seed))
    finally:
        ray.kill(optimizer)
    return sorted(sums), cached, sums, trajectory, bands


# Active estimation (estimation.active): the first pass and the rounds, as in benchmarks/active.py.
ACTIVE_FIRST_FRACTION = 0.05  # first pass: share of the other off-diagonal pairs scored on one shard
ACTIVE_FULL_PER_TASK = 2  # first pass: other proxies per task scored on every shard
ACTIVE_ROUND = 0.01  # share of all (proxy, shard) units asked for per round (at least 2 per actor)
ACTIVE_CHECKS = 2  # certain checks in a row before stopping (one can be certain by chance)
ACTIVE_LEVEL = 0.9  # probability of the declared L1 bound
ACTIVE_DRAWS = 64  # bootstrap draws per check


def _estimate_active(cfg, tasks, shards, order, records, pool, progress) -> dict:
    """Active estimation: score the first pass, then rounds of the units ``next_pairs`` asks for, until
    ``mixture_certainty`` is certain within ``estimation.active_tol`` at two checks in a row.

    A unit is (proxy i, shard r of task j); the base model and the rotated pairs score every shard (the
    signal checks and the information unary need them; 1 + 2 (K - 1) scorings per shard against n proxies). Units are
    cached per (adapter, shard) as in a full run, so an interrupted run resumes with what it had; the stop
    rule's streak is kept in ``estimate/active.json`` under a hash of the scored units and of everything the
    rule's solve reads (the energy, the caps, the utilities and sizes), so a re-run of a finished estimation
    scores nothing, and a re-run with another energy starts a new streak. The last check's inputs go to
    ``estimate/active.npz``, from which ``active_certainty`` redoes the check for another energy.

    Returns ``loglik_sum`` (n, n: the completed matrix times ``count``, exact sums in fully measured cells),
    ``count`` (n: every probe example), ``measured`` (n, n: share of each cell's examples scored),
    ``trajectory`` (one row per check), ``bands``, ``certainty`` (the last check) and ``cached`` (shards with
    every planned unit already on disk at the start).
    """
    from taskpgm_ray.distributed.solve import mixture_caps
    from taskpgm_ray.mixture.active import complete_likelihoods, initial_pairs, mixture_certainty, next_pairs

    e, n, seed = cfg.estimation, len(tasks), cfg.probes.seed
    by_task = [[s for s in shards if s.task == j] for j in range(n)]  # shard r of task j: by_task[j][r]
    count = np.zeros((n, max(len(b) for b in by_task)))  # (n, n_shards) examples per shard
    for j, b in enumerate(by_task):
        count[j, : len(b)] = [len(s.example_ids) for s in b]
    N = count.sum(1)
    units_total = int(n * (count > 0).sum())
    state_path = Path(cfg.output_dir) / "estimate" / "active.json"
    saved = _read_json(state_path)
    sizes = [len(t.train) for t in tasks]
    utilities, caps = [t.utility for t in tasks], mixture_caps(cfg, tasks)
    plan = initial_pairs(count, fraction=ACTIVE_FIRST_FRACTION, full_per_task=min(ACTIVE_FULL_PER_TASK, n - 1),
                         seed=seed)
    budget = max(2 * e.num_actors, int(np.ceil(ACTIVE_ROUND * units_total)))

    def scored_units() -> tuple[np.ndarray, np.ndarray]:
        """(n, n, n_shards) the units on disk and their summed log-likelihoods (0 where not scored)."""
        mask, Y = np.zeros((n, *count.shape), bool), np.zeros((n, *count.shape))
        for j, b in enumerate(by_task):
            for r, s in enumerate(b):
                ll = (records[s.index] or {"loglik": {}})["loglik"]
                for i, h in enumerate(order):
                    if h in ll:
                        mask[i, j, r], Y[i, j, r] = True, float(np.sum(ll[h]))
        return mask, Y

    def wanted(plan: np.ndarray) -> deque:
        """(shard, keys still missing) for every shard the plan touches, the base and rotations included."""
        todo = deque()
        for j, b in enumerate(by_task):
            for r, s in enumerate(b):
                keys = [order[i] for i in np.flatnonzero(plan[:, j, r])] + shard_keys(s, order, e.info_prompts)[n:]
                have = (records[s.index] or {"loglik": {}})["loglik"]
                need = [k for k in keys if k not in have]
                if need:
                    todo.append((s, need))
        return todo

    todo = wanted(plan)
    cached = [s for s in shards if s.index not in {t.index for t, _ in todo}]
    done = int(scored_units()[0].sum())  # units on disk, for the live line
    progress.start(units_total, done=done)
    streak, trajectory, last = 0, [], None

    def after(s: Shard, keys: list[str]) -> None:
        nonlocal done
        done += sum(k in set(order) for k in keys)
        progress.update(done)

    while True:
        if todo:
            pool.score(todo, after=after)
        scored, Y = scored_units()
        # the energy's inputs besides L: the signal sums from the base and rotated scorings of every shard
        _, _, _, _, sig = _totals([_shard_sums(s, records[s.index], order, False, e.info_prompts) for s in shards], n)

        solve = _active_solver(cfg.energy, N, sig, utilities, caps, sizes)
        noise_var = _example_noise(by_task, records, order)
        comp = complete_likelihoods(Y, count, scored, seed=seed, noise_var=noise_var)
        cert = mixture_certainty(comp, solve, tol=e.active_tol, level=ACTIVE_LEVEL, n_boot=ACTIVE_DRAWS, seed=seed)
        # The streak is the rule's verdict on this energy's mixture: another energy (or caps, utilities, sizes)
        # is another mixture and starts its own streak.
        solve_inputs = [asdict(cfg.energy), None if caps is None else np.asarray(caps).tolist(), utilities, sizes]
        key = hashlib.sha256(json.dumps([order, [s.key for s in shards], e.active_tol, seed, solve_inputs]).encode()
                             + np.packbits(scored).tobytes()).hexdigest()[:24]
        if saved and saved.get("key") == key:  # the very check a previous run ended on: not a new check
            streak, trajectory = int(saved["streak"]), list(saved["trajectory"])
        else:
            streak = streak + 1 if cert.certain else 0
            trajectory.append({"shards": int(scored.sum()), "fraction": float(scored.sum() / units_total),
                               "fraction_pairs": comp.fraction_pairs, "fraction_examples": comp.fraction_examples,
                               "l1_change": float(np.abs(cert.weights - last).sum()) if last is not None else None,
                               "declared_l1": cert.l1_at_level, "expected_l1": cert.expected_l1,
                               "certain": cert.certain, "rank": comp.rank, "weights": cert.weights.tolist()})
        last = cert.weights
        atomic_write_json(state_path, {"key": key, "streak": streak, "trajectory": trajectory})
        progress.update(int(scored.sum()), info=f"pairs {comp.fraction_pairs:.0%}, within "
                                                f"{cert.l1_at_level:.2g} L1 (90%)")
        if streak >= ACTIVE_CHECKS or scored.sum() >= units_total:
            break
        pick = next_pairs(comp, cert, budget)
        plan = scored.copy()
        plan[pick[:, 0], pick[:, 1], pick[:, 2]] = True
        todo = wanted(plan)

    # The last check's inputs: the completion is a deterministic function of them, so the check can be redone
    # for another energy (``active_certainty``: the report's bound for the mixture the run selected).
    atomic_savez(state_path.with_suffix(".npz"), loglik_units=Y, count=count, scored=scored, noise_var=noise_var,
                 seed=np.int64(seed))
    measured = comp.scored_examples / N[None, :]
    full = comp.scored_examples >= N[None, :]
    loglik_sum = np.where(full, Y.sum(2), comp.loglik_mean * N[None, :])
    return {"loglik_sum": loglik_sum, "count": N.astype(np.int64), "measured": measured, "trajectory": trajectory,
            "cached": cached,
            "bands": {"resamples": ACTIVE_DRAWS, "level": ACTIVE_LEVEL, "unit": "completed likelihood matrix",
                      "mean": cert.samples.mean(0).tolist(), "std": cert.samples.std(0).tolist(),
                      "low": cert.low.tolist(), "high": cert.high.tolist()},
            "certainty": {"tol": e.active_tol, "level": ACTIVE_LEVEL, "draws": ACTIVE_DRAWS,
                          "declared_l1": cert.l1_at_level, "expected_l1": cert.expected_l1,
                          "certain": cert.certain, "checks_certain_in_a_row": streak,
                          "stopped_by": "certainty" if streak >= ACTIVE_CHECKS else "everything scored",
                          "completion_rank": comp.rank, "completion_tau2": comp.tau2,
                          "energy": asdict(cfg.energy)}}  # the bound is for this energy's mixture


def _active_solver(energy, N, signal, utilities, caps, sizes) -> Callable[[np.ndarray], np.ndarray]:
    """The solve the certainty rule bootstraps: a complete (n, n) mean log-likelihood matrix to ``energy``'s
    mixture, with the estimate's signal sums, the repetition caps and the tasks' utilities and sizes."""
    from taskpgm_ray.distributed.solve import solve_from_sums

    def solve(L: np.ndarray) -> np.ndarray:
        return solve_from_sums(L * N[None, :], N, None, None, energy, utilities=utilities, signal=signal,
                               max_weights=caps, sizes=sizes)[0]

    return solve


def active_certainty(cfg: Config, tasks: list[TaskData], energy) -> dict | None:
    """The active stop rule's last check redone for ``energy`` (an ``EnergyConfig``): the bound on how far the
    full-scoring mixture of that energy is from the one the completed likelihood matrix gives.

    The estimate stage's bound (``progress.json`` ``certainty``) is for the config's energy; Tune may select a
    trial with another beta, prior strength or kernel, and that mixture's bound is not the same. The check reads
    ``estimate/active.npz`` (the scored units and the per-example noise of the last check) and the signal sums
    of ``likelihoods.npz``; the completion and the draws use the estimate's seed, so for the config's energy it
    is the stage's own last check, to the digit.

    Returns:
        ``{"tol", "level", "draws", "declared_l1", "expected_l1", "certain", "weights", "energy"}``, or None when
        the run has no active estimation state (a full scoring, or a run from before the file existed).
    """
    from taskpgm_ray.distributed.solve import mixture_caps
    from taskpgm_ray.mixture.active import complete_likelihoods, mixture_certainty
    from taskpgm_ray.mixture_file import load_signal

    out = Path(cfg.output_dir)
    path = out / "estimate" / "active.npz"
    if not path.exists() or not (out / "likelihoods.npz").exists():
        return None
    with np.load(path) as f:
        Y, count, scored, noise_var, seed = (f["loglik_units"], f["count"], f["scored"], f["noise_var"],
                                             int(f["seed"]))
    if scored.shape[0] != len(tasks):
        return None  # the state of another task list
    N = count.sum(1)
    solve = _active_solver(energy, N, load_signal(str(out / "likelihoods.npz")), [t.utility for t in tasks],
                           mixture_caps(cfg, tasks), [len(t.train) for t in tasks])
    comp = complete_likelihoods(Y, count, scored, seed=seed, noise_var=noise_var)
    tol = cfg.estimation.active_tol
    cert = mixture_certainty(comp, solve, tol=tol, level=ACTIVE_LEVEL, n_boot=ACTIVE_DRAWS, seed=seed)
    return {"tol": tol, "level": ACTIVE_LEVEL, "draws": ACTIVE_DRAWS, "declared_l1": cert.l1_at_level,
            "expected_l1": cert.expected_l1, "certain": cert.certain, "weights": cert.weights.tolist(),
            "energy": asdict(energy)}


def _example_noise(by_task: list[list[Shard]], records: dict, order: list[str]) -> np.ndarray:
    """Per task, the per-example variance of the proxies' log-likelihoods around proxy + example effects
    (``sigma_j^2`` of mixture/active.py), from the per-example scores of the proxies that scored each shard:
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


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _totals(sums: list[ShardSums], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
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


def _shard_sums(shard: Shard, rec: dict, order: list[str], jsd: bool, prompts: int) -> ShardSums:
    """A shard's column contribution for the proxies ``order`` (row i = proxy i; NaN for a proxy that did not
    score it, in active estimation), summed in example order, with the base model's sum and the own proxy's
    and base's input-output information sums (``aligned_information``)."""
    ll = rec["loglik"]
    loglik = np.array([float(np.sum(ll[h])) if h in ll else np.nan for h in order])
    pairs = _jsd_pairs(rec, order) if jsd else None
    own, m = order[shard.task], len(shard.example_ids)
    info = {}
    own_info, base_info = aligned_information(ll, own, m, prompts), aligned_information(ll, BASE, m, prompts)
    if own_info is not None and base_info is not None:  # a shard of one example has no other prompt
        info = {"information": float(np.sum(own_info)), "base_information": float(np.sum(base_info)),
                "information_count": m, "information_sq": float(np.sum(own_info**2)),
                "information_bound": m * float(np.log(_prompts_scored(ll, own, m, prompts))),
                "information_tokens": int(np.sum(rec["n_tokens"]))}
    return ShardSums(shard.task, loglik, m, pairs, int(np.sum(rec["n_tokens"])) if jsd else 0,
                     base=float(np.sum(ll[BASE])), **info)


def _prompts_scored(ll: dict, key: str, m: int, prompts: int) -> int:
    """K of ``aligned_information``: the own prompt and the rotations of ``key`` present."""
    return 1 + sum(rot_key(r, key) in ll for r in range(1, min(prompts, m)))


def _per_example(shards: list[Shard], used: list[int], records: dict, order: list[str],
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
        bound.append(np.full(m, np.log(_prompts_scored(ll, own, m, prompts))))
        tokens.append(np.asarray(records[i]["n_tokens"], dtype=np.float64))
    return {"task": np.concatenate(task), "loglik": np.concatenate(loglik, axis=1), "base": np.concatenate(base),
            "own_information": np.concatenate(own_info), "base_information": np.concatenate(base_info),
            "information_bound": np.concatenate(bound), "n_tokens": np.concatenate(tokens)}


# The affinity "has signal" when its SNR is at least this (a proxy "learned": mixture.signal.MIN_GAIN).
MIN_SNR = 2.0


def signal_checks(names: list[str], examples: dict[str, np.ndarray], *, n_boot: int = 200,
                  seed: int = 0) -> dict:
    """Did each proxy learn its task, does each task's output depend on its input, and can the affinity be
    told from noise: the ``estimate/signal.json`` content, with plain-language ``warnings``."""
    from taskpgm_ray.mixture.signal import MIN_GAIN, affinity_snr, input_information, output_only, proxy_gains

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


class _ActorPool:
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
            self._records[s.index] = _merge(self._records[s.index], res)
            _write_shard(shard_dir / f"{s.key}.npz", s, self._records[s.index])
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


def _write_outputs(cfg, tasks, loglik_sum, count, jsd_sum, tok_by_task, progress, signal_sums, measured) -> dict:
    """likelihoods.npz (with ``measured``), jsd.npz (the JSD sums per proxy pair), the heatmap and the
    default-hyperparameter mixture.json."""
    from taskpgm_ray.distributed.solve import affinity_from_sums, mixture_caps, solve_from_sums
    from taskpgm_ray.figures import plot_affinity
    from taskpgm_ray.mixture_file import save_likelihoods, write_mixture

    out = Path(cfg.output_dir)
    names = [t.name for t in tasks]
    sizes = np.array([len(t.train) for t in tasks], dtype=np.int64)
    save_likelihoods(str(out / "likelihoods.npz"), names, loglik_sum, count, sizes, measured=measured,
                     **signal_sums)
    tokens = None
    written = {"likelihoods": str(out / "likelihoods.npz")}
    if jsd_sum is not None:
        tokens = int(tok_by_task.sum())
        atomic_savez(out / "jsd.npz", tasks=np.array(names), jsd_sum=jsd_sum, token_count=np.int64(tokens),
                     token_count_per_task=tok_by_task)
        written["jsd"] = str(out / "jsd.npz")
    e = cfg.energy
    weights, sol, _ = solve_from_sums(
        loglik_sum, count, jsd_sum, tokens, e, utilities=[t.utility for t in tasks],
        signal=signal_sums, max_weights=mixture_caps(cfg, tasks), sizes=sizes)
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

        for row in progress["trajectory"]:  # active estimation: one row per check, with its declared L1
            run.log({"estimate/fraction": row["fraction"], "estimate/l1_change": row["l1_change"],
                     **{f"estimate/{k}": row[k] for k in ("fraction_pairs", "declared_l1") if k in row},
                     **{f"estimate/weight/{k}": v for k, v in zip(names, row["weights"])}}, step=row["shards"])
        # which entries of the likelihood matrix were measured (share of the cell's probe examples scored)
        run.log({"estimate/measured": wandb.Table(
            columns=["proxy", "task", "measured"],
            data=[[names[i], names[j], v] for i, row in enumerate(progress["measured"]) for j, v in enumerate(row)])})
        run.log({"estimate/affinity": wandb.Image(result["paths"]["heatmap"])})
        columns = ["gain", "gain_low", "gain_high", "learned", "information", "information_bound", "output_only"]
        rows = [[k, *(v[c] for c in columns)] for k, v in signal["tasks"].items()]
        run.log({"estimate/signal": wandb.Table(columns=["task", *columns], data=rows)})
        certainty = progress["certainty"] or {}
        run.summary.update({"fraction_used": progress["fraction_used"], "energy": result["energy"],
                            "active": progress["active"], "fraction_pairs": progress["fraction_pairs"],
                            "fraction_examples": progress["fraction_examples"],
                            **({"declared_l1": certainty["declared_l1"]} if certainty else {}),
                            "signal/learned": signal["learned"], "signal/warnings": len(signal["warnings"]),
                            **({"signal/affinity_snr": signal["affinity"]["snr"]} if "affinity" in signal else {}),
                            **{f"weight/{k}": v for k, v in result["weights"].items()}})

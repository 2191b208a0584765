"""Scoring: the probe shards, the actor that scores them, and the keys a shard is scored under.

A shard is a contiguous block of one task's probe examples. ``EstimationActor`` (a plain class; the actor pool
makes it a Ray actor) holds the proxy model's base and every adapter once and scores a shard for any subset of
keys: a proxy's adapter hash, ``base``, or ``rot_key(r, key)`` (that model on the shard's pairs rotated by r:
prompt k with response k + r), from which ``aligned_information`` forms the bounded input-output information.

Ray touch-points: none here (``actor_pool.ActorPool`` wraps the actor in ``ray.remote``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from taskpgm_ray.config import Config
from taskpgm_ray.tasks import TaskData

SCORING_VERSION = 1  # bump when the scoring arithmetic changes: it invalidates every cached shard
BASE = "base"  # the cache key of the base model's scores (no adapter)
ROT = "rot:"  # prefix of a scoring with rotated pairs: prompt k with response k + r (input-output information)

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

def shard_keys(shard: Shard, order: list[str], prompts: int) -> list[str]:
    """What a shard is scored under: every proxy, the base, and (with two or more examples, so a rotation
    exists) its own task's proxy and the base on the pairs rotated by 1 .. min(prompts, examples) - 1."""
    keys = [*order, BASE]
    for r in range(1, min(prompts, len(shard.pairs))):
        keys += [rot_key(r, order[shard.task]), rot_key(r, BASE)]
    return keys

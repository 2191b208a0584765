"""Stage 2: one small proxy per task, a LoRA adapter (peft) on the proxy model (``cfg.proxy``), as Ray tasks.

Each adapter is cached under ``<output_dir>/probes/<task>-<hash>/`` where the hash covers the task's data,
the proxy settings and the proxy model (and its weights), and is written whole or not at all (temp dir, then
rename). A re-run trains only what is missing; a failed probe is retried by Ray (``max_retries``) and then
reported by name, after the adapters that did finish are on disk.

LoRA adapts ``probes.target_modules``, or when that is null the attention projections of the model's family
(``LORA_TARGETS``), or for a family not listed every linear layer but the output layer.

Ray touch-points (all in ``probe_command``):
  ``ray.remote(train_fn).options``       one task per probe, ``probes.num_cpus``/``num_gpus``, ``max_retries``
  ``ray.wait`` / ``ray.get``             each adapter recorded as it finishes
  ``ray.exceptions.RayError``            a probe that still failed after its retries, reported by task name
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taskpgm_ray.config import Config, ModelConfig, ProbeConfig
from taskpgm_ray.console import StageProgress
from taskpgm_ray.errors import BadInput
from taskpgm_ray.tasks import TaskData

if TYPE_CHECKING:
    import torch

# Settings that change what a probe learns; resources and retries do not, so they stay out of the hash.
_NOT_HASHED = ("num_gpus", "num_cpus", "max_retries")
# The attention projections LoRA adapts in each family we know (key: the model config's model_type). Names are
# suffixes of module paths, as peft matches them ("attn.c_proj": GPT-2's attention output, not its MLP's c_proj).
_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                     "gemma3_text", "olmo", "olmo2", "stablelm", "starcoder2", "granite"), _QKVO),
    "phi": ("q_proj", "k_proj", "v_proj", "self_attn.dense"),
    "phi3": ("qkv_proj", "o_proj"),
    "gpt2": ("c_attn", "attn.c_proj"),
    "gpt_bigcode": ("c_attn", "attn.c_proj"),
    "gpt_neox": ("query_key_value", "attention.dense"),
    "falcon": ("query_key_value", "self_attention.dense"),
    "bloom": ("query_key_value", "self_attention.dense"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "gptj": ("q_proj", "k_proj", "v_proj", "out_proj"),
}
ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer but the output layer


class ProbeError(RuntimeError):
    """Some probes failed after their retries; ``failed`` maps task name to the last error."""

    def __init__(self, failed: dict[str, str], kept: int, where: Path):
        self.failed = failed
        names = ", ".join(sorted(failed))
        detail = "; ".join(f"{k}: {v}" for k, v in sorted(failed.items()))
        super().__init__(f"probe fine-tune failed for task(s) {names} ({detail}); "
                         f"{kept} finished adapter(s) kept under {where}; re-run to retry only the failed ones")


def probe_hash(task: TaskData, probes: ProbeConfig, model: ModelConfig) -> str:
    """Content hash of what determines an adapter: task data, proxy settings, base model (and its weights)."""
    from taskpgm_ray.models import model_fingerprint

    settings = {k: v for k, v in asdict(probes).items() if k not in _NOT_HASHED}
    blob = json.dumps({"task": task.hash, "probe": settings, "model": asdict(model),
                       "weights": model_fingerprint(model)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def probe_dir(cfg: Config, task: TaskData) -> Path:
    """Where the adapter of ``task`` lives: ``<output_dir>/probes/<task>-<hash>``."""
    return Path(cfg.output_dir) / "probes" / f"{task.name}-{probe_hash(task, cfg.probes, cfg.proxy)}"


# --------------------------------------------------------------------------------------------------
# LoRA targets


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of targets: the module path equals the target or ends with ``.target``."""
    return name == target or name.endswith("." + target)


def _linear_layers(model: torch.nn.Module) -> list[str]:
    """Paths of the linear layers (``nn.Linear``, GPT-2's ``Conv1D``) LoRA can adapt: all but the output layer."""
    import torch
    from transformers.pytorch_utils import Conv1D

    get_out = getattr(model, "get_output_embeddings", None)
    output = get_out() if callable(get_out) else None
    return [n for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not output and n.rsplit(".", 1)[-1] != "lm_head"]


def _summary(model: torch.nn.Module, names: list[str] | None = None, limit: int = 16) -> str:
    """Module paths with layer numbers folded (``h.*.attn.c_attn (Conv1D)``), for one-line errors."""
    import re

    mods = dict(model.named_modules())
    leaves = names if names is not None else [n for n, m in mods.items() if n and not list(m.children())]
    layer = re.compile(r"\.\d+(?=\.|$)")
    folded = list(dict.fromkeys(f"{layer.sub('.*', n)} ({type(mods[n]).__name__})" for n in leaves))
    if not folded:
        return "none"
    more = f", ... ({len(folded) - limit} more)" if len(folded) > limit else ""
    return ", ".join(folded[:limit]) + more


def lora_targets(model: torch.nn.Module, requested: list[str] | None) -> list[str] | str:
    """The modules LoRA adapts in ``model``: ``requested`` (checked against the model), else its family's
    attention projections (``LORA_TARGETS``), else every linear layer but the output layer.

    Raises:
        ValueError: one line naming the modules found, when a requested name matches no module, or when the
            architecture has no linear layer to adapt.
    """
    linear = _linear_layers(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = f"{type(model).__name__} (model_type {model_type!r})"
    if requested:
        if list(requested) == [ALL_LINEAR] and linear:
            return ALL_LINEAR
        names = [n for n, _ in model.named_modules()]
        missing = [t for t in requested if not any(_matches(n, t) for n in names)]
        if missing:
            raise BadInput(f"probes.target_modules: no module of {arch} matches {', '.join(map(repr, missing))}; "
                           f"its linear layers: {_summary(model, linear)}")
        return list(requested)
    family = LORA_TARGETS.get(model_type or "")
    if family and all(any(_matches(n, t) for n in linear) for t in family):
        return list(family)
    if not linear:
        raise BadInput(f"probes.target_modules: cannot detect LoRA targets for {arch}: no linear layer besides the "
                       f"output layer; modules found: {_summary(model)}; name the modules to adapt in "
                       f"probes.target_modules (or set probes.full_finetune: true)")
    return sorted({n.rsplit(".", 1)[-1] for n in linear})


def is_complete(path: Path) -> bool:
    """An adapter directory counts only once its metadata is there (it is written last, then renamed)."""
    return (path / "probe.json").exists()


def install_adapter(tmp: Path, out: Path) -> None:
    """Rename the finished adapter directory ``tmp`` to ``out`` (atomic: a reader sees all of it or nothing).

    The rename fails when ``out`` already exists; that is fine only if ``out`` is a complete adapter (a concurrent
    run with the same hash finished first, so theirs is identical). Anything else is raised: the probe is not
    on disk, and reporting it trained would hand the estimate stage a directory it cannot load.
    """
    try:
        os.replace(tmp, out)
    except OSError as exc:
        if not is_complete(out):
            raise RuntimeError(f"probe adapter {out}: could not move the finished adapter into place ({exc}) and "
                               f"no complete adapter is there; remove {out} and re-run") from exc


# --------------------------------------------------------------------------------------------------
# the worker


def train_probe(task_name: str, pairs: list[tuple[str, str]], probes: dict, model: dict,
                tokenizer_path: str, out_dir: str) -> dict:
    """Fine-tune one proxy on ``pairs`` (prompt, response) and save it atomically to ``out_dir``.

    Runs in a Ray worker; deterministic given the seed (private torch RNG, seeded example draws).
    Returns the metadata written to ``probe.json``.
    """
    import torch

    from taskpgm_ray.config import ModelConfig, ProbeConfig, TinyModelConfig
    from taskpgm_ray.models import build_model, collate, encode_example, load_tokenizer

    pc = ProbeConfig(**probes)
    mc = ModelConfig(**{**model, "tiny": TinyModelConfig(**model["tiny"])})
    targets = None
    torch.set_num_threads(max(1, int(pc.num_cpus)))  # as many threads as CPUs Ray gave us: more oversubscribes
    on_gpu = pc.num_gpus > 0 and torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    t0 = time.perf_counter()
    tok = load_tokenizer(tokenizer_path)
    net = build_model(mc, tok, on_gpu=on_gpu)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(pc.seed)
        if not pc.full_finetune:
            from peft import LoraConfig, get_peft_model

            targets = lora_targets(net, pc.target_modules)
            lora = LoraConfig(r=pc.lora_rank, lora_alpha=pc.lora_alpha, target_modules=targets,
                              lora_dropout=0.0, task_type="CAUSAL_LM")
            net = get_peft_model(net, lora)
        net.to(device).train()
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=pc.lr)
        rng = random.Random(f"{pc.seed}/{task_name}")
        encoded = [encode_example(tok, p, r, mc.max_length, chat_template=mc.chat_template) for p, r in pairs]
        losses = []
        for _ in range(pc.steps):
            batch = collate([encoded[rng.randrange(len(encoded))] for _ in range(pc.batch_size)], tok.pad_token_id)
            loss = net(**{k: v.to(device) for k, v in batch.items()}).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    meta = {"task": task_name, "steps": pc.steps, "final_loss": losses[-1] if losses else None,
            "first_loss": losses[0] if losses else None, "seconds": time.perf_counter() - t0,
            "kind": "full" if pc.full_finetune else "lora", "target_modules": targets}
    # Write aside, then rename: a reader sees the whole adapter or nothing.
    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        net.save_pretrained(str(tmp))
        (tmp / "probe.json").write_text(json.dumps(meta, indent=2))
        install_adapter(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


# --------------------------------------------------------------------------------------------------
# the driver


def probe_command(cfg: Config, *, tasks: list[TaskData] | None = None, progress: StageProgress | None = None,
                  train_fn: Callable[..., dict] = train_probe) -> dict:
    """Train (or reuse) one proxy adapter per task; the ``taskpgm probe CONFIG`` stage.

    Args:
        cfg: the run config (``probes``, ``proxy_model`` or else ``model``, ``output_dir``).
        tasks: already loaded tasks (default: ``load_tasks(cfg)``).
        progress: the stage's live line: probes k/n with ETA, a failed probe named as it fails.
        train_fn: what each Ray task runs, with ``train_probe``'s arguments; tests pass a wrapper that fails for
            one task (the product code has no failure hook).

    Returns:
        ``{"probes": {task: {"path", "hash", "status": "trained"|"cached", ...}}, "trained": [...],
        "cached": [...], "seconds": float}``.

    Raises:
        ProbeError: naming every task whose probe still failed after ``probes.max_retries`` retries
            (the finished adapters are kept).
        ValueError: the probes ask for more CPUs/GPUs than the cluster has, or LoRA has no target in the proxy
            model (checked on the driver before any probe starts).
    """
    import ray

    from taskpgm_ray.distributed.cluster import init_ray, require_resources
    from taskpgm_ray.models import ensure_proxy_tokenizer, model_skeleton
    from taskpgm_ray.tasks import load_tasks

    t0 = time.perf_counter()
    tasks = load_tasks(cfg) if tasks is None else tasks
    pc = cfg.probes
    if not pc.full_finetune:  # a bad target list is one clear error here, not n failing Ray tasks
        lora_targets(model_skeleton(cfg.proxy), pc.target_modules)
    init_ray()
    require_resources("a probe fine-tune (probes.num_cpus / probes.num_gpus)", cpus=pc.num_cpus, gpus=pc.num_gpus)
    tok_path = str(ensure_proxy_tokenizer(cfg, cfg.output_dir).resolve())
    (Path(cfg.output_dir) / "probes").mkdir(parents=True, exist_ok=True)
    remote = ray.remote(train_fn).options(num_gpus=pc.num_gpus, num_cpus=pc.num_cpus,
                                             max_retries=pc.max_retries, retry_exceptions=True)
    out: dict[str, dict] = {}
    status: dict[str, str] = {}
    pending: dict[Any, TaskData] = {}
    for t in tasks:
        path = probe_dir(cfg, t).resolve()
        out[t.name] = {"path": str(path), "hash": path.name.rsplit("-", 1)[1]}
        if is_complete(path):
            status[t.name] = "cached"
            out[t.name].update(json.loads((path / "probe.json").read_text()), status="cached")
            continue
        pairs = [(ex.prompt, ex.response) for ex in t.train]
        ref = remote.remote(t.name, pairs, asdict(pc), asdict(cfg.proxy), tok_path, str(path))
        pending[ref] = t
        status[t.name] = "running"
    failed: dict[str, str] = {}
    progress = progress or StageProgress()
    progress.start(len(tasks), done=len(tasks) - len(pending))
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        t = pending.pop(ref)
        try:
            out[t.name].update(ray.get(ref), status="trained")
            status[t.name] = "done"
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None) or exc
            failed[t.name] = f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:300]}"
            status[t.name] = "failed"
            progress.note(f"task {t.name!r} failed after {pc.max_retries} retries ({type(cause).__name__})")
        progress.update(len(tasks) - len(pending), info=f"{len(failed)} failed" if failed else "")
    if failed:
        raise ProbeError(failed, kept=sum(s in ("done", "cached") for s in status.values()),
                         where=Path(cfg.output_dir) / "probes")
    return {"probes": out, "trained": [n for n, s in status.items() if s == "done"],
            "cached": [n for n, s in status.items() if s == "cached"], "seconds": time.perf_counter() - t0}

"""The GPU check (run it through ``benchmarks/gpu_check.sh``): the real-model path on one NVIDIA GPU, offline.

1. Builds a ~100M-parameter random-init Llama (14 layers x 768, byte tokenizer) and saves it to a local
   directory, as a user's checkpoint: the run loads it with ``from_pretrained``, nothing is downloaded.
2. Runs the pipeline's stages on the GPU, one at a time: tasks, probes (4 LoRA proxies, ``probes.num_gpus: 0.25``
   packs them on the one GPU), estimate (one actor on the GPU: 4 proxies + the base score every probe example,
   top-8 JSD), select, train (Ray Train, 1 GPU worker, DeepSpeed ZeRO-2, bf16 where the GPU has it).
3. Times a raw forward of the same model on the same probe batches against the estimation actor's scoring
   of them (forward + response log-likelihoods + top-k), in this process.

Prints the wall time and peak GPU memory of each stage (nvidia-smi, every process on GPU 0), scoring tokens/s
vs the raw forward, and fine-tune tokens/s; writes them to ``<work dir>/gpu_check.json``. A stage that leaves
the GPU idle is a failure (no silent CPU fallback). ``--dry-run``: the same path on CPU with tiny sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# 14 x (4 x 768^2 attention + 3 x 768 x 2048 MLP) = 99.1M parameters, plus 0.4M for the byte vocabulary.
GPU_SIZES = {"hidden_size": 768, "num_layers": 14, "num_heads": 12, "intermediate_size": 2048, "max_length": 128,
             "tasks": ["reverse_a", "copy", "sort", "add"], "scale": 1.0, "max_probe": 64, "max_eval": 16,
             "probe_steps": 30, "probe_batch": 16, "probe_gpus": 0.25, "shard_size": 32, "score_batch": 32,
             "train_steps": 30, "micro_batch": 16}
DRY_SIZES = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128, "max_length": 48,
             "tasks": ["sort", "add"], "scale": 0.25, "max_probe": 8, "max_eval": 4,
             "probe_steps": 3, "probe_batch": 4, "probe_gpus": 0.0, "shard_size": 8, "score_batch": 4,
             "train_steps": 2, "micro_batch": 4}
STAGES = ("tasks", "probes", "estimate", "select", "train")
GPU_STAGES = ("probes", "estimate", "train")  # each must show GPU memory in use, else it ran on the CPU
MIN_GPU_MIB = 200  # memory above the idle baseline that counts as "this stage used the GPU"


def fail(message: str) -> None:
    print(f"gpu_check: FAILED: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def require_gpu() -> str:
    """The GPU's name; fails loudly when torch sees no CUDA device."""
    import torch

    if not torch.cuda.is_available():
        fail(f"torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA device; this check never "
             f"falls back to CPU (for the CPU smoke path: --dry-run)")
    return torch.cuda.get_device_name(0)


class GpuMemory:
    """Peak memory used on GPU 0 by every process (the stages run in Ray workers), from nvidia-smi every 100 ms."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.peak_mib = 0  # the highest reading since start()
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> GpuMemory:
        if self.enabled:
            self._proc = subprocess.Popen(["nvidia-smi", "-i", "0", "--query-gpu=memory.used",
                                           "--format=csv,noheader,nounits", "-lms", "100"],
                                          stdout=subprocess.PIPE, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            if line.strip().isdigit():
                self.peak_mib = max(self.peak_mib, int(line))

    def stop(self) -> int | None:
        if not self.enabled:
            return None
        time.sleep(0.3)  # one more reading after the stage's processes let go
        self._proc.terminate()
        self._proc.wait()
        self._thread.join(timeout=2)
        return self.peak_mib


def build_checkpoint(sizes: dict, out: Path) -> int:
    """A random-init Llama with the byte tokenizer, saved to ``out``; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from taskpgm_ray.models import build_byte_tokenizer

    tok = build_byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=sizes["hidden_size"],
                         intermediate_size=sizes["intermediate_size"], num_hidden_layers=sizes["num_layers"],
                         num_attention_heads=sizes["num_heads"], num_key_value_heads=sizes["num_heads"],
                         max_position_embeddings=max(256, sizes["max_length"]), pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return sum(p.numel() for p in model.parameters())


def run_config(sizes: dict, work: Path, model_dir: Path, gpu: bool):
    from taskpgm_ray.config import config_from_dict

    return config_from_dict({
        "output_dir": str(work / "run"), "offline": True,
        "synthetic": {"seed": 7, "scale": sizes["scale"], "include": sizes["tasks"]},
        "splits": {"max_probe": sizes["max_probe"], "min_probe": 4, "max_eval": sizes["max_eval"]},
        "model": {"name": str(model_dir), "tokenizer": str(model_dir), "max_length": sizes["max_length"]},
        "probes": {"steps": sizes["probe_steps"], "batch_size": sizes["probe_batch"], "num_cpus": 1,
                   "num_gpus": sizes["probe_gpus"] if gpu else 0.0},
        "estimation": {"num_actors": 1, "num_gpus_per_actor": 1.0 if gpu else 0.0, "shard_size": sizes["shard_size"],
                       "batch_size": sizes["score_batch"], "jsd": True, "jsd_top_k": 8, "bootstrap": 20},
        "tune": {"enabled": False},
        "train": {"num_workers": 1, "use_gpu": gpu, "zero_stage": 2, "steps": sizes["train_steps"],
                  "micro_batch_size": sizes["micro_batch"], "eval_every": 0, "checkpoint_every": 0,
                  "warmup_steps": 3, "lr": 1e-3},
        "tracking": {"wandb": "disabled"},
    })


def forward_vs_scoring(cfg, gpu: bool, repeats: int = 3) -> dict:
    """A raw forward against ``EstimationActor``'s scoring (forward + log-likelihoods + top-k) on the same
    model (the first proxy) and the same probe batches; best of ``repeats`` each."""
    import torch

    from taskpgm_ray.distributed.estimation import resolve_proxies
    from taskpgm_ray.distributed.scoring import EstimationActor, make_shards, scoring_settings
    from taskpgm_ray.models import IGNORE_INDEX, collate, encode_example, ensure_proxy_tokenizer
    from taskpgm_ray.tasks import load_tasks

    e = cfg.estimation
    tasks = load_tasks(cfg)
    proxies = resolve_proxies(cfg, tasks)
    actor = EstimationActor(dataclasses.asdict(cfg.proxy), str(ensure_proxy_tokenizer(cfg, cfg.output_dir)), proxies,
                            e.batch_size, e.jsd_top_k, num_threads=1 if not gpu else (os.cpu_count() or 1),
                            use_gpu=gpu)
    actor.load()
    device = "cuda" if gpu else "cpu"
    batches = []
    for s in make_shards(tasks, e.shard_size, scoring_settings(cfg)):
        enc = [encode_example(actor._tok, p, r, cfg.proxy.max_length) for p, r in s.pairs]
        batches += [{k: v.to(device) for k, v in collate(enc[i: i + e.batch_size], actor._tok.pad_token_id).items()}
                    for i in range(0, len(enc), e.batch_size)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    response = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    best = {"raw": float("inf"), "score": float("inf")}
    with torch.inference_mode(), actor._model(proxies[0].hash) as net:
        net(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"], use_cache=False)  # warm
        actor._score_batch(net, batches[0], True)
        for _ in range(repeats):  # interleaved: robust to other load
            sync()
            t = time.perf_counter()
            for b in batches:
                net(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
            sync()
            best["raw"] = min(best["raw"], time.perf_counter() - t)
            t = time.perf_counter()
            for b in batches:
                actor._score_batch(net, b, True)
            sync()
            best["score"] = min(best["score"], time.perf_counter() - t)
    return {"tokens": tokens, "response_tokens": response, "batches": len(batches), "batch_size": e.batch_size,
            "raw_tokens_per_s": tokens / best["raw"], "scoring_tokens_per_s": tokens / best["score"],
            "raw_response_tokens_per_s": response / best["raw"], "scoring_vs_raw": best["raw"] / best["score"],
            "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if gpu else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the same path, no GPU needed")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary directory)")
    args = parser.parse_args(argv)
    gpu = not args.dry_run
    t_start = time.perf_counter()
    device = require_gpu() if gpu else "CPU (dry run)"
    sizes = GPU_SIZES if gpu else DRY_SIZES
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, float, int | None]] = []  # (stage, wall seconds, peak GPU MiB)
    try:
        import torch

        from taskpgm_ray.models import _dtype
        from taskpgm_ray.pipeline import Pipeline

        idle = GpuMemory(gpu).start().stop()  # the baseline: whatever else holds GPU 0
        t = time.perf_counter()
        n_params = build_checkpoint(sizes, work / "model")
        rows.append(("build model", time.perf_counter() - t, None))
        cfg = run_config(sizes, work, work / "model", gpu)
        dtype = str(_dtype(cfg.model, on_gpu=gpu)).removeprefix("torch.")
        print(f"gpu_check: {device}; {n_params / 1e6:.1f}M-parameter Llama ({sizes['num_layers']} x "
              f"{sizes['hidden_size']}) in {dtype}; torch {torch.__version__}; work dir {work}", flush=True)
        for stage in STAGES:  # one at a time, each with its own memory peak (earlier ones are cached)
            mem = GpuMemory(gpu).start()
            t = time.perf_counter()
            Pipeline(cfg).run(until=stage)
            rows.append((stage, time.perf_counter() - t, mem.stop()))
        mem = GpuMemory(gpu).start()
        t = time.perf_counter()
        fwd = forward_vs_scoring(cfg, gpu)
        rows.append(("forward vs scoring", time.perf_counter() - t, mem.stop()))
        progress = json.loads((Path(cfg.output_dir) / "estimate" / "progress.json").read_text())
        summary = json.loads((Path(cfg.output_dir) / "train" / "summary.json").read_text())
        import ray

        ray.shutdown()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return report(rows, fwd, progress, summary, gpu=gpu, idle=idle, sizes=sizes, n_params=n_params, device=device,
                  dtype=dtype, total=time.perf_counter() - t_start, work=work if args.keep else None)


def report(rows, fwd, progress, summary, *, gpu, idle, sizes, n_params, device, dtype, total, work) -> int:
    """Print the table and the ratios; write gpu_check.json when the work dir is kept; fail on an idle GPU."""
    lines = [f"{'stage':<22}{'wall s':>9}{'peak GPU MiB':>15}"]
    for name, secs, peak in rows:
        lines.append(f"{name:<22}{secs:>9.1f}{(f'{peak:,}' if peak is not None else '-'):>15}")
    lines.append(f"{'total':<22}{total:>9.1f}{'':>15}" + (f"   (GPU 0 idle baseline {idle:,} MiB)" if gpu else ""))
    lines.append(f"scoring: {fwd['scoring_tokens_per_s']:,.0f} tokens/s vs raw forward {fwd['raw_tokens_per_s']:,.0f} "
                 f"tokens/s on the same model and {fwd['batches']} batches of {fwd['batch_size']} -> "
                 f"{fwd['scoring_vs_raw']:.2f}x (target >= 0.9)")
    result = {"device": device, "dtype": dtype, "parameters": n_params, "sizes": sizes, "forward": fwd,
              "stages": [{"stage": n, "seconds": s, "peak_gpu_mib": p} for n, s, p in rows], "total_seconds": total}
    if progress:
        e2e = progress["tokens_scored"] / max(progress["scoring_seconds"], 1e-9)
        lines.append(f"estimate stage end to end: {e2e:,.0f} response tokens/s scored "
                     f"({progress['adapter_shard_scorings']} scorings of {progress['shards_total']} shards) = "
                     f"{e2e / fwd['raw_response_tokens_per_s']:.2f}x the raw forward's response tokens/s")
        result["estimate_response_tokens_per_s"] = e2e
    if summary:
        tps = summary["throughput"]["tokens_per_s"]
        lines.append(f"fine-tune: {tps:,.0f} tokens/s (ZeRO-2, {dtype}, 1 worker, micro-batch {sizes['micro_batch']}, "
                     f"{summary['steps']} steps; eval loss {summary['eval_loss_mean']:.3f})")
        result["finetune_tokens_per_s"] = tps
    if fwd["peak_allocated_mib"] is not None:
        lines.append(f"forward/scoring peak allocated by torch in this process: {fwd['peak_allocated_mib']:,.0f} MiB")
    print("\n".join("gpu_check: " + line for line in lines), flush=True)
    if work is not None:
        (work / "gpu_check.json").write_text(json.dumps(result, indent=2))
        print(f"gpu_check: wrote {work / 'gpu_check.json'}")
    if gpu:
        idle_stages = [n for n, _, p in rows if n in GPU_STAGES and (p or 0) - idle < MIN_GPU_MIB]
        if idle_stages:
            fail(f"stage(s) {', '.join(idle_stages)} left the GPU idle (under {MIN_GPU_MIB} MiB above the baseline): "
                 f"they ran on the CPU")
    print("gpu_check: OK" + (" (dry run)" if not gpu else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

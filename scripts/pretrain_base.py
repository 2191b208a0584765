"""Pretrain the small base model that test mode, `taskpgm compare` and the benchmarks start from.

    .venv/bin/python scripts/pretrain_base.py            # writes taskpgm_ray/assets/synthetic-base/

A Llama-style causal LM (byte-level tokenizer, 4 layers, width 128, ~1.1M parameters, ~4.5 MB) trained
from a seed on the generic corpus of ``taskpgm_ray.tasks.corpus``: prose with repeated spans, number
lists and few-shot blocks of auxiliary string transformations, with every fragment of the default suite
spec's templates kept out. Same seed and settings, same corpus and initialisation; the result loads with
``AutoModelForCausalLM.from_pretrained`` and is recorded, with its provenance, in ``pretrain.json``.
About 6 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from taskpgm_ray.models import BUILTIN_MODELS, build_byte_tokenizer, collate
    from taskpgm_ray.tasks.corpus import GenericCorpus, template_fragments
    from taskpgm_ray.tasks.synthetic import load_spec

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(BUILTIN_MODELS["synthetic-base"]))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    tok = build_byte_tokenizer()
    forbidden = template_fragments(t.template for t in load_spec().tasks)
    corpus = GenericCorpus(args.seed, forbidden)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=256, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    digest = hashlib.sha256()  # of every training document, so a re-run can be checked against this one
    t0, losses = time.time(), []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup=100)
        rows = []
        for _ in range(args.batch_size):
            doc = corpus.document()
            digest.update(doc.encode())
            ids = ([tok.bos_token_id] + tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
            ids = ids[: args.seq_len]
            rows.append((ids, ids))
        batch = collate(rows, tok.pad_token_id)  # labels are the ids; padding is ignored
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 250 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.time() - t0:.0f}s", flush=True)

    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    provenance = {
        "script": "scripts/pretrain_base.py", "args": vars(args) | {"out": None},
        "parameters": sum(p.numel() for p in model.parameters()),
        "corpus_sha256": digest.hexdigest(), "forbidden_fragments": forbidden,
        "final_loss_mean_last_100": sum(losses[-100:]) / len(losses[-100:]),
        "seconds": round(time.time() - t0, 1), "torch": torch.__version__,
    }
    (tmp / "pretrain.json").write_text(json.dumps(provenance, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    print(f"wrote {out} ({provenance['parameters']:,} parameters, {provenance['seconds']:.0f}s)")


if __name__ == "__main__":
    main()

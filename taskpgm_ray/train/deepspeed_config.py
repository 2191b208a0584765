"""The DeepSpeed config and the learning-rate schedule, built on the driver from ``TrainConfig``.

The config dict travels to the workers in ``train_loop_config`` (never a module global).
"""

from __future__ import annotations

import math
from typing import Any

from taskpgm_ray.config import TrainConfig


def deepspeed_config(tc: TrainConfig, *, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """ZeRO stage and offload from the config; bf16 on GPU, fp32 on CPU; gradient accumulation.

    The precision is a default: each worker sets it from the dtype its model was built in (:func:`with_precision`).
    Batch arithmetic: ``train_batch_size = micro_batch_size * grad_accum * world_size`` examples per step.
    """
    zero: dict[str, Any] = {"stage": tc.zero_stage}
    if tc.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if tc.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.micro_batch_size * tc.grad_accum * world_size,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(on_gpu)},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if tc.torch_optimizer:
        # A plain torch AdamW (RAY_NOTES: no JIT op compile). DeepSpeed calls it "untested" under ZeRO.
        ds["zero_allow_untested_optimizer"] = True
        if tc.offload == "cpu":
            ds["zero_force_ds_cpu_optimizer"] = False
    else:
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": tc.lr, "weight_decay": tc.weight_decay,
                                                      "torch_adam": tc.offload != "cpu"}}
    return ds


def with_precision(ds: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """``ds`` with the mixed precision of a model built in ``dtype``: bf16, fp16 (dynamic loss scaling) or neither."""
    name = str(dtype).removeprefix("torch.")
    out = {k: v for k, v in ds.items() if k != "fp16"}
    out["bf16"] = {"enabled": name == "bfloat16"}
    if name == "float16":
        out["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}  # loss_scale 0: dynamic
    return out


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay from 1 to ``floor`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

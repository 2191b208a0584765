"""Weights & Biases: offline by default, online only when configured, the API key only from the environment."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from taskpgm_ray.config import TrackingConfig


def wandb_env(cfg: TrackingConfig) -> dict[str, str]:
    """Environment for W&B in this mode; ``online`` without ``WANDB_API_KEY`` is an error, not a prompt."""
    if cfg.wandb == "online" and not os.environ.get("WANDB_API_KEY"):
        raise ValueError("tracking.wandb: 'online' needs WANDB_API_KEY in the environment "
                         "(or use 'offline' and `wandb sync` later)")
    return {"WANDB_MODE": cfg.wandb, "WANDB_SILENT": "true"}


@contextmanager
def wandb_run(cfg: TrackingConfig, run_dir: str | os.PathLike, *, job_type: str, name: str | None = None,
              config: dict[str, Any] | None = None) -> Iterator[Any]:
    """A W&B run writing under ``run_dir/wandb`` (None when disabled). Call on rank 0 / the driver only."""
    if cfg.wandb == "disabled":
        yield None
        return
    os.environ.update(wandb_env(cfg))  # RAY_NOTES: mode= alone still fails the API-key check offline
    import wandb

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=cfg.project, entity=cfg.entity, dir=str(run_dir), job_type=job_type,
                     name=name, group=Path(run_dir).resolve().name, config=config or {}, mode=cfg.wandb,
                     reinit="create_new")
    try:
        yield run
    finally:
        run.finish()

"""Bad input for the fine-tune, caught on the driver before any worker starts: one line naming task or field."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from taskpgm_ray.errors import BadInput

if TYPE_CHECKING:
    from taskpgm_ray.config import Config
    from taskpgm_ray.tasks import TaskData

SUM_TOLERANCE = 1e-6


def read_mixture_weights(path: str | os.PathLike) -> dict[str, float]:
    """The ``weights`` of a ``mixture.json`` (CONTRACT.md), read and format-checked by ``mixture_file``.

    A hand-written file with only ``format`` and ``weights`` is enough; negative weights and sums off 1 are
    refused there (naming the file and task), unknown tasks by ``validate_mixture``.
    """
    from taskpgm_ray.mixture_file import read_mixture

    if not os.path.isfile(path):
        raise BadInput(f"mixture file not found: {path}")
    return dict(read_mixture(str(path))["weights"])


def validate_mixture(weights: Mapping[str, float], tasks: list[TaskData], cfg: Config) -> dict[str, float]:
    """Check a mixture against the loaded tasks and the train config; return the weights in task order.

    Every problem is gathered into one one-line ``ValueError``: unknown or missing tasks, non-numeric,
    negative or non-finite weights, a sum other than 1 (beyond 1e-6), a positive weight on a task without
    training examples, a ZeRO/offload combination DeepSpeed does not run, and a repetition cap too tight
    for the configured steps.
    """
    problems: list[str] = []
    names = [t.name for t in tasks]
    unknown = [k for k in weights if k not in names]
    if unknown:
        problems.append(f"mixture: unknown task(s) {', '.join(map(repr, unknown))} "
                        f"(configured: {', '.join(names)})")
    missing = [n for n in names if n not in weights]
    if missing:
        problems.append(f"mixture: no weight for configured task(s) {', '.join(map(repr, missing))} "
                        "(give 0 to leave a task out)")
    clean: dict[str, float] = {}
    for name in names:
        if name not in weights:
            continue
        w = weights[name]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            problems.append(f"mixture: weight of task {name!r} must be a finite number, got {w!r}")
        elif w < 0:
            problems.append(f"mixture: negative weight {w:g} for task {name!r}")
        else:
            clean[name] = float(w)
    if not unknown and not missing and len(clean) == len(names):
        total = sum(clean.values())
        if abs(total - 1.0) > SUM_TOLERANCE:
            problems.append(f"mixture: weights sum to {total:.9g}, not 1 (tolerance {SUM_TOLERANCE:g})")
    for t in tasks:
        if clean.get(t.name, 0.0) > 0 and not t.train:
            problems.append(f"mixture: task {t.name!r} has weight {clean[t.name]:g} but no training examples")
    problems.extend(_train_config_problems(cfg, tasks, clean))
    if problems:
        raise BadInput(problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems))
    return {n: clean[n] for n in names}


def _train_config_problems(cfg: Config, tasks: list[TaskData], weights: dict[str, float]) -> list[str]:
    tr, problems = cfg.train, []
    if tr.zero_stage not in (0, 1, 2, 3):
        problems.append(f"train.zero_stage: must be 0, 1, 2 or 3, got {tr.zero_stage!r}")
    if tr.offload == "cpu" and tr.zero_stage == 0:
        problems.append("train.offload: DeepSpeed offloads only ZeRO stages 1-3; set train.zero_stage >= 1 "
                        "or train.offload: none")
    if tr.offload not in ("none", "cpu"):
        problems.append(f"train.offload: must be 'none' or 'cpu', got {tr.offload!r}")
    if tr.weight_unit not in ("examples", "tokens"):
        problems.append(f"train.weight_unit: must be 'examples' or 'tokens', got {tr.weight_unit!r}")
    if tr.repetition_cap is not None and weights:
        # Under the cap each task yields at most floor(cap * size) draws (at least 1), then drops out.
        capacity = sum(max(1, math.floor(tr.repetition_cap * len(t.train)))
                       for t in tasks if weights.get(t.name, 0.0) > 0)
        need = tr.steps * tr.grad_accum * tr.micro_batch_size * tr.num_workers
        if capacity < need:
            problems.append(f"train.repetition_cap: {tr.repetition_cap:g} epochs allow {capacity:,} draws from the "
                            f"weighted tasks but train.steps needs {need:,}; raise the cap or lower train.steps")
    return problems

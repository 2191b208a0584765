"""Weights & Biases: one group per pipeline run, offline unless configured, the API key only from the environment.

What a run does with W&B is settled once, on the driver, by :func:`resolve_tracking`:

- the mode is ``tracking.wandb`` when the config sets it, else ``WANDB_MODE``, else ``"offline"``;
- the project is ``tracking.project`` when set, else ``WANDB_PROJECT``, else ``"taskpgm"``;
- the group is ``tracking.group`` when set, else a unique id made on first use and kept in
  ``<output_dir>/wandb_group.txt``, so a resumed or re-run pipeline keeps its group.

Every W&B run of one ``taskpgm run`` (estimate, each Tune trial, the fine-tune, the report) joins that
group; a Tune trial's runs are named by its hyperparameters (``trial-ratio=0.3-pmi-psd``) and carry them
in their config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskpgm_ray.config import TrackingConfig
from taskpgm_ray.errors import BadInput

GROUP_FILE = "wandb_group.txt"  # in the run directory: the W&B group of every run the pipeline makes
DEFAULT_MODE = "offline"
DEFAULT_PROJECT = "taskpgm"
# WANDB_MODE values wandb accepts, and what each means here ("dryrun" and "run" are wandb's old names).
ENV_MODES = {"online": "online", "offline": "offline", "disabled": "disabled", "dryrun": "offline", "run": "online"}


@dataclass
class TrialTracking(TrackingConfig):
    """Tracking for one Tune trial: its W&B runs take ``run_name`` and add ``run_config`` to their config."""

    run_name: str | None = None
    run_config: dict[str, Any] = field(default_factory=dict)


def resolve_tracking(cfg: TrackingConfig, run_dir: str | os.PathLike) -> TrackingConfig:
    """``cfg`` with mode, project and group filled in (from the environment and ``run_dir``); idempotent."""
    mode = cfg.wandb or _env_mode()
    project = cfg.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
    group = cfg.group or (run_group(run_dir) if mode != "disabled" else None)
    return dataclasses.replace(cfg, wandb=mode, project=project, group=group)


def _env_mode() -> str:
    value = os.environ.get("WANDB_MODE", "").strip().lower()
    if not value:
        return DEFAULT_MODE
    if value not in ENV_MODES:
        raise BadInput(f"WANDB_MODE={value!r} in the environment: expected online, offline or disabled "
                       f"(or set tracking.wandb in the config)")
    return ENV_MODES[value]


def run_group(run_dir: str | os.PathLike) -> str:
    """The W&B group of the pipeline run in ``run_dir``: read from ``wandb_group.txt``, made there on first use.

    The id is the run directory's name plus 8 random hex digits. Concurrent callers (Tune trials on
    several nodes of a shared file system) agree: the file appears whole, by a hard link, or not at all.
    """
    run_dir = Path(run_dir)
    path = run_dir / GROUP_FILE
    if not path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^\w.-]+", "-", run_dir.resolve().name).strip("-")[:100] or "taskpgm"
        tmp = path.with_name(f".{GROUP_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        tmp.write_text(f"{name}-{secrets.token_hex(4)}\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            tmp.unlink()
    group = path.read_text().strip()
    if not group:
        raise BadInput(f"{path} is empty: delete it (a new W&B group is made) or write the group to use in it")
    return group


def trial_name(params: dict[str, Any]) -> str:
    """A Tune trial's W&B name from its hyperparameters, e.g. ``trial-ratio=0.3-pmi-psd`` or ``trial-uniform``."""
    kind = params.get("kind", "taskpgm")
    if kind != "taskpgm":
        temperature = params.get("temperature")
        return f"trial-{kind}" + (f"={temperature:g}" if temperature is not None else "")
    parts = [f"ratio={float(params['ratio']):.3g}", str(params.get("affinity")), str(params.get("kernel"))]
    if params.get("kernel") == "exp" and params.get("tau") is not None:
        parts.append(f"tau={float(params['tau']):g}")
    if params.get("budget") is not None:
        parts.append(f"k={params['budget']}")
    return "trial-" + "-".join(parts)


def trial_tracking(cfg: TrackingConfig, run_dir: str | os.PathLike, params: dict[str, Any],
                   hyperparameters: dict[str, Any]) -> TrialTracking:
    """Tracking for one Tune trial of the pipeline in ``run_dir``: the pipeline's group, the trial's name and values.

    ``params`` is the Tune config of the trial, ``hyperparameters`` what it resolves to (beta, lam, ...).
    """
    resolved = resolve_tracking(cfg, run_dir)
    values = {k: v for k, v in {**params, **hyperparameters}.items() if v is not None}
    return TrialTracking(**{f.name: getattr(resolved, f.name) for f in dataclasses.fields(TrackingConfig)},
                         run_name=trial_name(params), run_config={"trial": values})


def wandb_env(cfg: TrackingConfig) -> dict[str, str]:
    """Environment for W&B in this mode; ``online`` without ``WANDB_API_KEY`` is an error, not a prompt."""
    mode = cfg.wandb or _env_mode()
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        raise BadInput("tracking.wandb: 'online' needs WANDB_API_KEY in the environment "
                       "(or use 'offline' and `wandb sync` later)")
    return {"WANDB_MODE": mode, "WANDB_SILENT": "true"}


@contextmanager
def wandb_run(cfg: TrackingConfig, run_dir: str | os.PathLike, *, job_type: str, name: str | None = None,
              config: dict[str, Any] | None = None) -> Iterator[Any]:
    """A W&B run writing under ``run_dir/wandb`` (None when disabled). Call on rank 0 / the driver only.

    A :class:`TrialTracking` names the run after its trial and adds the trial's hyperparameters to ``config``.
    """
    cfg = resolve_tracking(cfg, run_dir)
    if cfg.wandb == "disabled":
        yield None
        return
    os.environ.update(wandb_env(cfg))  # RAY_NOTES: mode= alone still fails the API-key check offline
    import wandb

    if isinstance(cfg, TrialTracking):
        name = cfg.run_name or name
        config = {**(config or {}), **cfg.run_config}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=cfg.project, entity=cfg.entity, dir=str(run_dir), job_type=job_type, name=name,
                     group=cfg.group, config=config or {}, mode=cfg.wandb, reinit="create_new")
    try:
        yield run
    finally:
        run.finish()


def log_mixture(run: Any, path: str | os.PathLike) -> None:
    """Log ``mixture.json`` as the W&B artifact ``mixture-<group>`` (type ``mixture``), its settings as metadata.

    Offline, wandb keeps a staged copy on this machine until ``wandb sync`` uploads it.
    """
    import wandb

    mixture = json.loads(Path(path).read_text())
    name = re.sub(r"[^\w.-]+", "-", f"mixture-{run.group or run.id}")  # artifact names: letters, digits, - _ .
    metadata = {k: mixture.get(k) for k in ("format", "method", "affinity", "weight_unit", "hyperparameters",
                                            "energy", "inputs_hash", "created") if k in mixture}
    artifact = wandb.Artifact(name, type="mixture", metadata=metadata)
    artifact.add_file(str(path), name="mixture.json")
    run.log_artifact(artifact)

"""Connecting to Ray: one code path for a local single-node cluster (tests, test mode) and a real cluster.

Ray touch-points:
  ``ray.init``                           join ``RAY_ADDRESS`` (a submitted job) or start a local cluster on 127.0.0.1
  ``worker_process_setup_hook``          ``pin_cluster_address`` on every worker (``ray.get_runtime_context``)
  ``ray.cluster_resources``              what the stages may ask for (``require_resources``)
"""

from __future__ import annotations

import os

from taskpgm_ray.errors import BadInput

# Environment that must reach every worker (RAY_NOTES: WANDB_MODE must be set on the workers too).
PROPAGATED_ENV = (
    "WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DIR",
    "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "TOKENIZERS_PARALLELISM",
    "HF_HUB_DISABLE_PROGRESS_BARS",  # set for log files (console.LOG_ENV): no tqdm redraws in the stage logs
)


# Ray Train settings for a local single-node cluster only (a real cluster keeps Ray's defaults): no node there can
# be drained, so no preemption watcher (an actor process per fit, started and torn down with every Tune trial), and
# the controller polls its workers every 0.5 s instead of 2 s (a short fit's end is seen ~1 s sooner on average).
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def worker_env() -> dict[str, str]:
    """The subset of this process's environment that Ray workers inherit through the runtime env."""
    env = {k: os.environ[k] for k in PROPAGATED_ENV if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray Train V2 patches print() on its workers to also log each line, which prints rank 0's lines twice
    # (once more when W&B wraps stdout); Ray Train's own switch turns the patch off.
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0"))
    return env


def init_ray(*, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (a submitted job), or start a local one.

    A local cluster binds its dashboard to 127.0.0.1 and keeps Ray's default token authentication.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:  # a submitted job: its runtime env (launch/submit.sh) already carries the environment
        ray.init(address=address, log_to_driver=True)
    else:
        # RAY_NOTES: keeps a single-node cluster on 127.0.0.1 instead of the machine's interface address.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        for key, value in LOCAL_TRAIN_ENV.items():  # the driver starts controllers too (the final fine-tune)
            os.environ.setdefault(key, value)
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, dashboard_host="127.0.0.1", log_to_driver=True,
                 runtime_env={"env_vars": {**{k: os.environ[k] for k in LOCAL_TRAIN_ENV}, **worker_env()},
                              "worker_process_setup_hook": "taskpgm_ray.distributed.cluster.pin_cluster_address"})


def pin_cluster_address() -> None:
    """Worker setup hook: point in-cluster State API calls at this cluster.

    Without it, Ray Train 2.60's placement-group cleaner looks the cluster up by scanning the machine, fails
    when a second Ray instance runs there ("Found multiple active Ray instances"), and leaks each run's
    placement group: later Tune trials and the final fine-tune then wait forever for CPUs.
    """
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def cluster_resources() -> dict[str, float]:
    """Total CPUs and GPUs of the cluster (``ray.cluster_resources`` with defaults)."""
    import ray

    res = ray.cluster_resources()
    return {"CPU": float(res.get("CPU", 0.0)), "GPU": float(res.get("GPU", 0.0))}


def require_resources(what: str, *, cpus: float, gpus: float) -> None:
    """Raise a clear ``ValueError`` when ``what`` asks for more than the whole cluster has (Ray would hang)."""
    have = cluster_resources()
    if gpus > have["GPU"] + 1e-9:
        raise BadInput(f"{what} needs {gpus:g} GPU(s) but the Ray cluster has {have['GPU']:g}; "
                       f"lower the GPU settings or add GPU nodes")
    if cpus > have["CPU"] + 1e-9:
        raise BadInput(f"{what} needs {cpus:g} CPU(s) but the Ray cluster has {have['CPU']:g}; "
                       f"lower the worker/actor counts or add nodes")

"""Stage 6 on the driver: validate, build the ``TorchTrainer``, fit, save the final model and ``summary.json``.

``build_trainer`` is the one piece Tune reuses unchanged: a Tune trial builds a trainer with
``callbacks=[TuneReportCallback()]`` and calls ``.fit()``.

Ray touch-points:
  ``ray.put``                            the tasks' examples, once (``put_task_data``); workers get a reference
  ``TorchTrainer``                       ``ScalingConfig`` (workers, GPUs, CPUs each), ``RunConfig`` (fixed name and
                                         storage path: a re-run resumes; ``FailureConfig``, ``CheckpointConfig``)
  ``trainer.fit()``                      ``Result.return_value`` (rank 0's summary), ``Result.checkpoint`` (the model)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taskpgm_ray.config import Config
from taskpgm_ray.console import StageProgress
from taskpgm_ray.errors import BadInput
from taskpgm_ray.train.validation import read_mixture_weights, validate_mixture

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.train.torch import TorchTrainer

    from taskpgm_ray.tasks import TaskData
    from taskpgm_ray.train.recipe import MixtureFinetune

PROGRESS_FILE = "progress.json"  # under <run_dir>/train: rank 0's step, loss, eval loss, tokens/s (the live line)


def build_trainer(cfg: Config, tasks: list[TaskData], weights: Mapping[str, float], *, run_dir: str | os.PathLike,
                  name: str = "train", steps: int | None = None, num_workers: int | None = None,
                  callbacks: Sequence[Any] = (), eval_split: str = "eval", final_test: bool = False,
                  task_data: ObjectRef | None = None, recipe: type[MixtureFinetune] | None = None,
                  evaluation: Sequence[TaskData] = ()) -> TorchTrainer:
    """A Ray Train ``TorchTrainer`` that fine-tunes ``cfg.model`` on the mixture ``weights``.

    Args:
        cfg: the run config (``cfg.train``, ``cfg.model``, ``cfg.tracking``).
        tasks: the loaded tasks; every task needs a weight (0 leaves it out).
        weights: task name -> weight (>= 0, summing to 1), in ``cfg.train.weight_unit``.
        run_dir: where ``train/`` goes: Ray's storage (``train/ray/<name>``), audit logs; W&B under ``wandb/``.
        name: Ray run name; with the fixed storage path, re-running the same name resumes from its last checkpoint.
        steps, num_workers: override ``cfg.train.steps`` / ``cfg.train.num_workers`` (Tune's short trials).
        callbacks: Ray Train callbacks, e.g. ``[ray.tune.integration.ray_train.TuneReportCallback()]``.
        eval_split: ``"eval"``, ``"probe"`` or ``"test"`` (the held-out split evaluated and reported; ``test`` is
            for `taskpgm compare`, which no selection sees).
        final_test: after the last step, also score the final model on each task's test split (the summary's
            ``test_*`` fields): the run's figure that no selection saw. Off for Tune's trials, which select.
        task_data: ``put_task_data([*tasks, *evaluation], eval_split, test=final_test)`` already in the object
            store (Tune puts it once for all its trials); by default this call puts it.
        evaluation: evaluation sets (``tasks.load_evaluation``): evaluated beside the tasks with weight 0, and
            when there are any, the scored metric (``eval_loss_scored``, what Tune ranks by) is their mean alone.
        recipe: the per-worker recipe class, ``MixtureFinetune`` by default; a test passes a subclass that fails
            once mid-run (recovery through FailureConfig), a benchmark one with another sampler.

    Raises:
        ValueError: a bad mixture or train config (one line, naming the task or field), before any worker starts.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from taskpgm_ray.distributed.cluster import worker_env
    from taskpgm_ray.models import ensure_run_tokenizer
    from taskpgm_ray.tracking import resolve_tracking
    from taskpgm_ray.train.deepspeed_config import deepspeed_config
    from taskpgm_ray.train.recipe import train_loop_per_worker

    if eval_split not in ("eval", "probe", "test"):
        raise ValueError(f"eval_split: must be 'eval', 'probe' or 'test', got {eval_split!r}")
    tc = dataclasses.replace(cfg.train, steps=steps or cfg.train.steps,
                             num_workers=num_workers or cfg.train.num_workers)
    cfg = dataclasses.replace(cfg, train=tc)
    ordered = validate_mixture(weights, tasks, cfg)
    run_dir = Path(run_dir).resolve()
    evaluated = [*tasks, *evaluation]
    if task_data is None:
        task_data = put_task_data(evaluated, eval_split, test=final_test)
    loop_config = {
        "name": name,
        "train": tc,
        "model": cfg.model,
        "tracking": resolve_tracking(cfg.tracking, run_dir),  # W&B mode, project, group settled on the driver
        "ds_config": deepspeed_config(tc, world_size=tc.num_workers, on_gpu=tc.use_gpu),
        "tokenizer_path": str(ensure_run_tokenizer(cfg.model, cfg.output_dir).resolve()),
        "task_names": [t.name for t in evaluated],
        "task_data": task_data,  # a reference: the examples stay in the object store, out of this config
        "weights": [ordered[t.name] for t in tasks] + [0.0] * len(evaluation),
        "scored": scored_flags(tasks, evaluation),
        "eval_split": eval_split,
        "final_test": final_test,
        "run_dir": str(run_dir),
        "recipe": recipe,  # None: MixtureFinetune
        "progress_path": str(run_dir / "train" / PROGRESS_FILE),
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(
            name=name,
            storage_path=str(run_dir / "train" / "ray"),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
            worker_runtime_env={"env_vars": worker_env()},
        ),
    )


def scored_flags(tasks: Sequence[TaskData], evaluation: Sequence[TaskData] = ()) -> list[bool]:
    """Which of ``[*tasks, *evaluation]`` the scored metric counts: the evaluation sets when there are any (each
    once), else the tasks with ``score`` true."""
    if evaluation:
        return [False] * len(tasks) + [True] * len(evaluation)
    return [getattr(t, "score", True) for t in tasks]


def scored_names(tasks: Sequence[TaskData], evaluation: Sequence[TaskData] = ()) -> list[str]:
    """The names the scored metric averages over (``scored_flags``; every task when none is scored)."""
    flags = scored_flags(tasks, evaluation)
    return [t.name for t, f in zip([*tasks, *evaluation], flags) if f] or [t.name for t in tasks]


def put_task_data(tasks: list[TaskData], eval_split: str = "eval", *, test: bool = False) -> ObjectRef:
    """Every task's training examples and ``eval_split`` examples (and test examples if ``test``), ``(id, prompt,
    response)`` each, put once in Ray's object store.

    Train workers fetch them by reference (``ray.get`` in ``MixtureFinetune._setup_data``), so the text is stored
    once per node instead of pickled into ``train_loop_config`` for every worker, every restart and every Tune
    trial. The same call serves a local test cluster and a multi-node one: no shared file system needed.
    """
    import ray

    def rows(examples: list) -> list[tuple[str, str, str]]:
        return [(ex.id, ex.prompt, ex.response) for ex in examples]

    return ray.put([{"name": t.name, "train": rows(t.train), "eval": rows(getattr(t, eval_split)),
                     **({"test": rows(t.test)} if test else {})} for t in tasks])


def run_training(cfg: Config, tasks: list[TaskData], weights: Mapping[str, float], *,
                 run_dir: str | os.PathLike | None = None, progress: StageProgress | None = None,
                 **trainer_kwargs: Any) -> dict[str, Any]:
    """Validate, start Ray, fit, then write ``train/checkpoint/`` (model + tokenizer) and ``train/summary.json``.

    ``progress`` is the stage's live line (step, loss, eval loss, tokens/s); ``trainer_kwargs`` go to
    :func:`build_trainer`. Returns the summary.
    """
    from taskpgm_ray.distributed.cluster import init_ray, require_resources
    from taskpgm_ray.io import atomic_write_json
    from taskpgm_ray.train.recipe import HF_MODEL_DIR

    run_dir = Path(run_dir or cfg.output_dir).resolve()
    tc = dataclasses.replace(cfg.train, steps=trainer_kwargs.get("steps") or cfg.train.steps,
                             num_workers=trainer_kwargs.get("num_workers") or cfg.train.num_workers)
    validate_mixture(weights, tasks, dataclasses.replace(cfg, train=tc))  # before any worker starts
    init_ray()
    require_resources("train", cpus=tc.num_workers * tc.cpus_per_worker, gpus=tc.num_workers if tc.use_gpu else 0)
    trainer = build_trainer(cfg, tasks, weights, run_dir=run_dir, **trainer_kwargs)
    with _show_progress(run_dir / "train" / PROGRESS_FILE, progress or StageProgress()):
        result = trainer.fit()
    summary = result.return_value
    if summary is None or result.checkpoint is None:
        raise RuntimeError(f"training in {run_dir / 'train' / 'ray'} finished without a summary or checkpoint")
    with result.checkpoint.as_directory() as d:
        _install_final_model(Path(d) / HF_MODEL_DIR, run_dir / "train" / "checkpoint", cfg)
    summary["checkpoint"] = "checkpoint"
    atomic_write_json(run_dir / "train" / "summary.json", summary)
    return summary


@contextlib.contextmanager
def _show_progress(path: Path, progress: StageProgress, every_s: float = 0.5) -> Iterator[None]:
    """While the trainer runs, show rank 0's ``progress.json`` (see ``recipe._write_progress``) on ``progress``."""
    path.unlink(missing_ok=True)  # an older run's
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(every_s):
            try:
                p = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            eval_loss = f", eval loss {p['eval_loss']:.4f}" if p.get("eval_loss") is not None else ""
            progress.update(p["step"], total=p["steps"],
                            info=f"loss {p['loss']:.4f}{eval_loss}, {p['tokens_per_s']:,.0f} tokens/s")

    thread = threading.Thread(target=poll, name="train-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def train_command(cfg: Config, mixture_path: str | os.PathLike, *, tasks: list[TaskData] | None = None,
                  evaluation: list[TaskData] | None = None, progress: StageProgress | None = None) -> dict[str, Any]:
    """``taskpgm train CONFIG --mixture M.json``: load tasks (unless given), check the mixture, train; the summary.

    The final model is also scored on each task's test split (``test_loss_scored`` and the other ``test_*``
    fields): Tune selected on the validation split, so the test figure is the one no selection saw.

    ``progress`` is the stage's live line (step, loss, eval loss, tokens/s).
    """
    from taskpgm_ray.models import ensure_run_tokenizer
    from taskpgm_ray.tasks import load_evaluation, load_tasks

    weights = read_mixture_weights(mixture_path)
    tasks = load_tasks(cfg) if tasks is None else tasks
    try:
        validate_mixture(weights, tasks, cfg)
    except BadInput as e:  # the file the user gave is the culprit: name it
        raise BadInput(f"{mixture_path}: {e}") from None
    evaluation = load_evaluation(cfg) if evaluation is None else evaluation
    ensure_run_tokenizer(cfg.model, cfg.output_dir)
    return run_training(cfg, tasks, weights, run_dir=cfg.output_dir, progress=progress, final_test=True,
                        evaluation=evaluation)


def _install_final_model(source: Path, target: Path, cfg: Config) -> None:
    """Copy the saved model and the run tokenizer to ``target`` atomically (a temp dir, then renames)."""
    from taskpgm_ray.models import ensure_run_tokenizer, load_tokenizer

    if not source.is_dir():
        raise RuntimeError(f"the final checkpoint has no {source.name}/ directory")
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    load_tokenizer(ensure_run_tokenizer(cfg.model, cfg.output_dir)).save_pretrained(str(tmp))
    old = target.with_name(f".{target.name}.old{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)

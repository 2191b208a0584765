"""Stage 6: bad input (fast, no Ray), then real Ray Train + DeepSpeed on CPU with 2 workers and the tiny model.

The Ray runs share one local cluster. Every interrupted run must train on exactly the uninterrupted sample stream
(computed straight from the sampler), step by step and rank by rank, as its audit logs show:

* ZeRO-2, 8 steps, killed by a failure after step 6 (no retries), then re-run in the same run directory: it resumes
  from the step-4 checkpoint, and its final model weights and optimizer state equal those of an uninterrupted
  8-step ZeRO-2 run;
* ZeRO-3 with a worker failure after step 6, recovered from the step-4 checkpoint through FailureConfig.

Failures are injected by a recipe subclass defined here (``_failing_once``): the product loop has no test hook.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from taskpgm_ray.config import load_config
from taskpgm_ray.tasks import Example, TaskData
from taskpgm_ray.train import read_mixture_weights, validate_mixture
from taskpgm_ray.train.deepspeed_config import deepspeed_config, lr_multiplier

# --------------------------------------------------------------------------------------------------
# bad input: one-line ValueErrors naming the task or field, before any worker starts


def _task(name: str, n_train: int) -> TaskData:
    ex = [Example(f"{name}/train/{i}", f"q{i}", f"a{i}") for i in range(n_train)]
    return TaskData(name=name, source="test", train=ex, probe=[], eval=[Example(f"{name}/eval/0", "q", "a")])


@pytest.fixture
def small(tmp_path):
    cfg = load_config(test_mode=True, overrides={"output_dir": str(tmp_path), "train.repetition_cap": None})
    return cfg, [_task("a", 10), _task("b", 5), _task("c", 3)]


@pytest.mark.parametrize("weights, message", [
    ({"a": 0.5, "b": 0.3, "c": 0.1, "zz": 0.1}, r"unknown task\(s\) 'zz'"),
    ({"a": 0.5, "b": 0.5}, r"no weight for configured task\(s\) 'c'"),
    ({"a": 0.6, "b": 0.5, "c": -0.1}, r"negative weight -0.1 for task 'c'"),
    ({"a": 0.5, "b": 0.3, "c": 0.1}, r"weights sum to 0.9, not 1"),
    ({"a": 0.5, "b": "x", "c": 0.5}, r"weight of task 'b' must be a finite number"),
])
def test_bad_mixtures_name_the_task(small, weights, message):
    cfg, tasks = small
    with pytest.raises(ValueError, match=message) as info:
        validate_mixture(weights, tasks, cfg)
    assert "\n" not in str(info.value)


def test_positive_weight_on_a_task_without_training_examples(small):
    cfg, tasks = small
    tasks[2] = _task("c", 0)
    with pytest.raises(ValueError, match=r"task 'c' has weight 0.2 but no training examples"):
        validate_mixture({"a": 0.5, "b": 0.3, "c": 0.2}, tasks, cfg)
    assert validate_mixture({"a": 0.5, "b": 0.5, "c": 0.0}, tasks, cfg) == {"a": 0.5, "b": 0.5, "c": 0.0}


def test_bad_train_settings_name_the_field(small):
    cfg, tasks = small
    ok = {"a": 0.5, "b": 0.3, "c": 0.2}
    bad = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, zero_stage=0, offload="cpu"))
    with pytest.raises(ValueError, match=r"train.offload: DeepSpeed offloads only ZeRO stages 1-3"):
        validate_mixture(ok, tasks, bad)
    capped = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, repetition_cap=1.0, steps=10))
    with pytest.raises(ValueError, match=r"train.repetition_cap: 1 epochs allow 18 draws .* needs 160"):
        validate_mixture(ok, tasks, capped)


def test_mixture_file_and_train_command_fail_before_ray(tmp_path, small):
    cfg, _ = small
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({"weights": {"a": 1.0}}))
    with pytest.raises(ValueError, match="m.json"):
        read_mixture_weights(bad)
    with pytest.raises(ValueError, match="mixture file not found"):
        read_mixture_weights(tmp_path / "nope.json")
    from taskpgm_ray.mixture_file import write_mixture

    good = tmp_path / "good.json"
    write_mixture(str(good), weights={"a": 0.25, "b": 0.75}, method="uniform", affinity=None, hyperparameters={},
                  energy=None, kkt_residual=None, sizes={"a": 10, "b": 5}, inputs_hash="x")
    assert read_mixture_weights(good) == {"a": 0.25, "b": 0.75}

    from taskpgm_ray.train import train_command

    with pytest.raises(ValueError, match=r"unknown task\(s\) 'a', 'b'"):  # the test config has the synthetic suite
        train_command(cfg, good)


def test_deepspeed_config_and_schedule(small):
    cfg, _ = small
    tc = dataclasses.replace(cfg.train, zero_stage=3, offload="cpu", grad_accum=2)
    ds = deepspeed_config(tc, world_size=2, on_gpu=False)
    assert ds["train_batch_size"] == tc.micro_batch_size * 2 * 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and not ds["bf16"]["enabled"]
    assert ds["zero_force_ds_cpu_optimizer"] is False and "optimizer" not in ds
    assert deepspeed_config(tc, world_size=1, on_gpu=True)["bf16"]["enabled"]
    mults = [lr_multiplier(s, warmup_steps=4, total_steps=20) for s in range(21)]
    assert mults[:4] == [0.25, 0.5, 0.75, 1.0] and mults[4] == 1.0
    assert all(a >= b for a, b in zip(mults[4:], mults[5:])) and mults[20] == pytest.approx(0.1)


# --------------------------------------------------------------------------------------------------
# real Ray Train + DeepSpeed, 2 CPU workers

STEPS = 8
WEIGHTS = {"reverse_a": 0.3, "reverse_b": 0.05, "copy": 0.35, "noise_a": 0.1, "sort": 0.1, "add": 0.1}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The test-mode config (8 steps, evaluate and checkpoint every 4, audit on) and its loaded tasks."""
    from taskpgm_ray.tasks import load_tasks

    root = tmp_path_factory.mktemp("train")
    cfg = load_config(test_mode=True, overrides={
        "output_dir": str(root / "shared"), "model.name": "tiny", "train.steps": STEPS, "train.eval_every": 4,
        "train.checkpoint_every": 4, "train.warmup_steps": 2, "train.audit_samples": True,
        "tracking.wandb": "disabled"})
    return cfg, load_tasks(cfg), root


def _failing_once(after_step: int, marker: Path) -> type:
    """The recipe, except that the last rank raises once after optimizer step ``after_step`` (before that step's
    evaluation and checkpoint). ``marker`` remembers across worker restarts that it has fired.

    A class built inside a function is pickled by value, so Ray's workers need not import this test module.
    """
    from taskpgm_ray.train.recipe import MixtureFinetune

    class FailingOnce(MixtureFinetune):
        def _train_step(self) -> float:
            loss = super()._train_step()
            if self.step + 1 == after_step and self.rank == self.world_size - 1 and not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"failed after step {after_step}\n")
                raise RuntimeError(f"injected failure after step {after_step} on rank {self.rank}")
            return loss

    return FailingOnce


def _run(base, name: str, **kw) -> tuple[dict, Path]:
    from taskpgm_ray.train import run_training

    cfg, tasks, root = base
    run_dir = root / name
    overrides = kw.pop("train", {})
    tracking = kw.pop("tracking", cfg.tracking)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **overrides), tracking=tracking)
    return run_training(cfg, tasks, WEIGHTS, run_dir=run_dir, **kw), run_dir


def _audit(run_dir: Path) -> dict[int, list[str]]:
    """Sample ids each rank trained on, in order, from its audit log."""
    out = {}
    for r in (0, 1):
        rows = [json.loads(line) for line in (run_dir / "train" / f"samples-rank{r}.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == list(range(1, STEPS + 1))  # one line per step: no repeats, no gaps
        out[r] = [i for row in rows for i in row["ids"]]
    return out


@pytest.fixture(scope="module")
def expected(base):
    """The uninterrupted stream, straight from the sampler: ids per rank (draw g on rank g % 2) and counts."""
    from taskpgm_ray.models import encode_example, ensure_run_tokenizer, load_tokenizer
    from taskpgm_ray.train.sampler import MixtureSampler

    cfg, tasks, _ = base
    names = [t.name for t in tasks]
    sampler = MixtureSampler(names, [len(t.train) for t in tasks], [WEIGHTS[x] for x in names], seed=cfg.train.seed)
    t_ids, e_ids = sampler.draw(STEPS * cfg.train.micro_batch_size * 2)
    drawn = [tasks[t].train[e] for t, e in zip(t_ids, e_ids)]
    tok = load_tokenizer(ensure_run_tokenizer(cfg.model, cfg.output_dir))
    tokens = dict.fromkeys(names, 0)
    for ex in drawn:
        tokens[ex.id.split("/")[0]] += len(encode_example(tok, ex.prompt, ex.response, cfg.model.max_length)[0])
    ids = [ex.id for ex in drawn]
    return {"ids": {0: ids[0::2], 1: ids[1::2]}, "samples_per_task": sampler.samples_per_task(),
            "tokens_per_task": tokens}


@pytest.mark.ray
def test_the_examples_travel_by_reference_not_inside_the_train_loop_config(ray_cluster, base):
    import pickle

    import ray
    import ray.cloudpickle

    from taskpgm_ray.train import build_trainer

    cfg, tasks, root = base
    loop_config = build_trainer(cfg, tasks, WEIGHTS, run_dir=root / "by-reference").train_loop_config
    sent = ray.cloudpickle.dumps(loop_config)  # what every worker and every restart receives
    text = pickle.dumps([(ex.id, ex.prompt, ex.response) for t in tasks for ex in (*t.train, *t.eval)])
    assert len(sent) < 20_000 < len(text), (len(sent), len(text))
    assert not any(ex.prompt.encode() in sent for t in tasks for ex in t.train[:5])
    data = ray.get(loop_config["task_data"])  # the examples, once, in the object store
    assert [d["name"] for d in data] == loop_config["task_names"] == [t.name for t in tasks]
    assert all(d["train"] == [(ex.id, ex.prompt, ex.response) for ex in t.train] and
               d["eval"] == [(ex.id, ex.prompt, ex.response) for ex in t.eval] for d, t in zip(data, tasks))


def _decreases(curve: list[float]) -> bool:
    return len(curve) == STEPS and np.mean(curve[-2:]) < np.mean(curve[:2]) - 0.3


@pytest.fixture(scope="module")
def zero2(ray_cluster, base):
    """ZeRO-2, 8 steps: killed after step 6 with no retries, then re-run unchanged in the same run dir (a resume
    from its step-4 checkpoint); and the same run uninterrupted in another directory."""
    from ray.train import TrainingFailedError

    from taskpgm_ray.config import TrackingConfig

    run_dir = base[2] / "zero2"
    marker = run_dir / "train" / "failed-once"
    with pytest.raises(TrainingFailedError):
        _run(base, "zero2", train={"zero_stage": 2, "max_failures": 0}, recipe=_failing_once(6, marker))
    assert marker.exists() and _checkpoint_steps(run_dir) == [4]  # it died between the two checkpoints
    resumed, _ = _run(base, "zero2", train={"zero_stage": 2}, tracking=TrackingConfig(wandb="offline"),
                      final_test=True)
    straight, straight_dir = _run(base, "zero2-uninterrupted", train={"zero_stage": 2})
    return resumed, run_dir, straight, straight_dir


def _checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the Ray checkpoints kept under ``run_dir``, ascending."""
    from taskpgm_ray.train.recipe import STATE_FILE

    files = (run_dir / "train" / "ray").glob(f"*/checkpoint_*/{STATE_FILE}")
    return sorted(json.loads(f.read_text())["step"] for f in files)


def _final_deepspeed_state(run_dir: Path) -> dict[str, object]:
    """The final checkpoint's DeepSpeed files, loaded: the module's weights (``mp_rank_00_model_states.pt``,
    with the LR scheduler and step counters) and every rank's optimizer partition (fp32 master weights, Adam's
    moments and step)."""
    import torch

    from taskpgm_ray.train.recipe import DS_TAG, STATE_FILE

    final = [f.parent for f in (run_dir / "train" / "ray").glob(f"*/checkpoint_*/{STATE_FILE}")
             if json.loads(f.read_text())["step"] == STEPS]
    assert len(final) == 1, final
    files = sorted((final[0] / DS_TAG).glob("*.pt"))
    assert {f.name for f in files} >= {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                       "zero_pp_rank_1_mp_rank_00_optim_states.pt"}, files
    return {f.name: torch.load(f, map_location="cpu", weights_only=False) for f in files}


def _differences(a: object, b: object, where: str = "") -> list[str]:
    """Where two loaded checkpoints differ: tensors bit for bit, numbers, strings and objects' fields exactly."""
    import torch

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return [f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"]
        return [] if torch.equal(a, b) else [f"{where}: max |diff| {(a.double() - b.double()).abs().max():.3g}"]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(map(str, set(a) ^ set(b)))} in one only"]
        return [d for k in a for d in _differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    if type(a) is type(b) and hasattr(a, "__dict__") and not isinstance(a, type):  # e.g. DeepSpeed's loss scaler
        return _differences(vars(a), vars(b), f"{where}.{type(a).__name__}")
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


@pytest.mark.ray
def test_zero2_resumed_run_learns_and_sees_the_exact_sample_stream(base, zero2, expected):
    summary, run_dir, _, _ = zero2
    assert summary["steps"] == STEPS
    assert _decreases(summary["loss_curve"]), summary["loss_curve"]
    assert _audit(run_dir) == expected["ids"]  # resumed at step 4: no repeats, no gaps, ranks disjoint
    assert summary["samples_per_task"] == expected["samples_per_task"]
    assert summary["tokens_per_task"] == expected["tokens_per_task"]
    on_disk = json.loads((run_dir / "train" / "summary.json").read_text())
    for key in ("samples_per_task", "tokens_per_task", "eval_loss_per_task", "eval_accuracy_per_task",
                "eval_loss_mean", "throughput"):
        assert key in on_disk, key
    assert on_disk["throughput"]["tokens_per_s"] > 0 and on_disk["throughput"]["examples_per_s"] > 0
    assert summary["eval_loss_mean"] == pytest.approx(np.mean(list(summary["eval_loss_per_task"].values())))
    # per-task counts follow the mixture (128 draws)
    n = sum(summary["samples_per_task"].values())
    for name, w in WEIGHTS.items():
        assert abs(summary["samples_per_task"][name] - w * n) <= 4 * np.sqrt(w * n) + 1, name
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline W&B run"
    # the selection metric over the scored tasks, and the final model on the test split (which nothing selects on)
    cfg, tasks, _ = base
    scored = [t.name for t in tasks if t.score]
    assert len(scored) < len(tasks)  # noise_a is not scored in the test config
    for split in ("eval", "test"):
        per_task = summary[f"{split}_loss_per_task"]
        assert set(per_task) == {t.name for t in tasks}, split
        assert summary[f"{split}_loss_scored"] == pytest.approx(np.mean([per_task[n] for n in scored])), split
    assert summary["test_loss_per_task"] != summary["eval_loss_per_task"]


@pytest.mark.ray
def test_zero2_resume_ends_with_the_uninterrupted_runs_model_and_optimizer_state(zero2, expected):
    """Bit for bit, no tolerance: on CPU every kernel is deterministic and the 2-rank gloo all-reduce adds in a fixed
    order, so a resume that restores weights, Adam's moments, the LR schedule, the RNGs and the sample stream
    reproduces the same arithmetic; any difference is a resume bug (e.g. a lost moment, an LR step off by one)."""
    resumed, run_dir, straight, straight_dir = zero2
    assert _audit(straight_dir) == expected["ids"]
    a, b = _final_deepspeed_state(run_dir), _final_deepspeed_state(straight_dir)
    model = a["mp_rank_00_model_states.pt"]
    assert model["module"] and model["lr_scheduler"]["last_epoch"] == STEPS  # the weights and schedule are in it
    optim = a["zero_pp_rank_0_mp_rank_00_optim_states.pt"]["optimizer_state_dict"]
    assert optim["base_optimizer_state"], "no Adam moments in the checkpoint"
    assert _differences(a, b) == []
    assert resumed["loss_curve"] == straight["loss_curve"] and resumed["history"] == straight["history"]


def _assert_reloaded_model_scores_as_reported(base, summary: dict, run_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from taskpgm_ray.models import encode_example
    from taskpgm_ray.train.recipe import evaluate_model

    cfg, tasks, _ = base
    ckpt = run_dir / "train" / "checkpoint"
    model, tok = AutoModelForCausalLM.from_pretrained(ckpt), AutoTokenizer.from_pretrained(ckpt)
    sets = [[(encode_example(tok, e.prompt, e.response, cfg.model.max_length), e.response) for e in t.eval]
            for t in tasks]
    again = evaluate_model(model, tok, sets, [t.name for t in tasks])
    assert again["eval_loss_mean"] == pytest.approx(summary["eval_loss_mean"], abs=1e-4)
    assert again["eval_accuracy_per_task"] == summary["eval_accuracy_per_task"]
    if "test_loss_mean" in summary:  # scored on the test split after the last step: the same model
        test_sets = [[(encode_example(tok, e.prompt, e.response, cfg.model.max_length), e.response) for e in t.test]
                     for t in tasks]
        on_test = evaluate_model(model, tok, test_sets, [t.name for t in tasks])
        assert on_test["eval_loss_mean"] == pytest.approx(summary["test_loss_mean"], abs=1e-4)


@pytest.mark.ray
def test_final_model_loads_with_from_pretrained_and_scores_as_reported(base, zero2):
    summary, run_dir, _, _ = zero2
    _assert_reloaded_model_scores_as_reported(base, summary, run_dir)


@pytest.mark.ray
def test_a_local_cluster_starts_no_preemption_watcher(zero2):
    """On a local single-node cluster nothing can be drained: no watcher actor beside each fit's controller."""
    from ray.util.state import list_actors

    classes = {a.class_name for a in list_actors(limit=10_000)}  # finished fits' actors are listed as DEAD
    assert "TrainController" in classes and "PreemptionWatcher" not in classes, classes


@pytest.mark.ray
def test_zero3_recovers_from_a_worker_failure_with_the_exact_sample_stream(ray_cluster, base, expected):
    marker = base[2] / "zero3-failure" / "train" / "failed-once"
    summary, run_dir = _run(base, "zero3-failure", train={"zero_stage": 3}, recipe=_failing_once(6, marker))
    assert marker.exists()  # it did fail once, after the step-4 checkpoint
    assert summary["steps"] == STEPS and _decreases(summary["loss_curve"]), summary["loss_curve"]
    assert _audit(run_dir) == expected["ids"]
    assert summary["samples_per_task"] == expected["samples_per_task"]
    _assert_reloaded_model_scores_as_reported(base, summary, run_dir)  # gathered from the ZeRO-3 partitions


@pytest.mark.ray
def test_evaluation_sets_are_scored_beside_the_tasks_and_never_trained_on(ray_cluster, base):
    """An evaluation set goes to the workers with weight 0: it is never drawn, it is evaluated on validation
    (Tune's metric) and on test after the last step, and the scored figures are its losses alone."""
    cfg, tasks, _ = base
    rows = [Example(f"held/validation/{i}", ex.prompt, ex.response) for i, ex in enumerate(tasks[0].eval[:4])]
    test = [Example(f"held/test/{i}", ex.prompt, ex.response) for i, ex in enumerate(tasks[1].eval[:4])]
    held = TaskData("held", "test", [], [], rows, test)
    summary, _ = _run(base, "evaluation", train={"steps": 2, "eval_every": 2, "checkpoint_every": 0},
                      final_test=True, evaluation=[held])
    assert summary["samples_per_task"]["held"] == 0 and sum(summary["samples_per_task"].values()) > 0
    assert set(summary["eval_loss_per_task"]) == {t.name for t in tasks} | {"held"}
    assert summary["eval_loss_scored"] == pytest.approx(summary["eval_loss_per_task"]["held"])
    assert summary["eval_loss_scored"] != pytest.approx(summary["eval_loss_mean"])
    assert summary["test_loss_scored"] == pytest.approx(summary["test_loss_per_task"]["held"])

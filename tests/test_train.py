"""Stage 6: bad input (fast, no Ray), then real Ray Train + DeepSpeed on CPU with 2 workers and the tiny model.

The Ray runs share one local cluster. Both are interrupted and must still train on exactly the uninterrupted
sample stream (computed straight from the sampler), step by step and rank by rank, as their audit logs show:
ZeRO-2 stopped after 4 steps and re-run to 8 in the same run directory, and ZeRO-3 with a worker failure
injected after step 6 (recovered from the step-4 checkpoint through FailureConfig).
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


def _decreases(curve: list[float]) -> bool:
    return len(curve) == STEPS and np.mean(curve[-2:]) < np.mean(curve[:2]) - 0.3


@pytest.fixture(scope="module")
def zero2(ray_cluster, base):
    """ZeRO-2 stopped after 4 steps (its final checkpoint), then re-run to 8 in the same run dir: a resume."""
    from taskpgm_ray.config import TrackingConfig

    first, run_dir = _run(base, "zero2", steps=4, train={"zero_stage": 2})
    resumed, _ = _run(base, "zero2", train={"zero_stage": 2}, tracking=TrackingConfig(wandb="offline"))
    return first, resumed, run_dir


@pytest.mark.ray
def test_zero2_resumed_run_learns_and_sees_the_exact_sample_stream(base, zero2, expected):
    first, summary, run_dir = zero2
    assert first["steps"] == 4 and summary["steps"] == STEPS
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


@pytest.mark.ray
def test_final_model_loads_with_from_pretrained_and_scores_as_reported(base, zero2):
    _, summary, run_dir = zero2
    _assert_reloaded_model_scores_as_reported(base, summary, run_dir)


@pytest.mark.ray
def test_zero3_recovers_from_a_worker_failure_with_the_exact_sample_stream(ray_cluster, base, expected):
    summary, run_dir = _run(base, "zero3-failure", train={"zero_stage": 3}, fail_at_step=6)
    assert (run_dir / "train" / ".injected-failure").exists()  # it did fail once, after the step-4 checkpoint
    assert summary["steps"] == STEPS and _decreases(summary["loss_curve"]), summary["loss_curve"]
    assert _audit(run_dir) == expected["ids"]
    assert summary["samples_per_task"] == expected["samples_per_task"]
    _assert_reloaded_model_scores_as_reported(base, summary, run_dir)  # gathered from the ZeRO-3 partitions

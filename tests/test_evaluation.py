"""Evaluation sets (``evaluation:``, a suite's ``eval_only`` tasks): loaded like tasks, never trained on, and what
the scored metric means when there are any. Fast, no Ray; the Ray Train run is in test_train.py."""

from __future__ import annotations

import json

import pytest

from taskpgm_ray.config import ConfigError, config_from_dict
from taskpgm_ray.tasks import Example, TaskData, TaskError, check_apart, load_evaluation
from taskpgm_ray.train.launch import scored_flags, scored_names


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, evaluation, **extra):
    return config_from_dict({"output_dir": str(tmp_path / "run"), "synthetic": {"include": ["copy"], "scale": 0.1},
                             "evaluation": evaluation, **extra})


def test_a_local_file_is_split_into_validation_and_test_halves_that_do_not_overlap(tmp_path):
    path = _jsonl(tmp_path / "held.jsonl", [{"q": f"question {i}", "a": f"answer {i}"} for i in range(30)])
    cfg = _cfg(tmp_path, [{"name": "held", "source": "jsonl", "path": str(path), "prompt_template": "Q: {q}\nA:",
                           "response_field": "a"}], splits={"max_eval": 10})
    (e,) = load_evaluation(cfg)
    assert (e.name, e.train, e.probe, e.score) == ("held", [], [], True)
    assert len(e.eval) == len(e.test) == 10  # halves of 30, each capped at splits.max_eval
    assert not {x.prompt for x in e.eval} & {x.prompt for x in e.test}
    assert all(x.prompt.startswith("Q: question ") and x.response.startswith("answer ") for x in e.eval + e.test)
    assert [x.id for x in load_evaluation(cfg)[0].eval] == [x.id for x in e.eval]  # seeded: the same every time


def test_a_dataset_with_validation_and_test_splits_uses_them_and_needs_no_train_split(tmp_path):
    import datasets

    rows = {s: [{"prompt": f"{s} {i}", "response": str(i)} for i in range(6)] for s in ("validation", "test")}
    datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in rows.items()}).save_to_disk(tmp_path / "ds")
    (e,) = load_evaluation(_cfg(tmp_path, [{"name": "ds", "source": "disk", "path": str(tmp_path / "ds")}]))
    assert [x.prompt for x in e.eval] == [f"validation {i}" for i in range(6)]
    assert [x.prompt for x in e.test] == [f"test {i}" for i in range(6)]


def test_an_evaluation_set_too_small_to_split_is_refused_by_name(tmp_path):
    path = _jsonl(tmp_path / "one.jsonl", [{"prompt": "p", "response": "r"}])
    with pytest.raises(TaskError, match="evaluation set 'tiny'.*validation.*test"):
        load_evaluation(_cfg(tmp_path, [{"name": "tiny", "source": "jsonl", "path": str(path)}]))


def test_config_problems_name_the_evaluation_entry(tmp_path):
    a = str(_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r"}]))
    with pytest.raises(ConfigError) as err:
        config_from_dict({"output_dir": str(tmp_path), "tasks": [{"name": "a", "source": "jsonl", "path": a}],
            "evaluation": [{"name": "a", "source": "jsonl", "path": str(tmp_path / "a.jsonl")},
                           {"name": "b", "source": "jsonl", "path": str(tmp_path / "missing.jsonl")}]})
    assert "evaluation[0].name: duplicate task name 'a' (also tasks[0])" in err.value.problems
    assert any(p.startswith("evaluation[1].path: file not found") for p in err.value.problems)


def _set(name, prompts, split="train"):
    return [Example(f"{name}/{split}/{i}", p, "r") for i, p in enumerate(prompts)]


def test_an_evaluation_set_that_overlaps_training_data_is_refused_naming_both():
    task = TaskData("t", "x", _set("t", ["p1", "p2", "p3"]), [], _set("t", ["v"], "eval"))
    held = TaskData("h", "x", [], [], _set("h", ["q1"], "validation"), _set("h", ["p2"], "test"))
    with pytest.raises(TaskError, match="evaluation set 'h': 1 example.*task 't'"):
        check_apart([task], [held])
    check_apart([task], [TaskData("h", "x", [], [], _set("h", ["q1"]), _set("h", ["q2"]))])  # held out: fine
    # an evaluation set may share examples with a task's own validation split (it is never trained on)
    check_apart([task], [TaskData("h", "x", [], [], _set("h", ["v"]), _set("h", ["q2"]))])


def test_the_scored_metric_is_over_the_evaluation_sets_alone_when_there_are_any():
    tasks = [TaskData("a", "x", _set("a", ["1"]), [], []), TaskData("n", "x", _set("n", ["2"]), [], [], score=False)]
    held = [TaskData("h1", "x", [], [], [], []), TaskData("h2", "x", [], [], [], [])]
    assert scored_flags(tasks) == [True, False] and scored_names(tasks) == ["a"]
    assert scored_flags(tasks, held) == [False, False, True, True]
    assert scored_names(tasks, held) == ["h1", "h2"]


def test_the_report_names_the_evaluation_sets_and_shows_their_losses(tmp_path):
    from taskpgm_ray.report import make_report
    from taskpgm_ray.tracking import TrackingConfig

    (tmp_path / "train").mkdir()
    (tmp_path / "mixture.json").write_text(json.dumps({"format": "taskpgm-mixture/1", "weights": {"a": 1.0},
                                                       "method": "uniform", "sizes": {"a": 10}}))
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": [{"name": "a"}], "evaluation": [{"name": "held"}]}))
    (tmp_path / "train" / "summary.json").write_text(json.dumps({
        "eval_loss_per_task": {"a": 0.5, "held": 1.25}, "test_loss_per_task": {"a": 0.6, "held": 1.5},
        "test_accuracy_per_task": {"a": 0.9, "held": 0.25}, "eval_loss_scored": 1.25, "test_loss_scored": 1.5}))
    report = make_report(tmp_path, tracking=TrackingConfig(wandb="disabled"))
    assert report["evaluation"] == [{"set": "held", "eval_loss": 1.25, "test_loss": 1.5, "test_accuracy": 0.25}]
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "Mean test loss after the fine-tune (the evaluation sets, never trained on;" in md
    assert "| held | 1.25" in md

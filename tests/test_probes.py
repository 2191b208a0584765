"""Stage 2 on a real local Ray cluster: LoRA probes, the adapter cache, per-task failure reports."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from taskpgm_ray.config import TEST_CONFIG, config_from_dict
from taskpgm_ray.distributed.probes import (
    ProbeError,
    install_adapter,
    is_complete,
    probe_command,
    probe_dir,
    probe_hash,
)
from taskpgm_ray.tasks import load_tasks

TASKS = ["reverse_a", "sort", "add"]


def make_config(out, **overrides):
    data = yaml.safe_load(TEST_CONFIG.read_text())
    base = {"output_dir": str(out), "synthetic.include": TASKS, "model.name": "tiny", "probes.steps": 3,
            "probes.batch_size": 8,
            "probes.max_retries": 1, "tracking.wandb": "disabled"}
    return config_from_dict(data, overrides={**base, **overrides})


def test_probe_hash_covers_what_changes_the_adapter(tmp_path):
    cfg = make_config(tmp_path)
    task = load_tasks(cfg)[0]
    h = probe_hash(task, cfg.probes, cfg.model)
    assert h == probe_hash(task, dataclasses.replace(cfg.probes, num_cpus=2, num_gpus=0.5, max_retries=5), cfg.model)
    assert h != probe_hash(task, dataclasses.replace(cfg.probes, steps=4), cfg.model)
    assert h != probe_hash(task, cfg.probes, dataclasses.replace(cfg.model, max_length=64))
    other = dataclasses.replace(task, train=task.train[1:])
    assert h != probe_hash(other, cfg.probes, cfg.model)


def _finished(path, task: str):
    """An adapter directory as train_probe leaves it before the rename: weights, then probe.json last."""
    path.mkdir()
    (path / "adapter_model.safetensors").write_bytes(b"weights of " + task.encode())
    (path / "probe.json").write_text(json.dumps({"task": task}))
    return path


def test_installing_an_adapter_over_another_is_fine_only_when_that_one_is_complete(tmp_path):
    out = tmp_path / "sort-abc"
    install_adapter(_finished(tmp_path / ".tmp-1", "sort"), out)
    assert is_complete(out) and not (tmp_path / ".tmp-1").exists()
    # a concurrent run with the same hash finished first: the rename fails, theirs (identical) stays
    install_adapter(_finished(tmp_path / ".tmp-2", "sort"), out)
    assert json.loads((out / "probe.json").read_text()) == {"task": "sort"}
    # something incomplete is in the way (no probe.json): the probe is not on disk, so it is an error
    (out / "probe.json").unlink()
    with pytest.raises(RuntimeError, match=r"sort-abc: could not move the finished adapter into place .* "
                                           r"no complete adapter is there; remove .* and re-run"):
        install_adapter(_finished(tmp_path / ".tmp-3", "sort"), out)


def _failing_for(task: str):
    """``train_probe``, except that it raises (on every attempt) for ``task``. Built inside a function so Ray
    pickles it by value: its workers need not import this test module."""
    from taskpgm_ray.distributed.probes import train_probe

    def train_or_fail(task_name: str, *args):
        if task_name == task:
            raise RuntimeError(f"injected failure for task {task_name!r}")
        return train_probe(task_name, *args)

    return train_or_fail


def test_failure_is_reported_per_task_then_only_missing_probes_train(ray_cluster, tmp_path):
    cfg = make_config(tmp_path)
    tasks = load_tasks(cfg)
    with pytest.raises(ProbeError, match=r"failed for task\(s\) sort .*injected failure.*2 finished adapter") as err:
        probe_command(cfg, tasks=tasks, train_fn=_failing_for("sort"))
    assert set(err.value.failed) == {"sort"}
    done = {t.name: is_complete(probe_dir(cfg, t)) for t in tasks}
    assert done == {"reverse_a": True, "sort": False, "add": True}
    assert not [p for p in (tmp_path / "probes").iterdir() if p.name.startswith(".")], "temp dirs left behind"

    second = probe_command(cfg, tasks=tasks)
    assert second["trained"] == ["sort"] and sorted(second["cached"]) == ["add", "reverse_a"]
    meta = json.loads((probe_dir(cfg, tasks[1]) / "probe.json").read_text())
    assert meta["task"] == "sort" and meta["kind"] == "lora" and meta["steps"] == 3
    assert (probe_dir(cfg, tasks[1]) / "adapter_config.json").exists()

    third = probe_command(cfg, tasks=tasks)
    assert third["trained"] == [] and sorted(third["cached"]) == sorted(TASKS)


def test_too_many_gpus_is_a_clear_error(ray_cluster, tmp_path):
    cfg = make_config(tmp_path, **{"probes.num_gpus": 1})
    with pytest.raises(ValueError, match=r"probe fine-tune .* needs 1 GPU\(s\) but the Ray cluster has 0"):
        probe_command(cfg)

"""End to end: `taskpgm run --test-mode` on a local Ray cluster, interrupted and resumed; the artefact cache;
the run directory per CONTRACT.md; the W&B offline runs read back with wandb's own reader; Tune with two
concurrent trials on two CPUs (the small-machine deadlock case)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from taskpgm_ray.config import config_from_dict
from taskpgm_ray.pipeline import Pipeline

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, ray_cluster) -> Path:
    """A test-mode run interrupted in its training stage, then resumed: the module's shared run directory."""
    import yaml

    from taskpgm_ray.config import TEST_CONFIG

    data = yaml.safe_load(TEST_CONFIG.read_text())
    out = tmp_path_factory.mktemp("run") / "run"
    data["output_dir"] = str(out)
    cfg = config_from_dict(data, source=str(TEST_CONFIG))

    class Interrupted(Exception):
        pass

    def interrupt():
        raise Interrupted("simulated interruption in the training stage")

    first = Pipeline(cfg)
    first._run_train = interrupt  # the stage dies after the earlier stages finished
    with pytest.raises(Interrupted):
        first.run()
    state = json.loads((out / "stages.json").read_text())
    assert [state[s]["status"] for s in ("tasks", "probes", "estimate", "tune", "select", "train")] == \
        ["done", "done", "done", "done", "done", "failed"]
    assert (out / "likelihoods.npz").exists() and not (out / "train" / "summary.json").exists()

    timings = Pipeline(cfg, resume=True).run()
    assert {s: status for s, status, _ in timings} == {
        "tasks": "cached", "probes": "cached", "estimate": "cached", "tune": "cached", "select": "cached",
        "train": "done", "report": "done"}
    return out


def test_run_directory_follows_the_contract(run_dir):
    tasks = json.loads((run_dir / "tasks.json").read_text())["tasks"]
    names = [t["name"] for t in tasks]
    assert len(names) == 6 and all(set(t) == {"name", "source", "sizes", "hash"} for t in tasks)

    with np.load(run_dir / "likelihoods.npz") as f:
        assert list(f["tasks"]) == names
        assert f["loglik_sum"].shape == (6, 6) and f["loglik_sum"].dtype == np.float64
        assert np.all(f["loglik_sum"] < 0) and np.all(f["count"] > 0)
        assert list(f["sizes"]) == [t["sizes"]["train"] for t in tasks]
    assert (run_dir / "jsd.npz").exists()

    mixture = json.loads((run_dir / "mixture.json").read_text())
    assert mixture == json.loads((run_dir / "tune" / "best.json").read_text())  # Tune's pick, via the select step
    assert mixture["format"] == "taskpgm-mixture/1"
    assert set(mixture) >= {"weights", "method", "affinity", "hyperparameters", "energy", "kkt_residual", "sizes",
                            "inputs_hash", "created"}
    w = np.array(list(mixture["weights"].values()))
    assert list(mixture["weights"]) == names and np.all(w >= 0) and abs(w.sum() - 1) < 1e-9

    summary = json.loads((run_dir / "train" / "summary.json").read_text())
    for key in ("samples_per_task", "tokens_per_task", "eval_loss_per_task", "eval_accuracy_per_task",
                "eval_loss_mean", "throughput"):
        assert key in summary, key
    assert set(summary["eval_loss_per_task"]) == set(names)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(run_dir / "train" / "checkpoint"))
    assert model.config.vocab_size > 256

    results = json.loads((run_dir / "tune" / "results.json").read_text())
    kinds = [t["kind"] for t in results["trials"]]
    assert kinds.count("taskpgm") == 2 and {"uniform", "size", "temperature"} <= set(kinds)
    assert all({"params", "validation_loss", "status"} <= set(t) for t in results["trials"])
    # Two 1-worker trials ran side by side on the 2-CPU cluster without deadlocking.
    assert results["max_concurrent"] == 2
    assert results["best"]["validation_loss"] == min(
        t["validation_loss"] for t in results["trials"] if t["validation_loss"] is not None)

    for png in ("affinity", "mixture", "loss", "tune"):
        assert (run_dir / "report" / f"{png}.png").stat().st_size > 5000, png
    report = json.loads((run_dir / "report" / "summary.json").read_text())
    assert [r["task"] for r in report["tasks"]] == names

    # signal checks: every proxy of the pretrained base learned its (non-noise) task, and the run says so
    signal = json.loads((run_dir / "estimate" / "signal.json").read_text())
    assert report["signal"] == signal and "Signal checks" in (run_dir / "report" / "summary.md").read_text()
    for name in ("reverse_a", "reverse_b", "copy", "sort"):
        t = signal["tasks"][name]
        assert t["learned"] and t["gain"] >= 0.10 and t["gain_low"] > 0, (name, t)
    assert signal["affinity"]["snr"] >= 2 and signal["tasks"]["reverse_a"]["nearest"] == "reverse_b"
    info = {n: signal["tasks"][n]["information_gain_low"] for n in ("noise_a", "reverse_a")}
    assert info["noise_a"] <= 0 < info["reverse_a"], info


def _wandb_records(run: Path) -> list[dict]:
    wandb = Path(sys.executable).parent / "wandb"
    out = subprocess.run([str(wandb), "leet", "inspect", str(run), "--json"], capture_output=True, text=True,
                         check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip().startswith("{")]


def test_wandb_offline_runs_hold_the_metrics_and_the_mixture(run_dir):
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B runs"
    text = {r: json.dumps(_wandb_records(r)) for r in runs}
    train_runs = [r for r, t in text.items() if "eval_loss_mean" in t and '"type": "history"' in t]
    assert train_runs, "no W&B run has eval_loss_mean history rows"
    mixture = json.loads((run_dir / "mixture.json").read_text())
    assert any(all(name in t for name in mixture["weights"]) and "mixture" in t for t in text.values())


def test_rerun_is_cached_and_a_training_change_reruns_only_training(run_dir):
    import yaml

    from taskpgm_ray.config import TEST_CONFIG

    data = yaml.safe_load(TEST_CONFIG.read_text())
    data["output_dir"] = str(run_dir)
    cfg = config_from_dict(data, source=str(TEST_CONFIG))
    assert {s for s, status, _ in Pipeline(cfg).run() if status != "cached"} == set()

    data["train"]["eval_every"] = 60  # a setting of the final fine-tune only
    cfg = config_from_dict(data, source=str(TEST_CONFIG))
    rerun = {s for s, status, _ in Pipeline(cfg).run() if status != "cached"}
    assert rerun == {"train", "report"}
    assert [h["step"] for h in json.loads((run_dir / "train" / "summary.json").read_text())["history"]] == [60, 120]

    data["tune"]["enabled"] = False  # the energy's mixture now: select, train and report run again, nothing else
    cfg = config_from_dict(data, source=str(TEST_CONFIG))
    rerun = {s for s, status, _ in Pipeline(cfg).run() if status != "cached"}
    assert rerun == {"select", "train", "report"}
    assert json.loads((run_dir / "mixture.json").read_text()) == \
        json.loads((run_dir / "estimate" / "mixture.json").read_text())


def test_compare_scores_every_method_on_the_test_split_with_the_same_budget(run_dir):
    import yaml

    from taskpgm_ray.compare import compare_command
    from taskpgm_ray.config import TEST_CONFIG

    data = yaml.safe_load(TEST_CONFIG.read_text())
    data["output_dir"] = str(run_dir)
    data["train"].update(steps=20, eval_every=10, num_workers=1, cpus_per_worker=0.9)  # two fine-tunes side by side
    cfg = config_from_dict(data, source=str(TEST_CONFIG))
    results = compare_command(cfg, seeds=[0])
    saved = json.loads((run_dir / "compare" / "results.json").read_text())
    assert saved["format"] == "taskpgm-compare/1" and saved["metric"] == "mean test loss over scored tasks"
    assert "noise_a" not in saved["scored_tasks"] and len(saved["scored_tasks"]) == 5  # noise: score false
    (row,) = saved["seeds"]
    assert row["seed"] == 0 and set(row["test_loss"]) == {"taskpgm", "uniform", "size", "temperature"}
    for method, per_task in row["per_task"].items():
        assert row["test_loss"][method] == pytest.approx(np.mean([per_task[t] for t in saved["scored_tasks"]]))
        assert abs(sum(row["weights"][method].values()) - 1) < 1e-9
    assert [c[0] for c in row["curves"]["uniform"]] == [10, 20]
    assert results["methods"]["temperature"]["source"].startswith("T = 2, chosen on validation")
    again = compare_command(cfg, seeds=[0])  # every fine-tune cached
    assert again["seeds"][0]["test_loss"] == row["test_loss"]
    assert (run_dir / "compare" / "compare.png").stat().st_size > 5000

"""W&B tracking without Ray: modes and project from the config or the environment, one group per run
directory, trials named by their hyperparameters, mixture.json as an artifact; read back with wandb's own
reader (`wandb leet inspect --json`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from taskpgm_ray.config import TrackingConfig, config_from_dict
from taskpgm_ray.tracking import (
    GROUP_FILE,
    log_mixture,
    resolve_tracking,
    run_group,
    trial_name,
    trial_tracking,
    wandb_env,
    wandb_run,
)

REPO = Path(__file__).resolve().parents[1]
TRIALS = [  # (Tune params, resolved hyperparameters) as tune.trial_weights gives them
    ({"kind": "taskpgm", "ratio": 0.3, "affinity": "pmi", "kernel": "psd", "tau": 1.0, "unary": "representativeness",
      "budget": None, "temperature": None}, {"beta": 0.3, "lam": 1.0, "ratio": 0.3, "solver": "exact"}),
    ({"kind": "temperature", "ratio": 1.0, "affinity": None, "kernel": None, "tau": None, "unary": None,
      "budget": None, "temperature": 2.0}, {"temperature": 2.0}),
]


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_config_defaults_leave_mode_and_project_to_the_environment(clean_env, tmp_path):
    assert resolve_tracking(TrackingConfig(), tmp_path).wandb == "offline"
    assert resolve_tracking(TrackingConfig(), tmp_path).project == "taskpgm"
    clean_env.setenv("WANDB_MODE", "online")
    clean_env.setenv("WANDB_PROJECT", "from-env")
    resolved = resolve_tracking(TrackingConfig(), tmp_path)
    assert (resolved.wandb, resolved.project) == ("online", "from-env")
    # Set in the config, they win over the environment.
    explicit = config_from_dict({"synthetic": {}, "tracking": {"wandb": "offline", "project": "mine"}}).tracking
    assert (resolve_tracking(explicit, tmp_path).wandb, resolve_tracking(explicit, tmp_path).project) == (
        "offline", "mine")
    clean_env.setenv("WANDB_MODE", "dryrun")  # wandb's old name for offline
    assert resolve_tracking(TrackingConfig(), tmp_path).wandb == "offline"


def test_bad_mode_in_the_environment_and_online_without_a_key_are_one_line_errors(clean_env, tmp_path):
    clean_env.setenv("WANDB_MODE", "onlin")
    with pytest.raises(ValueError, match=re.escape(
            "WANDB_MODE='onlin' in the environment: expected online, offline or disabled "
            "(or set tracking.wandb in the config)")):
        resolve_tracking(TrackingConfig(), tmp_path)
    clean_env.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(ValueError, match=re.escape("tracking.wandb: 'online' needs WANDB_API_KEY")):
        wandb_env(TrackingConfig(wandb="online"))


def test_group_is_made_once_per_run_directory_and_kept(clean_env, tmp_path):
    run_dir = tmp_path / "my run"
    group = run_group(run_dir)
    assert re.fullmatch(r"my-run-[0-9a-f]{8}", group)
    assert (run_dir / GROUP_FILE).read_text() == group + "\n"
    assert run_group(run_dir) == group  # a resumed run keeps it
    assert resolve_tracking(TrackingConfig(), run_dir).group == group
    assert run_group(tmp_path / "other") != group
    assert resolve_tracking(TrackingConfig(group="chosen"), tmp_path / "third").group == "chosen"
    assert not (tmp_path / "third" / GROUP_FILE).exists()
    assert resolve_tracking(TrackingConfig(wandb="disabled"), tmp_path / "off").group is None
    assert not (tmp_path / "off").exists()
    assert [p.name for p in run_dir.iterdir()] == [GROUP_FILE]  # no temp file left behind
    (run_dir / GROUP_FILE).write_text("")
    with pytest.raises(ValueError, match=re.escape(f"{run_dir / GROUP_FILE} is empty")):
        run_group(run_dir)


@pytest.mark.parametrize("params, name", [
    (TRIALS[0][0], "trial-ratio=0.3-pmi-psd"),
    ({**TRIALS[0][0], "ratio": 12.3456, "affinity": "jsd", "kernel": "exp", "tau": 0.5, "budget": 3},
     "trial-ratio=12.3-jsd-exp-tau=0.5-k=3"),
    (TRIALS[1][0], "trial-temperature=2"),
    ({"kind": "uniform", "temperature": None}, "trial-uniform"),
])
def test_trial_names_carry_the_hyperparameters(params, name):
    assert trial_name(params) == name


def _records(run: Path) -> list[dict]:
    wandb = Path(sys.executable).parent / "wandb"
    out = subprocess.run([str(wandb), "leet", "inspect", str(run), "--json"], capture_output=True, text=True,
                         check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def _readme_sync_runs(run_dir: Path) -> set[Path]:
    """The run directories the README's one `wandb sync` command uploads for ``run_dir``."""
    readme = (REPO / "README.md").read_text()
    match = re.search(r"^wandb sync \$\((find [^)]*)\)", readme, re.MULTILINE)
    assert match, "README: no `wandb sync $(find ...)` line"
    command = match.group(1).replace("runs/my-run", str(run_dir))
    found = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=True).stdout.split()
    return {Path(p) for p in found}


def test_offline_runs_of_one_pipeline_share_a_group_and_trials_carry_their_hyperparameters(clean_env, tmp_path):
    clean_env.setenv("WANDB_MODE", "offline")  # from the environment: the config leaves tracking.wandb null
    out = tmp_path / "pipeline"
    cfg = config_from_dict({"synthetic": {}, "output_dir": str(out)}).tracking
    assert cfg.wandb is None
    with wandb_run(cfg, out, job_type="estimate", config={"energy": {"beta": 1.0}}) as run:
        run.log({"estimate/fraction": 1.0})
    for i, (params, hyper) in enumerate(TRIALS):  # as tune._trial, then the recipe on rank 0, do it
        tracked = trial_tracking(cfg, out, params, hyper)
        with wandb_run(tracked, out / "tune" / "trials" / f"t{i}", job_type="train", name="train",
                       config={"world_size": 1}) as run:
            run.log({"train/loss": 1.0 - i})
    (out / "mixture.json").write_text(json.dumps({"format": "taskpgm-mixture/1", "weights": {"a": 0.25, "b": 0.75},
                                                  "method": "taskpgm", "weight_unit": "examples"}))
    with wandb_run(cfg, out, job_type="report", name="report") as run:
        log_mixture(run, out / "mixture.json")

    runs = sorted(out.rglob("offline-run-*"))
    assert len(runs) == 4
    assert _readme_sync_runs(out) == set(runs)
    group = (out / GROUP_FILE).read_text().strip()
    by_job: dict[str, list[dict]] = {}
    for run_path in runs:
        records = _records(run_path)
        (run_record,) = [r["run"] for r in records if r["type"] == "run"]
        assert run_record["run_group"] == group, run_path
        assert run_record["project"] == "taskpgm"
        by_job.setdefault(run_record["job_type"], []).append({"run": run_record, "records": records})
    assert sorted(by_job) == ["estimate", "report", "train"]
    trials = {t["run"]["display_name"]: t["run"]["config"]["update"] for t in by_job["train"]}
    assert set(trials) == {"trial-ratio=0.3-pmi-psd", "trial-temperature=2"}
    assert trials["trial-ratio=0.3-pmi-psd"]["trial"] == {
        "kind": "taskpgm", "ratio": 0.3, "affinity": "pmi", "kernel": "psd", "tau": 1.0,
        "unary": "representativeness", "beta": 0.3, "lam": 1.0, "solver": "exact"}
    assert trials["trial-ratio=0.3-pmi-psd"]["world_size"] == 1  # the recipe's own config is kept
    assert trials["trial-temperature=2"]["trial"] == {"kind": "temperature", "ratio": 1.0, "temperature": 2.0}
    (report,) = by_job["report"]
    (artifact,) = [r["artifact"] for r in report["records"] if r["type"] == "artifact"]
    assert (artifact["name"], artifact["type"]) == (f"mixture-{group}", "mixture")
    assert [c["path"] for c in artifact["manifest"]["contents"]] == ["mixture.json"]
    assert json.loads(artifact["metadata"]) == {"format": "taskpgm-mixture/1", "method": "taskpgm",
                                                "weight_unit": "examples"}


def test_trial_tracking_travels_to_train_workers_intact(clean_env, tmp_path):
    """It rides in train_loop_config, pickled by Ray; on the worker it resolves to itself."""
    import ray.cloudpickle as cloudpickle

    tracked = trial_tracking(TrackingConfig(), tmp_path, *TRIALS[0])
    back = cloudpickle.loads(cloudpickle.dumps(tracked))
    assert back == tracked and resolve_tracking(back, tmp_path / "tune" / "trials" / "t0") == tracked
    assert not (tmp_path / "tune").exists()  # a trial joins the pipeline's group, it makes none of its own


def test_disabled_makes_no_run_and_no_files(clean_env, tmp_path):
    clean_env.setenv("WANDB_MODE", "disabled")
    with wandb_run(TrackingConfig(), tmp_path / "r", job_type="estimate") as run:
        assert run is None
    assert not (tmp_path / "r").exists()

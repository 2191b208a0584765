"""The `taskpgm` command as a user meets it: help, one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import datasets

from taskpgm_ray.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "taskpgm_ray.cli", *args], capture_output=True, text=True)


def test_help_lists_commands():
    p = run("--help")
    assert p.returncode == 0 and "tasks" in p.stdout


def test_missing_file_is_one_line_nonzero(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tasks:\n  - {name: a, source: jsonl, path: nope.jsonl}\n")
    p = run("tasks", "list", str(cfg))
    assert p.returncode == 2
    assert p.stderr.strip() == f"taskpgm: error: {cfg}: tasks[0].path: file not found: {tmp_path / 'nope.jsonl'}"
    assert "Traceback" not in p.stderr


def test_synth_writes_loadable_suite(tmp_path, capsys):
    assert main(["tasks", "synth", "--out", str(tmp_path / "s"), "--seed", "7", "--scale", "0.1"]) == 0
    dd = datasets.load_from_disk(str(tmp_path / "s" / "reverse_a"))
    assert len(dd["train"]) == 160
    assert main(["tasks", "synth", "--out", str(tmp_path / "s"), "--scale", "-1"]) != 0


def test_tasks_list_test_mode(tmp_path, capsys):
    assert main(["tasks", "list", "--test-mode", "--output-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "tasks.json").read_text())
    assert len(data["tasks"]) == 6
    assert "reverse_a" in capsys.readouterr().out


def test_config_and_test_mode_together_is_an_error(tmp_path, capsys):
    assert main(["tasks", "list", "x.yaml", "--test-mode"]) == 2


def _likelihoods(path):
    import numpy as np

    from taskpgm_ray.mixture_file import save_likelihoods

    L = np.array([[-1.2, -1.35, -2.6], [-1.3, -1.1, -2.5], [-2.4, -2.3, -0.9]]) * 10
    save_likelihoods(str(path), ["math", "algebra", "chat"], L, np.array([10, 10, 10]),
                     np.array([50000, 20000, 5000]))
    return path


def test_solve_writes_the_contract_mixture_and_exports_round_trip(tmp_path, capsys):
    from taskpgm_ray.mixture_file import parse_export, read_mixture

    lik = _likelihoods(tmp_path / "L.npz")
    out = tmp_path / "m.json"
    assert main(["solve", "--likelihoods", str(lik), "--out", str(out), "--beta", "1", "--lam", "1"]) == 0
    mix = read_mixture(str(out))
    assert mix["method"] == "taskpgm" and mix["affinity"] == "pmi" and mix["kkt_residual"] < 1e-9
    assert list(mix["weights"]) == ["math", "algebra", "chat"]
    assert [round(w, 3) for w in mix["weights"].values()] == [0.395, 0.413, 0.192]  # README's worked example
    assert mix["sizes"] == {"math": 50000, "algebra": 20000, "chat": 5000}
    for fmt in ("hf", "llamafactory", "megatron", "json"):
        capsys.readouterr()
        assert main(["export", str(out), "--to", fmt]) == 0
        back = parse_export(capsys.readouterr().out, fmt)
        assert all(abs(back[t] - w) < 1e-9 for t, w in mix["weights"].items()), fmt


def test_solve_budget_and_bad_input(tmp_path, capsys):
    from taskpgm_ray.mixture_file import read_mixture

    lik = _likelihoods(tmp_path / "L.npz")
    out = tmp_path / "m.json"
    assert main(["solve", "--likelihoods", str(lik), "--out", str(out), "--budget", "2"]) == 0
    assert sum(w > 0 for w in read_mixture(str(out))["weights"].values()) <= 2
    assert main(["solve", "--likelihoods", str(lik), "--out", str(out), "--kernel", "exp", "--tau", "0"]) == 2
    assert "energy.tau: must be > 0, got 0.0" in capsys.readouterr().err
    assert main(["solve", "--likelihoods", str(tmp_path / "nope.npz"), "--out", str(out)]) == 2
    assert main(["solve", "--likelihoods", str(lik), "--out", str(out), "--affinity", "jsd"]) == 2

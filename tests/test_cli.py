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

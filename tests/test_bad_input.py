"""Bad input may not damage, and is refused naming the culprit (issue 23, items 5 and 6).

Every case is one line on stderr and exit code 2 (``BadInput``), or a ``pytest.raises(match=...)`` on the function the
command calls. No Ray: the CLI runs in-process, and nothing here trains.
"""

from __future__ import annotations

import ast
import json
import math
import os

import numpy as np
import pytest

from taskpgm_ray.cli import main
from taskpgm_ray.config import ConfigError, config_from_dict
from taskpgm_ray.errors import BadInput
from taskpgm_ray.exporters import build_export
from taskpgm_ray.mixture_file import SIGNAL_ARRAYS, read_mixture, save_likelihoods

UNSAFE = "is not a safe name: use letters, digits and . _ - + = @"


def _error(capsys) -> str:
    """The command's error: stderr ends in exactly one ``taskpgm: error:`` line (after any datasets progress bar)."""
    err = capsys.readouterr().err
    *before, last, end = err.split("\n")
    assert last.startswith("taskpgm: error: ") and end == "" and "taskpgm" not in "".join(before), err
    return last[len("taskpgm: error: "):]


def _likelihoods(path, L=None, **signal):
    L = -np.array([[10.0, 20.0], [20.0, 10.0]]) if L is None else L
    save_likelihoods(str(path), ["a", "b"], L, np.array([10, 10]), np.array([100, 200]), **signal)
    return path


SOLVE = ["--unary", "representativeness", "--prior", "none"]  # no signal arrays needed


# --- config: every field named ----------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ({"tasks.0.name": "../../../x"}, f"tasks[0].name: '../../../x' {UNSAFE}"),
    ({"tasks.0.name": "a\nimport os"}, rf"tasks[0].name: 'a\nimport os' {UNSAFE}"),
    ({"tasks.0.prompt_template": "{prompt"},
     "tasks[0].prompt_template: '{prompt' is not a valid str.format template (expected '}' before end of string); "
     "write a literal brace as {{ or }}"),
    ({"tasks.0.response_template": "A: {}"},
     "tasks[0].response_template: 'A: {}' has a positional field {}; name a column instead, e.g. {prompt}"),
    ({"splits.min_probe": -1}, "splits.min_probe: must be >= 1, got -1"),
    ({"splits.max_probe": -1}, "splits.max_probe: must be >= 1, got -1"),
    ({"splits.max_eval": -5}, "splits.max_eval: must be >= 1, got -5"),
    ({"probes.steps": 0}, "probes.steps: must be >= 1, got 0"),
    ({"probes.batch_size": -4}, "probes.batch_size: must be >= 1, got -4"),
    ({"probes.lr": -1e-3}, "probes.lr: must be > 0, got -0.001"),
    ({"energy.min_weight": -0.1}, "energy.min_weight: must be in [0, 1] (a share of the mixture), got -0.1"),
    ({"energy.max_weight": 1.5}, "energy.max_weight: must be in (0, 1] (a share of the mixture), got 1.5"),
    ({"energy.lam": math.nan}, "energy.lam: must be a finite number, got nan"),
    ({"energy.tau": math.nan}, "energy.tau: must be a finite number, got nan"),
    ({"energy.beta": math.inf}, "energy.beta: must be a finite number, got inf"),
    ({"train.lr": -math.inf}, "train.lr: must be a finite number, got -inf"),  # any float field
])
def test_config_refuses_each_bad_field_by_name(override, message):
    base = {"tasks": [{"name": "a", "source": "jsonl", "path": __file__}]}  # a file that exists
    with pytest.raises(ConfigError) as e:
        config_from_dict(base, overrides=override)
    assert str(e.value).startswith(message), str(e.value)


def test_config_gathers_a_bad_name_with_the_other_problems():
    base = {"tasks": [{"name": "../x", "source": "jsonl", "path": __file__}], "probes": {"steps": 0}}
    with pytest.raises(ConfigError) as e:
        config_from_dict(base)
    name, steps = e.value.problems
    assert name.startswith(f"tasks[0].name: '../x' {UNSAFE}") and steps == "probes.steps: must be >= 1, got 0"


def _config(tmp_path, text: str):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r"}) + "\n"
                                              for i in range(20)))
    (tmp_path / "empty.jsonl").write_bytes(b"")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'run'}\n{text}")
    return cfg


def test_a_nan_in_yaml_and_a_non_utf8_config_are_one_line(tmp_path, capsys):
    cfg = _config(tmp_path, "tasks:\n  - {name: a, source: jsonl, path: a.jsonl}\nenergy: {lam: .nan}\n")
    assert main(["config", "show", str(cfg)]) == 2
    assert _error(capsys) == f"{cfg}: energy.lam: must be a finite number, got nan"
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("tasks:\n  - {name: caf\u00e9, source: hub, path: x}\n".encode("latin-1"))
    assert main(["config", "show", str(latin1)]) == 2
    assert _error(capsys) == f"{latin1}: not a UTF-8 text file (byte 21 is b'\\xe9'); save the config as UTF-8 YAML"


def test_an_empty_jsonl_and_a_template_that_cannot_format_are_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = _config(tmp_path, "tasks:\n  - {name: a, source: jsonl, path: empty.jsonl}\n")
    assert main(["tasks", "list", str(cfg), "--output-dir", str(out)]) == 2
    assert _error(capsys) == (f"task 'a': {tmp_path / 'empty.jsonl'} is empty (0 bytes); a jsonl task needs rows "
                              f"with 'prompt' and 'response'")
    cfg = _config(tmp_path, "tasks:\n  - {name: a, source: jsonl, path: a.jsonl, prompt_template: '{prompt'}\n")
    assert main(["tasks", "list", str(cfg), "--output-dir", str(out)]) == 2
    assert "tasks[0].prompt_template: '{prompt' is not a valid str.format template" in _error(capsys)
    # valid syntax, but not for this column's value: caught when the rows are formatted
    cfg = _config(tmp_path, "tasks:\n  - {name: a, source: jsonl, path: a.jsonl, prompt_template: '{prompt:d}'}\n")
    assert main(["tasks", "list", str(cfg), "--output-dir", str(out)]) == 2
    assert _error(capsys) == ("task 'a': prompt_template '{prompt:d}' cannot format train row 0: "
                              "Unknown format code 'd' for object of type 'str'")
    assert not (out / "tasks.json").exists()


# --- solve -----------------------------------------------------------------------------------------


def test_solve_never_writes_over_its_likelihoods(tmp_path, capsys):
    lik = _likelihoods(tmp_path / "L.npz")
    before = lik.read_bytes()
    assert main(["solve", "--likelihoods", str(lik), "--out", str(lik), *SOLVE]) == 2
    assert _error(capsys) == (f"--out: {lik} is the input --likelihoods ({lik}); writing it would destroy the "
                              f"input, so choose another --out")
    os.symlink(lik, tmp_path / "alias.json")  # the same file by another name
    assert main(["solve", "--likelihoods", str(lik), "--out", str(tmp_path / "alias.json"), *SOLVE]) == 2
    assert "is the input --likelihoods" in _error(capsys)
    assert lik.read_bytes() == before


def test_solve_refuses_a_negative_min_weight(tmp_path, capsys):
    lik = _likelihoods(tmp_path / "L.npz")
    assert main(["solve", "--likelihoods", str(lik), "--out", str(tmp_path / "m.json"), *SOLVE,
                 "--min-weight", "-1"]) == 2
    assert _error(capsys) == "energy.min_weight: must be in [0, 1] (a share of the mixture), got -1.0"
    assert main(["solve", "--likelihoods", str(lik), "--out", str(tmp_path / "m.json"), *SOLVE,
                 "--lam", "nan"]) == 2
    assert _error(capsys) == "energy.lam: must be a finite number, got nan"
    assert not (tmp_path / "m.json").exists()


def _signal(**given):
    """Every signal array the estimate stage writes, with ``given`` ones in place."""
    arrays = {k: np.ones(2) for k in SIGNAL_ARRAYS}
    arrays["base_loglik_sum"] = np.array([-50.0, -60.0])
    return {**arrays, **{k: np.asarray(v) for k, v in given.items()}}


@pytest.mark.parametrize("arrays, message", [
    ({"tasks": np.array(["a", "b"]), "loglik_sum": np.array([[-10.0, 3.5], [-20.0, -10.0]]), "count": [10, 10]},
     "loglik_sum[0, 1] (proxy 'a' on task 'b') is 3.5 > 0, but a sum of log-likelihoods is <= 0 "
     "(saved -log p instead of log p?)"),
    ({"tasks": np.array(["a", "b"]), "loglik_sum": -np.ones((2, 2)), "count": [10, 10],
      **_signal(base_loglik_sum=[-50.0, np.nan])},
     "base_loglik_sum[1] (task 'b') is nan, not a finite number"),
    ({"tasks": np.array(["a", "b"]), "loglik_sum": -np.ones((2, 2)), "count": [10, 10],
      **_signal(information_sum=[np.inf, 1.0])},
     "information_sum[0] (task 'a') is inf, not a finite number"),
    ({"tasks": np.array(["a", "b"]), "loglik_sum": -np.ones((2, 2)), "count": [10, 10],
      **_signal(base_loglik_sum=[-5.0, 2.0])},
     "base_loglik_sum[1] (task 'b') is 2 > 0, but a sum of log-likelihoods is <= 0"),
    ({"tasks": np.array(["a", "b"]), "loglik_sum": np.array([["-1", "-2"], ["-3", "-4"]]), "count": [10, 10]},
     "'loglik_sum' must be an array of numbers, got dtype <U2 (shape (2, 2))"),
    ({"tasks": np.array("a"), "loglik_sum": np.array(-1.0), "count": np.array(10)},
     "'tasks' must be a non-empty 1-d array of names (strings), got shape () and dtype <U1"),
    ({"tasks": np.array([1, 2]), "loglik_sum": -np.ones((2, 2)), "count": [10, 10]},
     "'tasks' must be a non-empty 1-d array of names (strings), got shape (2,) and dtype int64"),
    ({"tasks": np.array(["a", "../b"]), "loglik_sum": -np.ones((2, 2)), "count": [10, 10]},
     f"'tasks': '../b' {UNSAFE}"),
])
def test_solve_names_the_file_and_the_cell_of_a_bad_likelihoods_npz(tmp_path, capsys, arrays, message):
    lik = tmp_path / "L.npz"
    np.savez(lik, **{k: np.asarray(v) for k, v in arrays.items()})
    assert main(["solve", "--likelihoods", str(lik), "--out", str(tmp_path / "m.json"), *SOLVE]) == 2
    err = _error(capsys)
    assert err.startswith(f"{lik}: ") and err[len(f"{lik}: "):].startswith(message), err
    assert not (tmp_path / "m.json").exists()


def test_a_completed_cell_may_stray_above_zero_a_measured_one_may_not(tmp_path):
    """Active estimation fills unscored cells by matrix completion: an estimate, not a sum of log p."""
    L = -np.array([[10.0, 20.0], [20.0, 10.0]])
    L[0, 1] = 0.5
    partly = np.array([[1.0, 0.0], [1.0, 1.0]])
    save_likelihoods(str(tmp_path / "ok.npz"), ["a", "b"], L, [10, 10], measured=partly)
    with pytest.raises(BadInput, match=r"loglik_sum\[0, 1\] \(proxy 'a' on task 'b'\) is 0.5 > 0"):
        save_likelihoods(str(tmp_path / "bad.npz"), ["a", "b"], L, [10, 10], measured=np.ones((2, 2)))
    assert not (tmp_path / "bad.npz").exists()


# --- mixture files and exports ---------------------------------------------------------------------


def _mixture(path, weights):
    path.write_text(json.dumps({"format": "taskpgm-mixture/1", "weights": weights}))
    return path


@pytest.mark.parametrize("name", ["../../x", "a\nimport os", "", "-rf", "a b"])
def test_a_mixture_with_an_unsafe_task_name_is_refused_on_read_and_export(tmp_path, name):
    path = _mixture(tmp_path / "m.json", {name: 0.5, "ok": 0.5})
    with pytest.raises(BadInput, match=r"m\.json: task name in 'weights': .* is not a safe name"):
        read_mixture(str(path))
    for to in ("hf", "llamafactory", "axolotl", "megatron", "json"):  # the Python API checks too
        with pytest.raises(BadInput, match=r"^mixture: task name in 'weights': "):
            build_export({"weights": {name: 0.5, "ok": 0.5}, "sizes": {name: 10, "ok": 10}}, to)


def test_hf_script_keeps_odd_dataset_names_inside_string_literals():
    odd = 'data/x"\nimport shutil; shutil.rmtree("/")  # \u2028'
    plain = build_export({"weights": {"a": 0.5, "b": 0.5}}, "hf").text
    text = build_export({"weights": {"a": 0.5, "b": 0.5}}, "hf", names={"a": odd}).text
    tree, plain_tree = ast.parse(text), ast.parse(plain)
    assert [type(n).__name__ for n in tree.body] == [type(n).__name__ for n in plain_tree.body]
    datasets = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "DATASETS")
    assert ast.literal_eval(datasets) == [odd, "b"]
    assert all(line.startswith("#") for line in text.split("\nimport os")[0].splitlines())  # the comment block
    with pytest.raises(BadInput, match=r"^--seed must be a whole number, got '0\)\\nimport os'$"):
        build_export({"weights": {"a": 1.0}}, "hf", seed="0)\nimport os")


def test_export_never_writes_over_its_inputs(tmp_path, capsys):
    mixture = _mixture(tmp_path / "m.json", {"a": 0.5, "b": 0.5})
    before = mixture.read_bytes()
    assert main(["export", str(mixture), "--to", "json", "--out", str(mixture)]) == 2
    assert _error(capsys) == (f"--out: {mixture} is the input MIXTURE_PATH ({mixture}); writing it would destroy "
                              f"the input, so choose another --out")
    names = tmp_path / "names.yaml"
    names.write_text("a: prefix_a\nb: prefix_b\n")
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("a: 10\nb: 20\n")
    assert main(["export", str(mixture), "--to", "megatron", "--names", str(names), "--mean-tokens", str(tokens),
                 "--out", str(tokens)]) == 2
    assert "is the input --mean-tokens" in _error(capsys)
    # a directory --out whose file would be an input: the mixture is DIR/mixture_weights.json itself
    d = tmp_path / "d"
    d.mkdir()
    inside = _mixture(d / "mixture_weights.json", {"a": 0.5, "b": 0.5})
    assert main(["export", str(inside), "--to", "json", "--out", str(d)]) == 2
    assert f"--out: {inside} is the input MIXTURE_PATH" in _error(capsys)
    assert mixture.read_bytes() == before == inside.read_bytes() and tokens.read_text() == "a: 10\nb: 20\n"


def test_llamafactory_export_merges_into_the_users_dataset_info(tmp_path, capsys):
    mixture = _mixture(tmp_path / "m.json", {"a": 0.5, "b": 0.5})
    out = tmp_path / "lf"
    out.mkdir()
    info = out / "dataset_info.json"
    mine = {"mine": {"file_name": "mine.json"}, "a": {"file_name": "a", "columns": {"prompt": "prompt",
                                                                                     "response": "response"},
                                                         "num_samples": 50}}
    info.write_text(json.dumps(mine))
    args = ["export", str(mixture), "--to", "llamafactory", "--num-samples", "100", "--out", str(out)]
    assert main(args) == 0
    assert f"wrote {info} (merged: kept 1 entry already there)" in capsys.readouterr().out
    merged = json.loads(info.read_text())
    assert list(merged) == ["mine", "a", "b"] and merged["mine"] == mine["mine"]
    assert merged["a"]["num_samples"] == 50 and merged["b"]["num_samples"] == 50
    assert sorted(os.listdir(out)) == ["dataset_info.json", "mixture_llamafactory.yaml"]  # no temporaries left

    # an entry of the same name that differs is the user's: refused, and nothing is written
    (out / "mixture_llamafactory.yaml").unlink()
    assert main([*args[:-4], "--num-samples", "300", "--out", str(out)]) == 2
    assert _error(capsys) == (f"{info}: already has an entry 'a' that differs from this export's ('num_samples' is "
                              f"50 there, 150 in this export); remove that entry or choose another --out directory")
    assert json.loads(info.read_text()) == merged and not (out / "mixture_llamafactory.yaml").exists()

    for text, message in (
        ("[1, 2]", f"{info}: exists but is not a JSON object {{dataset name: entry}} as LLaMA-Factory's "
                   f"dataset_info.json is; fix the file or choose another --out directory"),
        ("{oops", f"{info}: exists but is not valid JSON (Expecting property name enclosed in double quotes: "
                  f"line 1 column 2 (char 1)); the export merges its entries into it: fix the file or choose "
                  f"another --out directory"),
    ):
        info.write_text(text)
        assert main(args) == 2
        assert _error(capsys) == message
        assert info.read_text() == text


# --- flags and train -------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["solve", "--bogus"], "No such option '--bogus'"),
    (["solve"], "Missing option '--likelihoods'"),
    (["export", "m.json", "--to", "nope"], "Invalid value for '--to': 'nope' is not one of"),
    (["solve", "--likelihoods", "L.npz", "--out", "m.json", "--budget", "x"], "'x' is not a valid integer"),
    (["solve", "--likelihoods", "missing.npz", "--out", "m.json"], "'missing.npz' does not exist"),
    (["nosuchcommand"], "No such command 'nosuchcommand'"),
])
def test_flag_errors_exit_2_like_other_bad_input(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    _likelihoods(tmp_path / "L.npz")
    _mixture(tmp_path / "m.json", {"a": 1.0})
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Error: " in err and message in err, err


@pytest.mark.parametrize("mixture, message", [
    (None, "mixture file not found: {path}"),
    ("{not json", "{path}: not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
                  "(char 1))"),
    ('{"format": "other/1", "weights": {"a": 1}}', "{path}: field 'format' must be 'taskpgm-mixture/1', got 'other/1'"),
])
def test_train_checks_its_mixture_before_loading_tasks_or_writing_anything(tmp_path, capsys, mixture, message):
    path = tmp_path / "mixture.json"
    if mixture is not None:
        path.write_text(mixture)
    run = tmp_path / "run"
    assert main(["train", "--test-mode", "--output-dir", str(run), "--mixture", str(path)]) == 2
    assert _error(capsys) == message.format(path=path)
    assert not run.exists()  # no logs/, no synthetic data, no tokenizer

"""Bad input may not damage, and is refused naming the culprit (issue 23, items 5 and 6).

Every case is one line on stderr and exit code 2 (``BadInput``), or a ``pytest.raises(match=...)`` on the function the
command calls. No Ray: the CLI runs in-process, and nothing here trains.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import typing

import numpy as np
import pytest

from taskpgm_ray.cli import main
from taskpgm_ray.config import Config, ConfigError, config_from_dict
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


# --- the audit's finds (benchmarks/input_audit.py) -----------------------------------------------------------------


def _numeric_fields(cls=Config, prefix=""):
    """(dotted path, a negative value of the field's type) for every number of every config section (lists of
    numbers included), except seeds and tasks' utility, where any number is fine."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal") or f.name in ("tasks", "evaluation", "seed", "utility"):
            continue
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        tp, item = args[0], (typing.get_args(args[0]) or [None])[0]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, f"{prefix}{f.name}.")
        elif tp in (int, float):
            yield f"{prefix}{f.name}", tp(-1)
        elif typing.get_origin(tp) is list and item in (int, float):
            yield f"{prefix}{f.name}", [item(-1), item(1)]


@pytest.mark.parametrize("field, value", list(_numeric_fields()))
def test_every_numeric_field_of_every_section_refuses_a_negative_value(field, value):
    base = {"tasks": [{"name": "a", "source": "jsonl", "path": __file__}]}
    with pytest.raises(ConfigError) as e:
        config_from_dict(base, overrides={field: value})
    assert any(p.startswith(f"{field}") or p.startswith(f"{field}[0]") for p in e.value.problems), e.value.problems


@pytest.mark.parametrize("override, message", [
    ({"probes.lora_alpha": 0}, "probes.lora_alpha: must be > 0, got 0.0"),
    ({"train.lr": 0}, "train.lr: must be > 0, got 0.0"),
    ({"estimation.batch_size": 0}, "estimation.batch_size: must be >= 1, got 0"),
    ({"estimation.jsd_top_k": 0}, "estimation.jsd_top_k: must be >= 1, got 0"),
    ({"estimation.stop_when_stable": {"patience": 0}}, "estimation.stop_when_stable.patience: must be >= 1, got 0"),
    ({"estimation.stop_when_stable": {"min_fraction": 2}},
     "estimation.stop_when_stable.min_fraction: must be in [0, 1], got 2.0"),
    ({"model.tiny.num_layers": 0}, "model.tiny.num_layers: must be >= 1, got 0"),
    ({"tune.trial_steps": 0}, "tune.trial_steps: must be >= 1, got 0"),
    ({"tune.max_concurrent": 0}, "tune.max_concurrent: must be >= 1, got 0"),
    ({"tune.taus": [1.0, 0]}, "tune.taus[1]: must be > 0, got 0.0"),
    ({"tune.budgets": [0]}, "tune.budgets[0]: must be >= 1, got 0"),
    ({"train..steps": 5}, "train..steps: an empty name between dots; write the field as section.field, e.g. "
                          "train.steps"),
])
def test_config_refuses_zero_where_a_field_needs_a_positive_number(override, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"tasks": [{"name": "a", "source": "jsonl", "path": __file__}]}, overrides=override)
    assert str(e.value) == message


def test_a_key_given_twice_in_a_config_or_a_spec_is_refused_not_silently_overridden(tmp_path, capsys):
    cfg = _config(tmp_path, "tasks:\n  - {name: a, source: jsonl, path: a.jsonl}\ntrain: {steps: 5}\n"
                            "train: {steps: 6}\n")
    assert main(["config", "show", str(cfg)]) == 2
    assert _error(capsys) == f"{cfg}: invalid YAML at line 5, column 1: key 'train' is given twice in the same mapping"
    spec = tmp_path / "s.yaml"
    spec.write_text("format: taskpgm-suite-spec/1\ntasks:\n  - {name: a, skill: copy, template: '{x}', size: 10, "
                    "size: 20}\n")
    assert main(["tasks", "synth", "--spec", str(spec), "--out", str(tmp_path / "out")]) == 2
    assert _error(capsys) == f"{spec}: invalid YAML at line 3, column 55: key 'size' is given twice in the same mapping"
    assert not (tmp_path / "out").exists()


def test_a_non_utf8_spec_is_one_line_exit_2(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_bytes(b"format: taskpgm-suite-spec/1\nalphabet: caf\xe9\n")
    assert main(["tasks", "synth", "--spec", str(spec), "--out", str(tmp_path / "out")]) == 2
    assert _error(capsys) == f"{spec}: not a UTF-8 text file (byte 42 is b'\\xe9'); save the spec as UTF-8 YAML"


@pytest.mark.parametrize("jsd_sum, message", [
    (np.ones((2, 3)), "'jsd_sum' must have shape (2, 2) for 2 tasks, got (2, 3)"),
    (np.array([[0.0, np.nan], [0.1, 0.0]]), "jsd_sum[0, 1] (proxy 'a' on task 'b') is nan, but a sum of "
                                            "Jensen-Shannon divergences is a finite number >= 0"),
    (np.array([[0.0, 0.1], [-0.1, 0.0]]), "jsd_sum[1, 0] (proxy 'b' on task 'a') is -0.1, but a sum of "
                                          "Jensen-Shannon divergences is a finite number >= 0"),
])
def test_solve_names_the_cell_of_a_bad_jsd_npz(tmp_path, capsys, jsd_sum, message):
    lik = _likelihoods(tmp_path / "L.npz")
    np.savez(tmp_path / "jsd.npz", tasks=np.array(["a", "b"]), jsd_sum=jsd_sum, token_count=np.int64(100))
    assert main(["solve", "--likelihoods", str(lik), "--out", str(tmp_path / "m.json"), *SOLVE,
                 "--affinity", "jsd"]) == 2
    assert _error(capsys) == f"{tmp_path / 'jsd.npz'}: {message}"
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("flags, message", [
    (["--min-weight", "0.9"], "energy.min_weight 0.9: 2 tasks with at least that much each need 1.8 > 1 of the "
                              "mixture; lower it to at most 1/2 = 0.5"),
    (["--max-weight", "0.1"], "energy.max_weight 0.1: the upper bounds of 2 tasks add up to 0.2 < 1, so no mixture "
                              "fits under them; raise it to at least 1/2 = 0.5"),
    (["--max-weight", "0.6", "--budget", "1"], "energy.max_weight 0.6: the upper bounds of energy.budget's 1 tasks "
                                               "add up to 0.6 < 1, so no mixture fits under them; raise it to at least "
                                               "1/1 = 1"),
])
def test_solve_refuses_bounds_no_mixture_meets(tmp_path, capsys, flags, message):
    lik = _likelihoods(tmp_path / "L.npz")
    assert main(["solve", "--likelihoods", str(lik), "--out", str(tmp_path / "m.json"), *SOLVE, *flags]) == 2
    assert _error(capsys) == message
    assert not (tmp_path / "m.json").exists()


def test_sigterm_is_one_line_exit_143_and_the_handler_is_put_back(monkeypatch, capsys):
    import taskpgm_ray.tasks.worlds as worlds

    def terminated(seed):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not interrupt the command")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(worlds, "world_yaml", terminated)
    assert main(["tasks", "world", "3"]) == 143
    assert capsys.readouterr().err == "taskpgm: terminated\n"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_ctrl_c_during_the_clean_up_waits_until_it_is_done(tmp_path, monkeypatch):
    import shutil

    from taskpgm_ray.tasks import synthetic

    spec = tmp_path / "spec.yaml"
    spec.write_text("format: taskpgm-suite-spec/1\neval_size: 4\ntasks:\n"
                    "  - {name: a, skill: copy, template: 'c {x}', size: 10}\n")
    synthetic.write_suite(tmp_path / "suite", 1, spec=spec)
    real = shutil.rmtree

    def interrupted_again(path, *args, **kwargs):  # Ctrl-C pressed again while the clean-up runs
        os.kill(os.getpid(), signal.SIGINT)
        return real(path, *args, **kwargs)

    def first_ctrl_c(*args):
        monkeypatch.setattr(synthetic.shutil, "rmtree", interrupted_again)
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_examples", first_ctrl_c)
    # Another thread in the process (as Ray's are after a Ray test) may receive the signal: it is still held.
    done = threading.Event()
    threading.Thread(target=done.wait, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            synthetic.write_suite(tmp_path / "suite", 2, spec=spec)
    finally:
        done.set()
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml", "suite"]  # no .suite.incomplete-* left
    assert json.loads((tmp_path / "suite" / "suite.json").read_text())["seed"] == 1


@pytest.mark.parametrize("sig, code, line", [(signal.SIGINT, 130, "taskpgm: aborted"),
                                             (signal.SIGTERM, 143, "taskpgm: terminated")])
def test_a_signal_during_synth_leaves_no_temporary_and_the_earlier_suite_whole(tmp_path, sig, code, line):
    """A real signal to a real process (what Ctrl-C or `kill` sends), in the middle of writing a suite over one
    written earlier: the earlier suite is left as it was, and no hidden folder stays behind."""
    out = tmp_path / "suite"
    assert main(["tasks", "synth", "--out", str(out), "--seed", "1", "--scale", "0.05"]) == 0
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = subprocess.Popen([sys.executable, "-m", "taskpgm_ray.cli", "tasks", "synth", "--out", str(out), "--seed",
                             "2", "--scale", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while proc.poll() is None and not list(tmp_path.glob(".suite.incomplete-*/*")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code and err.strip().splitlines()[-1] == line, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["suite"]
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

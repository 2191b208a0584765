"""The `taskpgm` command as a user meets it: help, one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import datasets
import pytest

from taskpgm_ray.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "taskpgm_ray.cli", *args], capture_output=True, text=True)


# CONTRACT.md's command table: each command and words of its "does" column that its one-line help must say.
CONTRACT_COMMANDS = {
    ("run",): ["the whole pipeline"],
    ("tasks",): ["the tasks a config resolves to", "synthetic benchmark suite"],
    ("tasks", "list"): ["task"],
    ("tasks", "synth"): ["synthetic benchmark suite as HF"],
    ("probe",): ["stage 2", "proxy fine-tune"],
    ("estimate",): ["likelihood"],
    ("solve",): ["stage 5 alone", "saved likelihood matrix"],
    ("train",): ["stage 6", "fine-tune", "mixture"],
    ("tune",): ["stage 7", "energy hyperparameters"],
    ("report",): ["plots and tables of a finished run"],
    ("export",): ["the mixture in another framework's format"],
    ("compare",): ["uniform, size and temperature", "same budget", "scored on the test split"],
}


def _listed(help_text: str) -> dict[str, str]:
    """The Commands section of a click help page: name -> the description shown."""
    section = help_text.split("Commands:\n", 1)[1]
    return {m[0]: m[1].strip() for m in (line.strip().split(None, 1) for line in section.splitlines()) if len(m) == 2}


def test_help_lists_commands():
    """Every command of CONTRACT.md's table is in `taskpgm --help` (and `taskpgm tasks --help`) with its one-line
    description: whole on a wide terminal, its beginning on a standard one, and saying what the table says."""
    from click.testing import CliRunner

    from taskpgm_ray.cli import cli

    p = run("--help")  # the installed entry point, 80 columns: descriptions may end in "..."
    assert p.returncode == 0, p.stderr
    for path, words in CONTRACT_COMMANDS.items():
        parent = cli
        for name in path[:-1]:
            parent = parent.commands[name]
        command = parent.commands.get(path[-1])
        assert command is not None, f"taskpgm {' '.join(path)}: no such command"
        description = command.get_short_help_str(limit=10**6)
        for w in words:
            assert w.lower() in description.lower(), f"taskpgm {' '.join(path)}: {description!r} does not say {w!r}"
        wide = CliRunner().invoke(cli, [*path[:-1], "--help"], terminal_width=200, max_content_width=200)
        assert wide.exit_code == 0, wide.output
        assert _listed(wide.output).get(path[-1]) == description, (path, wide.output)
        if len(path) == 1:
            shown = _listed(p.stdout).get(path[0])
            assert shown and description.startswith(shown.removesuffix("...")), (path, p.stdout)


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
    cfg = _two_tasks(tmp_path)  # a config that exists and loads: only the combination is wrong
    assert main(["tasks", "list", str(cfg), "--test-mode"]) == 2
    err = capsys.readouterr().err
    assert "Error: give CONFIG or --test-mode, not both" in err and "not found" not in err
    # a missing config file is another bad input, with its own message
    assert main(["tasks", "list", str(tmp_path / "x.yaml")]) == 2
    assert capsys.readouterr().err == f"taskpgm: error: config file not found: {tmp_path / 'x.yaml'}\n"


README_L = [[-1.2, -1.35, -2.6], [-1.3, -1.1, -2.5], [-2.4, -2.3, -0.9]]  # mean log-likelihoods, README's example


def _likelihoods(path):
    import numpy as np

    from taskpgm_ray.mixture_file import save_likelihoods

    L = np.array(README_L) * 10
    save_likelihoods(str(path), ["math", "algebra", "chat"], L, np.array([10, 10, 10]),
                     np.array([50000, 20000, 5000]))
    return path


def _paper_energy_by_slsqp(L, *, beta: float, lam: float, eps: float):
    """The paper's energy for mean log-likelihoods ``L`` from DESIGN.md's formulas, minimised on the simplex by
    scipy's SLSQP: ``(p, K, u)`` with E(p) = (lam / 2) p^T K p - beta u^T p.

    PMI S[a, b] = ((L[a, b] - L[b, b]) + (L[b, a] - L[a, a])) / 2; K = S shifted to PSD by its most negative
    eigenvalue, plus eps on the diagonal; u = the row sums of K (representativeness)."""
    import numpy as np
    from scipy.optimize import minimize

    L = np.asarray(L, dtype=float)
    n = len(L)
    S = np.array([[((L[a, b] - L[b, b]) + (L[b, a] - L[a, a])) / 2 for b in range(n)] for a in range(n)])
    K = S + (max(0.0, -np.linalg.eigvalsh(S).min()) + eps) * np.eye(n)
    u = K.sum(1)
    res = minimize(lambda p: lam / 2 * p @ K @ p - beta * u @ p, np.full(n, 1 / n),
                   jac=lambda p: lam * K @ p - beta * u, method="SLSQP", bounds=[(0.0, 1.0)] * n,
                   constraints=[{"type": "eq", "fun": lambda p: p.sum() - 1, "jac": lambda p: np.ones(n)}],
                   options={"ftol": 1e-12, "maxiter": 1000})
    assert res.success, res.message
    return res.x, K, u


def _kkt_violation(p, grad) -> float:
    """The largest violation of the KKT conditions of min E(p) on the simplex at ``p`` (``grad`` = dE/dp): p >= 0
    summing to 1; grad_i = -nu where p_i > 0 (stationarity, complementary slackness) and grad_i + nu = mu_i >= 0
    where p_i = 0 (dual feasibility of the bound's multiplier)."""
    import numpy as np

    p, grad = np.asarray(p, dtype=float), np.asarray(grad, dtype=float)
    support = p > 1e-9
    nu = -grad[support].mean()
    return float(max(abs(p.sum() - 1), max(0.0, -p.min()), np.abs(grad[support] + nu).max(),
                     max(0.0, -(grad[~support] + nu).min(initial=0.0))))


def test_the_reference_solve_and_kkt_check_catch_a_wrong_mixture():
    """The two checks the golden test leans on: each rejects what a wrong solver would return."""
    import numpy as np

    ref, K, u = _paper_energy_by_slsqp(README_L, beta=1.0, lam=1.0, eps=1e-6)
    assert _kkt_violation(ref, K @ ref - u) < 1e-6
    for wrong in (np.full(3, 1 / 3), ref + np.array([0.01, -0.01, 0.0]), np.array([0.5, 0.5, 0.0])):
        assert _kkt_violation(wrong, K @ wrong - u) > 1e-4 and np.abs(wrong - ref).max() > 1e-3
    # an active bound (beta 3: chat is left out): its multiplier's sign decides
    sparse, K3, u3 = _paper_energy_by_slsqp(README_L, beta=3.0, lam=1.0, eps=1e-6)
    assert _kkt_violation(sparse, K3 @ sparse - 3.0 * u3) < 1e-6 and sparse[2] < 1e-9 < sparse[:2].min()
    for wrong in (np.array([0.0, 0.4, 0.6]), np.eye(3)[2], np.array([0.5, 0.5, 0.0])):
        assert _kkt_violation(wrong, K3 @ wrong - 3.0 * u3) > 1e-4


def test_solve_writes_the_contract_mixture_and_exports_round_trip(tmp_path, capsys):
    import numpy as np

    from taskpgm_ray.exporters import parse_export
    from taskpgm_ray.mixture_file import read_mixture

    lik = _likelihoods(tmp_path / "L.npz")
    out = tmp_path / "m.json"
    paper = ["--kernel", "psd", "--unary", "representativeness", "--no-normalize", "--prior", "none", "--floor", "0"]
    assert main(["solve", "--likelihoods", str(lik), "--out", str(out), "--beta", "1", "--lam", "1", *paper]) == 0
    mix = read_mixture(str(out))
    assert mix["method"] == "taskpgm" and mix["affinity"] == "pmi" and mix["kkt_residual"] < 1e-9
    assert list(mix["weights"]) == ["math", "algebra", "chat"]
    # against an independent solve of the paper's energy, built from DESIGN.md's formulas (not the package's)
    w = np.array(list(mix["weights"].values()))
    ref, K, u = _paper_energy_by_slsqp(README_L, beta=1.0, lam=1.0, eps=1e-6)
    assert np.abs(w - ref).max() < 1e-6, (w, ref)
    assert mix["energy"] == pytest.approx(0.5 * w @ K @ w - u @ w, abs=1e-12)
    assert _kkt_violation(w, K @ w - u) < 1e-9  # the CLI's own weights: optimal, not just close to SLSQP's
    assert [round(x, 3) for x in ref] == [0.395, 0.413, 0.192]  # and the README's worked example says so
    assert mix["sizes"] == {"math": 50000, "algebra": 20000, "chat": 5000}
    # megatron blends tokens: with equal mean tokens per example the token shares are the example shares
    (tmp_path / "tokens.yaml").write_text("math: 100\nalgebra: 100\nchat: 100\n")
    for fmt in ("hf", "llamafactory", "megatron", "json"):
        capsys.readouterr()
        extra = ["--mean-tokens", str(tmp_path / "tokens.yaml")] if fmt == "megatron" else []
        assert main(["export", str(out), "--to", fmt, *extra]) == 0
        back = parse_export(capsys.readouterr().out, fmt)
        tol = 1e-4 if fmt == "llamafactory" else 1e-9  # llamafactory: whole examples (26,041 in all here)
        assert all(abs(back[t] - w) < tol for t, w in mix["weights"].items()), fmt


def test_solve_gives_an_output_only_task_the_floor_only_when_told_to(tmp_path):
    """The largest task's proxy learned its answers (base NLL 60 -> 9) but no input dependence: noise, or a skill
    beyond the proxy. By default `taskpgm solve` keeps its prior share; --skip-output-only pays it only the floor."""
    import numpy as np

    from taskpgm_ray.mixture_file import read_mixture, save_likelihoods

    L = np.array([[-1.2, -1.35, -2.6, -3.0], [-1.3, -1.1, -2.5, -3.1], [-2.4, -2.3, -0.9, -2.8],
                  [-2.0, -2.1, -2.2, -0.9]]) * 10
    count = np.full(4, 10)
    info = np.array([12.0, 11.0, 9.0, 0.1])  # summed over 10 examples, each at most log 4
    signal = {"base_loglik_sum": np.full(4, -600.0), "information_sum": info, "base_information_sum": np.zeros(4),
              "information_count": count, "information_sq_sum": np.array([15.0, 13.0, 10.0, 3.0]),
              "information_bound_sum": np.full(4, 10 * np.log(4)), "information_tokens": np.full(4, 40)}
    save_likelihoods(str(tmp_path / "L.npz"), ["math", "algebra", "chat", "noise"], L, count,
                     np.array([5000, 2000, 500, 50000]), **signal)
    weights = {}
    for flag in ((), ("--skip-output-only",), ("--no-skip-output-only",)):
        out = tmp_path / f"{'-'.join(flag) or 'default'}.json"
        assert main(["solve", "--likelihoods", str(tmp_path / "L.npz"), "--out", str(out), *flag]) == 0
        weights[flag] = read_mixture(str(out))["weights"]["noise"]
    assert weights[("--skip-output-only",)] < 1.05 * 0.2 / 4 < 2 * 0.2 / 4 < weights[()], weights
    assert weights[()] == weights[("--no-skip-output-only",)]


def test_solve_budget_and_bad_input(tmp_path, capsys):
    from taskpgm_ray.mixture_file import read_mixture

    lik = _likelihoods(tmp_path / "L.npz")
    out = tmp_path / "m.json"
    assert main(["solve", "--likelihoods", str(lik), "--out", str(out), "--budget", "2"]) == 2
    assert capsys.readouterr().err == (
        f"taskpgm: error: {lik}: --unary information needs the signal arrays that `taskpgm estimate` writes "
        f"(base_loglik_sum, information_sum, ...); use --unary representativeness for this file\n")
    assert main(["solve", "--likelihoods", str(lik), "--out", str(out), "--budget", "2",
                 "--unary", "representativeness"]) == 0
    assert sum(w > 0 for w in read_mixture(str(out))["weights"].values()) <= 2
    assert main(["solve", "--likelihoods", str(lik), "--out", str(out), "--kernel", "exp", "--tau", "0"]) == 2
    assert "energy.tau: must be > 0, got 0.0" in capsys.readouterr().err
    assert main(["solve", "--likelihoods", str(tmp_path / "nope.npz"), "--out", str(out)]) == 2
    assert main(["solve", "--likelihoods", str(lik), "--out", str(out), "--affinity", "jsd"]) == 2


# --- bad input at the edges (issue 13) and exports as a user runs them (issue 15) ----------------------


def _four_tasks(path):
    import numpy as np

    from taskpgm_ray.mixture_file import save_likelihoods

    L = -np.array([[1.0, 2.0, 3.0, 2.5], [2.0, 1.0, 2.5, 3.0], [3.0, 2.5, 1.0, 2.0], [2.5, 3.0, 2.0, 1.0]]) * 10
    save_likelihoods(str(path), ["a", "b", "c", "d"], L, np.array([10, 10, 10, 10]), np.array([100, 200, 300, 400]))
    return path


def test_solve_refuses_negative_beta_and_a_budget_over_the_task_count(tmp_path, capsys):
    lik = _four_tasks(tmp_path / "L.npz")
    out = tmp_path / "m.json"
    assert main(["solve", "--likelihoods", str(lik), "--out", str(out), "--beta", "-1"]) == 2
    assert capsys.readouterr().err == (
        "taskpgm: error: --beta must be >= 0, got -1 (a negative beta turns the unary term upside down)\n")
    assert main(["solve", "--likelihoods", str(lik), "--out", str(out), "--budget", "9"]) == 2
    assert capsys.readouterr().err == (
        f"taskpgm: error: --budget must be at most the number of tasks (4 in {lik}), got 9\n")
    assert not out.exists()
    assert main(["solve", "--likelihoods", str(lik), "--out", str(out), "--budget", "4", "--unary",
                 "representativeness"]) == 0


def test_solve_names_a_likelihoods_file_that_is_not_a_plain_npz(tmp_path, capsys):
    import numpy as np

    text = tmp_path / "L.npz"
    text.write_text("not numpy\n")
    objects = tmp_path / "objects.npz"
    np.savez(objects, tasks=np.array(["a", {"b": 1}], dtype=object), loglik_sum=-np.ones((2, 2)), count=[1, 1])
    for path, message in (
        (text, f"{text}: not a NumPy .npz archive of plain arrays (as numpy.savez writes)"),
        (objects, f"{objects}: array 'tasks' holds Python objects (pickled data), which are never loaded; "
                  "save names as strings and numbers as numbers"),
    ):
        assert main(["solve", "--likelihoods", str(path), "--out", str(tmp_path / "m.json")]) == 2
        err = capsys.readouterr().err
        assert err == f"taskpgm: error: {message}\n" and "allow_pickle" not in err


def _hand_written(path, weights):
    path.write_text(json.dumps({"format": "taskpgm-mixture/1", "weights": weights}))
    return path


def test_hand_written_mixture_is_accepted_by_export_and_checked_by_train(tmp_path, capsys):
    from taskpgm_ray.config import load_config
    from taskpgm_ray.tasks import load_tasks
    from taskpgm_ray.train import read_mixture_weights, validate_mixture

    suite = ["reverse_a", "reverse_b", "copy", "noise_a", "sort", "add"]
    good = _hand_written(tmp_path / "hand.json", {**{t: 0.2 for t in suite[:5]}, "add": 0.0})
    assert main(["export", str(good), "--to", "hf"]) == 0
    assert "# Left out (weight 0): add" in capsys.readouterr().out
    cfg = load_config(None, test_mode=True)
    assert validate_mixture(read_mixture_weights(good), load_tasks(cfg), cfg)["add"] == 0.0  # train would accept it

    run = ["train", "--test-mode", "--output-dir", str(tmp_path / "run"), "--mixture"]
    cases = [
        ({**{t: 0.2 for t in suite[:5]}, "nope": 0.0},
         f"{tmp_path / 'bad.json'}: 2 problems: mixture: unknown task(s) 'nope' (configured: {', '.join(suite)}); "
         "mixture: no weight for configured task(s) 'add' (give 0 to leave a task out)"),
        ({**{t: 0.25 for t in suite[:4]}, "sort": 0.25, "add": -0.25},
         f"{tmp_path / 'bad.json'}: weights['add'] is negative (-0.25)"),
        ({t: 0.17 for t in suite}, f"{tmp_path / 'bad.json'}: weights sum to 1.02, not 1 (tolerance 1e-6)"),
    ]
    for weights, message in cases:
        bad = _hand_written(tmp_path / "bad.json", weights)
        assert main([*run, str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("taskpgm: error: ") and message in err, err
    assert not (tmp_path / "run" / "train").exists()  # refused before any training


def test_export_with_names_writes_the_files_each_tool_reads(tmp_path, capsys):
    import yaml

    mixture = _hand_written(tmp_path / "m.json", {"math": 0.6, "chat": 0.4, "junk": 0.0})
    (tmp_path / "names.yaml").write_text("math: data/math.jsonl\nchat: {hf_hub_url: org/chat, formatting: sharegpt}\n")
    out = tmp_path / "lf"
    assert main(["export", str(mixture), "--to", "llamafactory", "--names", str(tmp_path / "names.yaml"),
                 "--num-samples", "1000", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'mixture_llamafactory.yaml'}" in printed and "note: left out (weight 0): junk" in printed
    args = yaml.safe_load((out / "mixture_llamafactory.yaml").read_text())
    info = json.loads((out / "dataset_info.json").read_text())
    assert args == {"dataset": "math,chat", "mix_strategy": "concat"}
    assert info["math"]["file_name"] == "data/math.jsonl" and info["math"]["num_samples"] == 600
    assert info["chat"] == {"hf_hub_url": "org/chat", "formatting": "sharegpt", "num_samples": 400}

    summary = tmp_path / "summary.json"  # a run's train/summary.json gives the mean tokens per example
    summary.write_text(json.dumps({"samples_per_task": {"math": 10, "chat": 10}, "tokens_per_task": {"math": 1000,
                                                                                                    "chat": 3000}}))
    (tmp_path / "prefixes.yaml").write_text("math: /data/math_text_document\nchat: /data/chat_text_document\n")
    assert main(["export", str(mixture), "--to", "megatron", "--names", str(tmp_path / "prefixes.yaml"),
                 "--mean-tokens", str(summary), "--out", str(tmp_path / "blend.txt")]) == 0
    tokens = (tmp_path / "blend.txt").read_text().split()  # what --data-args-path reads
    assert tokens[1::2] == ["/data/math_text_document", "/data/chat_text_document"]
    assert [float(w) for w in tokens[0::2]] == [0.6 * 100 / 180, 0.4 * 300 / 180]

    assert main(["export", str(mixture), "--to", "megatron"]) == 2
    assert capsys.readouterr().err == (
        "taskpgm: error: megatron blends token sequences, but this mixture's weights count examples "
        "(weight_unit: examples); give --mean-tokens FILE (task: mean tokens per example, or a run's "
        "train/summary.json) to convert; missing for math, chat\n")
    assert main(["export", str(mixture), "--to", "hf", "--num-samples", "5"]) == 2
    assert "--num-samples applies to --to llamafactory and axolotl, not hf" in capsys.readouterr().err


def test_estimate_without_probes_says_what_to_run(tmp_path, capsys):
    assert main(["estimate", "--test-mode", "--output-dir", str(tmp_path / "run")]) != 0
    err = capsys.readouterr().err
    assert "no finished probe adapter for task(s) 'reverse_a' (expected at " in err
    assert "; run `taskpgm probe CONFIG` (stage 2) or `taskpgm run CONFIG` (every stage) first" in err


# --- --set anywhere, list indices, `taskpgm config show` (issue 17) -----------------------------------


def _two_tasks(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r"}) + "\n"
                                              for i in range(20)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output_dir: runs/x\ntasks:\n  - {name: a, source: jsonl, path: a.jsonl}\n"
                   "  - {name: b, source: jsonl, path: a.jsonl}\n")
    return cfg


def test_set_after_the_command_reaches_a_task_by_index(tmp_path, capsys):
    cfg = _two_tasks(tmp_path)
    out = tmp_path / "r"
    assert main(["tasks", "list", str(cfg), "--set", "tasks.1.max_examples=5", "--output-dir", str(out)]) == 0
    sizes = {t["name"]: sum(t["sizes"].values()) for t in json.loads((out / "tasks.json").read_text())["tasks"]}
    assert sizes == {"a": 20, "b": 5}


def test_config_show_prints_the_resolved_config_and_it_loads_back(tmp_path, capsys):
    import yaml

    from taskpgm_ray.config import load_config

    cfg = _two_tasks(tmp_path)
    assert main(["--set", "train.steps=3", "config", "show", str(cfg), "--set", "train.steps=4",
                 "--set", "tasks.0.max_examples=7", "--output-dir", "runs/y"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["steps"] == 4  # after the command wins over before it
    assert [t["max_examples"] for t in shown["tasks"]] == [7, None]
    assert shown["output_dir"] == "runs/y" and shown["tracking"]["wandb"] is None and "config_path" not in shown
    (tmp_path / "resolved.yaml").write_text(yaml.safe_dump(shown))
    assert load_config(tmp_path / "resolved.yaml").to_dict() == shown


@pytest.mark.parametrize("override, message", [
    ("tasks.2.max_examples=5", "tasks.2.max_examples: index 2 is out of range: tasks has 2 entries (indices 0 to 1)"),
    ("tasks.name=x", "tasks.name: tasks is a list: index it by position, e.g. tasks.0"),
    ("output_dir.x=1", "output_dir.x: output_dir is 'runs/x', not a section or a list"),
    ("tasks.0.max_exampels=5", "tasks[0].max_exampels: unknown key (did you mean 'max_examples'?)"),
])
def test_a_bad_override_is_one_line_naming_the_field(tmp_path, capsys, override, message):
    cfg = _two_tasks(tmp_path)
    assert main(["config", "show", str(cfg), "--set", override]) == 2
    assert capsys.readouterr().err == f"taskpgm: error: {cfg}: {message}\n"


def test_set_needs_key_and_yaml_value(tmp_path, capsys):
    cfg = _two_tasks(tmp_path)
    assert main(["config", "show", str(cfg), "--set", "oops"]) == 2
    assert "Error: Invalid value for --set: expected KEY=VALUE, got 'oops'" in capsys.readouterr().err
    assert main(["run", str(cfg), "--set", "train.steps=[1,"]) == 2
    assert "Error: Invalid value for --set: 'train.steps=[1,': VALUE is not valid YAML" in capsys.readouterr().err


# --- only our own bad-input type is "bad input" (issue 16) ---------------------------------------------


@pytest.mark.parametrize("internal", [KeyError("weights"), ValueError("operands could not be broadcast")])
def test_an_internal_key_or_value_error_is_not_reported_as_bad_input(tmp_path, capsys, monkeypatch, internal):
    import taskpgm_ray.exporters as exporters

    def broken(*args, **kwargs):  # a bug inside the export, not a problem with the user's file
        raise internal

    monkeypatch.setattr(exporters, "build_export", broken)
    mixture = _hand_written(tmp_path / "m.json", {"a": 0.5, "b": 0.5})
    assert main(["export", str(mixture), "--to", "hf"]) == 1
    err = capsys.readouterr().err
    assert err.endswith(f"taskpgm: {type(internal).__name__}: {str(internal)} "
                        "(rerun with --debug for the traceback)\n"), err
    assert "taskpgm: error:" not in err
    with pytest.raises(type(internal)):  # and --debug shows where it came from
        main(["--debug", "export", str(mixture), "--to", "hf"])
    # the same command's own bad-input error is still one line and exit 2
    monkeypatch.undo()
    assert main(["export", str(mixture), "--to", "hf", "--num-samples", "5"]) == 2
    assert capsys.readouterr().err.startswith("taskpgm: error: --num-samples applies to --to llamafactory")

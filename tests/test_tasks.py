"""Task loading from every source format, the synthetic suite, splits and the leak check (real HF datasets)."""

from __future__ import annotations

import json

import datasets
import pytest

from taskpgm_ray.config import config_from_dict
from taskpgm_ray.tasks import TaskError, load_tasks, write_manifest
from taskpgm_ray.tasks.synthetic import SKILLS, SpecError, load_spec, write_suite

ROWS = [{"q": f"question {i}", "a": f"answer {i}", "extra": i} for i in range(40)]


def cfg_for(tmp_path, tasks: list[dict], **extra):
    return config_from_dict({"output_dir": str(tmp_path / "run"), "tasks": tasks, **extra},
                            source=str(tmp_path / "c.yaml"))


@pytest.fixture
def sources(tmp_path):
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_json(str(tmp_path / "t.jsonl"))
    ds.to_parquet(str(tmp_path / "t.parquet"))
    ds.to_csv(str(tmp_path / "t.csv"), index=False)
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(0))}).save_to_disk(str(tmp_path / "dd"))
    ds.save_to_disk(str(tmp_path / "plain"))
    return tmp_path


@pytest.mark.parametrize("source, path", [("jsonl", "t.jsonl"), ("parquet", "t.parquet"), ("csv", "t.csv"),
                                          ("disk", "plain")])
def test_each_source_format(sources, source, path):
    cfg = cfg_for(sources, [{"name": "t", "source": source, "path": path, "prompt_field": "q",
                             "response_field": "a"}])
    (task,) = load_tasks(cfg)
    assert task.sizes == {"train": 32, "probe": 4, "eval": 4}
    everything = sorted(e.prompt for e in task.train + task.probe + task.eval)
    assert everything == sorted(r["q"] for r in ROWS)


def test_same_content_same_hash_across_formats(sources):
    hashes = set()
    for source, path in [("jsonl", "t.jsonl"), ("parquet", "t.parquet"), ("disk", "plain")]:
        cfg = cfg_for(sources, [{"name": "t", "source": source, "path": path,
                                 "prompt_field": "q", "response_field": "a"}])
        hashes.add(load_tasks(cfg)[0].hash)
    assert len(hashes) == 1


def test_templates(sources):
    cfg = cfg_for(sources, [{"name": "t", "source": "jsonl", "path": "t.jsonl",
                             "prompt_template": "Q: {q} ({extra})\nA:", "response_template": " {a}"}])
    ex = load_tasks(cfg)[0].train[0]
    assert ex.prompt.startswith("Q: question ") and ex.prompt.endswith(")\nA:") and ex.response.startswith(" answer ")


def test_missing_field_names_task_and_columns(sources):
    cfg = cfg_for(sources, [{"name": "t", "source": "jsonl", "path": "t.jsonl", "prompt_field": "question"}])
    with pytest.raises(TaskError, match=r"task 't': missing field 'question' in train row 0 \(columns: a, extra, q\)"):
        load_tasks(cfg)


def test_task_empty_after_filtering(tmp_path):
    (tmp_path / "e.jsonl").write_text('{"prompt": "x", "response": ""}\n{"prompt": " ", "response": "y"}\n')
    cfg = cfg_for(tmp_path, [{"name": "empty", "source": "jsonl", "path": "e.jsonl"}])
    with pytest.raises(TaskError, match="task 'empty': no examples left after dropping empty prompts/responses"):
        load_tasks(cfg)


def test_too_few_examples(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"prompt": "x", "response": "y"}\n')
    cfg = cfg_for(tmp_path, [{"name": "small", "source": "jsonl", "path": "s.jsonl"}])
    with pytest.raises(TaskError, match=r"task 'small': 1 examples are too few for 1 probe \+ 1 eval"):
        load_tasks(cfg)


def test_unreadable_file(tmp_path):
    (tmp_path / "bad.parquet").write_text("not parquet")
    cfg = cfg_for(tmp_path, [{"name": "bad", "source": "parquet", "path": "bad.parquet"}])
    with pytest.raises(TaskError, match=r"task 'bad': cannot read parquet source .*bad.parquet"):
        load_tasks(cfg)


def test_validation_split_leak_is_refused(tmp_path):
    ds = datasets.Dataset.from_list([{"prompt": f"p{i}", "response": f"r{i}"} for i in range(20)])
    datasets.DatasetDict({"train": ds, "validation": ds.select([3, 4])}).save_to_disk(str(tmp_path / "leaky"))
    cfg = cfg_for(tmp_path, [{"name": "leaky", "source": "disk", "path": "leaky"}])
    with pytest.raises(TaskError, match=r"task 'leaky': \d validation example\(s\) also appear in train"):
        load_tasks(cfg)


def test_duplicate_rows_never_leak_into_train(tmp_path):
    rows = [{"prompt": f"p{i % 10}", "response": f"r{i % 10}"} for i in range(40)]  # every row 4 times
    datasets.Dataset.from_list(rows).to_json(str(tmp_path / "dup.jsonl"))
    cfg = cfg_for(tmp_path, [{"name": "dup", "source": "jsonl", "path": "dup.jsonl"}])
    t = load_tasks(cfg)[0]
    held = {e.content_hash for e in t.probe + t.eval}
    assert held and not held & {e.content_hash for e in t.train}


def test_hub_while_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from taskpgm_ray.config import ConfigError

    with pytest.raises(ConfigError, match=r"tasks\[0\].source: hub dataset 'org/x' requested while offline"):
        cfg_for(tmp_path, [{"name": "h", "source": "hub", "path": "org/x"}])


def test_suite_structure(suite_dir):
    manifest = json.loads((suite_dir / "suite.json").read_text())
    roles = [t["role"] for t in manifest["tasks"]]
    assert len(roles) >= 12
    assert roles.count("near_duplicate") >= 3 and roles.count("high_value") >= 4
    assert roles.count("low_value") >= 1 and roles.count("noise") >= 1
    sizes = [t["sizes"]["train"] for t in manifest["tasks"]]
    assert max(sizes) / min(sizes) >= 50
    dd = datasets.load_from_disk(str(suite_dir / "sort"))
    assert set(dd) == {"train", "validation", "test"}
    row = dd["train"][0]
    x = row["prompt"].removeprefix("sort: ").removesuffix(" =")
    assert row["response"] == " " + "".join(sorted(x))  # the skill is what it says
    for t in manifest["tasks"]:  # no example shared between a task's splits
        d = datasets.load_from_disk(str(suite_dir / t["name"]))
        prompts = [set(d[s]["prompt"]) for s in ("train", "validation", "test")]
        assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])


def _suite_hashes(tmp_path, seed, name):
    out = tmp_path / name
    write_suite(out, seed, scale=0.1)
    cfg = config_from_dict({"output_dir": str(tmp_path / "r"), "tasks": [
        {"name": t.name, "source": "disk", "path": str(out / t.name)} for t in load_spec().tasks]})
    return [t.hash for t in load_tasks(cfg)]


def test_suite_determinism(tmp_path):
    a = _suite_hashes(tmp_path, 3, "a")
    assert a == _suite_hashes(tmp_path, 3, "b")
    b = _suite_hashes(tmp_path, 4, "c")
    assert all(x != y for x, y in zip(a, b))


def test_test_mode_tasks_and_manifest(tmp_path, test_config_dict):
    test_config_dict["output_dir"] = str(tmp_path / "run")
    cfg = config_from_dict(test_config_dict)
    loaded = load_tasks(cfg)
    assert [t.name for t in loaded] == cfg.synthetic.include
    for t in loaded:
        held = {e.content_hash for e in t.probe + t.eval}
        assert not held & {e.content_hash for e in t.train}, t.name
    path = write_manifest(loaded, cfg.output_dir)
    data = json.loads(path.read_text())
    assert set(data["tasks"][0]) == {"name", "source", "sizes", "hash"}
    assert set(data["tasks"][0]["sizes"]) == {"train", "probe", "eval"}
    assert [t["hash"] for t in data["tasks"]] == [t.hash for t in load_tasks(cfg)]  # stable on reload


SPEC = """
format: taskpgm-suite-spec/1
alphabet: mnopqrst
eval_size: 8
tasks:
  - {name: s1, skill: sort, template: "order {x} ->", size: 40, role: near_duplicate}
  - {name: s2, skill: sort, template: "{x} sorted is", size: 40, role: near_duplicate}
  - {name: junk, skill: random, template: "??? {x}", size: 30, role: noise}
  - {name: sw, skill: swap, template: "swap {x}:", size: 20, role: high_value, score: false}
"""


def test_any_spec_writes_a_suite_and_its_flags_reach_the_tasks(tmp_path):
    (tmp_path / "spec.yaml").write_text(SPEC)
    cfg = config_from_dict({"output_dir": str(tmp_path / "run"),
                            "synthetic": {"spec": "spec.yaml", "seed": 3, "scale": 1.0}},
                           source=str(tmp_path / "c.yaml"))
    loaded = load_tasks(cfg)
    assert [t.name for t in loaded] == ["s1", "s2", "junk", "sw"]
    assert [t.score for t in loaded] == [True, True, False, False]  # noise unscored by default; sw by the spec
    ex = loaded[0].train[0]
    x = ex.prompt.removeprefix("order ").removesuffix(" ->")
    assert set(x) <= set("mnopqrst") and ex.response == " " + "".join(sorted(x))
    sw = loaded[3].train[0]
    x = sw.prompt.removeprefix("swap ").removesuffix(":")
    assert sw.response == " " + x[-1] + x[1:-1] + x[0]


@pytest.mark.parametrize("skill, x, y", [
    ("copy", "abc", "abc"), ("reverse", "abcd", "dcba"), ("sort", "cab", "abc"), ("shift", "akl", "bla"),
    ("rotate", "abcd", "bcda"), ("double", "ab", "aabb"), ("swap", "abcd", "dbca"), ("length", "abcde", "5"),
    ("count", "b in abcbb", "3"), ("add", "12+30", "42")])
def test_each_skill_is_what_it_says(skill, x, y):
    import random

    assert SKILLS[skill].solve(x, random.Random(0), "abcdefghijkl") == y


@pytest.mark.parametrize("old, new, message", [
    ("skill: sort,", "skill: sortt,", "tasks[0].skill: unknown skill 'sortt' (did you mean 'sort'?)"),
    ("order {x} ->", "order {y} ->", "tasks[0].template: must be a string with exactly one '{x}' and no other fields"),
    ("size: 40", "size: -1", "tasks[0].size: must be an integer >= 1, got -1"),
    ("role: near_duplicate", "role: duplicate", "tasks[0].role: must be one of near_duplicate, low_value"),
    ("alphabet: mnopqrst", "alphabet: MNOP", "alphabet: must be at least 4 distinct lowercase letters, got 'MNOP'"),
])
def test_bad_spec_names_the_file_and_field(tmp_path, old, new, message):
    (tmp_path / "spec.yaml").write_text(SPEC.replace(old, new, 1))
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "spec.yaml")
    assert str(info.value).startswith(f"{tmp_path / 'spec.yaml'}: {message}")


def test_missing_spec_is_a_config_error(tmp_path):
    from taskpgm_ray.config import ConfigError

    with pytest.raises(ConfigError, match=r"synthetic.spec: file not found: .*nope.yaml"):
        config_from_dict({"synthetic": {"spec": "nope.yaml"}}, source=str(tmp_path / "c.yaml"))


# --- `taskpgm tasks synth` never damages anything (issue 23 item 5) ------------------------------------


def _synth(tmp_path, out, *extra):
    from taskpgm_ray.cli import main

    spec = tmp_path / "spec.yaml"
    if not spec.exists():
        spec.write_text(SPEC)
    return main(["tasks", "synth", "--out", str(out), "--spec", str(spec), *extra])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("taskpgm: error: ") and err.count("\n") == 1, err
    return err[len("taskpgm: error: "):-1]


def _hidden(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_synth_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "sub" / "data.bin").write_bytes(b"\0\1")
    assert _synth(tmp_path, out) == 2
    assert _one_error_line(capsys) == (
        f"{out}: exists, is not empty and is not a suite written by `taskpgm tasks synth` (no suite.json "
        f"manifest); refusing to replace it: give a new or empty directory")
    assert (out / "notes.txt").read_text() == "keep me" and (out / "sub" / "data.bin").read_bytes() == b"\0\1"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "sub"] and _hidden(tmp_path) == []


def test_synth_replaces_its_own_suite_whole_but_nothing_else(tmp_path, capsys):
    out = tmp_path / "suite"
    assert _synth(tmp_path, out, "--seed", "1") == 0
    first = datasets.load_from_disk(str(out / "s1"))["train"]["prompt"]
    assert _synth(tmp_path, out, "--seed", "2") == 0  # our own earlier suite: replaced
    assert json.loads((out / "suite.json").read_text())["seed"] == 2
    assert datasets.load_from_disk(str(out / "s1"))["train"]["prompt"] != first
    assert _hidden(tmp_path) == []  # no .incomplete-* or .replaced-* left behind
    (out / "notes.txt").write_text("mine")  # a user's file inside: the suite is no longer ours alone
    capsys.readouterr()
    assert _synth(tmp_path, out, "--seed", "3") == 2
    assert _one_error_line(capsys) == (f"{out}: holds notes.txt besides the suite written there earlier; refusing "
                                       f"to replace it: move those away or give a new or empty directory")
    assert (out / "notes.txt").read_text() == "mine" and json.loads((out / "suite.json").read_text())["seed"] == 2


def test_synth_into_an_empty_folder_and_a_file_is_refused(tmp_path):
    from taskpgm_ray.errors import BadInput

    (tmp_path / "empty").mkdir()
    assert _synth(tmp_path, tmp_path / "empty") == 0
    assert (tmp_path / "empty" / "suite.json").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(BadInput, match=r"f: exists and is not a directory; give a new or empty directory"):
        write_suite(tmp_path / "f", 1, spec=tmp_path / "spec.yaml")
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_a_failed_synth_leaves_nothing_and_keeps_the_earlier_suite(tmp_path, monkeypatch, interrupt):
    from taskpgm_ray.tasks import synthetic

    out = tmp_path / "suite"
    (tmp_path / "spec.yaml").write_text(SPEC)
    write_suite(out, 1, spec=tmp_path / "spec.yaml")
    before = sorted(p.name for p in tmp_path.iterdir())
    real, calls = synthetic._examples, []

    def fail_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise interrupt("stop")
        return real(*args)

    monkeypatch.setattr(synthetic, "_examples", fail_on_third)
    with pytest.raises(interrupt):
        write_suite(out, 2, spec=tmp_path / "spec.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no .incomplete-* folder
    assert json.loads((out / "suite.json").read_text())["seed"] == 1
    calls.clear()
    with pytest.raises(interrupt):  # a new folder: nothing at all appears
        write_suite(tmp_path / "new", 2, spec=tmp_path / "spec.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("name", ["..", ".", "../x", ".hidden", "-rf", "a b"])
def test_spec_task_names_are_safe_path_components(tmp_path, capsys, name):
    (tmp_path / "spec.yaml").write_text(SPEC.replace("name: s1,", f"name: {json.dumps(name)},", 1))
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "spec.yaml")
    assert str(info.value).startswith(f"{tmp_path / 'spec.yaml'}: tasks[0].name: {name!r} is not a safe name")
    (tmp_path / "work").mkdir()
    assert _synth(tmp_path, tmp_path / "work" / "out") == 2
    assert "tasks[0].name" in _one_error_line(capsys)
    assert list((tmp_path / "work").iterdir()) == []  # nothing written beside --out, nor --out itself


def test_spec_names_differing_only_in_case_are_duplicates(tmp_path):
    (tmp_path / "spec.yaml").write_text(SPEC.replace("name: s2,", "name: S1,", 1))
    with pytest.raises(SpecError, match=r"tasks\[1\].name: duplicate task name 'S1' \(same folder as 's1' on a "
                                        r"case-insensitive file system\)"):
        load_spec(tmp_path / "spec.yaml")


@pytest.mark.parametrize("edits, message", [
    ({"skill: swap,": "skill: add,", "size: 20": "size: 2490"},
     "tasks[3]: task 'sw' wants 2506 distinct inputs (size 2490 + 2 x eval_size 8), but skill 'add' has at most "
     "2500 with alphabet 'mnopqrst'; lower the size or eval_size"),
    ({"alphabet: mnopqrst": "alphabet: mnop", "size: 40": "size: 5430"},
     "tasks[0]: task 's1' wants 5446 distinct inputs (size 5430 + 2 x eval_size 8), but skill 'sort' has at most "
     "5440 with alphabet 'mnop'; widen the alphabet or lower the size or eval_size"),
])
def test_spec_asking_more_distinct_inputs_than_exist_is_refused(tmp_path, edits, message):
    text = SPEC
    for old, new in edits.items():
        text = text.replace(old, new, 1)
    (tmp_path / "spec.yaml").write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "spec.yaml")
    assert str(info.value) == f"{tmp_path / 'spec.yaml'}: {message}"


def test_scale_beyond_the_inputs_is_refused_before_writing(tmp_path):
    (tmp_path / "spec.yaml").write_text(SPEC.replace("skill: swap,", "skill: add,", 1))
    with pytest.raises(SpecError, match=r"spec.yaml: task 'sw' wants 3016 distinct inputs \(3000 training examples "
                                        r"\(size x scale 150\) \+ 2 x eval_size 8\), but skill 'add' has at most 2500"):
        write_suite(tmp_path / "out", 1, scale=150, spec=tmp_path / "spec.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_input_generation_is_bounded(tmp_path, monkeypatch):
    from taskpgm_ray.tasks import synthetic

    stuck = synthetic.Skill("always the same input", lambda r, a: "aaa", lambda x, r, a: x, lambda a: 10 ** 9)
    monkeypatch.setitem(synthetic.SKILLS, "sort", stuck)  # claims many inputs, returns one: would spin forever
    (tmp_path / "spec.yaml").write_text(SPEC)
    with pytest.raises(SpecError, match=r"synthetic task 's1': drew only 1 distinct inputs of the 56 wanted in 3800 "
                                        r"attempts \(skill 'sort' has at most 1000000000 with alphabet 'mnopqrst'\)"):
        write_suite(tmp_path / "out", 1, spec=tmp_path / "spec.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]

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

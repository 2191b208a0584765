"""Exports read the way each tool reads them: the hf snippet run with the real `datasets`, LLaMA-Factory's
dataset_info.json and training keys, axolotl's `datasets` entries and shard subsets, Megatron's blend.

The formats are those each project documents (see the comment above the exports in taskpgm_ray/exporters/formats.py);
the parsers below follow the tools' own code paths (named in each helper) on small in-memory datasets.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import yaml
from datasets import Dataset, concatenate_datasets
from scipy.stats import chisquare

from taskpgm_ray import exporters as ex

# Two tasks of weight 0 among five: the case that broke the old hf export (issue 15).
WEIGHTS = {"alpaca": 0.45, "noise": 0.0, "gsm8k": 0.35, "junk": 0.0, "code": 0.2}
SIZES = {"alpaca": 3000, "noise": 100, "gsm8k": 1200, "junk": 100, "code": 2000}
KEPT = {t: w for t, w in WEIGHTS.items() if w > 0}
MIXTURE = {"weights": WEIGHTS, "sizes": SIZES, "weight_unit": "examples"}
MEAN_TOKENS = {"alpaca": 120.0, "gsm8k": 200.0, "code": 350.0}


def rows(name: str, n: int) -> Dataset:
    """A small dataset whose every row says where it came from."""
    return Dataset.from_dict({"source": [name] * n, "row": list(range(n)),
                              "prompt": [f"{name} {i}" for i in range(n)], "response": ["x"] * n})


# --- hf: the printed snippet, executed ---------------------------------------------------------------


def run_snippet(text: str) -> dict:
    namespace = {"__name__": "taskpgm_export_test"}
    exec(compile(text, "mixture_hf.py", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("strategy", ["first_exhausted", "all_exhausted"])
def test_hf_snippet_runs_with_real_datasets_and_samples_the_weights(strategy):
    text = ex.export_mixture(MIXTURE, "hf")
    assert "# Left out (weight 0): noise, junk" in text
    ns = run_snippet(text)
    assert ns["DATASETS"] == ["alpaca", "gsm8k", "code"]
    mixed = ns["mix"]({t: rows(t, SIZES[t]) for t in ns["DATASETS"]}, stopping_strategy=strategy)
    counts = Counter(mixed["source"])
    assert set(counts) == set(KEPT)
    if strategy == "first_exhausted":  # the first dataset to run out is the one with the largest need w / N
        assert max(counts.values()) <= max(SIZES.values()) and len(set(mixed["prompt"])) == len(mixed)
    observed = np.array([counts[t] for t in KEPT], dtype=float)
    expected = observed.sum() * np.array(list(KEPT.values())) / sum(KEPT.values())
    assert chisquare(observed, expected).pvalue > 1e-3, (counts, expected)


def test_hf_snippet_runs_as_a_script_on_save_to_disk_folders(tmp_path):
    from datasets import DatasetDict

    names = {}
    for t in KEPT:
        DatasetDict({"train": rows(t, 50)}).save_to_disk(str(tmp_path / t))
        names[t] = str(tmp_path / t)
    script = tmp_path / "mixture_hf.py"
    script.write_text(ex.export_mixture(MIXTURE, "hf", names=names))
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("rows from 3 datasets")


def test_hf_converts_token_weights_to_example_probabilities():
    mixture = {**MIXTURE, "weight_unit": "tokens"}
    with pytest.raises(ValueError, match=r"hf samples examples, but this mixture's weights count tokens .* "
                                         r"missing for alpaca, gsm8k, code"):
        ex.export_mixture(mixture, "hf")
    back = ex.parse_export(ex.export_mixture(mixture, "hf", mean_tokens=MEAN_TOKENS), "hf")
    need = {t: w / MEAN_TOKENS[t] for t, w in KEPT.items()}  # examples that carry the token shares
    for t in KEPT:
        assert back[t] == pytest.approx(need[t] / sum(need.values()), rel=1e-12)


# --- LLaMA-Factory -----------------------------------------------------------------------------------

# hparams/data_args.py: the training keys that choose and mix datasets.
LLAMAFACTORY_DATA_ARGS = {"dataset", "dataset_dir", "mix_strategy", "interleave_probs", "max_samples", "streaming"}
LLAMAFACTORY_SOURCES = ("hf_hub_url", "ms_hub_url", "script_url", "file_name")


def llamafactory_load(args: dict, dataset_info: dict, sources: dict[str, Dataset], seed: int) -> Dataset:
    """LLaMA-Factory's path from `dataset:` to the merged train set (data/parser.py, loader.py, data_utils.py)."""
    assert set(args) <= LLAMAFACTORY_DATA_ARGS, set(args) - LLAMAFACTORY_DATA_ARGS
    np.random.seed(seed)  # transformers.set_seed(training_args.seed) runs before the data is loaded
    parts = []
    for name in args["dataset"].split(","):
        if name not in dataset_info:
            raise ValueError(f"Undefined dataset {name} in dataset_info.json.")
        entry = dataset_info[name]
        source = next(k for k in LLAMAFACTORY_SOURCES if k in entry)  # KeyError if none: as in the parser
        ds = sources[entry[source]]
        n = entry.get("num_samples")
        if n is not None:
            indexes = np.random.permutation(len(ds))[:n]
            if n - len(indexes) > 0:
                indexes = np.concatenate((indexes, np.random.choice(len(ds), n - len(indexes))), axis=0)
            ds = ds.select(indexes)
        parts.append(ds)
    assert args.get("mix_strategy", "concat") == "concat"
    return concatenate_datasets(parts)


def split_llamafactory(text: str) -> tuple[dict, dict]:
    head, info = text.split("# ==> dataset_info.json <==\n")
    return yaml.safe_load(head), json.loads(info)


@pytest.mark.parametrize("num_samples", [None, 9000])
def test_llamafactory_output_loads_as_llamafactory_reads_it(num_samples):
    result = ex.build_export(MIXTURE, "llamafactory", num_samples=num_samples,
                             names={"gsm8k": {"hf_hub_url": "openai/gsm8k", "subset": "main",
                                              "columns": {"prompt": "question", "response": "answer"}}})
    args = yaml.safe_load(result.files["mixture_llamafactory.yaml"])
    info = json.loads(result.files["dataset_info.json"])
    assert (args, info) == split_llamafactory(result.text)
    assert args == {"dataset": "alpaca,gsm8k,code", "mix_strategy": "concat"}
    assert set(info) == set(KEPT) and "noise" not in result.text.split("# Left out (weight 0): noise, junk")[1]
    assert info["gsm8k"] == {"hf_hub_url": "openai/gsm8k", "subset": "main",
                             "columns": {"prompt": "question", "response": "answer"},
                             "num_samples": info["gsm8k"]["num_samples"]}  # the --names entry, kept
    assert info["alpaca"] == {"file_name": "alpaca", "columns": {"prompt": "prompt", "response": "response"},
                              "num_samples": info["alpaca"]["num_samples"]}  # TaskPGM's default columns
    sources = {"alpaca": rows("alpaca", SIZES["alpaca"]), "openai/gsm8k": rows("gsm8k", SIZES["gsm8k"]),
               "code": rows("code", SIZES["code"])}
    merged = llamafactory_load(args, info, sources, seed=42)
    budget = num_samples or 3428  # default: min N_i / w_i = gsm8k 1200 / 0.35, kept whole
    assert len(merged) == budget
    counts = Counter(merged["source"])
    for t, w in KEPT.items():
        assert counts[t] / budget == pytest.approx(w, abs=1 / budget)
    if num_samples is None:  # no example repeats at the default budget
        assert len(set(merged["prompt"])) == len(merged)


def test_llamafactory_needs_a_budget_or_sizes_and_a_source_key():
    with pytest.raises(ValueError, match=r"llamafactory export needs --num-samples N .* no size for task\(s\) a"):
        ex.export_mixture({"weights": {"a": 1.0}}, "llamafactory")
    with pytest.raises(ValueError, match=r"the dataset_info.json entry for 'a' needs one of file_name, hf_hub_url"):
        ex.export_mixture({"weights": {"a": 1.0}}, "llamafactory", num_samples=10, names={"a": {"split": "train"}})
    # a task whose share rounds to no example at this budget is left out like a weight-0 one
    text = ex.export_mixture({"weights": {"a": 0.999, "b": 0.001}}, "llamafactory", num_samples=100)
    assert "# Left out (0 examples at 100 in all): b" in text and "dataset: a\n" in text


# --- axolotl -----------------------------------------------------------------------------------------

# utils/schemas/datasets.py SFTDataset: the keys a `datasets` entry may have (there is no weight).
AXOLOTL_SFT_KEYS = {"path", "split", "type", "input_transform", "shards", "shards_idx", "preprocess_shards",
                    "conversation", "chat_template", "chat_template_jinja", "data_files", "input_format", "name",
                    "ds_type", "field", "field_human", "field_model", "field_messages", "message_field_role",
                    "message_field_content", "message_property_mappings", "message_field_training",
                    "message_field_training_detail", "logprobs_field", "temperature", "roles_to_train",
                    "train_on_eos", "roles", "drop_system_message", "trust_remote_code", "revision"}
AXOLOTL_USER_TYPE_KEYS = {"system_prompt", "system_format", "field_system", "field_instruction", "field_input",
                          "field_output", "format", "no_input_format", "field"}


def axolotl_load(cfg: dict, sources: dict[str, Dataset]) -> Dataset:
    """axolotl's SFT loading (utils/data/sft.py): each entry, shuffled and sharded with the seed, concatenated."""
    seed = cfg.get("seed") or 42
    parts = []
    for entry in cfg["datasets"]:
        assert set(entry) <= AXOLOTL_SFT_KEYS, set(entry) - AXOLOTL_SFT_KEYS
        assert entry.get("type"), "axolotl needs a type"
        if isinstance(entry["type"], dict):
            assert set(entry["type"]) <= AXOLOTL_USER_TYPE_KEYS
        ds = sources[entry["path"]]
        if entry.get("shards"):
            ds = ds.shuffle(seed=seed).shard(num_shards=entry["shards"], index=entry.get("shards_idx", 0))
        parts.append(ds)
    return concatenate_datasets(parts).shuffle(seed=seed)  # shuffle_merged_datasets


@pytest.mark.parametrize("num_samples", [None, 12000])
def test_axolotl_output_loads_as_axolotl_reads_it(num_samples):
    names = {"alpaca": {"path": "tatsu-lab/alpaca", "type": "alpaca"}, "code": "data/code.jsonl"}
    text = ex.export_mixture(MIXTURE, "axolotl", names=names, num_samples=num_samples, seed=3)
    cfg = yaml.safe_load(text)
    assert cfg["seed"] == 3 and {e["path"] for e in cfg["datasets"]} == {"tatsu-lab/alpaca", "gsm8k", "data/code.jsonl"}
    assert all(e["split"] == "train" for e in cfg["datasets"])
    assert {e["ds_type"] for e in cfg["datasets"] if e["path"] == "data/code.jsonl"} == {"json"}
    assert {e["type"] for e in cfg["datasets"] if e["path"] == "tatsu-lab/alpaca"} == {"alpaca"}
    sizes = {"tatsu-lab/alpaca": SIZES["alpaca"], "gsm8k": SIZES["gsm8k"], "data/code.jsonl": SIZES["code"]}
    sources = {p: rows(p, n) for p, n in sizes.items()}
    merged = axolotl_load(cfg, sources)
    counts = Counter(merged["source"])
    shares = ex.parse_export(text, "axolotl", sizes=sizes)
    assert counts == Counter({p: round(s * len(merged)) for p, s in shares.items()})
    budget = num_samples or 3428
    assert abs(len(merged) - budget) <= 3  # a partial dataset may come out a few rows short of its count
    for task, path in (("alpaca", "tatsu-lab/alpaca"), ("gsm8k", "gsm8k"), ("code", "data/code.jsonl")):
        assert counts[path] / len(merged) == pytest.approx(KEPT[task], abs=3e-3)
    if num_samples is None:  # the shards of one dataset are disjoint: no example repeats
        assert len(set(zip(merged["source"], merged["row"]))) == len(merged)
    else:  # 12000 examples need whole copies: every row of gsm8k appears at least 3 times
        assert min(Counter(r for s, r in zip(merged["source"], merged["row"]) if s == "gsm8k").values()) >= 3


# --- Megatron ----------------------------------------------------------------------------------------


def get_blend_from_list(blend: list[str]) -> tuple[list[str], list[float] | None]:
    """megatron/core/datasets/utils.py: a list of prefixes, or a flattened, zipped list of weights and prefixes."""
    if len(blend) % 2 == 1:
        return [p.strip() for p in blend], None
    weights = [float(w) for w in blend[0::2]]
    return [p.strip() for p in blend[1::2]], weights


def test_megatron_blend_is_token_shares_with_prefixes_from_names(tmp_path):
    import shlex

    with pytest.raises(ValueError, match=r"megatron blends token sequences, but this mixture's weights count "
                                         r"examples .* give --mean-tokens FILE .* missing for alpaca, gsm8k, code"):
        ex.export_mixture(MIXTURE, "megatron")
    names = {t: f"/data/{t}_text_document" for t in KEPT}
    result = ex.build_export(MIXTURE, "megatron", names=names, mean_tokens=MEAN_TOKENS)
    line = [x for x in result.text.splitlines() if not x.startswith("#")]
    assert len(line) == 1 and line[0].startswith("--data-path ")
    printed = get_blend_from_list(shlex.split(line[0])[1:])
    from_file = get_blend_from_list(result.files["megatron_data_args.txt"].split())  # --data-args-path
    assert printed == from_file
    prefixes, weights = printed
    assert prefixes == [names[t] for t in KEPT]
    tokens = {t: w * MEAN_TOKENS[t] for t, w in KEPT.items()}  # example share x tokens per example
    for t, w in zip(KEPT, np.array(weights) / sum(weights)):
        assert w == pytest.approx(tokens[t] / sum(tokens.values()), rel=1e-12)
    # a mixture already in tokens is blended as it is
    _, same = get_blend_from_list(ex.build_export({**MIXTURE, "weight_unit": "tokens"}, "megatron").files[
        "megatron_data_args.txt"].split())
    assert same == pytest.approx([w / sum(KEPT.values()) for w in KEPT.values()], rel=1e-15)


# --- every target, with weight-0 tasks -------------------------------------------------------------


@pytest.mark.parametrize("to", ex.EXPORTS)
def test_every_export_leaves_weight_zero_out_and_parses(to):
    result = ex.build_export(MIXTURE, to, mean_tokens=MEAN_TOKENS)
    assert "left out (weight 0): noise, junk" in result.notes
    if to != "json":
        assert "# Left out (weight 0): noise, junk\n" in result.text
    back = ex.parse_export(result.text, to, sizes=SIZES)
    assert set(back) == set(KEPT) and sum(back.values()) == pytest.approx(1.0, abs=1e-12)
    for text in result.files.values():
        assert "noise" not in text.replace("Left out (weight 0): noise, junk", "")


def test_names_must_name_mixture_tasks_and_be_distinct():
    with pytest.raises(ValueError, match=r"--names: task\(s\) 'alpacaa' not in the mixture \(its tasks: alpaca, "):
        ex.export_mixture(MIXTURE, "hf", names={"alpacaa": "x"})
    with pytest.raises(ValueError, match=r"--names: tasks 'alpaca' and 'gsm8k' both map to 'x'"):
        ex.export_mixture(MIXTURE, "hf", names={"alpaca": "x", "gsm8k": "x"})
    with pytest.raises(ValueError, match=r"--names: 'alpaca' maps to a mapping, but --to megatron needs a string"):
        ex.export_mixture(MIXTURE, "megatron", names={"alpaca": {"path": "x"}}, mean_tokens=MEAN_TOKENS)
    with pytest.raises(ValueError, match=r"--num-samples applies to --to llamafactory and axolotl, not hf"):
        ex.export_mixture(MIXTURE, "hf", num_samples=10)


def test_mean_tokens_from_a_mapping_or_a_train_summary(tmp_path):
    (tmp_path / "m.yaml").write_text("alpaca: 120\ngsm8k: 200.5\n")
    assert ex.read_mean_tokens(str(tmp_path / "m.yaml")) == {"alpaca": 120.0, "gsm8k": 200.5}
    summary = {"samples_per_task": {"alpaca": 10, "gsm8k": 4, "noise": 0},
               "tokens_per_task": {"alpaca": 1200, "gsm8k": 800, "noise": 0}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert ex.read_mean_tokens(str(tmp_path / "summary.json")) == {"alpaca": 120.0, "gsm8k": 200.0}
    (tmp_path / "bad.yaml").write_text("alpaca: -3\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: mean tokens for task 'alpaca' must be a number > 0, got -3"):
        ex.read_mean_tokens(str(tmp_path / "bad.yaml"))

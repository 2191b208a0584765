"""Helper of benchmarks/export_check.sh: a small mixture, and each export loaded through the tool's own code.

    python benchmarks/export_check.py make WORK           the mixture, its data and the --names files
    python benchmarks/export_check.py TOOL WORK           TOOL: llamafactory | megatron | axolotl | hf

Each TOOL step runs in that tool's virtualenv and imports only the tool (and this checkout's mixture_file for
the arithmetic of what the export should hold). It prints the tool's version, the functions it called and what
they read back, and exits 1 if a check fails.

Weights are compared with the mixture's after normalisation: within 1e-9 where the format carries weights
(Megatron's blend, the hf PROBABILITIES, json); where it carries whole numbers of examples (LLaMA-Factory's
num_samples, axolotl's dataset entries and shards), the rows the tool loads must be exactly the counts the
export meant (the largest-remainder rounding of weight x budget), so each share is off the weight by less than
1/budget (axolotl: by design a partial dataset may come out up to ~1% of its rows short; printed).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from importlib import metadata

TOL = 1e-9
SEED = 11
# Five tasks, one of weight 0 (left out by every export); weights with all their digits.
SIZES = {"arith": 420, "copy": 260, "sort": 333, "noise": 90, "reverse": 151}
MEAN_LEN = {"arith": 18, "copy": 64, "sort": 37, "noise": 25, "reverse": 51}  # tokens per document, on average

failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {what}")
    if not ok:
        failures.append(what)


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def load_work(work: str) -> dict:
    with open(os.path.join(work, "mixture.json")) as f:
        mixture = json.load(f)
    with open(os.path.join(work, "facts.json")) as f:
        facts = json.load(f)
    kept = {t: w for t, w in mixture["weights"].items() if w > 0}
    total = sum(kept.values())
    return {"mixture": mixture, "kept": {t: w / total for t, w in kept.items()}, **facts}


def doc_lengths(task: str) -> list[int]:
    """Tokens of each document of a task (deterministic, mean MEAN_LEN[task])."""
    return [MEAN_LEN[task] - 5 + (i * 7) % 11 for i in range(SIZES[task])]


def apportion(shares: dict[str, float], total: int) -> dict[str, int]:
    from taskpgm_ray.exporters.context import _apportion

    return _apportion(shares, total)


def finish(tool: str) -> None:
    print(f"{tool}: {'FAILED: ' + '; '.join(failures) if failures else 'all checks passed'}")
    sys.exit(1 if failures else 0)


# --- the mixture --------------------------------------------------------------------------------------


def make(work: str) -> None:
    import random

    import yaml

    rng = random.Random(SEED)
    raw = {t: rng.uniform(0.5, 3.0) for t in SIZES}
    raw["noise"] = 0.0
    weights = {t: v / sum(raw.values()) for t, v in raw.items()}
    mixture = {"format": "taskpgm-mixture/1", "weights": weights, "weight_unit": "examples", "method": None,
               "sizes": SIZES}
    data = os.path.join(work, "data")
    for folder in (data, os.path.join(work, "lf_5000")):  # LLaMA-Factory dataset_dirs: one per export
        os.makedirs(folder)
        for task, n in SIZES.items():
            with open(os.path.join(folder, f"{task}.jsonl"), "w") as f:
                for i in range(n):
                    f.write(json.dumps({"prompt": f"{task} row {i}: do the {task} thing",
                                        "response": f"{task}-{i}"}) + "\n")
    mean_tokens = {t: sum(doc_lengths(t)) / SIZES[t] for t in SIZES}
    files = {
        "mixture.json": json.dumps(mixture, indent=2),
        "names_llamafactory.yaml": yaml.safe_dump({t: f"{t}.jsonl" for t in SIZES}),  # file_name, in dataset_dir
        "names_axolotl.yaml": yaml.safe_dump({t: os.path.join(data, f"{t}.jsonl") for t in SIZES}),
        "names_megatron.yaml": yaml.safe_dump({t: os.path.join(work, "megatron", f"{t}_text_document")
                                               for t in SIZES}),
        "names_hf.yaml": yaml.safe_dump({t: os.path.join(work, "hf", t) for t in SIZES}),
        "mean_tokens.yaml": yaml.safe_dump(mean_tokens),
        "facts.json": json.dumps({"mean_tokens": mean_tokens}),
    }
    for name, text in files.items():
        with open(os.path.join(work, name), "w") as f:
            f.write(text + "\n")
    print(f"== mixture ({work}/mixture.json): {len(SIZES)} tasks, local jsonl data ({data}), weight_unit examples")
    for t, w in weights.items():
        print(f"  {t:8s} weight {w!r:22s} size {SIZES[t]:4d}  mean tokens {mean_tokens[t]:.4f}")


# --- LLaMA-Factory ------------------------------------------------------------------------------------


def llamafactory(work: str) -> None:
    import yaml

    # llamafactory.data.mm_plugin does `import torchaudio` at module level (for audio inputs only). PyPI has no
    # torchaudio for torch 2.13 (newest: 2.11.1), so when none imports, an empty module stands in for it: no
    # audio code runs on this text data.
    try:
        import torchaudio  # noqa: F401

        audio = f"torchaudio {version('torchaudio')}"
    except Exception as e:  # noqa: BLE001 - missing, or built for another torch
        import importlib.machinery
        import types

        for name in [m for m in sys.modules if m == "torchaudio" or m.startswith("torchaudio.")]:
            del sys.modules[name]
        stub = types.ModuleType("torchaudio")
        stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)  # no dist: transformers sees none
        sys.modules["torchaudio"] = stub
        audio = f"torchaudio: an empty stand-in (the real one does not import: {type(e).__name__}: {e})"
    import datasets
    import llamafactory

    datasets.disable_progress_bars()
    from llamafactory.data.loader import _get_merged_dataset
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.hparams import DataArguments, ModelArguments
    from transformers import HfArgumentParser, Seq2SeqTrainingArguments, set_seed

    w = load_work(work)
    kept = w["kept"]
    print(f"llamafactory {llamafactory.__version__} (dist {version('llamafactory')}), transformers "
          f"{version('transformers')}, datasets {version('datasets')}; {audio}")
    for out, budget in (("data", None), ("lf_5000", 5000)):
        dataset_dir = os.path.join(work, out)  # dataset_info.json and the data files, as make() laid them out
        with open(os.path.join(work, out, "mixture_llamafactory.yaml")) as f:
            train_keys = yaml.safe_load(f)
        print(f"\n-- export {out}/ (budget: {'default, from sizes' if budget is None else budget}); training keys "
              f"{train_keys}")
        # The keys go through LLaMA-Factory's own argument dataclass (HfArgumentParser refuses unknown keys;
        # DataArguments.__post_init__ splits `dataset` on commas).
        (data_args,) = HfArgumentParser(DataArguments).parse_dict({**train_keys, "dataset_dir": dataset_dir})
        print(f"  DataArguments: dataset={data_args.dataset} mix_strategy={data_args.mix_strategy} "
              f"interleave_probs={data_args.interleave_probs} max_samples={data_args.max_samples} "
              f"streaming={data_args.streaming}")
        attrs = get_dataset_list(data_args.dataset, data_args.dataset_dir)
        print("  llamafactory.data.parser.get_dataset_list(data_args.dataset, data_args.dataset_dir):")
        for a in attrs:
            print(f"    {a.dataset_name}: load_from={a.load_from} formatting={a.formatting} split={a.split} "
                  f"num_samples={a.num_samples} columns prompt={a.prompt} response={a.response} "
                  f"query={a.query}")
        counts = {t: a.num_samples for t, a in zip(data_args.dataset, attrs)}
        total = sum(counts.values())
        check(list(counts) == list(kept), f"datasets {list(counts)} are the kept tasks {list(kept)} (noise left out)")
        check(data_args.mix_strategy == "concat" and data_args.interleave_probs is None,
              "mix_strategy concat, no interleave_probs: the weights are the num_samples")
        want = apportion(kept, budget or total)
        if budget is None:
            most = min(math.floor(SIZES[t] / s + 1e-9) for t, s in kept.items())
            check(total == most, f"default budget {total} = min over tasks of size/weight = {most}")
        check(counts == want, f"num_samples {counts} = largest-remainder rounding of weight x {budget or total}")
        shares = {t: n / total for t, n in counts.items()}
        err = max(abs(shares[t] - kept[t]) for t in kept)
        check(err < 1 / total, f"num_samples / total vs weights: max |diff| {err:.3g} < 1/{total}")
        # Then the data themselves, loaded by LLaMA-Factory's loader: each file read, num_samples rows drawn
        # (np.random.permutation, seeded by set_seed), aligned to its format, then merged by mix_strategy.
        training_args = Seq2SeqTrainingArguments(output_dir=os.path.join(work, "lf_out"), seed=42, report_to=[])
        model_args = ModelArguments.__new__(ModelArguments)  # only cache_dir / hub tokens are read here
        for name in ("cache_dir", "hf_hub_token", "ms_hub_token", "om_hub_token"):
            setattr(model_args, name, None)
        set_seed(training_args.seed)  # as llamafactory.hparams.parser.get_train_args does before loading data
        merged = _get_merged_dataset(data_args.dataset, model_args, data_args, training_args, stage="sft")
        prompts = [row[0]["content"] for row in merged["_prompt"]]
        got = Counter(p.split(" row ")[0] for p in prompts)
        print(f"  llamafactory.data.loader._get_merged_dataset(..., stage='sft'): {len(merged)} rows, columns "
              f"{merged.column_names}; rows per task {dict(got)}")
        check(dict(got) == counts, "rows loaded per task = num_samples")
        if budget is None:
            check(len(set(prompts)) == len(prompts), "no example repeats at the default budget")
        else:
            distinct = {t: len({p for p in prompts if p.startswith(t + " row ")}) for t in counts}
            check(all(distinct[t] == min(SIZES[t], counts[t]) for t in counts),
                  f"distinct rows per task = min(size, num_samples) {distinct}: every row before any repeats "
                  f"(LLaMA-Factory's permutation, then random choice past the size)")
    finish("llamafactory")


# --- Megatron Core ------------------------------------------------------------------------------------


class _Tokenizer:
    """What GPTDataset reads of a tokenizer (vocab_size, eod, pad) and MegatronDataset hashes (unique_identifiers)."""

    unique_identifiers = {"class": "export_check._Tokenizer"}
    vocab_size = 1000
    eod = 0
    pad = 1
    bos = None
    eos = 0


def megatron(work: str) -> None:
    import shlex

    import megatron.core
    import numpy
    import torch
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
    from megatron.core.datasets.utils import get_blend_from_list, normalize

    w = load_work(w_dir := work)
    kept, mean_tokens = w["kept"], w["mean_tokens"]
    print(f"megatron-core {megatron.core.__version__} (dist {version('megatron-core')}), torch {torch.__version__}")
    # The .bin/.idx pairs, written by megatron's own IndexedDatasetBuilder (as tools/preprocess_data.py does).
    os.makedirs(os.path.join(w_dir, "megatron"), exist_ok=True)
    for task in SIZES:
        prefix = os.path.join(w_dir, "megatron", f"{task}_text_document")
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
        for n in doc_lengths(task):
            builder.add_document(torch.arange(2, 2 + n, dtype=torch.int32) % 997 + 2, [n])
        builder.finalize(prefix + ".idx")
        ds = IndexedDataset(prefix)
        assert len(ds) == SIZES[task] and int(ds.sequence_lengths.sum()) == sum(doc_lengths(task))
    print(f"  wrote {len(SIZES)} .bin/.idx pairs with megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder")

    with open(os.path.join(w_dir, "megatron_printed.txt")) as f:
        line = next(x for x in f.read().splitlines() if x.startswith("--data-path "))
    argv = shlex.split(line)[1:]  # what the shell hands to Megatron-LM's --data-path (nargs='*')
    with open(os.path.join(w_dir, "megatron_data_args.txt")) as f:
        file_words = f.read().split()  # Megatron-LM get_blend_and_blend_per_split: --data-args-path
    blend = get_blend_from_list(argv)
    print(f"  megatron.core.datasets.utils.get_blend_from_list(--data-path words):\n    prefixes {blend[0]}\n"
          f"    weights {blend[1]}")
    check(get_blend_from_list(file_words) == blend, "the --data-args-path file parses to the same blend")
    tokens = {t: s * mean_tokens[t] for t, s in kept.items()}  # example share x tokens per example
    want = {os.path.join(w_dir, "megatron", f"{t}_text_document"): v / sum(tokens.values())
            for t, v in tokens.items()}
    check(blend[0] == list(want), "prefixes are the kept tasks' data prefixes, in order (noise left out)")
    norm = normalize(blend[1])  # what BlendedMegatronDatasetBuilder does with the weights
    err = max(abs(a - b) for a, b in zip(norm, want.values()))
    print(f"  megatron.core.datasets.utils.normalize(weights): {norm}")
    check(err <= TOL, f"normalised blend weights = the mixture's token shares w_i m_i / sum (max |diff| {err:.2g})")

    # The blend built for real: GPTDatasets over the .bin/.idx pairs, blended by BlendedDataset.
    n_samples, seq = 4000, 32
    config = GPTDatasetConfig(random_seed=1234, sequence_length=seq, blend=blend, split="1,0,0",
                              tokenizer=_Tokenizer(), reset_position_ids=False, reset_attention_mask=False,
                              eod_mask_loss=False, path_to_cache=None)  # in memory: a cache wants torch.distributed
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [n_samples, 0, 0], lambda: True, config).build()
    counts = numpy.bincount(train.dataset_index, minlength=len(blend[0]))
    shares = counts / counts.sum()
    print(f"  BlendedMegatronDatasetBuilder(GPTDataset, [{n_samples}, 0, 0], ...).build()[0]: "
          f"{type(train).__name__} of {len(train)} sequences of {seq} tokens; per dataset {counts.tolist()}")
    err = max(abs(a - b) for a, b in zip(shares, want.values()))
    check(err <= 1.0 / len(train) + 1e-12,
          f"sequences drawn per dataset / total = token shares (max |diff| {err:.3g} <= 1/{len(train)})")
    sample = train[0]
    check(len(sample["tokens"]) == seq, f"a blended sample has {seq} tokens ({list(sample)})")
    finish("megatron")


# --- axolotl ------------------------------------------------------------------------------------------


def axolotl(work: str) -> None:
    import axolotl as ax
    import yaml
    from axolotl.utils.dict import DictDefault

    w = load_work(work)
    kept = w["kept"]
    print(f"axolotl {getattr(ax, '__version__', '?')} (dist {version('axolotl')}), transformers "
          f"{version('transformers')}, datasets {version('datasets')}, pydantic {version('pydantic')}")
    with open(os.path.join(work, "mixture_axolotl.yaml")) as f:
        exported = yaml.safe_load(f)
    base = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "taskpgm_ray", "assets",
                        "synthetic-base")
    raw = {"base_model": base, "sequence_len": 128, "micro_batch_size": 1, "gradient_accumulation_steps": 1,
           "num_epochs": 1, "learning_rate": 1e-4, "output_dir": os.path.join(work, "axolotl_out"),
           "dataset_prepared_path": os.path.join(work, "axolotl_prepared"), **exported}
    print(f"  config: the export's seed {exported['seed']} and {len(exported['datasets'])} datasets entries, plus "
          f"the required model/training keys (base_model: TaskPGM's synthetic base)")
    try:
        from axolotl.utils.config import validate_config
        cfg = validate_config(DictDefault(raw))
        how = "axolotl.utils.config.validate_config (AxolotlInputConfig)"
    except ImportError as e:  # the loader's module imports the model stack; the schema alone still validates
        print(f"  axolotl.utils.config did not import ({e}); validating with the schema model directly")
        from axolotl.utils.schemas.config import AxolotlInputConfig
        cfg = DictDefault(dict(AxolotlInputConfig(**raw).model_dump(exclude_none=True)))
        how = "axolotl.utils.schemas.config.AxolotlInputConfig"
    entries = cfg["datasets"]
    print(f"  {how}: {len(entries)} datasets entries, seed {cfg.get('seed')}")
    for e in entries:
        e = {k: v for k, v in dict(e).items() if v is not None and v is not False}
        print(f"    {e}")
    # Each entry loaded and sharded by axolotl's own loader (utils/data/shared.py load_dataset_with_config, then
    # the shuffle(seed).shard(...) of utils/data/sft.py _load_and_process_single_dataset).
    from axolotl.utils.data.shared import load_dataset_with_config

    seed = cfg.get("seed") or 42
    rows: Counter = Counter()
    seen: dict[str, list] = {}
    for e in entries:
        e = DictDefault(dict(e))
        ds = load_dataset_with_config(e, False)
        if e.shards:
            ds = ds.shuffle(seed=seed).shard(num_shards=e.shards, index=e.get("shards_idx", 0))
        task = os.path.basename(e.path).split(".")[0]
        rows[task] += len(ds)
        seen.setdefault(task, []).extend(ds["prompt"])
    total = sum(rows.values())
    print(f"  load_dataset_with_config + shuffle(seed={seed}).shard(...): {total} rows; per task {dict(rows)}")
    from taskpgm_ray.exporters import parse_export

    with open(os.path.join(work, "mixture_axolotl.yaml")) as f:
        meant = parse_export(f.read(), "axolotl", sizes={os.path.join(work, "data", f"{t}.jsonl"): n
                                                          for t, n in SIZES.items()})
    meant = {os.path.basename(p).split(".")[0]: s for p, s in meant.items()}
    check(list(rows) == list(kept), f"tasks {list(rows)} are the kept tasks (noise left out)")
    budget = min(math.floor(SIZES[t] / s + 1e-9) for t, s in kept.items())
    target = apportion(kept, budget)
    print(f"  target rows (largest remainder of weight x {budget}): {target}")
    shares = {t: n / total for t, n in rows.items()}
    check(all(abs(shares[t] - meant[t]) <= TOL for t in rows), "shares loaded = what the export says it holds")
    short = {t: target[t] - rows[t] for t in rows if rows[t] != target[t]}
    check(all(0 <= d <= max(1, 0.01 * SIZES[t]) for t, d in short.items()),
          f"rows per task = target, or a partial dataset short by <= 1% of its size (short: {short or 'none'})")
    err = max(abs(shares[t] - kept[t]) for t in kept)
    print(f"  shares loaded vs mixture weights: max |diff| {err:.3g} (1/{total} = {1 / total:.3g})")
    check(err < 0.01, "shares within 1e-2 of the weights")
    check(all(len(set(v)) == len(v) for v in seen.values()), "the shards of one dataset are disjoint: no row repeats")
    finish("axolotl")


# --- hf (datasets.interleave_datasets) ----------------------------------------------------------------


def hf(work: str) -> None:
    import importlib.util

    from datasets import DatasetDict, load_dataset

    w = load_work(work)
    kept = w["kept"]
    print(f"datasets {version('datasets')}")
    for t in SIZES:
        ds = load_dataset("json", data_files=os.path.join(work, "data", f"{t}.jsonl"), split="train")
        DatasetDict({"train": ds}).save_to_disk(os.path.join(work, "hf", t))
    spec = importlib.util.spec_from_file_location("mixture_hf", os.path.join(work, "mixture_hf.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    print(f"  mixture_hf.py: DATASETS {mod.DATASETS}\n  PROBABILITIES {mod.PROBABILITIES}")
    err = max(abs(p - kept[t]) for t, p in zip(mod.TASKS, mod.PROBABILITIES))
    check(list(mod.TASKS) == list(kept) and err <= TOL, f"PROBABILITIES = the weights (max |diff| {err:.2g})")
    mixed = mod.mix({name: mod.load(name) for name in mod.DATASETS})
    got = Counter(p.split(" row ")[0] for p in mixed["prompt"])
    n = len(mixed)
    print(f"  mix(): datasets.interleave_datasets -> {n} rows; per task {dict(got)}")
    z = max(abs(got[t] - n * p) / math.sqrt(n * p * (1 - p)) for t, p in kept.items())
    check(z < 4, f"sampled counts agree with PROBABILITIES (max |z| {z:.2f} < 4)")
    check(len(set(mixed["prompt"])) == n, "first_exhausted: no row repeats")
    with open(os.path.join(work, "mixture_weights.json")) as f:
        j = json.load(f)
    err = max(abs(j[t] - kept[t]) for t in kept)
    check(list(j) == list(kept) and err <= TOL, f"json export = the weights (max |diff| {err:.2g})")
    finish("hf")


if __name__ == "__main__":
    step, work = sys.argv[1], sys.argv[2]
    {"make": make, "llamafactory": llamafactory, "megatron": megatron, "axolotl": axolotl, "hf": hf}[step](work)

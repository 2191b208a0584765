"""Each tool's format: ``_export_hf``, ``_export_llamafactory`` (and ``merge_dataset_info``), ``_export_axolotl``
(and its shard plan), ``_export_megatron``, ``_export_json``; each turns a ``_Context`` into a ``MixtureExport``."""

from __future__ import annotations

import copy
import json
import math
import os

from taskpgm_ray.errors import BadInput
from taskpgm_ray.exporters.context import MixtureExport, _budget, _Context, _size

# --- exports -----------------------------------------------------------------------------------------
#
# One rule for every target: tasks of weight 0 are left out (a comment lists them), the other weights are
# renormalised, and what is printed or written is read by the tool as it is. Formats as checked in each
# tool's own source and docs:
# - datasets 5.2 `interleave_datasets(datasets, probabilities, seed, stopping_strategy)`, strategies
#   "first_exhausted" (default), "all_exhausted", "all_exhausted_without_replacement"; a probability of 0
#   is refused by "all_exhausted".
# - LLaMA-Factory data/README.md (dataset_info.json entries: one of file_name / hf_hub_url / ms_hub_url /
#   script_url, then formatting, columns, split, num_samples), hparams/data_args.py (dataset, dataset_dir,
#   mix_strategy concat | interleave_under | interleave_over, interleave_probs, max_samples), data/loader.py
#   (num_samples: numpy permutation of the rows, then draws with replacement past the size; max_samples
#   truncates every dataset afterwards) and data/data_utils.py merge_dataset (concat, or interleave with
#   first/all_exhausted). transformers.set_seed(seed) seeds numpy before the data is loaded.
# - axolotl utils/schemas/datasets.py SFTDataset (path, split, type, ds_type, data_files, name, shards,
#   shards_idx, ...; no weight field) and utils/data/sft.py (ds.shuffle(seed=cfg.seed or 42).shard(shards,
#   shards_idx), then concatenate_datasets and, by default, shuffle_merged_datasets).
# - Megatron-LM megatron/core/datasets/utils.py get_blend_from_list ("w1 prefix1 w2 prefix2 ...", weights
#   normalised), training/utils.py get_blend_and_blend_per_split (--data-args-path FILE is read as
#   FILE.read().split()); GPTDataset cuts each dataset into fixed-length token sequences and BlendedDataset
#   draws sequences by weight, so a weight is a share of tokens.

# The keys that tell LLaMA-Factory where a dataset is; an entry needs one (data/parser.py).
_LLAMAFACTORY_SOURCES = ("file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
# A task given by name only is read with TaskPGM's default columns (tasks[].prompt_field / response_field).
_LLAMAFACTORY_COLUMNS = {"prompt": "prompt", "response": "response"}
_AXOLOTL_TYPE = {"field_instruction": "prompt", "field_output": "response",
                 "format": "{instruction}", "no_input_format": "{instruction}"}
_AXOLOTL_DS_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow",
                     ".txt": "text"}
_AXOLOTL_MAX_SHARD_ENTRIES = 12  # at most this many shard entries make up a partial dataset


def _export_hf(ctx: _Context) -> MixtureExport:
    tasks = list(ctx.shares)
    code = f"""import os

from datasets import interleave_datasets, load_dataset, load_from_disk

TASKS = {json.dumps(tasks)}
DATASETS = {json.dumps([ctx.names[t] for t in tasks])}  # what load() reads for each task
PROBABILITIES = {json.dumps([ctx.shares[t] for t in tasks])}


def load(name, split="train"):
    \"\"\"One dataset's training split: a save_to_disk folder, else anything load_dataset reads.\"\"\"
    if os.path.exists(os.path.join(name, "dataset_dict.json")):
        return load_from_disk(name)[split]
    if os.path.exists(os.path.join(name, "state.json")):
        return load_from_disk(name)
    return load_dataset(name, split=split)


def mix(sources, seed={int(ctx.seed)!r}, stopping_strategy="first_exhausted"):
    \"\"\"Interleave sources[name] for each name in DATASETS, drawing each row's dataset by PROBABILITIES.

    "first_exhausted" stops when one dataset runs out: no row repeats and the shares are the weights.
    "all_exhausted" goes on until every row was drawn once, repeating rows: larger, the same shares.
    \"\"\"
    return interleave_datasets([sources[name] for name in DATASETS], probabilities=PROBABILITIES, seed=seed,
                               stopping_strategy=stopping_strategy)


if __name__ == "__main__":
    mixed = mix({{name: load(name) for name in DATASETS}})
    print(f"{{len(mixed)}} rows from {{len(DATASETS)}} datasets")
"""
    text = ctx.comments("datasets.interleave_datasets (datasets >= 3.0): run it, or import mix().", [
        "PROBABILITIES are shares of examples, in the order of DATASETS.",
    ]) + code
    return MixtureExport({"mixture_hf.py": text}, text, ctx.notes)


def _export_llamafactory(ctx: _Context) -> MixtureExport:
    import yaml

    counts, how = _budget(ctx)
    entries = {}
    for task, n in counts.items():
        if "," in task:
            raise BadInput(f"llamafactory: task name {task!r} has a comma, which `dataset:` uses as separator")
        v = ctx.names[task]
        entry = dict(v) if isinstance(v, dict) else {"file_name": v, "columns": dict(_LLAMAFACTORY_COLUMNS)}
        if not any(k in entry for k in _LLAMAFACTORY_SOURCES):
            raise BadInput(f"--names: the dataset_info.json entry for {task!r} needs one of "
                           f"{', '.join(_LLAMAFACTORY_SOURCES)}")
        entry["num_samples"] = n
        entries[task] = entry
    info = json.dumps(entries, indent=2) + "\n"
    comments = ctx.comments("LLaMA-Factory: merge these keys into your training YAML, and the", [
        "entries of dataset_info.json (keys: the task names) into <dataset_dir>/dataset_info.json (or set",
        "dataset_dir to the folder holding it; file_name is relative to dataset_dir).",
        "Each dataset gives num_samples examples, a random subset (with repeats only past its size) drawn by",
        "LLaMA-Factory's loader, seeded by `seed`; concat joins them and the trainer shuffles.",
        "Keep streaming off (with it, num_samples is ignored or takes the first rows) and max_samples unset",
        "(it cuts every dataset after sampling). A task given by name only is a file with TaskPGM's default",
        "columns prompt/response.",
        f"Budget: {how}.",
        "num_samples: " + ", ".join(f"{t} {n:,}" for t, n in counts.items()),
    ])
    args = comments + yaml.safe_dump({"dataset": ",".join(entries), "mix_strategy": "concat"},
                                               sort_keys=False)
    text = f"# ==> mixture_llamafactory.yaml <==\n{args}# ==> dataset_info.json <==\n{info}"
    return MixtureExport({"mixture_llamafactory.yaml": args, "dataset_info.json": info}, text, ctx.notes)


def merge_dataset_info(path: str | os.PathLike, exported: str) -> tuple[str, int]:
    """The llamafactory export's ``dataset_info.json`` entries merged into the file at ``path``, if there is one.

    LLaMA-Factory reads every dataset of a ``dataset_dir`` from one ``dataset_info.json``, so the user's other
    entries are kept (in their order, ours after them). An entry of the same name must be identical: one that
    differs is the user's, and is never replaced. Returns the merged text and the number of entries kept.
    """
    try:
        with open(path, encoding="utf-8") as f:
            existing = json.load(f)
    except FileNotFoundError:
        return exported, 0
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: exists but is not valid JSON ({' '.join(str(e).split())}); the export merges its "
                       f"entries into it: fix the file or choose another --out directory") from None
    if not isinstance(existing, dict):
        raise BadInput(f"{path}: exists but is not a JSON object {{dataset name: entry}} as LLaMA-Factory's "
                       f"dataset_info.json is; fix the file or choose another --out directory")
    ours = json.loads(exported)
    for name, entry in ours.items():
        theirs = existing.get(name, entry)
        if theirs != entry:
            keys = sorted(set(theirs) | set(entry)) if isinstance(theirs, dict) else []
            key = next((k for k in keys if theirs.get(k) != entry.get(k)), None)
            what = (f"{key!r} is {json.dumps(theirs.get(key))} there, {json.dumps(entry.get(key))} in this export"
                    if key else f"it is {json.dumps(theirs)} there")
            raise BadInput(f"{path}: already has an entry {name!r} that differs from this export's ({what}); "
                           f"remove that entry or choose another --out directory")
    kept = sum(name not in ours for name in existing)
    return json.dumps({**existing, **ours}, indent=2) + "\n", kept


def _shard_bounds(n: int, shards: int, index: int) -> tuple[int, int]:
    """Rows [start, end) of shard ``index`` of ``shards`` (datasets' contiguous shard(): the first n % shards
    shards hold one row more)."""
    q, m = divmod(n, shards)
    start = index * q + min(index, m)
    return start, start + q + (1 if index < m else 0)


def _shard_at(n: int, shards: int, pos: int) -> int | None:
    """The index of the shard (of ``shards``) that starts at row ``pos``, if one does."""
    q, m = divmod(n, shards)
    if pos % (q + 1) == 0 and pos // (q + 1) <= m and pos // (q + 1) < shards:
        return pos // (q + 1)
    if q and (pos - m) % q == 0 and m < (pos - m) // q < shards:
        return (pos - m) // q
    return None


def _shard_plan(n: int, r: int) -> list[tuple[int, int]]:
    """Disjoint (shards, shards_idx) windows of n shuffled rows holding r rows, or a few fewer.

    One permutation (axolotl shuffles every entry of a dataset with the same seed) cut by different shard
    counts gives windows of many sizes. A plan is k equal shards for the bulk (k = 0..4), then windows
    placed end to end after them, each the largest that starts where the last ended; the plan with the
    fewest rows missing, then the fewest entries, wins. Measured on random (n, r): exact in over 95% of
    cases, never more than ~1% short.
    """
    best = None
    for k in range(5):
        windows, pos = [], 0
        if k:
            s = math.ceil(k * n / r)
            while s <= n and k * (n // s) + min(k, n % s) > r:
                s += 1
            if s > n or s < k:
                continue
            windows, pos = [(s, i) for i in range(k)], _shard_bounds(n, s, k - 1)[1]
        rest = r - sum(b - a for a, b in (_shard_bounds(n, *w) for w in windows))
        while rest > 0 and len(windows) < _AXOLOTL_MAX_SHARD_ENTRIES:
            for s in range(max(2, math.ceil(n / rest)), n + 1):
                i = _shard_at(n, s, pos)
                if i is not None and (span := _shard_bounds(n, s, i))[1] - span[0] <= rest:
                    break
            else:
                break
            windows.append((s, i))
            pos, rest = span[1], rest - (span[1] - span[0])
        if best is None or (rest, len(windows)) < best[0]:
            best = ((rest, len(windows)), windows)
    return best[1]


def _export_axolotl(ctx: _Context) -> MixtureExport:
    import yaml

    unknown = [t for t in ctx.shares if not _size(ctx.sizes, t)]
    if unknown:
        raise BadInput(f"axolotl export needs each task's number of training examples (the mixture's "
                       f"'sizes'), to cut shards from it; no size for task(s) {', '.join(unknown)}")
    counts, how = _budget(ctx)
    entries, lines = [], []
    for task, n in counts.items():
        v = ctx.names[task]
        base = dict(v) if isinstance(v, dict) else {"path": v}
        if "path" not in base:
            raise BadInput(f"--names: the axolotl entry for {task!r} needs a 'path'")
        if "shards" in base or "shards_idx" in base:
            raise BadInput(f"--names: the axolotl entry for {task!r} sets shards; the export sets them itself")
        base.setdefault("type", _AXOLOTL_TYPE)
        suffix = next((x for x in _AXOLOTL_DS_TYPES if str(base["path"]).endswith(x)), None)
        if suffix and "ds_type" not in base and "data_files" not in base:
            base["ds_type"] = _AXOLOTL_DS_TYPES[suffix]
        base.setdefault("split", "train")
        size = ctx.sizes[task]
        copies, rest = divmod(n, size)
        entries += [copy.deepcopy(base) for _ in range(copies)]
        got, how_task = copies * size, [f"{copies} x all {size:,}"] if copies else []
        if rest:
            windows = _shard_plan(size, rest)
            entries += [{**copy.deepcopy(base), "shards": s, "shards_idx": i} for s, i in windows]
            rows = sum(b - a for a, b in (_shard_bounds(size, *w) for w in windows))
            got += rows
            how_task.append(f"{len(windows)} disjoint shards ({rows:,} rows)")
        lines.append(f"{task}: {got:,} examples = {' + '.join(how_task)}; target {n:,}")
    comments = ctx.comments("axolotl: merge `seed` and `datasets` into your config.", [
        "axolotl has no per-dataset weight: it concatenates every `datasets` entry, then shuffles them",
        "(shuffle_merged_datasets, on by default). So each weight becomes a number of examples: whole",
        "copies of a dataset (its entry repeated) plus a random part: entries `shards: S, shards_idx: i`,",
        "the i-th of S contiguous shards of the dataset shuffled with `seed`, chosen so that none overlap.",
        "Keep dataset_exact_deduplication off (it would drop the copies), and give each mixture its own",
        "dataset_prepared_path (axolotl's cache key leaves shards_idx out). A task given by path only reads",
        "TaskPGM's default columns prompt/response (the `type` below).",
        f"Budget: {how}.",
        *lines,
    ])
    one_line = lambda d: yaml.safe_dump(d, default_flow_style=True, sort_keys=False, width=1 << 20).strip()
    text = comments + f"seed: {ctx.seed}\ndatasets:\n" + "".join(f"  - {one_line(e)}\n" for e in entries)
    return MixtureExport({"mixture_axolotl.yaml": text}, text, ctx.notes)


def _export_megatron(ctx: _Context) -> MixtureExport:
    import shlex

    pairs = []
    for task, share in ctx.shares.items():
        prefix = ctx.names[task]
        if any(c.isspace() for c in prefix):
            raise BadInput(f"megatron: the prefix of {task!r} ({prefix!r}) has whitespace, which Megatron "
                           f"splits on")
        pairs.append((repr(share), prefix))
    comments = ctx.comments("Megatron-LM: --data-path, or write it with --out for --data-args-path.", [
        "Pairs of (weight, prefix); a prefix is a .bin/.idx pair's path without the extension",
        "(tools/preprocess_data.py --output-prefix). Megatron normalises the weights and draws fixed-length",
        "token sequences by them, so each weight is a share of tokens.",
    ])
    text = comments + "--data-path " + " ".join(f"{w} {shlex.quote(p)}" for w, p in pairs) + "\n"
    data_args = "".join(f"{w} {p}\n" for w, p in pairs)
    return MixtureExport({"megatron_data_args.txt": data_args}, text, ctx.notes)


def _export_json(ctx: _Context) -> MixtureExport:
    text = json.dumps(ctx.shares, indent=2) + "\n"
    return MixtureExport({"mixture_weights.json": text}, text, ctx.notes)

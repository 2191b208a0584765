"""``build_export`` and ``export_mixture`` (a mixture in a tool's format), the option files they read
(``read_names``, ``read_mean_tokens``), and ``parse_export`` to read an export back as the tool does."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from taskpgm_ray.errors import BadInput
from taskpgm_ray.exporters.context import MixtureExport, _Context
from taskpgm_ray.exporters.formats import (
    _export_axolotl,
    _export_hf,
    _export_json,
    _export_llamafactory,
    _export_megatron,
)
from taskpgm_ray.mixture_file import EXPORTS, WEIGHT_UNITS, check_weights

# What each target's weights count; json keeps the mixture's own unit.
_TARGET_UNIT = {"hf": "examples", "llamafactory": "examples", "axolotl": "examples", "megatron": "tokens"}


def read_names(path: str) -> dict[str, str | dict]:
    """The ``--names`` file: a YAML or JSON mapping task -> the dataset the target tool knows."""
    doc = _read_yaml(path)
    if not isinstance(doc, dict) or not doc:
        raise BadInput(f"{path}: expected a mapping `task: dataset` (YAML or JSON)")
    for task, v in doc.items():
        if not isinstance(v, (str, dict)) or not v:
            raise BadInput(f"{path}: {task!r} must map to a dataset name or path (or, for llamafactory and "
                           f"axolotl, a mapping of that tool's dataset keys), got {v!r}")
    return {str(k): v for k, v in doc.items()}


def read_mean_tokens(path: str) -> dict[str, float]:
    """Mean tokens per example by task, from a YAML/JSON ``{task: number}`` or a run's ``train/summary.json``."""
    doc = _read_yaml(path)
    if isinstance(doc, dict) and "tokens_per_task" in doc and "samples_per_task" in doc:
        tokens, samples = doc["tokens_per_task"] or {}, doc["samples_per_task"] or {}
        doc = {t: tokens[t] / samples[t] for t in tokens if samples.get(t)}
    if not isinstance(doc, dict) or not doc:
        raise BadInput(f"{path}: expected a mapping `task: mean tokens per example` or a train/summary.json "
                       f"with tokens_per_task and samples_per_task")
    out = {}
    for task, v in doc.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise BadInput(f"{path}: mean tokens for task {task!r} must be a number > 0, got {v!r}")
        out[str(task)] = float(v)
    return out


def _read_yaml(path: str):
    import yaml

    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: not valid YAML or JSON ({' '.join(str(e).split())})") from None


def export_mixture(mixture: dict, to: str, **options: Any) -> str:
    """The mixture as text for another framework (what ``taskpgm export`` prints); see ``build_export``."""
    return build_export(mixture, to, **options).text


def build_export(
    mixture: dict,
    to: str,
    *,
    names: dict[str, str | dict] | None = None,
    num_samples: int | None = None,
    mean_tokens: dict[str, float] | None = None,
    seed: int = 0,
) -> MixtureExport:
    """The mixture in the format of ``to`` (hf, llamafactory, axolotl, megatron, json).

    Args:
        mixture: a mixture as ``read_mixture`` returns it (``weights``; ``weight_unit``, ``sizes`` optional).
        names: task -> the dataset the tool knows: hf a ``load_dataset`` path or ``save_to_disk`` folder;
            llamafactory a dataset_info.json entry (a string is its ``file_name``); axolotl a ``datasets``
            entry (a string is its ``path``); megatron a data prefix. Default: the task name.
        num_samples: llamafactory and axolotl: the examples to train on in all. Default: the most that
            repeat no example, from the mixture's ``sizes``.
        mean_tokens: task -> mean tokens per example, to convert between example and token shares
            (Megatron blends tokens; the others sample examples).
        seed: the seed of the hf interleave and of axolotl's shard subsets.

    Raises:
        ValueError: naming the option or task at fault, and what to give instead.
    """
    if to not in EXPORTS:
        raise BadInput(f"unknown export format {to!r}; choose one of {', '.join(EXPORTS)}")
    weights = check_weights(mixture.get("weights"), "mixture")
    unit = mixture.get("weight_unit") or "examples"
    if unit not in WEIGHT_UNITS:
        raise BadInput(f"mixture: weight_unit must be one of {WEIGHT_UNITS}, got {unit!r}")
    if num_samples is not None and to not in ("llamafactory", "axolotl"):
        raise BadInput(f"--num-samples applies to --to llamafactory and axolotl, not {to} (hf and megatron "
                       f"sample by probability: set the training length in the trainer)")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise BadInput(f"--num-samples must be a whole number >= 1, got {num_samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):  # it is written into the hf script as code
        raise BadInput(f"--seed must be a whole number, got {seed!r}")
    tool_names = _tool_names(names, weights, to)
    notes = []
    zero = [t for t, w in weights.items() if w == 0]
    if zero:
        notes.append(f"left out (weight 0): {', '.join(zero)}")
    unnamed = [t for t, w in weights.items() if w > 0 and t not in (names or {})]
    if unnamed and to != "json":
        notes.append(f"no --names entry, so the task name is the dataset name for: {', '.join(unnamed)}")
    shares, conversion = _shares({t: w for t, w in weights.items() if w > 0}, unit,
                                 _TARGET_UNIT.get(to, unit), mean_tokens, to)
    if conversion:
        notes.append(conversion)
    ctx = _Context(to, shares, unit, tool_names, notes, mixture.get("sizes") or {}, num_samples, seed)
    return {"hf": _export_hf, "llamafactory": _export_llamafactory, "axolotl": _export_axolotl,
            "megatron": _export_megatron, "json": _export_json}[to](ctx)


def _tool_names(names: dict | None, weights: dict[str, float], to: str) -> dict[str, str | dict]:
    names = dict(names or {})
    unknown = [t for t in names if t not in weights]
    if unknown:
        raise BadInput(f"--names: task(s) {', '.join(map(repr, unknown))} not in the mixture "
                       f"(its tasks: {', '.join(weights)})")
    out, seen = {}, {}
    for task in weights:
        v = names.get(task, task)
        if isinstance(v, dict) and to not in ("llamafactory", "axolotl"):
            raise BadInput(f"--names: {task!r} maps to a mapping, but --to {to} needs a string "
                           f"({'a data prefix' if to == 'megatron' else 'a load_dataset path or folder'})")
        if not isinstance(v, (str, dict)) or not v:
            raise BadInput(f"--names: {task!r} must map to a non-empty string, got {v!r}")
        key = json.dumps(v, sort_keys=True)
        if weights[task] > 0 and key in seen:
            raise BadInput(f"--names: tasks {seen[key]!r} and {task!r} both map to {v!r}; "
                           f"each task needs its own dataset")
        if weights[task] > 0:
            seen[key] = task
        out[task] = v
    return out


def _shares(kept: dict[str, float], unit: str, counts: str, mean_tokens: dict | None,
            to: str) -> tuple[dict[str, float], str | None]:
    """Renormalised shares in the unit the target counts, and a note when they were converted."""
    if unit == counts:
        total = sum(kept.values())
        return {t: w / total for t, w in kept.items()}, None
    mean_tokens = mean_tokens or {}
    missing = [t for t in kept if not (isinstance(mean_tokens.get(t), (int, float)) and mean_tokens[t] > 0)]
    if missing:
        does = "blends token sequences" if counts == "tokens" else "samples examples"
        raise BadInput(f"{to} {does}, but this mixture's weights count {unit} (weight_unit: {unit}); give "
                       f"--mean-tokens FILE (task: mean tokens per example, or a run's train/summary.json) "
                       f"to convert; missing for {', '.join(missing)}")
    # A share of examples w_i draws w_i * m_i tokens; a share of tokens w_i needs w_i / m_i examples.
    raw = {t: w * mean_tokens[t] if counts == "tokens" else w / mean_tokens[t] for t, w in kept.items()}
    total = sum(raw.values())
    used = ", ".join(f"{t} {mean_tokens[t]:.4g}" for t in kept)
    return ({t: v / total for t, v in raw.items()},
            f"weights converted from {unit} to {counts} with the mean tokens per example ({used})")


def parse_export(text: str, to: str, *, sizes: dict[str, int] | None = None) -> dict[str, float]:
    """Read back what ``export_mixture`` printed as {dataset name the tool sees: share}, the way the tool does.

    axolotl needs ``sizes`` (dataset path -> rows) to count what its shards hold.
    """
    import yaml

    if to == "json":
        return {k: float(v) for k, v in json.loads(text).items()}
    if to == "hf":
        import ast

        values = {t.id: ast.literal_eval(node.value) for node in ast.parse(text).body
                  if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
        return dict(zip(values["DATASETS"], map(float, values["PROBABILITIES"])))
    if to == "llamafactory":
        args_text, info_text = re.split(r"^# ==> dataset_info\.json <==\n", text, flags=re.M)
        args, info = yaml.safe_load(args_text), json.loads(info_text)
        counts = {name: info[name]["num_samples"] for name in str(args["dataset"]).split(",")}
        return {k: n / sum(counts.values()) for k, n in counts.items()}
    if to == "megatron":
        import shlex

        line = next(x for x in text.splitlines() if x.startswith("--data-path "))
        tokens = shlex.split(line)[1:]
        weights = {tokens[i + 1]: float(tokens[i]) for i in range(0, len(tokens), 2)}
        return {k: w / sum(weights.values()) for k, w in weights.items()}
    if to == "axolotl":
        if sizes is None:
            raise BadInput("parse_export(..., 'axolotl') needs sizes={path: rows} to count the shards")
        rows: dict[str, int] = {}
        for d in yaml.safe_load(text)["datasets"]:
            n = sizes[d["path"]]
            if "shards" in d:
                s, i = d["shards"], d["shards_idx"]
                n = n // s + (1 if i < n % s else 0)
            rows[d["path"]] = rows.get(d["path"], 0) + n
        return {k: n / sum(rows.values()) for k, n in rows.items()}
    raise BadInput(f"unknown export format {to!r}; choose one of {', '.join(EXPORTS)}")

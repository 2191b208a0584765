"""The mixture's files: ``mixture.json`` and ``likelihoods.npz`` (formats in CONTRACT.md), and exports
of a mixture to other training frameworks.

Writes are atomic (a temporary file in the same directory, then ``os.replace``), so a crash never
leaves a half-written artefact. Reads validate and name the file, the field and the task on error.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re

import numpy as np

from taskpgm_ray.io import atomic_savez, atomic_write_text

FORMAT = "taskpgm-mixture/1"
METHODS = ("taskpgm", "uniform", "size", "temperature")
AFFINITIES = ("pmi", "jsd", None)
EXPORTS = ("hf", "llamafactory", "axolotl", "megatron", "json")


def _check_weights(weights: dict, where: str) -> dict[str, float]:
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"{where}: 'weights' must be a non-empty object {{task: weight}}")
    out = {}
    for task, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"{where}: weights[{task!r}] must be a finite number, got {w!r}")
        if w < 0:
            raise ValueError(f"{where}: weights[{task!r}] is negative ({w})")
        out[str(task)] = float(w)
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"{where}: weights sum to {total:.9g}, not 1 (tolerance 1e-6)")
    return out


def write_mixture(
    path: str,
    *,
    weights: dict[str, float],
    method: str,
    affinity: str | None,
    hyperparameters: dict,
    energy: float | None,
    kkt_residual: float | None,
    sizes: dict[str, int],
    inputs_hash: str,
) -> None:
    """Write ``mixture.json`` (format "taskpgm-mixture/1") atomically, after validating every field."""
    weights = _check_weights(dict(weights), path)
    if method not in METHODS:
        raise ValueError(f"{path}: method must be one of {METHODS}, got {method!r}")
    if affinity not in AFFINITIES:
        raise ValueError(f"{path}: affinity must be one of {AFFINITIES}, got {affinity!r}")
    for name, v in (("energy", energy), ("kkt_residual", kkt_residual)):
        if v is not None and not math.isfinite(v):
            raise ValueError(f"{path}: {name} must be a finite number or null, got {v!r}")
    missing = sorted(set(weights) - set(sizes))
    if missing:
        raise ValueError(f"{path}: sizes has no entry for task(s) {', '.join(missing)}")
    doc = {
        "format": FORMAT,
        "weights": weights,
        "method": method,
        "affinity": affinity,
        "hyperparameters": dict(hyperparameters),
        "energy": None if energy is None else float(energy),
        "kkt_residual": None if kkt_residual is None else float(kkt_residual),
        "sizes": {str(k): int(v) for k, v in sizes.items()},
        "inputs_hash": str(inputs_hash),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")


def read_mixture(path: str) -> dict:
    """Read and validate ``mixture.json``; ValueError naming the file and the field or task."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: field 'format' must be {FORMAT!r}, got {doc.get('format')!r}")
    for key in (
        "weights",
        "method",
        "affinity",
        "hyperparameters",
        "energy",
        "kkt_residual",
        "sizes",
        "inputs_hash",
        "created",
    ):
        if key not in doc:
            raise ValueError(f"{path}: missing field {key!r}")
    doc["weights"] = _check_weights(doc["weights"], path)
    if doc["method"] not in METHODS:
        raise ValueError(f"{path}: field 'method' must be one of {METHODS}, got {doc['method']!r}")
    if doc["affinity"] not in AFFINITIES:
        raise ValueError(f"{path}: field 'affinity' must be one of {AFFINITIES}, got {doc['affinity']!r}")
    return doc


def save_likelihoods(path: str, tasks, loglik_sum, count, sizes=None) -> None:
    """Write ``likelihoods.npz`` atomically: tasks, loglik_sum (n, n), count (n,), optional sizes (n,)."""
    arrays = {
        "tasks": np.asarray([str(t) for t in tasks]),
        "loglik_sum": np.asarray(loglik_sum, dtype=np.float64),
        "count": np.asarray(count),
    }
    if sizes is not None:
        arrays["sizes"] = np.asarray(sizes)
    _validate_likelihoods(path, arrays)
    atomic_savez(path, **arrays)


def load_likelihoods(path: str):
    """Read ``likelihoods.npz`` -> (tasks list[str], loglik_sum (n, n), count (n,), sizes (n,) or None)."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    _validate_likelihoods(path, arrays)
    sizes = arrays.get("sizes")
    return (
        [str(t) for t in arrays["tasks"]],
        arrays["loglik_sum"].astype(np.float64),
        arrays["count"],
        None if sizes is None else sizes,
    )


def _validate_likelihoods(path: str, a: dict) -> None:
    for key in ("tasks", "loglik_sum", "count"):
        if key not in a:
            raise ValueError(f"{path}: missing array {key!r} (need tasks, loglik_sum, count; optional sizes)")
    tasks = [str(t) for t in a["tasks"]]
    n = len(tasks)
    if a["tasks"].ndim != 1 or n == 0:
        raise ValueError(
            f"{path}: 'tasks' must be a non-empty 1-d array of names, got shape {a['tasks'].shape}"
        )
    if len(set(tasks)) != n:
        raise ValueError(f"{path}: 'tasks' has duplicate names")
    if a["loglik_sum"].shape != (n, n):
        raise ValueError(
            f"{path}: 'loglik_sum' must have shape ({n}, {n}) for {n} tasks, got {a['loglik_sum'].shape}"
        )
    for key in ("count", "sizes"):
        if key in a and a[key].shape != (n,):
            raise ValueError(f"{path}: '{key}' must have shape ({n},), got {a[key].shape}")
    bad = np.flatnonzero(~(a["count"] > 0))
    if bad.size:
        raise ValueError(
            f"{path}: count for task {tasks[bad[0]]!r} is {a['count'][bad[0]]}; need > 0 probe examples"
        )
    if "sizes" in a:
        bad = np.flatnonzero(~(a["sizes"] > 0))
        if bad.size:
            raise ValueError(f"{path}: sizes for task {tasks[bad[0]]!r} is {a['sizes'][bad[0]]}; need > 0")
    nonfinite = np.argwhere(~np.isfinite(a["loglik_sum"]))
    if nonfinite.size:
        i, j = nonfinite[0]
        raise ValueError(
            f"{path}: loglik_sum[{i}, {j}] (proxy {tasks[i]!r} on task {tasks[j]!r}) is not finite"
        )


# --- exports -----------------------------------------------------------------------------------------


def export_mixture(mixture: dict, to: str) -> str:
    """The mixture as text for another framework (``to`` in hf, llamafactory, axolotl, megatron, json).

    Tasks keep the order of ``mixture["weights"]``. axolotl needs ``mixture["sizes"]``; megatron and
    axolotl leave out tasks of weight 0.
    """
    if to not in EXPORTS:
        raise ValueError(f"unknown export format {to!r}; choose one of {', '.join(EXPORTS)}")
    weights = _check_weights(mixture.get("weights"), "mixture")
    tasks, w = list(weights), [weights[t] for t in weights]
    if to == "json":
        return json.dumps(weights, indent=2) + "\n"
    if to == "hf":
        return (
            "# TaskPGM mixture for datasets.interleave_datasets (probabilities in the order of `tasks`)\n"
            "from datasets import interleave_datasets\n\n"
            f"tasks = {json.dumps(tasks)}\n"
            f"probabilities = {json.dumps(w)}\n"
            "# mixed = interleave_datasets([my_datasets[t] for t in tasks], probabilities=probabilities,\n"
            '#                             seed=0, stopping_strategy="all_exhausted")\n'
        )
    if to == "llamafactory":
        return (
            "# TaskPGM mixture for LLaMA-Factory (interleave_probs in the order of `dataset`)\n"
            f"dataset: {','.join(tasks)}\n"
            "mix_strategy: interleave_under\n"
            f"interleave_probs: {','.join(repr(x) for x in w)}\n"
        )
    if to == "megatron":
        # Megatron normalises the weights itself; tasks with weight 0 are left out of the blend.
        return "--data-path " + " ".join(f"{x!r} {t}" for t, x in zip(tasks, w) if x > 0) + "\n"
    sizes = mixture.get("sizes") or {}
    missing = [t for t in tasks if t not in sizes or not sizes[t] > 0]
    if missing:
        raise ValueError(
            f"axolotl export needs a positive size for every task; missing for {', '.join(missing)}"
        )
    need = {t: weights[t] / sizes[t] for t in tasks}
    top = max(need.values())
    lines = [
        "# TaskPGM mixture for axolotl. axolotl concatenates datasets and can only down-sample them, so",
        "# each weight w_i becomes the fraction of dataset i kept,",
        "#     fraction_i = (w_i / N_i) / max_j (w_j / N_j)     (N_i = training examples of dataset i):",
        "# the dataset with the largest sampling need is kept whole and the others are cut so that one",
        "# epoch reproduces the mixture. The kept count is in `split`, rounded to a whole example.",
        "datasets:",
    ]
    for t in (t for t in tasks if weights[t] > 0):  # a weight-0 task is left out, not emptied
        frac = need[t] / top if top > 0 else 0.0
        keep = int(round(frac * sizes[t]))
        note = f"fraction {frac:.6f} of {int(sizes[t])}, weight {weights[t]!r}"
        lines += [f"  - path: {t}", f"    split: train[:{keep}]  # {note}"]
    return "\n".join(lines) + "\n"


def parse_export(text: str, to: str) -> dict[str, float]:
    """Recover {task: weight} from ``export_mixture`` text (axolotl: from the kept counts, normalised)."""
    if to == "json":
        return {k: float(v) for k, v in json.loads(text).items()}
    if to == "hf":
        tasks = json.loads(re.search(r"^tasks = (.*)$", text, re.M).group(1))
        probs = json.loads(re.search(r"^probabilities = (.*)$", text, re.M).group(1))
        return dict(zip(tasks, map(float, probs)))
    if to == "llamafactory":
        tasks = re.search(r"^dataset: (.*)$", text, re.M).group(1).split(",")
        probs = re.search(r"^interleave_probs: (.*)$", text, re.M).group(1).split(",")
        return dict(zip(tasks, map(float, probs)))
    if to == "megatron":
        parts = text.split()[1:]
        return {parts[i + 1]: float(parts[i]) for i in range(0, len(parts), 2)}
    if to == "axolotl":
        kept = dict(re.findall(r"- path: (\S+)\n\s+split: train\[:(\d+)\]", text))
        total = sum(int(v) for v in kept.values())
        return {t: int(v) / total for t, v in kept.items()}
    raise ValueError(f"unknown export format {to!r}; choose one of {', '.join(EXPORTS)}")

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
import zipfile

import numpy as np

from taskpgm_ray.io import atomic_savez, atomic_write_text

FORMAT = "taskpgm-mixture/1"
METHODS = ("taskpgm", "uniform", "size", "temperature")
AFFINITIES = ("pmi", "jsd", None)
WEIGHT_UNITS = ("examples", "tokens")
EXPORTS = ("hf", "llamafactory", "axolotl", "megatron", "json")
# Fields a mixture file may leave out (CONTRACT.md: only `format` and `weights` are required); read_mixture
# fills them with null, except weight_unit, which defaults to "examples".
OPTIONAL_FIELDS = ("method", "affinity", "hyperparameters", "energy", "kkt_residual", "sizes", "inputs_hash",
                   "created")


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
    weight_unit: str = "examples",
) -> None:
    """Write ``mixture.json`` (format "taskpgm-mixture/1") atomically, after validating every field.

    ``weight_unit`` says what a weight counts ("examples" or "tokens"), so that exports to tools that count
    the other unit can convert.
    """
    weights = _check_weights(dict(weights), path)
    if method not in METHODS:
        raise ValueError(f"{path}: method must be one of {METHODS}, got {method!r}")
    if affinity not in AFFINITIES:
        raise ValueError(f"{path}: affinity must be one of {AFFINITIES}, got {affinity!r}")
    if weight_unit not in WEIGHT_UNITS:
        raise ValueError(f"{path}: weight_unit must be one of {WEIGHT_UNITS}, got {weight_unit!r}")
    for name, v in (("energy", energy), ("kkt_residual", kkt_residual)):
        if v is not None and not math.isfinite(v):
            raise ValueError(f"{path}: {name} must be a finite number or null, got {v!r}")
    missing = sorted(set(weights) - set(sizes))
    if missing:
        raise ValueError(f"{path}: sizes has no entry for task(s) {', '.join(missing)}")
    doc = {
        "format": FORMAT,
        "weights": weights,
        "weight_unit": weight_unit,
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
    """Read and validate ``mixture.json``; ValueError naming the file and the field or task.

    Only ``format`` and ``weights`` are required (a hand-written file is valid); a missing optional field
    reads as null, a missing ``weight_unit`` as "examples".
    """
    try:
        with open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (expected a JSON mixture)") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: field 'format' must be {FORMAT!r}, got {doc.get('format')!r}")
    if "weights" not in doc:
        raise ValueError(f"{path}: missing field 'weights' (an object {{task: weight}} summing to 1)")
    doc["weights"] = _check_weights(doc["weights"], path)
    for key in OPTIONAL_FIELDS:
        doc.setdefault(key, None)
    doc.setdefault("weight_unit", "examples")
    if doc["weight_unit"] not in WEIGHT_UNITS:
        raise ValueError(f"{path}: field 'weight_unit' must be one of {WEIGHT_UNITS}, got {doc['weight_unit']!r}")
    if doc["method"] is not None and doc["method"] not in METHODS:
        raise ValueError(f"{path}: field 'method' must be one of {METHODS} or null, got {doc['method']!r}")
    if doc["affinity"] not in AFFINITIES:
        raise ValueError(f"{path}: field 'affinity' must be one of {AFFINITIES}, got {doc['affinity']!r}")
    sizes = doc["sizes"]
    if sizes is not None and (not isinstance(sizes, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in sizes.values())):
        raise ValueError(f"{path}: field 'sizes' must be an object {{task: training examples}} of whole "
                         f"numbers >= 0, or null")
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


def read_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, read without unpickling anything; a ValueError names the file otherwise.

    numpy's own errors for a wrong file suggest ``allow_pickle=True``, which would run code from the file;
    these say what the file should be instead.
    """
    what = f"{path}: not a NumPy .npz archive of plain arrays (as numpy.savez writes)"
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        raise ValueError(what) from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{what}; it holds a single .npy array")
    arrays = {}
    with z:
        for key in z.files:
            try:
                a = z[key]
            except ValueError:
                raise ValueError(f"{path}: array {key!r} holds Python objects (pickled data), which are never "
                                 f"loaded; save names as strings and numbers as numbers") from None
            if not isinstance(a, np.ndarray):
                raise ValueError(f"{path}: member {key!r} is not a .npy array ({what.split(': ', 1)[1]})")
            arrays[key] = a
    return arrays


def load_likelihoods(path: str):
    """Read ``likelihoods.npz`` -> (tasks list[str], loglik_sum (n, n), count (n,), sizes (n,) or None)."""
    arrays = read_npz(path)
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

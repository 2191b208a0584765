"""The mixture's files: ``mixture.json`` and ``likelihoods.npz`` (formats in CONTRACT.md), and exports
of a mixture to other training frameworks.

Writes are atomic (a temporary file in the same directory, then ``os.replace``), so a crash never
leaves a half-written artefact. Reads validate and name the file, the field and the task on error.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import zipfile
from typing import Any

import numpy as np

from taskpgm_ray.errors import BadInput
from taskpgm_ray.io import atomic_savez, atomic_write_text
from taskpgm_ray.names import name_problem

FORMAT = "taskpgm-mixture/1"
METHODS = ("taskpgm", "uniform", "size", "temperature")
AFFINITIES = ("pmi", "jsd", None)
WEIGHT_UNITS = ("examples", "tokens")
EXPORTS = ("hf", "llamafactory", "axolotl", "megatron", "json")
# Fields a mixture file may leave out (CONTRACT.md: only `format` and `weights` are required); read_mixture
# fills them with null, except weight_unit, which defaults to "examples".
OPTIONAL_FIELDS = ("method", "affinity", "hyperparameters", "energy", "kkt_residual", "sizes", "inputs_hash",
                   "created")


def check_weights(weights: dict, where: str) -> dict[str, float]:
    if not isinstance(weights, dict) or not weights:
        raise BadInput(f"{where}: 'weights' must be a non-empty object {{task: weight}}")
    out = {}
    for task, w in weights.items():
        if (problem := name_problem(task)) is not None:  # a task name becomes a path, a dataset key, code
            raise BadInput(f"{where}: task name in 'weights': {problem}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise BadInput(f"{where}: weights[{task!r}] must be a finite number, got {w!r}")
        if w < 0:
            raise BadInput(f"{where}: weights[{task!r}] is negative ({w})")
        out[str(task)] = float(w)
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise BadInput(f"{where}: weights sum to {total:.9g}, not 1 (tolerance 1e-6)")
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
    weights = check_weights(dict(weights), path)
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
        raise BadInput(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not a text file (expected a JSON mixture)") from None
    if not isinstance(doc, dict):
        raise BadInput(f"{path}: expected a JSON object")
    if doc.get("format") != FORMAT:
        raise BadInput(f"{path}: field 'format' must be {FORMAT!r}, got {doc.get('format')!r}")
    if "weights" not in doc:
        raise BadInput(f"{path}: missing field 'weights' (an object {{task: weight}} summing to 1)")
    doc["weights"] = check_weights(doc["weights"], path)
    for key in OPTIONAL_FIELDS:
        doc.setdefault(key, None)
    doc.setdefault("weight_unit", "examples")
    if doc["weight_unit"] not in WEIGHT_UNITS:
        raise BadInput(f"{path}: field 'weight_unit' must be one of {WEIGHT_UNITS}, got {doc['weight_unit']!r}")
    if doc["method"] is not None and doc["method"] not in METHODS:
        raise BadInput(f"{path}: field 'method' must be one of {METHODS} or null, got {doc['method']!r}")
    if doc["affinity"] not in AFFINITIES:
        raise BadInput(f"{path}: field 'affinity' must be one of {AFFINITIES}, got {doc['affinity']!r}")
    sizes = doc["sizes"]
    if sizes is not None and (not isinstance(sizes, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in sizes.values())):
        raise BadInput(f"{path}: field 'sizes' must be an object {{task: training examples}} of whole "
                       f"numbers >= 0, or null")
    return doc


# Optional per-task arrays of likelihoods.npz beyond CONTRACT.md's sizes, written by `taskpgm estimate`:
# the base model's summed log-likelihood of each probe set, and the input-output information sums
# (taskpgm_ray.mixture.signal.info_nce) of the task's own proxy and of the base: the sum over examples, their
# count, the proxy's sum of squares, the sum of the bounds log K and the response tokens behind them.
SIGNAL_ARRAYS = ("base_loglik_sum", "information_sum", "base_information_sum", "information_count",
                 "information_sq_sum", "information_bound_sum", "information_tokens")


def save_likelihoods(path: str, tasks, loglik_sum, count, sizes=None, measured=None, **signal: np.ndarray) -> None:
    """Write ``likelihoods.npz`` atomically: tasks, loglik_sum (n, n), count (n,), optional sizes (n,), the
    optional per-task ``SIGNAL_ARRAYS``, and optional ``measured`` (n, n): the share of each entry's probe
    examples that were scored (below 1 where active estimation filled the entry in)."""
    unknown = sorted(set(signal) - set(SIGNAL_ARRAYS))
    if unknown:
        raise ValueError(f"{path}: unknown array(s) {', '.join(unknown)} (optional: {', '.join(SIGNAL_ARRAYS)})")
    arrays = {
        "tasks": np.asarray([str(t) for t in tasks]),
        "loglik_sum": np.asarray(loglik_sum, dtype=np.float64),
        "count": np.asarray(count),
    }
    if sizes is not None:
        arrays["sizes"] = np.asarray(sizes)
    if measured is not None:
        arrays["measured"] = np.asarray(measured, dtype=np.float64)
    arrays.update({k: np.asarray(v) for k, v in signal.items()})
    _validate_likelihoods(path, arrays)
    atomic_savez(path, **arrays)


def load_signal(path: str) -> dict[str, np.ndarray] | None:
    """The per-task signal sums (``SIGNAL_ARRAYS``) of ``likelihoods.npz``, from which the energy takes its
    information unary and the tasks its prior skips; None when the file has none (older or hand-written)."""
    arrays = read_npz(path)
    if not all(k in arrays for k in SIGNAL_ARRAYS):
        return None
    _validate_likelihoods(path, arrays)
    return {k: arrays[k] for k in SIGNAL_ARRAYS}


def read_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, read without unpickling anything; a BadInput names the file otherwise.

    numpy's own errors for a wrong file suggest ``allow_pickle=True``, which would run code from the file;
    these say what the file should be instead.
    """
    what = f"{path}: not a NumPy .npz archive of plain arrays (as numpy.savez writes)"
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        raise BadInput(what) from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise BadInput(f"{what}; it holds a single .npy array")
    arrays = {}
    with z:
        for key in z.files:
            try:
                a = z[key]
            except ValueError:
                raise BadInput(f"{path}: array {key!r} holds Python objects (pickled data), which are never "
                               f"loaded; save names as strings and numbers as numbers") from None
            if not isinstance(a, np.ndarray):
                raise BadInput(f"{path}: member {key!r} is not a .npy array ({what.split(': ', 1)[1]})")
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


def load_jsd(path: str, tasks: list[str], likelihoods: str) -> tuple[np.ndarray, np.ndarray]:
    """``jsd.npz`` (as ``taskpgm estimate`` writes it) for the ``tasks`` of ``likelihoods``: (jsd_sum (n, n),
    token_count), each checked; a ``BadInput`` naming the file, the array and the cell otherwise."""
    f = read_npz(path)
    if any(k not in f for k in ("tasks", "jsd_sum", "token_count")):
        raise BadInput(f"{path}: needs arrays tasks, jsd_sum and token_count (as `taskpgm estimate` writes)")
    if [str(t) for t in f["tasks"]] != list(tasks):
        raise BadInput(f"{path}: tasks differ from {likelihoods}")
    n, jsd, tokens = len(tasks), f["jsd_sum"], f["token_count"]
    for key in ("jsd_sum", "token_count"):
        if f[key].dtype.kind not in "iuf":
            raise BadInput(f"{path}: {key!r} must be an array of numbers, got dtype {f[key].dtype}")
    if jsd.shape != (n, n):
        raise BadInput(f"{path}: 'jsd_sum' must have shape ({n}, {n}) for {n} tasks, got {jsd.shape}")
    bad = np.argwhere(~(np.isfinite(jsd) & (jsd >= 0)))
    if bad.size:
        i, j = bad[0]
        raise BadInput(f"{path}: jsd_sum[{i}, {j}] (proxy {tasks[i]!r} on task {tasks[j]!r}) is {jsd[i, j]}, but a "
                       f"sum of Jensen-Shannon divergences is a finite number >= 0")
    if tokens.shape not in ((), (n, n)) or not np.all(np.isfinite(tokens) & (tokens > 0)):
        least = tokens.min() if tokens.size else None
        raise BadInput(f"{path}: 'token_count' must be the number of probe tokens scored (> 0, one number or "
                       f"{n} x {n}), got shape {tokens.shape} and smallest value {least}")
    return jsd.astype(np.float64), tokens


def _validate_likelihoods(path: str, a: dict) -> None:
    for key in ("tasks", "loglik_sum", "count"):
        if key not in a:
            raise BadInput(f"{path}: missing array {key!r} (need tasks, loglik_sum, count; optional sizes)")
    if a["tasks"].ndim != 1 or a["tasks"].size == 0 or a["tasks"].dtype.kind != "U":
        raise BadInput(f"{path}: 'tasks' must be a non-empty 1-d array of names (strings), got shape "
                       f"{a['tasks'].shape} and dtype {a['tasks'].dtype}")
    tasks = [str(t) for t in a["tasks"]]
    n = len(tasks)
    if len(set(tasks)) != n:
        raise BadInput(f"{path}: 'tasks' has duplicate names")
    for name in tasks:  # a mixture solved from this file carries these names into paths and exports
        if (problem := name_problem(name)) is not None:
            raise BadInput(f"{path}: 'tasks': {problem}")
    for key in ("loglik_sum", "count", "sizes", "measured", *SIGNAL_ARRAYS):
        if key in a and a[key].dtype.kind not in "iuf":
            raise BadInput(f"{path}: {key!r} must be an array of numbers, got dtype {a[key].dtype} "
                           f"(shape {a[key].shape})")
    if a["loglik_sum"].shape != (n, n):
        raise BadInput(
            f"{path}: 'loglik_sum' must have shape ({n}, {n}) for {n} tasks, got {a['loglik_sum'].shape}"
        )
    for key in ("count", "sizes", *SIGNAL_ARRAYS):
        if key in a and a[key].shape != (n,):
            raise BadInput(f"{path}: '{key}' must have shape ({n},), got {a[key].shape}")
    if "measured" in a and a["measured"].shape != (n, n):
        raise BadInput(f"{path}: 'measured' must have shape ({n}, {n}), got {a['measured'].shape}")
    bad = np.flatnonzero(~(a["count"] > 0))
    if bad.size:
        raise BadInput(
            f"{path}: count for task {tasks[bad[0]]!r} is {a['count'][bad[0]]}; need > 0 probe examples"
        )
    if "sizes" in a:
        bad = np.flatnonzero(~(a["sizes"] > 0))
        if bad.size:
            raise BadInput(f"{path}: sizes for task {tasks[bad[0]]!r} is {a['sizes'][bad[0]]}; need > 0")
    nonfinite = np.argwhere(~np.isfinite(a["loglik_sum"]))
    if nonfinite.size:
        i, j = nonfinite[0]
        raise BadInput(
            f"{path}: loglik_sum[{i}, {j}] (proxy {tasks[i]!r} on task {tasks[j]!r}) is not finite"
        )
    for key in ("count", "sizes", "measured", *SIGNAL_ARRAYS):
        bad = np.argwhere(~np.isfinite(a[key])) if key in a else ()
        if len(bad):
            at = tuple(int(x) for x in bad[0])
            who = f"proxy {tasks[at[0]]!r} on task {tasks[at[1]]!r}" if len(at) == 2 else f"task {tasks[at[0]]!r}"
            raise BadInput(f"{path}: {key}[{', '.join(map(str, at))}] ({who}) is {a[key][at]}, not a finite number")
    # A sum of log-probabilities is <= 0. Cells filled in by matrix completion (measured < 1) are estimates and
    # may stray above 0; every measured one may not (a positive one is a sign error: -log p saved as log p).
    measured = a["measured"] >= 1 - 1e-9 if "measured" in a else np.ones((n, n), dtype=bool)
    positive = np.argwhere((a["loglik_sum"] > 0) & measured)
    if positive.size:
        i, j = positive[0]
        raise BadInput(f"{path}: loglik_sum[{i}, {j}] (proxy {tasks[i]!r} on task {tasks[j]!r}) is "
                       f"{a['loglik_sum'][i, j]:g} > 0, but a sum of log-likelihoods is <= 0 (saved -log p "
                       f"instead of log p?)")
    if "base_loglik_sum" in a and (a["base_loglik_sum"] > 0).any():
        i = int(np.flatnonzero(a["base_loglik_sum"] > 0)[0])
        raise BadInput(f"{path}: base_loglik_sum[{i}] (task {tasks[i]!r}) is {a['base_loglik_sum'][i]:g} > 0, but "
                       f"a sum of log-likelihoods is <= 0")


def load_sums(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The estimation sums Tune needs, from a run directory's ``likelihoods.npz`` (and ``jsd.npz`` when present)."""
    from pathlib import Path

    run_dir = Path(run_dir)
    with np.load(run_dir / "likelihoods.npz") as f:
        sums = {"tasks": [str(t) for t in f["tasks"]], "loglik_sum": f["loglik_sum"], "count": f["count"]}
    sums["signal"] = load_signal(str(run_dir / "likelihoods.npz"))
    if (run_dir / "jsd.npz").exists():
        with np.load(run_dir / "jsd.npz") as f:
            sums["jsd_sum"], sums["jsd_count"] = f["jsd_sum"], f["token_count"]
    return sums

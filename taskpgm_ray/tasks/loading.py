"""Stage 1: load each task, format (prompt, response), split train / probe / eval, write ``tasks.json``.

A task comes from the HF hub, a ``save_to_disk`` directory, or a jsonl / parquet / csv file. When the
source has a ``validation`` split it is the eval set (and ``test`` is kept for benchmarks); otherwise
eval is carved from train. The probe set is always carved from train, so probe and eval never overlap
train: a content-hash check enforces it and names the task at fault.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskpgm_ray.config import Config, TaskConfig, resolve_path
from taskpgm_ray.errors import BadInput
from taskpgm_ray.io import atomic_write_text


class TaskError(BadInput):
    """A task that cannot be loaded; the message names the task and what is wrong."""


@dataclass(frozen=True)
class Example:
    """One (prompt, response) pair; ``id`` is stable across runs (``<task>/<split>/<row>``)."""

    id: str
    prompt: str
    response: str

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(f"{self.prompt}\x00{self.response}".encode()).hexdigest()


@dataclass
class TaskData:
    """A loaded task: its splits and a content hash over all of them (the cache key of later stages)."""

    name: str
    source: str
    train: list[Example]
    probe: list[Example]
    eval: list[Example]
    test: list[Example] = field(default_factory=list)
    utility: float | None = None
    score: bool = True  # counted in the selection metric and `taskpgm compare`

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "probe": len(self.probe), "eval": len(self.eval)}

    @property
    def hash(self) -> str:
        h = hashlib.sha256(self.name.encode())
        for split in (self.train, self.probe, self.eval, self.test):
            h.update(b"\x01")
            for ex in split:
                h.update(ex.content_hash.encode())
        return h.hexdigest()[:16]

    def manifest(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "sizes": self.sizes, "hash": self.hash}


# --------------------------------------------------------------------------------------------------
# reading a source


def _read_rows(tc: TaskConfig, cfg: Config, *, kind: str = "task",
               need_split: bool = True) -> tuple[list[dict], list[dict] | None, list[dict] | None]:
    """(train rows, validation rows or None, test rows or None) from the task's source (``need_split`` false: a
    DatasetDict without the ``split`` is fine when it has validation or test, e.g. an evaluation set)."""
    import datasets

    where = f"{kind} {tc.name!r}"
    if tc.source == "hub":
        if cfg.is_offline:
            raise TaskError(f"{where}: hub dataset {tc.path!r} requested while offline (HF_HUB_OFFLINE=1)")
        data = datasets.load_dataset(tc.path)
    else:
        path = resolve_path(cfg, tc.path)
        if not path.exists():
            raise TaskError(f"{where}: file not found: {path}")
        if path.is_file() and path.stat().st_size == 0:
            raise TaskError(f"{where}: {path} is empty (0 bytes); a {tc.source} task needs rows with "
                            f"{tc.prompt_field!r} and {tc.response_field!r}")
        try:
            if tc.source == "disk":
                data = datasets.load_from_disk(str(path))
            else:
                builder = {"jsonl": "json", "parquet": "parquet", "csv": "csv"}[tc.source]
                data = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as exc:  # the datasets library's own errors are long; keep the gist
            gist = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise TaskError(f"{where}: cannot read {tc.source} source {path}: {gist}") from exc
    if isinstance(data, datasets.DatasetDict):
        split = tc.split or "train"
        if split not in data and (need_split or not {"validation", "test"} & set(data)):
            section = "tasks" if kind == "task" else "evaluation"
            raise TaskError(f"{where}: split {split!r} not in {sorted(data)} (set {section}[].split)")
        val = data["validation"].to_list() if "validation" in data and split != "validation" else None
        test = data["test"].to_list() if "test" in data and split != "test" else None
        return (data[split].to_list() if split in data else []), val, test
    return data.to_list(), None, None


def _format(rows: list[dict], tc: TaskConfig, split: str, kind: str = "task") -> list[Example]:
    """Rows -> Examples via fields or templates; rows with an empty prompt or response are dropped."""
    out: list[Example] = []
    for i, row in enumerate(rows):
        try:
            prompt = tc.prompt_template.format(**row) if tc.prompt_template else row[tc.prompt_field]
            response = tc.response_template.format(**row) if tc.response_template else row[tc.response_field]
        except KeyError as exc:
            cols = ", ".join(sorted(row))
            raise TaskError(f"{kind} {tc.name!r}: missing field {exc.args[0]!r} in {split} row {i} "
                            f"(columns: {cols})") from None
        except (ValueError, IndexError, AttributeError) as exc:  # a template str.format cannot apply to the row
            key = "prompt_template" if tc.prompt_template and _fails(tc.prompt_template, row) else "response_template"
            raise TaskError(f"{kind} {tc.name!r}: {key} {getattr(tc, key)!r} cannot format {split} row {i}: "
                            f"{exc}") from None
        if prompt is None or response is None or not str(prompt).strip() or not str(response).strip():
            continue
        out.append(Example(f"{tc.name}/{split}/{i}", str(prompt), str(response)))
    return out


def _fails(template: str, row: dict) -> bool:
    """Whether ``template.format(**row)`` raises (to name the template at fault)."""
    try:
        template.format(**row)
    except Exception:
        return True
    return False


def load_task(tc: TaskConfig, cfg: Config) -> TaskData:
    """Read, format and split one task (seeded by ``splits.seed`` and the task name)."""
    s = cfg.splits
    train_rows, val_rows, test_rows = _read_rows(tc, cfg)
    train = _format(train_rows, tc, "train")
    if not train:
        raise TaskError(f"task {tc.name!r}: no examples left after dropping empty prompts/responses")
    rng = random.Random(f"{s.seed}/{tc.name}")
    rng.shuffle(train)
    if tc.max_examples is not None:
        train = train[: tc.max_examples]
    n_probe = min(s.max_probe, max(s.min_probe, round(len(train) * s.probe_fraction)))
    if val_rows is not None:
        eval_ = _format(val_rows, tc, "validation")[: s.max_eval]
        n_eval = 0
    else:
        n_eval = min(s.max_eval, max(1, round(len(train) * s.eval_fraction)))
        eval_ = []
    if len(train) - n_probe - n_eval < 1:
        raise TaskError(f"task {tc.name!r}: {len(train)} examples are too few for {n_probe} probe + "
                        f"{n_eval} eval + at least 1 train (lower splits.min_probe or add data)")
    probe, rest = train[:n_probe], train[n_probe:]
    if n_eval:
        eval_, rest = rest[:n_eval], rest[n_eval:]
    # Carving leaves no leak by construction, except duplicate rows in the source: drop those from train.
    held_out = {ex.content_hash for ex in probe + eval_}
    carved = {ex.content_hash for ex in probe} | ({ex.content_hash for ex in eval_} if n_eval else set())
    train = [ex for ex in rest if ex.content_hash not in carved]
    leaks = [ex for ex in train if ex.content_hash in held_out]
    if leaks:
        raise TaskError(f"task {tc.name!r}: {len(leaks)} validation example(s) also appear in train "
                        f"(e.g. {leaks[0].id}); de-duplicate the source")
    test = _format(test_rows, tc, "test") if test_rows is not None else []
    return TaskData(tc.name, tc.source, train, probe, eval_, test, tc.utility, tc.score)


# --------------------------------------------------------------------------------------------------
# evaluation sets


def load_evaluation_set(tc: TaskConfig, cfg: Config) -> TaskData:
    """An evaluation set (``evaluation[]``, or a suite's ``eval_only`` task): never trained on, so it has no train
    or probe split. Its validation part (what Tune ranks on) is the source's ``validation`` split and its test
    part (what ``taskpgm compare`` scores) the ``test`` split; a part the source lacks is carved from the rows of
    ``split`` (seeded by ``splits.seed`` and the name): half of them each without either, at most
    ``splits.max_eval`` per part.
    """
    kind, s = "evaluation set", cfg.splits
    rows, val_rows, test_rows = _read_rows(tc, cfg, kind=kind, need_split=False)
    pool = _format(rows, tc, tc.split or "train", kind) if val_rows is None or test_rows is None else []
    random.Random(f"{s.seed}/evaluation/{tc.name}").shuffle(pool)
    if val_rows is None and test_rows is None:
        half = len(pool) // 2
        val, test = pool[:half], pool[half:]
    else:
        val = _format(val_rows, tc, "validation", kind) if val_rows is not None else pool
        test = _format(test_rows, tc, "test", kind) if test_rows is not None else pool
    val, test = val[: s.max_eval], test[: s.max_eval]
    if not val or not test:
        raise TaskError(f"{kind} {tc.name!r}: needs examples for validation (Tune ranks on them) and for test "
                        f"(`taskpgm compare` scores them); got {len(val)} and {len(test)}: give at least 2 rows, "
                        f"or 'validation' and 'test' splits")
    leaks = {ex.content_hash for ex in val} & {ex.content_hash for ex in test}
    if leaks and val_rows is not None and test_rows is not None:
        raise TaskError(f"{kind} {tc.name!r}: {len(leaks)} example(s) are in both its validation and test splits; "
                        f"de-duplicate the source")
    return TaskData(tc.name, tc.source, [], [], val, test, None, True)


# --------------------------------------------------------------------------------------------------
# the config's task list


def _synthetic_suite(cfg: Config) -> tuple[Path, dict] | None:
    """The synthetic suite's folder and manifest (written under ``output_dir/data`` on first use), or None."""
    if cfg.synthetic is None:
        return None
    from taskpgm_ray.tasks.synthetic import ensure_suite, load_spec

    sc = cfg.synthetic
    spec = load_spec(resolve_path(cfg, sc.spec) if sc.spec else None)
    suite_dir = Path(cfg.output_dir).resolve() / "data" / f"synthetic-{sc.seed}-{spec.hash[:8]}"
    return suite_dir, ensure_suite(suite_dir, sc.seed, scale=sc.scale, include=sc.include, spec=spec)


def _suite_configs(cfg: Config, eval_only: bool, taken: set[str]) -> list[TaskConfig]:
    suite = _synthetic_suite(cfg)
    if suite is None:
        return []
    suite_dir, manifest = suite
    out = []
    for t in manifest["tasks"]:
        if bool(t.get("eval_only", False)) != eval_only:
            continue
        if t["name"] in taken:
            raise TaskError(f"task {t['name']!r}: defined in tasks or evaluation and in the synthetic suite; "
                            f"rename one")
        out.append(TaskConfig(name=t["name"], source="disk", path=str(suite_dir / t["name"]),
                              score=t.get("score", True)))
    return out


def task_configs(cfg: Config) -> list[TaskConfig]:
    """The configured tasks, with the synthetic suite's training tasks (written under ``output_dir/data``)."""
    return list(cfg.tasks) + _suite_configs(cfg, False, {t.name for t in [*cfg.tasks, *cfg.evaluation]})


def evaluation_configs(cfg: Config) -> list[TaskConfig]:
    """The configured evaluation sets, with the synthetic suite's ``eval_only`` tasks."""
    return list(cfg.evaluation) + _suite_configs(cfg, True, {t.name for t in [*cfg.tasks, *cfg.evaluation]})


def load_tasks(cfg: Config) -> list[TaskData]:
    """Every task of the config, in config order; raises TaskError naming the first task at fault."""
    return [load_task(tc, cfg) for tc in task_configs(cfg)]


def load_evaluation(cfg: Config) -> list[TaskData]:
    """Every evaluation set of the config (empty without an ``evaluation`` section or ``eval_only`` suite tasks)."""
    return [load_evaluation_set(tc, cfg) for tc in evaluation_configs(cfg)]


def check_apart(tasks: list[TaskData], evaluation: list[TaskData]) -> None:
    """Refuse an evaluation set that shares an example with a training task's training data: it would not measure
    what it says (held-out quality). Shared names are refused earlier (the config's checks, ``_suite_configs``)."""
    seen = {ex.content_hash: t.name for t in tasks for ex in t.train}
    for e in evaluation:
        shared = [ex for ex in e.eval + e.test if ex.content_hash in seen]
        if shared:
            raise TaskError(f"evaluation set {e.name!r}: {len(shared)} example(s) are also training examples of "
                            f"task {seen[shared[0].content_hash]!r} (e.g. {shared[0].id}); an evaluation set must be "
                            f"held out")


def write_manifest(tasks: list[TaskData], output_dir: str | Path, evaluation: list[TaskData] = ()) -> Path:
    """Write ``tasks.json`` (CONTRACT.md) atomically and return its path; evaluation sets, when there are any,
    under ``evaluation`` (their sizes: validation and test examples)."""
    path = Path(output_dir) / "tasks.json"
    doc: dict[str, Any] = {"tasks": [t.manifest() for t in tasks]}
    if evaluation:
        doc["evaluation"] = [{"name": e.name, "source": e.source, "sizes": {"validation": len(e.eval),
                                                                             "test": len(e.test)}, "hash": e.hash}
                             for e in evaluation]
    atomic_write_text(path, json.dumps(doc, indent=2))
    return path

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


def _read_rows(tc: TaskConfig, cfg: Config) -> tuple[list[dict], list[dict] | None, list[dict] | None]:
    """(train rows, validation rows or None, test rows or None) from the task's source."""
    import datasets

    where = f"task {tc.name!r}"
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
        if split not in data:
            raise TaskError(f"{where}: split {split!r} not in {sorted(data)} (set tasks[].split)")
        val = data["validation"].to_list() if "validation" in data and split != "validation" else None
        test = data["test"].to_list() if "test" in data and split != "test" else None
        return data[split].to_list(), val, test
    return data.to_list(), None, None


def _format(rows: list[dict], tc: TaskConfig, split: str) -> list[Example]:
    """Rows -> Examples via fields or templates; rows with an empty prompt or response are dropped."""
    out: list[Example] = []
    for i, row in enumerate(rows):
        try:
            prompt = tc.prompt_template.format(**row) if tc.prompt_template else row[tc.prompt_field]
            response = tc.response_template.format(**row) if tc.response_template else row[tc.response_field]
        except KeyError as exc:
            cols = ", ".join(sorted(row))
            raise TaskError(f"task {tc.name!r}: missing field {exc.args[0]!r} in {split} row {i} "
                            f"(columns: {cols})") from None
        except (ValueError, IndexError, AttributeError) as exc:  # a template str.format cannot apply to the row
            key = "prompt_template" if tc.prompt_template and _fails(tc.prompt_template, row) else "response_template"
            raise TaskError(f"task {tc.name!r}: {key} {getattr(tc, key)!r} cannot format {split} row {i}: "
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
# the config's task list


def task_configs(cfg: Config) -> list[TaskConfig]:
    """The configured tasks, with the synthetic suite (written under ``output_dir/data``) appended."""
    tasks = list(cfg.tasks)
    if cfg.synthetic is not None:
        from taskpgm_ray.tasks.synthetic import ensure_suite, load_spec

        sc = cfg.synthetic
        spec = load_spec(resolve_path(cfg, sc.spec) if sc.spec else None)
        suite_dir = Path(cfg.output_dir).resolve() / "data" / f"synthetic-{sc.seed}-{spec.hash[:8]}"
        manifest = ensure_suite(suite_dir, sc.seed, scale=sc.scale, include=sc.include, spec=spec)
        taken = {t.name for t in tasks}
        for t in manifest["tasks"]:
            if t["name"] in taken:
                raise TaskError(f"task {t['name']!r}: defined in tasks and in the synthetic suite; rename one")
            tasks.append(TaskConfig(name=t["name"], source="disk", path=str(suite_dir / t["name"]), score=t["score"]))
    return tasks


def load_tasks(cfg: Config) -> list[TaskData]:
    """Every task of the config, in config order; raises TaskError naming the first task at fault."""
    return [load_task(tc, cfg) for tc in task_configs(cfg)]


def write_manifest(tasks: list[TaskData], output_dir: str | Path) -> Path:
    """Write ``tasks.json`` (CONTRACT.md) atomically and return its path."""
    path = Path(output_dir) / "tasks.json"
    atomic_write_text(path, json.dumps({"tasks": [t.manifest() for t in tasks]}, indent=2))
    return path

"""From YAML values to the typed sections and back to words: the generic dataclass builder (every type problem
reported as ``field.path: message``) and the configuration reference it documents (`taskpgm config-doc`)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal

from taskpgm_ray.config.sections import Config, TaskConfig


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Convert a YAML value to ``tp``; append ``path: message`` problems instead of raising."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(value, inner[0], path, problems)
        for a in inner:  # first that converts cleanly
            trial: list[str] = []
            out = _convert(value, a, path, trial)
            if not trial:
                return out
        problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{path}: must be one of {', '.join(map(repr, allowed))}, got {value!r}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {value!r}")
            return []
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if _is_dataclass_type(tp):
        return _build(tp, value, path, problems)
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {value!r}")
            return value
        if not math.isfinite(value):  # YAML's .nan / .inf: no field means anything by them
            problems.append(f"{path}: must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    prefix = f"{path}." if path else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{path or 'config'}: expected a mapping, got {data!r}")
        return cls() if _all_defaults(cls) else None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(fields)})"
            problems.append(f"{prefix}{key}: unknown key{hint}")
            continue
        kwargs[key] = _convert(value, hints[key], f"{prefix}{key}", problems)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{prefix}{name}: required field missing")
    try:
        return cls(**{k: v for k, v in kwargs.items()})
    except TypeError:
        return None


def _all_defaults(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )


def reference_markdown() -> str:
    """The configuration reference (every section and field with its default and doc) as markdown."""
    lines: list[str] = []
    documented: dict[type, str] = {}  # section class -> where its table is (proxy_model points to model's)

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        rows, nested = [], []
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            tp = hints[f.name]
            inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            if _is_dataclass_type(inner[0]) and typing.get_origin(tp) is not list:
                if inner[0] not in documented:  # a section of its own
                    documented[inner[0]] = f"{prefix}{f.name}"
                    nested.append((f, inner[0]))
                else:  # the same fields as a section above: one row that points there
                    rows.append(f"| `{prefix}{f.name}` | the fields of `{documented[inner[0]]}` \\| null | "
                                f"`{f.default!r}` | {f.metadata.get('doc', '')} |")
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
            type_name = _type_name(tp).replace("|", "\\|")  # a literal pipe would split the table cell
            rows.append(f"| `{prefix}{f.name}` | {type_name} | `{default!r}` | {f.metadata.get('doc', '')} |")
        if rows:
            title = prefix.rstrip(".") or "top level"
            lines.extend([f"**{title}** — {cls.__doc__}", "", "| field | type | default | meaning |",
                          "| --- | --- | --- | --- |", *rows, ""])
        for f, sub in nested:
            walk(sub, f"{prefix}{f.name}.")

    walk(Config, "")
    walk(TaskConfig, "tasks[].")
    return "\n".join(lines)

"""Loading: YAML (or a dict, with dotted overrides) in, a validated ``Config`` out, every problem at once."""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import yaml

from taskpgm_ray.config.build import _build
from taskpgm_ray.config.checks import _check, config_warnings
from taskpgm_ray.config.sections import TEST_CONFIG, Config, ConfigError, ConfigWarning
from taskpgm_ray.io import not_utf8, yaml_load


def load_config(path: str | os.PathLike | None = None, *, test_mode: bool = False,
                overrides: dict[str, Any] | None = None) -> Config:
    """Read, validate and return the config at ``path`` (``configs/test.yaml`` when ``test_mode``).

    Raises:
        ConfigError: listing every problem found, each as ``field.path: message``.
    """
    if path is None:
        if not test_mode:
            raise ConfigError(["no config given: pass CONFIG or --test-mode"])
        path = TEST_CONFIG
    path = Path(path)
    if not path.exists():
        raise ConfigError([f"config file not found: {path}"])
    try:
        data = yaml_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError([not_utf8(exc, "config")], str(path)) from None
    except IsADirectoryError:
        raise ConfigError(["is a directory, not a YAML config file"], str(path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"invalid YAML{at}: {getattr(exc, 'problem', exc)}"], str(path)) from None
    return config_from_dict(data, source=str(path), overrides=overrides)


def config_from_dict(data: dict[str, Any], *, source: str | None = None,
                     overrides: dict[str, Any] | None = None) -> Config:
    """Validate a plain dict (as read from YAML); ``overrides`` are dotted keys, e.g. ``{"train.steps": 5}``.

    A number indexes a list: ``{"tasks.0.max_examples": 5}``. ``data`` itself is left unchanged.
    """
    data = copy.deepcopy(data) if data else {}
    problems: list[str] = []
    for dotted, value in (overrides or {}).items():
        keys = dotted.split(".")
        if not all(keys):
            problems.append(f"{dotted}: an empty name between dots; write the field as section.field, e.g. train.steps")
            continue
        node: Any = data
        for depth, key in enumerate(keys):
            where, last = ".".join(keys[:depth]), depth == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit():
                    problems.append(f"{dotted}: {where} is a list: index it by position, e.g. {where}.0")
                    break
                index, size = int(key), len(node)
                if index >= size:
                    have = (f"has {size} entries (indices 0 to {size - 1})" if size > 1 else
                            "has 1 entry (index 0)" if size == 1 else "is empty")
                    problems.append(f"{dotted}: index {index} is out of range: {where} {have}")
                    break
            elif isinstance(node, dict):
                index: int | str = key
                if not last and node.get(key) is None:  # a section left out (or null): start it
                    node[key] = [] if keys[depth + 1].isdigit() else {}
            else:
                problems.append(f"{dotted}: {where} is {node!r}, not a section or a list")
                break
            if last:
                node[index] = value
            else:
                node = node[index]
    if problems:
        raise ConfigError(problems, source)
    cfg = _build(Config, data, "", problems)
    if cfg is not None and cfg.proxy_model is not None and cfg.model is not None \
            and isinstance(data.get("proxy_model"), dict):
        # A field the proxy_model section leaves out is the target model's (one level: a given `tiny` is whole).
        given = {k: getattr(cfg.proxy_model, k) for k in data["proxy_model"] if hasattr(cfg.proxy_model, k)}
        cfg.proxy_model = dataclasses.replace(cfg.model, **given)
    if cfg is not None:
        cfg.config_path = str(Path(source).resolve()) if source else None
        if not problems:
            _check(cfg, problems)
    if problems:
        raise ConfigError(problems, source)
    for message in config_warnings(cfg):
        warnings.warn(f"{source}: {message}" if source else message, ConfigWarning, stacklevel=2)
    return cfg

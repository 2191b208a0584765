"""One rule for names that become paths or code: task names, method names, output stems.

A task name is a folder under the run directory (``probes/<name>``), a file stem in exports and a string
literal in the ``--to hf`` script, so it must be a plain, printable, single path component. Every place that
turns a user's name into a path or into code checks it here, so the rule is written once.
"""

from __future__ import annotations

import re

from taskpgm_ray.errors import BadInput

# Letters, digits and . _ - + = @ inside; starts with a letter, digit or underscore (no "..", no "-flag",
# no hidden files); at most 128 characters (a folder name on every file system we ship to).
_SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-+=@]{0,127}")


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be used as a task name, or None when it can."""
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if not _SAFE.fullmatch(name) or name in {".", ".."} or ".." in name:
        return (f"{name!r} is not a safe name: use letters, digits and . _ - + = @ (starting with a letter, "
                f"digit or _, no '..', no '/', no spaces or control characters, at most 128 characters)")
    return None


def check_name(name: object, where: str) -> str:
    """Return ``name`` if it is safe as a path component and in code; else raise ``BadInput`` naming ``where``."""
    problem = name_problem(name)
    if problem:
        raise BadInput(f"{where}: {problem}")
    return name  # type: ignore[return-value]

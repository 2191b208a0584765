"""What every format's exporter is given and returns: ``_Context`` (the kept tasks' shares in the target's
unit, the tool's dataset names, the notes, the example budget's inputs) and ``MixtureExport``; and the whole
numbers of examples that the budgeted formats (llamafactory, axolotl) train on."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from taskpgm_ray.errors import BadInput


@dataclass
class MixtureExport:
    """A mixture in one tool's format: the files the tool reads, the text to print, what was changed."""

    files: dict[str, str]  # file name -> content, exactly as the tool reads it
    text: str  # what `taskpgm export` prints: the same content with its comments
    notes: list[str] = field(default_factory=list)  # tasks left out, names defaulted, units converted


@dataclass
class _Context:
    to: str
    shares: dict[str, float]  # kept task -> share in the target's unit, summing to 1
    unit: str  # what the mixture's weights count
    names: dict[str, str | dict]  # task -> what the tool knows
    notes: list[str]
    sizes: dict  # task -> training examples (may be empty)
    num_samples: int | None
    seed: int

    def comments(self, title: str, body: list[str]) -> str:
        """The comment block an export starts with: what it is, how the tool reads it, then the notes."""
        notes = [n[0].upper() + n[1:] for n in self.notes]
        return _comment([f"TaskPGM mixture for {title}", *body, *([""] + notes if notes else [])])


def _apportion(shares: dict[str, float], total: int) -> dict[str, int]:
    """Whole numbers of examples, one per task, summing to ``total`` (largest-remainder rounding)."""
    exact = {t: s * total for t, s in shares.items()}
    out = {t: math.floor(v) for t, v in exact.items()}
    for t in sorted(exact, key=lambda t: out[t] - exact[t])[: total - sum(out.values())]:
        out[t] += 1
    return out


def _budget(ctx: _Context) -> tuple[dict[str, int], str]:
    """Examples per kept task for the budgeted targets, and a line saying where the budget came from."""
    if ctx.num_samples is not None:
        total, how = ctx.num_samples, f"{ctx.num_samples:,} examples in all (--num-samples)"
    else:
        unknown = [t for t in ctx.shares if not _size(ctx.sizes, t)]
        if unknown:
            raise BadInput(f"{ctx.to} export needs --num-samples N (the examples to train on in all), or the "
                           f"mixture's 'sizes' to default to the most examples that repeat none; no size for "
                           f"task(s) {', '.join(unknown)}")
        # The largest budget at which no task needs more examples than it has: min_i N_i / share_i.
        total = min(math.floor(ctx.sizes[t] / s + 1e-9) for t, s in ctx.shares.items())
        how = f"{total:,} examples in all, the most that repeat no example (--num-samples to change)"
    counts = _apportion(ctx.shares, total)
    empty = [t for t, n in counts.items() if n == 0]
    if empty:
        ctx.notes.append(f"left out (0 examples at {total:,} in all): {', '.join(empty)}")
    return {t: n for t, n in counts.items() if n > 0}, how


def _size(sizes: dict, task: str) -> int:
    n = sizes.get(task)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0


def _comment(lines: list[str]) -> str:
    # Every physical line gets its "#": a line break inside a note (from a file path, say) never starts live code.
    return "".join(f"# {part}\n" if part else "#\n" for line in lines for part in (line.splitlines() or [""]))

"""Every figure of a run, drawn from plain data (no stage imported): the report, the estimate stage and compare
use them. Written atomically (a temporary file, then a rename), like every artefact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def spectral_order(S: np.ndarray) -> np.ndarray:
    """A clustered order of the tasks: sort by the Fiedler vector of the affinity graph's Laplacian."""
    W = np.exp(S - S.max())  # PMI <= 0: turn into positive similarities
    np.fill_diagonal(W, 0.0)
    L = np.diag(W.sum(1)) - W
    if len(S) < 3:
        return np.arange(len(S))
    _, vecs = np.linalg.eigh(L)
    return np.argsort(vecs[:, 1], kind="stable")


def savefig(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    tmp.replace(path)
    return path


def plot_affinity(names: list[str], S: np.ndarray, path: Path, title: str) -> Path:
    """Heatmap of an affinity matrix in clustered order, values annotated when small enough to read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = spectral_order(S)
    M = S[np.ix_(order, order)]
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.6 + 0.5 * n))
    im = ax.imshow(M, cmap="viridis")
    ax.set_xticks(range(n), [names[i] for i in order], rotation=45, ha="right")
    ax.set_yticks(range(n), [names[i] for i in order])
    if n <= 16:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if M[i, j] < M.mean() else "black")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(title)
    savefig(fig, path)
    plt.close(fig)
    return path


def plot_mixtures(names: list[str], mixtures: dict[str, np.ndarray], path: Path) -> Path:
    """Grouped bars: the chosen mixture beside the baselines, one group per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, k = len(names), len(mixtures)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * n), 3.6))
    width = 0.8 / k
    for i, (label, w) in enumerate(mixtures.items()):
        ax.bar(np.arange(n) + (i - (k - 1) / 2) * width, w, width, label=label)
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_ylabel("weight")
    ax.set_title("mixture weights")
    ax.legend(frameon=False)
    savefig(fig, path)
    plt.close(fig)
    return path


def plot_losses(summary: dict, path: Path) -> Path | None:
    """Training loss and mean validation loss over steps (from ``train/summary.json``'s history)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = summary.get("loss_curve") or []  # mean training loss of steps 1..n
    evals = summary.get("history") or []  # one row per evaluation
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.4))
    if train:
        ax.plot(range(1, len(train) + 1), train, label="train loss", alpha=0.8)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss_mean"] for r in evals], "o-", label="validation loss (mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.legend(frameon=False)
    ax.set_title("fine-tune on the mixture")
    savefig(fig, path)
    plt.close(fig)
    return path


def plot_tune(results: dict, path: Path) -> Path | None:
    """Tune trials: beta/lambda ratio against validation loss; baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = [t for t in results["trials"] if t["validation_loss"] is not None]
    if not trials:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for aff, marker in (("pmi", "o"), ("jsd", "s")):
        pts = [t for t in trials if t["kind"] == "taskpgm" and t["affinity"] == aff]
        if pts:
            ax.scatter([t["hyperparameters"]["ratio"] for t in pts], [t["validation_loss"] for t in pts],
                       marker=marker, label=f"TaskPGM ({aff})")
    for t in trials:
        if t["kind"] != "taskpgm":
            label = t["kind"] + (f" T={t['params']['temperature']}" if t["params"].get("temperature") else "")
            ax.axhline(t["validation_loss"], ls="--", lw=1, color="gray")
            ax.annotate(label, (0.01, t["validation_loss"]), xycoords=("axes fraction", "data"), fontsize=7,
                        va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("beta / lambda")
    ax.set_ylabel("validation loss (mean over tasks)")
    ax.set_title("Tune trials")
    ax.legend(frameon=False)
    savefig(fig, path)
    plt.close(fig)
    return path


def plot_compare(results: dict[str, Any], path: Path) -> Path:
    """Test-loss curves (scored mean) of every method, one panel per seed (at most four)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["seeds"][:4]
    fig, axes = plt.subplots(1, len(rows), figsize=(4.5 * len(rows), 3.4), squeeze=False)
    for ax, r in zip(axes[0], rows):
        for method, curve in r["curves"].items():
            ax.plot([c[0] for c in curve], [c[1] for c in curve], "o-", ms=3, label=method)
        ax.set_title(f"seed {r['seed']}")
        ax.set_xlabel("step")
        ax.set_ylabel("test loss (scored tasks)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    out = savefig(fig, path)
    plt.close(fig)
    return out

"""Stages 4-5 from cached sums: the config's energy settings applied to ``mixture.taskpgm_mixture``.

Pure numpy on top of ``taskpgm_ray.mixture`` (no Ray; it lives here because it reads the config); the
central optimiser calls it after every shard, and the pipeline and Tune call it to re-solve the same sums
for other energy hyperparameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from taskpgm_ray.config import EnergyConfig
from taskpgm_ray.errors import BadInput


def affinity_from_sums(loglik_sum: np.ndarray, count: np.ndarray, jsd_sum: np.ndarray | None,
                       jsd_count: float | np.ndarray | None, affinity: str) -> np.ndarray:
    """The (n, n) affinity before the kernel: larger means more alike.

    pmi: ``pmi_affinity(loglik_sum / count[None, :])`` (column j = task j's probe set).
    jsd: ``1 - (jsd_sum / jsd_count) / ln 2`` (mean JSD over probe tokens, as a similarity in [0, 1]).
    """
    from taskpgm_ray.mixture import jsd_similarity, pmi_affinity

    if affinity == "pmi":
        count = np.asarray(count, dtype=np.float64)
        if np.any(count <= 0):
            raise ValueError(f"no probe examples scored for task column(s) {np.flatnonzero(count <= 0).tolist()}")
        return pmi_affinity(np.asarray(loglik_sum, dtype=np.float64) / count[None, :])
    if affinity == "jsd":
        if jsd_sum is None or jsd_count is None:
            raise BadInput("energy.affinity 'jsd' needs JSD sums: run estimation with estimation.jsd: true")
        tokens = np.asarray(jsd_count, dtype=np.float64)
        if np.any(tokens <= 0):
            raise ValueError("energy.affinity 'jsd': no probe tokens were scored")
        # Clip float round-off: a mean of per-token values in [0, ln 2] stays in [0, ln 2].
        return jsd_similarity(np.clip(np.asarray(jsd_sum, dtype=np.float64) / tokens, 0.0, np.log(2)), "linear")
    raise ValueError(f"unknown affinity {affinity!r}; choose 'pmi' or 'jsd'")


def weight_caps(sizes: Sequence[int], repetition_cap: float | None, examples_budget: int) -> np.ndarray | None:
    """Per-task upper bounds so that no task is asked for more than ``repetition_cap`` epochs of its data:
    ``min(1, cap * N_i / budget)`` with budget = training steps x global batch (None without a cap).

    Raises:
        ValueError: the caps cannot add up to 1 (the budget needs more epochs than the cap allows).
    """
    if repetition_cap is None:
        return None
    caps = np.minimum(1.0, repetition_cap * np.asarray(sizes, dtype=np.float64) / max(1, examples_budget))
    if caps.sum() < 1.0 - 1e-9:
        raise BadInput(f"train.repetition_cap {repetition_cap:g}: {examples_budget} training examples need "
                       f"{examples_budget / max(1, sum(sizes)):.3g} epochs of all the data; raise the cap or "
                       f"lower train.steps")
    return caps


def mixture_caps(cfg, tasks) -> np.ndarray | None:
    """``weight_caps`` for a run: ``train.repetition_cap`` epochs of each task's training data within the final
    fine-tune's budget (steps x micro batch x accumulation x workers)."""
    t = cfg.train
    budget = t.steps * t.micro_batch_size * t.grad_accum * t.num_workers
    return weight_caps([len(task.train) for task in tasks], t.repetition_cap, budget)


def fine_tune_bounds(cfg, tasks) -> tuple[np.ndarray, np.ndarray | None]:
    """The fine-tune's per-task bounds, the same for every mixture trained (one protocol): at least
    ``energy.floor / n`` (capped by the upper bound) and at most ``mixture_caps`` (``train.repetition_cap``)."""
    hi = mixture_caps(cfg, tasks)
    lo = np.full(len(tasks), cfg.energy.floor / max(1, len(tasks)))
    return (lo if hi is None else np.minimum(lo, hi)), hi


def constrained(weights: Mapping[str, float], cfg, tasks) -> dict[str, float]:
    """``weights`` (task -> weight) as the fine-tune trains them: through ``mixture.within_bounds`` onto
    ``fine_tune_bounds``; the identity on a mixture already within them (a TaskPGM solution)."""
    from taskpgm_ray.mixture import within_bounds

    names = [t.name for t in tasks]
    lo, hi = fine_tune_bounds(cfg, tasks)
    w = within_bounds([float(weights.get(n, 0.0)) for n in names], lo, hi)
    return dict(zip(names, map(float, w)))


def solve_from_sums(loglik_sum: np.ndarray, count: np.ndarray, jsd_sum: np.ndarray | None,
                    jsd_count: float | np.ndarray | None, energy_cfg: EnergyConfig,
                    utilities: Sequence[float | None] | None = None, signal: Mapping[str, np.ndarray] | None = None,
                    max_weights: np.ndarray | None = None, sizes: Sequence[int] | None = None):
    """Solve the TaskPGM mixture from estimation sums with a config's energy (``mixture.taskpgm_mixture``).

    Args:
        loglik_sum: (n, n) summed response log-likelihoods, row = proxy i, column = task j's probe set.
        count: (n,) probe examples summed in each column.
        jsd_sum, jsd_count: (n, n) summed per-token JSD and the number of tokens (or None without JSD).
        energy_cfg: every ``energy`` setting.
        utilities: per-task utilities, needed when ``energy_cfg.unary == "utility"``.
        signal: the estimate stage's per-task signal sums (``mixture_file.SIGNAL_ARRAYS``): the information
            unary (``mixture.signal.information_unary``, needed when ``energy_cfg.unary == "information"``) and,
            with ``energy_cfg.prior_skip_output_only``, the tasks the prior skips (``mixture.signal.output_only``);
            with ``energy_cfg.unlearned == "neutral"``, the tasks without evidence (``information_evidence``).
        max_weights: (n,) per-task upper bounds (``weight_caps``), combined with ``energy_cfg.max_weight``.
        sizes: (n,) training examples per task, needed by the size and temperature priors.

    Returns:
        ``(weights (n,), MixtureSolution, K)`` where K is the (n, n) energy matrix before the prior term.
        With a budget k < n the other weights are 0 (``solution.extra["selected"]`` lists the chosen tasks).
    """
    from taskpgm_ray.mixture.signal import information_evidence, information_unary, output_only
    from taskpgm_ray.mixture.taskpgm import taskpgm_mixture

    e = energy_cfg
    information = skip = unlearned = None
    if signal is not None:
        information = information_unary(signal)
    if signal is not None and e.unary == "information" and e.unlearned == "neutral":
        evidence = information_evidence(signal)
        unlearned = None if evidence is None else ~evidence
    if signal is not None and e.prior_skip_output_only:
        skip = output_only(signal, np.diag(np.asarray(loglik_sum, dtype=np.float64)), count)
    jsd_mean = None
    if e.affinity == "jsd":
        if jsd_sum is None or jsd_count is None or np.any(np.asarray(jsd_count, dtype=np.float64) <= 0):
            raise BadInput("energy.affinity 'jsd' needs JSD sums: run estimation with estimation.jsd: true")
        jsd_mean = np.asarray(jsd_sum, dtype=np.float64) / np.asarray(jsd_count, dtype=np.float64)
    upper = e.max_weight
    if max_weights is not None:
        upper = np.minimum(max_weights, 1.0 if e.max_weight is None else e.max_weight)
    n = len(count)
    m = e.budget if e.budget is not None and e.budget < n else n  # the tasks that share the mixture
    who = f"{m} tasks" if m == n else f"energy.budget's {m} tasks"
    if e.min_weight is not None and e.min_weight * m > 1 + 1e-9:
        raise BadInput(f"energy.min_weight {e.min_weight:g}: {who} with at least that much each need "
                       f"{e.min_weight * m:g} > 1 of the mixture; lower it to at most 1/{m} = {1 / m:.4g}")
    if e.max_weight is not None:
        total = float(np.sort(np.broadcast_to(upper, (n,)))[-m:].sum())
        if total < 1 - 1e-9:
            raise BadInput(f"energy.max_weight {e.max_weight:g}: the upper bounds of {who} add up to {total:.4g} "
                           f"< 1, so no mixture fits under them; raise it to at least 1/{m} = {1 / m:.4g}")
    sol = taskpgm_mixture(
        loglik_sum, count, beta=e.beta, lam=e.lam, affinity=e.affinity, jsd_mean=jsd_mean, kernel=e.kernel,
        tau=e.tau, eps=e.eps, unary=e.unary, information=information, unlearned=unlearned,
        utilities=list(utilities) if utilities is not None else None, normalize=e.normalize, prior=e.prior,
        prior_temperature=e.prior_temperature, prior_strength=e.prior_strength, sizes=sizes, prior_skip=skip,
        floor=e.floor, min_weight=e.min_weight, max_weight=upper, budget=e.budget, method=e.method)
    return np.asarray(sol.weights, dtype=np.float64), sol, sol.extra["K"]

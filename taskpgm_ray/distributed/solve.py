"""Stages 4-5 from cached sums: affinity, energy matrix and mixture, with no model in sight.

Pure numpy on top of ``taskpgm_ray.mixture``; the central optimiser calls it after every shard, and the
pipeline and Tune call it to re-solve the same sums for other energy hyperparameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from taskpgm_ray.config import EnergyConfig


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
            raise ValueError("energy.affinity 'jsd' needs JSD sums: run estimation with estimation.jsd: true")
        tokens = np.asarray(jsd_count, dtype=np.float64)
        if np.any(tokens <= 0):
            raise ValueError("energy.affinity 'jsd': no probe tokens were scored")
        # Clip float round-off: a mean of per-token values in [0, ln 2] stays in [0, ln 2].
        return jsd_similarity(np.clip(np.asarray(jsd_sum, dtype=np.float64) / tokens, 0.0, np.log(2)), "linear")
    raise ValueError(f"unknown affinity {affinity!r}; choose 'pmi' or 'jsd'")


def solve_from_sums(loglik_sum: np.ndarray, count: np.ndarray, jsd_sum: np.ndarray | None,
                    jsd_count: float | np.ndarray | None, energy_cfg: EnergyConfig,
                    utilities: Sequence[float | None] | None = None):
    """Solve the TaskPGM mixture from estimation sums.

    Args:
        loglik_sum: (n, n) summed response log-likelihoods, row = proxy i, column = task j's probe set.
        count: (n,) probe examples summed in each column.
        jsd_sum, jsd_count: (n, n) summed per-token JSD and the number of tokens (or None without JSD).
        energy_cfg: affinity, kernel (tau, eps), beta, lam, unary, method, budget, min/max weight.
        utilities: per-task utilities, needed when ``energy_cfg.unary == "utility"``.

    Returns:
        ``(weights (n,), MixtureSolution, S)`` where S is the (n, n) energy matrix that was minimised.
        With a budget k < n the solution is the minimiser over the greedily chosen k tasks and the
        other weights are 0 (``solution.extra["selected"]`` lists the chosen indices).
    """
    from taskpgm_ray.mixture import energy_matrix, minimize_energy, select_budgeted

    e = energy_cfg
    A = affinity_from_sums(loglik_sum, count, jsd_sum, jsd_count, e.affinity)
    S = energy_matrix(A, e.kernel, tau=e.tau, eps=e.eps)
    n = S.shape[0]
    unary = None
    if e.unary == "utility":
        missing = [i for i, u in enumerate(utilities or [None] * n) if u is None]
        if utilities is None or missing:
            raise ValueError(f"energy.unary 'utility' needs a `utility` for every task; missing for task "
                             f"index(es) {missing}")
        unary = np.asarray(utilities, dtype=np.float64)
    bounds = {"min_weight": e.min_weight, "max_weight": e.max_weight}
    if e.budget is not None and e.budget < n:
        keep = select_budgeted(S, e.budget, beta=e.beta, lam=e.lam, unary=unary)
        sub_unary = None if unary is None else unary[keep]
        if sub_unary is None:  # representativeness stays the row sums over *all* tasks, as in the greedy
            sub_unary = S.sum(1)[keep]
        sol = minimize_energy(S[np.ix_(keep, keep)], beta=e.beta, lam=e.lam, unary=sub_unary, method=e.method,
                              **bounds)
        weights = np.zeros(n)
        weights[keep] = sol.weights
        sol.extra["selected"] = list(map(int, keep))
        return weights, sol, S
    sol = minimize_energy(S, beta=e.beta, lam=e.lam, unary=unary, method=e.method, **bounds)
    return np.asarray(sol.weights, dtype=np.float64), sol, S

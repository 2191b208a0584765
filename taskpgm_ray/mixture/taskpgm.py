"""The whole TaskPGM algorithm in one function: estimation sums in, a mixture on the simplex out.

Start here. Every step is one of the named pieces of ``taskpgm_ray.mixture``; this file only chains them.

    L[i, j]   = loglik_sum[i, j] / count[j]            mean response log-likelihood, proxy i on task j's probes
    A         = pmi_affinity(L)                         (or the JSD similarity)       <= 0, symmetric
    K         = energy_matrix(A, kernel)                symmetric PSD: psd shift | eigenvalue clip | exp
    u         = row sums of K (representativeness)  |  information (fraction of log K)  |  user utilities
    normalize:  K <- K / mean(diag K),  u <- u / max|u|
    unlearned:  u_i <- sum_j q_j u_j / sum_j q_j over the tasks j with evidence  (energy.unlearned "neutral")
    prior:      + (mu / 2) sum_i (p_i - q_i)^2 / q_i,   q = uniform | size | temperature(T) mixture
    bounds:     lo_i = max(min_weight, floor / n), hi_i = max_weight (e.g. repetition caps)
    p         = argmin_{p in simplex, lo <= p <= hi} (lam / 2) p^T K p - beta u^T p + prior(p)

The prior term is quadratic: on the simplex it equals ``(mu / 2) p^T diag(1/q) p`` up to a constant, so the
problem stays the QP that ``minimize_energy`` solves, with the matrix ``lam K + mu diag(1/q)`` (and lam = 1
passed to the solver). Its role: a small dataset saturates sooner than a large one, which the affinity does
not know; with q a temperature mixture, large mu gives temperature sampling and the energy moves mass
away from it where the proxies' evidence says so (noise, redundancy, information). ``prior_skip`` names tasks
whose baseline weight is only their lower bound (the floor): with ``energy.prior_skip_output_only`` (off by
default) the pipeline passes the tasks whose proxy learned the answers but not their dependence on the prompt
(``signal.output_only``); noise looks like that, but so does a skill beyond a small proxy.

The paper's energy (TaskPGM, arXiv 2507.12612) is ``kernel="psd", unary="representativeness",
normalize=False, prior="none", floor=0``. The defaults differ because of what was measured on the synthetic
benchmark (README, "The energy, measured"): there the paper's representativeness puts most of the mass on
noise tasks, whose proxies hedge over every answer and so score every task well, and the psd shift flattens
the pairwise structure. ``information`` (``taskpgm_ray.mixture.signal``) is near 0 for noise by construction.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from taskpgm_ray.mixture.affinity import pmi_affinity
from taskpgm_ray.mixture.baselines import baseline_weights
from taskpgm_ray.mixture.budgeted import select_budgeted
from taskpgm_ray.mixture.kernels import energy_matrix, jsd_similarity
from taskpgm_ray.mixture.solvers import MixtureSolution, minimize_energy

UNARIES = ("representativeness", "information", "utility")
PRIORS = ("none", "uniform", "size", "temperature")


def taskpgm_mixture(
    loglik_sum: np.ndarray,
    count: np.ndarray,
    *,
    beta: float = 1.0,
    lam: float = 1.0,
    affinity: str = "pmi",
    jsd_mean: np.ndarray | None = None,
    kernel: str = "clip",
    tau: float = 1.0,
    eps: float = 1e-6,
    unary: str = "information",
    information: np.ndarray | None = None,
    unlearned: np.ndarray | None = None,
    utilities: Sequence[float] | None = None,
    normalize: bool = True,
    prior: str = "temperature",
    prior_temperature: float = 2.0,
    prior_strength: float = 0.3,
    sizes: Sequence[int] | None = None,
    prior_skip: np.ndarray | None = None,
    floor: float = 0.2,
    min_weight: float | np.ndarray | None = None,
    max_weight: float | np.ndarray | None = None,
    budget: int | None = None,
    method: str = "exact",
) -> MixtureSolution:
    """The TaskPGM mixture from estimation sums (the steps in the module docstring).

    Args:
        loglik_sum: (n, n) summed response log-likelihoods, row = proxy i, column = task j's probe set.
        count: (n,) probe examples summed in each column.
        beta, lam: weights of the unary and pairwise terms (after normalisation: comparable for any n).
        affinity: "pmi" (from L) or "jsd" (``jsd_mean``: (n, n) mean per-token JSD in nats).
        kernel, tau, eps: ``energy_matrix`` options.
        unary: "representativeness" (row sums of K), "information" (``information``: (n,) each proxy's bounded
            input-output information as a fraction of its bound, ``signal.information_unary``) or "utility".
        normalize: scale K to mean diagonal 1 and u to max |u| = 1.
        unlearned: (n,) bool, tasks whose unary is no evidence (``signal.information_evidence`` false: the proxy
            did not learn the task, which is no evidence that the target will not). They get the prior-weighted
            mean of the other tasks' unary, so the unary moves them neither up nor down: without the pairwise term
            and the bounds, exactly their prior share. None: every unary is taken as it is.
        prior, prior_temperature, prior_strength: the baseline mixture q the energy leans towards, and mu.
        sizes: (n,) training examples per task (needed by the size and temperature priors).
        prior_skip: (n,) bool, tasks the prior's baseline gives only their lower bound (``floor / n``; 0 without
            a floor, which holds them at 0); the others share the rest of q in proportion.
        floor: every task gets at least ``floor / n`` (a fraction of its uniform weight; capped by
            ``max_weight``): a task left out of the fine-tune loses even its answer format, which costs far
            more loss than the few examples the floor spends (measured: README).
        min_weight, max_weight: scalar or (n,) bounds, e.g. repetition caps.
        budget: choose at most k tasks (greedy on the same energy), then minimise over them.
        method: ``minimize_energy``'s solver.

    Returns:
        ``MixtureSolution``; ``extra`` holds the affinity ``A``, the matrix ``K``, the unary ``u`` and the
        prior ``q`` that were used (and ``selected`` with a budget).

    Raises:
        ValueError: a missing input for the chosen unary, affinity or prior, or an unknown option.
    """
    count = np.asarray(count, dtype=np.float64)
    if np.any(count <= 0):
        raise ValueError(f"no probe examples scored for task column(s) {np.flatnonzero(count <= 0).tolist()}")
    if affinity == "pmi":
        A = pmi_affinity(np.asarray(loglik_sum, dtype=np.float64) / count[None, :])
    elif affinity == "jsd":
        if jsd_mean is None:
            raise ValueError("affinity 'jsd' needs the mean JSD matrix: run estimation with estimation.jsd: true")
        A = jsd_similarity(np.clip(np.asarray(jsd_mean, dtype=np.float64), 0.0, np.log(2)), "linear")
    else:
        raise ValueError(f"unknown affinity {affinity!r}; choose 'pmi' or 'jsd'")
    K = energy_matrix(A, kernel, tau=tau, eps=eps)
    n = K.shape[0]

    if unary == "representativeness":
        u = K.sum(1)
    elif unary == "information":
        if information is None:
            raise ValueError("unary 'information' needs each task's information (the scores under other prompts "
                             "of the estimate stage)")
        u = np.asarray(information, dtype=np.float64)
    elif unary == "utility":
        missing = [i for i, x in enumerate(utilities if utilities is not None else [None] * n) if x is None]
        if missing:
            raise ValueError(f"energy.unary 'utility' needs a `utility` for every task; missing for task "
                             f"index(es) {missing}")
        u = np.asarray(utilities, dtype=np.float64)
    else:
        raise ValueError(f"unknown unary {unary!r}; choose one of {', '.join(UNARIES)}")
    if u.shape != (n,) or not np.all(np.isfinite(u)):
        raise ValueError(f"the unary must be {n} finite numbers, got shape {u.shape}")

    if normalize:
        scale = float(np.mean(np.diag(K)))
        K = K / scale if scale > 0 else K
        top = float(np.max(np.abs(u)))
        u = u / top if top > 0 else u

    lo = np.maximum(np.zeros(n) if min_weight is None else np.broadcast_to(min_weight, (n,)), floor / n)
    hi = None if max_weight is None else np.broadcast_to(max_weight, (n,)).astype(np.float64)
    if hi is not None:
        lo = np.minimum(lo, hi)

    q = _prior(prior, sizes, prior_temperature, n)
    skip = np.zeros(n, bool) if prior_skip is None else np.asarray(prior_skip, dtype=bool)
    if q is not None and skip.shape != (n,):
        raise ValueError(f"prior_skip must be {n} booleans, got shape {skip.shape}")
    if q is not None and skip.any():
        # The baseline gives a skipped task only its lower bound; the others share the rest as before. (Dropping
        # its term instead would leave it the one task without the prior's curvature: the cheapest to fill.)
        rest = 1.0 - float(lo[skip].sum())
        q = None if skip.all() or rest <= 0 else np.where(skip, lo, q * rest / q[~skip].sum())
    matrix, solver_lam = K, lam
    if q is not None and prior_strength > 0:
        # (lam/2) p^T K p + (mu/2) sum (p_i - q_i)^2 / q_i = (1/2) p^T (lam K + mu diag(1/q)) p + const on the
        # simplex; a zero q_i (a skipped task without a floor) allows only p_i = 0: its bound, not its curvature
        zero = q <= 0
        if zero.any():
            hi = np.where(zero, 0.0, np.ones(n) if hi is None else hi)
        pull = np.where(zero, 0.0, 1.0 / np.where(zero, 1.0, q))
        matrix, solver_lam = lam * K + prior_strength * np.diag(pull), 1.0

    if unlearned is not None:
        unlearned = np.asarray(unlearned, dtype=bool)
        if unlearned.shape != (n,):
            raise ValueError(f"unlearned must be {n} booleans, got shape {unlearned.shape}")
        if unlearned.any() and not unlearned.all():
            w = (q if q is not None else np.full(n, 1.0 / n))[~unlearned]
            u = np.where(unlearned, float(w @ u[~unlearned] / w.sum()) if w.sum() > 0 else 0.0, u)

    bounds = {"min_weight": lo if np.any(lo > 0) else None, "max_weight": hi}
    extra = {"affinity": A, "K": K, "u": u, "q": q}
    if budget is not None and budget < n:
        keep = np.asarray(select_budgeted(matrix, budget, beta=beta, lam=solver_lam, unary=u))
        sub = {k: (v[keep] if isinstance(v, np.ndarray) else v) for k, v in bounds.items()}
        sol = minimize_energy(matrix[np.ix_(keep, keep)], beta=beta, lam=solver_lam, unary=u[keep], method=method,
                              **sub)
        weights = np.zeros(n)
        weights[keep] = sol.weights
        sol.weights = weights
        extra["selected"] = list(map(int, keep))
    else:
        sol = minimize_energy(matrix, beta=beta, lam=solver_lam, unary=u, method=method, **bounds)
    sol.extra.update(extra)
    if not sol.success:
        note = (f"solver {method!r} did not reach the minimiser (KKT residual {sol.kkt_residual:.2e} after "
                f"{sol.iterations} iterations)")
        if method != "closed_form":
            raise ValueError(f"{note}: use method 'exact' or raise its iteration limit")
        warnings.warn(f"{note}: closed_form is the paper's projection, not the constrained minimiser; "
                      f"method 'exact' finds it", stacklevel=2)
    return sol


def _prior(prior: str, sizes: Sequence[int] | None, temperature: float, n: int) -> np.ndarray | None:
    if prior == "none":
        return None
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}; choose one of {', '.join(PRIORS)}")
    if prior == "uniform":
        return np.full(n, 1.0 / n)
    if sizes is None:
        raise ValueError(f"prior {prior!r} needs the tasks' training sizes")
    if prior == "size":
        return baseline_weights("size", sizes)
    return baseline_weights("temperature", sizes, temperature=temperature)

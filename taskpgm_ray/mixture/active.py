"""Active estimation: score a fraction of the (proxy, probe shard) pairs, fill in the rest, and stop when the
mixture is certain.

Four steps, each one function in and one result out::

    plan = initial_pairs(count)                                    # the cheap first pass
    ... score the planned (proxy i, task j, shard s) units: loglik_sum[i, j, s], scored[i, j, s] = True
    comp = complete_likelihoods(loglik_sum, count, scored)         # every entry of L, with its std
    cert = mixture_certainty(comp, solve, tol=0.01)                # bootstrap of the mixture; stop?
    todo = next_pairs(comp, cert, budget)                          # (k, 3) units to score next

The first pass, the stop rule and the selection are here; the completion (its measurement and error model,
how the latter is calibrated, the pair of a cell and its transpose) is in mixture/completion.py, whose
``LikelihoodCompletion`` and ``complete_likelihoods`` this module re-exports.

The bootstrap of the mixture (``mixture_certainty``) draws matrices ``Lhat + error`` from the completion's
error model, including the parts shared by a whole row, column or shard offset and by a cell and its
transpose, and solves each; the stop rule is on the spread of those mixtures.
``next_pairs`` then scores next the units with the largest (sensitivity of the mixture to the entry)^2 x
(drop of the entry's variance).

Calibration. The rule is only as good as the error of the unscored cells, which are not like the scored ones
(module docstring of mixture/completion.py, "Calibration"). In benchmarks/active.py, with tau^2 taken from a
held-out tenth of the scored cells and the sample quantile of the draws, the declared 90%
bound held at 67.7%, 57.5% and 63% of the active runs' checks at n = 100, 300 and 1000 (each check's L1 to
full scoring against its declared bound, in benchmarks/results/active.json as of commit 44e97d1). Two parts
of the completion's error model answer that (tau^2 importance-weighted towards the unscored cells and taken at its
upper bound; the row and column variances scaled up to what held-out cells share), and one of the rule:

* The declared bound is a 95% upper confidence bound on the ``level`` quantile of the bootstrap's L1
  (the order statistic 62 of 64 at level 0.9), not the sample quantile: the rule is checked every
  round, and a 64-draw quantile that dips below tol by chance is the one that would stop the run.

With these the declared bound held at 92.9%, 95.9% and 86.4% of the active runs' checks at n = 100, 300
and 1000 (benchmarks/results/active.json, counted as above), and in 36 of the 37 two-checks-in-a-row stops
made before everything was scored (55 of 58 one-check stops; the TARGET lines of
benchmarks/results/active.txt). The price is caution where there is least to save: at n = 100 the 0.01 rule
(two checks) stopped in 3 of 10 runs (active.txt; 8 of 10 in the file as of commit 44e97d1), and scored every
pair in the others. These figures are for the paper's energy (the benchmark's) and for the rule before the
pair covariance (mixture/completion.py, "The pair", with its coverage figures; active.txt and active.json
were last written at commit 5b35e79).

Known limits: the calibration is still model-based (a task passed over early because its first cells
looked bad by chance keeps that bias, and nothing in the scored cells shows it; that is what the misses
left are); asking for two certain checks in a row, as the pipeline does, is the recommended use.

Selection: the point estimate, not the bound (``SELECT_NOMINAL``, on). The calibration above is for the
stop rule, which must not stop early; it is no better a guide to where to score next. A prior variance
raised for every unscored cell makes one unscored cell look as worth scoring as the next, and the
selection spread its budget over more pairs (at n = 300 the pairs needed to be within 0.01 L1 of full
scoring rose from 23.8% to 26.9% on average: benchmarks/results/active.txt as of commits 44e97d1 and
c923abb). So the completion also keeps the nominal prior variance
``V_ij``: tau^2 the plain held-out mean excess (no importance weights, no upper bound) and the row and
column variances as the fit gives them. ``next_pairs``' variance drops use it; the estimate, its ``std``,
the rule's draws and the sensitivities (slopes over those draws) are the calibrated model's. With the
switch off, selection uses the calibrated ``V_ij`` too. In benchmarks/active.py at n = 300: within 0.01 at
24.1% of the pairs on average (max 27.7%), the two-check stop at 32.6% (31.9% with the calibrated V_ij);
at the one n = 1000 matrix 19.0% (14.8%): benchmarks/results/active.txt (the calibrated V_ij's figures: the
file as of commit c923abb).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from taskpgm_ray.mixture.affinity import pmi_affinity
from taskpgm_ray.mixture.completion import (  # noqa: F401 (complete_likelihoods: re-exported)
    LikelihoodCompletion,
    _check_count,
    complete_likelihoods,
)

CRITERIA = ("l1", "band")
QUANTILE_CONFIDENCE = 0.95  # the declared L1 is this upper confidence bound on the level-quantile


# ---------------------------------------------------------------------------------------------------------
# The first pass
# ---------------------------------------------------------------------------------------------------------


def initial_pairs(count: np.ndarray, *, fraction: float = 0.05, full_per_task: int = 2, seed: int = 0) -> np.ndarray:
    """The cheap first pass: which (proxy i, task j, shard s) units to score before any choice is made.

    * every diagonal pair (proxy j on task j), on all of task j's shards: a task's own-proxy likelihood
      enters every entry of its row of S (``S[j, b]`` has ``-L[j, j] / 2``), so it is needed exactly;
    * ``full_per_task`` other proxies per task, chosen at random, on all shards: with the diagonal they
      fix the shard offsets and the per-example noise of the task;
    * a random ``fraction`` of the other off-diagonal pairs on the task's smallest shard (ties: the
      first), so that every single-shard cell of a task sits on the same, well-offset shard.
      ``fraction=1`` is "every proxy on one small shard of every task".

    Args:
        count: (n, n_shards) examples in shard s of task j (0 where task j has fewer shards).
        fraction: share of the remaining off-diagonal pairs scored on one shard, in [0, 1].
        full_per_task: other proxies per task scored on every shard (0 to skip).
        seed: seed of the random choices.

    Returns:
        scored plan, bool (n, n, n_shards): ``plan[i, j, s]`` = score proxy i on shard s of task j.
    """
    c = _check_count(count)
    n, n_shards = c.shape
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if full_per_task < 0 or full_per_task > n - 1:
        raise ValueError(f"full_per_task must be in [0, n - 1] = [0, {n - 1}], got {full_per_task}")
    rng = np.random.default_rng(seed)
    has = c > 0  # (n, S): shard s of task j exists
    plan = np.zeros((n, n, n_shards), dtype=bool)
    full = np.eye(n, dtype=bool)
    for j in range(n):
        others = np.delete(np.arange(n), j)
        full[rng.choice(others, full_per_task, replace=False), j] = True
    plan |= full[:, :, None] & has[None, :, :]
    first = np.argmin(np.where(has, c, np.inf), axis=1)  # (n,) the smallest shard of each task
    pick = (rng.random((n, n)) < fraction) & ~full
    i, j = np.nonzero(pick)
    plan[i, j, first[j]] = True
    return plan


# ---------------------------------------------------------------------------------------------------------
# Certainty: the stop rule
# ---------------------------------------------------------------------------------------------------------


@dataclass
class MixtureCertainty:
    """The result of ``mixture_certainty``: the mixture, its bootstrap, and the stop decision.

    Attributes:
        weights: (n,) ``solve(completion.loglik_mean)``, the mixture now.
        samples: (n_boot, n) the mixtures of the bootstrap draws (the rule's; not the wider ones).
        low, high: (n,) the central ``level`` band of each weight.
        l1: (n_boot,) L1 distance of each draw's mixture to ``weights``.
        expected_l1: mean of ``l1``: the estimated expected L1 distance to the full-scoring mixture.
        l1_at_level: the declared certainty, "within this L1 of the full-scoring mixture with probability
            ``level``": a 95% upper confidence bound on the ``level`` quantile of ``l1`` (an order
            statistic of the draws, see the module docstring), the largest draw when ``n_boot`` is small.
        band_width: max over tasks of ``high - low``.
        sensitivity: (n,) ``|d p_t / d u_t|``: how strongly task t's weight answers a change of its
            representativeness ``u_t = sum_b S[t, b]``, the slope of ``p_t`` on ``u_t`` over the draws;
            ``next_pairs`` turns it into a per-entry sensitivity.
        shift_sensitivity: ``sum_t |d p_t / d lambda|``, the L1 answer of the mixture to the smallest
            eigenvalue lambda of S (the psd kernel's shift ``-lambda`` is a ridge on every weight), and
            shift_direction: (n,) its eigenvector v; an entry moves lambda by about ``v_i v_j dL_ij``.
        certain: whether the stop rule fires: ``l1_at_level <= tol`` (criterion "l1") or
            ``band_width <= tol`` (criterion "band").
        criterion, tol, level, n_boot: the rule's settings.
    """

    weights: np.ndarray
    samples: np.ndarray
    low: np.ndarray
    high: np.ndarray
    l1: np.ndarray
    expected_l1: float
    l1_at_level: float
    band_width: float
    sensitivity: np.ndarray
    shift_sensitivity: float
    shift_direction: np.ndarray
    certain: bool
    criterion: str
    tol: float
    level: float
    n_boot: int


def mixture_certainty(
    completion: LikelihoodCompletion,
    solve: Callable[[np.ndarray], np.ndarray],
    *,
    tol: float = 0.01,
    level: float = 0.9,
    n_boot: int = 64,
    criterion: str = "l1",
    explore: float = 1.0,
    seed: int = 0,
) -> MixtureCertainty:
    """A stop rule on certainty, not on change: bootstrap the mixture over what is still unknown.

    Each of ``n_boot`` draws is ``L_b = completion.sample()`` (the full-scoring matrix as the error
    model sees it, see the module docstring of mixture/completion.py) and ``p_b = solve(L_b)``. With
    ``p = solve(Lhat)``:

        l1_b = ||p_b - p||_1,   certain  <=>  l1_(k) <= tol                   (criterion "l1")
        band_t = quantile_{(1+level)/2}(p_bt) - quantile_{(1-level)/2}(p_bt),
                                certain  <=>  max_t band_t <= tol             (criterion "band")

    where ``l1_(k)`` is the k-th smallest draw, k the smallest with ``P(Binomial(n_boot, level) < k) >= 0.95``
    (62 of 64 at level 0.9): a 95% upper confidence bound on the ``level`` quantile, so that the sampling
    noise of the draws does not stop the run. The "l1" rule declares "the full-scoring mixture is within
    ``l1_at_level`` of ``weights`` with probability ``level``"; it is the stricter of the two for
    spread-out mixtures (a band of width w on every one of k weights allows an L1 error of about k w / 2).
    The caller checks after each batch of scoring; stop when two checks in a row are certain (the error
    model, not only the draws, can be wrong by chance at one check).

    The sensitivities for ``next_pairs`` are slopes over these draws. With ``explore > 1``, ``n_boot // 4``
    more draws at ``explore`` times the error feed them too (not the rule): a task that no ordinary draw
    moves into the mixture can still be a few standard errors from it, and the tasks never looked at
    closely are the ones whose errors are least to be trusted (they were passed over because they looked
    bad, partly by chance). It was tried in benchmarks/active.py (``explore=2``) and is off by default: no
    run with it is kept in benchmarks/results to show a gain.
    Cost: ``n_boot + 1`` solves (``+ n_boot // 4`` with ``explore > 1``).

    Args:
        completion: ``complete_likelihoods``'s result.
        solve: maps a complete (n, n) mean log-likelihood matrix to weights (n,), e.g.
            ``lambda L: minimize_energy(energy_matrix(pmi_affinity(L), "psd"), beta=1, lam=1).weights``.
        tol: the L1 (or band width) the mixture must be certain within.
        level: probability of the declared bound (and central mass of the bands), in (0, 1).
        n_boot: bootstrap draws (>= 2; 64 gives the 0.9 quantile to a few percent).
        criterion: "l1" or "band".
        explore: error scale of the extra draws that only feed the sensitivities (>= 1; 1: none).
        seed: seed of the draws.
    """
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 2:
        raise ValueError(f"n_boot must be an integer >= 2, got {n_boot!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if not explore >= 1:
        raise ValueError(f"explore must be >= 1, got {explore}")
    n = completion.loglik_mean.shape[0]
    p = _call_solve(solve, completion.loglik_mean, n)
    rng = np.random.default_rng(seed)
    # v: the eigenvector of S's smallest eigenvalue, whose value sets the psd kernel's shift
    _, vecs = np.linalg.eigh(pmi_affinity(completion.loglik_mean))
    v = vecs[:, 0]
    # n_boot draws for the rule, and with explore > 1 a quarter more at a wider error for the sensitivities
    n_wide = max(1, n_boot // 4) if explore > 1 else 0
    draws = np.empty((n_boot + n_wide, n))
    du = np.empty((n_boot + n_wide, n))  # change of each task's representativeness in the draw
    dlam = np.empty(n_boot + n_wide)  # first-order change of S's smallest eigenvalue in the draw
    for b in range(n_boot + n_wide):
        Lb = completion.sample(rng, scale=1.0 if b < n_boot else explore)
        draws[b] = _call_solve(solve, Lb, n)
        dS = pmi_affinity(Lb - completion.loglik_mean)
        du[b] = dS.sum(1)
        dlam[b] = v @ dS @ v
    samples = draws[:n_boot]
    dp = samples - p[None, :]
    l1 = np.abs(dp).sum(1)
    q = (1 - level) / 2
    low, high = np.quantile(samples, q, axis=0), np.quantile(samples, 1 - q, axis=0)
    sensitivity, shift_sensitivity = _slopes(draws - p[None, :], du, dlam)
    # The declared bound is a 95% upper confidence bound on the level-quantile of l1 (an order statistic),
    # not the sample quantile: the rule is checked every round, and a 64-draw quantile that dips below tol
    # by chance would be the one that stops the run.
    l1_at_level = float(np.sort(l1)[_upper_order_statistic(n_boot, level, QUANTILE_CONFIDENCE) - 1])
    band_width = float(np.max(high - low))
    certain = l1_at_level <= tol if criterion == "l1" else band_width <= tol
    return MixtureCertainty(
        weights=p,
        samples=samples,
        low=low,
        high=high,
        l1=l1,
        expected_l1=float(l1.mean()),
        l1_at_level=l1_at_level,
        band_width=band_width,
        sensitivity=sensitivity,
        shift_sensitivity=shift_sensitivity,
        shift_direction=v,
        certain=bool(certain),
        criterion=criterion,
        tol=float(tol),
        level=float(level),
        n_boot=int(n_boot),
    )


def _upper_order_statistic(n_draws: int, q: float, confidence: float) -> int:
    """Smallest k with P(X_(k) >= the q-quantile) >= confidence for n_draws iid draws: the k with
    ``P(Binomial(n_draws, q) <= k - 1) >= confidence``, at most n_draws (1-based)."""
    k = np.arange(n_draws + 1)
    logpmf = (math.lgamma(n_draws + 1) - np.array([math.lgamma(i + 1) + math.lgamma(n_draws - i + 1) for i in k])
              + k * math.log(q) + (n_draws - k) * math.log1p(-q))
    cdf = np.cumsum(np.exp(logpmf))
    return int(min(np.searchsorted(cdf, confidence) + 1, n_draws))


def _slopes(dp, du, dlam):
    """Per task, least squares of ``dp_t`` on ``(du_t, dlam)`` over the draws: ``|g_t|`` and ``sum_t |h_t|``."""
    a11, a22 = (du**2).sum(0), float((dlam**2).sum())
    a12 = (du * dlam[:, None]).sum(0)
    b1, b2 = (dp * du).sum(0), (dp * dlam[:, None]).sum(0)
    det = a11 * a22 - a12**2
    ok = det > 1e-12 * np.maximum(a11 * a22, 1e-300)
    g = np.where(ok, (a22 * b1 - a12 * b2) / np.where(ok, det, 1.0), b1 / np.maximum(a11, 1e-300))
    h = np.where(ok, (a11 * b2 - a12 * b1) / np.where(ok, det, 1.0), 0.0)
    return np.abs(g), float(np.abs(h).sum())


def _call_solve(solve, L, n):
    w = np.asarray(solve(L), dtype=np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)):
        raise ValueError(f"solve(L) must return n = {n} finite weights, got shape {w.shape}")
    return w


# ---------------------------------------------------------------------------------------------------------
# Active selection
# ---------------------------------------------------------------------------------------------------------


def next_pairs(completion: LikelihoodCompletion, certainty: MixtureCertainty, budget: int) -> np.ndarray:
    """The ``budget`` (proxy, task, shard) units whose scoring shrinks the mixture's uncertainty most.

    Sensitivity of the mixture to an entry. With the representativeness unary, the mixture answers
    mostly to ``u_t = sum_b S[t, b]``; ``S[i, j] = (L[i, j] - L[j, j] + L[j, i] - L[i, i]) / 2`` puts half of
    an off-diagonal entry into ``u_i`` and half into ``u_j``, and ``-(n - 1) / 2`` of a diagonal entry into
    ``u_j`` (and ``-1/2`` into every other task's, which the simplex does not see). With
    ``g_t = certainty.sensitivity[t]`` (and the rest of the simplex moving the other way, the L1 change is
    about twice the change of ``p_t``):

        omega_ij = (g_i + g_j + h |v_i v_j|)^2  (i != j),
        omega_jj = ((n - 2) g_j + h |v_j (sum(v) - v_j)|)^2,

    where the ``h`` terms are the second channel, the psd kernel's shift: an entry moves S's smallest
    eigenvalue by ``v_i v_j dL_ij`` (``h = certainty.shift_sensitivity``, ``v = certainty.shift_direction``).
    It is what is left once the rows and columns of the tasks that matter are scored: the entries among
    the other tasks still move every weight a little, through the shift.

    Each unit's value is ``omega_ij`` times the drop in ``Var(Lhat_ij - L_ij)`` it buys, computed from the
    completion's error model (with the nominal prior variance, module docstring "Selection") for the cell's
    next shards (a cell's shards are taken most-scored shard of the task first, so offsets stay pinned).
    Unscored diagonal units come first of all. The ``budget`` best units are taken greedily; a cell gets
    at most its unscored shards, so no unit is ever chosen twice.

    Returns:
        (k, 3) int array of (proxy, task, shard), k = min(budget, unscored units), best first.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget must be an integer >= 1, got {budget!r}")
    n, n_shards = completion.count.shape
    if certainty.weights.shape != (n,):
        raise ValueError(f"certainty is for {certainty.weights.shape[0]} tasks, the completion for {n}")
    c, mask = completion.count, completion.scored
    N = c.sum(1)
    # Shard order per task: the most-scored shard first. Position q of cell (i, j) is its shard order[j, q];
    # ``open_`` marks the positions still to score.
    order = np.argsort(-(mask.sum(0) + 1e-3 * (n_shards - np.arange(n_shards))[None, :]), axis=1, kind="stable")
    idx = np.broadcast_to(order[None], mask.shape)
    open_ = np.take_along_axis(~mask & (c > 0)[None, :, :], idx, axis=2)  # (n, n, S)
    c_q = np.broadcast_to(np.take_along_axis(c, order, axis=1)[None], mask.shape)
    # Variance of Lhat_ij - L_ij after scoring every open shard up to position q, from the same prior
    # (V, sigma^2) as now; a position's value is the drop from the open positions before it.
    m_after = completion.scored_examples[:, :, None] + np.cumsum(open_ * c_q, axis=2)
    m_before = m_after - open_ * c_q
    V = (completion._prior_var if completion._select_prior_var is None else completion._select_prior_var)[:, :, None]
    sig2 = completion.noise_var[None, :, None]
    Nq = N[None, :, None]

    def var_at(m_new):
        f = 1.0 - m_new / Nq
        return f**2 / (1.0 / V + m_new / sig2) + (Nq - m_new) * sig2 / Nq**2

    drop = np.maximum(var_at(m_before) - var_at(m_after), 0.0)
    g, h, v = certainty.sensitivity, certainty.shift_sensitivity, certainty.shift_direction
    omega = (g[:, None] + g[None, :] + h * np.abs(v[:, None] * v[None, :])) ** 2
    omega[np.arange(n), np.arange(n)] = ((n - 2) * g + h * np.abs(v * (v.sum() - v))) ** 2
    omega = omega + 1e-9 * max(float(omega.max()), 1e-300)  # all-zero sensitivity: pure uncertainty
    value = np.where(open_, omega[:, :, None] * drop, -np.inf)
    # An unscored diagonal unit comes before anything else (each task's own-proxy entry is in its whole
    # row of S), in task order.
    diag_open = open_[np.arange(n), np.arange(n)]  # (n, S)
    value[np.arange(n), np.arange(n)] = np.where(diag_open, 1e300 * (1 + (n - np.arange(n)) / n)[:, None], -np.inf)
    # A later shard of a cell is never worth more than an earlier one (it is taken after it).
    value = np.where(open_, np.minimum.accumulate(np.where(open_, value, np.inf), axis=2), -np.inf)
    flat = value.ravel()
    k = int(min(budget, open_.sum()))
    if k == 0:
        return np.zeros((0, 3), dtype=np.int64)
    top = np.argpartition(-flat, k - 1)[:k]
    top = top[np.argsort(-flat[top], kind="stable")]
    i, j, q = np.unravel_index(top, value.shape)
    # Give each chosen cell its first open positions (ties may have picked a later one first).
    rank_in_cell = np.cumsum(open_[i, j], axis=1)  # (k, S): open positions so far
    cell = i * n + j
    by_cell = np.argsort(cell, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(cell[by_cell])) + 1]
    occurrence = np.empty(k, dtype=np.int64)
    occurrence[by_cell] = np.arange(k) - np.repeat(starts, np.diff(np.r_[starts, k]))
    q = np.argmax(rank_in_cell == (occurrence + 1)[:, None], axis=1)
    s = order[j, q]
    return np.stack([i, j, s], axis=1).astype(np.int64)

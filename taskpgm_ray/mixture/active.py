"""Estimation that scales: score a fraction of the (proxy, probe shard) pairs, fill in the rest, and
stop when the mixture is certain.

Four steps, each one function in and one result out::

    plan = initial_pairs(count)                                    # the cheap first pass
    ... score the planned (proxy i, task j, shard s) units: loglik_sum[i, j, s], scored[i, j, s] = True
    comp = complete_likelihoods(loglik_sum, count, scored)         # every entry of L, with its std
    cert = mixture_certainty(comp, solve, tol=0.01)                # bootstrap of the mixture; stop?
    todo = next_pairs(comp, cert, budget)                          # (k, 3) units to score next

Measurement model. Task j's probe set has ``N_j`` examples in shards of ``c_js`` examples. Proxy i's
response log-likelihood on example x of task j is ``l_i(x) = M_ij + delta_x + e_ix``: ``delta_x`` is the
example's difficulty, shared by every proxy (long or hard responses are hard for all of them), ``e_ix`` is
proxy-specific with variance ``sigma_j^2``. Full scoring gives ``L_ij = mean_x l_i(x)`` over all ``N_j``
examples; that is the target. A scored shard gives the shard mean ``y_ijs = M_ij + dbar_js + ebar_ijs``.

1. Shard offsets ``d_js`` (the shared difficulty of shard s relative to task j's other shards) are fitted
   within cells that have two or more scored shards, and removed, so cells scored on different shards
   of a task compare. What stays unknown is one constant per column, which the PMI affinity ignores:
   ``S[a, b]`` only uses ``L[a, b] - L[b, b]``.
2. Completion of the off-diagonal cell means (``L - diag``): an additive model plus a low-rank residual,

       M_ij = mu + a_i + b_j + U_i . V_j + r_ij,        r_ij ~ (0, tau^2),

   fitted by weighted alternating least squares (weights ``1 / (tau^2 + sigma_j^2 / m_ij)`` for ``m_ij``
   scored examples, ridge on U and V). A held-out tenth of the scored cells picks the ridge and the rank
   and measures tau^2 (see "Calibration" below); with too few scored cells for that (a handful of tasks),
   tau^2 comes from the fit's residuals shrunk towards the raw spread of the cells, since a fit with about
   as many parameters as cells leaves residuals near 0 whatever the unscored cells do. The diagonal (a
   proxy on its own task) is left out of the fit; it is the largest entry of every column and is scored
   in full by the first pass.
   ``sigma_j^2`` comes from the scatter of shard means within cells, or from the caller (``noise_var``),
   who may have the per-example scores: with one shard per task the shard means cannot tell noise from
   the tasks' real differences.
3. Each cell's posterior combines the model's prediction ``P_ij`` (prior variance ``V_ij = tau^2`` plus
   the row and column effects' estimation variance) with its own scored mean ``ybar_ij``:
   ``Mhat = k P + (1 - k) ybar``, ``k = (1 / V) / (1 / V + m / sigma^2)``. The full-scoring estimate
   keeps the scored examples as they are and predicts the rest:

       Lhat_ij = (m_ij ybar_ij + (N_j - m_ij) Mhat_ij) / N_j,
       Var(Lhat_ij - L_ij) = f^2 / (1 / V + m / sigma^2) + (N_j - m_ij) sigma_j^2 / N_j^2,   f = 1 - m / N_j,

   which is 0 for a fully scored cell (the target is the full-scoring mixture, not the true one).

The bootstrap of the mixture (``mixture_certainty``) draws matrices ``Lhat + error`` from this error
model, including the parts shared by a whole row, column or shard offset (those move a task's row sum of S,
the representativeness, far more than independent noise would) and by a cell and its transpose (they enter
S together), and solves each; the stop rule is on the
spread of those mixtures. Shards are not resampled within a cell: a cell with one scored shard would show
no variability, and the finite-population correction relative to full scoring would be lost.
``next_pairs`` then scores next the units with the largest (sensitivity of the mixture to the entry)^2 x
(drop of the entry's variance).

Calibration: what the error model assumes, and why. The rule is only as good as the error of the
unscored cells, and those are not like the scored ones: the selection scores the rows and columns of the
tasks in (or near) the mixture, so the cells left are those of other tasks, and the misfit is heavy-tailed
(a proxy's gains on its own cluster, which the additive model and a small rank miss), so a held-out tenth
of the *scored* cells calibrates tau^2 for cells like the scored ones, not for the others. In
benchmarks/active.py, with tau^2 taken that way and the sample quantile of the draws, the declared 90%
bound held at 67.7%, 57.5% and 63% of the active runs' checks at n = 100, 300 and 1000 (each check's L1 to
full scoring against its declared bound, in benchmarks/results/active.json as of commit 44e97d1). Three
parts of the model answer that, none with a constant fitted to the simulation:

* tau^2 is the held-out excess ``(ybar - P)^2 - sigma^2 / m`` importance-weighted towards the unscored
  cells (``(1 - pi) / pi``, ``pi_ij`` the chance that a cell of row i and column j is scored, from the row's
  and column's scored shares; importance-weighted cross-validation under covariate shift, Sugiyama,
  Krauledat and Mueller, JMLR 8, 2007), and taken at its one-sided 95% upper bound (``UPPER_Z`` standard
  errors, with the weights' effective sample size): with few held-out cells, or weights that lean on a
  few of them, a variance that is low by chance would be the one that stops the run.
* The shared parts: two held-out cells of one row (column) share an error (their covariance, by moments
  over pairs, with the same weights). When that is more than the held-out fit's nominal row (column)
  variance, the row and column variances are scaled up to it (never down): a proxy's level fitted on
  cells unlike the unscored ones is off for all of them at once, which moves its row sum of S.
* The declared bound is a 95% upper confidence bound on the ``level`` quantile of the bootstrap's L1
  (the order statistic 62 of 64 at level 0.9), not the sample quantile: the rule is checked every
  round, and a 64-draw quantile that dips below tol by chance is the one that would stop the run.

With these the declared bound held at 92.9%, 95.9% and 86.4% of the active runs' checks at n = 100, 300
and 1000 (benchmarks/results/active.json, counted as above), and in 36 of the 37 two-checks-in-a-row stops
made before everything was scored (55 of 58 one-check stops; the TARGET lines of
benchmarks/results/active.txt). The price is caution where there is least to save: at n = 100 the 0.01 rule
(two checks) stopped in 3 of 10 runs (active.txt; 8 of 10 in the file as of commit 44e97d1), and scored every
pair in the others. These figures are for the paper's energy (the benchmark's) and for the rule before the
pair covariance below (active.txt and active.json were last written at commit 5b35e79).

The pair (issue 23). ``S[a, b]`` adds ``L[a, b]`` and ``L[b, a]``, and their misfits move together: a proxy
that does better than the model on another task's probes tends to be one whose own task that other proxy does
better on (which tasks help each other is largely symmetric), so misfits drawn independent understate the
misfit of S by up to half its variance. Ten folds of the scored off-diagonal cells, (i, j) and (j, i) always in
the same one (the first is the held-out tenth above), give every scored cell a residual from a fit that saw
neither it nor its transpose; their moment over the pairs (weighted as above; the scoring noise of two such
cells is independent) is the covariance the draws give a cell and its transpose, at most the cell's own
misfit variance. The paper's energy hardly sees it: its unary is a row sum of S, whose error is mostly the
shared row and column parts. The pipeline's default energy does: its unary (the information) does not move
with L, the clip kernel passes S's entries among the tasks in the mixture, and there a cell's own misfit is
most of the error. On the active runs of tests/test_mixture_active.py (benchmarks/active_coverage.py) the
declared 90% bound held at 44 of 56 checks under the default energy and 75 of 77 under the paper's without it
(benchmarks/results/active_coverage.txt as of commit 0339d3b), and at 53 of 56 and 78 of 78 with it (the file
now); 10 of the 12 misses without it were in one world, from half the pairs on: 0.025-0.031 L1 off against a
declared 0.021-0.027. On worlds of the same kind that no test looks at (and nothing was chosen on) it held at
94 of 106 checks (88.7%) under the default energy and 111 of 118 (94.1%) under the paper's (the same file).
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

CRITERIA = ("l1", "band")
UPPER_Z = 1.645  # one-sided 95% upper bound on the held-out misfit variance
QUANTILE_CONFIDENCE = 0.95  # the declared L1 is this upper confidence bound on the level-quantile
SELECT_NOMINAL = True  # next_pairs' variance drops from the nominal error model (module docstring, "Selection")
FOLDS = 10  # folds of the scored cells: the first chooses the rank and measures tau^2, all ten the pair covariance


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
# Completion
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LikelihoodCompletion:
    """The result of ``complete_likelihoods``: every entry of L, its standard error, and what was scored.

    Attributes:
        loglik_mean: (n, n) estimate of the full-scoring mean log-likelihood ``L[i, j]`` (row = proxy,
            column = task's probe set), complete and finite; exact (up to a per-column constant, see the
            module docstring) where every shard of the cell was scored.
        std: (n, n) standard error of ``loglik_mean`` against the full-scoring value (0 when fully scored).
        scored: (n, n, n_shards) bool, the units that were scored (a copy of the input).
        count: (n, n_shards) examples per shard of each task (a copy of the input).
        scored_examples: (n, n) examples scored per cell, ``m_ij``.
        prior_mean: (n, n) the completion model's prediction ``P_ij`` (before a cell's own data).
        noise_var: (n,) per-example proxy-specific variance ``sigma_j^2`` of each task (nats^2).
        tau2: variance of the off-diagonal cells around the additive + low-rank model (nats^2).
        shard_offset: (n, n_shards) fitted shard offsets ``d_js`` (0 where not estimable).
        rank: rank of the low-rank residual that was chosen.
        ridge: the ridge that was chosen.
        iterations: alternating least-squares sweeps.
    """

    loglik_mean: np.ndarray
    std: np.ndarray
    scored: np.ndarray
    count: np.ndarray
    scored_examples: np.ndarray
    prior_mean: np.ndarray
    noise_var: np.ndarray
    tau2: float
    shard_offset: np.ndarray
    rank: int
    ridge: float
    iterations: int
    # The error model the bootstrap draws from (see ``sample``):
    _ind_std: np.ndarray  # (n, n) independent part of each cell's error
    _pair_std: np.ndarray  # (n, n) the part shared with the transposed cell: err_ij and err_ji move together
    _shared_coef: np.ndarray  # (n, n) f * k: how much of the row/column effect errors reaches a cell
    _row_std: np.ndarray  # (n,) std of the fitted row effect a_i (+ U_i)
    _col_std: np.ndarray  # (n,) std of the fitted column effect b_j (+ V_j)
    _offset_coef: np.ndarray  # (n, n, n_shards) how a shard-offset error reaches a cell's estimate
    _offset_std: np.ndarray  # (n, n_shards) std of each fitted shard offset
    _prior_var: np.ndarray  # (n, n) V_ij, a cell's prior variance around the model
    # V_ij of the selection's (nominal) error model when it differs from the rule's (``SELECT_NOMINAL``)
    _select_prior_var: np.ndarray | None = None

    @property
    def fraction_pairs(self) -> float:
        """Share of the n^2 (proxy, task) pairs with at least one scored shard."""
        return float(self.scored.any(2).mean())

    @property
    def fraction_examples(self) -> float:
        """Share of all (proxy, probe example) scorings done: sum m_ij / (n sum N_j)."""
        return float(self.scored_examples.sum() / (self.count.shape[0] * self.count.sum()))

    def sample(self, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
        """One draw of the full-scoring matrix from the error model: ``loglik_mean + scale * error`` (n, n).

        error_ij = ind_ij z_ij + pair_ij w_ij + f_ij k_ij (row_i zeta_i + col_j xi_j) - sum_s offset_coef_ijs D_js,
        with z, zeta, xi standard normal, w standard normal and symmetric (``w_ij = w_ji``: the misfit a cell
        shares with its transpose) and D_js ~ N(0, offset_std_js^2) centred within each task.
        """
        n, n_shards = self.count.shape
        err = self._ind_std * rng.standard_normal((n, n))
        w = np.triu(rng.standard_normal((n, n)), 1)
        err += self._pair_std * (w + w.T)
        err += self._shared_coef * (self._row_std * rng.standard_normal(n))[:, None]
        err += self._shared_coef * (self._col_std * rng.standard_normal(n))[None, :]
        D = self._offset_std * rng.standard_normal((n, n_shards))
        w = self.count * (self._offset_std > 0)
        D -= (w * D).sum(1, keepdims=True) / np.maximum(w.sum(1, keepdims=True), 1e-300) * (self._offset_std > 0)
        err -= np.einsum("ijs,js->ij", self._offset_coef, D)
        return self.loglik_mean + scale * err


def complete_likelihoods(
    loglik_sum: np.ndarray,
    count: np.ndarray,
    scored: np.ndarray,
    *,
    rank: int = 8,
    ridge: float = 1.0,
    max_iter: int = 50,
    seed: int = 0,
    noise_var: np.ndarray | None = None,
) -> LikelihoodCompletion:
    """Fill in the likelihood matrix from the scored (proxy, task, shard) units, with a std per entry.

    The estimator is the one of the module docstring: shard offsets within cells, then the additive +
    rank-``rank`` model of ``L - diag`` by weighted alternating least squares, then a per-cell posterior
    and the full-scoring estimate ``Lhat = (m ybar + (N - m) Mhat) / N``. Cost per sweep O(n^2 rank^2).

    Args:
        loglik_sum: (n, n, n_shards) ``loglik_sum[i, j, s]`` = proxy i's summed response log-likelihood on
            shard s of task j; read only where ``scored`` is set.
        count: (n, n_shards) examples in shard s of task j (0 where task j has fewer shards).
        scored: (n, n, n_shards) bool, which units have been scored.
        rank: largest rank of the low-rank residual tried (0: additive model only); the rank used is
            chosen among 0, 2, 4, ... up to it on a held-out tenth of the scored cells.
        ridge: ridge on the low-rank factors, in units of the mean cell weight; the held-out cells choose
            between ``ridge`` and ``10 * ridge``.
        max_iter: alternating least-squares sweeps at most (half of it for the held-out fits).
        seed: seed of the held-out split and of the factors' initialisation.
        noise_var: (n,) the per-example proxy-specific variance ``sigma_j^2`` of each task, when the caller
            measured it from per-example scores (NaN: unknown for that task). Without it, it is fitted from
            the scatter of shard means within cells, and with one shard per task only from the scatter of
            the cell means, which counts the tasks' real differences as noise.

    Returns:
        ``LikelihoodCompletion``; ``.loglik_mean`` is what the solver sees, ``.std`` its uncertainty.

    Raises:
        ValueError: wrong shapes, NaN/inf in a scored entry, a scored shard with no examples, a task with
            no examples, nothing scored, bad rank or ridge.
    """
    Y, c, mask = _check_inputs(loglik_sum, count, scored)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0:
        raise ValueError(f"rank must be an integer >= 0, got {rank!r}")
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0, got {ridge}")
    n, _, n_shards = Y.shape
    N = c.sum(1)  # (n,) examples per task
    cw = mask * c[None, :, :]  # (n, n, S) examples behind each scored shard mean
    m = cw.sum(2)  # (n, n) scored examples per cell
    ybar_s = np.where(mask, Y / np.where(c > 0, c, 1.0)[None], 0.0)  # shard means

    # 1. Shard offsets, per-example noise, and the offset-corrected cell means.
    d, ybar, noise_var, d_var = _shard_offsets(ybar_s, cw, m, c, known_noise=noise_var)
    observed = m > 0
    off = observed & ~np.eye(n, dtype=bool)

    # 2. The additive + low-rank model of the off-diagonal cell means. The ridge (ridge and 10 ridge, at the
    # largest rank) and then the rank (0, 2, 4, ... up to ``rank``) come from a held-out tenth of the scored
    # cells, and so does tau^2: what the model misses on cells it has not seen, beyond their scoring noise.
    rng = np.random.default_rng(seed)
    noise_cell = np.where(observed, noise_var[None, :] / np.maximum(m, 1e-300), np.inf)  # Var(ybar - M)
    tau2 = max(float(np.var(ybar[off])), 1e-12) if off.any() else 1.0
    # Folds of the off-diagonal cells, (i, j) and (j, i) always in the same one, so that what the two share can
    # be measured on cells a fit has not seen; the first fold is the held-out tenth.
    fold = np.triu(rng.integers(0, FOLDS, (n, n)), 1)
    fold = fold + fold.T
    hold = off & (fold == 0)
    train = off & ~hold
    top = int(min(rank, max(0, n - 2)))
    candidates = sorted({0, *(r for r in (2, 4, 8, 16, 32) if r < top), top})
    iterations = 0
    if hold.sum() >= 20 and train.sum() > 2 * n:
        W = np.where(train, 1.0 / (tau2 + noise_cell), 0.0)
        Yt = np.where(train, ybar, 0.0)
        to_unscored = _unscored_weights(off, hold)

        tried: dict[tuple[int, float], tuple[float, float]] = {}
        preds: dict[tuple[int, float], np.ndarray] = {}  # the held-out fits' predictions
        plain: dict[tuple[int, float], float] = {}  # the unweighted held-out mean: the nominal tau^2

        def held_out(r, rdg):
            nonlocal iterations
            if (r, rdg) not in tried:
                fit = _fit_additive_low_rank(Yt, W, r, rdg, max(1, max_iter // 2), rng)
                iterations += fit["iterations"]
                excess = (ybar - fit["pred"])[hold] ** 2 - noise_cell[hold]
                tried[r, rdg] = _weighted_mean_se(excess, to_unscored)
                preds[r, rdg] = fit["pred"]
                plain[r, rdg] = float(excess.mean())
            return tried[r, rdg]

        if top:
            ridge = min((ridge, 10.0 * ridge), key=lambda rdg: held_out(top, rdg)[0])
        scores, ses = zip(*(held_out(r, ridge) for r in candidates))
        # the smallest rank within one standard error of the best (stable from one round to the next)
        best = int(np.argmin(scores))
        pick = next(q for q in range(len(candidates)) if scores[q] <= scores[best] + ses[best])
        rank = candidates[pick]
        tau2_cv = max(scores[pick] + UPPER_Z * ses[pick], 0.0)
        tau2_nominal = max(plain[rank, ridge], 1e-12)
        shared_row, shared_col = _held_out_shared(ybar - preds[rank, ridge], hold, to_unscored)
        shared_pair, sweeps = _held_out_pair(ybar, off, fold, tau2, noise_cell, preds[rank, ridge], rank, ridge,
                                             max(1, max_iter // 2), rng)
        iterations += sweeps
    else:  # too few scored cells to hold any out: the additive model, tau^2 from its residuals
        rank = 0
        shared_row = shared_col = shared_pair = 0.0
        W = np.where(off, 1.0 / (tau2 + noise_cell), 0.0)
        fit = _fit_additive_low_rank(np.where(off, ybar, 0.0), W, 0, ridge, max_iter, rng)
        res = (ybar - fit["pred"])[off]
        # With few cells beyond the model's 2n - 1 parameters the residuals are near 0 whatever the unseen
        # cells do (at n = 4 the fit interpolates): shrink towards the raw spread of the cells, 3 cells' worth.
        dof = max(off.sum() - (2 * n - 1), 0.0)
        prior_dof = 3.0
        tau2_cv = max(float((np.sum(res**2 - noise_cell[off]) + prior_dof * tau2) / (dof + prior_dof)), 0.0) \
            if off.any() else tau2
        tau2_nominal = max(tau2_cv, 1e-12)
    tau2_cv = max(tau2_cv, 1e-12)
    W = np.where(off, 1.0 / (tau2_cv + noise_cell), 0.0)
    fit = _fit_additive_low_rank(np.where(off, ybar, 0.0), W, rank, ridge, max_iter, rng)
    iterations += fit["iterations"]
    P = fit["pred"]
    spread = max(float(np.var(P[~np.eye(n, dtype=bool)])), tau2_cv, 1e-12)
    diag = np.arange(n)
    dobs = observed[diag, diag]
    excess = (ybar[diag, diag] - P[diag, diag])[dobs]
    g = float(excess.mean()) if dobs.any() else 0.0
    P[diag, diag] += g
    f = 1.0 - m / N[None, :]
    rest_var = (N[None, :] - m) * noise_var[None, :] / N[None, :] ** 2

    def error_model(t2_cv, calibrated):
        """The error model of Lhat for held-out misfit variance ``t2_cv``; ``calibrated``: the shared parts
        scaled up to the held-out covariances (the rule's model), else as the fit gives them (nominal)."""
        Wm = np.where(off, 1.0 / (t2_cv + noise_cell), 0.0)
        sp = max(spread, t2_cv)
        row_var = (rank + 1) / (Wm.sum(1) + (rank + 1) / sp)  # estimation variance of a_i (+ U_i)
        col_var = (rank + 1) / (Wm.sum(0) + (rank + 1) / sp)
        if calibrated and (shared_row > 0 or shared_col > 0):
            # Two held-out cells of one row (column) share more error than the held-out fit's nominal row
            # (column) variance when the model misses a proxy's (task's) level on cells unlike the ones it
            # was fitted on: scale the shared parts up to what the held-out cells show (never down).
            w_train = np.where(train, 1.0 / (t2_cv + noise_cell), 0.0)
            nominal_row = float(np.median((rank + 1) / (w_train.sum(1) + (rank + 1) / sp)))
            nominal_col = float(np.median((rank + 1) / (w_train.sum(0) + (rank + 1) / sp)))
            row_var = row_var * max(1.0, shared_row / nominal_row)
            col_var = col_var * max(1.0, shared_col / nominal_col)
        # t2_cv already holds the row/column estimation error of a typical held-out cell; keep the rest
        # as the cell's own (independent) part.
        typical = float(np.median(row_var[:, None] + col_var[None, :]))
        t2 = max(t2_cv - typical, 0.25 * t2_cv, 1e-12)
        V = t2 + row_var[:, None] + col_var[None, :]
        # The diagonal: the model's value plus the mean own-task excess, with the spread of that excess.
        v_diag = float(excess.var()) + t2 if dobs.sum() >= 2 else sp + t2
        V[diag, diag] = v_diag + row_var + col_var
        shared_var = V - t2  # the part of V shared along a row or a column
        shared_var[diag, diag] = row_var + col_var
        prec = 1.0 / V + np.where(observed, m / noise_var[None, :], 0.0)
        k = (1.0 / V) / prec
        own_var = np.where(observed, (1 - k) ** 2 * noise_var[None, :] / np.maximum(m, 1e-300), 0.0)
        # The misfit of (i, j) and of (j, i) share the held-out pair covariance (at most t2: a part of the cell's
        # own misfit): a proxy that does better than the model on another's task tends to be one whose task that
        # other proxy does better on too, and the PMI affinity adds the two cells.
        pair_var = np.where(diag[:, None] != diag[None, :], (f * k) ** 2 * min(shared_pair, t2), 0.0)
        ind_var = f**2 * (k**2 * (V - shared_var) + own_var) + rest_var - pair_var
        # A shard-offset error e_js moves a cell's scored mean by -sum_s (cw/m) e_js, and Lhat by that
        # times (m + (N - m)(1 - k)) / N.
        gain = (m + (N[None, :] - m) * (1 - k)) / N[None, :]
        offset_coef = gain[:, :, None] * cw / np.maximum(m, 1e-300)[:, :, None]
        return {"tau2": t2, "V": V, "k": k, "ind_var": ind_var, "pair_var": pair_var, "shared_var": shared_var,
                "row_var": row_var, "col_var": col_var, "offset_coef": offset_coef}

    rule = error_model(tau2_cv, True)
    tau2, V, k = rule["tau2"], rule["V"], rule["k"]

    # 3. Posterior per cell and the full-scoring estimate.
    M_post = np.where(observed, k * P + (1 - k) * ybar, P)
    L_hat = (m * ybar + (N[None, :] - m) * M_post) / N[None, :]
    offset_coef = rule["offset_coef"]
    offset_var = np.einsum("ijs,js->ij", offset_coef**2, d_var)
    std = np.sqrt(rule["ind_var"] + rule["pair_var"] + (f * k) ** 2 * rule["shared_var"] + offset_var)
    # The selection's error model (see "Selection" in the module docstring): the point estimates.
    sel = error_model(tau2_nominal, False) if SELECT_NOMINAL else rule
    full = m >= N[None, :]
    std[full] = 0.0
    return LikelihoodCompletion(
        loglik_mean=L_hat,
        std=std,
        scored=mask.copy(),
        count=c.copy(),
        scored_examples=m,
        prior_mean=P,
        noise_var=noise_var,
        tau2=tau2,
        shard_offset=d,
        rank=rank,
        ridge=float(ridge),
        iterations=iterations,
        _ind_std=np.sqrt(rule["ind_var"]),
        _pair_std=np.sqrt(rule["pair_var"]),
        _shared_coef=f * k,
        _row_std=np.sqrt(rule["row_var"]),
        _col_std=np.sqrt(rule["col_var"]),
        _offset_coef=offset_coef,
        _offset_std=np.sqrt(d_var),
        _prior_var=V,
        _select_prior_var=None if sel is rule else sel["V"],
    )


def _unscored_weights(off, hold, clip: float = 0.02):
    """Importance weights that make the held-out cells stand for the unscored ones: ``(1 - pi) / pi`` with
    ``pi_ij = r_i c_j / rbar`` the chance that cell (i, j) is scored, from its row's and column's scored
    shares (independence of row and column), clipped to [clip, 1 - clip]."""
    n = off.shape[0]
    others = ~np.eye(n, dtype=bool)
    r, c = off.sum(1) / (n - 1), off.sum(0) / (n - 1)
    pi = np.clip(r[:, None] * c[None, :] / max(float(off[others].mean()), 1e-12), clip, 1 - clip)
    return ((1 - pi) / pi)[hold]


def _held_out_pair(ybar, off, fold, tau2, noise_cell, first_pred, rank, ridge, max_iter, rng):
    """The misfit a scored cell shares with its transpose, ``Cov(e_ij, e_ji)``, and the sweeps it took.

    Every scored off-diagonal cell gets a residual from the fit without its fold (``first_pred`` is the first
    fold's); a pair (i, j), (j, i) is in one fold, so neither residual was fitted. The cells' scoring noise is
    independent (another proxy on another task's probes), so the moment over the scored pairs, weighted by the
    product of their cells' ``_unscored_weights``, leaves the shared misfit. Clipped at 0.
    """
    res = np.zeros(ybar.shape)
    sweeps = 0
    for q in range(FOLDS):
        hold = off & (fold == q)
        if q and hold.any():
            train = off & ~hold
            fit = _fit_additive_low_rank(np.where(train, ybar, 0.0), np.where(train, 1.0 / (tau2 + noise_cell), 0.0),
                                         rank, ridge, max_iter, rng)
            sweeps += fit["iterations"]
            pred = fit["pred"]
        else:
            pred = first_pred
        res[hold] = (ybar - pred)[hold]
    w = np.zeros(ybar.shape)
    w[off] = _unscored_weights(off, off)
    pairs = np.triu(off & off.T, 1)
    ww = (w * w.T)[pairs]
    if ww.sum() <= 0:
        return 0.0, sweeps
    return max(float((ww * (res * res.T)[pairs]).sum() / ww.sum()), 0.0), sweeps


def _held_out_shared(res, hold, w_hold):
    """The error two held-out cells of one row share (and of one column): ``Cov(e_ij, e_ik)``, j != k, by
    moments over the pairs of held-out cells of each row (column), weighted as in ``_unscored_weights``.
    A cell's own noise and misfit do not pair with another cell's, so only the shared part is left."""
    w = np.zeros(hold.shape)
    w[hold] = w_hold / w_hold.mean()
    we = w * np.where(hold, res, 0.0)
    shared = []
    for axis in (1, 0):
        pairs = float((w.sum(axis) ** 2 - (w**2).sum(axis)).sum())
        cross = float((we.sum(axis) ** 2 - (we**2).sum(axis)).sum())
        shared.append(max(cross / pairs, 0.0) if pairs > 0 else 0.0)
    return shared[0], shared[1]


def _weighted_mean_se(x, w):
    """Self-normalised weighted mean of x and its standard error (effective sample size ``(sum w)^2 / sum w^2``)."""
    w = w / w.sum()
    mean = float((w * x).sum())
    return mean, float(np.sqrt((w**2 * (x - mean) ** 2).sum()))


def _shard_offsets(ybar_s, cw, m, c, sweeps: int = 30, known_noise=None):
    """Fit ``y_ijs = mean_ij + d_js`` on cells with >= 2 scored shards; return d, corrected cell means,
    the per-example noise sigma_j^2 (pooled towards the all-task value) and each offset's variance."""
    n, _, n_shards = ybar_s.shape
    multi = (cw > 0).sum(2) >= 2  # (n, n): cells that see within-cell variation
    wm = cw * multi[:, :, None]
    den = wm.sum(0)  # (n, S) examples behind each offset
    est = den > 0
    d = np.zeros((n, n_shards))
    safe_m = np.maximum(m, 1e-300)
    for _ in range(sweeps):
        mean = (cw * (ybar_s - d[None])).sum(2) / safe_m
        d_new = np.where(est, (wm * (ybar_s - mean[:, :, None])).sum(0) / np.maximum(den, 1e-300), 0.0)
        w = c * est
        d_new -= (w * d_new).sum(1, keepdims=True) / np.maximum(w.sum(1, keepdims=True), 1e-300) * est
        if np.max(np.abs(d_new - d)) < 1e-12:
            d = d_new
            break
        d = d_new
    mean = (cw * (ybar_s - d[None])).sum(2) / safe_m
    resid = np.where(cw > 0, ybar_s - mean[:, :, None] - d[None], 0.0)
    ss = (wm * resid**2).sum((0, 2))  # (n,) per task: sum c r^2 over multi-shard cells
    dof = np.maximum((wm > 0).sum((0, 2)) - multi.sum(0) - np.maximum(est.sum(1) - 1, 0), 0)
    if dof.sum() > 0:
        pooled = ss.sum() / dof.sum()
    else:  # no cell with two scored shards anywhere: the scatter of cell means is all we have
        obs = m > 0
        pooled = float(np.var(mean[obs]) * np.median(m[obs])) if obs.sum() > 1 else 1.0
    pooled = max(pooled, 1e-12)
    prior_dof = 3.0
    noise_var = (ss + prior_dof * pooled) / (dof + prior_dof)
    if known_noise is not None:
        known = np.asarray(known_noise, dtype=np.float64)
        if known.shape != (n,) or np.any(known[np.isfinite(known)] <= 0):
            raise ValueError(f"noise_var must be (n,) = ({n},) values > 0 (NaN: unknown), got {known!r}")
        noise_var = np.where(np.isfinite(known), known, noise_var)
    # d_js is a mean of (shard mean - cell mean) over the multi-shard cells that scored shard s, each with
    # variance sigma_j^2 (1 / c_js - 1 / m_ij).
    inv = np.where(wm > 0, 1.0 / np.maximum(1.0 / np.maximum(cw, 1e-300) - 1.0 / safe_m[:, :, None], 1e-300), 0.0)
    d_var = np.where(est, noise_var[:, None] / np.maximum(inv.sum(0), 1e-300), 0.0)
    return d, mean, noise_var, d_var


def _fit_additive_low_rank(Yo, W, rank, ridge, max_iter, rng, tol=1e-7):
    """Weighted least squares for ``mu + a_i + b_j + U_i . V_j`` on the cells with W > 0."""
    n = Yo.shape[0]
    sw = W.sum()
    if sw <= 0:
        return {"pred": np.zeros((n, n)), "iterations": 0}
    lam = ridge * sw / (n * n)  # ridge in units of the mean cell weight
    lam_ab = 1e-3 * sw / (n * n)  # keeps unobserved rows/columns at 0
    mu = float((W * Yo).sum() / sw)
    a, b = np.zeros(n), np.zeros(n)
    row_w, col_w = W.sum(1), W.sum(0)
    for _ in range(3):  # the additive part alone, to start from
        a = (W * (Yo - mu - b[None, :])).sum(1) / (row_w + lam_ab)
        b = (W * (Yo - mu - a[:, None])).sum(0) / (col_w + lam_ab)
    # Start the factors from the top singular vectors of the zero-filled residual (scaled by the share of
    # cells seen): from small random factors, ALS with a ridge creeps and the loss looks converged.
    R = np.where(W > 0, Yo - mu - a[:, None] - b[None, :], 0.0) / max(float((W > 0).mean()), 1e-12)
    U, V = _top_factors(R, rank, rng)
    eye = np.eye(rank)
    prev = np.inf
    sweeps = 0
    while sweeps < max_iter:
        sweeps += 1
        # additive part given the low-rank part (a few Gauss-Seidel sweeps)
        E = Yo - U @ V.T
        for _ in range(3):
            mu = float((W * (E - a[:, None] - b[None, :])).sum() / sw)
            a = (W * (E - mu - b[None, :])).sum(1) / (row_w + lam_ab)
            b = (W * (E - mu - a[:, None])).sum(0) / (col_w + lam_ab)
        if rank:
            R = Yo - mu - a[:, None] - b[None, :]
            # (n, r, r) Gram matrices sum_j W_ij V_j V_j^T as one matrix product
            G = (W @ (V[:, :, None] * V[:, None, :]).reshape(n, -1)).reshape(n, rank, rank) + lam * eye
            U = np.linalg.solve(G, ((W * R) @ V)[:, :, None])[:, :, 0]
            G = (W.T @ (U[:, :, None] * U[:, None, :]).reshape(n, -1)).reshape(n, rank, rank) + lam * eye
            V = np.linalg.solve(G, ((W * R).T @ U)[:, :, None])[:, :, 0]
        pred = mu + a[:, None] + b[None, :] + U @ V.T
        loss = float((W * (Yo - pred) ** 2).sum() + lam * ((U**2).sum() + (V**2).sum()))
        if prev - loss <= tol * max(loss, 1e-300):
            break
        prev = loss
    return {"pred": mu + a[:, None] + b[None, :] + U @ V.T, "iterations": sweeps}


def _top_factors(R, rank, rng, power: int = 3):
    """``U V^T`` ~ the best rank-``rank`` approximation of R (randomised subspace iteration, O(n^2 rank))."""
    n = R.shape[0]
    if rank == 0:
        return np.zeros((n, 0)), np.zeros((n, 0))
    Q = np.linalg.qr(R @ rng.standard_normal((n, rank + 5)))[0]
    for _ in range(power):
        Q = np.linalg.qr(R @ np.linalg.qr(R.T @ Q)[0])[0]
    u, sv, vt = np.linalg.svd(Q.T @ R, full_matrices=False)
    root = np.sqrt(sv[:rank])
    return (Q @ u[:, :rank]) * root, vt[:rank].T * root


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
    model sees it, see the module docstring) and ``p_b = solve(L_b)``. With ``p = solve(Lhat)``:

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


# ---------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------


def _check_count(count) -> np.ndarray:
    c = np.asarray(count, dtype=np.float64)
    if c.ndim != 2 or 0 in c.shape:
        raise ValueError(f"count must have shape (n, n_shards), got {c.shape}")
    if not np.all(np.isfinite(c)) or np.any(c < 0):
        raise ValueError("count must be finite and >= 0")
    empty = np.flatnonzero(c.sum(1) <= 0)
    if empty.size:
        raise ValueError(f"task {empty[0]} has no probe examples (count[{empty[0]}] sums to 0)")
    return c


def _check_inputs(loglik_sum, count, scored):
    Y = np.asarray(loglik_sum, dtype=np.float64)
    if Y.ndim != 3 or Y.shape[0] != Y.shape[1] or 0 in Y.shape:
        raise ValueError(f"loglik_sum must have shape (n, n, n_shards), got {Y.shape}")
    n, _, n_shards = Y.shape
    c = np.asarray(count, dtype=np.float64)
    if c.shape != (n, n_shards):
        raise ValueError(f"count must have shape (n, n_shards) = {(n, n_shards)}, got {c.shape}")
    c = _check_count(c)
    mask = np.asarray(scored)
    if mask.shape != Y.shape:
        raise ValueError(f"scored must have the shape of loglik_sum {Y.shape}, got {mask.shape}")
    if mask.dtype != bool:
        raise ValueError(f"scored must be a bool array, got dtype {mask.dtype}")
    empty = mask & (c[None] <= 0)
    if empty.any():
        i, j, s = np.argwhere(empty)[0]
        raise ValueError(f"scored[{i}, {j}, {s}] is set but shard {s} of task {j} has no examples "
                         f"(count[{j}, {s}] = 0)")
    bad = mask & ~np.isfinite(Y)
    if bad.any():
        i, j, s = np.argwhere(bad)[0]
        raise ValueError(f"loglik_sum[{i}, {j}, {s}] is not finite (proxy {i} on shard {s} of task {j})")
    if not mask.any():
        raise ValueError("nothing is scored yet: score the first pass (initial_pairs) before completing")
    return Y, c, mask

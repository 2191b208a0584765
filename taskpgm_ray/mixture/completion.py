"""Likelihood completion for active estimation: every entry of the likelihood matrix L, with its error, from
the scored (proxy, task, shard) units.

``complete_likelihoods`` fills in what was not scored; its error model (``LikelihoodCompletion.sample``) is
what the stop rule and the selection of mixture/active.py draw from. The least-squares fits it runs (shard
offsets, the additive + low-rank model) are in mixture/completion_fit.py.

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

The error model includes the parts shared by a whole row, column or shard offset (those move a task's row
sum of S, the representativeness, far more than independent noise would) and by a cell and its transpose
(they enter S together); ``sample`` draws from it. Shards are not resampled within a cell: a cell with one
scored shard would show no variability, and the finite-population correction relative to full scoring
would be lost.

Calibration: what the error model assumes, and why. The stop rule is only as good as the error of the
unscored cells, and those are not like the scored ones: the selection scores the rows and columns of the
tasks in (or near) the mixture, so the cells left are those of other tasks, and the misfit is heavy-tailed
(a proxy's gains on its own cluster, which the additive model and a small rank miss), so a held-out tenth
of the *scored* cells calibrates tau^2 for cells like the scored ones, not for the others (the coverage that
gave, and with the parts below: the module docstring of mixture/active.py). Two parts of the error model
answer that, none with a constant fitted to the simulation (a third, the declared bound's upper confidence
bound, is the stop rule's):

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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from taskpgm_ray.mixture.completion_fit import _fit_additive_low_rank, _shard_offsets

UPPER_Z = 1.645  # one-sided 95% upper bound on the held-out misfit variance
SELECT_NOMINAL = True  # next_pairs' variance drops from the nominal error model (mixture/active.py, "Selection")
FOLDS = 10  # folds of the scored cells: the first chooses the rank and measures tau^2, all ten the pair covariance


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
    # The selection's error model (see "Selection" in the module docstring of mixture/active.py): the point estimates.
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

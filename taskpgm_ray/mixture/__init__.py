"""TaskPGM maths: affinities, kernels, the energy and its solvers, budgeted selection, baselines.

Pure numpy (no Ray, torch or scipy). The pipeline, in order:

    L (n, n) mean log-likelihoods --pmi_affinity--> S --energy_matrix--> S~ (symmetric PSD)
    --minimize_energy--> p on the simplex minimising (lam/2) p^T S~ p - beta u^T p
"""

from taskpgm_ray.mixture.active import (
    LikelihoodCompletion,
    MixtureCertainty,
    complete_likelihoods,
    initial_pairs,
    mixture_certainty,
    next_pairs,
)
from taskpgm_ray.mixture.affinity import (
    compress_topk,
    jsd_affinity,
    jsd_from_topk,
    pairwise_jsd_sum,
    pairwise_jsd_sum_topk,
    pmi_affinity,
)
from taskpgm_ray.mixture.baselines import baseline_weights, within_bounds
from taskpgm_ray.mixture.block_matrix import BlockLowRank
from taskpgm_ray.mixture.bootstrap import BootstrapResult, bootstrap_weights
from taskpgm_ray.mixture.budgeted import BudgetedSelection, select_budgeted, select_budgeted_report
from taskpgm_ray.mixture.kernels import eig_clip, energy_matrix, exp_kernel, jsd_similarity, psd_shift, symmetrize
from taskpgm_ray.mixture.solvers import METHODS, MixtureSolution, minimize_energy

__all__ = [
    "METHODS",
    "BlockLowRank",
    "BootstrapResult",
    "BudgetedSelection",
    "LikelihoodCompletion",
    "MixtureCertainty",
    "MixtureSolution",
    "baseline_weights",
    "bootstrap_weights",
    "complete_likelihoods",
    "compress_topk",
    "eig_clip",
    "energy_matrix",
    "exp_kernel",
    "initial_pairs",
    "jsd_affinity",
    "jsd_from_topk",
    "jsd_similarity",
    "minimize_energy",
    "mixture_certainty",
    "next_pairs",
    "pairwise_jsd_sum",
    "pairwise_jsd_sum_topk",
    "pmi_affinity",
    "psd_shift",
    "select_budgeted",
    "select_budgeted_report",
    "symmetrize",
    "within_bounds",
]

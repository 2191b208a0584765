"""From an affinity to an energy matrix: symmetric and positive semi-definite.

This is a separate, named step because ``minimize_energy`` takes its matrix as given. The PMI affinity S
is symmetric, <= 0 off the diagonal in practice, with a zero diagonal, so it is indefinite (its trace
is 0); ``psd_shift`` adds ``(|lambda_min| + eps) I``. On the simplex ``p^T (S + c I) p = p^T S p + c ||p||^2``
and the row sums of S + c I are those of S plus c, which changes ``u^T p`` by the constant c: so the
shift keeps the unary term's effect and only adds a spreading term ``(lam c / 2) ||p||^2``. That term
grows with the most negative eigenvalue, which for a PMI matrix is large (about -(n - 1) times the mean
dissimilarity, along the all-ones direction), so the shift can drown the pairwise structure.

``eig_clip`` instead sets the negative eigenvalues to 0 (the nearest PSD matrix in Frobenius norm). On the
simplex ``p^T 1 1^T p = 1``, so removing the all-ones component changes the energy by a constant: clipping
keeps the pairwise structure that the shift flattens.
"""

from __future__ import annotations

import numpy as np

KERNELS = ("psd", "clip", "exp")


def _square(A, name: str) -> np.ndarray:
    A = np.asarray(A, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square matrix, got shape {A.shape}")
    if not np.all(np.isfinite(A)):
        raise ValueError(f"{name} contains NaN or inf")
    return A


def symmetrize(A: np.ndarray) -> np.ndarray:
    """(A + A^T) / 2."""
    A = _square(A, "A")
    return 0.5 * (A + A.T)


def psd_shift(S: np.ndarray, eps: float = 0.0) -> np.ndarray:
    """S + (max(0, -lambda_min(S)) + eps) I for symmetric S: the smallest shift making S PSD, plus eps."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    S = symmetrize(S)
    lam_min = float(np.linalg.eigvalsh(S)[0])
    return S + (max(0.0, -lam_min) + eps) * np.eye(S.shape[0])


def eig_clip(S: np.ndarray, eps: float = 0.0) -> np.ndarray:
    """V max(Lambda, 0) V^T + eps I for symmetric S = V Lambda V^T: the nearest PSD matrix, plus eps."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    S = symmetrize(S)
    vals, vecs = np.linalg.eigh(S)
    K = (vecs * np.maximum(vals, 0.0)) @ vecs.T
    return 0.5 * (K + K.T) + eps * np.eye(S.shape[0])


def exp_kernel(S: np.ndarray, tau: float, eps: float = 0.0) -> np.ndarray:
    """exp(S / tau) elementwise, then ``psd_shift`` (only if it is not PSD already) plus eps."""
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    K = np.exp(symmetrize(S) / tau)
    lam_min = float(np.linalg.eigvalsh(K)[0])
    return K + (max(0.0, -lam_min) + eps) * np.eye(K.shape[0])


def jsd_similarity(jsd: np.ndarray, kind: str = "linear", tau: float | None = None) -> np.ndarray:
    """Similarity from a JSD matrix (nats): ``1 - JSD / ln 2`` (kind="linear") or ``exp(-JSD / tau)``."""
    jsd = symmetrize(jsd)
    if np.any(jsd < -1e-12) or np.any(jsd > np.log(2) + 1e-9):
        raise ValueError("JSD values must lie in [0, ln 2] nats")
    if kind == "linear":
        return 1.0 - jsd / np.log(2)
    if kind == "exp":
        if tau is None or not tau > 0:
            raise ValueError(f"kind='exp' needs tau > 0, got {tau}")
        return np.exp(-jsd / tau)
    raise ValueError(f"unknown kind {kind!r}; choose 'linear' or 'exp'")


def energy_matrix(
    affinity: np.ndarray, kernel: str = "psd", *, tau: float = 1.0, eps: float = 1e-6
) -> np.ndarray:
    """The symmetric PSD matrix ``minimize_energy`` needs, from an affinity (PMI S or a JSD similarity).

    kernel="psd": ``psd_shift(symmetrize(A), eps)``; kernel="clip": ``eig_clip(A, eps)``;
    kernel="exp": ``exp_kernel(A, tau, eps)``.
    """
    if kernel == "psd":
        return psd_shift(affinity, eps)
    if kernel == "clip":
        return eig_clip(affinity, eps)
    if kernel == "exp":
        return exp_kernel(affinity, tau, eps)
    raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")

"""A structured energy matrix for 10^4-10^5 tasks: block diagonal plus low rank.

A dense S for n = 10^5 tasks is 80 GB, so the ``blocks`` solver (and ``first_order``) also accept

    S = blockdiag(D_1, ..., D_B) + V V^T

with the tasks ordered block by block (block b holds tasks ``offsets[b]:offsets[b+1]``). Each D_b is
symmetric PSD and V V^T is PSD, so S is PSD. This is what a clustered affinity looks like: dense
within a cluster, a few shared directions across clusters. Memory O(sum |b|^2 + n r).
"""

from __future__ import annotations

import numpy as np


class BlockLowRank:
    """S = blockdiag(blocks) + low_rank @ low_rank.T, with matrix-vector products in O(sum |b|^2 + n r).

    Args:
        blocks: the diagonal blocks D_b, each square, symmetric and positive semi-definite.
        low_rank: V, shape (n, r); ``None`` for r = 0.
    """

    def __init__(self, blocks: list[np.ndarray], low_rank: np.ndarray | None = None):
        if len(blocks) == 0:
            raise ValueError("BlockLowRank needs at least one block")
        self.blocks = [np.asarray(b, dtype=np.float64) for b in blocks]
        sizes = np.array([b.shape[0] for b in self.blocks])
        for i, b in enumerate(self.blocks):
            if b.ndim != 2 or b.shape[0] != b.shape[1] or b.shape[0] == 0:
                raise ValueError(f"block {i} must be a non-empty square matrix, got shape {b.shape}")
            if not np.all(np.isfinite(b)):
                raise ValueError(f"block {i} contains NaN or inf")
            if np.abs(b - b.T).max() > 1e-10 * max(np.abs(b).max(), np.finfo(float).tiny):
                raise ValueError(f"block {i} is not symmetric")
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        n = int(self.offsets[-1])
        V = np.zeros((n, 0)) if low_rank is None else np.asarray(low_rank, dtype=np.float64)
        if V.ndim != 2 or V.shape[0] != n:
            raise ValueError(f"low_rank must have shape (n={n}, r), got {V.shape}")
        if not np.all(np.isfinite(V)):
            raise ValueError("low_rank contains NaN or inf")
        self.low_rank = V
        self.shape = (n, n)
        # Padded stack (B, smax, smax) so one einsum does every block product.
        smax = int(sizes.max())
        self._stack = np.zeros((len(sizes), smax, smax))
        self._index = np.zeros((len(sizes), smax), dtype=np.int64)
        self._mask = np.zeros((len(sizes), smax), dtype=bool)
        for i, b in enumerate(self.blocks):
            s = sizes[i]
            self._stack[i, :s, :s] = b
            self._index[i, :s] = np.arange(self.offsets[i], self.offsets[i + 1])
            self._mask[i, :s] = True

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def labels(self) -> np.ndarray:
        """Block id of every task, shape (n,)."""
        return np.repeat(np.arange(self.n_blocks), np.diff(self.offsets))

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """S @ x for x of shape (n,) or (n, k)."""
        x = np.asarray(x, dtype=np.float64)
        xp = np.where(self._mask[..., None] if x.ndim == 2 else self._mask, x[self._index], 0.0)
        yp = np.einsum("bij,bj...->bi...", self._stack, xp)
        y = np.empty_like(x)
        y[self._index[self._mask]] = yp[self._mask]
        return y + self.low_rank @ (self.low_rank.T @ x)

    __matmul__ = matvec

    def diagonal_block(self, b: int) -> np.ndarray:
        """The dense diagonal block S[b, b] = D_b + V_b V_b^T."""
        Vb = self.low_rank[self.offsets[b] : self.offsets[b + 1]]
        return self.blocks[b] + Vb @ Vb.T

    def max_abs(self) -> float:
        """An upper bound on max |S_ij| (exact on the diagonal blocks, Cauchy-Schwarz off them)."""
        within = max(np.abs(self.diagonal_block(b)).max() for b in range(self.n_blocks))
        across = float((self.low_rank**2).sum(axis=1).max(initial=0.0))
        return float(max(within, across))

    def min_block_eigenvalue(self) -> float:
        """min over blocks of the smallest eigenvalue of D_b (S is PSD when this is >= 0)."""
        return float(min(np.linalg.eigvalsh(b)[0] for b in self.blocks))

    def to_dense(self) -> np.ndarray:
        n = self.shape[0]
        S = self.low_rank @ self.low_rank.T if self.low_rank.shape[1] else np.zeros((n, n))
        for b, D in enumerate(self.blocks):
            sl = slice(self.offsets[b], self.offsets[b + 1])
            S[sl, sl] += D
        return S

"""Cross-products of [Z X y] in the blocked layout the PLS kernel factors.

Formed once per model; after that nothing per θ depends on the number of rows n.

Layout (see ``_pls.pyx``): the first term (most levels) is block 1, with block-diagonal
``A11 = Z1'Z1`` (one k1 × k1 block per level).  The remaining terms, the columns of X and y
form the dense block of size ``D = q_rest + p + 1``:
``A22 = [Z_rest X y]'[Z_rest X y]``.  The coupling ``A21 = [Z_rest X y]'Z1`` is stored
block-sparse: for level j of term 1 the rows its observations touch (all k_i rows of each
co-occurring level of every other term, plus every X and y row) and a dense panel.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["BlockedCrossprod"]


class BlockedCrossprod:
    """The stored cross-products and the static description of Λ on the dense block.

    Parameters
    ----------
    terms : list of ReTerm
        In lme4's order; ``terms[0]`` is block 1.
    X : (n, p) array
    y : (n,) array
    theta_offsets : list of int
        Where each term's θ starts in the full θ vector.
    """

    def __init__(self, terms, X, y, theta_offsets):
        t1, rest = terms[0], terms[1:]
        n, p = X.shape
        self.m1, self.k1 = t1.nlevels, t1.k
        self.p = p
        self.n = n
        # ---- block 1: Z1'Z1, one k1×k1 block per level
        k1, m1 = self.k1, self.m1
        A11 = np.empty((m1, k1, k1))
        for a in range(k1):
            for b in range(a + 1):
                v = np.bincount(t1.codes, weights=t1.X[:, a] * t1.X[:, b], minlength=m1)
                A11[:, a, b] = v
                A11[:, b, a] = v
        self.A11 = A11

        # ---- dense block rows: rest terms, X, y
        offs, o = [], 0
        for t in rest:
            offs.append(o)
            o += t.q
        self.rest_offsets = offs
        self.nz = nz = o
        self.D = D = nz + p + 1
        W = self._rest_matrix(rest, offs, X, y, n, D)
        self.A22 = np.ascontiguousarray((W.T @ W).toarray())

        # ---- A21 = W' Z1, block-sparse by level of term 1
        self.indptr, self.rows = self._pattern(t1, rest, offs, nz, D)
        Z1 = t1.Z()
        C = (W.T @ Z1).tocoo()
        j, c = np.divmod(C.col.astype(np.int64), k1)
        keys = self._keys
        pos = np.searchsorted(keys, j * D + C.row.astype(np.int64))
        if len(pos) and (pos.max() >= len(keys) or np.any(keys[pos] != j * D + C.row)):
            raise AssertionError("A21 has an entry outside its predicted pattern")  # pragma: no cover
        A21 = np.zeros((len(self.rows), k1))
        np.add.at(A21, (pos, c), C.data)
        self.A21 = A21
        del self._keys

        # ---- static description of Λ on the dense block (see update_blocked)
        self.rk = np.ones(D, dtype=np.int64)
        self.rtoff = np.zeros(D, dtype=np.int64)
        rs_index = np.full(D, -1, dtype=np.int64)     # θ index scaling row r (-1: scale 1)
        tflat_index = []                              # θ index of each Tflat entry (-2: zero)
        for t, off, toff in zip(rest, offs, theta_offsets[1:]):
            if t.k == 1:
                rs_index[off:off + t.q] = toff
            else:
                start = len(tflat_index)
                tflat_index.extend(_tril_map(t.k, toff))
                starts = off + np.arange(t.nlevels) * t.k
                self.rk[off:off + t.q] = 0
                self.rk[starts] = t.k
                self.rtoff[starts] = start
        if not tflat_index:
            tflat_index = [-2]
        self.rs_index = rs_index
        self.tflat_index = np.asarray(tflat_index, dtype=np.int64)
        self.t1_index = np.asarray(_tril_map(k1, theta_offsets[0]), dtype=np.int64)

    @staticmethod
    def _rest_matrix(rest, offs, X, y, n, D):
        """[Z_rest X y] as a CSC matrix (dense columns stored sparse: formed once)."""
        blocks = [t.Z() for t in rest]
        blocks.append(sp.csc_matrix(np.column_stack([X, y])))
        return sp.hstack(blocks, format="csc")

    def _pattern(self, t1, rest, offs, nz, D):
        """Rows of the dense block touched by each level of term 1 (sorted keys j*D + row)."""
        m1 = t1.nlevels
        keys = []
        for t, off in zip(rest, offs):
            pair = np.unique(t1.codes * t.nlevels + t.codes)
            j, lev = np.divmod(pair, t.nlevels)
            r = off + lev[:, None] * t.k + np.arange(t.k)[None, :]
            keys.append((j[:, None] * D + r).ravel())
        dense = np.arange(nz, D, dtype=np.int64)
        keys.append((np.arange(m1, dtype=np.int64)[:, None] * D + dense[None, :]).ravel())
        keys = np.unique(np.concatenate(keys))
        j, rows = np.divmod(keys, D)
        indptr = np.zeros(m1 + 1, dtype=np.int64)
        np.cumsum(np.bincount(j, minlength=m1), out=indptr[1:])
        self._keys = keys
        return indptr, np.ascontiguousarray(rows, dtype=np.int64)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.A11, self.A21, self.A22, self.rows, self.indptr))


def _tril_map(k: int, toff: int) -> list:
    """For a row-major k×k T, the θ index of each entry (-2 for the zero upper triangle).

    θ fills the lower triangle column by column (lme4's order)."""
    idx = [[-2] * k for _ in range(k)]
    t = toff
    for j in range(k):
        for i in range(j, k):
            idx[i][j] = t
            t += 1
    return [v for row in idx for v in row]

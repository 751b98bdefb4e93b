"""Cross-products of [Z X y] in the blocked layout the PLS kernel factors.

Formed once per model; after that nothing per θ depends on the number of rows n.

Layout (see ``_blockchol.pyx``): the first term (most levels) is block 1, with block-diagonal
``A11 = Z1'Z1`` (one k1 × k1 block per level).  The remaining terms, the columns of X and y
form the dense block of size ``D = q_rest + p + 1``:
``A22 = [Z_rest X y]'[Z_rest X y]``.  The coupling ``A21 = [Z_rest X y]'Z1`` is stored
block-sparse: for level j of term 1 the rows its observations touch (all k_i rows of each
co-occurring level of every other term, plus every X and y row) and a dense panel.
"""
from __future__ import annotations

import numpy as np

from . import _blockchol, _pls
from ._remat import dense_crossprod, level_xy_sums, panel_batches
from .fixed import xy_gram as xy_gram_of
from .obsform import ObsData, obs_form_pays
from .remat import weighted_counts

# Models whose coupling [Z_rest X y]'Z1 fits in SMALL_COUPLING doubles held densely, and
# whose rows carry at most SMALL_WORK products into the dense block, form their
# cross-products in one compiled pass (BlockedCrossprod._small).
SMALL_COUPLING = 2 ** 16
SMALL_WORK = 2 ** 22

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
    transposed : bool, optional
        Downdate the dense block row by row through the transposed panel pattern
        (default: when the dense block exceeds 4 MiB, i.e. no longer fits the cache).
    heavy_rows : int, optional
        Levels of term 1 whose panel has more rows than this (and is not in a batch) are
        "heavy": their downdates go together through dense rank-k updates (dsyrk) of the
        whole dense block instead of one scattered update each.  Default D / 8, where a
        scattered update of r² entries (memory bound) costs about what a dense column of
        a D² rank-k update does.
    xy_gram : (p + 1, p + 1) array, optional
        [X y]'[X y] when already formed (:func:`lmmfast.fixed.xy_gram`).
    cells : (cell, Xc), optional
        X's cells when X is a design of factors (:func:`lmmfast.fixed.design`: row i of X
        is row ``cell[i]`` of ``Xc``): the per-level sums [X y]'Z_i then come from counts
        per (level, cell) (:func:`level_xy_sums_cells`).
    obs : bool, optional
        Factor term 1's levels from their observations (:mod:`lmmfast.obsform`: kept in
        ``self.obs``; no batches, heavy levels or transposed pattern then).  Default:
        where :func:`lmmfast.obsform.obs_form_pays`.
    """

    def __init__(self, terms, X, y, theta_offsets, transposed=None, heavy_rows=None,
                 xy_gram=None, obs=None, cells=None):
        t1, rest = terms[0], terms[1:]
        n, p = X.shape
        self.m1, self.k1 = t1.nlevels, t1.k
        self.p = p
        self.n = n
        self.term_shapes = [(t.nlevels, t.k) for t in terms]
        # ---- dense block rows: rest terms, X, y
        offs, o = [], 0
        for t in rest:
            offs.append(o)
            o += t.q
        self.rest_offsets = offs
        self.nz = nz = o
        self.D = D = nz + p + 1
        w = sum(t.k for t in rest) + p + 1          # entries of a data row in the dense block
        if self.m1 * D * self.k1 <= SMALL_COUPLING and n * w * (w + 1) // 2 <= SMALL_WORK:
            self.A11, self.A22, self.indptr, self.rows, self.A21 = self._small(
                t1, rest, offs, X, y, D)
        else:
            # ---- block 1: Z1'Z1, one k1×k1 block per level
            self.A11 = t1.level_gram()
            X = np.ascontiguousarray(X, dtype=np.float64)
            y = np.ascontiguousarray(y, dtype=np.float64)
            self.A22 = self._dense_block(rest, offs, X, y, nz, D, xy_gram, cells)
            self.indptr, self.rows, self.A21 = self._coupling(t1, rest, offs, X, y, nz, D,
                                                              cells)
        self.batch = panel_batches(self.indptr, self.rows)
        if obs is None:
            obs = obs_form_pays(t1, rest, D, p + 1, self.indptr, self.batch)
        elif obs and not rest:
            raise ValueError("the observation form needs a second random-effects term")
        self.obs = ObsData(t1, rest, offs, X, y, self.indptr, self.rows, D) if obs else None
        if self.obs is not None:
            self.heavy = np.zeros(0, dtype=np.int64)
            transposed = False
        elif heavy_rows is None and D * self.k1 < 256:     # too small for BLAS to pay
            self.heavy = np.zeros(0, dtype=np.int64)
        else:
            nr = np.diff(self.indptr)
            single = _blockchol.single_levels(self.batch, self.m1)
            if heavy_rows is None:   # and big enough for BLAS to pay
                heavy = single & (nr > max(D // 8, 1)) & (nr * self.k1 >= 256)
            else:
                heavy = single & (nr > heavy_rows)
            self.heavy = np.flatnonzero(heavy).astype(np.int64)
        # Row-wise (transposed) downdate when L22 is too big for the cache (see _blockchol).
        if transposed is None:
            transposed = D * D * 8 > 4 * 2 ** 20
        self.tptr = self.tidx = self.tlev = None
        if transposed and len(self.rows):
            import scipy.sparse as sp

            # batched levels go through one rank-k update per batch, heavy ones through
            # dsyrk; the panels of the others, transposed (CSR -> CSC, a counting sort):
            # per random-effects row of the dense block, the levels touching it (ascending)
            # and where.  The X/y rows are downdated column-wise (``_blockchol.xy_accumulate``).
            rowwise = _blockchol.single_levels(self.batch, self.m1)     # not heavy either
            rowwise[self.heavy] = False
            lev = np.repeat(np.arange(self.m1, dtype=np.int64), np.diff(self.indptr))
            keep = np.flatnonzero(rowwise[lev] & (self.rows < nz))
            kptr = np.zeros(self.m1 + 1, dtype=np.int64)
            np.cumsum(np.bincount(lev[keep], minlength=self.m1), out=kptr[1:])
            P = sp.csr_matrix((keep, self.rows[keep], kptr), shape=(self.m1, D)).tocsc()
            self.tptr = P.indptr.astype(np.int64)
            self.tlev = P.indices.astype(np.int64)
            self.tidx = P.data.astype(np.int64)

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
        self.t1_index = np.asarray(_tril_map(self.k1, theta_offsets[0]), dtype=np.int64)
        self._re_block = None         # _re_scan: (lower pattern, CSR block), None where dense
        if self.obs is not None:
            self.obs.lam, self.obs.assign = self.obs.lam_plan(self.A22, self.rk, D)

    @staticmethod
    def _small(t1, rest, offs, X, y, D):
        """(A11, A22, indptr, rows, A21) in one compiled pass over the rows
        (:func:`lmmfast._remat.dense_crossprod`): the coupling held densely, then its
        touched entries taken as the panels.  For small models, where the term-by-term
        path below is dozens of numpy calls of a few µs each."""
        n, p = X.shape
        w = sum(t.k for t in rest) + p + 1
        R = np.empty((n, w), dtype=np.int64)
        V = np.empty((n, w))
        c = 0
        for t, o in zip(rest, offs):
            base = o + t.codes * t.k
            for a in range(t.k):
                R[:, c] = base + a
                V[:, c] = t.X[:, a]
                c += 1
        R[:, c:] = D - p - 1 + np.arange(p + 1)
        V[:, c: c + p] = X
        V[:, c + p] = y
        return dense_crossprod(t1.codes, t1.nlevels, np.ascontiguousarray(t1.X, dtype=np.float64),
                               R, V, D)

    @staticmethod
    def _dense_block(rest, offs, X, y, nz, D, xy_gram=None, cells=None):
        """A22 = [Z_rest X y]'[Z_rest X y], block by block from level codes (no n×q matrix);
        ``xy_gram``: its [X y]'[X y] corner when already formed (``fixed.xy_gram``)."""
        A22 = np.zeros((D, D))
        A22[nz:, nz:] = xy_gram_of(X, y) if xy_gram is None else xy_gram
        for i, (ti, oi) in enumerate(zip(rest, offs)):
            ki, mi = ti.k, ti.nlevels
            start = oi + np.arange(mi) * ki
            for a in range(ki):                       # Z_i'Z_i: block diagonal
                for b in range(a + 1):
                    A22[start + a, start + b] = weighted_counts(ti.codes, mi, ti.column(a),
                                                                ti.column(b))
            S = level_xy_sums_cells(ti.codes, mi, _z(ti), X, y, cells)   # (mi, p + 1, ki)
            for a in range(ki):
                A22[nz:, start + a] = S[:, :, a].T
            for tl, ol in zip(rest[i + 1:], offs[i + 1:]):   # Z_l'Z_i, later terms l
                li, ll, inv = ti.pairs(tl)
                for a in range(ki):
                    for b in range(tl.k):
                        A22[ol + ll * tl.k + b, oi + li * ki + a] = weighted_counts(
                            inv, len(li), ti.column(a), tl.column(b))
        _blockchol.symmetrize_lower(A22)                     # symmetrise from the lower triangle
        return A22

    @staticmethod
    def _coupling(t1, rest, offs, X, y, nz, D, cells=None):
        """A21 = [Z_rest X y]'Z1 block-sparse: (indptr, rows, panels), rows ascending per level.

        Level j of term 1 touches every row of each level of term i that shares an
        observation with it (all k_i of them), and every X and y row.  Each source (a term's
        level pairs, sorted by level of term 1 and then of term i; the X/y rows) comes
        sorted by level, and within a level the sources' rows follow each other in order
        (later terms, then X and y, sit further down the dense block), so every entry's
        place follows from per-level counts: no sort of the entries."""
        m1, k1 = t1.nlevels, t1.k
        lev, rws, vals = [], [], []
        for ti, oi in zip(rest, offs):
            j, li, inv = t1.pairs(ti)                  # sorted by (j, li)
            k = ti.k
            cols = [np.column_stack([weighted_counts(inv, len(j), ti.column(a), t1.column(c))
                                     for c in range(k1)]) for a in range(k)]
            # pair-major, then the term's columns (k = 1, the common case: no broadcast)
            lev.append(j if k == 1 else np.repeat(j, k))
            rws.append(oi + li if k == 1 else (oi + li[:, None] * k + np.arange(k)).ravel())
            vals.append(cols[0] if k == 1 else np.stack(cols, axis=1).reshape(-1, k1))
        nxy = X.shape[1] + 1
        W = level_xy_sums_cells(t1.codes, m1, _z(t1), X, y, cells)     # (m1, p + 1, k1)
        lev.append(np.repeat(np.arange(m1, dtype=np.int64), nxy))
        rws.append(np.tile(nz + np.arange(nxy, dtype=np.int64), m1))
        vals.append(W.reshape(-1, k1))
        counts = np.array([np.bincount(lv, minlength=m1) for lv in lev])   # sources × m1
        indptr = np.zeros(m1 + 1, dtype=np.int64)
        np.cumsum(counts.sum(axis=0), out=indptr[1:])
        nnz = int(indptr[-1])
        rows = np.empty(nnz, dtype=np.int64)
        A21 = np.empty((nnz, k1))
        before = indptr[:-1].copy()                    # where the source's run of level j starts
        for lv, rw, vl, cnt in zip(lev, rws, vals, counts):
            first = np.zeros(m1, dtype=np.int64)       # where level j starts in this source
            np.cumsum(cnt[:-1], out=first[1:])
            # lv is sorted: entry i of level j goes to before[j] + (i - first[j])
            pos = np.repeat(before - first, cnt) + np.arange(len(lv), dtype=np.int64)
            rows[pos] = rw
            A21[pos] = vl
            before += cnt
        return indptr, rows, A21

    def re_block(self):
        """A22's random-effects block Z_rest'Z_rest (nz × nz, symmetric) as a
        ``scipy.sparse.csr_matrix``, or None where more than :data:`RE_SPARSE_MAX` of it is
        nonzero.  One pass over its lower triangle, on first use (it is diagonal for one
        later scalar term, and has the level pairs' counts off the diagonal for several)."""
        self._re_scan()
        return self._re_block[1]

    def re_lower_pattern(self):
        """(ptr, cols) of the random-effects rows' strictly lower nonzeros of A22 (CSR, int64
        pointers and int32 columns), or None where :meth:`re_block` is None."""
        self._re_scan()
        return self._re_block[0]

    def _re_scan(self):
        if self._re_block is not None:
            return
        import scipy.sparse as sp

        nz = self.nz
        low = B = None
        if nz:
            # off the diagonal: at most the fraction's worth less the diagonal, halved
            limit = max(int((RE_SPARSE_MAX * nz * nz - nz) / 2), 0)
            low = _blockchol.lower_nonzeros(self.A22, nz, limit)
        if low is not None:
            ptr, cols = low
            r = np.repeat(np.arange(nz, dtype=np.int64), np.diff(ptr))
            A = self.A22
            vals = A[r, cols]
            d = np.arange(nz)
            rows = np.concatenate([r, cols, d])
            cc = np.concatenate([cols, r, d])
            B = sp.csr_matrix((np.concatenate([vals, vals, A[d, d]]), (rows, cc)),
                              shape=(nz, nz))
        self._re_block = (low, B)

    def dense_times(self, V):
        """A22 @ V (V: (D,) or (D, K)) by the blocks: the random-effects block sparse where
        :meth:`re_block` is, the X/y rows dense (scipy's BLAS, the factorization's: numpy's
        OpenBLAS would leave its threads spinning against the next evaluation)."""
        from scipy.linalg.blas import dgemm

        V = np.asarray(V, dtype=np.float64)
        nz, D = self.nz, self.D
        B = self.re_block() if nz else None
        vec = V.ndim == 1
        Vm = V[:, None] if vec else V
        if D == 0 or Vm.shape[1] == 0:
            return np.zeros(V.shape)
        if B is None:
            out = dgemm(1.0, self.A22.T, Vm, trans_a=1)     # symmetric: row-major is A22'
        else:
            Axy = self.A22[nz:]                               # the X/y rows, (D - nz) × D
            out = np.empty((D, Vm.shape[1]))
            out[nz:] = dgemm(1.0, Axy.T, Vm, trans_a=1)
            out[:nz] = B @ Vm[:nz]
            out[:nz] += dgemm(1.0, Axy[:, :nz], np.asfortranarray(Vm[nz:]), trans_a=1)
        return out[:, 0] if vec else out

    @property
    def nbytes(self) -> int:
        return (sum(a.nbytes for a in (self.A11, self.A21, self.A22, self.rows, self.indptr))
                + (self.obs.nbytes if self.obs is not None else 0))


# A22's random-effects block is used sparse (the transposed downdate's reads, products
# with it) while at most this fraction of it is nonzero.
RE_SPARSE_MAX = 0.25

# The per-level sums go through counts per (level, cell) while there are at most this many
# (level, cell) pairs per row: a count matrix of at most 32 bytes a row, and a product
# with the cells' matrix by BLAS in place of a scattered pass over n × (p + 1).
CELL_PAIRS_PER_ROW = 4


def level_xy_sums_cells(codes, m, Z, X, y, cells=None):
    """[X y]'Z per level of a term, as :func:`lmmfast._remat.level_xy_sums` (its
    ``(m, p + 1, k)`` array), through X's cells where they are given and few enough.

    With ``cells = (cell, Xc)`` (X = Xc taken by cell), level j's X part is
    Σ_c N_b[j, c] Xc[c, :], N_b[j, c] = Σ_{i: codes[i] = j, cell[i] = c} Z[i, b]: one count
    per row and a product of N_b (m × cells) with Xc, where the direct pass scatters
    every row's p + 1 values; the y part is one weighted count.  Sums in another order:
    equal to rounding."""
    if cells is None or X.shape[1] == 0:
        return level_xy_sums(codes, m, Z, X, y)
    cell, Xc = cells
    nc = Xc.shape[0]
    n = len(codes)
    if m * nc > CELL_PAIRS_PER_ROW * max(n, 1):
        return level_xy_sums(codes, m, Z, X, y)
    from scipy.linalg.blas import dgemm

    p = Xc.shape[1]
    k = 1 if Z is None else Z.shape[1]
    key = codes * nc + cell
    Xcf = np.asfortranarray(Xc, dtype=np.float64)
    out = np.empty((m, p + 1, k))
    for b in range(k):
        w = None if Z is None else Z[:, b]
        N = np.bincount(key, weights=w, minlength=m * nc).astype(np.float64).reshape(m, nc)
        # by scipy's BLAS, the factorization's (numpy's would leave its own threads
        # spinning against the first evaluations; see fixed.xy_gram)
        out[:, :p, b] = dgemm(1.0, N.T, Xcf, trans_a=1) if m and nc else 0.0
        out[:, p, b] = np.bincount(codes, weights=y if w is None else y * w, minlength=m)
    return out


def _z(t):
    """A term's model matrix for :func:`level_xy_sums`: None for a lone intercept."""
    return None if t.intercept_only else np.ascontiguousarray(t.X, dtype=np.float64)


def panel_batches_reference(indptr, rows):
    """numpy oracle of :func:`lmmfast._remat.panel_batches`."""
    nr = np.diff(indptr)
    m1 = len(nr)
    if m1 == 0:
        return np.zeros(1, dtype=np.int64)
    if len(rows) == 0:
        return np.array([0, m1], dtype=np.int64)
    first = np.where(nr > 0, rows[np.minimum(indptr[:-1], len(rows) - 1)], 0)
    contig = np.where(nr > 0, rows[np.maximum(indptr[1:] - 1, 0)] - first == nr - 1, True)
    same = np.zeros(m1, dtype=bool)
    same[1:] = (first[1:] == first[:-1]) & (nr[1:] == nr[:-1]) & contig[1:] & contig[:-1]
    return np.append(np.flatnonzero(~same), m1).astype(np.int64)


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

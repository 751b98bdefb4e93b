"""The coupling of term 1 with the dense block in observation form: data and cost rule.

The blocked factor downdates its dense block by every level's panel (``_blockchol``).
Where the levels of term 1 have few observations next to the rows of their panels —
maximal crossed designs, each subject meeting each item about once — the same downdate
costs a fraction when it is formed from the observations (``_obsform.pyx`` has the
algebra).  :class:`ObsData` holds what that needs, in the order of term 1's levels;
:func:`obs_form_pays` decides by predicted cost.
"""
from __future__ import annotations

import numpy as np

__all__ = ["ObsData", "obs_form_pays", "panel_cost", "obs_cost", "checked_arrays"]

# The observation form is taken where it is predicted at least this many times cheaper:
# its multiply-adds run in small loops, the panel path's in BLAS's dsyrk, faster each;
# and a fit's gradients (L-BFGS-B: one per evaluation) gain nothing from it -- where the
# panel path downdates row by row, its gradient does too, faster than the observation
# form's.  Measured on 45 crossed maximal designs (2 x 2, 2 x 2 x 2, an 8-wide term 1
# with a 4-wide later term; 20-100 x 16-60 levels, 1, 2 or 4 observations per cell; one
# thread, 2 cores of an AMD EPYC): one evaluation with its panels ran 1.20-2.6x faster
# wherever predicted 1.8x or more, but whole fits only 0.73-1.10x (2 x 2 designs
# predicted 1.8x: 0.73-1.07x) where predicted under 4; the 2 x 2 x 2 designs predicted
# 5.3-5.5x fit 1.10-1.45x faster (kb07's 56 x 32: 0.22 against 0.32 s).
GAIN = 4.0
# Later terms must be this wide (the widths the blocks' vector kernels are written for:
# 2 x 2 and 2 x 2 x 2 designs' terms); others would run in general loops, slower than BLAS.
VECTOR_WIDTHS = (4, 8)
# Per pair of units, the loads of the pair, its Gram entry and the units' rows, counted in
# multiply-adds.
PAIR_OVERHEAD = 16.0
# ... and only for dense blocks that stay in the cache (its updates land anywhere in L22),
# at most this many observations in a level, and at most this many pairs of unit
# instances within levels (listed once, 24 bytes each, after the lower half is kept).
MAX_D = 724
MAX_LEVEL_OBS = 4096
MAX_PAIRS = 2 ** 21
# From this many predicted multiply-adds an evaluation (obs_cost) the levels and blocks
# are shared among the threads.  Below, waking them (tens of microseconds, with idle
# threads asleep) and the cache lines the pairs read from the other core's levels cost
# more than they save.  Measured on 2 cores (kb07-like designs, one evaluation, fastest
# of 15; 2 threads against 1): 56 x 32 subjects x items (3.2e6) 0.57 against 0.54 ms,
# 112 x 64 (2.3e7) 2.90 against 2.71 ms, 200 x 80 (6.3e7) 6.5 against 7.8 ms; with a
# gradient between evaluations (L-BFGS-B; BLAS's threads then spin on the other core)
# one thread is as fast even there.
OBS_THREAD_MIN_WORK = 4e7


def panel_cost(indptr, batch, k1: int) -> float:
    """Multiply-adds of the panel path per evaluation: each level's panel (rows × k1²)
    and Λ' on it, and the downdate — one rank-K update per batch of levels sharing rows,
    one rank-k1 update per other level (lower triangles)."""
    nr = np.diff(np.asarray(indptr)).astype(float)
    cost = float((nr * k1 * (2 * k1)).sum())
    b = np.asarray(batch)
    for j0, j1 in zip(b[:-1], b[1:]):
        cost += nr[j0] ** 2 * k1 * (j1 - j0) / 2.0
    return cost


def obs_cost(level_counts, k1: int, ks, nxy: int) -> float:
    """Multiply-adds of the observation form per evaluation: per observation its g_i, its
    share of the panel and of the X/y rows; per pair of unit instances of one level (the
    lower half of them) the Gram entry, a k_t × k_t' outer product and
    :data:`PAIR_OVERHEAD`."""
    n = np.asarray(level_counts, dtype=float)
    nu = len(ks)
    zw = float(sum(ks))
    per_obs = k1 * (k1 + zw + 2 * nxy) + zw * nxy + nxy * nxy / 2.0
    kbar2 = (zw / nu) ** 2 if nu else 0.0
    return float(n.sum()) * per_obs + float((n * n).sum()) * nu * nu / 2.0 * (
        k1 + kbar2 + PAIR_OVERHEAD)


def obs_form_pays(t1, rest, D: int, nxy: int, indptr, batch) -> bool:
    """Whether the observation form is predicted :data:`GAIN` times cheaper than the
    panels (and fits :data:`VECTOR_WIDTHS`, :data:`MAX_D`, :data:`MAX_LEVEL_OBS`,
    :data:`MAX_PAIRS`)."""
    if not rest or D > MAX_D or any(t.k not in VECTOR_WIDTHS for t in rest):
        return False
    counts = np.bincount(t1.codes, minlength=t1.nlevels)
    nu = len(rest)
    if counts.max(initial=0) > MAX_LEVEL_OBS or float(((counts * nu) ** 2).sum()) > MAX_PAIRS:
        return False
    return GAIN * obs_cost(counts, t1.k, [t.k for t in rest], nxy) < panel_cost(indptr, batch, t1.k)


class ObsData:
    """The observations in the order of term 1's levels, as ``_obsform`` reads them.

    Attributes
    ----------
    optr : (m1 + 1,) int64
        Level j's observations are ``optr[j]:optr[j + 1]``.
    z1 : (n, k1) float64
        Term 1's model-matrix rows.
    upos : (n, nu) int64
        For each later term (a unit), the dense-block row where the observation's level
        starts (``offset_t + code * k_t``).
    uprow : (n, nu) int64
        Where that row sits in the level's panel (``rows[indptr[j]:indptr[j + 1]]``).
    uk, uzoff : (nu,) int64
        Each later term's k_t, and where its values start in a row of ``uz``.
    uz : (n, Σ k_t) float64
        The later terms' model-matrix rows.
    xy : (n, p + 1) float64
        The rows of [X y].
    soff : (n, nu) int64
        Where each unit's Λ_t' z goes in the kernel's scratch (in the order of the units'
        dense-block rows).
    mbase : (m1 + 1,) int64
        Where level j's Gram matrix (n_j × n_j) starts in the kernel's scratch.
    bptr, bpos, pair : int64 arrays
        The random-effects blocks of the downdate (row and column where each starts) and
        their pairs (Gram entry, the two units' offsets in the scratch); see ``_pairs``.
    lam, assign : int64 arrays
        The unit blocks Λ' A22 Λ writes, and the blocks the pairs write alone (set by the
        owner once A22 and the units are known; see :meth:`lam_plan`).
    """

    def __init__(self, t1, rest, offs, X, y, indptr, rows, D):
        order = np.argsort(t1.codes, kind="stable")
        counts = np.bincount(t1.codes, minlength=t1.nlevels)
        self.optr = np.zeros(t1.nlevels + 1, dtype=np.int64)
        np.cumsum(counts, out=self.optr[1:])
        self.z1 = np.ascontiguousarray(np.asarray(t1.X, dtype=np.float64)[order])
        self.uk = np.array([t.k for t in rest], dtype=np.int64)
        self.uzoff = np.zeros(len(rest), dtype=np.int64)
        np.cumsum(self.uk[:-1], out=self.uzoff[1:])
        self.upos = np.ascontiguousarray(np.column_stack(
            [o + t.codes[order].astype(np.int64) * t.k for t, o in zip(rest, offs)]))
        self.uz = np.ascontiguousarray(np.column_stack(
            [np.asarray(t.X, dtype=np.float64)[order] for t in rest]))
        self.xy = np.ascontiguousarray(np.column_stack([X[order], y[order]]), dtype=np.float64)
        # each unit's place in its level's panel: the panels' rows are ascending per level,
        # so (level, row) keys are ascending over all panels
        indptr = np.asarray(indptr, dtype=np.int64)
        lev_of_entry = np.repeat(np.arange(t1.nlevels, dtype=np.int64), np.diff(indptr))
        keys = lev_of_entry * D + np.asarray(rows, dtype=np.int64)
        lev = np.repeat(np.arange(t1.nlevels, dtype=np.int64), counts)[:, None]
        at = np.searchsorted(keys, lev * D + self.upos)
        if len(keys) == 0 or np.any(at >= len(keys)) or not np.array_equal(
                keys[np.minimum(at, max(len(keys) - 1, 0))], lev * D + self.upos):
            raise ValueError("an observation's level is missing from its panel")
        self.uprow = np.ascontiguousarray(at - indptr[lev])
        self._pairs(D)
        self.lam = self.assign = None

    def _pairs(self, D):
        """Where each unit's Λ_t' z goes in s (``soff``: in the order of the units' rows,
        so that a block's pairs read s in order), the levels' Gram matrices (``mbase``),
        and the random-effects blocks of the downdate with their pairs (``bptr``,
        ``bpos``, ``pair``): every ordered pair of unit instances (observation, later
        term) within one level of term 1 whose first unit's rows lie at or below the
        second's, sorted by block (the first unit's row, the second's)."""
        n, nu = self.upos.shape
        pos = self.upos.ravel()
        width = np.tile(self.uk, n)
        order = np.lexsort((np.arange(n * nu), pos))     # by row, then observation
        start = np.empty(n * nu, dtype=np.int64)
        start[order] = np.concatenate([[0], np.cumsum(width[order])[:-1]]).astype(np.int64)
        self.soff = np.ascontiguousarray(start.reshape(n, nu))
        nobs = np.diff(self.optr)
        self.mbase = np.zeros(len(nobs) + 1, dtype=np.int64)
        np.cumsum(nobs * nobs, out=self.mbase[1:])
        cnt = nobs * nu                                    # unit instances per level
        lev = np.repeat(np.arange(len(cnt), dtype=np.int64), cnt)
        N = len(lev)
        obs = np.repeat(np.arange(n, dtype=np.int64), nu)
        first_inst = self.optr[:-1] * nu
        reps = cnt[lev]
        first = np.repeat(np.arange(N, dtype=np.int64), reps)
        before = np.zeros(N, dtype=np.int64)
        np.cumsum(reps[:-1], out=before[1:])
        second = first_inst[lev[first]] + (np.arange(len(first), dtype=np.int64)
                                           - np.repeat(before, reps))
        keep = pos[first] >= pos[second]
        first, second = first[keep], second[keep]
        key = pos[first] * D + pos[second]
        order = np.argsort(key, kind="stable")
        first, second, key = first[order], second[order], key[order]
        blocks, bstart = np.unique(key, return_index=True)
        self.bptr = np.append(bstart, len(key)).astype(np.int64)
        self.bpos = np.ascontiguousarray(np.column_stack([blocks // D, blocks % D]), dtype=np.int64)
        lj = lev[first]
        i1 = obs[first] - self.optr[lj]
        i2 = obs[second] - self.optr[lj]
        mi = self.mbase[lj] + np.maximum(i1, i2) * nobs[lj] + np.minimum(i1, i2)   # lower
        flat = self.soff.ravel()
        self.pair = np.ascontiguousarray(np.column_stack([mi, flat[first], flat[second]]),
                                         dtype=np.int64)

    def lam_plan(self, A22, rk, D: int):
        """Which blocks of the dense block's lower triangle Λ' A22 Λ (+ I) writes, and
        which the pairs write alone.

        The dense block's rows fall into units (a level of a later term, ``rk`` rows; a
        scalar row).  A block of two units whose A22 block is zero (two levels that never
        meet in an observation: most item x item blocks of a crossed design) and that has
        pairs is written by its pairs alone (``assign``: L22 = -Σ, no Λ' A22 Λ to form or
        read); every other unit block of the lower triangle (``lam``, row-major (row,
        column) of its first entry) by Λ' A22 Λ, the pairs then subtracting from it.

        Returns
        -------
        lam : (nlam, 2) int64
        assign : (nblk,) int64, 1 where block b's pairs write it alone
        """
        starts = unit_starts(rk, D)
        nzA = (np.asarray(A22)[:D, :D] != 0).astype(np.int64)
        nzA = np.add.reduceat(np.add.reduceat(nzA, starts, axis=0), starts, axis=1)
        ui = np.searchsorted(starts, self.bpos[:, 0])
        uj = np.searchsorted(starts, self.bpos[:, 1])
        assign = ((ui != uj) & (nzA[ui, uj] == 0)).astype(np.int64)
        U = len(starts)
        todo = np.tril(np.ones((U, U), dtype=bool))
        todo[ui[assign == 1], uj[assign == 1]] = False
        i, j = np.nonzero(todo)
        lam = np.ascontiguousarray(np.column_stack([starts[i], starts[j]]), dtype=np.int64)
        return lam, assign

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.optr, self.z1, self.upos, self.uprow, self.uz,
                                      self.xy, self.soff, self.mbase, self.bptr, self.bpos,
                                      self.pair, self.lam, self.assign) if a is not None)


def unit_starts(rk, D: int) -> np.ndarray:
    """The first row of each unit of the dense block (a later term's level, ``rk`` rows
    from its first; a scalar row), as int64."""
    starts = []
    r = 0
    while r < D:
        starts.append(r)
        r += max(int(rk[r]), 1)
    return np.asarray(starts, dtype=np.int64)


def checked_arrays(ob, indptr, rows, rk, nz: int, D: int, k1: int, lam, assign) -> dict:
    """The arrays of ``ob`` (:class:`ObsData`) as the kernel reads them (contiguous, int64
    or float64), checked against the panels (``indptr``, ``rows``), the dense block's
    units (``rk``: k at each level's first row, 1 for a scalar row) and its sizes: every
    index the kernel follows stays inside its array, every unit is one level of one term
    and sits where its panel has it, the units' places in the scratch do not overlap,
    every pair's Gram entry lies in its level's lower triangle, and the blocks' plan
    (``lam``, ``assign``: :meth:`ObsData.lam_plan`) covers the lower triangle's unit
    blocks once.  Raises ValueError naming the first mismatch."""
    m1 = len(indptr) - 1
    nxy = D - nz
    optr = np.ascontiguousarray(ob.optr, dtype=np.int64)
    z1 = np.ascontiguousarray(ob.z1, dtype=np.float64)
    upos = np.ascontiguousarray(ob.upos, dtype=np.int64)
    uprow = np.ascontiguousarray(ob.uprow, dtype=np.int64)
    uk = np.ascontiguousarray(ob.uk, dtype=np.int64)
    uzoff = np.ascontiguousarray(ob.uzoff, dtype=np.int64)
    uz = np.ascontiguousarray(ob.uz, dtype=np.float64)
    xy = np.ascontiguousarray(ob.xy, dtype=np.float64)
    n, nu = len(z1), len(uk)
    zw = int(uk.sum())
    if (optr.shape != (m1 + 1,) or optr[0] != 0 or optr[-1] != n
            or np.any(np.diff(optr) < 0) or z1.shape != (n, k1)
            or upos.shape != (n, nu) or uprow.shape != (n, nu) or nu == 0
            or uzoff.shape != (nu,) or np.any(uk < 1)
            or not np.array_equal(uzoff, np.concatenate([[0], np.cumsum(uk)[:-1]]))
            or uz.shape != (n, zw) or xy.shape != (n, nxy)):
        raise ValueError("observation form does not match the model's shapes")
    if n and (np.any(upos < 0) or np.any(upos + uk > nz)
              or not np.array_equal(rk[upos], np.broadcast_to(uk, upos.shape))):
        raise ValueError("observation form: a unit's rows are not one level of a term")
    ip = indptr
    nr = np.diff(ip)
    tail = rows[(ip[1:, None] - nxy + np.arange(nxy)).clip(0, max(len(rows) - 1, 0))] \
        if len(rows) else np.zeros((m1, nxy), dtype=np.int64)
    if np.any(nr < nxy) or not np.array_equal(
            tail, np.broadcast_to(nz + np.arange(nxy), tail.shape)):
        raise ValueError("every panel must end with the X/y rows of the dense block")
    lev = np.repeat(np.arange(m1), np.diff(optr))[:, None]
    last = uprow + uk - 1
    if n and (np.any(uprow < 0) or np.any(last >= (nr - nxy)[lev])
              or not np.array_equal(rows[ip[lev] + uprow], upos)
              or not np.array_equal(rows[ip[lev] + last], upos + uk - 1)):
        raise ValueError("observation form: a unit's panel rows do not match the panel")
    # where the units' Λ_t' z go in s: a permutation of the n × zw places, each unit's
    # k_t rows in one piece
    soff = np.ascontiguousarray(ob.soff, dtype=np.int64)
    if soff.shape != (n, nu):
        raise ValueError("observation form does not match the model's shapes")
    cover = np.zeros(n * zw + 1, dtype=np.int64)
    if n:
        ends = soff + uk
        if np.any(soff < 0) or np.any(ends > n * zw):
            raise ValueError("observation form: a unit's place in s is out of range")
        np.add.at(cover, soff.ravel(), 1)
        np.add.at(cover, ends.ravel(), -1)
    if np.any(np.cumsum(cover)[:n * zw] != 1):
        raise ValueError("observation form: the units' places in s overlap")
    # the levels' Gram matrices
    nobs = np.diff(optr)
    mbase = np.ascontiguousarray(ob.mbase, dtype=np.int64)
    if mbase.shape != (m1 + 1,) or not np.array_equal(
            mbase, np.concatenate([[0], np.cumsum(nobs * nobs)])):
        raise ValueError("observation form: the Gram matrices' places do not match the levels")
    # the random-effects blocks: their places, and each pair's Gram entry and units
    bptr = np.ascontiguousarray(ob.bptr, dtype=np.int64)
    bpos = np.ascontiguousarray(ob.bpos, dtype=np.int64)
    pair = np.ascontiguousarray(ob.pair, dtype=np.int64)
    nblk = len(bpos)
    if (bptr.shape != (nblk + 1,) or bpos.shape != (nblk, 2) or pair.ndim != 2
            or pair.shape[1] != 3 or bptr[0] != 0 or bptr[-1] != len(pair)
            or np.any(np.diff(bptr) < 0)):
        raise ValueError("observation form: the blocks do not match their pairs")
    if len(pair) and (np.any(pair[:, 0] < 0) or np.any(pair[:, 0] >= mbase[-1])):
        raise ValueError("observation form: a pair's Gram entry is out of range")
    if len(pair):               # ... and in its level's lower triangle (all that is formed)
        lev_p = np.searchsorted(mbase, pair[:, 0], side="right") - 1
        local = pair[:, 0] - mbase[lev_p]
        if np.any(local % nobs[lev_p] > local // nobs[lev_p]):
            raise ValueError("observation form: a pair's Gram entry is above the diagonal")
    # each pair's units: the unit whose place in s is given, at the block's row/column
    unit_at = np.full(n * zw + 1, -1, dtype=np.int64)
    unit_at[soff.ravel()] = np.arange(n * nu)
    blk_of = np.repeat(np.arange(nblk), np.diff(bptr))
    for side in (0, 1):
        off = pair[:, 1 + side]
        ok = (off >= 0) & (off < n * zw)
        inst = unit_at[np.where(ok, off, n * zw)]
        if len(pair) and (not ok.all() or np.any(inst < 0) or not np.array_equal(
                upos.ravel()[inst], bpos[blk_of, side])):
            raise ValueError("observation form: a pair's unit is not at its block")
    if nblk and np.any(bpos[:, 0] < bpos[:, 1]):
        raise ValueError("observation form: a block above the diagonal")
    # Λ' A22 Λ's blocks and the blocks the pairs write alone: between them every unit
    # block of the lower triangle once, the pairs' alone off the diagonal
    lam = np.ascontiguousarray(lam, dtype=np.int64)
    assign = np.ascontiguousarray(assign, dtype=np.int64)
    if assign.shape != (nblk,) or np.any((assign != 0) & (assign != 1)) or lam.ndim != 2 \
            or lam.shape[1] != 2:
        raise ValueError("observation form: the blocks' plan does not match the blocks")
    unit = np.zeros(D, dtype=bool)
    unit[unit_starts(rk, D)] = True
    cells = np.concatenate([lam, bpos[assign == 1]]) if nblk else lam
    if (np.any(cells < 0) or np.any(cells >= D) or not unit[cells].all()
            or np.any(cells[:, 0] < cells[:, 1])
            or np.any(bpos[assign == 1, 0] == bpos[assign == 1, 1])):
        raise ValueError("observation form: a planned block is not a unit block of the lower triangle")
    U = int(unit.sum())
    if len(cells) != U * (U + 1) // 2 or len(np.unique(cells[:, 0] * D + cells[:, 1])) != len(cells):
        raise ValueError("observation form: the blocks' plan does not cover the lower triangle once")
    return dict(optr=optr, z1=z1, upos=upos, uprow=uprow, uk=uk, uzoff=uzoff, uz=uz, xy=xy,
                soff=soff, mbase=mbase, bptr=bptr, bpos=bpos, pair=pair, lam=lam, assign=assign)

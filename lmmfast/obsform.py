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

__all__ = ["ObsData", "obs_form_pays", "panel_cost", "obs_cost"]

# The observation form is taken where it is predicted at least this many times cheaper:
# its multiply-adds run in small loops, the panel path's in BLAS's dsyrk, several times
# faster each.  Measured (one thread, one evaluation, 2 cores of an AMD EPYC): predicted
# 5.5x on kb07's design (56 x 32, two 8 x 8 terms) ran 1.56x faster; 1.8x on a 2 x 2
# maximal design 1.19x faster; 3.0x with an 8-wide and a 4-wide term 0.78x (slower).
GAIN = 4.0
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
# are shared among the threads (below, waking them costs more than they save).
OBS_THREAD_MIN_WORK = 1e6


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
    panels (and fits :data:`MAX_D`, :data:`MAX_LEVEL_OBS`, :data:`MAX_PAIRS`)."""
    if not rest or D > MAX_D:
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

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.optr, self.z1, self.upos, self.uprow, self.uz,
                                      self.xy, self.soff, self.mbase, self.bptr, self.bpos,
                                      self.pair))

# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled kernels of the random-effects bookkeeping (level codes of pairs of factors).

``pair_codes`` is ``np.unique(a * mb + b, return_inverse=True)`` split back into its two
factors, computed in O(n + ma + mb) time: rows are bucketed by ``a`` (a counting sort),
and within each level of ``a`` the distinct levels of ``b`` are marked in an array of
size ``mb`` and sorted (each level holds only a few).  Its numpy oracle is
:func:`pair_codes_reference`.
"""
import numpy as np
cimport numpy as cnp
from libc.stdlib cimport qsort

cnp.import_array()


cdef int _cmp_i64(const void* x, const void* y) noexcept nogil:
    cdef cnp.int64_t a = (<const cnp.int64_t*>x)[0], b = (<const cnp.int64_t*>y)[0]
    return (a > b) - (a < b)


cdef Py_ssize_t pair_codes_core(const cnp.int64_t* a, const cnp.int64_t* b, Py_ssize_t n,
                                Py_ssize_t ma, Py_ssize_t mb, cnp.int64_t* start,
                                cnp.int64_t* order, cnp.int64_t* bs, cnp.int64_t* mark,
                                cnp.int64_t* slot, cnp.int64_t* pa, cnp.int64_t* pb,
                                cnp.int64_t* inv) noexcept nogil:
    """Fill pa/pb (distinct pairs, sorted by a then b) and inv; return the number of pairs.

    Work arrays: start (ma + 1), order and bs (n), mark and slot (mb).  The counting sort
    carries b along (``bs``), so the per-level passes read it in order: on large n the
    random gathers b[order[t]] cost more than the sort itself."""
    cdef Py_ssize_t i, j, t, r, npair = 0, first, k, pos
    for j in range(ma + 1):
        start[j] = 0
    for i in range(n):
        start[a[i] + 1] += 1
    for j in range(ma):
        start[j + 1] += start[j]
    for i in range(n):                       # counting sort of the rows by a (stable)
        pos = start[a[i]]
        order[pos] = i
        bs[pos] = b[i]
        start[a[i]] = pos + 1
    for j in range(ma - 1, 0, -1):           # back to level starts (start[ma] stays n)
        start[j] = start[j - 1]
    if ma > 0:
        start[0] = 0
    for k in range(mb):
        mark[k] = -1
    for j in range(ma):
        first = npair
        for t in range(start[j], start[j + 1]):
            r = bs[t]
            if mark[r] != j:
                mark[r] = j
                pb[npair] = r
                npair += 1
        qsort(pb + first, npair - first, sizeof(cnp.int64_t), _cmp_i64)
        for k in range(first, npair):
            pa[k] = j
            slot[pb[k]] = k
        for t in range(start[j], start[j + 1]):
            inv[order[t]] = slot[bs[t]]
    return npair


def pair_codes(const cnp.int64_t[::1] a, Py_ssize_t ma, const cnp.int64_t[::1] b, Py_ssize_t mb):
    """Distinct (a, b) pairs and each row's pair index.

    Parameters
    ----------
    a, b : (n,) int64 arrays
        Level codes, ``0 <= a < ma`` and ``0 <= b < mb``.

    Returns
    -------
    pa, pb : (npairs,) int64 arrays
        The distinct pairs, sorted by ``a`` then ``b`` (``np.unique`` of ``a * mb + b``).
    inv : (n,) int64 array
        Row i's pair: ``(pa[inv[i]], pb[inv[i]]) == (a[i], b[i])``.
    """
    cdef Py_ssize_t n = a.shape[0], i, npair
    if b.shape[0] != n:
        raise ValueError("a and b must have the same length")
    if ma < 0 or mb < 0:
        raise ValueError("numbers of levels must be non-negative")
    cdef bint bad = False
    with nogil:
        for i in range(n):
            if a[i] < 0 or a[i] >= ma or b[i] < 0 or b[i] >= mb:
                bad = True
                break
    if bad:
        raise ValueError("codes must lie in [0, number of levels)")
    start = np.empty(ma + 1, dtype=np.int64)
    order = np.empty(max(n, 1), dtype=np.int64)
    bsorted = np.empty(max(n, 1), dtype=np.int64)
    mark = np.empty(max(mb, 1), dtype=np.int64)
    slot = np.empty(max(mb, 1), dtype=np.int64)
    pa = np.empty(max(n, 1), dtype=np.int64)
    pb = np.empty(max(n, 1), dtype=np.int64)
    inv = np.empty(max(n, 1), dtype=np.int64)
    cdef cnp.int64_t[::1] sv = start, ov = order, bsv = bsorted, mv = mark, slv = slot
    cdef cnp.int64_t[::1] pav = pa, pbv = pb, iv = inv
    if n == 0:
        return pa[:0].copy(), pb[:0].copy(), inv[:0].copy()
    with nogil:
        npair = pair_codes_core(&a[0], &b[0], n, ma, mb, &sv[0], &ov[0], &bsv[0], &mv[0],
                                &slv[0], &pav[0], &pbv[0], &iv[0])
    return pa[:npair].copy(), pb[:npair].copy(), inv


def pair_codes_reference(a, ma, b, mb):
    """numpy oracle of :func:`pair_codes`."""
    keys = np.asarray(a, dtype=np.int64) * mb + np.asarray(b, dtype=np.int64)
    u, inv = np.unique(keys, return_inverse=True)
    return u // mb, u % mb, inv.ravel().astype(np.int64)

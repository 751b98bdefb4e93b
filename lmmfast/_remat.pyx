# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled kernels of the random-effects bookkeeping (level codes of pairs of factors) and
the cross-products of small models in one pass (:func:`dense_crossprod`).

``pair_codes`` is ``np.unique(a * mb + b, return_inverse=True)`` split back into its two
factors, computed in O(n + ma + mb) time: rows are bucketed by ``a`` (a counting sort),
and within each level of ``a`` the distinct levels of ``b`` are marked in an array of
size ``mb`` and sorted (each level holds only a few: an inline quicksort / insertion
sort).  Its numpy oracle is
:func:`pair_codes_reference`.  ``level_xy_sums`` gives a term's per-level [X y]'Z (the
X and y rows of the coupling block) in one pass; oracle :func:`level_xy_sums_reference`.
"""
import numpy as np
cimport numpy as cnp

cnp.import_array()


cdef void sort_i64(cnp.int64_t* v, Py_ssize_t n) noexcept nogil:
    """Sort v[0:n] ascending in place: quicksort (median of three) down to runs of 16,
    then one insertion sort.  A level's distinct partners are few (tens); libc's qsort
    calls a comparison function per step and took a quarter of pair_codes' time."""
    cdef Py_ssize_t lo, hi, i, j, mid, top = 0
    cdef Py_ssize_t stack[128]
    cdef cnp.int64_t p, t
    if n < 2:
        return
    stack[0] = 0
    stack[1] = n - 1
    top = 2
    while top > 0:
        top -= 2
        lo = stack[top]
        hi = stack[top + 1]
        while hi - lo > 16:
            mid = lo + (hi - lo) // 2          # median of three as the pivot
            if v[mid] < v[lo]:
                v[mid], v[lo] = v[lo], v[mid]
            if v[hi] < v[lo]:
                v[hi], v[lo] = v[lo], v[hi]
            if v[hi] < v[mid]:
                v[hi], v[mid] = v[mid], v[hi]
            p = v[mid]
            i = lo
            j = hi
            while i <= j:
                while v[i] < p:
                    i += 1
                while v[j] > p:
                    j -= 1
                if i <= j:
                    v[i], v[j] = v[j], v[i]
                    i += 1
                    j -= 1
            # the smaller part next, the larger one stacked: depth below log2(n) + 1
            if j - lo < hi - i:
                stack[top] = i
                stack[top + 1] = hi
                top += 2
                hi = j
            else:
                stack[top] = lo
                stack[top + 1] = j
                top += 2
                lo = i
    for i in range(1, n):                      # runs of at most 17 left unsorted
        t = v[i]
        j = i - 1
        while j >= 0 and v[j] > t:
            v[j + 1] = v[j]
            j -= 1
        v[j + 1] = t


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
        sort_i64(pb + first, npair - first)
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
    cdef cnp.int64_t[::1] iv = inv
    # pa and pb through raw pointers (no buffer exported): shrunk in place below
    cdef cnp.int64_t* pap = <cnp.int64_t*>cnp.PyArray_DATA(pa)
    cdef cnp.int64_t* pbp = <cnp.int64_t*>cnp.PyArray_DATA(pb)
    if n == 0:
        return pa[:0].copy(), pb[:0].copy(), inv[:0].copy()
    with nogil:
        npair = pair_codes_core(&a[0], &b[0], n, ma, mb, &sv[0], &ov[0], &bsv[0], &mv[0],
                                &slv[0], pap, pbp, &iv[0])
    # the distinct pairs fill the start of their n-long arrays: shrinking them in place
    # (realloc) spares a copy and the pages of a second pair of arrays (on 10 M rows,
    # 2 × 56 MB)
    pa.resize((npair,), refcheck=False)
    pb.resize((npair,), refcheck=False)
    return pa, pb, inv


def pair_codes_reference(a, ma, b, mb):
    """numpy oracle of :func:`pair_codes`."""
    keys = np.asarray(a, dtype=np.int64) * mb + np.asarray(b, dtype=np.int64)
    u, inv = np.unique(keys, return_inverse=True)
    return u // mb, u % mb, inv.ravel().astype(np.int64)


cdef void dense_crossprod_core(const cnp.int64_t* codes1, const double* Z1, Py_ssize_t k1,
                               const cnp.int64_t* R, const double* V, Py_ssize_t w,
                               Py_ssize_t n, Py_ssize_t D, double* A11, double* P,
                               cnp.uint8_t* touched, double* A22) noexcept nogil:
    cdef Py_ssize_t i, j, a, b, t, u, rt
    cdef const double* z
    cdef const cnp.int64_t* rr
    cdef const double* vv
    cdef double s
    cdef double* pj
    for i in range(n):
        j = codes1[i]
        z = Z1 + i * k1
        rr = R + i * w
        vv = V + i * w
        for a in range(k1):
            for b in range(k1):
                A11[(j * k1 + a) * k1 + b] += z[a] * z[b]
        pj = P + j * D * k1
        for t in range(w):
            rt = rr[t]
            s = vv[t]
            touched[j * D + rt] = 1
            for a in range(k1):
                pj[rt * k1 + a] += s * z[a]
            for u in range(t + 1):
                A22[rt * D + rr[u]] += s * vv[u]


def dense_crossprod(const cnp.int64_t[::1] codes1, Py_ssize_t m1, const double[:, ::1] Z1,
                    const cnp.int64_t[:, ::1] R, const double[:, ::1] V, Py_ssize_t D):
    """The blocked cross-products of a small model in one pass over the rows.

    Row i of the data has level ``codes1[i]`` of term 1 with values ``Z1[i]`` (its k1
    columns), and its row of the dense block ``[Z_rest X y]`` is sparse: values ``V[i]``
    at positions ``R[i]`` (strictly ascending, in [0, D)).

    Returns
    -------
    A11 : (m1, k1, k1)
        Z1'Z1 per level of term 1.
    A22 : (D, D)
        [Z_rest X y]'[Z_rest X y], symmetric.
    indptr, rows : (m1 + 1,), (nnz,) int64
        The panel pattern: level j's rows of the dense block (those its data rows have
        an entry at, whatever the value), ascending, are ``rows[indptr[j]:indptr[j+1]]``.
    A21 : (nnz, k1)
        The panels of [Z_rest X y]'Z1 on that pattern.

    The coupling is accumulated densely (m1·D·k1 doubles): for models where that is a
    few MB.  The numpy oracle is :func:`dense_crossprod_reference`.
    """
    cdef Py_ssize_t n = codes1.shape[0], k1 = Z1.shape[1], w = R.shape[1], i, t, j, r, a, nnz
    if Z1.shape[0] != n or R.shape[0] != n or V.shape[0] != n or V.shape[1] != w:
        raise ValueError("codes1, Z1, R and V must have one row per observation")
    if m1 < 1 or D < 1 or k1 < 1:
        raise ValueError("m1, D and the columns of Z1 must be positive")
    cdef bint bad_code = False, bad_row = False
    with nogil:
        for i in range(n):
            if codes1[i] < 0 or codes1[i] >= m1:
                bad_code = True
                break
            for t in range(w):
                if R[i, t] < 0 or R[i, t] >= D or (t > 0 and R[i, t] <= R[i, t - 1]):
                    bad_row = True
                    break
            if bad_row:
                break
    if bad_code:
        raise ValueError("codes1 must lie in [0, m1)")
    if bad_row:
        raise ValueError("the positions R of each row must be strictly ascending, in [0, D)")
    A11 = np.zeros((m1, k1, k1))
    P = np.zeros((m1, D, k1))
    touched = np.zeros((m1, D), dtype=np.uint8)
    A22 = np.zeros((D, D))
    indptr = np.zeros(m1 + 1, dtype=np.int64)
    cdef double[:, :, ::1] a11 = A11, pv = P
    cdef cnp.uint8_t[:, ::1] tv = touched
    cdef double[:, ::1] a22 = A22
    cdef cnp.int64_t[::1] ip = indptr
    with nogil:
        if n:
            dense_crossprod_core(&codes1[0], &Z1[0, 0], k1, &R[0, 0] if w else NULL,
                                 &V[0, 0] if w else NULL, w, n, D, &a11[0, 0, 0],
                                 &pv[0, 0, 0], &tv[0, 0], &a22[0, 0])
        for r in range(D):
            for t in range(r):
                a22[t, r] = a22[r, t]
        for j in range(m1):
            nnz = 0
            for r in range(D):
                nnz += tv[j, r]
            ip[j + 1] = ip[j] + nnz
    rows = np.empty(indptr[m1], dtype=np.int64)
    A21 = np.empty((indptr[m1], k1))
    cdef cnp.int64_t[::1] rv = rows
    cdef double[:, ::1] a21 = A21
    with nogil:
        t = 0
        for j in range(m1):
            for r in range(D):
                if tv[j, r]:
                    rv[t] = r
                    for a in range(k1):
                        a21[t, a] = pv[j, r, a]
                    t += 1
    return A11, A22, indptr, rows, A21


def dense_crossprod_reference(codes1, m1, Z1, R, V, D):
    """numpy oracle of :func:`dense_crossprod`: dense Z1 (n × k1) and W (n × D)."""
    codes1 = np.asarray(codes1)
    n, k1 = Z1.shape
    W = np.zeros((n, D))
    hit = np.zeros((n, D), dtype=bool)
    for t in range(R.shape[1]):
        W[np.arange(n), R[:, t]] = V[:, t]
        hit[np.arange(n), R[:, t]] = True
    A11 = np.stack([Z1[codes1 == j].T @ Z1[codes1 == j] for j in range(m1)])
    pats = [np.flatnonzero(hit[codes1 == j].any(axis=0)) for j in range(m1)]
    panels = [(W[codes1 == j].T @ Z1[codes1 == j])[pat] for j, pat in enumerate(pats)]
    indptr = np.concatenate([[0], np.cumsum([len(pat) for pat in pats])]).astype(np.int64)
    return (A11, W.T @ W, indptr, np.concatenate(pats).astype(np.int64),
            np.concatenate(panels).reshape(-1, k1))


def _z_width(Z, Py_ssize_t n):
    """The number of columns of a term's model matrix Z, checked to have n rows; 1 for
    None (a lone intercept)."""
    if Z is None:
        return 1
    if np.shape(Z)[0] != n:
        raise ValueError("Z must have one row per code")
    return np.shape(Z)[1]


def _check_codes(const cnp.int64_t[::1] codes, Py_ssize_t m):
    """Raise ValueError unless every code lies in [0, m) (one pass, without the GIL)."""
    cdef Py_ssize_t i, n = codes.shape[0]
    cdef bint bad = False
    with nogil:
        for i in range(n):
            if codes[i] < 0 or codes[i] >= m:
                bad = True
                break
    if bad:
        raise ValueError("codes must lie in [0, m)")


cdef void level_xy_sums_core(const cnp.int64_t* codes, Py_ssize_t n, const double* Z,
                             Py_ssize_t k, const double* X, Py_ssize_t p, const double* y,
                             double* out) noexcept nogil:
    cdef Py_ssize_t i, c, b, w = (p + 1) * k
    cdef double* o
    cdef const double* x
    cdef const double* z
    cdef double yi
    for i in range(n):
        o = out + codes[i] * w
        x = X + i * p
        yi = y[i]
        if Z == NULL:
            for c in range(p):
                o[c] += x[c]
            o[p] += yi
        else:
            z = Z + i * k
            for c in range(p):
                for b in range(k):
                    o[c * k + b] += x[c] * z[b]
            for b in range(k):
                o[p * k + b] += yi * z[b]


def level_xy_sums(const cnp.int64_t[::1] codes, Py_ssize_t m, Z, const double[:, ::1] X,
                  const double[::1] y):
    """Per level j of a term, [X y]'Z over its rows: ``out[j, c, b] = Σ_{i: codes[i] = j}
    [X y][i, c] Z[i, b]`` as an (m, p + 1, k) array, in one pass over the rows (one
    ``np.bincount`` per column and Z column would be (p + 1) k passes).

    Parameters
    ----------
    codes : (n,) int64 array, levels in [0, m)
    Z : (n, k) C-contiguous float array, or None for one column of ones (an intercept)
    X : (n, p) C-contiguous float array
    y : (n,) float array
    """
    cdef Py_ssize_t n = codes.shape[0], p = X.shape[1], k = 1, i
    cdef const double[:, ::1] Zv
    if X.shape[0] != n or y.shape[0] != n:
        raise ValueError("codes, X and y must have the same number of rows")
    k = _z_width(Z, n)
    if Z is not None:
        Zv = Z
    _check_codes(codes, m)
    out = np.zeros((m, p + 1, k))
    cdef double[:, :, ::1] ov = out
    if n == 0 or m == 0:
        return out
    with nogil:
        level_xy_sums_core(&codes[0], n, &Zv[0, 0] if Z is not None else NULL, k,
                           &X[0, 0] if p > 0 else NULL, p, &y[0], &ov[0, 0, 0])
    return out


def level_xy_sums_reference(codes, m, Z, X, y):
    """numpy oracle of :func:`level_xy_sums` (one bincount per column pair)."""
    Xy = np.column_stack([X, y])
    Z = np.ones((len(codes), 1)) if Z is None else np.asarray(Z)
    out = np.zeros((m, Xy.shape[1], Z.shape[1]))
    for c in range(Xy.shape[1]):
        for b in range(Z.shape[1]):
            out[:, c, b] = np.bincount(codes, weights=Xy[:, c] * Z[:, b], minlength=m)
    return out


cdef void level_refit_core(const cnp.int64_t* codes, Py_ssize_t n, Py_ssize_t m,
                           const double* Z, Py_ssize_t k, double* r, const double* Ainv,
                           double* b, double* delta) noexcept nogil:
    cdef Py_ssize_t i, j, a, c
    cdef double s, ri
    for i in range(n):
        j = codes[i]
        ri = r[i]
        if Z == NULL:
            b[j] += ri
        else:
            for a in range(k):
                b[j * k + a] += Z[i * k + a] * ri
    for j in range(m):
        for a in range(k):
            s = 0.0
            for c in range(k):
                s += Ainv[(j * k + a) * k + c] * b[j * k + c]
            delta[j * k + a] = s
    for i in range(n):
        j = codes[i]
        if Z == NULL:
            r[i] -= delta[j]
        else:
            s = 0.0
            for a in range(k):
                s += Z[i * k + a] * delta[j * k + a]
            r[i] -= s


def level_refit(const cnp.int64_t[::1] codes, Py_ssize_t m, Z, double[::1] r,
                const double[:, :, ::1] Ainv):
    """One term's effects refitted to a residual, in two passes over the rows: per level
    j, δ_j = A_j⁻¹ Z_j'r, then r −= Z δ (in place).  Returns δ, (m, k).

    Parameters
    ----------
    codes : (n,) int64 array, levels in [0, m)
    Z : (n, k) C-contiguous float array, or None for one column of ones (an intercept)
    r : (n,) float array, updated in place
    Ainv : (m, k, k) array, A_j⁻¹ per level (zero for levels left out)
    """
    cdef Py_ssize_t n = codes.shape[0], k = 1, i
    cdef const double[:, ::1] Zv
    if r.shape[0] != n:
        raise ValueError("codes and r must have the same length")
    k = _z_width(Z, n)
    if Z is not None:
        Zv = Z
    if Ainv.shape[0] != m or Ainv.shape[1] != k or Ainv.shape[2] != k:
        raise ValueError("Ainv must be (m, k, k)")
    _check_codes(codes, m)
    b = np.zeros(max(m * k, 1))
    delta = np.zeros((m, k))
    cdef double[::1] bv = b
    cdef double[:, ::1] dv = delta
    if n == 0 or m == 0:
        return delta
    with nogil:
        level_refit_core(&codes[0], n, m, &Zv[0, 0] if Z is not None else NULL, k, &r[0],
                         &Ainv[0, 0, 0], &bv[0], &dv[0, 0])
    return delta


def level_refit_reference(codes, m, Z, r, Ainv):
    """numpy oracle of :func:`level_refit` (r updated in place)."""
    Z = np.ones((len(codes), 1)) if Z is None else np.asarray(Z)
    b = np.column_stack([np.bincount(codes, weights=Z[:, a] * r, minlength=m)
                         for a in range(Z.shape[1])])
    delta = np.einsum("jab,jb->ja", Ainv, b)
    r -= np.einsum("ia,ia->i", Z, delta[codes])
    return delta


def _check_panels(indptr, rows, P, Py_ssize_t D):
    """Validate a panel pattern and its panels (for :func:`panel_dot` and
    :func:`panel_scatter`); return the number of levels."""
    cdef Py_ssize_t m = indptr.shape[0] - 1, nnz = rows.shape[0]
    if m < 0 or P.shape[0] != nnz:
        raise ValueError("P must have one row per entry of rows, and indptr at least one entry")
    ip = np.asarray(indptr)
    if ip[0] != 0 or ip[m] != nnz or np.any(np.diff(ip) < 0):
        raise ValueError("indptr must rise from 0 to len(rows)")
    if nnz and (np.asarray(rows).min() < 0 or np.asarray(rows).max() >= D):
        raise ValueError(f"rows must lie in [0, {D})")
    return m


def panel_dot(const cnp.int64_t[::1] indptr, const cnp.int64_t[::1] rows,
              const double[:, ::1] P, const double[::1] w):
    """Each level's panel transposed times ``w`` on its rows: ``out[j] = P_j' w[rows_j]``.

    Parameters
    ----------
    indptr, rows : int64 arrays
        The panel pattern (level j's rows of the dense block are
        ``rows[indptr[j]:indptr[j + 1]]``).
    P : (nnz, k) array
        The panels (the cross-products A21 or the factor's L21), row t at ``rows[t]``.
    w : (D,) array
        A vector over the dense block's rows.

    Returns
    -------
    (m, k) array, m = ``len(indptr) - 1``; a level with an empty panel gets zeros.
    Oracle: :func:`panel_dot_reference`.
    """
    cdef Py_ssize_t m = _check_panels(indptr, rows, P, w.shape[0]), k = P.shape[1], j, t, c
    out = np.zeros((m, k))
    cdef double[:, ::1] o = out
    cdef double s
    with nogil:
        for j in range(m):
            for t in range(indptr[j], indptr[j + 1]):
                s = w[rows[t]]
                for c in range(k):
                    o[j, c] += s * P[t, c]
    return out


def panel_dot_reference(indptr, rows, P, w):
    """numpy oracle of :func:`panel_dot`."""
    m = len(indptr) - 1
    level = np.repeat(np.arange(m), np.diff(indptr))
    out = np.zeros((m, P.shape[1]))
    np.add.at(out, level, P * np.asarray(w)[rows][:, None])
    return out


def panel_scatter(const cnp.int64_t[::1] indptr, const cnp.int64_t[::1] rows,
                  const double[:, ::1] P, const double[:, ::1] B, Py_ssize_t D):
    """Each level's panel times its row of ``B``, summed into the dense block's rows:
    ``out[rows_j] += P_j B[j]`` (the transpose of :func:`panel_dot`), a (D,) array.

    Oracle: :func:`panel_scatter_reference`.
    """
    cdef Py_ssize_t m = _check_panels(indptr, rows, P, D), k = P.shape[1], j, t, c
    if B.shape[0] != m or B.shape[1] != k:
        raise ValueError("B must have one row per level and the panels' columns")
    out = np.zeros(max(D, 0))
    cdef double[::1] o = out
    cdef double s
    with nogil:
        for j in range(m):
            for t in range(indptr[j], indptr[j + 1]):
                s = 0.0
                for c in range(k):
                    s += P[t, c] * B[j, c]
                o[rows[t]] += s
    return out


def panel_scatter_reference(indptr, rows, P, B, D):
    """numpy oracle of :func:`panel_scatter`."""
    level = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    return np.bincount(rows, weights=(P * B[level]).sum(axis=1), minlength=D).astype(float)



def panel_dot_many(const cnp.int64_t[::1] indptr, const cnp.int64_t[::1] rows,
                   const double[:, ::1] P, const double[:, ::1] W):
    """:func:`panel_dot` for K vectors at once: ``out[j] = P_j' W[rows_j]``.

    ``W`` is (D, K), the vectors side by side; returns an (m, k, K) array.  One pass over
    the panels (K multiply-adds, contiguous, per panel entry).
    Oracle: :func:`panel_dot_many_reference`.
    """
    cdef Py_ssize_t m = _check_panels(indptr, rows, P, W.shape[0]), k = P.shape[1]
    cdef Py_ssize_t K = W.shape[1], j, t, c, u
    out = np.zeros((m, k, K))
    cdef double[:, :, ::1] o = out
    cdef double s
    cdef double* orow
    cdef const double* wrow
    if m == 0 or k == 0 or K == 0:
        return out
    with nogil:
        for j in range(m):
            for t in range(indptr[j], indptr[j + 1]):
                wrow = &W[rows[t], 0]
                for c in range(k):
                    s = P[t, c]
                    orow = &o[j, c, 0]
                    for u in range(K):
                        orow[u] += s * wrow[u]
    return out


def panel_dot_many_reference(indptr, rows, P, W):
    """numpy oracle of :func:`panel_dot_many`."""
    W = np.asarray(W)
    return np.stack([panel_dot_reference(indptr, rows, P, W[:, u]) for u in range(W.shape[1])],
                    axis=2) if W.shape[1] else np.zeros((len(indptr) - 1, P.shape[1], 0))


def panel_scatter_many(const cnp.int64_t[::1] indptr, const cnp.int64_t[::1] rows,
                       const double[:, ::1] P, const double[:, :, ::1] B, Py_ssize_t D):
    """:func:`panel_scatter` for K vectors at once: ``out[rows_j] += P_j B[j]``.

    ``B`` is (m, k, K); returns a (D, K) array.  Oracle: :func:`panel_scatter_many_reference`.
    """
    cdef Py_ssize_t m = _check_panels(indptr, rows, P, D), k = P.shape[1]
    if B.shape[0] != m or B.shape[1] != k:
        raise ValueError("B must have one row per level and the panels' columns")
    cdef Py_ssize_t K = B.shape[2], j, t, c, u
    out = np.zeros((max(D, 0), K))
    cdef double[:, ::1] o = out
    cdef double s
    cdef double* orow
    cdef const double* brow
    if m == 0 or k == 0 or K == 0 or D <= 0:
        return out
    with nogil:
        for j in range(m):
            for t in range(indptr[j], indptr[j + 1]):
                orow = &o[rows[t], 0]
                for c in range(k):
                    s = P[t, c]
                    brow = &B[j, c, 0]
                    for u in range(K):
                        orow[u] += s * brow[u]
    return out


def panel_scatter_many_reference(indptr, rows, P, B, D):
    """numpy oracle of :func:`panel_scatter_many`."""
    B = np.asarray(B)
    return np.stack([panel_scatter_reference(indptr, rows, P, B[:, :, u], D)
                     for u in range(B.shape[2])], axis=1) if B.shape[2] else np.zeros((D, 0))

def panel_batches(const cnp.int64_t[::1] indptr, const cnp.int64_t[::1] rows):
    """Boundaries of runs of consecutive levels whose panels cover the same contiguous
    rows (``blocks.BlockedCrossprod``: they downdate in one rank-k update).

    Level j's panel is ``rows[indptr[j]:indptr[j+1]]`` (ascending).  Returns the run
    starts followed by the number of levels.  Oracle: ``blocks.panel_batches_reference``.
    """
    cdef Py_ssize_t m = indptr.shape[0] - 1, j, nb = 0
    if m < 0:
        raise ValueError("indptr must have at least one entry")
    cdef Py_ssize_t nrows = rows.shape[0]
    with nogil:
        for j in range(m):
            if indptr[j] < 0 or indptr[j + 1] < indptr[j] or indptr[j + 1] > nrows:
                nb = -1
                break
    if nb < 0 or (m and indptr[m] != nrows):
        raise ValueError("indptr must be non-decreasing from 0 to len(rows)")
    out = np.empty(m + 1, dtype=np.int64)
    cdef cnp.int64_t[::1] ov = out
    cdef bint contig_prev = False, contig, same
    cdef Py_ssize_t nr, nr_prev = -1, first, first_prev = -1
    with nogil:
        for j in range(m):
            nr = indptr[j + 1] - indptr[j]
            if nr:
                first = rows[indptr[j]]
                contig = rows[indptr[j + 1] - 1] - first == nr - 1
            else:
                first = 0
                contig = True
            same = j > 0 and first == first_prev and nr == nr_prev and contig and contig_prev
            if not same:
                ov[nb] = j
                nb += 1
            first_prev, nr_prev, contig_prev = first, nr, contig
        ov[nb] = m
    return out[:nb + 1].copy()

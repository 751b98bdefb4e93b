# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Compiled kernels of the gradient of the profiled deviance in θ (see ``gradient.py``).

The derivative of log|M| in θ needs the entries of M⁻¹ on the pattern of W'Z (a selected
inverse): ``dense_inverse`` gives the dense block's part (LAPACK ``dpotri``),
``grad_block1`` the first term's part, level by level from the blocked factor (L11, L21)
of ``_pls``, together with the coupling part of the later terms' derivatives;
``rowwise_products`` its per-level products with M⁻¹ for large dense blocks, row by row;
``rest_trace`` the later terms' trace over the dense block.
"""
import numpy as np
cimport numpy as cnp
from scipy.linalg.cython_lapack cimport dpotri
from scipy.linalg.cython_blas cimport dgemm, dtrmm
from cython.parallel cimport prange
from lmmfast._blockchol import transposed_pattern_ok
from lmmfast._dense cimport (BLAS_MIN, GATHER_MAX, cols_mul, dot4, lam_rows,
                             lower_inverse, max_panel, PREFETCH_AHEAD, prefetch_panel,
                             rows_tmul, symmetrize_tiles)

cnp.import_array()


cdef int grad_block1_core(
        const double* A11, Py_ssize_t m1, Py_ssize_t k1, const double* T1,
        const cnp.int64_t* indptr, const cnp.int64_t* rows, const double* A21,
        const double* L11, const double* L21, const double* Minv, Py_ssize_t Dp, Py_ssize_t nz,
        const double* rscale, const cnp.int64_t* rk, const cnp.int64_t* rtoff,
        const double* Tflat, double* G1, double* out2, Py_ssize_t kmax,
        double* work, double* gbuf, const cnp.int64_t* batch, Py_ssize_t nbatch,
        double* cat, Py_ssize_t catmax, const double* Pre, const char* pre) noexcept nogil:
    """Levels of a batch (:func:`lmmfast._remat.panel_batches`: panels on one contiguous
    run of rows) get P = Minv22[rows, rows] V from one dgemm over the whole batch, the
    panels side by side in ``cat`` (2 nr K doubles, K = k1 × levels, when that fits in
    ``catmax``): Minv is packed once instead of once per level.  Levels flagged in ``pre``
    (not NULL) take P's random-effects rows from ``Pre`` (:func:`rowwise_products`, same
    layout as L21) and only the X rows' (REML) from Minv here."""
    cdef Py_ssize_t j, t, u, a, b, c, p0, nr, r, kk, bi, j0, j1, K, q0, bnr = 0
    cdef bint in_cat
    cdef double* Vc = cat
    cdef double* Pc = cat
    cdef double s
    cdef int n_i, k_i, ld_i
    cdef char nn = b'N', tt = b'T', sl = b'L', su = b'U'
    cdef double one = 1.0, zero = 0.0, mone = -1.0
    cdef bint blas
    cdef double* P = work                       # nr × k1 : Minv22[rows,rows] V, then Minv21_j
    cdef double* AR = work + Dp * k1            # nr × k1 : Λr' A21_j (scaled rows)
    cdef double* AT = work + 2 * Dp * k1        # nr × k1 : A21_j T1
    cdef double* Li = work + 3 * Dp * k1        # k1 × k1 : L11_j^{-1}
    cdef double* H = Li + k1 * k1               # k1 × k1
    cdef double* M11 = H + k1 * k1              # k1 × k1
    cdef double* TA = M11 + k1 * k1             # k1 × k1 : T1' A11_j
    cdef const double* L
    cdef const double* V
    cdef const double* A
    j0 = 0
    j1 = 0
    bi = 0
    in_cat = False
    for j in range(m1):
        p0 = indptr[j]
        nr = 0
        while p0 + nr < indptr[j + 1] and rows[p0 + nr] < Dp:
            nr += 1
        if j == j1:                     # the next batch starts: one dgemm for all of it?
            j0 = batch[bi]
            j1 = batch[bi + 1]
            bi += 1
            K = k1 * (j1 - j0)
            in_cat = (cat != NULL and j1 - j0 > 1 and nr * k1 >= BLAS_MIN and nr > 0
                      and rows[p0 + nr - 1] - rows[p0] == nr - 1 and 2 * nr * K <= catmax)
            if in_cat:
                bnr = nr
                Vc = cat
                Pc = cat + nr * K
                for t in range(nr):     # V side by side: row-major nr × K
                    for q0 in range(j1 - j0):
                        for c in range(k1):
                            Vc[t * K + q0 * k1 + c] = L21[(indptr[j0 + q0] + t) * k1 + c]
                # row-major Pc = S Vc (S symmetric) is column-major Pc' = Vc' S
                n_i = <int>nr
                k_i = <int>K
                ld_i = <int>Dp
                dgemm(&nn, &nn, &k_i, &n_i, &n_i, &one, Vc, &k_i,
                      <double*>Minv + rows[p0] * Dp + rows[p0], &ld_i, &zero, Pc, &k_i)
        L = L11 + j * k1 * k1
        V = L21 + p0 * k1
        A = A21 + p0 * k1
        lower_inverse(L, k1, Li)
        blas = nr * k1 >= BLAS_MIN     # wide panels: the nr-long products by BLAS
        # P = Minv22[rows, rows] V
        if pre != NULL and pre[j]:
            for t in range(nr):
                r = rows[p0 + t]
                if r < nz:
                    for c in range(k1):
                        P[t * k1 + c] = Pre[(p0 + t) * k1 + c]
                else:
                    for c in range(k1):
                        s = 0.0
                        for u in range(nr):
                            s += Minv[r * Dp + rows[p0 + u]] * V[u * k1 + c]
                        P[t * k1 + c] = s
        elif in_cat and nr == bnr:
            q0 = (j - j0) * k1
            for t in range(nr):
                for c in range(k1):
                    P[t * k1 + c] = Pc[t * K + q0 + c]
        elif blas and rows[p0 + nr - 1] - rows[p0] == nr - 1:
            n_i = <int>nr
            k_i = <int>k1
            ld_i = <int>Dp
            dgemm(&nn, &nn, &k_i, &n_i, &n_i, &one, <double*>V, &k_i,
                  <double*>Minv + rows[p0] * Dp + rows[p0], &ld_i, &zero, P, &k_i)
        elif gbuf != NULL and blas and nr <= GATHER_MAX:
            for t in range(nr):
                r = rows[p0 + t] * Dp
                for u in range(nr):
                    gbuf[t * nr + u] = Minv[r + rows[p0 + u]]
            # column-major: P' (k1×nr) = V' (k1×nr) S (nr×nr, symmetric)
            n_i = <int>nr
            k_i = <int>k1
            dgemm(&nn, &nn, &k_i, &n_i, &n_i, &one, <double*>V, &k_i, gbuf, &n_i, &zero, P, &k_i)
        else:
            for t in range(nr):
                for c in range(k1):
                    s = 0.0
                    for u in range(nr):
                        s += Minv[rows[p0 + t] * Dp + rows[p0 + u]] * V[u * k1 + c]
                    P[t * k1 + c] = s
        # H = I + V'P  (symmetric; row-major H is column-major (V'P)' = P'V)
        if blas:
            n_i = <int>nr
            k_i = <int>k1
            dgemm(&nn, &tt, &k_i, &k_i, &n_i, &one, P, &k_i, <double*>V, &k_i, &zero, H, &k_i)
            for a in range(k1):
                H[a * k1 + a] += 1.0
        else:
            for a in range(k1):
                for b in range(k1):
                    s = 1.0 if a == b else 0.0
                    for t in range(nr):
                        s += V[t * k1 + a] * P[t * k1 + b]
                    H[a * k1 + b] = s
        # M11 = Li' H Li
        for a in range(k1):
            for b in range(k1):
                s = 0.0
                for c in range(k1):
                    for u in range(k1):
                        s += Li[c * k1 + a] * H[c * k1 + u] * Li[u * k1 + b]
                M11[a * k1 + b] = s
        # TA = T1' A11_j
        for a in range(k1 * k1):
            TA[a] = A11[j * k1 * k1 + a]
        rows_tmul(TA, k1, k1, T1, k1)
        # AR = Λr' A21_j ; AT = A21_j T1
        for t in range(nr * k1):
            AR[t] = A[t]
            AT[t] = A[t]
        lam_rows(AR, nr, k1, rows + p0, rscale, rk, rtoff, Tflat)
        if blas:
            # Minv21_j = -P Li and AT = A T1 in place: row-major X L for lower L is
            # column-major L' X', L' upper (dtrmm)
            dtrmm(&sl, &su, &nn, &nn, &k_i, &n_i, &mone, Li, &k_i, P, &k_i)
            dtrmm(&sl, &su, &nn, &nn, &k_i, &n_i, &one, <double*>T1, &k_i, AT, &k_i)
            # G1[b, a] += (Minv21' AR)[b, a]: column-major G1' += AR' Minv21
            dgemm(&nn, &tt, &k_i, &k_i, &n_i, &one, AR, &k_i, P, &k_i, &one, G1, &k_i)
        else:
            # Minv21_j = -P Li  (overwrite P row by row)
            for t in range(nr):
                for c in range(k1):
                    s = 0.0
                    for u in range(c, k1):
                        s += P[t * k1 + u] * Li[u * k1 + c]
                    H[c] = -s
                for c in range(k1):
                    P[t * k1 + c] = H[c]
            cols_mul(AT, k1, nr, T1, k1)
        # G1[b, a] += (M11 TA)[b, a] (+ (Minv21' AR)[b, a] where BLAS did not add it)
        for b in range(k1):
            for a in range(k1):
                s = 0.0
                for c in range(k1):
                    s += M11[b * k1 + c] * TA[c * k1 + a]
                if not blas:
                    for t in range(nr):
                        s += P[t * k1 + b] * AR[t * k1 + a]
                G1[b * k1 + a] += s
        # coupling part of the rest terms' gradient
        for t in range(nr):
            r = rows[p0 + t]
            if r >= nz:
                break
            kk = rk[r]
            if kk < 1:
                continue
            for a in range(kk):
                for b in range(kk):
                    out2[(r + a) * kmax + b] += dot4(P + (t + b) * k1, AT + (t + a) * k1, k1)
    return 0


def grad_block1(const double[:, :, ::1] A11, const double[:, ::1] T1,
                const cnp.int64_t[::1] indptr, const cnp.int64_t[::1] rows,
                const double[:, ::1] A21, const double[:, :, ::1] L11, const double[:, ::1] L21,
                const double[:, ::1] Minv, Py_ssize_t nz,
                const double[::1] rscale, const cnp.int64_t[::1] rk,
                const cnp.int64_t[::1] rtoff, const double[::1] Tflat,
                double[:, ::1] G1_out, double[:, ::1] out2, batch=None, Pre=None, pre=None):
    """Term-1 and coupling parts of the gradient of log|M| (see ``gradient.py``).

    ``Minv`` is the dense block of M⁻¹ over the first Dp rows of the dense block (Dp = nz for
    ML, nz + p for REML).  Accumulates ``G1_out[b, a] += Σ_j Σ_r M⁻¹[(j,b), r] (W'Z)[r, (j,a)]``
    and, for every k-row group starting at row r of the rest terms,
    ``out2[r + a, b] += Σ_j Σ_c M⁻¹[(r+b), (j,c)] (W'Z)[(j,c), r+a]``.
    ``batch``: the panel batches (``BlockedCrossprod.batch``; default one level each).
    ``Pre`` (shaped like L21) with ``pre`` (bool per level): Minv22[rows, rows] V of the
    flagged levels' random-effects rows, already formed (:func:`rowwise_products`).
    """
    cdef Py_ssize_t m1 = A11.shape[0], k1 = A11.shape[1], Dp = Minv.shape[0]
    cdef Py_ssize_t kmax = out2.shape[1]
    if Minv.shape[1] != Dp or Dp < nz or Dp > rk.shape[0]:
        raise ValueError("Minv must be square with nz <= Dp <= D")
    if G1_out.shape[0] != k1 or G1_out.shape[1] != k1 or out2.shape[0] < nz:
        raise ValueError("output shapes do not match")
    if L11.shape[0] != m1 or L21.shape[0] != A21.shape[0] or indptr.shape[0] != m1 + 1:
        raise ValueError("factor shapes do not match the cross-products")
    work = np.zeros(3 * max(Dp, 1) * k1 + 4 * k1 * k1 + k1)
    cdef double[::1] w = work
    cdef Py_ssize_t nrmax = max_panel(indptr)
    cdef bint use_blas = nrmax * k1 >= BLAS_MIN
    gb = np.empty(min(nrmax, GATHER_MAX) ** 2 if use_blas else 1)
    cdef double[::1] gbv = gb
    cdef const double* a21p = &A21[0, 0] if A21.shape[0] > 0 else NULL
    cdef const double* l21p = &L21[0, 0] if L21.shape[0] > 0 else NULL
    cdef const cnp.int64_t* rowsp = &rows[0] if rows.shape[0] > 0 else NULL
    cdef const double* minvp = &Minv[0, 0] if Dp > 0 else NULL
    cdef double* o2 = &out2[0, 0] if out2.shape[0] > 0 and kmax > 0 else NULL
    bt = (np.arange(m1 + 1, dtype=np.int64) if batch is None
          else np.ascontiguousarray(batch, dtype=np.int64))
    if bt.shape[0] < 1 or bt[0] != 0 or bt[bt.shape[0] - 1] != m1 or np.any(np.diff(bt) < 1):
        raise ValueError("batch must run from 0 to the number of levels in increasing steps")
    cdef const cnp.int64_t[::1] btv = bt
    cdef Py_ssize_t nb = bt.shape[0] - 1
    # the batched panels side by side (V and P), at most 32 MiB
    cdef Py_ssize_t catmax = 0
    if use_blas and bt.shape[0] > 1:
        widest = int(np.max(np.diff(bt))) * k1
        catmax = min(2 * nrmax * widest, 2 ** 22) if widest > k1 else 0
    cat = np.empty(max(catmax, 1))
    cdef double[::1] catv = cat
    cdef const double[:, ::1] prev
    cdef const cnp.uint8_t[::1] flagv
    cdef const double* prep = NULL
    cdef const char* flagp = NULL
    if (Pre is None) != (pre is None):
        raise ValueError("Pre and pre go together")
    if Pre is not None:
        prev = Pre
        flag_arr = np.ascontiguousarray(pre, dtype=np.bool_).view(np.uint8)
        if prev.shape[0] != L21.shape[0] or prev.shape[1] != k1 or flag_arr.shape[0] != m1:
            raise ValueError("Pre must be shaped like L21 and pre have one flag per level")
        flagv = flag_arr
        if prev.shape[0] > 0:
            prep = &prev[0, 0]
        if m1 > 0:
            flagp = <const char*>&flagv[0]
    with nogil:
        grad_block1_core(&A11[0, 0, 0], m1, k1, &T1[0, 0], &indptr[0], rowsp, a21p,
                         &L11[0, 0, 0], l21p, minvp, Dp, nz, &rscale[0], &rk[0], &rtoff[0],
                         &Tflat[0], &G1_out[0, 0], o2, kmax, &w[0],
                         &gbv[0] if use_blas else NULL, &btv[0], nb,
                         &catv[0] if catmax > 0 else NULL, catmax, prep, flagp)
    return None


cdef void rowwise_core(const double* Minv, Py_ssize_t Dp, Py_ssize_t nrow, Py_ssize_t k1,
                       const cnp.int64_t* indptr, const cnp.int32_t* rows, const double* V,
                       const cnp.int64_t* tptr, const cnp.int64_t* tidx,
                       const cnp.int64_t* tlev, double* P, int nthreads) noexcept nogil:
    cdef Py_ssize_t r, t, kk, c, p1, ta, ntrans = tptr[nrow]
    cdef const double* mrow
    cdef double s0, s1
    for r in prange(nrow, schedule="dynamic", chunksize=8, num_threads=nthreads):
        mrow = Minv + r * Dp
        for t in range(tptr[r], tptr[r + 1]):
            ta = t + PREFETCH_AHEAD
            if ta < ntrans:                 # all of that panel
                prefetch_panel(V, rows, indptr[tlev[ta]], indptr[tlev[ta] + 1], k1)
            p1 = indptr[tlev[t] + 1]
            if k1 == 1:
                s0 = 0.0
                s1 = 0.0
                kk = indptr[tlev[t]]
                while kk + 1 < p1 and rows[kk + 1] < Dp:
                    s0 = s0 + mrow[rows[kk]] * V[kk]
                    s1 = s1 + mrow[rows[kk + 1]] * V[kk + 1]
                    kk = kk + 2
                if kk < p1 and rows[kk] < Dp:
                    s0 = s0 + mrow[rows[kk]] * V[kk]
                P[tidx[t]] = s0 + s1
            else:
                for c in range(k1):
                    P[tidx[t] * k1 + c] = 0.0
                for kk in range(indptr[tlev[t]], p1):
                    if rows[kk] >= Dp:
                        break
                    s0 = mrow[rows[kk]]
                    for c in range(k1):
                        P[tidx[t] * k1 + c] += s0 * V[kk * k1 + c]


def rowwise_products(const double[:, ::1] Minv, const cnp.int64_t[::1] indptr,
                     const cnp.int32_t[::1] rows, const double[:, ::1] V,
                     const cnp.int64_t[::1] tptr, const cnp.int64_t[::1] tidx,
                     const cnp.int64_t[::1] tlev, double[:, ::1] P, int nthreads=1):
    """Per level j, P_j = Minv[rows_j, rows_j] V_j on the random-effects rows, row by row.

    ``tptr``/``tidx``/``tlev`` are the transposed panel pattern
    (``BlockedCrossprod.tptr``...): for row r of the dense block, the levels touching it
    and where r sits in their panel.  Each row's sums read one row of Minv (cache-resident
    while all of that row's levels are summed) against the panels, where per level the
    gather Minv[rows_j, rows_j] misses the cache on nearly every entry of a large Minv.
    ``P[tidx[t]] = Σ_u Minv[r, rows[u]] V[u]`` over panel tlev[t]'s rows below Dp (Minv is
    Dp × Dp, symmetric); entries of P not in the pattern are left as they are.  Rows are
    shared among ``nthreads`` OpenMP threads (each writes its own entries of P).
    """
    cdef Py_ssize_t Dp = Minv.shape[0], k1 = V.shape[1], m1 = indptr.shape[0] - 1
    cdef Py_ssize_t ntrans = tidx.shape[0], nrow
    if Minv.shape[1] != Dp:
        raise ValueError("Minv must be square")
    if P.shape[0] != V.shape[0] or P.shape[1] != k1 or rows.shape[0] != V.shape[0]:
        raise ValueError("P, V and rows must have one row per panel entry")
    if m1 < 0 or indptr[0] != 0 or indptr[m1] != V.shape[0]:
        raise ValueError("indptr does not match the panels")
    ip = np.asarray(indptr)
    if np.any(np.diff(ip) < 0) or (rows.shape[0] and np.asarray(rows).min() < 0):
        raise ValueError("panels must have non-negative row indices and sizes")
    if not transposed_pattern_ok(tptr, tidx, tlev, ip):
        raise ValueError("transposed pattern does not match the panels")
    nrow = min(Dp, tptr.shape[0] - 1)
    if nthreads < 1:
        nthreads = 1
    if ntrans == 0 or nrow == 0:
        return None
    with nogil:
        rowwise_core(&Minv[0, 0], Dp, nrow, k1, &indptr[0], &rows[0], &V[0, 0], &tptr[0],
                     &tidx[0], &tlev[0], &P[0, 0], nthreads)
    return None


def rowwise_products_reference(Minv, indptr, rows, V, tptr, tidx, tlev, P):
    """numpy oracle of :func:`rowwise_products` (P updated in place)."""
    Dp = Minv.shape[0]
    for r in range(min(Dp, len(tptr) - 1)):
        for t in range(tptr[r], tptr[r + 1]):
            j = tlev[t]
            rr = np.asarray(rows[indptr[j]: indptr[j + 1]])
            keep = rr < Dp
            P[tidx[t]] = Minv[r, rr[keep]] @ V[indptr[j]: indptr[j + 1]][keep]


def dense_inverse(const double[:, ::1] L22, Py_ssize_t Dp, double[:, ::1] out):
    """``out`` <- (L L')⁻¹ for L = the leading Dp×Dp lower triangle of L22, full symmetric.

    LAPACK ``dpotri`` on the row-major lower triangle (column-major upper), then the other
    triangle filled in place: one call, no temporaries.  Returns LAPACK's info.
    """
    if L22.shape[0] < Dp or L22.shape[1] < Dp or out.shape[0] != Dp or out.shape[1] != Dp:
        raise ValueError("shapes do not match")
    cdef Py_ssize_t r, c, ld = L22.shape[1]
    cdef int n_i = <int>Dp, info = 0
    cdef char uplo = b'U'
    if Dp == 0:
        return 0
    with nogil:
        for r in range(Dp):
            for c in range(r + 1):
                out[r, c] = L22[r, c]
        dpotri(&uplo, &n_i, &out[0, 0], &n_i, &info)
        if info == 0:
            symmetrize_tiles(&out[0, 0], Dp, Dp)
    return info


cdef void rest_trace_core(const double* Minv, Py_ssize_t Dp, const double* A22, Py_ssize_t D,
                          Py_ssize_t nz, const double* rscale, const cnp.int64_t* rk,
                          const cnp.int64_t* rtoff, const double* Tflat,
                          const cnp.int64_t* cterm, const cnp.int64_t* cpos,
                          const cnp.int64_t* kterm, Py_ssize_t kmax, bint blockdiag,
                          double* G, double* buf) noexcept nogil:
    cdef Py_ssize_t r0 = 0, kk, a, b, c, i, k, cs, c0, c1
    cdef double s, v
    cdef const double* mrow
    cdef double* g
    while r0 < Dp:
        kk = rk[r0]
        if kk < 1:
            kk = 1
        # the columns this unit's rows can touch: with one later term, A22's random-effects
        # block is block diagonal (the unit's own level); else all of them
        c0 = 0
        c1 = nz
        if blockdiag and r0 < nz:
            c0 = r0
            c1 = r0 + kk
        # buf <- the unit's rows of Λ' A22[:, c0:c1]
        if kk == 1:
            s = rscale[r0]
            for c in range(c0, c1):
                buf[c] = s * A22[r0 * D + c]
        else:
            for a in range(kk):
                for c in range(c0, c1):
                    buf[a * nz + c] = A22[(r0 + a) * D + c]
            rows_tmul(buf + c0, nz, c1 - c0, Tflat + rtoff[r0], kk)
        for a in range(kk):
            mrow = Minv + (r0 + a) * Dp
            for c in range(c0, c1):
                v = buf[a * nz + c]
                if v == 0.0:
                    continue
                i = cterm[c]
                k = kterm[i]
                cs = c - cpos[c]
                g = G + (i * kmax * kmax) + cpos[c]
                for b in range(k):
                    g[b * kmax] += mrow[cs + b] * v
        r0 += kk


def rest_trace(const double[:, ::1] Minv, const double[:, ::1] A22, Py_ssize_t nz,
               const double[::1] rscale, const cnp.int64_t[::1] rk,
               const cnp.int64_t[::1] rtoff, const double[::1] Tflat, term_shapes,
               rest_offsets):
    """The later terms' trace over the dense block, ``G_i[b, a] = Σ_{r < Dp} Σ_l
    Minv[r, (l,b)] (Λ_rest' A22)[r, (l,a)]`` for each later term i (levels l, k_i columns
    each, starting at ``rest_offsets[i]``), Minv the Dp × Dp dense block of M⁻¹.

    One pass over the rows (a scalar row scaled, a k-row group times T', as
    ``BlockedCrossprod.rk``/``rtoff`` describe them) without forming Λ_rest' A22; with a
    single later term its random-effects rows touch only their own level's columns
    (Z_i'Z_i is block diagonal), and only those are read.

    Returns
    -------
    list of (k_i, k_i) arrays
    """
    cdef Py_ssize_t Dp = Minv.shape[0], D = A22.shape[0], nt = len(term_shapes), kmax, i
    if Minv.shape[1] != Dp or A22.shape[1] != D or Dp > D or nz > Dp:
        raise ValueError("Minv must be square, Dp × Dp with nz <= Dp <= D")
    if rscale.shape[0] < D or rk.shape[0] < D or rtoff.shape[0] < D or len(rest_offsets) != nt:
        raise ValueError("row descriptors do not match the dense block")
    kt = np.array([k for _, k in term_shapes] or [1], dtype=np.int64)
    kmax = int(kt.max())
    cterm_a = np.zeros(max(nz, 1), dtype=np.int64)
    cpos_a = np.zeros(max(nz, 1), dtype=np.int64)
    end = 0
    for i in range(nt):
        m, k = term_shapes[i]
        o = rest_offsets[i]
        if o != end or k < 1 or m < 0:
            raise ValueError("rest_offsets must tile the random-effects rows")
        cterm_a[o: o + m * k] = i
        cpos_a[o: o + m * k] = np.tile(np.arange(k), m)
        end = o + m * k
    if end != nz:
        raise ValueError("rest_offsets must tile the random-effects rows")
    rka = np.asarray(rk)[:Dp]
    if np.any(rka < 0) or np.any(np.arange(Dp) + rka > Dp) or (
            np.any(rka > 1) and np.asarray(rtoff)[:Dp][rka > 1].max() + kmax * kmax > Tflat.shape[0]):
        raise ValueError("row groups do not fit the dense block or Tflat")
    G = np.zeros((max(nt, 1), kmax, kmax))
    buf = np.empty(kmax * max(nz, 1))
    cdef double[:, :, ::1] Gv = G
    cdef double[::1] bufv = buf
    cdef const cnp.int64_t[::1] ctv = cterm_a, cpv = cpos_a, ktv = kt
    if nz > 0 and Dp > 0:
        with nogil:
            rest_trace_core(&Minv[0, 0], Dp, &A22[0, 0], D, nz, &rscale[0], &rk[0], &rtoff[0],
                            &Tflat[0], &ctv[0], &cpv[0], &ktv[0], kmax, nt == 1,
                            &Gv[0, 0, 0], &bufv[0])
    return [G[i, :k, :k].copy() for i, (_, k) in enumerate(term_shapes)]

# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Compiled kernels of the blocked penalized least-squares (PLS) factorization.

The PLS system of Bates et al. (2015, JSS 67(1), eqs. 18-20) for a given θ is factored
as one lower Cholesky factor of the augmented cross-product matrix

    Ω(θ) = [Λ'Z'ZΛ + I   Λ'Z'X   Λ'Z'y]
           [X'ZΛ         X'X     X'y  ]   = L L'
           [y'ZΛ         y'X     y'y  ]

whose trailing rows hold R_ZX, R_X and the square root of the penalized residual sum of
squares r²(θ) (eq. 19 and the profiled deviance, eq. 34).  The random-effects term with
most levels comes first; its Λ'Z'ZΛ + I block is block diagonal (one k×k block per level),
so its factor is block diagonal too.  Everything after it (the remaining terms, X and y)
is one dense block:

    L = [L11  0  ]      L11 : block diagonal, m1 blocks of k1×k1
        [L21  L22]      L21 : block-sparse, a dense (rows_j × k1) panel per level j
                        L22 : dense D×D, D = q_rest + p + 1

``update_blocked`` computes L from the stored cross-products in one call with the GIL
released (``update_blocked_core``, declared in ``_blockchol.pxd``, is what
``_pls.BlockedFactor`` calls per θ).  ``pls.dense_factor`` is its dense numpy oracle.
"""
import numpy as np
cimport numpy as cnp
from libc.math cimport sqrt
from cython.parallel cimport prange, threadid
from scipy.linalg.cython_lapack cimport dpotrf
from scipy.linalg.cython_blas cimport dgemm, dsyrk
from lmmfast._chol cimport potrf_tiled, syrk_tiled
from lmmfast._obsform cimport ObsForm, obs_update
from lmmfast._dense cimport (BLAS_MIN, GATHER_MAX, chol_lower, dot4, downdate,
                             lam_dense, lam_rows, level_factor, max_panel,
                             PREFETCH_AHEAD, prefetch_panel, rows_times, symmetrize_tiles)

cnp.import_array()

cdef extern from *:
    """
    #include <stdint.h>
    /* The X/y rows' share of a scalar level's downdate (xy_accumulate, k1 = 1), in copies
       for AVX-512, AVX2 and the baseline picked when the module loads (GCC's and Clang's
       target_clones, where the platform resolves them: x86-64 glibc).  Each element is
       the same multiply and add in every copy (no fused multiply-add: ISO C mode), so
       the copies give the same bits. */
    #if defined(__x86_64__) && defined(__GLIBC__) && (defined(__GNUC__) || defined(__clang__))
    #define LMMFAST_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
    #else
    #define LMMFAST_CLONES
    #endif
    LMMFAST_CLONES
    static void lmmfast_xy_scalar(const double* v, Py_ssize_t nzr, const int64_t* rows,
                                  Py_ssize_t nxy, double* W, double* XX) {
        const double* vx = v + nzr;
        for (Py_ssize_t t = 0; t < nzr; t++) {
            const double s = v[t];
            double* w = W + rows[t] * nxy;
            for (Py_ssize_t a = 0; a < nxy; a++)
                w[a] += s * vx[a];
        }
        for (Py_ssize_t a = 0; a < nxy; a++) {
            const double xa = vx[a];
            double* xx = XX + a * nxy;
            for (Py_ssize_t b = 0; b <= a; b++)
                xx[b] += xa * vx[b];
        }
    }
    """
    void lmmfast_xy_scalar(const double* v, Py_ssize_t nzr, const cnp.int64_t* rows,
                           Py_ssize_t nxy, double* W, double* XX) noexcept nogil

# Size rules (BLAS_MIN and GATHER_MAX, shared with the gradient, are in _dense.pxd;
# SMALL_CHOL, shared with _pls, in _blockchol.pxd).  Batched rank-K updates of up to this
# many multiply-adds run as plain loops: BLAS calls cost more.
DEF SMALL_SYRK = 4096
# A panel with at least this many multiply-adds (rows × k1²) is multiplied by BLAS.
DEF PANEL_GEMM_MIN = 2048



cdef void transposed_downdate(
        double* L22, Py_ssize_t D, Py_ssize_t nrow, Py_ssize_t k1,
        const cnp.int32_t* rows, const double* L21, const cnp.int64_t* tptr,
        const cnp.int64_t* tidx, const cnp.int64_t* tstart, Py_ssize_t ntrans,
        double* acc_all, int nthreads, const double* A22, const double* rscale,
        const cnp.int64_t* lptr=NULL, const cnp.int32_t* lcol=NULL) noexcept nogil:
    """The single-level downdates row by row of L22's first ``nrow`` rows (the transposed
    pattern, which holds only the levels downdated this way: neither batched nor heavy
    ones; the X/y rows are :func:`xy_accumulate`'s).

    Entry t of row r's list says: the panel starting at ``tstart[t]`` has row r at
    ``tidx[t]``; the panel's rows up to there are r's partners.  Each row's sum builds in a
    cache-resident accumulator (one per thread) and L22 is written in order, where
    per-level scatters into a large L22 miss the cache on nearly every update.  The
    panels of one row's levels lie anywhere in L21, so each entry starts with a cache miss:
    the panels a few entries ahead are prefetched, and the row indices are 32-bit (a
    quarter less to stream per update than int64).  Rows are independent: with OpenMP
    they are shared among ``nthreads`` threads (dynamic schedule: rows of frequent levels
    carry most of the work).

    With ``A22`` (not NULL) the rows are also initialised here, in the same pass:
    L22[r, u] = A22[r, u] rscale[r] rscale[u] + [u == r] − acc[u], the same sums in the same
    order as the separate scaled copy it replaces (one read and write of the triangle
    less, and shared among the threads).  With ``lptr``/``lcol`` (CSR: the columns u < r
    where A22[r, u] is not zero, per random-effects row r) A22 is read there alone: the
    random-effects rows of A22 are Z_rest'Z_rest, diagonal for one later scalar term, and
    reading the whole triangle of zeros cost a third of the pass (InstEval)."""
    cdef Py_ssize_t r, u, t, p0, p1, kk, c, ta
    cdef double s, vv, sr
    cdef double* acc
    cdef const double* v
    for r in prange(nrow, schedule="dynamic", chunksize=8, num_threads=nthreads):
        acc = acc_all + threadid() * D
        for u in range(r + 1):
            acc[u] = 0.0
        for t in range(tptr[r], tptr[r + 1]):
            ta = t + PREFETCH_AHEAD
            if ta < ntrans:                 # the stretch of that panel this row reads
                prefetch_panel(L21, rows, tstart[ta], tidx[ta] + 1, k1)
            p0 = tstart[t]
            p1 = tidx[t]
            v = L21 + p1 * k1
            if k1 == 1:
                vv = v[0]
                for kk in range(p0, p1 + 1):
                    acc[rows[kk]] += vv * L21[kk]
            else:
                for kk in range(p0, p1 + 1):
                    s = 0.0
                    for c in range(k1):
                        s = s + v[c] * L21[kk * k1 + c]
                    acc[rows[kk]] += s
        if A22 != NULL:
            sr = rscale[r]
            if lptr != NULL:
                for u in range(r):
                    L22[r * D + u] = -acc[u]
                for kk in range(lptr[r], lptr[r + 1]):
                    u = lcol[kk]
                    L22[r * D + u] = A22[r * D + u] * sr * rscale[u] - acc[u]
            else:
                for u in range(r):
                    L22[r * D + u] = A22[r * D + u] * sr * rscale[u] - acc[u]
            L22[r * D + r] = (A22[r * D + r] * sr * sr + 1.0) - acc[r]
        else:
            for u in range(r + 1):
                L22[r * D + u] -= acc[u]


cdef void xy_accumulate(const double* v, Py_ssize_t nr, Py_ssize_t k1,
                        const cnp.int64_t* rows, Py_ssize_t nxy, double* W,
                        double* XX) noexcept nogil:
    """The X/y rows' share of one level's downdate, gathered column-wise.

    A panel ends with the nxy X/y rows of the dense block (every level touches all of
    them).  Row-wise, each X/y row would stream every level's whole panel again (on wide
    fixed parts, most of the downdate); here each level adds ⟨v_c, v_xa⟩ into W[row c, a]
    for its random-effects rows c (one contiguous nxy-vector) and its X/y × X/y products
    into XX (row-major nxy × nxy, lower triangle)."""
    cdef Py_ssize_t t, a, b, c, nzr = nr - nxy
    cdef const double* vx = v + nzr * k1
    cdef double s
    cdef double* w
    if k1 == 1:
        lmmfast_xy_scalar(v, nzr, rows, nxy, W, XX)
        return
    for t in range(nzr):
        w = W + rows[t] * nxy
        for a in range(nxy):
            s = 0.0
            for c in range(k1):
                s += v[t * k1 + c] * vx[a * k1 + c]
            w[a] += s
    for a in range(nxy):
        for b in range(a + 1):
            s = 0.0
            for c in range(k1):
                s += vx[a * k1 + c] * vx[b * k1 + c]
            XX[a * nxy + b] += s


cdef inline int level2(const double* A, const double* T, double* L, const double* a21,
                       double* v, Py_ssize_t nr) noexcept nogil:
    """One level of a first term with k1 = 2: ``L <- chol(T' A T + I)`` (row-major 2×2,
    upper entry 0) and the panel ``v <- a21 T L^{-T}`` (nr × 2), the products of
    ``rows_tmul``, ``cols_mul``, ``chol_small``, ``right_factor`` and ``rows_times``
    written out for T lower triangular; -1 when T' A T + I is not positive definite."""
    cdef double t00 = T[0], t10 = T[2], t11 = T[3]
    cdef double b00 = t00 * A[0] + t10 * A[2]          # T' A (row 1: t11 A[1, :])
    cdef double b01 = t00 * A[1] + t10 * A[3]
    cdef double b10 = t11 * A[2], b11 = t11 * A[3]
    cdef double m00 = (b00 * t00 + b01 * t10) + 1.0    # (T' A) T + I, lower triangle
    cdef double m10 = b10 * t00 + b11 * t10
    cdef double m11 = b11 * t11 + 1.0
    cdef double l00, l10, l11, i00, i10, i11, r00, r01, r10, r11, x0, x1
    cdef Py_ssize_t t
    if not (m00 > 0.0):
        return -1
    l00 = sqrt(m00)
    l10 = m10 / l00
    m11 = m11 - l10 * l10
    if not (m11 > 0.0):
        return -1
    l11 = sqrt(m11)
    L[0] = l00
    L[1] = 0.0
    L[2] = l10
    L[3] = l11
    i00 = 1.0 / l00                                    # L^{-1}
    i11 = 1.0 / l11
    i10 = -(l10 * i00) / l11
    r00 = t00 * i00                                    # R = T L^{-T}
    r01 = t00 * i10
    r10 = t10 * i00
    r11 = t10 * i10 + t11 * i11
    for t in range(nr):
        x0 = a21[2 * t]
        x1 = a21[2 * t + 1]
        v[2 * t] = x0 * r00 + x1 * r10
        v[2 * t + 1] = x0 * r01 + x1 * r11
    return 0


cdef int update_blocked_core(
        const double* A11, Py_ssize_t m1, Py_ssize_t k1, const double* T1,
        const cnp.int64_t* indptr, const cnp.int64_t* rows, const double* A21,
        const double* A22, Py_ssize_t D, Py_ssize_t nz,
        const double* rscale, const cnp.int64_t* rk, const cnp.int64_t* rtoff,
        const double* Tflat, const cnp.int64_t* batch, Py_ssize_t nbatch,
        double* L11, double* L21, double* L22, double* buf, double* wbuf,
        const cnp.int64_t* tptr, const cnp.int64_t* tidx, const cnp.int64_t* tstart,
        const cnp.int32_t* rows32, double* acc, double* wxy, const cnp.int64_t* heavy, Py_ssize_t nheavy,
        const char* hflag, double* hbuf, Py_ssize_t hchunk, int nthreads,
        double* rbuf, int chol_threads=1, Py_ssize_t tile=0,
        const ObsForm* obs=NULL, const cnp.int64_t* lptr=NULL,
        const cnp.int32_t* lcol=NULL) noexcept nogil:
    """One factorization (see :func:`update_blocked`).  With the transposed pattern
    (``tptr``), ``tstart`` is where each entry's panel starts (``indptr[tlev]``),
    ``rows32`` is ``rows`` as int32 and ``wxy`` holds (D - nz) × D scratch doubles for the
    X/y rows' downdate; ``rbuf`` holds max(2 k1² + k1, k²) scratch doubles, k the widest
    later term (a level's T1 L11^{-T} and L11^{-1}, and one panel row; first Λ's
    transform of the dense block).  With ``chol_threads`` > 1 the heavy levels' update
    and the dense Cholesky run tiled (``tile`` columns) on that many OpenMP threads with
    single-threaded BLAS (:mod:`lmmfast._chol`); else through BLAS/LAPACK as called.
    With ``obs`` (not NULL) the levels of term 1 are factored and downdated from their
    observations (:func:`lmmfast._obsform.obs_update`; no batches, heavy levels or
    transposed pattern then), and the panels' rows of the units are not formed
    (:func:`lmmfast._obsform.obs_panels` forms them).  ``lptr``/``lcol``: the nonzero
    pattern of the random-effects rows' lower triangle of A22, for the transposed
    downdate (see :func:`transposed_downdate`)."""
    cdef Py_ssize_t j, a, b, c, t, u, r, kk, p0, p1, nr, bi, j0, j1, K, h0, h1
    cdef Py_ssize_t nxy = D - nz
    cdef int k_i, ld_i
    cdef char tr = b'T', nn = b'N'
    cdef double one = 1.0, mone = -1.0, zero = 0.0
    cdef double s, d
    cdef double* blk
    cdef double* v
    cdef int info = 0
    cdef int n_i
    cdef char uplo = b'U'

    if obs != NULL:
        # ---- the levels of term 1 from their observations (``_obsform``; Λr' A22 Λr + I
        # is written there, beside the levels; the panels' rows of the units are left to
        # obs_panels)
        info = obs_update(A11, m1, k1, T1, indptr, A22, D, nz, rscale, rk, rtoff, Tflat,
                          L11, L21, L22, obs, nthreads, rbuf)
        if info != 0:
            return info
        return dense_chol(L22, D, chol_threads, tile)
    if tptr != NULL:
        for a in range(nxy * D):
            wxy[a] = 0.0
    # ---- L22 <- Λr' A22 Λr  (+ I on the random-effects rows); only the lower (block)
    # triangle, which is all dpotrf reads.  The row-wise downdate initialises the
    # random-effects rows itself when nothing else writes them before it (no group
    # factors, no batched or heavy levels)
    cdef bint groups = False
    for r in range(D):
        if rk[r] != 1:
            groups = True
            break
    cdef bint fused = tptr != NULL and not groups and nheavy == 0 and nbatch == m1
    lam_dense(A22, L22, D, nz, nz if fused else 0, groups, rscale, rk, rtoff, Tflat, rbuf)

    for bi in range(nbatch):
        j0 = batch[bi]
        j1 = batch[bi + 1]
        for j in range(j0, j1):
            p0 = indptr[j]
            nr = indptr[j + 1] - p0
            v = L21 + p0 * k1
            if k1 == 1:
                # ---- a scalar first term, the same arithmetic fused: L11[j] =
                # sqrt(t a_j t + 1), panel ((A21_j t) Λr) / L11[j]
                d = (T1[0] * A11[j]) * T1[0] + 1.0
                if not (d > 0.0):
                    return -1
                d = sqrt(d)
                L11[j] = d
                s = 1.0 / d
                if groups:
                    for t in range(nr):
                        v[t] = A21[p0 + t] * T1[0]
                    lam_rows(v, nr, 1, rows + p0, rscale, rk, rtoff, Tflat)
                    for t in range(nr):
                        v[t] = v[t] * s
                else:
                    for t in range(nr):
                        v[t] = ((A21[p0 + t] * T1[0]) * rscale[rows[p0 + t]]) * s
            elif k1 == 2:
                # ---- a 2×2 first term (intercept and slope, the commonest): the steps
                # below in closed form (loops over k1 = 2 cost most of a small model's
                # evaluation)
                if level2(A11 + j * 4, T1, L11 + j * 4, A21 + p0 * 2, v, nr) != 0:
                    return -1
                if groups:
                    lam_rows(v, nr, 2, rows + p0, rscale, rk, rtoff, Tflat)
                else:
                    for t in range(nr):
                        s = rscale[rows[p0 + t]]
                        v[2 * t] *= s
                        v[2 * t + 1] *= s
            else:
                # ---- L11[j] = chol(T1' A11[j] T1 + I) and R = T1 L11[j]^{-T} (in rbuf);
                # the L21 panel: Λr' (A21_j R) (the row operations and the product with
                # R commute)
                if level_factor(A11 + j * k1 * k1, T1, k1, L11 + j * k1 * k1, rbuf,
                                rbuf + k1 * k1) != 0:
                    return -1
                if nr * k1 * k1 >= PANEL_GEMM_MIN:
                    # row-major V = A R is column-major V' = R' A': one dgemm, no copy
                    n_i = <int>nr
                    k_i = <int>k1
                    dgemm(&nn, &nn, &k_i, &n_i, &k_i, &one, rbuf, &k_i,
                          <double*>(A21 + p0 * k1), &k_i, &zero, v, &k_i)
                else:
                    for a in range(nr * k1):
                        v[a] = A21[p0 * k1 + a]
                    rows_times(v, nr, k1, rbuf, rbuf + 2 * k1 * k1)
                lam_rows(v, nr, k1, rows + p0, rscale, rk, rtoff, Tflat)
            if j1 - j0 == 1 and tptr != NULL and (hflag == NULL or not hflag[j]):
                xy_accumulate(v, nr, k1, rows + p0, nxy, wxy, wxy + nz * nxy)
            elif j1 - j0 == 1 and tptr == NULL and (hflag == NULL or not hflag[j]):
                # ---- L22 -= V V' (lower triangle; rows are ascending)
                downdate(L22, D, rows + p0, v, nr, k1, buf)
        if j1 - j0 > 1:
            # levels j0..j1 share one contiguous run of rows: one rank-K update, K = k1 (j1-j0)
            p0 = indptr[j0]
            nr = indptr[j0 + 1] - p0
            K = k1 * (j1 - j0)
            if k1 == 1:                  # the batch's panels follow each other in L21
                v = L21 + indptr[j0]
                for t in range(nr):
                    for j in range(j1 - j0):
                        wbuf[j + t * K] = v[j * nr + t]
            elif k1 == 2:
                v = L21 + indptr[j0] * 2
                for t in range(nr):
                    for j in range(j1 - j0):
                        wbuf[2 * j + t * K] = v[(j * nr + t) * 2]
                        wbuf[2 * j + 1 + t * K] = v[(j * nr + t) * 2 + 1]
            else:
                for t in range(nr):      # row t of every level's panel: contiguous writes
                    for j in range(j0, j1):
                        v = L21 + (indptr[j] + t) * k1
                        for c in range(k1):
                            wbuf[(j - j0) * k1 + c + t * K] = v[c]
            if nr * nr * K <= SMALL_SYRK:     # tiny: plain loops beat BLAS's call overhead
                r = rows[p0]
                for t in range(nr):
                    blk = L22 + (r + t) * D + r
                    for u in range(t + 1):
                        blk[u] -= dot4(wbuf + t * K, wbuf + u * K, K)
                continue
            n_i = <int>nr
            k_i = <int>K
            ld_i = <int>D
            dsyrk(&uplo, &tr, &n_i, &k_i, &mone, wbuf, &k_i, &one,
                  L22 + rows[p0] * D + rows[p0], &ld_i)

    # ---- heavy levels (panels spanning much of the dense block): scattered into dense
    # columns, hchunk levels at a time, then one rank-K update of all of L22 each
    h0 = 0
    while h0 < nheavy:
        h1 = min(nheavy, h0 + hchunk)
        K = k1 * (h1 - h0)
        for a in range(D * K):
            hbuf[a] = 0.0
        for bi in range(h0, h1):
            j = heavy[bi]
            v = L21 + indptr[j] * k1
            for t in range(indptr[j + 1] - indptr[j]):
                r = rows[indptr[j] + t]
                for c in range(k1):
                    hbuf[r * K + (bi - h0) * k1 + c] = v[t * k1 + c]
        if chol_threads > 1:
            syrk_tiled(L22, D, D, hbuf, K, K, tile, chol_threads)
        else:
            n_i = <int>D
            k_i = <int>K
            dsyrk(&uplo, &tr, &n_i, &k_i, &mone, hbuf, &k_i, &one, L22, &n_i)
        h0 = h1

    if tptr != NULL:
        transposed_downdate(L22, D, nz, k1, rows32, L21, tptr, tidx, tstart, tptr[nz], acc,
                            nthreads, A22 if fused else NULL, rscale, lptr, lcol)
        for c in range(nz):                  # the X/y rows: W is (nz × nxy), then XX
            for a in range(nxy):
                L22[(nz + a) * D + c] -= wxy[c * nxy + a]
        for a in range(nxy):
            for b in range(a + 1):
                L22[(nz + a) * D + nz + b] -= wxy[nz * nxy + a * nxy + b]

    return dense_chol(L22, D, chol_threads, tile)


cdef inline int dense_chol(double* L22, Py_ssize_t D, int chol_threads,
                           Py_ssize_t tile) noexcept nogil:
    """The dense block's Cholesky in place (row-major lower == column-major upper): plain
    loops when small, tiled on ``chol_threads`` threads, else LAPACK; its info."""
    cdef int n_i, lda_i, info = 0
    cdef char uplo = b'U'
    if D <= SMALL_CHOL:
        return chol_lower(L22, D, D)
    if chol_threads > 1:
        return potrf_tiled(L22, D, D, tile, chol_threads)
    n_i = <int>D
    lda_i = <int>D
    dpotrf(&uplo, &n_i, L22, &lda_i, &info)
    return info


cdef Py_ssize_t batched_width(const cnp.int64_t* batch, Py_ssize_t nbatch,
                              const cnp.int64_t* indptr, Py_ssize_t k1) noexcept nogil:
    """Doubles of the scratch that holds a batch's panels side by side (the widest batch
    of several levels; at least 1)."""
    cdef Py_ssize_t bi, w = 1
    for bi in range(nbatch):
        if batch[bi + 1] - batch[bi] > 1:
            w = max(w, (indptr[batch[bi] + 1] - indptr[batch[bi]]) * k1
                    * (batch[bi + 1] - batch[bi]))
    return w


def update_blocked(const double[:, :, ::1] A11, const double[:, ::1] T1,
                   const cnp.int64_t[::1] indptr, const cnp.int64_t[::1] rows,
                   const double[:, ::1] A21, const double[:, ::1] A22, Py_ssize_t nz,
                   const double[::1] rscale, const cnp.int64_t[::1] rk,
                   const cnp.int64_t[::1] rtoff, const double[::1] Tflat,
                   double[:, :, ::1] L11_out, double[:, ::1] L21_out, double[:, ::1] L22_out,
                   const cnp.int64_t[::1] batch=None, bint check_only=False,
                   const cnp.int64_t[::1] heavy=None):
    """Factor Ω(θ) = L L' in the blocked layout (see the module docstring).

    Parameters
    ----------
    A11 : (m1, k1, k1) array
        Z1'Z1 diagonal blocks, one per level of the first term.
    T1 : (k1, k1) array
        Lower-triangular relative covariance factor of the first term.
    indptr, rows, A21 : arrays
        Block-sparse [Z_rest X y]'Z1: level j owns rows ``rows[indptr[j]:indptr[j+1]]``
        (ascending) and the panel ``A21[indptr[j]:indptr[j+1], :]``.
    A22 : (D, D) array
        Dense [Z_rest X y]'[Z_rest X y].
    nz : int
        Number of leading rows of the dense block that are random effects (get +I).
    rscale, rk, rtoff, Tflat : arrays
        Λ_rest as row operations: row r is scaled by ``rscale[r]`` when ``rk[r] == 1``,
        starts a k-row group transformed by the k×k factor at ``Tflat[rtoff[r]:]`` when
        ``rk[r] = k > 1`` (then ``rscale[r]`` must be 1), and lies inside a group when 0.
    L11_out, L21_out, L22_out : arrays
        Written with the factor; L22_out's strict upper triangle is scratch.
    batch : int64 array, optional
        Level boundaries ``0 = b_0 < ... < b_B = m1``; the levels of a batch with more
        than one level must share one contiguous run of rows (see
        ``blocks.BlockedCrossprod.batch``), and their downdates go in one rank-k update.
    check_only : bool
        Validate the arguments (shapes, row indices, batches) and return 0 without
        factoring.
    heavy : int64 array, optional
        Ascending levels (each alone in its batch) whose downdates go through dense
        rank-k updates of the whole block (``blocks.BlockedCrossprod.heavy``).

    Returns
    -------
    info : int
        0 on success, -1 if a diagonal block failed, >0 LAPACK's dpotrf info.
    """
    cdef Py_ssize_t m1 = A11.shape[0], k1 = A11.shape[1], D = A22.shape[0], j
    if A11.shape[2] != k1 or T1.shape[0] != k1 or T1.shape[1] != k1:
        raise ValueError("A11 must be (m1, k, k) and T1 (k, k)")
    if indptr.shape[0] != m1 + 1 or A21.shape[0] != rows.shape[0] or (A21.shape[1] != k1 and rows.shape[0] > 0):
        raise ValueError("block-sparse A21 does not match A11")
    if A22.shape[1] != D or rscale.shape[0] != D or rk.shape[0] != D or rtoff.shape[0] != D:
        raise ValueError("A22 and the row descriptors must be D×D and length D")
    if not (0 <= nz < D):
        raise ValueError("nz out of range")
    if L11_out.shape[0] != m1 or L11_out.shape[1] != k1 or L11_out.shape[2] != k1:
        raise ValueError("L11_out has the wrong shape")
    if L21_out.shape[0] != A21.shape[0] or L21_out.shape[1] != A21.shape[1]:
        raise ValueError("L21_out has the wrong shape")
    if L22_out.shape[0] != D or L22_out.shape[1] != D:
        raise ValueError("L22_out has the wrong shape")
    if m1 > 0 and (indptr[0] != 0 or indptr[m1] != rows.shape[0]):
        raise ValueError("indptr must run from 0 to len(rows)")
    cdef Py_ssize_t t
    cdef bint bad = False
    with nogil:
        for j in range(m1):
            if indptr[j + 1] < indptr[j]:
                bad = True
                break
            for t in range(indptr[j], indptr[j + 1]):
                if rows[t] < 0 or rows[t] >= D or (t > indptr[j] and rows[t] <= rows[t - 1]):
                    bad = True
                    break
    if bad:
        raise ValueError("each level's rows must be ascending indices into the dense block")
    cdef int info
    cdef const double* a21p = &A21[0, 0] if A21.shape[0] > 0 else NULL
    cdef double* l21p = &L21_out[0, 0] if L21_out.shape[0] > 0 else NULL
    cdef const cnp.int64_t* rowsp = &rows[0] if rows.shape[0] > 0 else NULL
    cdef Py_ssize_t nrmax = max_panel(indptr)
    buf = np.empty(min(nrmax, GATHER_MAX) ** 2 if nrmax * k1 >= BLAS_MIN else 1)
    cdef double[::1] bufv = buf
    if batch is None:
        batch = np.arange(m1 + 1, dtype=np.int64)
    cdef Py_ssize_t nbatch = batch.shape[0] - 1, bi, wmax
    if nbatch < 0 or batch[0] != 0 or batch[nbatch] != m1:
        raise ValueError("batch must run from 0 to m1")
    for bi in range(nbatch):
        if batch[bi + 1] <= batch[bi]:
            raise ValueError("batch must increase")
        if batch[bi + 1] - batch[bi] > 1:
            for j in range(batch[bi], batch[bi + 1]):
                if (indptr[j + 1] - indptr[j] != indptr[batch[bi] + 1] - indptr[batch[bi]]
                        or rows[indptr[j]] != rows[indptr[batch[bi]]]
                        or rows[indptr[j + 1] - 1] - rows[indptr[j]] != indptr[j + 1] - indptr[j] - 1):
                    raise ValueError("levels of a batch must share one contiguous run of rows")
    wmax = batched_width(&batch[0], nbatch, &indptr[0], k1)
    hflag_arr, hchunk, hb = _heavy_setup(heavy, batch, m1, k1, D)
    if check_only:
        return 0
    wb = np.empty(wmax)
    cdef double[::1] wbv = wb
    rb = np.empty(max(2 * k1 * k1 + k1, int(np.max(rk, initial=1)) ** 2))
    cdef double[::1] rbv = rb
    cdef const char[::1] hfv = hflag_arr
    cdef double[::1] hbv = hb
    cdef Py_ssize_t nheavy = heavy.shape[0] if heavy is not None else 0
    cdef Py_ssize_t hch = hchunk
    with nogil:
        info = update_blocked_core(&A11[0, 0, 0], m1, k1, &T1[0, 0], &indptr[0], rowsp,
                                   a21p, &A22[0, 0], D, nz, &rscale[0], &rk[0], &rtoff[0],
                                   &Tflat[0], &batch[0], nbatch,
                                   &L11_out[0, 0, 0], l21p, &L22_out[0, 0],
                                   &bufv[0] if nrmax * k1 >= BLAS_MIN else NULL, &wbv[0],
                                   NULL, NULL, NULL, NULL, NULL, NULL,
                                   &heavy[0] if nheavy > 0 else NULL, nheavy,
                                   &hfv[0] if nheavy > 0 else NULL, &hbv[0], hch, 1, &rbv[0])
    return info


def single_levels(batch, Py_ssize_t m1):
    """Mask of the levels alone in their batch (downdated one by one: scattered, row-wise
    or, when heavy, dense)."""
    b = np.asarray(batch)
    single = np.zeros(m1, dtype=bool)
    single[b[:len(b) - 1][np.diff(b) == 1]] = True
    return single


def transposed_pattern_ok(tptr, tidx, tlev, indptr) -> bool:
    """Whether (tptr, tidx, tlev) is a transposed pattern of the panels ``indptr``
    (``BlockedCrossprod.tptr``...): tptr rising from 0 to the number of entries, one level
    per entry, and each entry's position inside that level's panel.  Checked by both
    passes that read it: the row-wise downdate (``_pls.BlockedFactor``) and the
    gradient's row-wise products (``_gradient.rowwise_products``)."""
    tp, ti, tl, ip = (np.asarray(a) for a in (tptr, tidx, tlev, indptr))
    m1 = len(ip) - 1
    if (len(tp) < 1 or len(tl) != len(ti) or tp[0] != 0 or tp[len(tp) - 1] != len(ti)
            or np.any(np.diff(tp) < 0)):
        return False
    if len(ti) == 0:
        return True
    if tl.min() < 0 or tl.max() >= m1:
        return False
    return not (np.any(ip[tl] > ti) or np.any(ip[tl + 1] <= ti))


def _heavy_setup(heavy, batch, Py_ssize_t m1, Py_ssize_t k1, Py_ssize_t D):
    """Validate the heavy levels; return (per-level flags, levels per chunk, chunk buffer)."""
    flags = np.zeros(max(m1, 1), dtype=np.int8)
    if heavy is None or len(heavy) == 0:
        return flags, 1, np.empty(1)
    h = np.asarray(heavy)
    if h.ndim != 1 or np.any(h < 0) or np.any(h >= m1) or np.any(np.diff(h) <= 0):
        raise ValueError("heavy must be ascending level indices")
    if not single_levels(batch, m1)[h].all():
        raise ValueError("heavy levels must each be alone in their batch")
    flags[h] = 1
    # chunks of dense columns up to 32 MB (at least one level), of equal sizes: each
    # chunk's rank-K update streams all of L22, and a short last chunk would do it for few
    hmax = int(max(1, min(len(h), (1 << 22) // max(D * k1, 1))))
    nchunk = -(-len(h) // hmax)
    hchunk = -(-len(h) // nchunk)
    return flags, hchunk, np.empty(D * k1 * hchunk)


def symmetrize_lower(double[:, ::1] A):
    """Copy the strict lower triangle of the square ``A`` onto its upper triangle, in place
    (tile by tile, :func:`lmmfast._dense.symmetrize_tiles`)."""
    cdef Py_ssize_t n = A.shape[0]
    if A.shape[1] != n:
        raise ValueError("A must be square")
    if n == 0:
        return
    with nogil:
        symmetrize_tiles(&A[0, 0], n, n)



def lower_nonzeros(const double[:, ::1] A, Py_ssize_t nz, Py_ssize_t limit=-1):
    """The strictly lower nonzeros of the leading ``nz`` × ``nz`` block of the row-major
    ``A``: (ptr, cols) in CSR form (int64 row pointers, int32 ascending columns per row),
    or None when there are more than ``limit`` of them (``limit`` < 0: no limit).  One
    pass over the triangle, then one to collect (numpy oracle: ``np.nonzero(np.tril(A[:nz,
    :nz], -1))``)."""
    cdef Py_ssize_t r, u, total = 0, pos
    if nz < 0 or nz > A.shape[0] or nz > A.shape[1]:
        raise ValueError(f"nz must be within A's shape {A.shape[0]}×{A.shape[1]}, not {nz}")
    if nz >= 2 ** 31:
        raise ValueError("the block is too large for 32-bit column indices")
    ptr = np.zeros(nz + 1, dtype=np.int64)
    cdef cnp.int64_t[::1] pv = ptr
    with nogil:
        for r in range(nz):
            for u in range(r):
                if A[r, u] != 0.0:
                    total += 1
            pv[r + 1] = total
    if 0 <= limit < total:
        return None
    cols = np.empty(total, dtype=np.int32)
    cdef cnp.int32_t[::1] cv = cols
    with nogil:
        pos = 0
        for r in range(nz):
            for u in range(r):
                if A[r, u] != 0.0:
                    cv[pos] = <cnp.int32_t>u
                    pos += 1
    return ptr, cols

# cython: language_level=3
"""Dense kernels of the factorization (``_pls``) and its gradient (``_gradient``): small
row-major blocks by plain loops (BLAS and LAPACK calls cost more than the arithmetic at
these sizes), Λ's transforms of the dense block and of the panels, and one level's
downdate of the dense block.  Inline, so each module compiles its own copy.
"""
cimport numpy as cnp
from libc.math cimport sqrt
from scipy.linalg.cython_blas cimport dsyrk

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define LMMFAST_PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 0)
    #else
    #define LMMFAST_PREFETCH(p) ((void)0)
    #endif
    """
    # a read prefetch without temporal locality (the row-wise passes over the panels)
    void prefetch "LMMFAST_PREFETCH" (const void* p) nogil

cdef extern from *:
    """
    #include <stdint.h>
    /* One block of L = Λ' A Λ: L[0:kr, 0:kc] (leading dimension D) <- U_r' A[0:kr, 0:kc] U_c
       with U = T (lower triangular, row-major k x k) for a group, the scalar sr / sc for
       a single row (kr or kc = 1: T NULL; T's upper triangle must hold zeros).  First
       A U_c into tmp (kr x kc: each row of A along the rows of T_c, contiguous), then
       U_r' tmp row by row; non-aliasing pointers, so the loops vectorize. */
    static inline void lmmfast_lam_block(double *restrict L, const double *restrict A,
                                         int64_t D, int64_t kr, int64_t kc,
                                         const double *restrict Tr, double sr,
                                         const double *restrict Tc, double sc,
                                         double *restrict tmp)
    {
        int64_t a, b, c;
        int nonzero = 0;
        for (a = 0; a < kr && !nonzero; a++)     /* blocks of A that are zero (levels of */
            for (c = 0; c < kc; c++)             /* two terms that never meet) stay zero */
                nonzero |= A[a * D + c] != 0.0;
        if (!nonzero) {
            for (a = 0; a < kr; a++)
                for (c = 0; c < kc; c++) L[a * D + c] = 0.0;
            return;
        }
        for (a = 0; a < kr; a++) {
            const double *restrict ar = A + a * D;
            double *restrict ta = tmp + a * kc;
            if (Tc == 0) {
                ta[0] = ar[0] * sc;
                continue;
            }
            for (c = 0; c < kc; c++) ta[c] = 0.0;
            for (b = 0; b < kc; b++) {          /* whole rows of T (zeros above): the */
                double x = ar[b];               /* loops keep one length, and vectorize */
                const double *restrict tb = Tc + b * kc;
                for (c = 0; c < kc; c++) ta[c] += x * tb[c];
            }
        }
        for (a = 0; a < kr; a++) {
            double *restrict la = L + a * D;
            if (Tr == 0) {
                for (c = 0; c < kc; c++) la[c] = tmp[c] * sr;
                continue;
            }
            for (c = 0; c < kc; c++) la[c] = 0.0;
            for (b = 0; b < kr; b++) {
                double x = Tr[b * kr + a];
                const double *restrict tb = tmp + b * kc;
                for (c = 0; c < kc; c++) la[c] += x * tb[c];
            }
        }
    }
    """
    void lam_block "lmmfast_lam_block" (double* L, const double* A, cnp.int64_t D,
                                        cnp.int64_t kr, cnp.int64_t kc, const double* Tr,
                                        double sr, const double* Tc, double sc,
                                        double* tmp) noexcept nogil

cdef enum:
    # The row-wise passes prefetch the panel of the entry this many entries ahead.
    PREFETCH_AHEAD = 4
    # Panels with more entries than this use BLAS (dsyrk / dgemm) on a gathered buffer.
    BLAS_MIN = 256
    # Largest panel (rows) gathered into a buffer; bigger panels use the plain loops.
    GATHER_MAX = 2048


cdef inline void prefetch_panel(const double* v, const cnp.int32_t* rows, Py_ssize_t p0,
                                Py_ssize_t p1, Py_ssize_t k1) noexcept nogil:
    """Prefetch panel entries p0..p1-1: their values ``v`` (k1 per entry, a cache line per
    8 doubles) and row indices (16 per line).  The row-wise passes prefetch the whole
    stretch they will read a few entries ahead: the first line alone leaves the rest to
    the hardware's stream detection, a miss or two per panel."""
    cdef Py_ssize_t kk = p0 * k1
    while kk < p1 * k1:
        prefetch(v + kk)
        kk = kk + 8
    kk = p0
    while kk < p1:
        prefetch(rows + kk)
        kk = kk + 16


cdef inline Py_ssize_t max_panel(const cnp.int64_t[::1] indptr) noexcept:
    """Most rows in one panel: the largest indptr[j + 1] - indptr[j]."""
    cdef Py_ssize_t j, n = 0
    for j in range(indptr.shape[0] - 1):
        if indptr[j + 1] - indptr[j] > n:
            n = indptr[j + 1] - indptr[j]
    return n


cdef inline double dot4(const double* x, const double* y, Py_ssize_t n) noexcept nogil:
    """x·y with four partial sums (a single running sum is bound by the add latency)."""
    cdef double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0
    cdef Py_ssize_t i = 0
    while i + 4 <= n:
        s0 += x[i] * y[i]
        s1 += x[i + 1] * y[i + 1]
        s2 += x[i + 2] * y[i + 2]
        s3 += x[i + 3] * y[i + 3]
        i += 4
    while i < n:
        s0 += x[i] * y[i]
        i += 1
    return (s0 + s1) + (s2 + s3)


cdef inline int chol_lower(double* a, Py_ssize_t n, Py_ssize_t ld) noexcept nogil:
    """In-place lower Cholesky of the row-major n×n lower triangle of ``a`` (leading
    dimension ld; the upper triangle is not touched): what dpotrf('U') computes on the
    column-major view, without LAPACK's call overhead, for tiny dense blocks.  0 on
    success, j+1 if pivot j fails."""
    cdef Py_ssize_t i, j, c
    cdef double s, t
    for j in range(n):
        s = a[j * ld + j]
        for c in range(j):
            s -= a[j * ld + c] * a[j * ld + c]
        if not (s > 0.0):
            return <int>(j + 1)
        s = sqrt(s)
        a[j * ld + j] = s
        for i in range(j + 1, n):
            t = a[i * ld + j]
            for c in range(j):
                t -= a[i * ld + c] * a[j * ld + c]
            a[i * ld + j] = t / s
    return 0


cdef inline int chol_small(double* a, Py_ssize_t k) noexcept nogil:
    """In-place lower Cholesky of a row-major k×k matrix, upper triangle zeroed (the L11
    blocks are read whole); 0 on success, j+1 if pivot j fails."""
    cdef Py_ssize_t i, j
    cdef int info = chol_lower(a, k, k)
    if info == 0:
        for j in range(k):
            for i in range(j + 1, k):
                a[j * k + i] = 0.0
    return info


cdef inline void lower_inverse(const double* L, Py_ssize_t k, double* Li) noexcept nogil:
    """Li <- L^{-1} for lower-triangular row-major k×k L (row by row; Li's upper part 0)."""
    cdef Py_ssize_t a, b, c
    cdef double s
    for a in range(k):
        for b in range(k):
            Li[a * k + b] = 0.0
        Li[a * k + a] = 1.0 / L[a * k + a]
        for b in range(a):
            s = 0.0
            for c in range(b, a):
                s += L[a * k + c] * Li[c * k + b]
            Li[a * k + b] = -s / L[a * k + a]


cdef inline void rows_tmul(double* m, Py_ssize_t ld, Py_ssize_t ncol, const double* T,
                           Py_ssize_t k) noexcept nogil:
    """M[0:k, 0:ncol] <- T' M[0:k, 0:ncol] for lower-triangular T (row-major k×k), in place:
    row a is T[a, a] row a + Σ_{b > a} T[b, a] row b, and rows b > a are still unchanged
    when it is formed (contiguous inner loops, the same sums in the same order)."""
    cdef Py_ssize_t a, b, c
    cdef double t
    for a in range(k):
        t = T[a * k + a]
        for c in range(ncol):
            m[a * ld + c] = t * m[a * ld + c]
        for b in range(a + 1, k):
            t = T[b * k + a]
            for c in range(ncol):
                m[a * ld + c] += t * m[b * ld + c]


cdef inline void cols_mul(double* m, Py_ssize_t ld, Py_ssize_t nrow, const double* T,
                   Py_ssize_t k) noexcept nogil:
    """M[0:nrow, 0:k] <- M[0:nrow, 0:k] T for lower-triangular T (row-major k×k), in place."""
    cdef Py_ssize_t r, a, b
    cdef double s
    for r in range(nrow):
        for a in range(k):
            s = 0.0
            for b in range(a, k):
                s += m[r * ld + b] * T[b * k + a]
            m[r * ld + a] = s


cdef inline void lam_rows(double* v, Py_ssize_t nr, Py_ssize_t k1, const cnp.int64_t* rows,
                   const double* rscale, const cnp.int64_t* rk, const cnp.int64_t* rtoff,
                   const double* Tflat) noexcept nogil:
    """Panel rows <- Λ_rest' panel rows (scalar scaling or k-row groups times T')."""
    cdef Py_ssize_t t, c, r, kk
    cdef double s
    for t in range(nr):
        r = rows[t]
        kk = rk[r]
        if kk == 1:
            s = rscale[r]
            for c in range(k1):
                v[t * k1 + c] *= s
        elif kk > 1:
            rows_tmul(v + t * k1, k1, k1, Tflat + rtoff[r], kk)


cdef inline void lam_dense_groups(const double* A, double* L, Py_ssize_t D,
                                  const double* rscale, const cnp.int64_t* rk,
                                  const cnp.int64_t* rtoff, const double* Tflat,
                                  double* tmp) noexcept nogil:
    """L <- Λ' A Λ on the lower block triangle, unit by unit.

    The rows of the dense block fall into units: a scalar row (``rk == 1``, scaled by
    ``rscale``) or a k-row group (``rk == k`` at its first row, transformed by its T).
    Block (R, C) of the result, C <= R, is U_R' A[R, C] U_C (:c:func:`lmmfast_lam_block`;
    ``tmp``: k_R k_C doubles for the largest units): one pass over the lower triangle in
    row order (a transform of whole columns per group would stride through all D rows
    once per group)."""
    cdef Py_ssize_t r0 = 0, c0, kr, kc
    while r0 < D:
        kr = rk[r0]
        c0 = 0
        while c0 <= r0:
            kc = rk[c0]
            lam_block(L + r0 * D + c0, A + r0 * D + c0, D, kr, kc,
                      Tflat + rtoff[r0] if kr > 1 else NULL, rscale[r0],
                      Tflat + rtoff[c0] if kc > 1 else NULL, rscale[c0], tmp)
            c0 += kc
        r0 += kr


cdef inline void lam_dense(const double* A, double* L, Py_ssize_t D, Py_ssize_t nz,
                           Py_ssize_t r0, bint groups, const double* rscale,
                           const cnp.int64_t* rk, const cnp.int64_t* rtoff,
                           const double* Tflat, double* tmp) noexcept nogil:
    """L <- Λ' A Λ + I (the identity on the random-effects rows, nz of them) on the lower
    (block) triangle, all dpotrf reads: by units (:func:`lam_dense_groups`) where a
    vector-valued term has its rows here (``groups``: some ``rk`` is not 1), else row
    scales; with ``r0`` > 0 (no groups) only rows r0.. and no identity below r0 (the
    caller writes those rows)."""
    cdef Py_ssize_t r, c
    cdef double s
    if groups:
        lam_dense_groups(A, L, D, rscale, rk, rtoff, Tflat, tmp)
    else:
        for r in range(r0, D):
            s = rscale[r]
            for c in range(r + 1):
                L[r * D + c] = A[r * D + c] * s * rscale[c]
    for r in range(r0, nz):
        L[r * D + r] += 1.0


cdef inline void right_factor(const double* T, const double* L, Py_ssize_t k, double* R,
                              double* Li) noexcept nogil:
    """R <- T L^{-T} for lower-triangular row-major k×k T and L (Li: L^{-1} scratch)."""
    cdef Py_ssize_t a, b, c
    cdef double s
    lower_inverse(L, k, Li)
    for a in range(k):                      # R[a, b] = Σ_{c <= min(a, b)} T[a, c] Li[b, c]
        for b in range(k):
            s = 0.0
            for c in range(min(a, b) + 1):
                s += T[a * k + c] * Li[b * k + c]
            R[a * k + b] = s


cdef inline int level_factor(const double* A, const double* T1, Py_ssize_t k1, double* blk,
                             double* R, double* Li) noexcept nogil:
    """One level of term 1: blk <- chol(T1' A T1 + I) (A its k1×k1 block of A11), and
    R <- T1 blk^{-T}, the factor its panel is multiplied by (Li: k1² scratch); 0, or -1
    when the block is not positive definite."""
    cdef Py_ssize_t a
    for a in range(k1 * k1):
        blk[a] = A[a]
    rows_tmul(blk, k1, k1, T1, k1)
    cols_mul(blk, k1, k1, T1, k1)
    for a in range(k1):
        blk[a * k1 + a] += 1.0
    if chol_small(blk, k1) != 0:
        return -1
    right_factor(T1, blk, k1, R, Li)
    return 0


cdef inline void rows_times(double* v, Py_ssize_t nr, Py_ssize_t k, const double* R,
                            double* tmp) noexcept nogil:
    """Each row of the row-major nr×k V <- row · R (R row-major k×k; tmp: k scratch)."""
    cdef Py_ssize_t t, a, b
    cdef double x
    for t in range(nr):
        for a in range(k):
            tmp[a] = 0.0
        for b in range(k):
            x = v[t * k + b]
            for a in range(k):
                tmp[a] += x * R[b * k + a]
        for a in range(k):
            v[t * k + a] = tmp[a]


cdef inline void downdate(double* L22, Py_ssize_t D, const cnp.int64_t* rows,
                          const double* v, Py_ssize_t nr, Py_ssize_t k1,
                          double* buf) noexcept nogil:
    """L22[rows, rows] -= V V' on the lower triangle (rows ascending)."""
    cdef Py_ssize_t t, u, c, r
    cdef double s
    cdef int n_i, k_i
    cdef char up = b'U', tr = b'T'
    cdef double one = 1.0, zero = 0.0, mone = -1.0
    cdef int ld_i
    if nr * k1 >= BLAS_MIN and rows[nr - 1] - rows[0] == nr - 1:
        # contiguous rows: rank-k update straight into L22 (column-major 'U' = row-major lower)
        n_i = <int>nr
        k_i = <int>k1
        ld_i = <int>D
        dsyrk(&up, &tr, &n_i, &k_i, &mone, <double*>v, &k_i, &one,
              L22 + rows[0] * D + rows[0], &ld_i)
        return
    if buf != NULL and nr * k1 >= BLAS_MIN and nr <= GATHER_MAX:
        # column-major C = (V')' V' with uplo 'U' is row-major lower: C[t*nr+u], t >= u
        n_i = <int>nr
        k_i = <int>k1
        dsyrk(&up, &tr, &n_i, &k_i, &one, <double*>v, &k_i, &zero, buf, &n_i)
        for t in range(nr):
            r = rows[t] * D
            for u in range(t + 1):
                L22[r + rows[u]] -= buf[t * nr + u]
        return
    for t in range(nr):
        r = rows[t] * D
        for u in range(t + 1):
            s = 0.0
            for c in range(k1):
                s += v[t * k1 + c] * v[u * k1 + c]
            L22[r + rows[u]] -= s


cdef inline void symmetrize_tiles(double* A, Py_ssize_t n, Py_ssize_t ld) noexcept nogil:
    """Copy the strict lower triangle of the row-major n×n ``A`` (leading dimension ld)
    onto its upper triangle, 64 × 64 tile by tile: a row-by-row copy writes down columns,
    a cache miss per entry once the matrix outgrows the cache (1,157²: 6 ms -> 1 ms)."""
    cdef Py_ssize_t r, c, r0, c0, bi, bj, nt = (n + 63) // 64
    for bi in range(nt):
        r0 = bi * 64
        for bj in range(bi + 1):
            c0 = bj * 64
            for r in range(r0, min(r0 + 64, n)):
                for c in range(c0, min(c0 + 64, r)):
                    A[c * ld + r] = A[r * ld + c]

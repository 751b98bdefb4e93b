# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""The coupling of term 1 with the dense block in observation form.

The blocked factor (``_blockchol.pyx``) downdates the dense block by every level's panel,
L22 -= Σ_j V_j V_j' with V_j = Λr' A21_j R_j and R_j = T1 L11_j^{-T} (Bates et al. 2015,
JSS 67(1), eq. 18 in blocks).  The stored coupling A21_j = Σ_{i in j} p_i z1_i' is a sum
over the level's observations, p_i the observation's column of [Z_rest X y]' (one k_t
stretch per later term, then X and y).  With s_i = Λr' p_i and g_i = R_j' z1_i,

    V_j = Σ_i s_i g_i',          V_j V_j' = Σ_{i, i'} (g_i · g_i') s_i s_i'',

and each s_i is sparse: k_t entries per later term, p + 1 for X and y.  Where a level has
few observations next to the rows of its panel (maximal crossed designs: each subject
meets each item about once; kb07 has 32 observations per subject against a 265-row
panel, 8 columns wide), the pairs cost a fraction of the dense rank-k1 update per level:
kb07 2.6 M multiply-adds an evaluation against 15.7 M for the batched dsyrk.  The panels
themselves come out of the same pass (Σ_i s_i g_i'), so the factor is the same one the
panel path gives; ``blocks.BlockedCrossprod`` chooses the form by predicted cost
(:func:`lmmfast.obsform.obs_form_pays`).
"""
cimport numpy as cnp
from cython.parallel cimport parallel, prange, threadid
from lmmfast._dense cimport level_factor, rows_tmul

cnp.import_array()

cdef extern from *:
    """
    #include <stdint.h>

    /* acc (ka x kb, row-major) = sum over pairs t0..t1-1 of m[p0] s[p1 ..] s[p2 ..]'
       (pair p: the Gram entry's index, the offsets of the two units' rows of s).  Blocks
       of 4 or 8 by 4 or 8 (maximal models' 2x2 and 2x2x2 designs) with the sums held in
       vectors of four doubles (AVX2 with FMA, where the CPU has them) or of two; 1 x 1
       in a scalar; other sizes in general loops. */
    #if defined(__GNUC__)
    typedef double lmmfast_v4 __attribute__((vector_size(32)));
    typedef double lmmfast_v4u __attribute__((vector_size(32), aligned(8), may_alias));
    typedef double lmmfast_v2 __attribute__((vector_size(16)));
    typedef double lmmfast_v2u __attribute__((vector_size(16), aligned(8), may_alias));

    #define LMMFAST_PAIRS(NAME, ATTR, VT, VTU, W, KA, KB)                              \
    ATTR static void NAME(double *restrict acc, const int64_t *restrict pair,          \
                          int64_t t0, int64_t t1, const double *restrict m,            \
                          const double *restrict s)                                    \
    {                                                                                   \
        enum { NB = (KB) / (W) };                                                       \
        VT r[(KA) * NB], sv[NB];                                                        \
        int64_t t, a, b;                                                                \
        for (a = 0; a < (KA) * NB; a++) r[a] = (VT){0};                                 \
        for (t = t0; t < t1; t++) {                                                     \
            const int64_t *p = pair + 3 * t;                                            \
            const double *su = s + p[1];                                                \
            double x = m[p[0]];                                                         \
            for (b = 0; b < NB; b++) sv[b] = *(const VTU *)(s + p[2] + (W) * b);        \
            for (a = 0; a < (KA); a++) {                                                \
                VT c = (VT){0} + x * su[a];                                             \
                for (b = 0; b < NB; b++) r[a * NB + b] += c * sv[b];                    \
            }                                                                           \
        }                                                                               \
        for (a = 0; a < (KA); a++)                                                      \
            for (b = 0; b < NB; b++) *(VTU *)(acc + a * (KB) + (W) * b) = r[a * NB + b];\
    }

    LMMFAST_PAIRS(lmmfast_pairs88_base, , lmmfast_v2, lmmfast_v2u, 2, 8, 8)
    LMMFAST_PAIRS(lmmfast_pairs84_base, , lmmfast_v2, lmmfast_v2u, 2, 8, 4)
    LMMFAST_PAIRS(lmmfast_pairs48_base, , lmmfast_v2, lmmfast_v2u, 2, 4, 8)
    LMMFAST_PAIRS(lmmfast_pairs44_base, , lmmfast_v2, lmmfast_v2u, 2, 4, 4)

    #if defined(__x86_64__) || defined(__i386__)
    #define LMMFAST_HAVE_AVX2_CLONE 1
    #define LMMFAST_AVX2 __attribute__((target("avx2,fma")))
    LMMFAST_PAIRS(lmmfast_pairs88_avx2, LMMFAST_AVX2, lmmfast_v4, lmmfast_v4u, 4, 8, 8)
    LMMFAST_PAIRS(lmmfast_pairs84_avx2, LMMFAST_AVX2, lmmfast_v4, lmmfast_v4u, 4, 8, 4)
    LMMFAST_PAIRS(lmmfast_pairs48_avx2, LMMFAST_AVX2, lmmfast_v4, lmmfast_v4u, 4, 4, 8)
    LMMFAST_PAIRS(lmmfast_pairs44_avx2, LMMFAST_AVX2, lmmfast_v4, lmmfast_v4u, 4, 4, 4)
    static int lmmfast_has_avx2 = -1;
    static int lmmfast_avx2(void)
    {
        if (lmmfast_has_avx2 < 0) {
            __builtin_cpu_init();
            lmmfast_has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
        }
        return lmmfast_has_avx2;
    }
    #endif
    #endif

    typedef void (*lmmfast_pairs_fn)(double *, const int64_t *, int64_t, int64_t,
                                     const double *, const double *);

    static void lmmfast_block_pairs(double *restrict acc, const int64_t *restrict pair,
                                    int64_t t0, int64_t t1, const double *restrict m,
                                    const double *restrict s, int64_t ka, int64_t kb)
    {
        int64_t t, a, b;
    #if defined(__GNUC__)
        if ((ka == 4 || ka == 8) && (kb == 4 || kb == 8)) {
            int which = (ka == 8) * 2 + (kb == 8);
            static const lmmfast_pairs_fn base[4] = {lmmfast_pairs44_base, lmmfast_pairs48_base,
                                                     lmmfast_pairs84_base, lmmfast_pairs88_base};
    #ifdef LMMFAST_HAVE_AVX2_CLONE
            static const lmmfast_pairs_fn avx2[4] = {lmmfast_pairs44_avx2, lmmfast_pairs48_avx2,
                                                     lmmfast_pairs84_avx2, lmmfast_pairs88_avx2};
            if (lmmfast_avx2()) {
                avx2[which](acc, pair, t0, t1, m, s);
                return;
            }
    #endif
            base[which](acc, pair, t0, t1, m, s);
            return;
        }
    #endif
        if (ka == 1 && kb == 1) {
            double r = 0.0;
            for (t = t0; t < t1; t++) {
                const int64_t *p = pair + 3 * t;
                r += m[p[0]] * s[p[1]] * s[p[2]];
            }
            acc[0] = r;
            return;
        }
        for (a = 0; a < ka * kb; a++) acc[a] = 0.0;
        for (t = t0; t < t1; t++) {
            const int64_t *p = pair + 3 * t;
            const double *su = s + p[1], *sv = s + p[2];
            double x = m[p[0]];
            for (a = 0; a < ka; a++) {
                double co = x * su[a];
                double *restrict ra = acc + a * kb;
                for (b = 0; b < kb; b++) ra[b] += co * sv[b];
            }
        }
    }

    /* One level of term 1, its observations' rows at z1, xy, upos, uprow, soff (see
       level_part): G = Z1 R (nj x K) and G' (K x nj); the Gram matrix G G' (its lower
       triangle, row-major nj x nj at m); the panel v (nr x K, its nxy X/y rows last) = sum_i s_i g_i'; W' = V[X/y] G'
       (nxy x nj, at wt); and the X/y rows' share, subtracted into xyacc (nxy rows of D):
       [X/y, unit u of i] -= w_i s_iu', [X/y, X/y] -= W' XY (lower triangle).  Inner loops
       run along K, nj, or a unit's rows; K is a constant in the common widths' copies. */
    #define LMMFAST_LEVEL(NAME, ATTR, KK)                                               \
    ATTR static void NAME(const double *restrict z1, const double *restrict R,         \
        int64_t nj, int64_t k, double *restrict g, double *restrict gt,                 \
        double *restrict m, double *restrict v, int64_t nr,                             \
        const int64_t *restrict uprow, const int64_t *restrict upos,                    \
        const int64_t *restrict soff, const int64_t *restrict uk, int64_t nu,           \
        const double *restrict s, const double *restrict xy, int64_t nxy,               \
        double *restrict wt, double *restrict xyacc, int64_t D, int64_t nz)             \
    {                                                                                   \
        const int64_t K = (KK);                                                         \
        int64_t i, a, b, c, u;                                                          \
        double *restrict vx = v + (nr - nxy) * K;                                       \
        (void)k;                                                                        \
        for (i = 0; i < nj; i++) {                                                      \
            double *restrict gi = g + i * K;                                            \
            for (c = 0; c < K; c++) gi[c] = 0.0;                                        \
            for (a = 0; a < K; a++) {                                                   \
                double x = z1[i * K + a];                                               \
                for (c = 0; c < K; c++) gi[c] += x * R[a * K + c];                      \
            }                                                                           \
            for (c = 0; c < K; c++) gt[c * nj + i] = gi[c];                             \
        }                                                                               \
        for (i = 0; i < nj; i++) {                /* its lower triangle */              \
            double *restrict mi = m + i * nj;                                           \
            for (b = 0; b <= i; b++) mi[b] = 0.0;                                       \
            for (c = 0; c < K; c++) {                                                   \
                double x = g[i * K + c];                                                \
                const double *restrict gc = gt + c * nj;                                \
                for (b = 0; b <= i; b++) mi[b] += x * gc[b];                            \
            }                                                                           \
        }                                                                               \
        for (a = 0; a < nr * K; a++) v[a] = 0.0;                                        \
        for (i = 0; i < nj; i++) {                                                      \
            const double *restrict gi = g + i * K;                                      \
            const double *restrict xyi = xy + i * nxy;                                  \
            for (u = 0; u < nu; u++) {                                                  \
                const double *restrict su = s + soff[i * nu + u];                       \
                double *restrict row = v + uprow[i * nu + u] * K;                       \
                for (a = 0; a < uk[u]; a++) {                                           \
                    double x = su[a];                                                   \
                    for (c = 0; c < K; c++) row[a * K + c] += x * gi[c];                \
                }                                                                       \
            }                                                                           \
            for (a = 0; a < nxy; a++) {                                                 \
                double x = xyi[a];                                                      \
                for (c = 0; c < K; c++) vx[a * K + c] += x * gi[c];                     \
            }                                                                           \
        }                                                                               \
        for (a = 0; a < nxy; a++) {                                                     \
            double *restrict wa = wt + a * nj;                                          \
            for (b = 0; b < nj; b++) wa[b] = 0.0;                                       \
            for (c = 0; c < K; c++) {                                                   \
                double x = vx[a * K + c];                                               \
                const double *restrict gc = gt + c * nj;                                \
                for (b = 0; b < nj; b++) wa[b] += x * gc[b];                            \
            }                                                                           \
        }                                                                               \
        for (i = 0; i < nj; i++) {                                                      \
            for (u = 0; u < nu; u++) {                                                  \
                const double *restrict su = s + soff[i * nu + u];                       \
                int64_t pu = upos[i * nu + u], ku = uk[u];                              \
                for (a = 0; a < nxy; a++) {                                             \
                    double x = wt[a * nj + i];                                          \
                    double *restrict ra = xyacc + a * D + pu;                           \
                    for (b = 0; b < ku; b++) ra[b] -= x * su[b];                        \
                }                                                                       \
            }                                                                           \
        }                                                                               \
        for (a = 0; a < nxy; a++) {                                                     \
            double *restrict ra = xyacc + a * D + nz;                                   \
            for (i = 0; i < nj; i++) {                                                  \
                double x = wt[a * nj + i];                                              \
                const double *restrict xyi = xy + i * nxy;                              \
                for (b = 0; b <= a; b++) ra[b] -= x * xyi[b];                           \
            }                                                                           \
        }                                                                               \
    }

    LMMFAST_LEVEL(lmmfast_level_base, , k)
    LMMFAST_LEVEL(lmmfast_level8_base, , 8)
    LMMFAST_LEVEL(lmmfast_level4_base, , 4)
    #ifdef LMMFAST_HAVE_AVX2_CLONE
    LMMFAST_LEVEL(lmmfast_level_avx2, LMMFAST_AVX2, k)
    LMMFAST_LEVEL(lmmfast_level8_avx2, LMMFAST_AVX2, 8)
    LMMFAST_LEVEL(lmmfast_level4_avx2, LMMFAST_AVX2, 4)
    #endif

    /* tests: 0 takes the baseline copies whatever the CPU, 1 the CPU's best; returns
       whether AVX2 copies run now */
    static int lmmfast_set_avx2(int on)
    {
    #ifdef LMMFAST_HAVE_AVX2_CLONE
        lmmfast_has_avx2 = on ? -1 : 0;
        return lmmfast_avx2();
    #else
        (void)on;
        return 0;
    #endif
    }

    static void lmmfast_level(const double *z1, const double *R, int64_t nj, int64_t k,
        double *g, double *gt, double *m, double *v, int64_t nr, const int64_t *uprow,
        const int64_t *upos, const int64_t *soff, const int64_t *uk, int64_t nu,
        const double *s, const double *xy, int64_t nxy, double *wt, double *xyacc,
        int64_t D, int64_t nz)
    {
    #ifdef LMMFAST_HAVE_AVX2_CLONE
        if (lmmfast_avx2()) {
            (k == 8 ? lmmfast_level8_avx2 : k == 4 ? lmmfast_level4_avx2 : lmmfast_level_avx2)(
                z1, R, nj, k, g, gt, m, v, nr, uprow, upos, soff, uk, nu, s, xy, nxy, wt,
                xyacc, D, nz);
            return;
        }
    #endif
        (k == 8 ? lmmfast_level8_base : k == 4 ? lmmfast_level4_base : lmmfast_level_base)(
            z1, R, nj, k, g, gt, m, v, nr, uprow, upos, soff, uk, nu, s, xy, nxy, wt, xyacc,
            D, nz);
    }
    """
    int set_avx2 "lmmfast_set_avx2" (int on) noexcept nogil
    void level_kernel "lmmfast_level" (
        const double* z1, const double* R, cnp.int64_t nj, cnp.int64_t k, double* g,
        double* gt, double* m, double* v, cnp.int64_t nr, const cnp.int64_t* uprow,
        const cnp.int64_t* upos, const cnp.int64_t* soff, const cnp.int64_t* uk,
        cnp.int64_t nu, const double* s, const double* xy, cnp.int64_t nxy, double* wt,
        double* xyacc, cnp.int64_t D, cnp.int64_t nz) noexcept nogil
    void block_pairs "lmmfast_block_pairs" (
        double* acc, const cnp.int64_t* pair, cnp.int64_t t0, cnp.int64_t t1, const double* m,
        const double* s, cnp.int64_t ka, cnp.int64_t kb) noexcept nogil


def _vector_copies(bint avx2) -> bool:
    """Tests: take the AVX2 copies of the 8 × 8 and per-level kernels where the CPU has
    AVX2 (``True``, the default) or the baseline ones (``False``); whether AVX2 runs now."""
    return bool(set_avx2(avx2))


cdef inline void unit_transform(const ObsForm* ob, const double* rscale,
                                const cnp.int64_t* rtoff, const double* Tflat) noexcept nogil:
    """s <- Λ_t' z for every observation's unit: rscale z (k_t = 1) or T_t' z (T_t lower
    triangular, row-major: (T'z)_a = Σ_{b >= a} T[b, a] z_b), at its offset ``soff``."""
    cdef Py_ssize_t o, u, a, k, pos
    cdef const double* z
    cdef double* s
    for o in range(ob.n):
        for u in range(ob.nu):
            pos = ob.upos[o * ob.nu + u]
            k = ob.uk[u]
            z = ob.uz + o * ob.zw + ob.uzoff[u]
            s = ob.s + ob.soff[o * ob.nu + u]
            if k == 1:
                s[0] = rscale[pos] * z[0]
            else:
                for a in range(k):
                    s[a] = z[a]
                rows_tmul(s, 1, 1, Tflat + rtoff[pos], k)      # a k × 1 column: T' z


cdef int level_part(Py_ssize_t j, const double* A11, Py_ssize_t k1, const double* T1,
                    const cnp.int64_t* indptr, Py_ssize_t D, Py_ssize_t nz, double* L11,
                    double* L21, const ObsForm* ob, double* scratch) noexcept nogil:
    """Level j of term 1 (see :func:`obs_update`): L11_j, G_j, its Gram matrix, the panel
    and the X/y rows' share, subtracted into ``scratch``'s (nxy × D) X/y rows (each thread
    its own: levels run in parallel).  0, or -1 when L11_j fails."""
    cdef Py_ssize_t nu = ob.nu, nxy = ob.nxy, o0
    cdef double* rb = scratch
    cdef double* g = rb + 2 * k1 * k1 + k1
    cdef double* wt = g + 2 * ob.nmax * k1
    cdef double* xyacc = wt + nxy * ob.nmax
    # ---- L11[j] = chol(T1' A11[j] T1 + I); R = T1 L11[j]^{-T} (in rb)
    if level_factor(A11 + j * k1 * k1, T1, k1, L11 + j * k1 * k1, rb, rb + k1 * k1) != 0:
        return -1
    o0 = ob.optr[j]
    level_kernel(ob.z1 + o0 * k1, rb, ob.optr[j + 1] - o0, k1, g, g + ob.nmax * k1,
                 ob.gram + ob.mbase[j], L21 + indptr[j] * k1, indptr[j + 1] - indptr[j],
                 ob.uprow + o0 * nu, ob.upos + o0 * nu, ob.soff + o0 * nu, ob.uk, nu, ob.s,
                 ob.xy + o0 * nxy, nxy, wt, xyacc, D, nz)
    return 0


cdef void block_part(Py_ssize_t bk, Py_ssize_t D, double* L22, const ObsForm* ob,
                     double* acc) noexcept nogil:
    """Random-effects block ``bk`` of the downdate (see :func:`obs_update`)."""
    cdef Py_ssize_t pu = ob.bpos[2 * bk], c = ob.bpos[2 * bk + 1], a, b
    cdef Py_ssize_t ku = ob.uk_at[pu], kb = ob.uk_at[c]
    cdef double* row
    block_pairs(acc, ob.pair, ob.bptr[bk], ob.bptr[bk + 1], ob.gram, ob.s, ku, kb)
    if pu > c:
        for a in range(ku):
            row = L22 + (pu + a) * D + c
            for b in range(kb):
                row[b] -= acc[a * kb + b]
    else:
        for a in range(ku):
            row = L22 + (pu + a) * D + c
            for b in range(a + 1):
                row[b] -= acc[a * kb + b]


cdef int obs_update(const double* A11, Py_ssize_t m1, Py_ssize_t k1, const double* T1,
                    const cnp.int64_t* indptr, Py_ssize_t D, Py_ssize_t nz,
                    const double* rscale, const cnp.int64_t* rtoff, const double* Tflat,
                    double* L11, double* L21, double* L22, const ObsForm* ob,
                    int nthreads) noexcept nogil:
    """For every level j of term 1: L11_j = chol(T1' A11_j T1 + I), the panel V_j and the
    downdate L22 -= V_j V_j' (lower triangle), all from the level's observations, the
    levels and then the blocks shared among ``nthreads`` threads (at most
    ``ob.max_threads``).

    L22 must hold Λr' A22 Λr + I on entry (``update_blocked_core`` writes it).  Returns
    0, or -1 when a diagonal block is not positive definite.  Per level
    (:func:`level_part`): g_i = R_j' z1_i, its Gram matrix (g_i · g_i') into ``gram``
    (row-major n_j × n_j at ``mbase[j]``), the panel V_j = Σ_i s_i g_i', and the X/y rows
    per observation: w_i = V_j[X/y] g_i (= Σ_i' (g_i · g_i') xy_i'), L22[X/y, unit u of i]
    -= w_i s_iu', L22[X/y, X/y] -= w_i xy_i' (lower triangle; each thread sums its own
    and they are added at the end).  Then the random-effects rows block by block
    (:func:`block_part`), each summed over its pairs, Σ (g_i · g_i') s_iu s_i'u'', in a
    small accumulator and subtracted once (on a diagonal block both orders of each pair
    are listed, and its lower triangle is taken)."""
    cdef Py_ssize_t nxy = ob.nxy, j, a, c, t, bk
    cdef int nt = max(1, min(nthreads, ob.max_threads)), bad = 0
    cdef double* xyacc
    cdef Py_ssize_t off_xy = 2 * k1 * k1 + k1 + 2 * ob.nmax * k1 + nxy * ob.nmax
    cdef Py_ssize_t off_acc = off_xy + nxy * D      # a block's accumulator
    unit_transform(ob, rscale, rtoff, Tflat)
    for t in range(nt):
        xyacc = ob.thr + t * ob.thr_stride + off_xy
        for a in range(nxy * D):
            xyacc[a] = 0.0
    if nt > 1:
        # one parallel region (the threads woken once): the levels, then the blocks (their
        # Gram entries are the levels'; prange ends with a barrier)
        with parallel(num_threads=nt):
            for j in prange(m1, schedule="dynamic", chunksize=1):
                bad += level_part(j, A11, k1, T1, indptr, D, nz, L11, L21, ob,
                                  ob.thr + threadid() * ob.thr_stride) != 0
            for bk in prange(ob.nblk, schedule="dynamic", chunksize=8):
                block_part(bk, D, L22, ob, ob.thr + threadid() * ob.thr_stride + off_acc)
    else:
        for j in range(m1):
            if level_part(j, A11, k1, T1, indptr, D, nz, L11, L21, ob, ob.thr) != 0:
                return -1
    if bad:
        return -1
    for t in range(nt):                 # the X/y rows' sums (lower triangle)
        xyacc = ob.thr + t * ob.thr_stride + off_xy
        for a in range(nxy):
            for c in range(nz + a + 1):
                L22[(nz + a) * D + c] += xyacc[a * D + c]
    if nt == 1:
        for bk in range(ob.nblk):
            block_part(bk, D, L22, ob, ob.thr + off_acc)
    return 0

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
kb07 2.6 M multiply-adds an evaluation against 15.7 M for the batched dsyrk.  The factor
is the same one the panel path gives; ``blocks.BlockedCrossprod`` chooses the form by
predicted cost (:func:`lmmfast.obsform.obs_form_pays`).

An objective needs only L11 and L22: the panels' rows of the units (Σ_i s_i g_i') are
formed by a second pass, :func:`obs_panels`, when the gradient, the solutions or the
information read them.  Λr' A22 Λr is formed only on the unit blocks where A22 is not
zero or no pair lands (``ObsData.lam_plan``): the item × item blocks of a crossed design
are the pairs' alone.  The kernels hold their sums in registers (blocks of rows by
vectors), in copies for SSE2, AVX2 with FMA and AVX-512 picked at run time.
"""
cimport numpy as cnp
from cython.parallel cimport parallel, prange, threadid
from lmmfast._dense cimport lam_block, level_factor, right_factor

cnp.import_array()

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    /* The kernels come in copies for the vector widths a CPU offers, picked at run time
       (lmmfast_isa): a baseline one (vectors of two doubles, SSE2), one for AVX2 with FMA
       (four) and, for the 8-wide terms of 2 x 2 x 2 designs, one for AVX-512 (eight).
       The sums are held in GCC vector types; a "vector" of one double (VT = double) is
       the general copy for any width. */
    #if defined(__GNUC__)
    typedef double lmmfast_v8 __attribute__((vector_size(64)));
    typedef double lmmfast_v8u __attribute__((vector_size(64), aligned(8), may_alias));
    typedef double lmmfast_v4 __attribute__((vector_size(32)));
    typedef double lmmfast_v4u __attribute__((vector_size(32), aligned(8), may_alias));
    typedef double lmmfast_v2 __attribute__((vector_size(16)));
    typedef double lmmfast_v2u __attribute__((vector_size(16), aligned(8), may_alias));
    #endif
    #define LMMFAST_LD(VTU, p) (*(const VTU *)(p))
    #define LMMFAST_ST(VTU, p, x) (*(VTU *)(p) = (x))
    #if defined(__GNUC__)

    /* acc (ka x kb, row-major) = sum over pairs t0..t1-1 of m[p0] s[p1 ..] s[p2 ..]'
       (pair p: the Gram entry's index, the offsets of the two units' rows of s), RA rows
       of acc at a time in RA * KB / W vector sums (at most 8: no sum leaves the
       registers), each pair's second row scaled once by its Gram entry. */
    #define LMMFAST_PAIRS(NAME, ATTR, VT, VTU, W, KA, KB, RA)                          \
    ATTR static void NAME(double *restrict acc, const int64_t *restrict pair,          \
                          int64_t t0, int64_t t1, const double *restrict m,            \
                          const double *restrict s)                                    \
    {                                                                                   \
        enum { NB = (KB) / (W) };                                                       \
        int64_t t, a, b, a0;                                                            \
        for (a0 = 0; a0 < (KA); a0 += (RA)) {                                           \
            VT r[(RA) * NB];                                                            \
            for (a = 0; a < (RA) * NB; a++) r[a] = (VT){0};                             \
            for (t = t0; t < t1; t++) {                                                 \
                const int64_t *p = pair + 3 * t;                                        \
                const double *su = s + p[1] + a0;                                       \
                const double x = m[p[0]];                                               \
                VT xs[NB];                                                              \
                for (b = 0; b < NB; b++) xs[b] = x * LMMFAST_LD(VTU, s + p[2] + (W) * b); \
                for (a = 0; a < (RA); a++)                                              \
                    for (b = 0; b < NB; b++) r[a * NB + b] += su[a] * xs[b];            \
            }                                                                           \
            for (a = 0; a < (RA); a++)                                                  \
                for (b = 0; b < NB; b++)                                                \
                    LMMFAST_ST(VTU, acc + (a0 + a) * (KB) + (W) * b, r[a * NB + b]);    \
        }                                                                               \
    }

    LMMFAST_PAIRS(lmmfast_pairs88_base, , lmmfast_v2, lmmfast_v2u, 2, 8, 8, 2)
    LMMFAST_PAIRS(lmmfast_pairs84_base, , lmmfast_v2, lmmfast_v2u, 2, 8, 4, 4)
    LMMFAST_PAIRS(lmmfast_pairs48_base, , lmmfast_v2, lmmfast_v2u, 2, 4, 8, 2)
    LMMFAST_PAIRS(lmmfast_pairs44_base, , lmmfast_v2, lmmfast_v2u, 2, 4, 4, 4)

    #if defined(__x86_64__) || defined(__i386__)
    #define LMMFAST_HAVE_CLONES 1
    #define LMMFAST_AVX2 __attribute__((target("avx2,fma")))
    #define LMMFAST_AVX512 __attribute__((target("avx512f,avx2,fma")))
    LMMFAST_PAIRS(lmmfast_pairs88_avx2, LMMFAST_AVX2, lmmfast_v4, lmmfast_v4u, 4, 8, 8, 4)
    LMMFAST_PAIRS(lmmfast_pairs84_avx2, LMMFAST_AVX2, lmmfast_v4, lmmfast_v4u, 4, 8, 4, 8)
    LMMFAST_PAIRS(lmmfast_pairs48_avx2, LMMFAST_AVX2, lmmfast_v4, lmmfast_v4u, 4, 4, 8, 4)
    LMMFAST_PAIRS(lmmfast_pairs44_avx2, LMMFAST_AVX2, lmmfast_v4, lmmfast_v4u, 4, 4, 4, 4)
    LMMFAST_PAIRS(lmmfast_pairs88_avx512, LMMFAST_AVX512, lmmfast_v8, lmmfast_v8u, 8, 8, 8, 8)
    LMMFAST_PAIRS(lmmfast_pairs48_avx512, LMMFAST_AVX512, lmmfast_v8, lmmfast_v8u, 8, 4, 8, 4)
    #endif
    #endif

    /* Which copies run: 0 baseline, 1 AVX2 with FMA, 2 AVX-512 (lmmfast_isa_cap caps the
       CPU's best: the tests' hook). */
    static int lmmfast_isa_now = -1, lmmfast_isa_cap = 2;
    static int lmmfast_isa(void)
    {
        if (lmmfast_isa_now < 0) {
            int best = 0;
    #ifdef LMMFAST_HAVE_CLONES
            __builtin_cpu_init();
            if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
                best = __builtin_cpu_supports("avx512f") ? 2 : 1;
    #endif
            lmmfast_isa_now = best < lmmfast_isa_cap ? best : lmmfast_isa_cap;
        }
        return lmmfast_isa_now;
    }
    static int lmmfast_set_isa(int cap)
    {
        lmmfast_isa_cap = cap;
        lmmfast_isa_now = -1;
        return lmmfast_isa();
    }

    typedef void (*lmmfast_pairs_fn)(double *, const int64_t *, int64_t, int64_t,
                                     const double *, const double *);

    static void lmmfast_block_pairs(double *restrict acc, const int64_t *restrict pair,
                                    int64_t t0, int64_t t1, const double *restrict m,
                                    const double *restrict s, int64_t ka, int64_t kb)
    {
        int64_t t, a, b;
    #if defined(__GNUC__)
        if ((ka == 4 || ka == 8) && (kb == 4 || kb == 8)) {
            int which = (ka == 8) * 2 + (kb == 8), isa = lmmfast_isa();
            static const lmmfast_pairs_fn base[4] = {lmmfast_pairs44_base, lmmfast_pairs48_base,
                                                     lmmfast_pairs84_base, lmmfast_pairs88_base};
    #ifdef LMMFAST_HAVE_CLONES
            static const lmmfast_pairs_fn avx2[4] = {lmmfast_pairs44_avx2, lmmfast_pairs48_avx2,
                                                     lmmfast_pairs84_avx2, lmmfast_pairs88_avx2};
            static const lmmfast_pairs_fn avx512[4] = {lmmfast_pairs44_avx2, lmmfast_pairs48_avx512,
                                                       lmmfast_pairs84_avx2, lmmfast_pairs88_avx512};
            if (isa > 0) {
                (isa == 2 ? avx512 : avx2)[which](acc, pair, t0, t1, m, s);
                return;
            }
    #endif
            (void)isa;
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

    /* G = Z1 R (row i: g_i' = z_i' R; row-major nj x K at g) and, unless gt is NULL, G'
       (K x ldt at gt) */
    #define LMMFAST_G_ROWS(VT, VTU, W, KK)                                              \
        for (i = 0; i < nj; i++) {                                                      \
            VT t[(KK) / (W)];                                                           \
            for (b = 0; b < NV; b++) t[b] = (VT){0};                                    \
            for (a = 0; a < K; a++) {                                                   \
                double x = z1[i * K + a];                                               \
                for (b = 0; b < NV; b++) t[b] += x * LMMFAST_LD(VTU, R + a * K + (W) * b); \
            }                                                                           \
            for (b = 0; b < NV; b++) LMMFAST_ST(VTU, g + i * K + (W) * b, t[b]);        \
            if (gt)                                                                     \
                for (c = 0; c < K; c++) gt[c * ldt + i] = g[i * K + c];                 \
        }

    /* The units' rows of the panel V = sum_i s_i g_i' (v: nr x K, its last nxy rows, X and
       y's, left as they are) */
    #define LMMFAST_PANEL_ROWS(VT, VTU, W, KK)                                          \
        memset(v, 0, (size_t)((nr - nxy) * K) * sizeof(double));                        \
        for (i = 0; i < nj; i++) {                                                      \
            VT gv[(KK) / (W)];                                                          \
            for (b = 0; b < NV; b++) gv[b] = LMMFAST_LD(VTU, g + i * K + (W) * b);      \
            for (u = 0; u < nu; u++) {                                                  \
                const double *restrict su = s + soff[i * nu + u];                       \
                double *restrict row = v + uprow[i * nu + u] * K;                       \
                for (a = 0; a < uk[u]; a++) {                                           \
                    double x = su[a];                                                   \
                    for (b = 0; b < NV; b++)                                            \
                        LMMFAST_ST(VTU, row + a * K + (W) * b,                          \
                            LMMFAST_LD(VTU, row + a * K + (W) * b) + x * gv[b]);        \
                }                                                                       \
            }                                                                           \
        }

    /* One level of term 1 from its nj observations (see level_part), K = KK columns
       (term 1's width; W divides it), R = T1 L11^{-T} (K x K):
         s_iu = T_u' z_iu for each observation's units (T_u lower triangular: its upper
           triangle is zero in Tflat; a scalar unit's row scale);
         G = Z1 R (nj x K, row-major at g; its rows padded to a multiple of 4 with zeros)
           and G' (K x ldt at gt; columns nj..ldt-1 zero);
         the Gram matrix G G' (row-major nj x nj at m: its lower triangle, and above it
           up to the end of the vector that holds the diagonal of a block of 4 rows);
         the panel's X/y rows V_xy = XY' G (v: nr x K, the X/y rows last; formed in vx,
           copied; its units' rows, V = sum_i s_i g_i', are lmmfast_panel's);
         W' = V_xy G' (nxy x ldt at wt);
         the X/y rows' share, subtracted into xyacc (nxy rows of D): [X/y, unit u of i]
           -= w_i s_iu', [X/y, X/y] -= V_xy V_xy' (= W' XY; lower triangle).
       Rows in blocks of RB (the X/y rows padded with zeros in vx and wt). */
    #define LMMFAST_LEVEL(NAME, ATTR, VT, VTU, W, KK, RB)                               \
    ATTR static void NAME(const double *restrict z1, const double *restrict R,         \
        int64_t nj, int64_t k, double *restrict g, double *restrict gt, int64_t ldt,    \
        double *restrict m, double *restrict v, int64_t nr,                             \
        const int64_t *restrict uprow, const int64_t *restrict upos,                    \
        const int64_t *restrict soff, const int64_t *restrict uk, int64_t nu,           \
        const int64_t *restrict uzoff, const double *restrict uz, int64_t zw,           \
        const double *restrict rscale, const int64_t *restrict rtoff,                   \
        const double *restrict Tflat, double *restrict s,                               \
        const double *restrict xy, int64_t nxy, double *restrict vx,                    \
        double *restrict wt, double *restrict xyacc, int64_t D, int64_t nz)             \
    {                                                                                   \
        const int64_t K = (KK), NV = (KK) / (W);                                        \
        const int64_t nxp = (nxy + (RB) - 1) / (RB) * (RB), njp = (nj + 3) & ~(int64_t)3; \
        int64_t i, a, b, c, u, i0, b0, a0, r;                                           \
        (void)k; (void)NV;                                                              \
        for (i = 0; i < nj; i++)                                                        \
            for (u = 0; u < nu; u++) {                                                  \
                int64_t pos = upos[i * nu + u], ku = uk[u];                             \
                const double *restrict z = uz + i * zw + uzoff[u];                      \
                double *restrict so = s + soff[i * nu + u];                             \
                if (ku == 1) {                                                          \
                    so[0] = rscale[pos] * z[0];                                         \
                    continue;                                                           \
                }                                                                       \
                const double *restrict T = Tflat + rtoff[pos];                          \
                for (a0 = 0; a0 + (W) <= ku; a0 += (W)) {     /* four chains of sums */ \
                    VT t0 = (VT){0}, t1 = (VT){0}, t2 = (VT){0}, t3 = (VT){0};          \
                    const double *restrict Tc = T + a0;                                 \
                    for (b = a0; b + 3 < ku; b += 4) {                                  \
                        t0 += z[b] * LMMFAST_LD(VTU, Tc + b * ku);                      \
                        t1 += z[b + 1] * LMMFAST_LD(VTU, Tc + (b + 1) * ku);            \
                        t2 += z[b + 2] * LMMFAST_LD(VTU, Tc + (b + 2) * ku);            \
                        t3 += z[b + 3] * LMMFAST_LD(VTU, Tc + (b + 3) * ku);            \
                    }                                                                   \
                    for (; b < ku; b++) t0 += z[b] * LMMFAST_LD(VTU, Tc + b * ku);      \
                    LMMFAST_ST(VTU, so + a0, (t0 + t1) + (t2 + t3));                    \
                }                                                                       \
                for (; a0 < ku; a0++) {                                                 \
                    double t = 0.0;                                                     \
                    for (b = a0; b < ku; b++) t += z[b] * T[b * ku + a0];               \
                    so[a0] = t;                                                         \
                }                                                                       \
            }                                                                           \
        LMMFAST_G_ROWS(VT, VTU, W, KK);                                                 \
        for (a = nj * K; a < njp * K; a++) g[a] = 0.0;                                  \
        for (c = 0; c < K; c++)                                                         \
            for (i = nj; i < ldt; i++) gt[c * ldt + i] = 0.0;                           \
        for (i0 = 0; i0 < nj; i0 += 4) {          /* G G', 4 rows at a time */          \
            int64_t ni = nj - i0 < 4 ? nj - i0 : 4;                                     \
            int64_t ncol = (i0 + ni + (W) - 1) / (W) * (W);   /* whole vectors where */ \
            if (ncol > nj) ncol = nj;                         /* the rows have them  */ \
            const double *restrict gi = g + i0 * K;                                     \
            for (b0 = 0; b0 + (W) <= ncol; b0 += (W)) {                                 \
                VT t0 = (VT){0}, t1 = (VT){0}, t2 = (VT){0}, t3 = (VT){0};              \
                for (c = 0; c < K; c++) {                                               \
                    VT x = LMMFAST_LD(VTU, gt + c * ldt + b0);                          \
                    t0 += gi[c] * x;                                                    \
                    t1 += gi[K + c] * x;                                                \
                    t2 += gi[2 * K + c] * x;                                            \
                    t3 += gi[3 * K + c] * x;                                            \
                }                                                                       \
                LMMFAST_ST(VTU, m + i0 * nj + b0, t0);                                  \
                if (ni > 1) LMMFAST_ST(VTU, m + (i0 + 1) * nj + b0, t1);                 \
                if (ni > 2) LMMFAST_ST(VTU, m + (i0 + 2) * nj + b0, t2);                 \
                if (ni > 3) LMMFAST_ST(VTU, m + (i0 + 3) * nj + b0, t3);                 \
            }                                                                           \
            for (; b0 < ncol; b0++)                                                     \
                for (r = 0; r < ni; r++) {                                              \
                    double t = 0.0;                                                     \
                    for (c = 0; c < K; c++) t += gi[r * K + c] * gt[c * ldt + b0];      \
                    m[(i0 + r) * nj + b0] = t;                                          \
                }                                                                       \
        }                                                                               \
        for (a0 = 0; a0 < nxp; a0 += (RB)) {      /* V_xy = XY' G, RB rows at a time */ \
            VT t[(RB) * ((KK) / (W))];                                                  \
            int64_t na = nxy - a0 < (RB) ? nxy - a0 : (RB);                             \
            for (b = 0; b < (RB) * NV; b++) t[b] = (VT){0};                             \
            if (na == (RB)) {                                                           \
                for (i = 0; i < nj; i++) {                                              \
                    const double *restrict xi = xy + i * nxy + a0;                      \
                    for (b = 0; b < NV; b++) {                                          \
                        VT x = LMMFAST_LD(VTU, g + i * K + (W) * b);                    \
                        for (r = 0; r < (RB); r++) t[r * NV + b] += xi[r] * x;          \
                    }                                                                   \
                }                                                                       \
            } else {                                                                    \
                for (i = 0; i < nj; i++) {                                              \
                    const double *restrict xi = xy + i * nxy + a0;                      \
                    for (b = 0; b < NV; b++) {                                          \
                        VT x = LMMFAST_LD(VTU, g + i * K + (W) * b);                    \
                        for (r = 0; r < na; r++) t[r * NV + b] += xi[r] * x;            \
                    }                                                                   \
                }                                                                       \
            }                                                                           \
            for (r = 0; r < (RB); r++)                                                  \
                for (b = 0; b < NV; b++)                                                \
                    LMMFAST_ST(VTU, vx + (a0 + r) * K + (W) * b, t[r * NV + b]);         \
        }                                                                               \
        memcpy(v + (nr - nxy) * K, vx, (size_t)(nxy * K) * sizeof(double));             \
        for (a0 = 0; a0 < nxp; a0 += (RB))        /* W' = V_xy G' */                    \
            for (b0 = 0; b0 < nj; b0 += (W)) {                                          \
                VT t[(RB)];                                                             \
                const double *restrict va = vx + a0 * K;                                \
                for (r = 0; r < (RB); r++) t[r] = (VT){0};                              \
                for (c = 0; c < K; c++) {                                               \
                    VT x = LMMFAST_LD(VTU, gt + c * ldt + b0);                          \
                    for (r = 0; r < (RB); r++) t[r] += va[r * K + c] * x;               \
                }                                                                       \
                for (r = 0; r < (RB); r++) LMMFAST_ST(VTU, wt + (a0 + r) * ldt + b0, t[r]); \
            }                                                                           \
        for (i = 0; i < nj; i++)                  /* [X/y, units] -= w_i s_iu' */       \
            for (u = 0; u < nu; u++) {                                                  \
                const double *restrict su = s + soff[i * nu + u];                       \
                int64_t pu = upos[i * nu + u], ku = uk[u];                              \
                for (a = 0; a < nxy; a++) {                                             \
                    double x = wt[a * ldt + i];                                         \
                    double *restrict ra = xyacc + a * D + pu;                           \
                    for (b = 0; b + (W) <= ku; b += (W))                                \
                        LMMFAST_ST(VTU, ra + b,                                         \
                                   LMMFAST_LD(VTU, ra + b) - x * LMMFAST_LD(VTU, su + b)); \
                    for (; b < ku; b++) ra[b] -= x * su[b];                             \
                }                                                                       \
            }                                                                           \
        for (a = 0; a < nxy; a++) {               /* [X/y, X/y] -= V_xy V_xy' */        \
            double *restrict ra = xyacc + a * D + nz;                                   \
            for (b = 0; b <= a; b++) {                                                  \
                double t = 0.0;                                                         \
                for (c = 0; c < K; c++) t += vx[a * K + c] * vx[b * K + c];             \
                ra[b] -= t;                                                             \
            }                                                                           \
        }                                                                               \
    }

    LMMFAST_LEVEL(lmmfast_level_base, , double, double, 1, k, 1)
    #if defined(__GNUC__)
    LMMFAST_LEVEL(lmmfast_level8_base, , lmmfast_v2, lmmfast_v2u, 2, 8, 2)
    LMMFAST_LEVEL(lmmfast_level4_base, , lmmfast_v2, lmmfast_v2u, 2, 4, 4)
    #ifdef LMMFAST_HAVE_CLONES
    LMMFAST_LEVEL(lmmfast_level_avx2, LMMFAST_AVX2, double, double, 1, k, 1)
    LMMFAST_LEVEL(lmmfast_level8_avx2, LMMFAST_AVX2, lmmfast_v4, lmmfast_v4u, 4, 8, 4)
    LMMFAST_LEVEL(lmmfast_level4_avx2, LMMFAST_AVX2, lmmfast_v4, lmmfast_v4u, 4, 4, 4)
    LMMFAST_LEVEL(lmmfast_level8_avx512, LMMFAST_AVX512, lmmfast_v8, lmmfast_v8u, 8, 8, 4)
    #endif
    #endif

    /* One level's panel, the units' rows (see obs_panels): G = Z1 R, then V = sum_i
       s_i g_i' (s as the level kernel left it). */
    #define LMMFAST_PANEL(NAME, ATTR, VT, VTU, W, KK)                                   \
    ATTR static void NAME(const double *restrict z1, const double *restrict R,         \
        int64_t nj, int64_t k, double *restrict g, double *restrict v, int64_t nr,      \
        int64_t nxy, const int64_t *restrict uprow, const int64_t *restrict soff,       \
        const int64_t *restrict uk, int64_t nu, const double *restrict s)               \
    {                                                                                   \
        const int64_t K = (KK), NV = (KK) / (W), ldt = 0;                               \
        double *restrict gt = 0;                                                        \
        int64_t i, a, b, c, u;                                                          \
        (void)k; (void)NV; (void)ldt; (void)c;                                          \
        LMMFAST_G_ROWS(VT, VTU, W, KK);                                                 \
        LMMFAST_PANEL_ROWS(VT, VTU, W, KK);                                             \
    }

    LMMFAST_PANEL(lmmfast_panel_base, , double, double, 1, k)
    #if defined(__GNUC__)
    LMMFAST_PANEL(lmmfast_panel8_base, , lmmfast_v2, lmmfast_v2u, 2, 8)
    LMMFAST_PANEL(lmmfast_panel4_base, , lmmfast_v2, lmmfast_v2u, 2, 4)
    #ifdef LMMFAST_HAVE_CLONES
    LMMFAST_PANEL(lmmfast_panel8_avx2, LMMFAST_AVX2, lmmfast_v4, lmmfast_v4u, 4, 8)
    LMMFAST_PANEL(lmmfast_panel4_avx2, LMMFAST_AVX2, lmmfast_v4, lmmfast_v4u, 4, 4)
    LMMFAST_PANEL(lmmfast_panel8_avx512, LMMFAST_AVX512, lmmfast_v8, lmmfast_v8u, 8, 8)
    #endif
    #endif

    static void lmmfast_panel(const double *z1, const double *R, int64_t nj, int64_t k,
        double *g, double *v, int64_t nr, int64_t nxy, const int64_t *uprow,
        const int64_t *soff, const int64_t *uk, int64_t nu, const double *s)
    {
        void (*fn)(const double *, const double *, int64_t, int64_t, double *, double *,
                   int64_t, int64_t, const int64_t *, const int64_t *, const int64_t *,
                   int64_t, const double *) = lmmfast_panel_base;
    #if defined(__GNUC__)
        int isa = lmmfast_isa();
        if (k == 8) fn = lmmfast_panel8_base;
        else if (k == 4) fn = lmmfast_panel4_base;
    #ifdef LMMFAST_HAVE_CLONES
        if (isa == 2 && k == 8) fn = lmmfast_panel8_avx512;
        else if (isa >= 1 && k == 8) fn = lmmfast_panel8_avx2;
        else if (isa >= 1 && k == 4) fn = lmmfast_panel4_avx2;
    #endif
        (void)isa;
    #endif
        fn(z1, R, nj, k, g, v, nr, nxy, uprow, soff, uk, nu, s);
    }

    typedef void (*lmmfast_level_fn)(const double *, const double *, int64_t, int64_t,
        double *, double *, int64_t, double *, double *, int64_t, const int64_t *,
        const int64_t *, const int64_t *, const int64_t *, int64_t, const int64_t *,
        const double *, int64_t, const double *, const int64_t *, const double *, double *,
        const double *, int64_t, double *, double *, double *, int64_t, int64_t);

    static lmmfast_level_fn lmmfast_level_pick(int64_t k)
    {
    #if defined(__GNUC__)
        int isa = lmmfast_isa();
    #ifdef LMMFAST_HAVE_CLONES
        if (isa == 2 && k == 8) return lmmfast_level8_avx512;
        if (isa >= 1)
            return k == 8 ? lmmfast_level8_avx2 : k == 4 ? lmmfast_level4_avx2 : lmmfast_level_avx2;
    #endif
        (void)isa;
        return k == 8 ? lmmfast_level8_base : k == 4 ? lmmfast_level4_base : lmmfast_level_base;
    #else
        (void)k;
        return lmmfast_level_base;
    #endif
    }

    static void lmmfast_level(const double *z1, const double *R, int64_t nj, int64_t k,
        double *g, double *gt, int64_t ldt, double *m, double *v, int64_t nr,
        const int64_t *uprow, const int64_t *upos, const int64_t *soff, const int64_t *uk,
        int64_t nu, const int64_t *uzoff, const double *uz, int64_t zw,
        const double *rscale, const int64_t *rtoff, const double *Tflat, double *s,
        const double *xy, int64_t nxy, double *vx, double *wt, double *xyacc, int64_t D,
        int64_t nz)
    {
        lmmfast_level_pick(k)(z1, R, nj, k, g, gt, ldt, m, v, nr, uprow, upos, soff,
                              uk, nu, uzoff, uz, zw, rscale, rtoff, Tflat, s, xy, nxy, vx, wt,
                              xyacc, D, nz);
    }
    """
    int set_isa "lmmfast_set_isa" (int cap) noexcept nogil
    void level_kernel "lmmfast_level" (
        const double* z1, const double* R, cnp.int64_t nj, cnp.int64_t k, double* g,
        double* gt, cnp.int64_t ldt, double* m, double* v, cnp.int64_t nr,
        const cnp.int64_t* uprow, const cnp.int64_t* upos, const cnp.int64_t* soff,
        const cnp.int64_t* uk, cnp.int64_t nu, const cnp.int64_t* uzoff, const double* uz,
        cnp.int64_t zw, const double* rscale, const cnp.int64_t* rtoff, const double* Tflat,
        double* s, const double* xy, cnp.int64_t nxy, double* vx, double* wt, double* xyacc,
        cnp.int64_t D, cnp.int64_t nz) noexcept nogil
    void panel_kernel "lmmfast_panel" (
        const double* z1, const double* R, cnp.int64_t nj, cnp.int64_t k, double* g,
        double* v, cnp.int64_t nr, cnp.int64_t nxy, const cnp.int64_t* uprow,
        const cnp.int64_t* soff, const cnp.int64_t* uk, cnp.int64_t nu,
        const double* s) noexcept nogil
    void block_pairs "lmmfast_block_pairs" (
        double* acc, const cnp.int64_t* pair, cnp.int64_t t0, cnp.int64_t t1, const double* m,
        const double* s, cnp.int64_t ka, cnp.int64_t kb) noexcept nogil


def _vector_copies(int cap) -> int:
    """Tests: the kernels' copies to run, at most ``cap`` (0 the baseline ones, 1 AVX2
    with FMA, 2 AVX-512) and at most what the CPU has; returns the one that runs now."""
    return set_isa(cap)


cdef inline Py_ssize_t round_up(Py_ssize_t n, Py_ssize_t m) noexcept nogil:
    return (n + m - 1) // m * m


cdef void scratch_layout(Py_ssize_t k1, Py_ssize_t nmax, Py_ssize_t nxy, Py_ssize_t D,
                         Py_ssize_t kmax, Py_ssize_t* off) noexcept nogil:
    """Where the parts of one thread's scratch start (doubles), ``off[7]`` its size: R
    and L11^{-1} (2 k1² + k1), G (its rows padded to a multiple of 4), G' (k1 rows padded
    to a multiple of 8), V_xy and W' (rows padded to a multiple of 4), the X/y rows' sums
    (nxy × D), a block's accumulator (kmax²)."""
    off[0] = 0
    off[1] = off[0] + 2 * k1 * k1 + k1
    off[2] = off[1] + round_up(nmax, 4) * k1
    off[3] = off[2] + k1 * round_up(nmax, 8)
    off[4] = off[3] + round_up(nxy, 4) * k1
    off[5] = off[4] + round_up(nxy, 4) * round_up(nmax, 8)
    off[6] = off[5] + nxy * D
    off[7] = off[6] + kmax * kmax


def scratch_doubles(Py_ssize_t k1, Py_ssize_t nmax, Py_ssize_t nxy, Py_ssize_t D,
                    Py_ssize_t kmax) -> int:
    """Doubles of one thread's scratch (:func:`obs_update`)."""
    cdef Py_ssize_t off[8]
    scratch_layout(k1, nmax, nxy, D, kmax, off)
    return off[7]


cdef int level_part(Py_ssize_t j, const double* A11, Py_ssize_t k1, const double* T1,
                    const cnp.int64_t* indptr, Py_ssize_t D, Py_ssize_t nz,
                    const double* rscale, const cnp.int64_t* rtoff, const double* Tflat,
                    double* L11, double* L21, const ObsForm* ob, double* scratch,
                    const Py_ssize_t* off) noexcept nogil:
    """Level j of term 1 (see :func:`obs_update`): L11_j, its units' Λ_t' z, G_j, its Gram
    matrix, the panel's X/y rows and the X/y rows' share, subtracted into ``scratch``'s
    (nxy × D) X/y rows (each thread its own: levels run in parallel).  0, or -1 when
    L11_j fails."""
    cdef Py_ssize_t nu = ob.nu, nxy = ob.nxy, o0 = ob.optr[j], nj = ob.optr[j + 1] - o0
    cdef double* rb = scratch + off[0]
    # ---- L11[j] = chol(T1' A11[j] T1 + I); R = T1 L11[j]^{-T} (in rb)
    if level_factor(A11 + j * k1 * k1, T1, k1, L11 + j * k1 * k1, rb, rb + k1 * k1) != 0:
        return -1
    level_kernel(ob.z1 + o0 * k1, rb, nj, k1, scratch + off[1], scratch + off[2],
                 round_up(nj, 8), ob.gram + ob.mbase[j], L21 + indptr[j] * k1,
                 indptr[j + 1] - indptr[j], ob.uprow + o0 * nu, ob.upos + o0 * nu,
                 ob.soff + o0 * nu, ob.uk, nu, ob.uzoff, ob.uz + o0 * ob.zw, ob.zw, rscale,
                 rtoff, Tflat, ob.s, ob.xy + o0 * nxy, nxy, scratch + off[3],
                 scratch + off[4], scratch + off[5], D, nz)
    return 0


cdef void panel_part(Py_ssize_t j, Py_ssize_t k1, const double* T1, const double* L11,
                     const cnp.int64_t* indptr, double* L21, const ObsForm* ob,
                     double* scratch, const Py_ssize_t* off) noexcept nogil:
    """Level j's panel rows of the units (see :func:`obs_panels`)."""
    cdef Py_ssize_t o0 = ob.optr[j]
    cdef double* rb = scratch + off[0]
    right_factor(T1, L11 + j * k1 * k1, k1, rb, rb + k1 * k1)     # R = T1 L11[j]^{-T}
    panel_kernel(ob.z1 + o0 * k1, rb, ob.optr[j + 1] - o0, k1, scratch + off[1],
                 L21 + indptr[j] * k1, indptr[j + 1] - indptr[j], ob.nxy,
                 ob.uprow + o0 * ob.nu, ob.soff + o0 * ob.nu, ob.uk, ob.nu, ob.s)


cdef void obs_panels(Py_ssize_t m1, Py_ssize_t k1, const double* T1, const double* L11,
                     const cnp.int64_t* indptr, Py_ssize_t D, double* L21, const ObsForm* ob,
                     int nthreads) noexcept nogil:
    """The panels' rows of the units, V_j = Σ_i s_i g_i' for every level j of term 1,
    after :func:`obs_update` at the same θ (its L11, s and the panels' X/y rows): the
    objective needs none of them (only L11 and L22), the gradient, the solutions and the
    information do."""
    cdef Py_ssize_t j
    cdef int nt = max(1, min(nthreads, ob.max_threads))
    cdef Py_ssize_t off[8]
    scratch_layout(k1, ob.nmax, ob.nxy, D, 1, off)
    if nt > 1:
        with parallel(num_threads=nt):
            for j in prange(m1, schedule="dynamic", chunksize=1):
                panel_part(j, k1, T1, L11, indptr, L21, ob,
                           ob.thr + threadid() * ob.thr_stride, off)
    else:
        for j in range(m1):
            panel_part(j, k1, T1, L11, indptr, L21, ob, ob.thr, off)


cdef void lam_units(const double* A22, double* L22, Py_ssize_t D, Py_ssize_t nz,
                    const double* rscale, const cnp.int64_t* rk, const cnp.int64_t* rtoff,
                    const double* Tflat, double* tmp, const ObsForm* ob) noexcept nogil:
    """L22 <- Λr' A22 Λr + I on the unit blocks of ``ob.lam`` (the others are the pairs'
    alone: see ``ObsData.lam_plan``); ``tmp``: k_R k_C doubles for the widest units."""
    cdef Py_ssize_t e, r0, c0, kr, kc, a
    for e in range(ob.nlam):
        r0 = ob.lam[2 * e]
        c0 = ob.lam[2 * e + 1]
        kr = rk[r0]
        kc = rk[c0]
        lam_block(L22 + r0 * D + c0, A22 + r0 * D + c0, D, kr, kc,
                  Tflat + rtoff[r0] if kr > 1 else NULL, rscale[r0],
                  Tflat + rtoff[c0] if kc > 1 else NULL, rscale[c0], tmp)
        if r0 == c0 and r0 < nz:
            for a in range(kr):
                L22[(r0 + a) * D + r0 + a] += 1.0


cdef void block_part(Py_ssize_t bk, Py_ssize_t D, double* L22, const ObsForm* ob,
                     double* acc) noexcept nogil:
    """Random-effects block ``bk`` of the downdate (see :func:`obs_update`): subtracted,
    or written where Λ' A22 Λ has nothing there (``ob.assign``)."""
    cdef Py_ssize_t pu = ob.bpos[2 * bk], c = ob.bpos[2 * bk + 1], a, b
    cdef Py_ssize_t ku = ob.uk_at[pu], kb = ob.uk_at[c]
    cdef double* row
    block_pairs(acc, ob.pair, ob.bptr[bk], ob.bptr[bk + 1], ob.gram, ob.s, ku, kb)
    if ob.assign[bk]:
        for a in range(ku):
            row = L22 + (pu + a) * D + c
            for b in range(kb):
                row[b] = -acc[a * kb + b]
    elif pu > c:
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
                    const cnp.int64_t* indptr, const double* A22, Py_ssize_t D,
                    Py_ssize_t nz, const double* rscale, const cnp.int64_t* rk,
                    const cnp.int64_t* rtoff, const double* Tflat, double* L11, double* L21,
                    double* L22, const ObsForm* ob, int nthreads, double* rbuf) noexcept nogil:
    """L22 <- Λr' A22 Λr + I, and for every level j of term 1: L11_j = chol(T1' A11_j T1
    + I), the X/y rows of its panel V_j and the downdate L22 -= V_j V_j' (lower
    triangle), all from the level's observations, shared among ``nthreads`` threads (at
    most ``ob.max_threads``): Λr' A22 Λr (:func:`lam_units`; ``rbuf`` its scratch) beside
    the levels, then the blocks.  The panels' rows of the units are left to
    :func:`obs_panels` (the objective needs only L11 and L22).

    Returns 0, or -1 when a diagonal block is not positive definite.  Per level
    (:func:`level_part`): the units' s = Λ_t' z, g_i = R_j' z1_i, the Gram matrix
    (g_i · g_i') into ``gram`` (row-major n_j × n_j at ``mbase[j]``), and the X/y rows:
    with V_xy = Σ_i xy_i g_i' the panel's X/y rows and w_i = V_xy g_i, L22[X/y, unit u of
    i] -= w_i s_iu' and L22[X/y, X/y] -= V_xy V_xy' (lower triangle; each thread sums its
    own and they are added at the end).  Then the random-effects rows block by block
    (:func:`block_part`), each summed over its pairs, Σ (g_i · g_i') s_iu s_i'u'', in a
    small accumulator and subtracted once, or written where Λr' A22 Λr has nothing (on a
    diagonal block both orders of each pair are listed, and its lower triangle is
    taken)."""
    cdef Py_ssize_t nxy = ob.nxy, j, a, c, t, bk
    cdef int nt = max(1, min(nthreads, ob.max_threads)), bad = 0
    cdef double* xyacc
    cdef Py_ssize_t off[8]
    scratch_layout(k1, ob.nmax, nxy, D, 1, off)
    for t in range(nt):
        xyacc = ob.thr + t * ob.thr_stride + off[5]
        for a in range(nxy * D):
            xyacc[a] = 0.0
    if nt > 1:
        # one parallel region (the threads woken once): Λr' A22 Λr and the levels (job 0
        # and 1..m1), then the blocks (they read the levels' Gram matrices and subtract
        # from Λr' A22 Λr; prange ends with a barrier)
        with parallel(num_threads=nt):
            for j in prange(m1 + 1, schedule="dynamic", chunksize=1):
                if j == 0:
                    lam_units(A22, L22, D, nz, rscale, rk, rtoff, Tflat, rbuf, ob)
                else:
                    bad += level_part(j - 1, A11, k1, T1, indptr, D, nz, rscale, rtoff,
                                      Tflat, L11, L21, ob,
                                      ob.thr + threadid() * ob.thr_stride, off) != 0
            for bk in prange(ob.nblk, schedule="dynamic", chunksize=8):
                block_part(bk, D, L22, ob, ob.thr + threadid() * ob.thr_stride + off[6])
    else:
        lam_units(A22, L22, D, nz, rscale, rk, rtoff, Tflat, rbuf, ob)
        for j in range(m1):
            if level_part(j, A11, k1, T1, indptr, D, nz, rscale, rtoff, Tflat, L11, L21, ob,
                          ob.thr, off) != 0:
                return -1
    if bad:
        return -1
    for t in range(nt):                 # the X/y rows' sums (lower triangle)
        xyacc = ob.thr + t * ob.thr_stride + off[5]
        for a in range(nxy):
            for c in range(nz + a + 1):
                L22[(nz + a) * D + c] += xyacc[a * D + c]
    if nt == 1:
        for bk in range(ob.nblk):
            block_part(bk, D, L22, ob, ob.thr + off[6])
    return 0

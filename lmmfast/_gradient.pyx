# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Compiled kernels of the gradient of the profiled deviance in θ (see ``gradient.py``).

The derivative of log|M| in θ needs the entries of M⁻¹ on the pattern of W'Z (a selected
inverse): ``dense_inverse`` gives the dense block's part (LAPACK ``dpotri``),
``grad_block1`` the first term's part, level by level from the blocked factor (L11, L21)
of ``_pls``, together with the coupling part of the later terms' derivatives.
"""
import numpy as np
cimport numpy as cnp
from scipy.linalg.cython_lapack cimport dpotri
from scipy.linalg.cython_blas cimport dgemm, dtrmm
from lmmfast._dense cimport (BLAS_MIN, GATHER_MAX, cols_mul, dot4, lam_rows,
                             lower_inverse, max_panel, rows_tmul)

cnp.import_array()


cdef int grad_block1_core(
        const double* A11, Py_ssize_t m1, Py_ssize_t k1, const double* T1,
        const cnp.int64_t* indptr, const cnp.int64_t* rows, const double* A21,
        const double* L11, const double* L21, const double* Minv, Py_ssize_t Dp, Py_ssize_t nz,
        const double* rscale, const cnp.int64_t* rk, const cnp.int64_t* rtoff,
        const double* Tflat, double* G1, double* out2, Py_ssize_t kmax,
        double* work, double* gbuf, const cnp.int64_t* batch, Py_ssize_t nbatch,
        double* cat, Py_ssize_t catmax) noexcept nogil:
    """Levels of a batch (:func:`lmmfast._remat.panel_batches`: panels on one contiguous
    run of rows) get P = Minv22[rows, rows] V from one dgemm over the whole batch, the
    panels side by side in ``cat`` (2 nr K doubles, K = k1 × levels, when that fits in
    ``catmax``): Minv is packed once instead of once per level."""
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
        if in_cat and nr == bnr:
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
                double[:, ::1] G1_out, double[:, ::1] out2, batch=None):
    """Term-1 and coupling parts of the gradient of log|M| (see ``gradient.py``).

    ``Minv`` is the dense block of M⁻¹ over the first Dp rows of the dense block (Dp = nz for
    ML, nz + p for REML).  Accumulates ``G1_out[b, a] += Σ_j Σ_r M⁻¹[(j,b), r] (W'Z)[r, (j,a)]``
    and, for every k-row group starting at row r of the rest terms,
    ``out2[r + a, b] += Σ_j Σ_c M⁻¹[(r+b), (j,c)] (W'Z)[(j,c), r+a]``.
    ``batch``: the panel batches (``BlockedCrossprod.batch``; default one level each).
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
    with nogil:
        grad_block1_core(&A11[0, 0, 0], m1, k1, &T1[0, 0], &indptr[0], rowsp, a21p,
                         &L11[0, 0, 0], l21p, minvp, Dp, nz, &rscale[0], &rk[0], &rtoff[0],
                         &Tflat[0], &G1_out[0, 0], o2, kmax, &w[0],
                         &gbv[0] if use_blas else NULL, &btv[0], nb,
                         &catv[0] if catmax > 0 else NULL, catmax)
    return None


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
            for r in range(Dp):
                for c in range(r):
                    out[c, r] = out[r, c]
    return info


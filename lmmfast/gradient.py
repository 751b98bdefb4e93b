"""The gradient of the profiled deviance (ML) and of the REML criterion with respect to θ.

With ``W = [ZΛ X]`` and ``M = W'W + diag(I_q, 0)`` (its Cholesky factor is the PLS factor
without the y row), the criteria are, up to constants (Bates et al. 2015, eqs. 34, 41),

    ML:    f(θ) = log|M_ZZ| + n log r²(θ)
    REML:  f(θ) = log|M|    + (n − p) log r²(θ)

For θ_k = T_i[a, b], ∂Λ/∂θ_k = I_{m_i} ⊗ E_ab, so

* ``∂ log|M| / ∂θ_k = 2 Σ_l Σ_r (M⁻¹)[(l,b), r] (W'Z)[r, (l,a)]``  — only the entries of M⁻¹
  on the pattern of W'Z are needed (a selected inverse: the dense block's inverse, and per
  level of the first term the few rows it touches);
* ``∂ r² / ∂θ_k = −2 Σ_l (Z'e)[(l,a)] û[l,b]``  (envelope theorem on the PRSS, eq. 20), with
  e = y − Xβ̂ − ZΛû; Z'e comes from the stored cross-products, not from the n rows.

Cost: one dense inverse of the dense block (LAPACK ``dpotri``: about twice the Cholesky)
plus one pass over the stored cross-products.  The per-level products M⁻¹[rows_j, rows_j] V_j
go as the factorization's downdate does on large dense blocks: row by row where the panels
are scattered (:func:`lmmfast._gradient.rowwise_products`), one dense product for the
heavy levels; on the 1 M-row crossed rung (D = 4,003) about 2.2 evaluations in all, where
the per-level gathers alone took 2.7 s.  :func:`numeric_gradient` is the test oracle.
"""
from __future__ import annotations

import numpy as np

from scipy.linalg.blas import dgemm

from . import _gradient
from ._remat import panel_dot, panel_scatter
from .remat import _tril_colmajor

__all__ = ["blocked_gradient", "gram_times", "numeric_gradient", "z_residual"]


def _panel_products(pls, Minv):
    """(P, flags) for :func:`lmmfast._gradient.grad_block1`: P_j = Minv22[rows_j, rows_j] V_j
    on the random-effects rows of the levels flagged, formed here for large dense blocks
    where gathering Minv22[rows_j, rows_j] level by level misses the cache on nearly every
    entry; (None, None) where no level qualifies.

    * Levels the factorization downdates row by row (``BlockedCrossprod.tptr``) get it
      row by row too (:func:`lmmfast._gradient.rowwise_products`).
    * Heavy levels (``BlockedCrossprod.heavy``: panels of more than D/8 rows) get it from
      one dense product Minv22 [V_j scattered into columns] (dgemm).
    """
    xp, f = pls.xp, pls._f
    nz, k1 = xp.nz, xp.k1
    heavy = np.asarray(getattr(xp, "heavy", np.zeros(0, dtype=np.int64)))
    rowwise = xp.tptr is not None and len(xp.tidx) > 0
    if not (rowwise or len(heavy)) or nz == 0:
        return None, None
    Dp = Minv.shape[0]
    cache = getattr(pls, "_panel_cache", None)
    if cache is None or cache[0] != Dp:
        flags = np.zeros(xp.m1, dtype=bool)
        if rowwise:
            flags[xp.tlev] = True
        hpos = hrow = hcol = np.zeros(0, dtype=np.int64)
        if len(heavy):
            flags[heavy] = True
            nr = np.diff(xp.indptr)[heavy]
            hpos = np.repeat(xp.indptr[heavy], nr) + (np.arange(nr.sum()) -
                                                       np.repeat(np.cumsum(nr) - nr, nr))
            hrow = xp.rows[hpos]
            keep = hrow < Dp              # the rows Minv spans (REML: X's too)
            hpos, hrow = hpos[keep], hrow[keep]
            hcol = np.repeat(np.arange(len(heavy)), nr)[keep]
        cache = pls._panel_cache = (Dp, flags, hpos, hrow, hcol)
    _, flags, hpos, hrow, hcol = cache
    P = np.empty_like(pls.L21)
    if rowwise:
        _gradient.rowwise_products(Minv, xp.indptr, f.rows32_arr, pls.L21, xp.tptr, xp.tidx,
                                   xp.tlev, P, max(f.last_nthreads, 1))
    if len(hpos):
        nh = len(heavy)
        Vh = np.zeros((Dp, nh * k1), order="F")
        for c in range(k1):
            Vh[hrow, hcol * k1 + c] = pls.L21[hpos, c]
        # Minv Vh by scipy's BLAS (the factorization's; see gram_times), Minv handed over
        # as its transpose (symmetric; Fortran-ordered: no copy); the X rows' entries
        # (REML) are grad_block1's
        Ph = dgemm(1.0, Minv.T, Vh)
        out = hrow < nz
        for c in range(k1):
            P[hpos[out], c] = Ph[hrow[out], hcol[out] * k1 + c]
    return P, flags


def blocked_gradient(pls, reml: bool, keep: bool = False) -> np.ndarray:
    """Gradient of the objective at the θ of ``pls``'s current factor (BlockedPLS).

    Parameters
    ----------
    pls : BlockedPLS
        Factored at θ (``pls.objective(θ, reml)`` was just called).
    reml : bool
    keep : bool
        Keep the Dp × Dp buffer of the dense inverse on ``pls`` (``pls._minv``) for the
        next call: an optimizer's gradients then fault in those pages once (on large
        dense blocks, 128 MB at D = 4,000); its caller drops it when done.
    """
    xp = pls.xp
    nz, p, k1, m1 = xp.nz, xp.p, xp.k1, xp.m1
    n = xp.n
    Dp = nz + p if reml else nz
    # ---- dense block of M⁻¹ (selected inverse of the dense part: all of it)
    Minv = getattr(pls, "_minv", None)
    if Minv is None or Minv.shape != (Dp, Dp):
        Minv = np.empty((Dp, Dp))
    pls._minv = Minv if keep else None
    info = _gradient.dense_inverse(pls.L22, Dp, Minv)
    if info != 0:
        raise np.linalg.LinAlgError(f"dpotri failed ({info})")
    kmax = max([k for _, k in xp.term_shapes[1:]] + [1])
    G1 = np.zeros((k1, k1))
    out2 = np.zeros((max(nz, 1), kmax))
    Pre, pre = _panel_products(pls, Minv)
    _gradient.grad_block1(xp.A11, pls.T1, xp.indptr, xp.rows, xp.A21, pls.L11, pls.L21,
                          Minv, nz, pls.rscale, xp.rk, xp.rtoff, pls.Tflat, G1, out2,
                          xp.batch, Pre, pre)
    Gs = [G1]
    if nz:
        # Σ_l Σ_r M⁻¹[(l,b), r] (Λr'(W'Z))[r, (l,a)] per later term, in one pass
        rest = _gradient.rest_trace(Minv, xp.A22, nz, pls.rscale, xp.rk, xp.rtoff, pls.Tflat,
                                    xp.term_shapes[1:], xp.rest_offsets)
        for G, (m, k), o in zip(rest, xp.term_shapes[1:], xp.rest_offsets):
            G += out2[o: o + m * k, :k].reshape(m, k, k).sum(axis=0).T
            Gs.append(G)
    # ---- derivative of r²: Z'e from the cross-products
    zes, u, _ = z_residual(pls)
    ldz, ldx, r2 = pls.pieces()
    scale = (n - p if reml else n) / r2
    grad = []
    for G, ze, ui, (m, k) in zip(Gs, zes, u, xp.term_shapes):
        a, bcol = _tril_colmajor(k)                     # θ's order: column by column
        dr2 = -2.0 * (ze.T @ ui)[a, bcol]                # ∂r²: (Z'e)[:, a] · û[:, b]
        grad.append(2.0 * G[bcol, a] + scale * dr2)
    return np.concatenate(grad)


def gram_times(xp, c1, w):
    """[Z1 Z_rest X y]'[Z1 Z_rest X y] times the vector (c1, w), from the stored
    cross-products: c1 (m1, k1) over term 1's columns, w (D,) over the dense block's rows.

    Returns
    -------
    (m1, k1) array, (D,) array
        The product's term-1 part and dense-block part.
    """
    t1 = panel_dot(xp.indptr, xp.rows, xp.A21, w)
    t1 += np.einsum("jab,jb->ja", xp.A11, c1)
    # A22 by blocks, the random-effects block sparse where it is (BlockedCrossprod.
    # dense_times; BLAS: scipy's, the factorization's -- numpy's own OpenBLAS would leave
    # its threads spinning against the next evaluation's: InstEval's next two evaluations
    # 35-50 ms instead of 18-22)
    dense = xp.dense_times(w) if xp.D else np.zeros(0)
    dense += panel_scatter(xp.indptr, xp.rows, xp.A21, np.ascontiguousarray(c1), xp.D)
    return t1, dense


def z_residual(pls):
    """Z'e at the current factor, e = y − Xβ̂ − Zb̂ the residual of the PLS solution
    (for V = I + ZΛΛ'Z', e is Q y: y's generalized-least-squares residual, premultiplied
    by V⁻¹), from the stored cross-products.

    Returns
    -------
    zes : list of (m_i, k_i) arrays
        Z_i'e per term, in the blocked order.
    u : list of (m_i, k_i) arrays
        The spherical conditional modes û.
    Ts : list of (k_i, k_i) arrays
        The relative covariance factors T_i at the current θ.

    Kept on ``pls`` for the θ of its factor (read-only use: the gradient and the average
    information at one θ both need it).
    """
    key = None if pls.theta is None else np.asarray(pls.theta).tobytes()
    cached = getattr(pls, "_z_residual", None)
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]     # the gradient and the information at one θ share it
    xp = pls.xp
    nz = xp.nz
    u, beta = pls.solve()
    Ts = [pls.T1] + [_rest_T(xp, pls.Tflat, pls.rscale, i) for i in range(len(xp.term_shapes) - 1)]
    b = [ui @ T.T for ui, T in zip(u, Ts)]
    w = np.concatenate([-np.concatenate([bi.ravel() for bi in b[1:]]) if nz else np.zeros(0),
                        -beta, [1.0]])
    ze1, zr = gram_times(xp, -b[0], w)
    zes = [ze1]
    for (m, k), o in zip(xp.term_shapes[1:], xp.rest_offsets):
        zes.append(zr[o: o + m * k].reshape(m, k))
    pls._z_residual = (key, (zes, u, Ts))
    return zes, u, Ts


def _rest_T(xp, Tflat, rscale, i):
    """T of rest term i (index into term_shapes[1:]) from the per-θ row descriptors."""
    m, k = xp.term_shapes[i + 1]
    o = xp.rest_offsets[i]
    if k == 1:
        return np.array([[rscale[o]]])
    off = xp.rtoff[o]
    return Tflat[off: off + k * k].reshape(k, k)


def numeric_gradient(f, theta, h=1e-6) -> np.ndarray:
    """Central finite differences (the oracle for tests)."""
    theta = np.asarray(theta, dtype=float)
    g = np.empty_like(theta)
    for i in range(len(theta)):
        e = np.zeros_like(theta)
        e[i] = h * max(1.0, abs(theta[i]))
        g[i] = (f(theta + e) - f(theta - e)) / (2 * e[i])
    return g

"""The average information matrix: a Hessian of the objective in θ from one factor.

With V = I + ZΛΛ'Z' (σ² factored out), Q = V⁻¹ − V⁻¹X(X'V⁻¹X)⁻¹X'V⁻¹ and
r² = y'Qy (the PRSS of Bates et al. 2015, eq. 20), the derivative of V along θ_k is
V_k = Z A_k Z' with A_k = Λ_kΛ' + ΛΛ_k' (Λ_k = ∂Λ/∂θ_k).  The average of the observed
and expected information of −2ℓ in (θ, σ²) (Gilmour, Thompson & Cullis 1995, Biometrics
51: 1440-1450, "AI-REML") has the blocks

    θθ: w_j'Q w_k / σ²,   θσ²: q_j / σ⁴,   σ²σ²: r² / σ⁶,

with w_k = V_k Q y and q_k = y'Q w_k.  Profiling σ² out (σ̂² = r²/N, N = n for ML and
n − p for REML) leaves, for the profiled deviance (eq. 34) or REML criterion (eq. 41),

    H = (N / r²) [ W'QW − q q' / r² ]

(positive semi-definite; ``W = [w_1 ... w_K]``).  Everything comes from the factor and the
stored cross-products, never from the n rows:

* ``Q y = e``, the residual of the PLS solution, so ``s = Z'Q y = Z'e``
  (:func:`lmmfast.gradient.z_residual`) and ``w_k = Z v_k`` with ``v_k = A_k s``;
  q_k = s'v_k.
* For n-vectors ``Z v`` the bilinear form of Q is the PRSS of a response ``Zv``:
  ``(Zv_j)'Q(Zv_k) = v_j'Z'Z v_k − f_j'f_k`` with ``f = L⁻¹ [Λ'Z'Z v; X'Z v]`` and L the
  Cholesky factor of Ω(θ) without its y row (eq. 18-19): one forward substitution per θ.

Cost: one forward substitution with the blocked factor and one product with Z'Z per
element of θ (the dense block's part by BLAS for all of them at once) — no inverse.
:func:`dense_information` is the numpy oracle of the tests.
"""
from __future__ import annotations

import numpy as np
from scipy.linalg.blas import dgemm, dtrsm

from ._remat import panel_dot_many, panel_scatter_many
from .gradient import z_residual
from .remat import _tril_colmajor

__all__ = ["average_information", "dense_information"]


def _mm(A, B):
    """A @ B by scipy's BLAS, the one the factorization calls: numpy's own OpenBLAS would
    leave its threads spinning against the next evaluation's (InstEval: 20-40 ms
    evaluations after it instead of 18-22)."""
    if A.shape[0] == 0 or B.shape[1] == 0 or A.shape[1] == 0:
        return np.zeros((A.shape[0], B.shape[1]))
    if A.flags.c_contiguous and not A.flags.f_contiguous:
        return dgemm(1.0, A.T, B, trans_a=1)         # its transpose is column-major: no copy
    return dgemm(1.0, A, B)


def _lam_t_rows(M, xp, rscale, Tflat, nrows):
    """Λ_rest' M for the first ``nrows`` rows of the dense block (row operations): a
    vector term's k-row groups all at once (one T per term), scalar rows scaled."""
    out = M * rscale[:nrows, None]
    for (m, k), o in zip(xp.term_shapes[1:], xp.rest_offsets):
        if k == 1 or o >= nrows:
            continue
        T = Tflat[xp.rtoff[o]: xp.rtoff[o] + k * k].reshape(k, k)
        q = m * k
        out[o: o + q] = np.matmul(T.T, M[o: o + q].reshape(m, k, -1)).reshape(q, -1)
    return out


def _directions(zes, Ts, term_shapes):
    """v_k = A_k s for every θ_k, per term of the blocked order: for θ_k = T[a, b],
    A_k = I_m ⊗ (E_ab T' + T E_ba), so each level's v_l = e_a (t_b's_l) + t_b s_l[a]
    (t_b = T[:, b]).  Returns a list of (term index, (m, k, K_i) array)."""
    out = []
    for i, (s, T, (m, k)) in enumerate(zip(zes, Ts, term_shapes)):
        a, b = _tril_colmajor(k)
        ts = s @ T                                   # (m, k): column b is t_b's_l
        v = T[:, b][None, :, :] * s[:, a][:, None, :]          # t_b s_l[a]
        v[:, a, np.arange(len(a))] += ts[:, b]                 # e_a (t_b's_l)
        out.append((i, v))
    return out


def average_information(pls, reml: bool) -> np.ndarray:
    """The average information matrix H of the objective at the current factor.

    Parameters
    ----------
    pls : BlockedPLS
        Factored at θ (``pls.objective(θ, reml)`` was just called).
    reml : bool

    Returns
    -------
    (K, K) array
        H in θ's order (terms in the blocked order, each term's T column by column), an
        approximation of the Hessian of the objective that is exact in expectation.
    """
    xp = pls.xp
    nz, p, D, m1, k1 = xp.nz, xp.p, xp.D, xp.m1, xp.k1
    Dm = nz + p                                     # the factor's rows without y
    zes, _, Ts = z_residual(pls)
    dirs = _directions(zes, Ts, xp.term_shapes)
    K = sum(v.shape[2] for _, v in dirs)
    q = np.concatenate([np.einsum("mk,mkt->t", zes[i], v) for i, v in dirs])
    # Z'Z v for every direction (side by side): term 1 part (m1, k1, K), dense part (D, K)
    V1 = np.zeros((m1, k1, K))
    Vr = np.zeros((D, K))
    col = 0
    for i, v in dirs:
        Ki = v.shape[2]
        if i == 0:
            V1[:, :, col: col + Ki] = v
        else:
            o = xp.rest_offsets[i - 1]
            m, k = xp.term_shapes[i]
            Vr[o: o + m * k, col: col + Ki] = v.reshape(m * k, Ki)
        col += Ki
    G1 = np.einsum("jab,jbt->jat", xp.A11, V1)
    G1 += panel_dot_many(xp.indptr, xp.rows, xp.A21, Vr)
    Gr = xp.dense_times(Vr)                         # Vr is zero below the nz rows
    Gr += panel_scatter_many(xp.indptr, xp.rows, xp.A21, V1, D)
    # v_j'Z'Z v_k
    G = np.einsum("jat,jas->ts", V1, G1) + _mm(Vr[:nz].T, Gr[:nz])
    # f = L⁻¹ [Λ'Z'Z v; X'Z v]: term 1 (L11 per level), then the dense block
    C1 = np.einsum("ab,jat->jbt", pls.T1, G1)      # T1' per level
    F1 = np.empty_like(C1)
    L11 = pls.L11
    for a in range(k1):                              # forward substitution, all levels at once
        acc = C1[:, a, :] - np.einsum("jb,jbt->jt", L11[:, a, :a], F1[:, :a, :])
        F1[:, a, :] = acc / L11[:, a, a][:, None]
    C2 = np.zeros((D, K))
    C2[:Dm] = _lam_t_rows(Gr[:Dm], xp, pls.rscale, pls.Tflat, Dm)
    C2 -= panel_scatter_many(xp.indptr, xp.rows, pls.L21, F1, D)
    C2[Dm:] = 0.0
    # L22 (row-major lower) is column-major upper U = L22': solve U' x = c; the y row
    # (last) is zero on the right and below the rows wanted, so the full factor serves
    F2 = dtrsm(1.0, pls.L22.T, np.asfortranarray(C2), lower=0, trans_a=1)[:Dm]
    FF = np.einsum("jat,jas->ts", F1, F1) + _mm(F2.T, F2)
    _, _, r2 = pls.pieces()
    N = xp.n - p if reml else xp.n
    H = (N / r2) * (G - FF - np.outer(q, q) / r2)
    return 0.5 * (H + H.T)


def dense_information(Z, X, y, terms, theta, theta_offsets, reml: bool) -> np.ndarray:
    """:func:`average_information` computed densely from Z (n × q) — the test oracle."""
    from .pls import dense_lambda

    n, p = X.shape
    Lam = dense_lambda(terms, theta, theta_offsets)
    V = np.eye(n) + Z @ Lam @ Lam.T @ Z.T
    Vi = np.linalg.inv(V)
    ViX = Vi @ X
    Q = Vi - ViX @ np.linalg.solve(X.T @ ViX, ViX.T)
    r2 = y @ Q @ y
    s = Z.T @ (Q @ y)
    W = np.empty((n, len(theta)))
    for k in range(len(theta)):
        e = np.zeros(len(theta))
        e[k] = 1.0
        dL = dense_lambda(terms, e, theta_offsets)
        W[:, k] = Z @ ((dL @ Lam.T + Lam @ dL.T) @ s)
    qv = W.T @ (Q @ y)
    N = n - p if reml else n
    return (N / r2) * (W.T @ Q @ W - np.outer(qv, qv) / r2)

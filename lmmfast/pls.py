"""Penalized least squares at a given θ: the factor, the profiled deviance, the solution.

Notation of Bates, Mächler, Bolker & Walker (2015), JSS 67(1), section 3:

* ``L_θ L_θ' = Λ_θ'Z'ZΛ_θ + I``                                       (eq. 18)
* ``R_ZX = L_θ^{-1} Λ_θ'Z'X``, ``R_X'R_X = X'X - R_ZX'R_ZX``          (eq. 19)
* ``r²(θ) = min_{u,β} ||y - Xβ - ZΛu||² + ||u||²``                      (eq. 20)
* ML:   ``-2 ℓ(θ) = log|L_θ|² + n (1 + log(2π r²(θ) / n))``               (eq. 34)
* REML: ``-2 ℓ_R(θ) = log|L_θ|² + log|R_X|² + (n-p)(1 + log(2π r²/(n-p)))`` (eq. 41)

:class:`BlockedPLS` computes all of these from one blocked Cholesky factor of the
augmented matrix Ω(θ) (``_pls.pyx``, its kernel in ``_blockchol.pyx``);
:func:`dense_factor` and :func:`dense_objective` are the dense numpy oracles the tests
compare it with.
"""
from __future__ import annotations

import math
from functools import partial

import numpy as np

from . import _pls
from ._remat import panel_dot

__all__ = ["BlockedPLS", "dense_objective", "dense_factor", "deviance", "tri_inverse"]

LOG2PI = math.log(2.0 * math.pi)


def tri_inverse(L: np.ndarray, lower: bool = True) -> np.ndarray:
    """Inverse of a triangular matrix by LAPACK's ``dtrtri``.

    Not ``solve_triangular(L, I)``: OpenBLAS runs that triangular solve with a matrix
    right-hand side threaded even for a 2×2 system, and waking its threads costs
    milliseconds (13 ms for a 2×2 inverse measured here)."""
    import scipy.linalg.lapack as lapack

    if L.shape[0] == 0:
        return np.zeros((0, 0))
    inv, info = lapack.dtrtri(np.asfortranarray(L), lower=int(lower))
    if info != 0:
        raise np.linalg.LinAlgError(f"dtrtri failed ({info})")
    return np.tril(inv) if lower else np.triu(inv)


def deviance(ldz: float, ldx: float, r2: float, n: int, p: int, reml: bool) -> float:
    """Profiled deviance (ML, eq. 34) or REML criterion (eq. 41) from the factor's pieces."""
    if reml:
        nmp = n - p
        return ldz + ldx + nmp * (1.0 + LOG2PI + math.log(r2 / nmp))
    return ldz + n * (1.0 + LOG2PI + math.log(r2 / n))


class BlockedPLS:
    """The blocked factor of Ω(θ) and everything derived from it.

    Parameters
    ----------
    xp : BlockedCrossprod
        The cross-products, formed once.
    """

    def __init__(self, xp):
        self.xp = xp
        self._f = _pls.BlockedFactor(xp)
        self.L11, self.L22 = self._f.L11, self._f.L22

    @property
    def L21(self):
        """The panels of the current factor (in the observation form, formed here on the
        first read after an objective-only evaluation)."""
        self._f.ensure_panels()
        return self._f.L21

    # the current θ, T1, Λ_rest row scales and group factors (set by factor)
    theta = property(lambda self: self._f.theta)
    T1 = property(lambda self: self._f.T1)
    rscale = property(lambda self: self._f.rscale)
    Tflat = property(lambda self: self._f.Tflat)

    def factor(self, theta: np.ndarray) -> int:
        """Update the factor in place for ``theta``; returns the kernel's info (0 = ok)."""
        return self._f.factor(np.ascontiguousarray(theta, dtype=float))

    def pieces(self):
        """(log|L_θ|², log|R_X|², r²) of the current factor."""
        return self._f.pieces()

    def objective(self, theta: np.ndarray, reml: bool) -> float:
        """-2 log-likelihood (ML, eq. 34) or the REML criterion (eq. 41) at ``theta``;
        +inf where Ω(θ) is not positive definite.  One compiled call."""
        return self._f.objective(np.ascontiguousarray(theta, dtype=float), reml)

    def objective_function(self, reml: bool):
        """``f(θ)`` for an optimizer: :meth:`objective` with the least call overhead
        (θ must be a contiguous float64 array, as optimizers pass it)."""
        return partial(self._f.objective, reml=reml)

    def compiled_objective(self, reml: bool, ntheta: int):
        """The objective as ``(capsule, context)`` for a compiled optimizer loop
        (:func:`lmmfast._optim.bobyqa`): a C function of θ (length ``ntheta``) and the
        factor it updates."""
        return self._f.objective_capsule(reml, ntheta), self._f

    # ------------------------------------------------------------------ solutions
    def _split_rest(self, v):
        """Split a vector over the dense block's random-effects rows into per-term arrays."""
        out = []
        for (m, k), o in zip(self.xp.term_shapes[1:], self.xp.rest_offsets):
            out.append(v[o: o + m * k].reshape(m, k))
        return out

    def solve(self):
        """Spherical conditional modes and fixed effects at the current factor.

        Back-substitution with L' on the last row of L, which holds L⁻¹ of the right-hand
        side (Bates et al. 2015, eqs. 19-20).

        Returns
        -------
        u : list of (m_i, k_i) arrays
            Spherical random effects per term (b_i = u_i T_i').
        beta : (p,) array
        """
        xp = self.xp
        nz, p = xp.nz, xp.p
        z = self._f.solve_dense()
        # term 1: L11_j' u_j = c1_j - V_j' z  (c1 is the y row, the last row of each panel)
        m1, k1 = xp.m1, xp.k1
        zext = np.append(z, 0.0)
        s = panel_dot(xp.indptr, xp.rows, self.L21, zext)          # V_j' z per level
        rhs = self.L21[xp.indptr[1:] - 1] - s
        u1 = np.empty((m1, k1))
        for a in range(k1 - 1, -1, -1):   # back-substitution with L11_j' (upper), all j at once
            acc = rhs[:, a] - np.einsum("jb,jb->j", self.L11[:, a + 1:, a], u1[:, a + 1:])
            u1[:, a] = acc / self.L11[:, a, a]
        return [u1] + self._split_rest(z[:nz]), z[nz: nz + p]

    def rx_inverse(self) -> np.ndarray:
        """R_X⁻¹ (p×p, upper) so that Var(β̂) = σ² R_X⁻¹ R_X⁻ᵀ."""
        xp = self.xp
        nz, p = xp.nz, xp.p
        LX = np.tril(self.L22[nz: nz + p, nz: nz + p])
        return tri_inverse(LX).T

    def condvar(self):
        """Diagonal blocks of (L_θ L_θ')⁻¹, one (m_i, k_i, k_i) array per term.

        lme4's conditional variances are σ² Λ (L_θL_θ')⁻¹ Λ' (``ranef(condVar = TRUE)``).
        """

        xp = self.xp
        nz = xp.nz
        Lzz = np.tril(self.L22[:nz, :nz])
        Linv = tri_inverse(Lzz)
        L11inv = np.linalg.inv(self.L11)                       # (m1, k1, k1), lower
        blocks = np.einsum("jba,jbc->jac", L11inv, L11inv)     # L11^{-T} L11^{-1}
        if nz:
            for j in range(xp.m1):
                p0, p1 = xp.indptr[j], xp.indptr[j + 1]
                r = xp.rows[p0:p1]
                sel = r < nz
                if sel.any():
                    W = Linv[:, r[sel]] @ self.L21[p0:p1][sel] @ L11inv[j]
                    blocks[j] += W.T @ W
        out = [blocks]
        for (m, k), o in zip(xp.term_shapes[1:], xp.rest_offsets):
            Li = Linv[:, o: o + m * k].reshape(nz, m, k)
            out.append(np.einsum("rja,rjb->jab", Li, Li))
        return out


# ---------------------------------------------------------------------- dense oracles
def dense_lambda(terms, theta, theta_offsets) -> np.ndarray:
    """Λ_θ as a dense q×q matrix (blocks I_m ⊗ T_i, in term order)."""
    mats = []
    for t, off in zip(terms, theta_offsets):
        T = t.T(theta[off: off + t.ntheta])
        mats.append(np.kron(np.eye(t.nlevels), T))
    import scipy.linalg as sla

    return sla.block_diag(*mats)


def dense_factor(Z: np.ndarray, X: np.ndarray, y: np.ndarray, Lam: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of Ω(θ) = [ZΛ X y]'[ZΛ X y] + diag(I_q, 0, 0), densely."""
    W = np.column_stack([Z @ Lam, X, y])
    Om = W.T @ W
    q = Z.shape[1]
    Om[np.arange(q), np.arange(q)] += 1.0
    return np.linalg.cholesky(Om)


def dense_objective(Z, X, y, Lam, reml: bool) -> float:
    """The profiled deviance or REML criterion computed densely (test oracle)."""
    L = dense_factor(Z, X, y, Lam)
    q, p = Z.shape[1], X.shape[1]
    d = np.diag(L)
    ldz = 2.0 * np.log(d[:q]).sum()
    ldx = 2.0 * np.log(d[q: q + p]).sum()
    r2 = d[-1] ** 2
    return deviance(ldz, ldx, r2, len(y), p, reml)

"""Penalized least squares with CHOLMOD's sparse supernodal Cholesky (lme4's own method).

For random-effects structures whose Schur complement stays sparse (nested or partially
crossed factors with many levels) a dense block would waste time and memory.  Here, as in
lme4, ``L_θ L_θ' = P(Λ'Z'ZΛ + I)P'`` is a sparse supernodal factor with a fill-reducing
permutation P found once (symbolic analysis) and refactored numerically per θ; then

* ``c_u  = L⁻¹ P Λ'Z'y``,  ``R_ZX = L⁻¹ P Λ'Z'X``                        (eq. 19)
* ``R_X'R_X = X'X − R_ZX'R_ZX``,  ``c_β = R_X⁻ᵀ (X'y − R_ZX'c_u)``
* ``r² = y'y − c_u'c_u − c_β'c_β``                                          (eq. 20)

Same interface as :class:`lmmfast.pls.BlockedPLS`.
"""
from __future__ import annotations

import math
from functools import partial

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from .pls import deviance, tri_inverse

__all__ = ["SparsePLS", "cholmod_available"]


def cholmod_available() -> bool:
    try:
        import sksparse.cholmod  # noqa: F401
    except ImportError:
        return False
    return True


class SparsePLS:
    """Sparse (CHOLMOD) factorization of the PLS system.

    Parameters
    ----------
    terms : list of ReTerm
        In lme4's order.
    X, y : arrays
    theta_offsets : list of int
    """

    def __init__(self, terms, X, y, theta_offsets):
        from sksparse.cholmod import analyze

        self.n, self.p = X.shape
        self.term_shapes = [(t.nlevels, t.k) for t in terms]
        self.offsets = np.cumsum([0] + [t.q for t in terms])
        self.q = int(self.offsets[-1])
        Z = sp.hstack([t.Z() for t in terms], format="csc")
        Zt = Z.T.tocsr()
        self.ZtZ = (Zt @ Z).tocsc()
        self.ZtX = np.asarray(Zt @ X)
        self.Zty = np.asarray(Zt @ y).ravel()
        self.XtX = X.T @ X
        self.Xty = X.T @ y
        self.yty = float(y @ y)
        # Λ: block diagonal I_m ⊗ T_i; data[e] = θ[lind[e]] (lme4's Lind)
        rows, cols, lind = [], [], []
        for t, off, toff in zip(terms, self.offsets, theta_offsets):
            k = t.k
            r0 = off + np.arange(t.nlevels) * k
            ti = toff
            for b in range(k):
                for a in range(b, k):
                    rows.append(r0 + a)
                    cols.append(r0 + b)
                    lind.append(np.full(t.nlevels, ti))
                    ti += 1
        lam = sp.csc_matrix((np.ones(sum(len(r) for r in rows)),
                             (np.concatenate(rows), np.concatenate(cols))), shape=(self.q, self.q))
        lam.sort_indices()
        # recover the θ index of each stored entry in CSC order
        order = sp.csc_matrix((np.concatenate(lind).astype(float) + 1.0,
                               (np.concatenate(rows), np.concatenate(cols))), shape=(self.q, self.q))
        order.sort_indices()
        self.Lambda = lam
        self.lind = (order.data - 1.0).astype(np.int64)
        self.eye = sp.identity(self.q, format="csc")
        # Analyse the pattern at a generic θ (every element of every T nonzero): at lme4's
        # start T is diagonal and Ω can miss entries that other θ fill; CHOLMOD then needs
        # each later Ω's pattern to be a subset of the analysed one.
        ntheta = sum(t.ntheta for t in terms)
        generic = 0.7 + 0.1 * (np.arange(ntheta) % 5)
        self._factor = analyze(self._omega(generic), mode="supernodal", ordering_method="best")
        self.theta = None

    def _lam(self, theta):
        lam = self.Lambda.copy()
        lam.data = theta[self.lind]
        return lam

    def _omega(self, theta):
        lam = self._lam(theta)
        return (lam.T @ self.ZtZ @ lam + self.eye).tocsc()

    def factor(self, theta) -> int:
        """Refactor for ``theta`` (numeric step only); returns 0 on success."""
        from sksparse.cholmod import CholmodNotPositiveDefiniteError

        theta = np.asarray(theta, dtype=float)
        lam = self._lam(theta)
        try:
            self._factor.cholesky_inplace((lam.T @ self.ZtZ @ lam + self.eye).tocsc())
        except CholmodNotPositiveDefiniteError:
            return 1
        f = self._factor
        self.cu = f.solve_L(f.apply_P(lam.T @ self.Zty), use_LDLt_decomposition=False)
        self.RZX = f.solve_L(f.apply_P(np.asarray(lam.T @ self.ZtX)), use_LDLt_decomposition=False)
        self.RZX = np.asarray(self.RZX).reshape(self.q, self.p)
        self.cu = np.asarray(self.cu).ravel()
        S = self.XtX - self.RZX.T @ self.RZX
        try:
            self.LX = np.linalg.cholesky(S) if self.p else np.zeros((0, 0))
        except np.linalg.LinAlgError:
            return 2
        rhs = self.Xty - self.RZX.T @ self.cu
        self.cb = sla.solve_triangular(self.LX, rhs, lower=True) if self.p else np.zeros(0)
        self.r2 = self.yty - self.cu @ self.cu - self.cb @ self.cb
        self.theta = theta.copy()
        self.lam = lam
        return 0

    def pieces(self):
        """(log|L_θ|², log|R_X|², r²) of the current factor."""
        ldx = 2.0 * float(np.log(np.diag(self.LX)).sum()) if self.p else 0.0
        return float(self._factor.logdet()), ldx, float(self.r2)

    def objective_function(self, reml: bool):
        """``f(θ)`` for an optimizer."""
        return partial(self.objective, reml=reml)

    def objective(self, theta, reml: bool) -> float:
        if self.factor(theta) != 0:
            return math.inf
        ldz, ldx, r2 = self.pieces()
        if not (r2 > 0.0):
            return math.inf
        return deviance(ldz, ldx, r2, self.n, self.p, reml)

    def solve(self):
        """Spherical conditional modes per term and β̂ at the current factor."""
        f = self._factor
        beta = sla.solve_triangular(self.LX.T, self.cb, lower=False) if self.p else np.zeros(0)
        v = self.cu - self.RZX @ beta
        u = f.apply_Pt(f.solve_Lt(v, use_LDLt_decomposition=False))
        u = np.asarray(u).ravel()
        return self._split(u), beta

    def _split(self, v):
        return [v[o: o + m * k].reshape(m, k) for (m, k), o in zip(self.term_shapes, self.offsets)]

    def rx_inverse(self) -> np.ndarray:
        return tri_inverse(self.LX).T

    def condvar(self, chunk: int = 512):
        """Diagonal blocks of (L_θL_θ')⁻¹ per term, by solves with blocks of unit columns."""
        f = self._factor
        out = [np.empty((m, k, k)) for m, k in self.term_shapes]
        for (m, k), o, dst in zip(self.term_shapes, self.offsets, out):
            per = max(1, chunk // k)
            for l0 in range(0, m, per):
                l1 = min(m, l0 + per)
                c0, c1 = o + l0 * k, o + l1 * k
                E = sp.csc_matrix((np.ones(c1 - c0), (np.arange(c0, c1), np.arange(c1 - c0))),
                                  shape=(self.q, c1 - c0))
                Xs = f.solve_A(E)
                Xs = Xs.toarray() if sp.issparse(Xs) else np.asarray(Xs)
                sub = Xs[c0:c1, :].reshape(l1 - l0, k, l1 - l0, k)
                idx = np.arange(l1 - l0)
                dst[l0:l1] = sub[idx, :, idx, :]
        return out

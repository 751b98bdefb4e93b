"""A method-of-moments starting θ: every term fitted as fixed effects, then variances by
moments.

All random-effects terms are fitted as fixed effects to the OLS residuals of y on X, level
by level and jointly (a few backfitting sweeps, :class:`LevelFit`).  For each term σ² T T'
is first estimated by the level-size weighted covariance of its effects less their mean
sampling covariance s² A_j⁻¹ (s²: the residual variance of the joint fit); for ``(1 | g)``
this is θ² = (v_b − s² m / n) / s², v_b the weighted mean square of the level effects.
One step of the score equation of the effects' own model, b̂_j ~ N(0, σ²(C + A_j⁻¹)),
then re-weights the levels by W_j = (C + A_j⁻¹)⁻¹: with level sizes that vary a lot (Zipf-like
designs) the size weights are several percent off the optimum, the re-weighted estimate a
small fraction of a percent.  A scalar term's θ² is floored at 10⁻⁴ (θ ≥ 0.01, close to
a small variance); a vector term's eigenvalues at 0.01 (a start nearer a singular T leaves
its correlations ill-determined: kb07's 8 × 8 terms took 128 evaluations instead of 91).
A term with too few identifiable levels keeps lme4's start (T = I).

Nested factors (every level of A inside one level of B) make the split of the fit between
A and B unidentified; B is given the count-weighted mean of A's effects within each of its
levels, as in the nested ANOVA (:func:`nested_pairs`).

Scalar terms (k = 1, the common case) take a path without per-level k × k linear algebra.
The whole start is O(n) per backfitting sweep; on models of a few hundred rows it costs
about what the evaluations it saves do (``LinearMixedModel.fit`` uses it from 1,000 rows).
"""
from __future__ import annotations

import numpy as np
from scipy.linalg.blas import ddot, dgemv

from ._remat import level_refit
from .fixed import xy_gram as xy_gram_of
from .remat import _tril_colmajor

__all__ = ["moment_start", "LevelFit", "nested_pairs"]


def moment_start(terms, offsets, X, y, p: int, theta_start, sweeps: int = 3, xy_gram=None):
    """The moment start.

    Parameters
    ----------
    terms : list of ReTerm
        In lme4's order; ``offsets`` their first index in θ.
    X, y : arrays
        Fixed-effects model matrix (full column rank) and response.
    p : int
        Number of fixed effects.
    theta_start : array
        lme4's start, kept for terms the moments cannot estimate.
    xy_gram : (p + 1, p + 1) array, optional
        [X y]'[X y] when already formed (:func:`lmmfast.fixed.xy_gram`).

    Returns
    -------
    theta : array
    step : array
        A first trust-region radius for each element of θ relative to max(θ, 0.1), about
        a third of its standard error (0.25 / √(effective number of levels), at most 0.1);
        NaN where the moments did not estimate it.
    """
    G = xy_gram_of(X, y) if xy_gram is None else xy_gram
    beta = np.linalg.solve(G[:p, :p], G[:p, p]) if p else np.zeros(0)
    # n-long products by scipy's BLAS, the kernel's (see fixed.xy_gram: numpy's threads
    # would spin against it through the first evaluations)
    r = dgemv(-1.0, X.T, beta, 1.0, y, trans=1) if p else np.array(y, dtype=float)
    n = len(r)
    var0 = ddot(r, r) / max(n - p, 1)            # the OLS residual variance
    th = np.array(theta_start, dtype=float)
    step = np.full(len(th), np.nan)
    fits = [LevelFit(t) for t in terms]
    use = [f for f in fits if f.usable]
    if not use:
        return th, step
    # backfitting: with crossed factors each one's level means also carry the others'
    # effects, and the residual variance after one factor alone is inflated by the rest
    for _ in range(sweeps if len(use) > 1 else 1):
        for f in use:
            f.refit(r)
    for a, b in nested_pairs(use):
        bj = a.outer                                    # the level of B of each level of A
        nb = np.maximum(b.cnt, 1)
        m = np.bincount(bj, weights=a.cnt * a.eff[:, 0], minlength=b.t.nlevels) / nb
        a.eff[:, 0] -= m[bj]
        b.eff[:, 0] += m
        b.nfree = 0                                     # B's columns lie in A's span
        # A's effects now vary within B only: N_A - N_B degrees of freedom, not N_A - 1
        na, nbl = np.count_nonzero(a.ok), np.count_nonzero(b.ok)
        a.spread = (na - 1) / max(na - nbl, 1)
        # B's effects carry the count-weighted mean of A's: var Σ n_a² / n_B² · σ_A²
        b.inner = (a, np.bincount(bj, weights=a.cnt ** 2, minlength=b.t.nlevels) / nb ** 2)
    dof = n - p - sum(f.nfree for f in use)
    s2 = ddot(r, r) / max(dof, 1)
    if not s2 > 1e-10 * var0:
        # the terms fit the response exactly (a response constant within levels): no
        # residual variance to scale by, lme4's start
        return th, step
    # finest factors first: a nested factor's variance enters its outer factor's
    for f in sorted(use, key=lambda f: -f.t.nlevels):
        f.v = f.theta(s2)
    for t, off, f in zip(terms, offsets, fits):
        if f.usable:
            th[off: off + t.ntheta] = f.v
            step[off: off + t.ntheta] = min(0.1, 0.25 / np.sqrt(f.neff))
    return th, step


class LevelFit:
    """One term's effects fitted as fixed effects, level by level.

    Level j's effect is the least-squares fit of the current residual on the term's k
    columns over its rows: A_j⁻¹ b_j with A_j = X_j'X_j; levels whose A_j is singular
    (fewer rows than columns, or collinear) keep a zero effect.
    """

    def __init__(self, t):
        k, m = t.k, t.nlevels
        self.t = t
        self.cnt = np.bincount(t.codes, minlength=m).astype(float)
        self.intercept = t.intercept_only
        if k == 1:
            x = t.X[:, 0]
            a = self.cnt if self.intercept else np.bincount(t.codes, weights=x * x, minlength=m)
            self.ok = a > 0
            self.ainv = np.divide(1.0, a, out=np.zeros(m), where=self.ok)
        else:
            w, Q = np.linalg.eigh(t.level_gram())
            self.ok = w[:, 0] > 1e-8 * np.maximum(w[:, -1], 1e-300)
            winv = np.divide(1.0, w, out=np.zeros_like(w), where=self.ok[:, None])
            self.Ainv = (Q * winv[:, None, :]) @ Q.transpose(0, 2, 1)
        nok = int(np.count_nonzero(self.ok))
        self.usable = nok > k
        # parameters beyond those X already has (the term's columns are, as usual, in X)
        self.nfree = (nok - 1) * k
        self.eff = np.zeros((m, k))
        self.spread = 1.0            # scale of the effects' spread (nested: see moment_start)
        self.inner = None            # (fit of a factor nested in this one, its weights)
        self.refine = 1
        self.neff = float(np.count_nonzero(self.ok))
        self._refit_args = None      # (A⁻¹ per level, the term's columns) for refit

    def refit(self, r):
        """Refit the effects to ``r`` plus their current fit; update ``r`` in place.

        The refit of r + Z e is e + A⁻¹ Z'r (A_j⁻¹ A_j = I on the levels fitted, and the
        others keep e = 0), so the change is added: r −= Z A⁻¹ Z'r, two compiled passes
        over the rows (:func:`lmmfast._remat.level_refit`)."""
        t = self.t
        if self._refit_args is None:
            Ainv = self.ainv.reshape(-1, 1, 1) if t.k == 1 else self.Ainv
            Z = None if self.intercept else np.ascontiguousarray(t.X, dtype=float)
            self._refit_args = (np.ascontiguousarray(Ainv), Z)
        Ainv, Z = self._refit_args
        self.eff += level_refit(t.codes, t.nlevels, Z, r, Ainv)

    def theta(self, s2: float, floor: float = 1e-4, floor_vector: float = 0.01) -> np.ndarray:
        """θ of the term: the covariance of the effects less their mean sampling
        covariance s² A_j⁻¹, over s², re-weighted once (see the module docstring), θ²
        floored at ``floor`` (scalar terms) or eigenvalues at ``floor_vector``."""
        ok = self.ok
        wts = self.cnt[ok] / self.cnt[ok].sum()
        eff = self.eff[ok]
        if self.t.k == 1:
            e, aj = eff[:, 0], self.ainv[ok]
            # variance of b̂_j beyond σ_b²/σ²: sampling 1/n_j, plus a nested factor's share
            extra = aj if self.inner is None else aj + self.inner[0].v[0] ** 2 * self.inner[1][ok]
            w = wts
            for it in range(1 + self.refine):
                if it:
                    # weights 1 / var(b̂_j)²: the score equation of the one-way model, far
                    # less noisy than size weights when level sizes vary a lot
                    w = 1.0 / (max(v, floor) + extra) ** 2
                    w /= w.sum()
                d = e - w @ e
                v = self.spread * (w @ (d * d)) / s2 - w @ extra
            self.neff = 1.0 / (w @ w)             # effective number of levels
            return np.array([np.sqrt(max(v, floor))])
        k = self.t.k
        Ainv = self.Ainv[ok]
        dev = eff - wts @ eff
        S = (dev * wts[:, None]).T @ dev
        V = s2 * np.tensordot(wts, Ainv, axes=1)
        C = _floor_eigen((S - V) / s2, floor_vector)
        for _ in range(self.refine):
            # the score equation Σ_j W_j (b̂_j b̂_j'/s² − A_j⁻¹ − C) W_j = 0 with the
            # weights W_j = (C + A_j⁻¹)⁻¹ at the current C: linear in the new C
            W = np.linalg.inv(C + Ainv)
            G = np.einsum("jab,jb->ja", W, dev) / np.sqrt(s2)        # W_j b̂_j / s
            rhs = np.einsum("ja,jb->ab", G, G) - np.einsum("jab,jbc,jcd->ad", W, Ainv, W)
            K = np.einsum("jac,jdb->abcd", W, W).reshape(k * k, k * k)
            C = _floor_eigen(np.linalg.solve(K, rhs.ravel()).reshape(k, k), floor_vector)
            tr = np.einsum("jaa->j", W)
            self.neff = tr.sum() ** 2 / (tr @ tr)       # effective number of levels
        T = np.linalg.cholesky(C)
        return T[_tril_colmajor(k)]                    # lme4's θ order


def _floor_eigen(C, floor):
    """The symmetric matrix C with its eigenvalues raised to at least ``floor``."""
    ev, Q = np.linalg.eigh(0.5 * (C + C.T))
    return (Q * np.maximum(ev, floor)) @ Q.T


def nested_pairs(fits):
    """(A, B) pairs of intercept-only :class:`LevelFit` s whose factor A is nested in B
    (every level of A lies in one level of B, and A has more levels): finest A first and,
    for each, the B with the most levels (the next coarser factor).  Sets ``A.outer``,
    the level of B of each level of A."""
    ones = sorted((f for f in fits if f.intercept), key=lambda f: -f.t.nlevels)
    out = []
    for i, a in enumerate(ones):
        for b in ones[i + 1:]:
            if b.t.nlevels < a.t.nlevels:
                outer = _outer_levels(a.t.codes, a.t.nlevels, b.t.codes)
                if outer is not None:
                    a.outer = outer
                    out.append((a, b))
                    break
    return out


def _outer_levels(ca, ma: int, cb):
    """The level of factor b of each level of factor a when a is nested in b, else None.

    Crossed factors are told apart on the first few thousand rows, so the check costs
    O(n) only when the factors are nested (or nearly)."""
    n = len(ca)
    for stop in ((4096, n) if n > 4096 else (n,)):
        outer = np.zeros(ma, dtype=np.int64)
        outer[ca[:stop]] = cb[:stop]
        if not np.array_equal(outer[ca[:stop]], cb[:stop]):
            return None
    return outer

"""A fitted linear mixed model: estimates and everything derived from them.

Attribute names are a contract that other packages rely on; they follow lme4's accessors
(``fixef``, ``ranef``, ``VarCorr``, ``sigma``, ``vcov``, ``getME(, "theta")``).
"""
from __future__ import annotations

import math
from functools import cached_property

import numpy as np
import pandas as pd

from .errors import DataError
from .pls import deviance
from .varcorr import term_covariances, varcorr_frame

__all__ = ["LmerFit"]


class LmerFit:
    """The result of :func:`lmmfast.lmer` / :meth:`LinearMixedModel.fit`.

    Attributes
    ----------
    theta : ndarray
        Relative covariance parameters, lme4's order.
    fixef : Series
        Fixed effects β̂, model-matrix column order (``beta``: the same as an array).
    sigma : float
        Residual standard deviation.
    objective : float
        −2 × log-likelihood: lme4's deviance for ML, its REML criterion for REML.
    loglik, aic, bic : float
    vcov : DataFrame
        Covariance matrix of β̂: σ² (R_X'R_X)⁻¹ (``vcov_array``: the same as an array).
    ranef : dict
        Grouping factor -> DataFrame (levels × term columns) of conditional modes b̂.
    ranef_sd : dict
        Same layout: conditional standard deviations (lme4's ``condVar``).
    varcorr : DataFrame
        ``as.data.frame(VarCorr(m))``: grp, var1, var2, vcov, sdcor.
    fitted, residuals : ndarray
    nobs : int
    ngroups : dict
        Grouping factor -> number of levels.
    optsummary : OptSummary
    is_singular : bool
        Some θ on a diagonal of Λ below 1e-4 (lme4's ``isSingular``).
    """

    def __init__(self, model, optsummary):
        self.model = model
        self.optsummary = optsummary
        self.REML = model.REML
        self.formula = model.formula.text
        theta = np.asarray(optsummary.final, dtype=float)
        self.theta = theta
        pls = model.pls
        if not math.isfinite(optsummary.fmin):
            raise DataError(
                "the objective is not finite at any θ the optimizer tried (start θ = "
                f"{np.array2string(np.asarray(optsummary.initial), precision=4)}): Ω(θ) is "
                "not positive definite there or the penalized residual sum of squares is 0. "
                "A start given by hand may be too far out (try start='lme4'); a response "
                "that a grouping factor or the fixed effects determine exactly (e.g. constant "
                "within the levels of a random-effects term) leaves no residual variance")
        self._refactor()
        ldz, ldx, r2 = pls.pieces()
        n, p = model.nobs, model.p
        self.objective = deviance(ldz, ldx, r2, n, p, self.REML)
        self.loglik = -0.5 * self.objective
        self.sigma = math.sqrt(r2 / (n - p if self.REML else n))
        self.nobs = n
        self.n_dropped = model.n_dropped
        npar = p + len(theta) + 1
        self.df = npar
        self.aic = self.objective + 2 * npar
        self.bic = self.objective + math.log(n) * npar
        low = model.theta_lower
        self.is_singular = bool(np.any(np.abs(theta[low == 0]) < 1e-4))
        self.theta_names = list(model.theta_names)

    def _refactor(self):
        """Make sure the model's factor is the one at the estimate (the optimizer's last
        evaluation usually was; later objective calls on the model may have moved it)."""
        pls = self.model.pls
        if pls.theta is None or not np.array_equal(pls.theta, self.theta):
            if pls.factor(self.theta) != 0:  # pragma: no cover (never at a finite optimum)
                raise RuntimeError("the factorization failed at the optimum")

    # β̂, b̂ and vcov are computed on first use (a fit that only needs θ̂ and the
    # objective, e.g. a likelihood-ratio test, never pays for them)
    @cached_property
    def _solution(self):
        self._refactor()
        return self.model.pls.solve()

    @cached_property
    def beta(self) -> np.ndarray:
        """Fixed effects β̂ as an array (Bates et al. 2015, eq. 20)."""
        return self._solution[1]

    @cached_property
    def _b(self) -> list:
        """Conditional modes b_i = u_i T_i' per term, (levels × k_i) arrays."""
        return [ui @ T.T for ui, T in zip(self._solution[0], self._T())]

    @cached_property
    def vcov_array(self) -> np.ndarray:
        """Covariance of β̂ as an array, σ² (R_X'R_X)⁻¹."""
        self._refactor()
        Rinv = self.model.pls.rx_inverse()
        return self.sigma ** 2 * (Rinv @ Rinv.T)

    @cached_property
    def fixef(self) -> pd.Series:
        """Fixed effects β̂ (``beta`` as a Series named by model-matrix column)."""
        return pd.Series(self.beta, index=list(self.model.xnames), name="Estimate")

    @cached_property
    def vcov(self) -> pd.DataFrame:
        """Covariance of β̂, σ² (R_X'R_X)⁻¹ (``vcov_array`` as a labelled DataFrame)."""
        names = list(self.model.xnames)
        return pd.DataFrame(self.vcov_array, index=names, columns=names)

    # ------------------------------------------------------------------ random effects
    def _T(self):
        """Relative covariance factor T_i of each term at the estimate."""
        m = self.model
        return [t.T(self.theta[off: off + t.ntheta]) for t, off in zip(m.terms, m.theta_offsets)]

    def _by_group(self, arrays):
        groups = {}
        for t, a in zip(self.model.terms, arrays):
            df = pd.DataFrame(a, index=pd.Index(t.levels, name=t.group), columns=t.cnames)
            if t.group in groups:
                groups[t.group] = pd.concat([groups[t.group], df], axis=1)
            else:
                groups[t.group] = df
        return groups

    @cached_property
    def ranef(self) -> dict:
        """Conditional modes of the random effects: grouping factor -> DataFrame."""
        return self._by_group(self._b)

    @cached_property
    def ranef_sd(self) -> dict:
        """Conditional standard deviations of the random effects (lme4's condVar):
        square roots of the diagonal of σ² Λ (L_θL_θ')⁻¹ Λ'."""
        pls = self.model.pls
        self._refactor()
        s2 = self.sigma ** 2
        sds = []
        for T, B in zip(self._T(), pls.condvar()):
            C = s2 * np.einsum("ab,jbc,dc->jad", T, B, T)
            sds.append(np.sqrt(np.maximum(np.einsum("jaa->ja", C), 0.0)))
        return self._by_group(sds)

    @property
    def condsd(self) -> dict:
        """Alias of :attr:`ranef_sd`."""
        return self.ranef_sd

    @cached_property
    def varcorr(self) -> pd.DataFrame:
        """Variance components, as ``as.data.frame(VarCorr(m))``."""
        m = self.model
        return varcorr_frame(m.terms, self.theta, m.theta_offsets, self.sigma)

    def cov_re(self) -> list:
        """(term, Σ) pairs: the covariance matrix of each term's random effects."""
        m = self.model
        return term_covariances(m.terms, self.theta, m.theta_offsets, self.sigma)

    @property
    def ngroups(self) -> dict:
        out = {}
        for t in self.model.terms:
            out.setdefault(t.group, t.nlevels)
        return out

    # ------------------------------------------------------------------ fitted values
    def _re_part(self, terms_X, codes_list):
        eta = 0.0
        for Xi, codes, b in zip(terms_X, codes_list, self._b):
            valid = codes >= 0
            contrib = np.zeros(len(codes))
            contrib[valid] = np.einsum("rk,rk->r", Xi[valid], b[codes[valid]])
            eta = eta + contrib
        return eta

    @cached_property
    def fitted(self) -> np.ndarray:
        """Fitted values Xβ̂ + Zb̂ (conditional on the random effects)."""
        m = self.model
        eta = m.X @ self.beta
        return eta + self._re_part([t.X for t in m.terms], [t.codes for t in m.terms])

    @property
    def residuals(self) -> np.ndarray:
        """Response residuals y − fitted."""
        return self.model.y - self.fitted

    def predict(self, newdata=None, re_form=True) -> np.ndarray:
        """Predictions for ``newdata`` (default: the fitted values).

        Levels of a grouping factor not seen in the fit get the population-level
        prediction (their random effect is zero), as lme4's ``allow.new.levels = TRUE``.
        ``re_form=False`` gives population-level predictions for all rows.
        """
        m = self.model
        if newdata is None:
            return self.fitted if re_form else m.X @ self.beta
        Xn = np.asarray(m.fixed_spec.get_model_matrix(newdata, na_action="ignore"), dtype=float)
        eta = Xn[:, m._xkeep] @ self.beta
        if not re_form:
            return eta
        Xs, codes = [], []
        for t in m.terms:
            Xs.append(np.asarray(t.spec.get_model_matrix(newdata, na_action="ignore"), dtype=float))
            c = t.encoder.codes(newdata)
            codes.append(c)
        return eta + self._re_part(Xs, codes)

    # ------------------------------------------------------------------ display
    def coef_table(self) -> pd.DataFrame:
        """Estimate, Std. Error and t value of the fixed effects."""
        se = np.sqrt(np.diag(self.vcov_array))
        est = self.beta
        return pd.DataFrame({"Estimate": est, "Std. Error": se, "t value": est / se},
                            index=self.fixef.index)

    def summary(self) -> str:
        """lme4-style summary text."""
        from .summary import format_summary

        return format_summary(self)

    def __str__(self):
        return self.summary()

    def __repr__(self):
        return (f"<LmerFit {self.formula!r} {'REML' if self.REML else 'ML'} "
                f"objective={self.objective:.4f} n={self.nobs}>")

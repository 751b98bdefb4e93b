"""Results of a statsmodels-style fit: statsmodels' names over an :class:`lmmfast.LmerFit`.

:class:`MixedLMResults` wraps the :class:`~lmmfast.LmerFit` of the equivalent lme4 model
and answers to both vocabularies: statsmodels' (``params``, ``bse``, ``pvalues``,
``random_effects``, ``summary()``, ...) and lmmfast's (``fixef``, ``ranef``, ``varcorr``,
``theta``, ... -- any attribute it does not define itself is looked up on the LmerFit).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from .. import icc as _icc

__all__ = ["MixedLMResults", "Summary"]


def _re_names(term) -> list:
    """Random-effect column names, statsmodels style: the intercept is named by its group."""
    return [term.group if c == "(Intercept)" else c for c in term.cnames]


def _unique(names: list) -> list:
    seen, out = {}, []
    for nm in names:
        c = seen.get(nm, 0)
        out.append(nm if c == 0 else f"{nm}.{c}")
        seen[nm] = c + 1
    return out


class MixedLMResults:
    """A fitted :class:`~lmmfast.formula.api.MixedLM`.

    statsmodels' names are listed below; every lmmfast name is forwarded to the wrapped
    :class:`~lmmfast.LmerFit` (``lmer_fit.summary()`` gives lme4's summary layout, and
    ``lmer_fit.model`` / ``model.lmm`` the :class:`~lmmfast.LinearMixedModel`).

    Attributes
    ----------
    params : Series
        Fixed effects, then the variance parameters of the random effects, named as
        statsmodels names them: ``"classroom Var"`` (random-intercept variance),
        ``"classroom age Var"`` (slope variance), ``"classroom x age Cov"`` (intercept-slope
        covariance).  Unlike statsmodels (which stores them divided by ``scale``), these are
        the variances and covariances themselves, as in ``summary()`` and ``varcorr``.
    fe_params, bse_fe : Series
        Fixed effects and their standard errors.
    bse, tvalues, pvalues : Series
        Over ``params``; NaN for the variance parameters (lmmfast does not compute their
        standard errors).  ``pvalues`` use the normal approximation, as statsmodels
        (``2 * norm.sf(|z|)``, z = estimate / SE); lme4 prints no p-values at all.
    cov_re : DataFrame or dict
        Covariance matrix of the random effects: a DataFrame when the model has one
        grouping factor (as in statsmodels), otherwise a dict grouping factor -> DataFrame.
    vcomp : Series
        The variance of every random effect (the ``Var`` entries of ``params``).
    random_effects : dict
        Conditional modes.  One grouping factor: level -> Series (as statsmodels);
        several: ``(factor, level)`` -> Series.  ``ranef`` has them as DataFrames.
    llf, aic, bic : float
        Log-likelihood (the REML one for REML fits), lme4's AIC and BIC (statsmodels gives
        NaN for REML fits).
    scale : float
        Residual variance σ².
    converged : bool
    fittedvalues, resid : Series
        Conditional fitted values (fixed + random effects) and residuals, indexed like the
        rows of the data that were used.
    nobs : int
    model : MixedLM
        The statsmodels-style model; ``model.lme4_formula`` is what was fitted.
    lmer_fit : LmerFit
        The lmmfast result; its attributes (``fixef``, ``ranef``, ``varcorr``, ``theta``,
        ``objective``, ``sigma``, ``vcov``, ``optsummary``, ...) are also this object's.
    """

    def __init__(self, fit, model):
        from .api import fixed_names

        self.lmer_fit = fit
        self.model = model
        self.method = "REML" if fit.REML else "ML"
        self.reml = bool(fit.REML)
        self.fe_params = pd.Series(fit.fixef.to_numpy(), index=fixed_names(fit.model), dtype=float)
        self.exog_names = list(self.fe_params.index)
        self.k_fe = len(self.fe_params)
        names, values, is_var = [], [], []
        for t, S in fit.cov_re():
            re = _re_names(t)
            pref = [re[a] if re[a] == t.group else f"{t.group} {re[a]}" for a in range(t.k)]
            for i in range(t.k):           # statsmodels' order: row-wise lower triangle
                for j in range(i + 1):
                    if i == j:
                        names.append(f"{pref[i]} Var")
                        is_var.append(True)
                    else:
                        names.append(f"{pref[j]} x {re[i]} Cov")
                        is_var.append(False)
                    values.append(S[i, j])
        names = _unique(names)
        self._vparams = pd.Series(values, index=names, dtype=float)
        self._is_var = np.array(is_var, dtype=bool)
        self.k_re = len(self._vparams)

    # ------------------------------------------------------------------ delegation
    def __getattr__(self, name):
        if name.startswith("__") or name == "lmer_fit":
            raise AttributeError(name)
        try:
            fit = self.__dict__["lmer_fit"]
        except KeyError:
            raise AttributeError(name) from None
        try:
            return getattr(fit, name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__!r} object (and its LmerFit) has no "
                                 f"attribute {name!r}") from None

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(dir(self.lmer_fit)))

    # ------------------------------------------------------------------ parameters
    @property
    def params(self) -> pd.Series:
        """Fixed effects, then random-effects variances and covariances."""
        return pd.concat([self.fe_params, self._vparams])

    @property
    def vcomp(self) -> pd.Series:
        """Variances of the random effects (the ``Var`` entries of ``params``)."""
        return self._vparams[self._is_var]

    @property
    def bse_fe(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self.lmer_fit.vcov.to_numpy())), index=self.fe_params.index)

    @property
    def bse_re(self) -> pd.Series:
        """NaN: standard errors of variance parameters are not computed."""
        return pd.Series(np.nan, index=self._vparams.index)

    @property
    def bse(self) -> pd.Series:
        return pd.concat([self.bse_fe, self.bse_re])

    def cov_params(self) -> pd.DataFrame:
        """Covariance matrix of ``params``: ``vcov`` for the fixed effects, NaN elsewhere."""
        idx = self.params.index
        out = pd.DataFrame(np.nan, index=idx, columns=idx)
        fe = self.fe_params.index
        out.loc[fe, fe] = self.lmer_fit.vcov.to_numpy()
        return out

    @property
    def tvalues(self) -> pd.Series:
        """z statistics, estimate / standard error (NaN for variance parameters)."""
        return self.params / self.bse

    @property
    def pvalues(self) -> pd.Series:
        """Two-sided p-values from the normal approximation (as statsmodels' MixedLM)."""
        z = self.tvalues.to_numpy()
        return pd.Series(2.0 * stats.norm.sf(np.abs(z)), index=self.params.index)

    def conf_int(self, alpha: float = 0.05, cols=None) -> pd.DataFrame:
        """Wald confidence intervals ``estimate ± z_{1-α/2} SE`` (NaN for variance parameters).

        Parameters
        ----------
        alpha : float
            1 - confidence level.
        cols : list, optional
            Positions or names of the parameters to return (default all).

        Returns
        -------
        DataFrame
            Columns 0 (lower) and 1 (upper), as statsmodels.
        """
        q = stats.norm.ppf(1.0 - alpha / 2.0)
        p, se = self.params, self.bse
        out = pd.DataFrame({0: p - q * se, 1: p + q * se})
        if cols is not None:
            cols = list(cols)
            out = out.iloc[cols] if all(isinstance(c, (int, np.integer)) for c in cols) else out.loc[cols]
        return out

    # ------------------------------------------------------------------ random effects
    def _cov_by_group(self, scale: float = 1.0) -> dict:
        out = {}
        for t, S in self.lmer_fit.cov_re():
            out.setdefault(t.group, []).append((_re_names(t), S / scale))
        res = {}
        for g, parts in out.items():
            names = _unique([n for nm, _ in parts for n in nm])
            M = np.zeros((len(names), len(names)))
            o = 0
            for nm, S in parts:
                k = len(nm)
                M[o:o + k, o:o + k] = S
                o += k
            res[g] = pd.DataFrame(M, index=names, columns=names)
        return res

    @property
    def cov_re(self):
        """Random-effects covariance: DataFrame (one grouping factor) or dict of them."""
        d = self._cov_by_group()
        return next(iter(d.values())) if len(d) == 1 else d

    @property
    def cov_re_unscaled(self):
        """``cov_re / scale`` (statsmodels' parameterisation)."""
        d = self._cov_by_group(self.scale)
        return next(iter(d.values())) if len(d) == 1 else d

    @property
    def random_effects(self) -> dict:
        """Conditional modes: level -> Series, or (factor, level) -> Series with several factors."""
        out = {}
        ranef = self.lmer_fit.ranef
        single = len(ranef) == 1
        for g, df in ranef.items():
            cols = _unique([g if c == "(Intercept)" else c for c in df.columns])
            vals = df.to_numpy()
            for lv, row in zip(df.index, vals):
                out[lv if single else (g, lv)] = pd.Series(row, index=cols, name=lv)
        return out

    # ------------------------------------------------------------------ fit statistics
    @property
    def llf(self) -> float:
        return float(self.lmer_fit.loglik)

    @property
    def scale(self) -> float:
        return float(self.lmer_fit.sigma ** 2)

    @property
    def converged(self) -> bool:
        return bool(self.lmer_fit.optsummary.converged)

    @property
    def fittedvalues(self) -> pd.Series:
        return pd.Series(self.lmer_fit.fitted, index=self.lmer_fit.model.row_index)

    @property
    def resid(self) -> pd.Series:
        return pd.Series(self.lmer_fit.residuals, index=self.lmer_fit.model.row_index)

    def predict(self, exog=None, re_form: bool = False) -> pd.Series:
        """Predictions, population-level by default (as statsmodels' ``MixedLMResults.predict``).

        Parameters
        ----------
        exog : DataFrame, optional
            New data with the formula's columns (default: the fitted rows).
        re_form : bool, default False
            Add the random effects (lme4's ``predict``; unseen levels get zero).

        Returns
        -------
        Series
        """
        fit = self.lmer_fit
        if exog is None:
            return pd.Series(fit.predict(None, re_form=re_form), index=fit.model.row_index)
        exog = pd.DataFrame(exog)
        return pd.Series(fit.predict(exog, re_form=re_form), index=exog.index)

    # ------------------------------------------------------------------ interpretation
    def icc(self):
        """Intra-class correlations and variance partition (:func:`lmmfast.icc.icc`)."""
        return _icc.icc(self.lmer_fit)

    def vpc(self, at=None) -> pd.Series:
        """Variance partition coefficients (:func:`lmmfast.icc.vpc`)."""
        return _icc.vpc(self.lmer_fit, at)

    def summary(self, alpha: float = 0.05) -> "Summary":
        """statsmodels-style summary, plus random-effect SDs, correlations and ICCs."""
        from .summary import build_summary

        return build_summary(self, alpha)

    def __repr__(self):
        return (f"<lmmfast.formula.MixedLMResults {self.model.lme4_formula!r} {self.method} "
                f"llf={self.llf:.4f} n={self.nobs}>")


class Summary:
    """Text of a fitted model's summary; ``print()`` it.  ``tables`` holds its DataFrames."""

    def __init__(self, text: str, tables: list):
        self.text = text
        self.tables = tables

    def as_text(self) -> str:
        return self.text

    def __str__(self):
        return self.text

    __repr__ = __str__

    def _repr_html_(self):  # pragma: no cover  (notebooks)
        import html

        return f"<pre>{html.escape(self.text)}</pre>"


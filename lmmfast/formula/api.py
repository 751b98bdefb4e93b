"""statsmodels' face on lmmfast: ``import lmmfast.formula.api as smf``.

Code written for ``statsmodels.formula.api.mixedlm`` runs with only the import changed,
and lme4 bars may be written straight into the formula::

    import lmmfast.formula.api as smf
    data = lmmfast.datasets.load("students")
    res = smf.mixedlm("test_score ~ age + sex + (1|classroom) + (1|school)", data,
                      groups=data["student_id"]).fit()
    print(res.summary())

Every call is translated into one lme4 formula (``MixedLM.lme4_formula``) and fitted by
:class:`lmmfast.LinearMixedModel`, so the estimates are those of ``lmmfast.lmer`` / lme4.
"""
from __future__ import annotations

import warnings

from ..errors import DataError
from ..model import LinearMixedModel
from .results import MixedLMResults
from .translate import SamePartitionWarning, check_same_partitions, translate

__all__ = ["mixedlm", "MixedLM", "MixedLMResults", "SamePartitionWarning"]

# statsmodels' optimizer names: accepted and ignored (lmmfast uses lmer's default optimizer)
_SM_METHODS = {"bfgs", "lbfgs", "l-bfgs-b", "cg", "nm", "nelder-mead", "powell", "newton",
               "basinhopping", "minimize"}
_OWN_METHODS = {"bobyqa", "nloptwrap"}
# keywords of lmmfast's own fit, passed through
_CONTROL = {"xtol_abs", "ftol_abs", "ftol_rel", "maxeval", "start", "callback", "verbose",
            "optimizer", "initial_step"}
# scipy / statsmodels optimizer options: accepted and ignored (forwarded only to lmmfast's
# L-BFGS-B when optimizer="lbfgs" is asked for explicitly)
_IGNORED = {"gtol", "xtol", "ftol", "norm", "eps", "retall", "return_all", "full_output",
            "niter_sa", "do_cg", "use_sqrt", "callback_kwargs", "epsilon"}


class MixedLM:
    """A linear mixed model specified statsmodels-style (see :func:`mixedlm`).

    The model is built (and every identifiability check made) when it is created; nothing
    is estimated until :meth:`fit`.

    Attributes
    ----------
    formula : str
        The formula as given.
    lme4_formula : str
        The equivalent lme4 formula that is fitted, e.g.
        ``"test_score ~ age + sex + (1 | classroom) + (1 | student_id)"``.
    data : DataFrame
        The data fitted: the user's frame, or a copy with the ``groups`` column added
        (the user's frame is never modified).
    groups : str or None
        The column name of the ``groups`` factor in ``data``.
    lmm : LinearMixedModel
        The lmmfast model (REML criterion).
    endog_names : str
        The response.
    exog_names : list of str
        Fixed-effects names, statsmodels style (``"Intercept"``, ``"sex[T.M]"``).
    nobs : int
    """

    def __init__(self, formula, data, re_formula=None, vc_formula=None, subset=None,
                 use_sparse=False, missing="none", *, groups=None):
        if missing not in ("none", "drop", "raise"):
            raise ValueError(f"missing must be 'none', 'drop' or 'raise', got {missing!r}")
        if subset is not None:
            data = data.loc[subset]
        self.formula = formula
        tr = translate(formula, data, groups=groups, re_formula=re_formula, vc_formula=vc_formula)
        self.translation = tr
        self.lme4_formula = tr.formula
        self.data = tr.data
        self.groups = tr.groups
        self.missing = missing
        self._models = {}
        self.lmm = self._build(True)
        if missing == "raise" and self.lmm.n_dropped:
            raise DataError(f"{self.lmm.n_dropped} rows have a missing value in the model's "
                            "columns (missing='raise'); use missing='drop' to drop them")
        self.partitions = check_same_partitions(self.lmm.terms, stacklevel=4)
        self.endog_names = tr.response
        self.exog_names = fixed_names(self.lmm)
        self.nobs = self.lmm.nobs

    def _build(self, reml: bool) -> LinearMixedModel:
        if reml in self._models:
            return self._models[reml]
        try:
            with warnings.catch_warnings():
                if self._models:          # warnings were shown for the first build already
                    warnings.simplefilter("ignore")
                m = LinearMixedModel(self.lme4_formula, self.data, REML=reml)
        except DataError as e:
            g = self.groups
            if g is not None and f"'{g}'" in str(e) and "residual" in str(e):
                raise DataError(
                    f"{e}.\nThe term comes from groups={g!r}, which adds a random intercept for "
                    f"{g!r} (statsmodels' meaning); leave groups= out when each {g} has a single "
                    "row, or when the formula's bars already describe the model") from e
            raise
        self._models[reml] = m
        return m

    def fit(self, start_params=None, reml=True, niter_sa=0, do_cg=True, fe_pen=None,
            cov_pen=None, free=None, full_output=False, method=None, maxiter=None, disp=False,
            **kwargs) -> MixedLMResults:
        """Estimate the model: REML (default) or maximum likelihood.

        statsmodels' signature is accepted.  lmmfast minimises lme4's profiled criterion
        over θ with the optimizer :func:`lmmfast.lmer` uses by default, whatever
        statsmodels optimizer is named, so the estimates are those of ``lmmfast.lmer`` on
        ``model.lme4_formula`` (they depend on the model and on ``reml`` only):

        Parameters
        ----------
        start_params : ignored
            statsmodels' packed parameterisation has no counterpart here (a warning says
            so); pass ``start=`` (a θ vector, lme4 order) to start lmmfast's optimizer.
        reml : bool, default True
            REML (True) or maximum likelihood (False).  ``REML=`` is accepted as well.
        niter_sa, do_cg, full_output : ignored
            Options of statsmodels' own optimisation strategy.
        fe_pen, cov_pen, free : must be None
            Penalised or constrained fits are not supported (NotImplementedError rather than
            a fit of a different model).
        method : str or list, optional
            statsmodels' optimizer names (``"lbfgs"``, ``"bfgs"``, ``"cg"``, ``"nm"``,
            ``"powell"``, ...) are accepted and ignored; ``"bobyqa"`` (or
            ``"nloptwrap"``) asks for lme4's BOBYQA.  To choose lmmfast's optimizer, pass
            ``optimizer=`` (see :meth:`lmmfast.LinearMixedModel.fit`).
        maxiter : int, optional
            Maximum number of objective evaluations (the optimizer's ``maxeval``).
        disp : bool
            Print the optimizer's progress.
        **kwargs
            lmmfast's fit controls (``optimizer``, ``xtol_abs``, ``ftol_abs``,
            ``ftol_rel``, ``maxeval``, ``initial_step``, ``start``, ``callback``,
            ``verbose``); scipy optimizer options statsmodels would pass on (``gtol``,
            ``xtol``, ``ftol``, ...) are ignored, except ``gtol`` and ``ftol`` with
            ``optimizer="lbfgs"``.  Anything else is a TypeError.

        Returns
        -------
        MixedLMResults
        """
        if "REML" in kwargs:
            reml = kwargs.pop("REML")
        for name, value in (("fe_pen", fe_pen), ("cov_pen", cov_pen), ("free", free)):
            if value is not None:
                raise NotImplementedError(f"{name} is not supported by lmmfast: penalised or "
                                          "constrained fits would be a different model")
        if start_params is not None:
            warnings.warn("start_params is ignored: statsmodels' parameterisation has no "
                          "counterpart in lmmfast; pass start= (θ, lme4 order) instead",
                          UserWarning, stacklevel=2)
        methods = [method] if isinstance(method, str) or method is None else list(method)
        for mth in methods:
            if mth is not None and mth.lower() not in _SM_METHODS | _OWN_METHODS:
                raise ValueError(f"unknown method {mth!r}; lmmfast accepts 'bobyqa' (lme4's "
                                 f"optimizer) and ignores statsmodels' {sorted(_SM_METHODS)}")
        control = {}
        if any(m is not None and m.lower() in _OWN_METHODS for m in methods):
            control["optimizer"] = "bobyqa"
        lbfgs = str(kwargs.get("optimizer", "")).lower() == "lbfgs"
        for k, v in kwargs.items():
            if k in _CONTROL or (lbfgs and k in ("gtol", "ftol")):
                control[k] = v
            elif k in ("maxfun", "maxfev"):
                control["maxeval"] = v
            elif k not in _IGNORED:
                raise TypeError(f"fit() got an unexpected keyword argument {k!r}")
        if maxiter is not None:
            control["maxeval"] = int(maxiter)
        if disp:
            control.setdefault("verbose", True)
        lmm = self._build(bool(reml))
        return MixedLMResults(lmm.fit(**control), self)

    def __repr__(self):
        return f"<lmmfast.formula.MixedLM {self.lme4_formula!r} n={self.nobs}>"


def fixed_names(lmm) -> list:
    """statsmodels-style names of the fixed effects (``Intercept``, ``sex[T.M]``)."""
    from ..remat import lme4_name

    cn = lmm.fixed_spec.column_names
    cn = list(cn() if callable(cn) else cn)
    back = {lme4_name(c): c for c in cn}
    back["(Intercept)"] = "Intercept"
    return [back.get(x, x) for x in lmm.xnames]


def mixedlm(formula, data, re_formula=None, vc_formula=None, subset=None, use_sparse=False,
            missing="none", *, groups=None) -> MixedLM:
    """A linear mixed model from a formula, statsmodels' way -- lme4 bars welcome.

    Parameters
    ----------
    formula : str
        ``"y ~ fixed effects"``, optionally with lme4 random-effects bars: ``(1|g)``,
        ``(x|g)``, ``(0 + x|g)``, ``(1 + x||g)``, ``(1|a:b)``, ``(1|a/b)``.
    data : DataFrame
        Never modified.
    re_formula : str or dict, optional
        A **string** keeps statsmodels' meaning: the random-effects design of the
        ``groups`` factor (``"~age"`` ≡ ``(1 + age | groups)``; default ``"1"``).
        A **dict** maps grouping factors to random-effects formulas:
        ``{"classroom": "~1 + age"}`` ≡ ``(1 + age | classroom)``.  A factor named both
        in a bar and in the dict (or as ``groups``) gets one term whose design is the union
        of the two: ``(age|classroom)`` with ``{"classroom": "~1"}`` stays
        ``(age|classroom)``.  When the factor already has several uncorrelated terms
        (from ``||``), each new column becomes one more uncorrelated term.
    vc_formula : dict, optional
        grouping factor -> value.  A value naming a **covariance structure** sets that
        factor's structure: ``"diag"`` (uncorrelated effects, like ``||``; aliases
        ``"diagonal"``, ``"independent"``) or ``"full"`` / ``"unstructured"`` (one
        correlated term, like ``|``); a factor with no other random effect gets a random
        intercept.  A value that is a **formula** keeps statsmodels' meaning: a variance
        component nested in ``groups`` -- ``{"classroom": "0 + C(classroom)"}`` ≡
        ``(1 | groups:classroom)``, ``"0 + C(c):x"`` ≡ ``(0 + x | groups:c)``, ``"0 + x"``
        ≡ ``(0 + x | groups)`` (independent of the other effects of ``groups``).  Unknown
        structure names are an error listing the known ones.
    subset : array_like, optional
        Rows of ``data`` to use (``data.loc[subset]``).
    use_sparse : ignored
        lmmfast always exploits sparsity.
    missing : {"none", "drop", "raise"}
        Rows with a missing value in a used column are dropped (lme4's ``na.omit``) for
        "none" and "drop"; "raise" makes them an error.
    groups : str or array_like, optional
        A column name, or a Series / array with one label per row.  As in statsmodels it
        adds a random-effects term for that factor -- a random intercept, or the design of
        a string ``re_formula`` -- alongside any bars.  A Series that is not a column of
        ``data`` is added to a copy of ``data``, named by the Series' name (or ``"groups"``).

    Returns
    -------
    MixedLM
        Call ``.fit()`` for a :class:`MixedLMResults`.

    Raises
    ------
    FormulaError
        Malformed or contradictory random-effects specifications.
    DataError
        Models that cannot be estimated: a grouping factor with one level, or one with a
        level per row (e.g. ``groups=student_id`` when each student has a single row: its
        variance cannot be told apart from the residual variance; lme4 refuses it too).

    Warns
    -----
    SamePartitionWarning
        Two grouping factors split the rows identically (``classroom`` and
        ``school:classroom`` when classroom labels are unique): their variances are not
        separately identifiable.  The fit is still the optimum lme4 finds.

    Notes
    -----
    ``fit()`` results carry statsmodels' names (``params``, ``bse``, ``pvalues``,
    ``random_effects``, ...) and lmmfast's (``fixef``, ``ranef``, ``varcorr``, ...).
    Known differences from statsmodels: variance parameters in ``params`` are variances
    (statsmodels stores them divided by ``scale``) and have no standard errors (NaN);
    ``aic``/``bic`` of REML fits are lme4's (statsmodels gives NaN); ``predict()`` is
    population-level as in statsmodels (``re_form=True`` adds the random effects).

    Examples
    --------
    >>> import lmmfast, lmmfast.formula.api as smf
    >>> data = lmmfast.datasets.load("students")
    >>> res = smf.mixedlm("test_score ~ age + sex + (1|classroom)", data,
    ...                   groups="student_id").fit()
    >>> res.model.lme4_formula
    'test_score ~ age + sex + (1 | classroom) + (1 | student_id)'
    """
    return MixedLM(formula, data, re_formula=re_formula, vc_formula=vc_formula, subset=subset,
                   use_sparse=use_sparse, missing=missing, groups=groups)


MixedLM.from_formula = staticmethod(mixedlm)

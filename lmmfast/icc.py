"""Intra-class correlations and variance partition coefficients of a fitted mixed model.

How much of the variation in the response is due to each grouping level?  For a
random-intercept model ``y = Xβ + u_province + u_school + u_classroom + e`` the answer is
the *variance partition coefficient* (VPC) of each level,

    VPC_g = σ²_g / (Σ_h σ²_h + σ²),

which is also the correlation between two observations that share level g's group and no
other (the intra-class correlation).  The *adjusted ICC* of R's ``performance::icc`` is
the share of all random-effect variance,

    ICC_adj = σ²_random / (σ²_random + σ²),     ICC_cond = σ²_random / (σ²_fixed + σ²_random + σ²),

with ``σ²_fixed = var(Xβ̂)`` (the variance explained by the fixed effects) for the
*conditional ICC*.

With random slopes the variance a grouping level contributes depends on the covariates:
observation i gets ``z_i' Σ_g z_i`` from a term with covariance Σ_g and design row z_i.
Following ``insight::get_variance(component = "random")`` (used by ``performance::icc``),
σ²_random is the average of ``Σ_g z_i' Σ_g z_i`` over the observations, and the VPC of a
level is the average of its own ``z_i' Σ_g z_i`` over the same observations -- so the VPCs
of all levels and the residual share add up to 1, and reduce to the formulas above when
there are no slopes.  (insight takes z_i from the fixed-effects model matrix, dropping
random slopes whose variable is not a fixed effect; here z_i is the random-effects term's
own design row, which is the same whenever the slope variables are also fixed effects.)
``vpc(fit, at=...)`` gives the shares at chosen covariate values instead.

>>> import lmmfast
>>> from lmmfast.icc import icc
>>> m = lmmfast.lmer("test_score ~ age + sex + (1|classroom) + (1|school) + (1|province)",
...                  lmmfast.datasets.load("students"))
>>> print(icc(m))                                              # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["ICCResult", "icc", "vpc", "random_variance", "fixed_variance", "group_variances"]


def _term_designs(fit, at=None) -> list:
    """(term, Σ, Z) for each random-effects term; Z the rows of the term's design."""
    out = []
    for t, S in fit.cov_re():
        if at is None:
            Z = np.asarray(t.X, dtype=float)
        else:
            Z = np.asarray(t.spec.get_model_matrix(at, na_action="ignore"), dtype=float)
        out.append((t, np.asarray(S, dtype=float), Z))
    return out


def _as_frame(at):
    if at is None or isinstance(at, pd.DataFrame):
        return at
    if isinstance(at, pd.Series):
        return at.to_frame().T
    if isinstance(at, dict):
        return pd.DataFrame({k: np.atleast_1d(v) for k, v in at.items()})
    raise TypeError(f"at must be a DataFrame, Series or dict, got {type(at).__name__}")


def group_variances(fit, at=None) -> pd.Series:
    """Average variance each grouping factor contributes per observation.

    Parameters
    ----------
    fit : LmerFit
    at : DataFrame, Series or dict, optional
        Covariate values to average over (default: the fitted observations).  Only the
        variables of the random-effects terms are needed (``{"age": 12}``).

    Returns
    -------
    Series
        Grouping factor -> mean over rows of ``Σ_terms z_i' Σ_term z_i`` (terms of one
        factor, e.g. from ``||``, are added up).  For a random intercept this is its
        variance σ²_g.
    """
    at = _as_frame(at)
    out = {}
    for t, S, Z in _term_designs(fit, at):
        v = float(np.mean(np.einsum("ij,jk,ik->i", Z, S, Z)))
        out[t.group] = out.get(t.group, 0.0) + v
    return pd.Series(out, name="variance", dtype=float)


def random_variance(fit, at=None) -> float:
    """σ²_random: the mean over observations of ``Σ_g z_i' Σ_g z_i`` (insight's definition)."""
    return float(group_variances(fit, at).sum())


def fixed_variance(fit) -> float:
    """σ²_fixed = var(Xβ̂) over the fitted observations (denominator n - 1, as R's ``var``)."""
    eta = np.asarray(fit.model.X, dtype=float) @ fit.fixef.to_numpy()
    return float(np.var(eta, ddof=1)) if len(eta) > 1 else 0.0


def vpc(fit, at=None) -> pd.Series:
    """Variance partition coefficients: the share of each grouping level and the residual.

    Parameters
    ----------
    fit : LmerFit
    at : DataFrame, Series or dict, optional
        Covariate values at which to partition the variance (averaged over its rows);
        default the fitted observations.  Matters only for models with random slopes.

    Returns
    -------
    Series
        Grouping factor -> share of ``σ²_random + σ²``, then ``"Residual"``; sums to 1.
        For random-intercept models, ``σ²_g / (Σ_h σ²_h + σ²)``.
    """
    gv = group_variances(fit, at)
    s2 = fit.sigma ** 2
    total = gv.sum() + s2
    out = pd.concat([gv, pd.Series({"Residual": s2})]) / total
    out.name = "VPC"
    return out


def _has_slopes(fit) -> bool:
    return any(list(t.cnames) != ["(Intercept)"] for t, _ in fit.cov_re())


@dataclass(frozen=True)
class ICCResult:
    """Intra-class correlations of a fitted model (see :mod:`lmmfast.icc`).

    Attributes
    ----------
    adjusted : float
        ``σ²_random / (σ²_random + σ²)`` -- performance::icc's ``ICC_adjusted``: the share
        of the variance not explained by the fixed effects that lies between groups.
    conditional : float
        ``σ²_random / (σ²_fixed + σ²_random + σ²)`` -- ``ICC_conditional``: the same share of
        the total variance, fixed effects included.
    var_random, var_fixed, var_residual : float
        σ²_random, σ²_fixed and σ² (insight's ``var.random``, ``var.fixed``,
        ``var.residual``).
    by_group : Series
        :func:`vpc`: each grouping level's share of ``σ²_random + σ²``, and the residual's.
    random_slopes : bool
        Whether some term has more than an intercept (then the shares are averages over the
        observations' covariate values).
    """

    adjusted: float
    conditional: float
    var_random: float
    var_fixed: float
    var_residual: float
    by_group: pd.Series
    random_slopes: bool

    def __str__(self):
        lines = ["Intra-class correlation",
                 f"  adjusted ICC:     {self.adjusted:.4f}   (random / (random + residual))",
                 f"  conditional ICC:  {self.conditional:.4f}   (random / (fixed + random + residual))",
                 "Variance partition (share of random + residual variance):"]
        w = max(len(str(k)) for k in self.by_group.index)
        for k, v in self.by_group.items():
            lines.append(f"  {str(k):<{w}}  {v:.4f}")
        if self.random_slopes:
            lines.append("  (random slopes: variances averaged over the observed covariates)")
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle):  # pragma: no cover
        p.text(str(self))


def icc(fit) -> ICCResult:
    """Intra-class correlations of a fitted model, as R's ``performance::icc``.

    Parameters
    ----------
    fit : LmerFit or MixedLMResults
        A fitted model (``lmmfast.lmer`` or ``lmmfast.formula.api.mixedlm(...).fit()``).

    Returns
    -------
    ICCResult
        ``adjusted``, ``conditional``, the variance components and ``by_group`` VPCs.

    Notes
    -----
    Reading them: ``by_group["school"] = 0.10`` says 10 % of the variance of the response
    around the fixed-effects prediction lies between schools.  In a random-intercept
    model the correlation of two observations is the sum of the shares of the groups they
    have in common: two pupils of one school but different classrooms share the school
    and (by nesting) the province, so their correlation is ``by_group["school"] +
    by_group["province"]``.  ``adjusted`` adds up all grouping levels: the correlation of
    two observations that share every group (two test scores of one student, when
    ``student_id`` is a grouping factor).
    """
    fit = getattr(fit, "lmer_fit", fit)
    vr = random_variance(fit)
    vf = fixed_variance(fit)
    s2 = fit.sigma ** 2
    return ICCResult(adjusted=vr / (vr + s2), conditional=vr / (vf + vr + s2), var_random=vr,
                     var_fixed=vf, var_residual=s2, by_group=vpc(fit),
                     random_slopes=_has_slopes(fit))

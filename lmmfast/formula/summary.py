"""statsmodels-layout summary of a :class:`MixedLMResults`, with the interpretation added.

Sections: the header (statsmodels' key/value block), the coefficient table (statsmodels'
``Coef. Std.Err. z P>|z| [0.025 0.975]``, variance parameters below the fixed effects),
then what statsmodels leaves out: each random effect's variance, standard deviation and
correlations (lme4's ``VarCorr``), and the variance partition -- each grouping level's
share of the variance (VPC) and the intra-class correlations of ``performance::icc``.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

__all__ = ["build_summary"]


def _f(x, nd=3) -> str:
    if x is None:
        return ""
    x = float(x)
    if not math.isfinite(x):
        return ""
    return f"{x:.{nd}f}"


def _g(x) -> str:
    x = float(x)
    if not math.isfinite(x):
        return ""
    return f"{x:.4g}" if (abs(x) >= 1e-3 or x == 0) else f"{x:.3e}"


def _table(rows, header, align) -> list:
    cols = list(zip(*([header] + rows)))
    widths = [max(len(str(c)) for c in col) for col in cols]
    out = []
    for row in [header] + rows:
        cells = [str(c).ljust(w) if a == "l" else str(c).rjust(w)
                 for c, w, a in zip(row, widths, align)]
        out.append("  ".join(cells).rstrip())
    return out


def _kv_block(left, right) -> list:
    n = max(len(left), len(right))
    left = left + [("", "")] * (n - len(left))
    right = right + [("", "")] * (n - len(right))
    wk1 = max(len(k) for k, _ in left) + 1
    wv1 = max(len(v) for _, v in left) + 2
    wk2 = max(len(k) for k, _ in right) + 1
    out = []
    for (k1, v1), (k2, v2) in zip(left, right):
        out.append(f"{k1:<{wk1}} {v1:<{wv1}} {k2:<{wk2}} {v2}".rstrip())
    return out


def build_summary(res, alpha: float = 0.05):
    """Build the :class:`~lmmfast.formula.results.Summary` of ``res``."""
    from ..icc import group_variances, icc
    from .results import Summary

    fit = res.lmer_fit
    tables = []
    # ------------------------------------------------------------ header
    sizes = {}
    for t in fit.model.terms:
        if t.group not in sizes:
            sizes[t.group] = np.bincount(t.codes, minlength=t.nlevels)
    left = [("Model:", "MixedLM"), ("No. Observations:", str(fit.nobs))]
    if len(sizes) == 1:
        (g, sz), = sizes.items()
        left += [("No. Groups:", str(len(sz))), ("Min. group size:", str(int(sz.min()))),
                 ("Max. group size:", str(int(sz.max()))), ("Mean group size:", f"{sz.mean():.1f}")]
    else:
        left += [("Grouping factors:", f"{len(sizes)} (below)")]
    right = [("Dependent Variable:", res.model.endog_names), ("Method:", res.method),
             ("Scale:", f"{res.scale:.4f}"), ("Log-Likelihood:", f"{res.llf:.4f}"),
             ("Converged:", "Yes" if res.converged else "No")]
    if len(sizes) > 1:
        left += [("AIC:", f"{res.aic:.4f}"), ("BIC:", f"{res.bic:.4f}")]
    head = _kv_block(left, right)

    # ------------------------------------------------------------ coefficients
    lo, hi = f"[{alpha / 2:.3f}", f"{1 - alpha / 2:.3f}]"
    ci = res.conf_int(alpha)
    params, bse, z, pv = res.params, res.bse, res.tvalues, res.pvalues
    rows = []
    for nm in params.index:
        rows.append([nm, _f(params[nm]), _f(bse[nm]), _f(z[nm], 2), _f(pv[nm]),
                     _f(ci.loc[nm, 0]), _f(ci.loc[nm, 1])])
    coef = _table(rows, ["", "Coef.", "Std.Err.", "z", "P>|z|", lo, hi], "lrrrrrr")
    tables.append(pd.DataFrame({"Coef.": params, "Std.Err.": bse, "z": z, "P>|z|": pv,
                                lo: ci[0], hi: ci[1]}))

    width = max(len(coef[0]), max(len(x) for x in head))
    title = "Mixed Linear Model Regression Results"
    lines = [title.center(width).rstrip(), "=" * width] + head
    lines.append(f"Formula (lme4):    {res.model.lme4_formula}")
    if len(sizes) > 1:
        grows = [[g, str(len(sz)), str(int(sz.min())), f"{sz.mean():.1f}", str(int(sz.max()))]
                 for g, sz in sizes.items()]
        lines.append("-" * width)
        lines += _table(grows, ["Grouping factor", "Groups", "Min. size", "Mean size", "Max. size"],
                        "lrrrr")
    lines.append("-" * width)
    lines += [coef[0], "-" * width] + coef[1:]
    lines.append("=" * width)

    # ------------------------------------------------------------ random effects
    lines.append("Random effects (variance, standard deviation, correlations):")
    rrows, ncor = [], 0
    labels_seen = {}
    for t, S in fit.cov_re():
        c = labels_seen.get(t.group, 0)
        labels_seen[t.group] = c + 1
        lab = t.group if c == 0 else f"{t.group}.{c}"
        sd = np.sqrt(np.diag(S))
        for a in range(t.k):
            cors = []
            for b in range(a):
                r = S[a, b] / (sd[a] * sd[b]) if sd[a] > 0 and sd[b] > 0 else np.nan
                cors.append("NaN" if not np.isfinite(r) else f"{r:.3f}")
            ncor = max(ncor, len(cors))
            rrows.append([lab if a == 0 else "", t.cnames[a], _g(S[a, a]), _g(sd[a])] + cors)
    rrows.append(["Residual", "", _g(fit.sigma ** 2), _g(fit.sigma)])
    rrows = [r + [""] * (4 + ncor - len(r)) for r in rrows]
    hdr = ["Group", "Name", "Variance", "Std.Dev."] + (["Corr"] + [""] * (ncor - 1) if ncor else [])
    lines += ["  " + x for x in _table(rrows, hdr, "llrr" + "r" * ncor)]
    vc = fit.varcorr
    tables.append(vc)

    # ------------------------------------------------------------ interpretation
    ic = icc(fit)
    gv = group_variances(fit)
    lines.append("")
    lines.append("Variance partition (share of the variance around the fixed-effects prediction):")
    prow = [[g, _g(v), f"{ic.by_group[g]:.3f}"] for g, v in gv.items()]
    prow.append(["Residual", _g(ic.var_residual), f"{ic.by_group['Residual']:.3f}"])
    lines += ["  " + x for x in _table(prow, ["Level", "Variance", "VPC"], "lrr")]
    lines.append(f"  ICC adjusted    {ic.adjusted:.3f}   (all grouping levels: random / (random + residual))")
    lines.append(f"  ICC conditional {ic.conditional:.3f}   (also counting the fixed effects' variance "
                 f"{_g(ic.var_fixed)})")
    tables.append(pd.DataFrame({"Variance": list(gv) + [ic.var_residual],
                                "VPC": ic.by_group.to_numpy()}, index=list(gv.index) + ["Residual"]))
    lines.append("=" * width)
    notes = ["z and P>|z|: normal approximation (as statsmodels); variance parameters have no",
             "  standard errors here.  Var/Cov rows and the table above are estimated variances.",
             "VPC: a level's share of the variance; observations sharing groups g and h",
             "  correlate VPC_g + VPC_h (random-intercept models).  ICCs as R's performance::icc."]
    if ic.random_slopes:
        notes += ["Random slopes: a level's variance depends on the covariates; its VPC and the ICCs",
                  "  average it over the observations.  An intercept variance and its correlations",
                  "  describe covariate values 0 (centre covariates to move that point)."]
    if fit.is_singular:
        notes.append("Boundary (singular) fit: some variance is estimated as zero or some correlation "
                     "as ±1.")
    for g1, g2 in getattr(res.model, "partitions", []):
        notes.append(f"{g1!r} and {g2!r} define the same groups: only the sum of their variances is "
                     "identified.")
    for msg in fit.optsummary.messages:
        notes.append(f"Optimizer: {msg}")
    lines += ["Notes:"] + ["  " + n for n in notes]
    return Summary("\n".join(lines), tables)


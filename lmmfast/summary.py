"""lme4-style text summary of a fitted model (numbers live in LmerFit; this only formats)."""
from __future__ import annotations

import numpy as np

__all__ = ["format_summary"]


def _table(rows, header, align):
    """Plain text table; align is a string of 'l'/'r' per column."""
    cols = list(zip(*([header] + rows))) if rows else [[h] for h in header]
    widths = [max(len(str(c)) for c in col) for col in cols]
    out = []
    for row in [header] + rows:
        cells = [str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(row, widths, align)]
        out.append(" " + " ".join(cells).rstrip())
    return out


def _g(x, digits=4):
    return "NaN" if not np.isfinite(x) else f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3e}"


def format_summary(m) -> str:
    """The summary text: fit criteria, scaled residuals, random effects, fixed effects."""
    lines = []
    how = "REML" if m.REML else "maximum likelihood"
    lines.append(f"Linear mixed model fit by {how} ['lmmfast']")
    lines.append(f"Formula: {m.formula}")
    lines.append("")
    if m.REML:
        lines.append(f"REML criterion at convergence: {m.objective:.4f}")
    else:
        hdr = ["AIC", "BIC", "logLik", "deviance", "df.resid"]
        vals = [f"{m.aic:.1f}", f"{m.bic:.1f}", f"{m.loglik:.1f}", f"{m.objective:.1f}", f"{m.nobs - m.df}"]
        w = [max(len(a), len(b)) + 1 for a, b in zip(hdr, vals)]
        lines.append("".join(h.rjust(x) for h, x in zip(hdr, w)))
        lines.append("".join(v.rjust(x) for v, x in zip(vals, w)))
    lines.append("")
    r = m.residuals / m.sigma
    q = np.quantile(r, [0, 0.25, 0.5, 0.75, 1.0])
    lines.append("Scaled residuals:")
    lines += _table([[f"{v:.4f}" for v in q]], ["Min", "1Q", "Median", "3Q", "Max"], "rrrrr")
    lines.append("")

    lines.append("Random effects:")
    rows = []
    from .varcorr import group_labels

    for (t, S), lab in zip(m.cov_re(), group_labels(m.model.terms)):
        sd = np.sqrt(np.diag(S))
        for a in range(t.k):
            cors = []
            for b in range(a):
                c = S[a, b] / (sd[a] * sd[b]) if sd[a] > 0 and sd[b] > 0 else np.nan
                cors.append(f"{c:.2f}")
            rows.append([t.group if a == 0 else "", t.cnames[a], _g(S[a, a]), _g(sd[a])] + cors)
    rows.append(["Residual", "", _g(m.sigma ** 2), _g(m.sigma)])
    ncor = max(len(rw) for rw in rows) - 4
    rows = [rw + [""] * (4 + ncor - len(rw)) for rw in rows]
    header = ["Groups", "Name", "Variance", "Std.Dev."] + (["Corr"] + [""] * (ncor - 1) if ncor else [])
    lines += _table(rows, header, "llrr" + "r" * ncor)
    grp = ", ".join(f"{g}, {k}" for g, k in m.ngroups.items())
    lines.append(f"Number of obs: {m.nobs}, groups:  {grp}")
    if m.n_dropped:
        lines.append(f"({m.n_dropped} observation{'s' if m.n_dropped > 1 else ''} deleted due to missingness)")
    lines.append("")

    lines.append("Fixed effects:")
    ct = m.coef_table()
    rows = [[nm, f"{e:.4g}", f"{s:.4g}", f"{t:.3f}"] for nm, (e, s, t) in zip(ct.index, ct.to_numpy())]
    lines += _table(rows, ["", "Estimate", "Std. Error", "t value"], "lrrr")
    p = len(ct)
    if 1 < p <= 12:
        V = m.vcov.to_numpy()
        se = np.sqrt(np.diag(V))
        C = V / np.outer(se, se)
        abbrev = [(nm.replace("(Intercept)", "(Intr)"))[:6] for nm in ct.index]
        lines.append("")
        lines.append("Correlation of Fixed Effects:")
        rows = [[ct.index[i]] + [f"{C[i, j]:.3f}" for j in range(i)] for i in range(1, p)]
        rows = [rw + [""] * (p - len(rw)) for rw in rows]
        lines += _table(rows, [""] + abbrev[: p - 1], "l" + "r" * (p - 1))
    if m.is_singular:
        lines.append("")
        lines.append("boundary (singular) fit: see is_singular")
    for msg in m.optsummary.messages:
        lines.append(f"optimizer note: {msg}")
    return "\n".join(lines)

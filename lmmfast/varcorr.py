"""Variance components: Σ_i = σ² T_i T_i' for each term, as lme4's ``VarCorr``."""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["varcorr_frame", "term_covariances"]


def term_covariances(terms, theta, offsets, sigma):
    """List of (term, Σ_i) with Σ_i = σ² T_i T_i' (k_i × k_i)."""
    out = []
    for t, off in zip(terms, offsets):
        T = t.T(theta[off: off + t.ntheta])
        out.append((t, sigma ** 2 * (T @ T.T)))
    return out


def group_labels(terms):
    """lme4's names for the rows of VarCorr: repeated grouping factors get ``.1``, ``.2``..."""
    seen, labels = {}, []
    for t in terms:
        c = seen.get(t.group, 0)
        labels.append(t.group if c == 0 else f"{t.group}.{c}")
        seen[t.group] = c + 1
    return labels


def varcorr_frame(terms, theta, offsets, sigma) -> pd.DataFrame:
    """``as.data.frame(VarCorr(m))``: columns grp, var1, var2, vcov, sdcor.

    Per term, first the variances (sdcor = standard deviation), then the covariances of
    each pair in lower-triangle column order (sdcor = correlation); last the residual.
    """
    rows = []
    for (t, S), lab in zip(term_covariances(terms, theta, offsets, sigma), group_labels(terms)):
        sd = np.sqrt(np.diag(S))
        for a in range(t.k):
            rows.append((lab, t.cnames[a], None, S[a, a], sd[a]))
        for a in range(t.k):
            for b in range(a + 1, t.k):
                cor = S[b, a] / (sd[a] * sd[b]) if sd[a] > 0 and sd[b] > 0 else np.nan
                rows.append((lab, t.cnames[a], t.cnames[b], S[b, a], cor))
    rows.append(("Residual", None, None, sigma ** 2, sigma))
    return pd.DataFrame(rows, columns=["grp", "var1", "var2", "vcov", "sdcor"])

"""Intra-class correlations / variance partition (lmmfast.icc), checked against independent
computations from the VarCorr values and, where R is available, against insight's formula."""
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

import lmmfast
import lmmfast.formula.api as smf
from lmmfast.icc import ICCResult, fixed_variance, group_variances, icc, random_variance, vpc


@pytest.fixture(scope="module")
def students():
    return lmmfast.datasets.load("students")


@pytest.fixture(scope="module")
def intercepts(students):
    return lmmfast.lmer("test_score ~ age + sex + (1|classroom) + (1|school) + (1|province)",
                        students)


@pytest.fixture(scope="module")
def slopes(students):
    return lmmfast.lmer("test_score ~ age + sex + (age|classroom) + (1|school)", students)


def _vc(fit):
    """(grp, var1, var2) -> vcov from the VarCorr frame."""
    v = fit.varcorr
    def s(x):
        return x if isinstance(x, str) else None
    return {(g, s(a), s(b)): x for g, a, b, x in zip(v["grp"], v["var1"], v["var2"], v["vcov"])}


def test_random_intercepts_against_varcorr(intercepts, students):
    vc = _vc(intercepts)
    var = {g: vc[(g, "(Intercept)", None)] for g in ("classroom", "school", "province")}
    s2 = vc[("Residual", None, None)]
    total = sum(var.values()) + s2
    X = np.column_stack([np.ones(len(students)), students["age"], students["sex"] == "M"]).astype(float)
    vf = np.var(X @ intercepts.fixef.to_numpy(), ddof=1)
    r = icc(intercepts)
    assert isinstance(r, ICCResult) and not r.random_slopes
    for g, v in var.items():
        assert r.by_group[g] == pytest.approx(v / total, rel=1e-12)
    assert r.by_group["Residual"] == pytest.approx(s2 / total, rel=1e-12)
    assert r.by_group.sum() == pytest.approx(1.0)
    assert r.var_random == pytest.approx(sum(var.values()), rel=1e-12)
    assert r.var_residual == pytest.approx(s2, rel=1e-12)
    assert r.var_fixed == pytest.approx(vf, rel=1e-10)
    assert r.adjusted == pytest.approx(sum(var.values()) / total, rel=1e-12)
    assert r.conditional == pytest.approx(sum(var.values()) / (total + vf), rel=1e-10)
    assert fixed_variance(intercepts) == pytest.approx(vf, rel=1e-10)


def test_random_slopes_against_varcorr(slopes, students):
    vc = _vc(slopes)
    S = np.array([[vc[("classroom", "(Intercept)", None)], vc[("classroom", "(Intercept)", "age")]],
                  [vc[("classroom", "(Intercept)", "age")], vc[("classroom", "age", None)]]])
    school = vc[("school", "(Intercept)", None)]
    s2 = vc[("Residual", None, None)]
    age = students["age"].to_numpy()
    # z_i' Σ z_i with z_i = (1, age_i), averaged over the observations
    cls = np.mean(S[0, 0] + 2 * S[0, 1] * age + S[1, 1] * age ** 2)
    vr = cls + school
    r = icc(slopes)
    assert r.random_slopes
    assert r.var_random == pytest.approx(vr, rel=1e-10)
    assert random_variance(slopes) == pytest.approx(vr, rel=1e-10)
    gv = group_variances(slopes)
    assert gv["classroom"] == pytest.approx(cls, rel=1e-10)
    assert gv["school"] == pytest.approx(school, rel=1e-12)
    assert r.adjusted == pytest.approx(vr / (vr + s2), rel=1e-10)
    assert r.by_group["classroom"] == pytest.approx(cls / (vr + s2), rel=1e-10)
    assert r.by_group.sum() == pytest.approx(1.0)
    # at a chosen age: the classroom variance is (1, a) Σ (1, a)'
    at = vpc(slopes, at={"age": 12.0})
    c12 = S[0, 0] + 24 * S[0, 1] + 144 * S[1, 1]
    assert at["classroom"] == pytest.approx(c12 / (c12 + school + s2), rel=1e-10)
    at2 = vpc(slopes, at=pd.DataFrame({"age": [11.0, 13.0]}))
    c = np.mean([S[0, 0] + 2 * a * S[0, 1] + a * a * S[1, 1] for a in (11.0, 13.0)])
    assert at2["classroom"] == pytest.approx(c / (c + school + s2), rel=1e-10)


def test_uncorrelated_terms_add_up(students):
    m = lmmfast.lmer("test_score ~ age + (age||classroom)", students)
    vc = _vc(m)
    age = students["age"].to_numpy()
    expect = vc[("classroom", "(Intercept)", None)] + vc[("classroom.1", "age", None)] * np.mean(age ** 2)
    assert group_variances(m)["classroom"] == pytest.approx(expect, rel=1e-10)
    assert list(vpc(m).index) == ["classroom", "Residual"]


def test_icc_accepts_statsmodels_face_results(students):
    res = smf.mixedlm("test_score ~ age + sex + (1|school)", students, groups="classroom").fit()
    a, b = icc(res), res.icc()
    assert a.adjusted == b.adjusted
    pd.testing.assert_series_equal(res.vpc(), vpc(res.lmer_fit))
    text = str(a)
    assert "adjusted ICC" in text and "classroom" in text and "Residual" in text


def test_bad_at_argument(slopes):
    with pytest.raises(TypeError, match="at must be"):
        vpc(slopes, at=[12.0])


_R_SCRIPT = r"""
suppressMessages(library(lme4))
d <- read.csv("%s")
m <- lmer(Reaction ~ Days + (Days | Subject), d)
# insight::get_variance(component = "random") / performance::icc, written out
vc <- VarCorr(m); X <- model.matrix(m)
vr <- sum(sapply(vc, function(S) { rn <- rownames(S); Z <- X[, rn, drop = FALSE]
                                    sum(diag(crossprod(Z %%*%% S, Z))) / nrow(X) }))
s2 <- sigma(m)^2; vf <- var(as.vector(fixef(m) %%*%% t(X)))
cat(sprintf("%%.12g %%.12g %%.12g %%.12g %%.12g\n", vr, vf, s2, vr / (vr + s2), vr / (vr + vf + s2)))
"""


@pytest.mark.skipif(shutil.which("Rscript") is None, reason="R is not installed")
def test_against_r_insight_formula(tmp_path):
    d = lmmfast.datasets.load("sleepstudy")
    path = tmp_path / "sleep.csv"
    d.to_csv(path, index=False)
    try:
        out = subprocess.run(["Rscript", "-e", _R_SCRIPT % path], capture_output=True, text=True,
                             timeout=120)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pytest.skip("Rscript timed out")
    if out.returncode != 0:
        pytest.skip(f"R/lme4 unavailable: {out.stderr[-300:]}")
    vr, vf, s2, adj, cond = map(float, out.stdout.split())
    r = icc(lmmfast.lmer("Reaction ~ Days + (Days | Subject)", d))
    assert r.var_random == pytest.approx(vr, rel=1e-4)
    assert r.var_fixed == pytest.approx(vf, rel=1e-4)
    assert r.var_residual == pytest.approx(s2, rel=1e-4)
    assert r.adjusted == pytest.approx(adj, rel=1e-4)
    assert r.conditional == pytest.approx(cond, rel=1e-4)

"""Fits against lme4 1.1-31 reference fits (tests/refs/<id>.json, written by gen_refs.R).

Tolerances are those of the shared ``check_refs.py`` (its default checks and ``--full``):

* nobs exact;
* objective no worse than ``ref + 1e-7|ref| + 1e-3`` and not below the best lme4 optimum
  (default and alternative optimizers) by more than ``1e-2 + 1e-6|ref|``;
* objective == -2 loglik;
* θ within ``5e-3 max(1, |ref|)``, β within ``max(0.02 SE, 1e-4 |ref|)``, σ within 1e-3
  relative -- matching lme4's default fit or any alternative-optimizer refit whose
  objective is not worse (lme4's default optimizer can stop short on flat likelihoods);
* standard errors within 1e-2 relative, VarCorr sd/cor, conditional modes by level label
  within ``0.02 condsd + 1e-3 σ``, conditional SDs within 2 %, the first 20 fitted values
  within ``1e-3 σ``, AIC/BIC within 1e-6 relative plus the objective's slack.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from helpers import CASES, case_data, fit_case, load_ref

PARAMS = [pytest.param(c, id=c["id"]) for c in CASES]


@pytest.fixture(scope="module")
def refs():
    return {c["id"]: load_ref(c["id"]) for c in CASES}


def _obj_tols(ref):
    r_obj = float(ref["objective"])
    alts = [a for a in (ref.get("alt_fits") or []) if a.get("objective") is not None]
    best = min([r_obj] + [float(a["objective"]) for a in alts])
    return r_obj, best, 1e-7 * abs(r_obj) + 1e-3, 1e-2 + 1e-6 * abs(r_obj)


def _param_failures(m, ref, cand):
    """Failures (strings) of θ / β / σ against one candidate reference fit."""
    bad = []
    se = ref["se"]
    theta, rtheta = np.asarray(m.theta, float), np.asarray(cand["theta"], float)
    if theta.shape != rtheta.shape:
        return [f"theta length {theta.size} != {rtheta.size}"]
    for i, (o, r) in enumerate(zip(theta, rtheta)):
        tol = 5e-3 * max(1.0, abs(r))
        if not abs(o - r) <= tol:
            bad.append(f"theta[{ref['theta_names'][i]}] {o:.6g} vs {r:.6g} (tol {tol:.3g})")
    beta, rbeta = np.asarray(m.fixef, float), np.asarray(cand["beta"], float)
    if beta.shape != rbeta.shape:
        return bad + [f"fixef length {beta.size} != {rbeta.size}"]
    for i, (o, r) in enumerate(zip(beta, rbeta)):
        tol = max(0.02 * se[i], 1e-4 * abs(r))
        if not abs(o - r) <= tol:
            bad.append(f"fixef[{ref['beta_names'][i]}] {o:.8g} vs {r:.8g} (tol {tol:.3g})")
    s, rs = float(m.sigma), float(cand["sigma"])
    if not abs(s - rs) <= 1e-3 * rs:
        bad.append(f"sigma {s:.8g} vs {rs:.8g}")
    return bad


# ------------------------------------------------------------------------- the data
@pytest.mark.parametrize("case", PARAMS)
def test_case_data_has_factor_columns_as_strings(case):
    df = case_data(case)
    for f in case["factors"]:
        assert f in df.columns, f"{case['data']} lacks factor column {f!r}"
        vals = df[f].dropna()
        assert all(isinstance(v, str) for v in vals), f"{f!r} is not read as strings"
    ref = load_ref(case["id"])
    for g, levels in ref["levels"].items():
        assert set(levels) <= set(df[g].dropna().unique())


# --------------------------------------------------------------- check_refs defaults
@pytest.mark.parametrize("case", PARAMS)
def test_nobs(case, refs):
    m = fit_case(case["id"])
    assert int(m.nobs) == refs[case["id"]]["nobs"]


@pytest.mark.parametrize("case", PARAMS)
def test_objective_matches_lme4_optimum(case, refs):
    ref = refs[case["id"]]
    m = fit_case(case["id"])
    obj = float(m.objective)
    r_obj, best, up_tol, low_tol = _obj_tols(ref)
    assert np.isfinite(obj)
    assert obj <= r_obj + up_tol, f"objective {obj:.6f} worse than lme4's {r_obj:.6f}"
    assert obj >= best - low_tol, (f"objective {obj:.6f} below every lme4 optimum ({best:.6f}): "
                                   "a different objective definition?")


@pytest.mark.parametrize("case", PARAMS)
def test_objective_is_minus_twice_loglik(case):
    m = fit_case(case["id"])
    obj = float(m.objective)
    assert abs(obj + 2.0 * float(m.loglik)) <= 1e-8 * abs(obj) + 1e-8


@pytest.mark.parametrize("case", PARAMS)
def test_theta_fixef_sigma(case, refs):
    """θ, β, σ match lme4's default fit or a not-worse alternative-optimizer fit."""
    ref = refs[case["id"]]
    m = fit_case(case["id"])
    r_obj, _, up_tol, _ = _obj_tols(ref)
    cands = [("lme4", ref)] + [(f"alt:{a['optimizer']}", a) for a in ref.get("alt_fits") or []
                               if a.get("objective") is not None and float(a["objective"]) <= r_obj + up_tol]
    failures = {}
    for label, cand in cands:
        bad = _param_failures(m, ref, cand)
        if not bad:
            return
        failures[label] = bad
    pytest.fail("no lme4 fit matched; against the default fit: " + "; ".join(failures["lme4"]))


@pytest.mark.parametrize("case", PARAMS)
def test_names_like_lme4(case, refs):
    ref = refs[case["id"]]
    m = fit_case(case["id"])
    assert list(m.fixef.index) == ref["beta_names"]
    assert list(m.theta_names) == ref["theta_names"]
    assert list(m.vcov.index) == ref["beta_names"] and list(m.vcov.columns) == ref["beta_names"]


@pytest.mark.parametrize("case", PARAMS)
def test_is_singular_like_lme4(case, refs):
    assert fit_case(case["id"]).is_singular is bool(refs[case["id"]]["isSingular"])


# ------------------------------------------------------------------------ --full checks
@pytest.mark.parametrize("case", PARAMS)
def test_standard_errors(case, refs):
    ref = refs[case["id"]]
    m = fit_case(case["id"])
    V = np.asarray(m.vcov, dtype=float)
    se = np.sqrt(np.diag(V))
    rse = np.asarray(ref["se"], dtype=float)
    assert se.shape == rse.shape
    np.testing.assert_allclose(se, rse, rtol=1e-2, atol=1e-10)
    assert np.allclose(V, V.T)


@pytest.mark.parametrize("case", PARAMS)
def test_varcorr(case, refs):
    ref = refs[case["id"]]
    m = fit_case(case["id"])
    vc = m.varcorr
    assert list(vc.columns) == ["grp", "var1", "var2", "vcov", "sdcor"]
    rows = ref["varcorr"]
    assert len(vc) == len(rows)
    sigma = float(ref["sigma"])

    def lab(x):
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else x

    for i, row in enumerate(rows):
        ours = vc.iloc[i]
        assert (ours["grp"], lab(ours["var1"]), lab(ours["var2"])) == (row["grp"], row["var1"], row["var2"])
        is_cor = row["var1"] is not None and row["var2"] is not None
        tol = 0.02 if is_cor else 1e-2 * abs(row["sdcor"]) + 5e-3 * sigma
        assert abs(float(ours["sdcor"]) - row["sdcor"]) <= tol, f"varcorr row {i} {row}"
    # vcov and sdcor are consistent
    var_rows = vc["var2"].isna()
    np.testing.assert_allclose(vc.loc[var_rows, "sdcor"] ** 2, vc.loc[var_rows, "vcov"], rtol=1e-12)
    assert vc.iloc[-1]["grp"] == "Residual"
    assert vc.iloc[-1]["sdcor"] == pytest.approx(m.sigma, rel=1e-12)


@pytest.mark.parametrize("case", PARAMS)
def test_ranef_by_level(case, refs):
    ref = refs[case["id"]]
    m = fit_case(case["id"])
    sigma = float(ref["sigma"])
    re = m.ranef
    assert set(re) == set(ref["ranef"])
    for g, rr in ref["ranef"].items():
        df = re[g]
        assert list(df.columns) == rr["terms"]
        assert [str(x) for x in df.index] == rr["levels"], "levels are not in lme4's order"
        vals = df.to_numpy(dtype=float)
        rv = np.asarray(rr["values"], dtype=float)
        sd = np.nan_to_num(np.asarray(rr["condsd"], dtype=float))
        assert vals.shape == rv.shape
        err = np.abs(vals - rv)
        tol = 0.02 * sd + 1e-3 * sigma
        assert np.all(err <= tol), f"ranef[{g}] worst |d|/tol = {np.max(err / tol):.3g}"


@pytest.mark.parametrize("case", PARAMS)
def test_ranef_sd_is_lme4_condsd(case, refs):
    ref = refs[case["id"]]
    m = fit_case(case["id"])
    sigma = float(ref["sigma"])
    sds = m.ranef_sd
    assert set(sds) == set(ref["ranef"])
    for g, rr in ref["ranef"].items():
        df = sds[g]
        assert list(df.columns) == rr["terms"]
        assert [str(x) for x in df.index] == rr["levels"]
        ours = df.to_numpy(dtype=float)
        rsd = np.nan_to_num(np.asarray(rr["condsd"], dtype=float))
        assert ours.shape == rsd.shape
        assert np.all(ours >= 0)
        np.testing.assert_allclose(ours, rsd, rtol=0.02, atol=1e-6 * sigma, err_msg=f"condsd[{g}]")
    # condsd is an alias
    assert m.condsd.keys() == sds.keys()


@pytest.mark.parametrize("case", PARAMS)
def test_fitted_and_residuals(case, refs):
    ref = refs[case["id"]]
    m = fit_case(case["id"])
    sigma = float(ref["sigma"])
    f = np.asarray(m.fitted, dtype=float)
    assert f.shape == (ref["nobs"],)
    head = np.asarray(ref["fitted"]["head"], dtype=float)
    np.testing.assert_allclose(f[: len(head)], head, rtol=1e-8, atol=1e-3 * sigma)
    rhead = np.asarray(ref["residuals"]["head"], dtype=float)
    np.testing.assert_allclose(np.asarray(m.residuals)[: len(rhead)], rhead, rtol=1e-8, atol=1e-3 * sigma)
    # summaries of all n values: the mean fitted value within 1e-3 σ
    n = ref["nobs"]
    assert abs(f.sum() - ref["fitted"]["sum"]) <= 1e-3 * sigma * n
    assert float(np.sum(m.model.y)) == pytest.approx(ref["y_sum"], rel=1e-12)


@pytest.mark.parametrize("case", PARAMS)
def test_aic_bic(case, refs):
    ref = refs[case["id"]]
    m = fit_case(case["id"])
    r_obj, best, up_tol, low_tol = _obj_tols(ref)
    # the same number of parameters as lme4
    assert int(m.df) == ref["df"]
    assert m.aic - m.objective == pytest.approx(ref["AIC"] - r_obj, rel=1e-6)
    assert m.bic - m.objective == pytest.approx(ref["BIC"] - r_obj, rel=1e-6)
    for ours, theirs in ((m.aic, ref["AIC"]), (m.bic, ref["BIC"])):
        slack = 1e-6 * abs(theirs)
        assert ours <= theirs + up_tol + slack
        assert ours >= theirs - (r_obj - best) - low_tol - slack


@pytest.mark.parametrize("case", PARAMS)
def test_ngroups(case, refs):
    ref = refs[case["id"]]
    m = fit_case(case["id"])
    assert m.ngroups == ref["ngrps"]

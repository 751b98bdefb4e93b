"""The LmerFit attribute contract, predictions, the optimizer record, singular fits,
the staged pipeline (objective without fitting), and the shipped datasets.

Estimates derived at the optimum (β̂, b̂, conditional SDs, vcov, σ) are also checked against
dense numpy formulas at the fitted θ, including terms other than the first with k > 1,
which the lme4 reference cases do not cover.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

import lmmfast
from lmmfast import ConvergenceWarning, LinearMixedModel, LmerFit
from lmmfast.pls import dense_lambda
from helpers import CASE_BY_ID, DATA_DIR, case_data, dense_parts, fit_case, load_csv, load_ref


@pytest.fixture(scope="module")
def sleep():
    return load_csv("sleepstudy.csv", ["Subject"])


@pytest.fixture(scope="module")
def sleep_fit(sleep):
    return lmmfast.lmer("Reaction ~ Days + (Days | Subject)", sleep)


def _sim(seed=4, n=300):
    rng = np.random.default_rng(seed)
    g1 = rng.integers(0, 30, n)
    g2 = rng.integers(0, 6, n)
    x = rng.normal(size=n)
    z = rng.normal(size=n)
    y = (1 + x + rng.normal(size=30)[g1] + rng.normal(size=6)[g2] + 2 * rng.normal(size=6)[g2] * x
         + rng.normal(size=n))
    return pd.DataFrame({"g1": [f"a{i:02d}" for i in g1], "g2": [f"b{i}" for i in g2],
                         "x": x, "z": z, "y": y})


SIM = _sim()


# --------------------------------------------------------------------- attribute types
def test_attribute_contract(sleep_fit, sleep):
    m = sleep_fit
    assert isinstance(m, LmerFit)
    assert isinstance(m.theta, np.ndarray) and m.theta.dtype == float and m.theta.shape == (3,)
    assert isinstance(m.fixef, pd.Series)
    assert list(m.fixef.index) == ["(Intercept)", "Days"]
    for name in ("sigma", "loglik", "objective", "aic", "bic"):
        v = getattr(m, name)
        assert isinstance(v, float) and math.isfinite(v), name
    assert m.objective == pytest.approx(-2 * m.loglik, rel=1e-14)
    assert m.aic == pytest.approx(m.objective + 2 * 6, rel=1e-14)
    assert m.bic == pytest.approx(m.objective + math.log(180) * 6, rel=1e-14)
    assert isinstance(m.vcov, pd.DataFrame)
    assert list(m.vcov.index) == list(m.fixef.index) == list(m.vcov.columns)
    assert np.all(np.linalg.eigvalsh(m.vcov.to_numpy()) > 0)
    assert m.nobs == 180 and isinstance(m.nobs, int)
    assert m.ngroups == {"Subject": 18}
    assert m.REML is True
    assert list(m.theta_names) == ["Subject.(Intercept)", "Subject.Days.(Intercept)", "Subject.Days"]


def test_ranef_contract(sleep_fit, sleep):
    m = sleep_fit
    assert isinstance(m.ranef, dict) and list(m.ranef) == ["Subject"]
    re = m.ranef["Subject"]
    assert isinstance(re, pd.DataFrame)
    assert list(re.columns) == ["(Intercept)", "Days"]
    assert list(re.index) == sorted(sleep["Subject"].unique())
    assert re.index.name == "Subject"
    sd = m.ranef_sd["Subject"]
    assert sd.shape == re.shape and list(sd.index) == list(re.index) and list(sd.columns) == list(re.columns)
    assert np.all(sd.to_numpy() > 0)
    # conditional modes of a non-singular fit average to about zero
    assert np.all(np.abs(re.mean().to_numpy()) < 0.1 * re.std().to_numpy())


def test_varcorr_contract(sleep_fit):
    vc = sleep_fit.varcorr
    assert list(vc.columns) == ["grp", "var1", "var2", "vcov", "sdcor"]
    assert list(vc["grp"]) == ["Subject", "Subject", "Subject", "Residual"]
    assert list(vc["var1"][:3]) == ["(Intercept)", "Days", "(Intercept)"]
    assert vc["var2"].iloc[2] == "Days"
    (t, Sigma), = sleep_fit.cov_re()
    assert vc["vcov"].iloc[0] == pytest.approx(Sigma[0, 0])
    assert vc["vcov"].iloc[2] == pytest.approx(Sigma[1, 0])
    assert vc["sdcor"].iloc[2] == pytest.approx(Sigma[1, 0] / math.sqrt(Sigma[0, 0] * Sigma[1, 1]))
    assert -1 <= vc["sdcor"].iloc[2] <= 1
    assert vc["vcov"].iloc[3] == pytest.approx(sleep_fit.sigma ** 2)
    assert t.group == "Subject"


def test_varcorr_of_uncorrelated_terms_is_named_like_lme4(sleep):
    m = lmmfast.lmer("Reaction ~ Days + (Days || Subject)", sleep)
    assert list(m.varcorr["grp"]) == ["Subject", "Subject.1", "Residual"]
    assert list(m.ranef) == ["Subject"]
    assert list(m.ranef["Subject"].columns) == ["(Intercept)", "Days"]
    assert m.ngroups == {"Subject": 18}


def test_fitted_and_residuals(sleep_fit, sleep):
    m = sleep_fit
    f = m.fitted
    assert isinstance(f, np.ndarray) and f.shape == (180,)
    np.testing.assert_allclose(m.residuals, sleep["Reaction"].to_numpy() - f, rtol=0, atol=1e-9)
    # fitted = Xβ + Zb, computed here from the data and the per-subject modes
    re = m.ranef["Subject"]
    b = re.loc[sleep["Subject"]].to_numpy()
    want = (m.fixef["(Intercept)"] + b[:, 0]) + (m.fixef["Days"] + b[:, 1]) * sleep["Days"].to_numpy()
    np.testing.assert_allclose(f, want, rtol=1e-12)


def test_coef_table(sleep_fit):
    ct = sleep_fit.coef_table()
    assert list(ct.columns) == ["Estimate", "Std. Error", "t value"]
    np.testing.assert_allclose(ct["Std. Error"], np.sqrt(np.diag(sleep_fit.vcov)))
    np.testing.assert_allclose(ct["t value"], ct["Estimate"] / ct["Std. Error"])


# ------------------------------------------------------------------------------ predict
@pytest.mark.parametrize("case_id", ["sleepstudy_reml", "cake_reml", "pastes_reml", "machines_reml",
                                     "penicillin_reml", "sleepstudy_uncorr_reml", "orthodont_reml"])
def test_predict_on_training_data_is_fitted(case_id):
    m = fit_case(case_id)
    data = case_data(CASE_BY_ID[case_id])
    np.testing.assert_allclose(m.predict(data), m.fitted, rtol=1e-12, atol=1e-10)
    np.testing.assert_array_equal(m.predict(), m.fitted)
    # any subset of rows, in any order
    rows = np.random.default_rng(0).permutation(len(data))[:25]
    np.testing.assert_allclose(m.predict(data.iloc[rows]), m.fitted[rows], rtol=1e-12, atol=1e-10)
    # population level
    pop = m.model.X @ m.fixef.to_numpy()
    np.testing.assert_allclose(m.predict(data, re_form=False), pop, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(m.predict(re_form=False), pop, rtol=1e-12, atol=1e-10)


def test_predict_new_levels_are_population_level(sleep_fit):
    m = sleep_fit
    new = pd.DataFrame({"Subject": ["999", "308", "new"], "Days": [3.0, 3.0, 0.0]})
    p = m.predict(new)
    b0, b1 = m.fixef["(Intercept)"], m.fixef["Days"]
    r = m.ranef["Subject"].loc["308"]
    np.testing.assert_allclose(p, [b0 + 3 * b1, b0 + r.iloc[0] + 3 * (b1 + r.iloc[1]), b0], rtol=1e-12)


def test_predict_crossed_with_one_new_level():
    m = fit_case("penicillin_reml")
    re_s = m.ranef["sample"]
    new = pd.DataFrame({"plate": ["zz", "a"], "sample": ["A", "nope"]})
    p = m.predict(new)
    mu = m.fixef["(Intercept)"]
    np.testing.assert_allclose(p, [mu + re_s.loc["A"].iloc[0], mu + m.ranef["plate"].loc["a"].iloc[0]],
                               rtol=1e-12)


def test_predict_matches_integer_levels_given_as_floats():
    rng = np.random.default_rng(2)
    n = 60
    g = rng.integers(0, 6, n)
    df = pd.DataFrame({"g": g, "x": rng.normal(size=n)})
    df["y"] = rng.normal(size=n) + 2 * rng.normal(size=6)[g]
    m = lmmfast.lmer("y ~ x + (1 | g)", df)
    np.testing.assert_allclose(m.predict(df), m.fitted)                       # int64: fine
    np.testing.assert_allclose(m.predict(df.assign(g=df["g"].astype(float))), m.fitted)


# ------------------------------------------------------------------------------ summary
def test_summary_text(sleep_fit):
    s = sleep_fit.summary()
    for piece in ("REML", "Random effects", "Fixed effects", "Subject", "(Intercept)", "Days",
                  "Residual", "Number of obs: 180", "Scaled residuals"):
        assert piece in s, piece
    assert str(sleep_fit) == s
    assert "objective" in repr(sleep_fit)


def test_summary_of_ml_fit_and_crossed_groups():
    m = fit_case("penicillin_reml")
    s = m.summary()
    assert "plate" in s and "sample" in s and "plate, 24" in s and "sample, 6" in s
    ml = fit_case("sleepstudy_ml")
    s = ml.summary()
    assert "maximum likelihood" in s
    for piece in ("AIC", "BIC", "logLik", "deviance"):
        assert piece in s


# ---------------------------------------------------------------------------- optsummary
def test_optsummary(sleep_fit):
    m = sleep_fit
    o = m.optsummary
    assert isinstance(o.optimizer, str) and o.optimizer
    np.testing.assert_array_equal(o.initial, m.model.theta_start)   # lme4's below 1,000 rows
    np.testing.assert_array_equal(o.final, m.theta)
    assert o.fmin == pytest.approx(m.objective, rel=1e-12)
    assert isinstance(o.feval, int) and o.feval > 0
    assert isinstance(o.returnvalue, str) and o.returnvalue
    assert o.converged
    np.testing.assert_array_equal(o.lower, m.model.theta_lower)
    assert "Optimizer" in str(o) or "optimizer" in str(o)


def test_fit_from_start_and_callback(sleep):
    model = LinearMixedModel("Reaction ~ Days + (Days | Subject)", sleep)
    calls = []
    fit = model.fit(start=[0.5, 0.1, 0.2], callback=lambda n, th, f: calls.append((n, th.copy(), f)))
    # feval also counts the evaluations after the optimizer stops (boundary checks)
    assert 0 < len(calls) <= fit.optsummary.feval
    assert [c[0] for c in calls] == list(range(1, len(calls) + 1))
    np.testing.assert_array_equal(fit.optsummary.initial, [0.5, 0.1, 0.2])
    best = min(f for _, _, f in calls)
    assert fit.objective == pytest.approx(best, abs=1e-10)
    assert fit.objective == pytest.approx(model.fit().objective, abs=1e-6)


def test_maxeval_too_small_warns(sleep):
    model = LinearMixedModel("Reaction ~ Days + (Days | Subject)", sleep)
    with pytest.warns(ConvergenceWarning):
        fit = model.fit(maxeval=5)
    assert not fit.optsummary.converged
    assert fit.optsummary.messages


# -------------------------------------------------------------------------- singular fits
def test_dyestuff2_is_singular_like_lme4():
    ref = load_ref("dyestuff2_reml")
    assert ref["isSingular"] is True
    m = fit_case("dyestuff2_reml")
    assert m.is_singular is True
    np.testing.assert_allclose(m.theta, ref["theta"], atol=1e-6)
    assert "singular" in m.summary()
    assert np.all(m.ranef["Batch"].to_numpy() == 0)


def test_no_group_effect_gives_a_singular_fit():
    """Group means exactly equal: the between-group variance estimate is 0 (θ on its bound)."""
    rng = np.random.default_rng(9)
    g = np.repeat(np.arange(8), 6)
    e = rng.normal(size=g.size)
    e -= (np.bincount(g, e) / 6)[g]
    df = pd.DataFrame({"g": [f"G{i}" for i in g], "y": 10 + e})
    for reml in (True, False):
        m = lmmfast.lmer("y ~ 1 + (1 | g)", df, REML=reml)
        assert m.is_singular is True
        assert m.theta[0] == pytest.approx(0.0, abs=1e-4)
        assert m.varcorr["sdcor"].iloc[0] == pytest.approx(0.0, abs=1e-3)


def test_non_singular_fit(sleep_fit):
    assert sleep_fit.is_singular is False
    assert "singular" not in sleep_fit.summary()


# ------------------------------------------------------------------- staged pipeline
def test_objective_without_fitting(sleep):
    ref = load_ref("sleepstudy_ml")
    model = LinearMixedModel("Reaction ~ Days + (Days | Subject)", sleep, REML=False)
    assert model.nobs == 180 and model.p == 2 and model.ntheta == 3
    np.testing.assert_array_equal(model.theta_start, [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(model.theta_lower, [0.0, -np.inf, 0.0])
    assert model.theta_names == ref["theta_names"]
    assert model.objective(ref["theta"]) == pytest.approx(ref["objective"], rel=1e-8)
    assert model.objective(model.theta_start) > ref["objective"]
    assert "LinearMixedModel" in repr(model)


# ------------------------------------------- estimates at the optimum vs dense formulas
DENSE_FORMULAS = [
    "y ~ x + (1 | g1) + (1 + x | g2)",
    "y ~ x + (1 + x + z | g2) + (1 | g1)",
    "y ~ x + (1 + x | g1) + (1 | g2)",
    "y ~ x + (x || g2) + (1 | g1)",
    "y ~ x + (0 + x | g2) + (1 | g1)",
]


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("formula", DENSE_FORMULAS)
def test_estimates_match_dense_formulas(formula, reml):
    fit = lmmfast.lmer(formula, SIM, REML=reml)
    m = fit.model
    Z, X, y = dense_parts(m)
    n, p = X.shape
    Lam = dense_lambda(m.terms, fit.theta, m.theta_offsets)
    ZL = Z @ Lam
    q = Z.shape[1]
    A = np.block([[ZL.T @ ZL + np.eye(q), ZL.T @ X], [X.T @ ZL, X.T @ X]])
    sol = np.linalg.solve(A, np.concatenate([ZL.T @ y, X.T @ y]))
    u, beta = sol[:q], sol[q:]
    b = Lam @ u
    r2 = np.sum((y - X @ beta - ZL @ u) ** 2) + u @ u
    sigma = math.sqrt(r2 / (n - p if reml else n))
    Vu = np.linalg.inv(ZL.T @ ZL + np.eye(q))
    condsd = np.sqrt(np.diag(sigma ** 2 * Lam @ Vu @ Lam.T))
    vcov = sigma ** 2 * np.linalg.inv(X.T @ X - X.T @ ZL @ Vu @ ZL.T @ X)

    assert fit.sigma == pytest.approx(sigma, rel=1e-10)
    np.testing.assert_allclose(fit.fixef.to_numpy(), beta, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(fit.vcov.to_numpy(), vcov, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(fit.fitted, X @ beta + Z @ b, rtol=1e-10, atol=1e-10)
    off = 0
    seen = {}
    for t in m.terms:
        # columns of this term inside the grouping factor's (possibly merged) data frame
        start = seen.get(t.group, 0)
        seen[t.group] = start + t.k
        got_b = fit.ranef[t.group].iloc[:, start:start + t.k].to_numpy()
        got_sd = fit.ranef_sd[t.group].iloc[:, start:start + t.k].to_numpy()
        assert list(fit.ranef[t.group].index) == t.levels
        np.testing.assert_allclose(got_b, b[off:off + t.q].reshape(t.nlevels, t.k), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(got_sd, condsd[off:off + t.q].reshape(t.nlevels, t.k), rtol=1e-8,
                                   atol=1e-12)
        off += t.q


@pytest.mark.parametrize("formula", ["y ~ x + (1 | g1) + (1 + x | g2)", "y ~ x + (1 | g2/g1)",
                                     "y ~ x + (1 + x + z | g2) + (1 | g1)"])
def test_factorizations_agree(formula):
    """The sparse (CHOLMOD) and blocked factorizations give the same fit, when both exist."""
    import inspect

    if "method" not in inspect.signature(LinearMixedModel).parameters:
        pytest.skip("LinearMixedModel has no method= argument")
    from lmmfast.sparsepls import cholmod_available

    if not cholmod_available():
        pytest.skip("scikit-sparse (CHOLMOD) not installed")
    a = LinearMixedModel(formula, SIM, method="blocked")
    b = LinearMixedModel(formula, SIM, method="cholmod")
    rng = np.random.default_rng(0)
    for _ in range(3):
        th = np.abs(rng.normal(size=a.ntheta)) + 0.1
        assert a.objective(th) == pytest.approx(b.objective(th), rel=1e-10)
    fa, fb = a.fit(), b.fit()
    assert fa.objective == pytest.approx(fb.objective, rel=1e-9)      # the optima agree
    # everything derived at the same θ agrees tightly
    fb = LmerFit(b, fa.optsummary)
    np.testing.assert_array_equal(fa.theta, fb.theta)
    assert fa.objective == pytest.approx(fb.objective, rel=1e-12)
    assert fa.sigma == pytest.approx(fb.sigma, rel=1e-10)
    np.testing.assert_allclose(fa.fixef, fb.fixef, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(fa.vcov, fb.vcov, rtol=1e-8)
    np.testing.assert_allclose(fa.fitted, fb.fitted, rtol=1e-10)
    for g in fa.ranef:
        np.testing.assert_allclose(fa.ranef[g], fb.ranef[g], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(fa.ranef_sd[g], fb.ranef_sd[g], rtol=1e-8, atol=1e-10)


def test_cholmod_fit_with_exclusive_slope_columns():
    import inspect

    if "method" not in inspect.signature(LinearMixedModel).parameters:
        pytest.skip("LinearMixedModel has no method= argument")
    from lmmfast.sparsepls import cholmod_available

    if not cholmod_available():
        pytest.skip("scikit-sparse (CHOLMOD) not installed")
    df = load_csv("machines.csv", ["Worker", "Machine"])
    f = "score ~ Machine + (0 + Machine | Worker)"
    blocked = LinearMixedModel(f, df, method="blocked")
    sparse = LinearMixedModel(f, df, method="cholmod")
    theta = np.array([1.0, 0.5, 0.2, 1.0, 0.3, 1.0])
    assert sparse.objective(theta) == pytest.approx(blocked.objective(theta), rel=1e-9)
    assert sparse.fit().objective == pytest.approx(blocked.fit().objective, abs=1e-3)


# ------------------------------------------------------------------------------ datasets
def test_dataset_names():
    names = lmmfast.datasets.names()
    assert {"sleepstudy", "dyestuff", "penicillin", "pastes", "insteval"} <= set(names)


@pytest.mark.parametrize("name", lmmfast.datasets.names())
def test_dataset_load(name):
    df = lmmfast.datasets.load(name)
    assert isinstance(df, pd.DataFrame) and len(df) > 0
    df.iloc[0, 0] = df.iloc[1, 0]                 # a fresh frame each time
    again = lmmfast.datasets.load(name)
    assert again is not df
    assert lmmfast.datasets.load(name.upper()).shape == again.shape


@pytest.mark.parametrize("name,factors", [
    ("sleepstudy", ["Subject"]), ("dyestuff", ["Batch"]), ("penicillin", ["plate", "sample"]),
    ("pastes", ["batch", "cask", "sample"]),
])
def test_shipped_datasets_equal_the_reference_csvs(name, factors):
    shipped = lmmfast.datasets.load(name)
    ref = pd.read_csv(DATA_DIR / f"{name}.csv", dtype={f: str for f in factors})
    pd.testing.assert_frame_equal(shipped, ref)


def test_insteval_columns():
    df = lmmfast.datasets.load("insteval")
    factors = CASE_BY_ID["insteval_ml"]["factors"]
    assert set(factors) | {"y"} <= set(df.columns)
    for f in factors:
        assert all(isinstance(v, str) for v in df[f].unique()), f
    assert len(df) == load_ref("insteval_ml")["nobs"]
    assert pd.api.types.is_numeric_dtype(df["y"])


def test_unknown_dataset():
    with pytest.raises(KeyError, match="available"):
        lmmfast.datasets.load("no-such-data")


def test_lmer_accepts_a_dict_of_columns():
    d = load_csv("dyestuff.csv", ["Batch"])
    m1 = lmmfast.lmer("Yield ~ 1 + (1 | Batch)", {c: d[c].tolist() for c in d.columns})
    m2 = fit_case("dyestuff_reml")
    assert m1.objective == pytest.approx(m2.objective, rel=1e-10)


def test_lmer_does_not_warn_on_reference_cases(sleep):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lmmfast.lmer("Reaction ~ Days + (Days | Subject)", sleep)


@pytest.mark.parametrize("case_id", ["sleepstudy_reml", "penicillin_reml"])
def test_estimates_are_taken_at_the_optimum_after_the_factor_moved(case_id):
    """β̂, vcov and b̂ are computed on first use: evaluations of the model's objective at
    other θ in between (a profile, a likelihood-ratio refit) must not leak into them."""
    case = CASE_BY_ID[case_id]
    ref = load_ref(case_id)
    fit = lmmfast.lmer(case["py_formula"], case_data(case), REML=bool(case["REML"]))
    fit.model.objective(np.asarray(fit.theta) * 1.7 + 0.3)         # the factor moves away
    np.testing.assert_allclose(fit.beta, ref["beta"], rtol=1e-4)
    np.testing.assert_allclose(np.sqrt(np.diag(fit.vcov_array)), ref["se"], rtol=1e-3)
    g = next(iter(ref["ranef"]))
    np.testing.assert_allclose(fit.ranef[g].to_numpy(dtype=float), ref["ranef"][g]["values"],
                               atol=1e-3 * ref["sigma"], rtol=1e-3)


def test_callback_theta_is_kept_by_the_caller(sleep):
    """The θ a callback receives stays valid after the call (a caller may keep it without
    copying): each kept θ gives back the objective reported with it."""
    model = LinearMixedModel("Reaction ~ Days + (Days | Subject)", sleep)
    calls = []
    model.fit(callback=lambda n, th, f: calls.append((th, f)))
    assert len(calls) > 5
    assert len({tuple(th) for th, _ in calls}) > 5      # not one reused buffer
    for th, f in calls[:: max(1, len(calls) // 8)]:
        assert model.objective(th) == pytest.approx(f, rel=1e-12)

"""The analytic gradient of the objective against central finite differences, and the
gradient-based optimizer against lme4's optimum."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lmmfast
from lmmfast import _gradient
from lmmfast.gradient import numeric_gradient

from helpers import CASES, DERIVATIVE_MODELS, derivative_data, load_csv, load_ref


@pytest.mark.parametrize("reml", [False, True])
@pytest.mark.parametrize("name,formula", DERIVATIVE_MODELS)
def test_gradient_matches_finite_differences(name, formula, reml):
    m = lmmfast.LinearMixedModel(formula, derivative_data(name), REML=reml, method="blocked")
    rng = np.random.default_rng(abs(hash((formula, reml))) % 2**32)
    diag = m.theta_lower == 0
    th = np.where(diag, rng.uniform(0.2, 1.5, m.ntheta), rng.normal(scale=0.3, size=m.ntheta))
    f, g = m.objective_and_gradient(th)
    assert f == pytest.approx(m.objective(th), rel=1e-14)
    gn = numeric_gradient(m.objective, th, h=1e-6)
    np.testing.assert_allclose(g, gn, rtol=2e-5, atol=2e-5 * max(1.0, np.abs(gn).max()))


def test_gradient_large_panels_use_blas_paths():
    """kb07-like: every subject's panel spans all item rows (contiguous dsyrk / dgemm paths)."""
    df, truth = lmmfast.simulate.kb07_like(nsubj=12, nitem=16)
    m = lmmfast.LinearMixedModel(truth["formula"], df, REML=False)
    th = m.theta_start * 0.6 + 0.05
    _, g = m.objective_and_gradient(th)
    gn = numeric_gradient(m.objective, th, h=1e-5)
    np.testing.assert_allclose(g, gn, rtol=1e-4, atol=1e-4 * np.abs(gn).max())


SMALL = [c for c in CASES if "insteval" not in c["id"]]


@pytest.mark.parametrize("case", SMALL, ids=[c["id"] for c in SMALL])
def test_lbfgs_reaches_lme4_optimum(case):
    ref = load_ref(case["id"])
    df = load_csv(case["data"], case["factors"])
    m = lmmfast.lmer(case["py_formula"], df, REML=case["REML"], optimizer="lbfgs")
    assert m.optsummary.optimizer == "lbfgs"
    assert m.objective <= ref["objective"] + 1e-7 * abs(ref["objective"]) + 1e-3
    np.testing.assert_allclose(m.theta, ref["theta"], atol=5e-3 * max(1.0, np.abs(ref["theta"]).max()))


def test_lbfgs_leaves_a_stationary_boundary_start():
    """From T's first column at 0 the gradient in it vanishes (the objective is even in
    that column), so L-BFGS-B stops there; the probe inside the bound must restart it."""
    ref = load_ref("sleepstudy_reml")
    m = lmmfast.LinearMixedModel("Reaction ~ Days + (Days | Subject)", lmmfast.datasets.load("sleepstudy"))
    f, g = m.objective_and_gradient(np.array([0.0, 0.0, 1.0]))
    assert g[0] == pytest.approx(0.0, abs=1e-8) and g[1] == pytest.approx(0.0, abs=1e-8)
    fit = m.fit(optimizer="lbfgs", start=[0.0, 0.0, 1.0])
    assert fit.objective <= ref["objective"] + 1e-6
    np.testing.assert_allclose(fit.theta, ref["theta"], rtol=1e-3, atol=1e-4)


def test_lbfgs_keeps_a_true_boundary_optimum_without_restarting():
    """Dyestuff2's optimum has θ = 0: one probe evaluation, no second descent."""
    ref = load_ref("dyestuff2_reml")
    df = load_csv("dyestuff2.csv", ["Batch"])
    fit = lmmfast.lmer("Yield ~ 1 + (1 | Batch)", df, optimizer="lbfgs")
    assert fit.theta[0] == 0.0 and ref["theta"][0] == pytest.approx(0.0, abs=1e-8)
    assert fit.objective <= ref["objective"] + 1e-8
    assert fit.optsummary.feval < 25


# ---------------------------------------------------------------- kernels
@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(0, 40), st.integers(0, 2**31 - 1))
def test_dense_inverse_matches_numpy(D, cut, seed):
    """_gradient.dense_inverse: (L L')⁻¹ of the leading block of a row-major lower factor."""
    rng = np.random.default_rng(seed)
    Dp = min(cut, D)
    A = rng.normal(size=(D, D))
    S = A @ A.T + D * np.eye(D)
    L = np.linalg.cholesky(S)
    L22 = np.ascontiguousarray(L + np.triu(rng.normal(size=(D, D)), 1))  # upper part is scratch
    out = np.empty((Dp, Dp))
    assert _gradient.dense_inverse(L22, Dp, out) == 0
    Lp = L[:Dp, :Dp]
    np.testing.assert_allclose(out, np.linalg.inv(Lp @ Lp.T), rtol=1e-9, atol=1e-12)

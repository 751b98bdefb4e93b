"""BOBYQA's loop in C (``lmmfast._optim``) against nlopt's Python interface.

The compiled loop calls the blocked factor's C objective (``objective_capsule``); the
Python loop calls ``LinearMixedModel.objective`` through nlopt's Python interface.  Same
algorithm and settings, so the two must take the same path: the same evaluation count and
the same θ, bit for bit.  The C objective itself is checked against the dense numpy oracle
(``pls.dense_objective``) and lme4's objective at lme4's θ.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

import lmmfast.optsummary as optsummary
from lmmfast import LinearMixedModel
from lmmfast.pls import dense_lambda, dense_objective
from helpers import CASE_BY_ID, case_data, dense_parts, load_csv, load_ref, random_theta

_optim = pytest.importorskip("lmmfast._optim", reason="built without nlopt's C headers")

MODELS = [
    ("sleepstudy.csv", ["Subject"], "Reaction ~ Days + (Days | Subject)", True),
    ("penicillin.csv", ["plate", "sample"], "diameter ~ 1 + (1 | plate) + (1 | sample)", True),
    ("pastes.csv", ["batch", "cask"], "strength ~ 1 + (1 | batch/cask)", False),
    ("sleepstudy.csv", ["Subject"], "Reaction ~ Days + (1 + Days || Subject)", False),
]


def _model(name, factors, formula, reml):
    return LinearMixedModel(formula, load_csv(name, factors), REML=reml)


def _c_objective(model):
    """The capsule's C function, callable from Python with the GIL held (PYFUNCTYPE)."""
    capsule, factor = model.pls.compiled_objective(model.REML, model.ntheta)
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    fn = ctypes.PYFUNCTYPE(ctypes.c_double, ctypes.c_void_p, ctypes.POINTER(ctypes.c_double))(
        get(capsule, b"lmmfast.theta_objective"))

    def f(theta):
        th = np.ascontiguousarray(theta, dtype=np.float64)
        return fn(id(factor), th.ctypes.data_as(ctypes.POINTER(ctypes.c_double)))

    return f


@pytest.mark.parametrize("name,factors,formula,reml", MODELS)
def test_c_objective_matches_dense_oracle(name, factors, formula, reml):
    model = _model(name, factors, formula, reml)
    f = _c_objective(model)
    Z, X, y = dense_parts(model)
    rng = np.random.default_rng(11)
    for _ in range(4):
        theta = random_theta(model, rng)
        Lam = dense_lambda(model.terms, theta, model.theta_offsets)
        assert f(theta) == pytest.approx(dense_objective(Z, X, y, Lam, reml), rel=1e-10)


def test_c_objective_at_lme4_theta_is_lme4_objective():
    case = CASE_BY_ID["sleepstudy_reml"]
    ref = load_ref("sleepstudy_reml")
    model = LinearMixedModel(case["py_formula"], case_data(case), REML=bool(case["REML"]))
    assert _c_objective(model)(ref["theta"]) == pytest.approx(ref["objective"], abs=1e-6)


def test_capsule_checks_theta_length():
    model = _model(*MODELS[0])
    with pytest.raises(ValueError, match="theta"):
        model.pls.compiled_objective(True, 2)


@pytest.mark.parametrize("name,factors,formula,reml", MODELS)
def test_compiled_loop_takes_nlopt_pythons_path(name, factors, formula, reml):
    model = _model(name, factors, formula, reml)
    c = model.fit()                                   # compiled loop (nothing to report)
    p = model.fit(callback=lambda *a: None)           # a callback: nlopt's Python loop
    assert c.optsummary.feval == p.optsummary.feval
    np.testing.assert_array_equal(c.theta, p.theta)
    assert c.objective == p.objective
    assert c.optsummary.returnvalue == p.optsummary.returnvalue


def test_compiled_loop_with_initial_steps_and_maxeval():
    model = _model(*MODELS[1])
    step = np.array([0.05, np.nan])                   # NaN: nlopt's default for that element
    c = model.fit(initial_step=step)
    p = model.fit(initial_step=step, callback=lambda *a: None)
    assert c.optsummary.feval == p.optsummary.feval
    np.testing.assert_array_equal(c.theta, p.theta)
    with pytest.warns(optsummary.ConvergenceWarning):
        short = model.fit(maxeval=6)
    assert short.optsummary.returnvalue == "NLOPT_MAXEVAL_REACHED"
    assert short.optsummary.feval <= 7                # the boundary check may add one


def test_without_the_compiled_loop_the_python_loop_runs(monkeypatch):
    model = _model(*MODELS[0])
    c = model.fit()
    monkeypatch.setattr(optsummary, "_optim", None)
    p = model.fit()
    assert c.optsummary.feval == p.optsummary.feval
    np.testing.assert_array_equal(c.theta, p.theta)


def test_bobyqa_rejects_a_foreign_capsule():
    bad = ctypes.pythonapi.PyCapsule_New
    bad.restype, bad.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    cap = bad(ctypes.cast(ctypes.pythonapi.Py_IncRef, ctypes.c_void_p).value, b"other", None)
    with pytest.raises(ValueError):
        _optim.bobyqa(cap, None, np.ones(1), np.zeros(1), 1e-8, 1e-8, 0.0, 10)


# ------------------------------------------------------------ L-BFGS-B in scaled coordinates
def _quadratic(A, b):
    """f(θ) = ½ θ'Aθ − b'θ and its gradient."""
    return lambda x: (0.5 * x @ A @ x - b @ x, A @ x - b)


@pytest.mark.parametrize("scaled", [False, True])
def test_lbfgs_scaled_reaches_the_bounded_minimum(scaled):
    """A badly scaled quadratic whose minimum has one element at its bound of 0: the
    minimum (from the KKT conditions, by numpy) is reached with and without the scale,
    every θ the callback sees is feasible, and everything reported is in θ."""
    rng = np.random.default_rng(3)
    d = np.array([1e4, 1.0, 1e2, 0.1])
    R = np.linalg.qr(rng.normal(size=(4, 4)))[0]
    A = np.diag(np.sqrt(d)) @ (np.eye(4) + 0.3 * (R + R.T)) @ np.diag(np.sqrt(d))
    # the minimum by construction (KKT): element 0 at its bound with a multiplier of 30,
    # the gradient 0 in the others
    xs = np.array([0.0, -1.0, 0.2, 2.0])
    b = A @ xs - np.array([30.0, 0.0, 0.0, 0.0])
    lower = np.array([0.0, -np.inf, 0.0, -np.inf])
    seen = []
    x0 = np.array([1.0, 0.0, 1.0, 0.0])
    opt = optsummary.minimize_lbfgs(_quadratic(A, b), x0, lower, gtol=1e-9,
                                    scale=1.0 / np.sqrt(np.diag(A)) if scaled else None,
                                    callback=lambda n, x, f: seen.append(x))
    assert opt.converged
    np.testing.assert_allclose(opt.final, xs, atol=1e-6)
    np.testing.assert_array_equal(opt.initial, x0)
    np.testing.assert_array_equal(opt.lower, lower)
    assert all(np.all(x >= lower) for x in seen)
    assert opt.final[0] == 0.0


def test_lbfgs_rejects_a_bad_scale():
    f = _quadratic(np.eye(2), np.ones(2))
    for bad in (np.array([1.0, 0.0]), np.array([1.0, np.nan]), np.ones(3)):
        with pytest.raises(ValueError, match="scale"):
            optsummary.minimize_lbfgs(f, np.zeros(2), np.array([0.0, 0.0]), scale=bad)


def test_kb07_lbfgs_information_scale_reaches_the_unscaled_optimum(monkeypatch):
    """A small kb07-like maximal model (two 8×8 T, 72 θ) from the moment start: the
    scaled descent (the default there) ends no worse than the unscaled one; from lme4's
    start (the default below 1,000 rows) nothing is scaled."""
    import lmmfast
    from lmmfast.model import LinearMixedModel

    df, truth = lmmfast.simulate.kb07_like(nsubj=16, nitem=12, seed=5)
    plain = lmmfast.lmer(truth["formula"], df, REML=True, start="moments", scale=None)
    scaled = lmmfast.lmer(truth["formula"], df, REML=True, start="moments")
    assert scaled.optsummary.optimizer == "lbfgs" and scaled.optsummary.converged
    assert scaled.objective <= plain.objective + 1e-6 * abs(plain.objective)
    seen = []
    monkeypatch.setattr(LinearMixedModel, "information_scale",
                        lambda self, th: seen.append(th) or np.ones(self.ntheta))
    lmmfast.lmer(truth["formula"], df, REML=True)                  # 192 rows: lme4's start
    assert not seen
    lmmfast.lmer(truth["formula"], df, REML=True, start="moments")
    assert len(seen) == 1

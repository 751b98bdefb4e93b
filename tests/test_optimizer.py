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
import pandas as pd
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
    """A kb07-like maximal model (two 8×8 T, 72 θ; the ladder's 56 subjects × 32 items)
    from the moment start: the scaled descent (the default there) ends no worse than the
    unscaled one; from lme4's start (the default below 1,000 rows) nothing is scaled.

    The full size on purpose: on 192 rows these singular fits have several local optima
    0.1-3 apart, and which one a descent ends in changes with the BLAS's rounding (this
    test's earlier small model passed on one machine and failed on another); at 1,792
    rows the scaled and lme4-start descents agree on the 6 seeds tried, the unscaled one
    on 5 (on the sixth it stops 0.15 higher)."""
    import lmmfast
    from lmmfast.model import LinearMixedModel

    df, truth = lmmfast.simulate.kb07_like(nsubj=56, nitem=32, seed=1)
    plain = lmmfast.lmer(truth["formula"], df, REML=True, start="moments", scale=None)
    scaled = lmmfast.lmer(truth["formula"], df, REML=True)
    assert scaled.optsummary.optimizer == "lbfgs" and scaled.optsummary.converged
    assert scaled.objective <= plain.objective + 1e-6 * abs(plain.objective)
    assert scaled.optsummary.feval < plain.optsummary.feval
    df, truth = lmmfast.simulate.kb07_like(nsubj=16, nitem=12, seed=5)
    seen = []
    monkeypatch.setattr(LinearMixedModel, "information_scale",
                        lambda self, th: seen.append(th) or np.ones(self.ntheta))
    lmmfast.lmer(truth["formula"], df, REML=True)                  # 192 rows: lme4's start
    assert not seen
    lmmfast.lmer(truth["formula"], df, REML=True, start="moments")
    assert len(seen) == 1


# ------------------------------------------ Newton steps on the information, finite differences
def _newton_on(A, b, x0, lower, noise=0.0, exact=False, **kw):
    """minimize_newton on f = ½ x'Ax − b'x (+ rounding-like noise), with A as the
    information; ``exact``: with the gradient A x − b at the last evaluated x."""
    rng = np.random.default_rng(0)
    last = {}

    def f(x):
        last["x"] = x.copy()
        return 0.5 * x @ A @ x - b @ x + noise * rng.uniform(-1, 1)
    grad = (lambda: A @ last["x"] - b) if exact else None
    return optsummary.minimize_newton(f, lambda: A, x0, lower, gradient=grad, **kw)


@pytest.mark.parametrize("exact", [False, True])
def test_newton_reaches_a_bounded_minimum(exact):
    """A quadratic whose information is its Hessian: the minimum (by construction, one
    element at its bound) in a few steps of n + 1 evaluations (one each with the exact
    gradient); every iterate feasible."""
    rng = np.random.default_rng(1)
    R = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    A = R @ np.diag([50.0, 2.0, 0.3]) @ R.T
    xs = np.array([0.0, 0.7, -1.5])
    b = A @ xs - np.array([4.0, 0.0, 0.0])          # element 0 at its bound, multiplier 4
    lower = np.array([0.0, 0.0, -np.inf])
    seen = []
    opt = _newton_on(A, b, np.array([1.0, 1.0, 1.0]), lower, exact=exact,
                     callback=lambda n, x, f: seen.append(x))
    assert opt.converged and opt.optimizer == "newton"
    np.testing.assert_allclose(opt.final, xs, atol=1e-6)
    assert opt.feval <= (4 if exact else 4 * 4)
    assert all(np.all(x >= lower) for x in seen)


def test_newton_exact_gradient_stops_at_a_converged_point_without_stepping():
    """With the exact gradient the stop test comes right after the accepted step, on the
    information of the point before: at the minimum of a quadratic no further evaluation
    or information is asked for, and the last evaluation is the estimate (its factor
    stays)."""
    A = np.array([[3.0, 1.0], [1.0, 2.0]])
    b = np.array([1.0, -1.0])
    infos, evals = [], []
    last = {}

    def f(x):
        last["x"] = x.copy()
        evals.append(x.copy())
        return 0.5 * x @ A @ x - b @ x

    def info():
        infos.append(last["x"])
        return A
    opt = optsummary.minimize_newton(f, info, np.array([2.0, 2.0]), np.full(2, -np.inf),
                                     gradient=lambda: A @ last["x"] - b)
    xs = np.linalg.solve(A, b)
    assert opt.converged and opt.feval == 2 and len(infos) == 1
    np.testing.assert_allclose(opt.final, xs, atol=1e-12)
    np.testing.assert_array_equal(evals[-1], opt.final)


def test_newton_exact_gradient_refreshes_the_information_to_go_on():
    """Where the stale information's prediction is above the stop, it is refreshed at the
    new point and the steps go on (a non-quadratic objective: three or more steps)."""
    last = {}
    f_ = lambda x: np.sum(np.cosh(x - 1.0))

    def f(x):
        last["x"] = x.copy()
        return f_(x)
    infos = []

    def info():
        infos.append(last["x"])
        return np.diag(np.cosh(last["x"] - 1.0))
    opt = optsummary.minimize_newton(f, info, np.array([-1.0, 2.5]), np.full(2, -np.inf),
                                     gradient=lambda: np.sinh(last["x"] - 1.0), stop=1e-10)
    assert opt.converged
    np.testing.assert_allclose(opt.final, [1.0, 1.0], atol=1e-5)
    assert len(infos) >= 3 and len(infos) <= opt.feval


def test_newton_stops_where_the_next_gain_extrapolates_to_rounding():
    """Two steps that each lowered the objective by about their predicted decrease, the
    second's square over the first's at the rounding level: the steps stop right after
    the second's evaluation (no probes after it: the last evaluation is the estimate, its
    factor stays), at the minimum to 10⁻⁹."""
    evals, last = [], {}

    def f(x):
        last["x"] = x.copy()
        evals.append(x.copy())
        return np.sum(np.cosh(x - 1.0)) + 0.1 * np.sum((x - 1.0) ** 3)

    def info():
        return np.diag(np.cosh(last["x"] - 1.0) + 0.6 * (last["x"] - 1.0))
    opt = optsummary.minimize_newton(f, info, np.array([0.2, 1.9]), np.full(2, -np.inf))
    assert opt.converged and "EXTRAPOLATED" in opt.returnvalue
    np.testing.assert_array_equal(evals[-1], opt.final)
    assert opt.fmin - 2.0 < 1e-9 and opt.feval == len(evals)


@pytest.mark.parametrize("exact", [False, True])
def test_newton_stops_at_the_rounding_level(exact):
    """Noise of 10⁻⁹ on the objective: steps smaller than that are not chased (no damping
    spiral, no fallback)."""
    A = np.diag([4.0, 1.0])
    b = np.array([1.0, -2.0])
    called = []
    opt = _newton_on(A, b, np.zeros(2), np.array([-np.inf, -np.inf]), noise=1e-9,
                     exact=exact, fallback=lambda x: called.append(x))
    assert opt.converged and not called
    np.testing.assert_allclose(opt.final, np.linalg.solve(A, b), atol=1e-4)


def test_newton_falls_back_where_the_information_misleads():
    """An information with the wrong sign of the coupling (the objective's valley runs
    along x1 = x2, the information's across it) makes the steps go nowhere: within
    ``maxiter`` steps the fallback takes over from the best point, and the record says so."""
    A = np.array([[1.0, 0.99], [0.99, 1.0]])
    bad = np.array([[1.0, -0.99], [-0.99, 1.0]])
    f = lambda x: 0.5 * x @ A @ x - x.sum()
    got = {}

    def fallback(x):
        got["x"] = x
        return optsummary.minimize_lbfgs(lambda t: (f(t), A @ t - 1.0), x,
                                         np.array([-np.inf, -np.inf]))
    opt = optsummary.minimize_newton(f, lambda: bad, np.array([3.0, -2.0]),
                                     np.array([-np.inf, -np.inf]), max_damping=1e2,
                                     maxiter=3, fallback=fallback)
    np.testing.assert_allclose(opt.final, np.linalg.solve(A, np.ones(2)), atol=1e-5)
    assert "x" in got and opt.optimizer == "newton+lbfgs"
    assert f(got["x"]) <= f(np.array([3.0, -2.0]))                  # the best point so far


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("case_id", ["sleepstudy_reml", "penicillin_reml", "pastes_reml"])
def test_newton_reaches_lme4_optimum(case_id, exact):
    """Explicit optimizer="newton" from the moment start on lme4's reference cases, with
    gradients by differences and analytic."""
    ref = load_ref(case_id)
    case = CASE_BY_ID[case_id]
    fit = LinearMixedModel(case["py_formula"], case_data(case), REML=case["REML"]).fit(
        optimizer="newton", start="moments", exact_gradient=exact)
    assert fit.optsummary.optimizer.startswith("newton")
    assert fit.objective <= ref["objective"] + 1e-7 * abs(ref["objective"]) + 1e-6
    np.testing.assert_allclose(fit.theta, ref["theta"], atol=2e-3 * max(1.0, np.abs(ref["theta"]).max()))


def test_auto_takes_newton_only_for_large_moment_started_fits():
    import lmmfast
    from lmmfast import model as model_mod

    df = lmmfast.datasets.load("sleepstudy")
    small = lmmfast.lmer("Reaction ~ Days + (Days | Subject)", df)
    assert small.optsummary.optimizer == "bobyqa"
    big = pd.concat([df.assign(Subject=df.Subject.astype(str) + f"_{i}") for i in range(60)],
                    ignore_index=True)                                  # 10,800 rows
    assert len(big) >= model_mod.NEWTON_MIN_NOBS
    fit = lmmfast.lmer("Reaction ~ Days + (Days | Subject)", big)
    assert fit.optsummary.optimizer.startswith("newton")
    ref = lmmfast.lmer("Reaction ~ Days + (Days | Subject)", big, optimizer="bobyqa")
    assert fit.objective <= ref.objective + 1e-9 * abs(ref.objective) + 1e-6
    assert lmmfast.lmer("Reaction ~ Days + (Days | Subject)", big, start="lme4").optsummary.optimizer == "bobyqa"


def test_auto_newton_takes_the_analytic_gradient_from_three_thetas(monkeypatch):
    """θ of 3 or more elements: Newton's gradient is the analytic one (called once per
    accepted point, no difference evaluations); fewer: differences.  Both reach BOBYQA's
    optimum."""
    import lmmfast
    from lmmfast import gradient as gradient_mod
    from lmmfast import model as model_mod

    calls = []
    real = gradient_mod.blocked_gradient
    monkeypatch.setattr(gradient_mod, "blocked_gradient",
                        lambda pls, reml, **kw: calls.append(1) or real(pls, reml, **kw))
    df, _ = lmmfast.simulate.crossed(12_000, 300, 40)
    assert model_mod.NEWTON_EXACT_MIN_THETA == 3
    four = lmmfast.lmer("y ~ 1 + x + (1|g1) + (1 + x|g2)", df, REML=False)     # 4 θ
    assert four.optsummary.optimizer == "newton" and 1 <= len(calls) <= four.optsummary.feval
    ref = lmmfast.lmer("y ~ 1 + x + (1|g1) + (1 + x|g2)", df, REML=False, optimizer="bobyqa")
    assert four.objective <= ref.objective + 1e-9 * abs(ref.objective) + 1e-5
    np.testing.assert_allclose(four.theta, ref.theta, atol=5e-3)
    assert getattr(four.model.pls, "_minv", None) is None      # the buffer is not kept
    calls.clear()
    two = lmmfast.lmer("y ~ 1 + x + (1|g1) + (1|g2)", df, REML=False)          # 2 θ
    assert two.optsummary.optimizer == "newton" and not calls


def test_newton_probes_inside_a_stationary_bound():
    """f = (x² − 0.04)² + (y − 1)² + (z + 1)² with x, z ≥ 0 and the exact gradient: at
    x = 0 the gradient and the information's row vanish (a maximum along x), so the steps
    alone stay there; a probe just inside finds the minimum at x = 0.2.  z's bound is the
    true minimum (the probe there rises) and stays."""
    last = {}

    def f(v):
        last["v"] = v.copy()
        x, y, z = v
        return (x * x - 0.04) ** 2 + (y - 1.0) ** 2 + (z + 1.0) ** 2

    def info():
        x = last["v"][0]
        return np.diag([8.0 * x * x, 2.0, 2.0])

    def grad():
        x, y, z = last["v"]
        return np.array([4.0 * x * (x * x - 0.04), 2.0 * (y - 1.0), 2.0 * (z + 1.0)])
    lower = np.array([0.0, -np.inf, 0.0])
    opt = optsummary.minimize_newton(f, info, np.array([0.0, 3.0, 0.0]), lower,
                                     gradient=grad, stop=1e-12)
    assert opt.converged and opt.optimizer == "newton"
    np.testing.assert_allclose(opt.final, [0.2, 1.0, 0.0], atol=1e-4)


def _singular_slopes(seed=1, n=12_000):
    """Crossed g × h with random slopes of variance 0, 12,000 rows: Newton's steps land with
    both slopes' diagonals at 0, where h's optimum (in this sample) is inside."""
    rng = np.random.default_rng(seed)
    g, h = rng.integers(0, 200, n), rng.integers(0, 60, n)
    rng.integers(0, 4, n)
    x = rng.standard_normal(n)
    z = rng.standard_normal(n)
    ug, vg = rng.normal(0, 0.7, 200), rng.normal(0, 0.0, 200)
    uh, vh = rng.normal(0, 0.5, 60), rng.normal(0, 0.0, 60)
    y = 1 + 0.5 * x + ug[g] + vg[g] * x + uh[h] + vh[h] * x + 0.2 * z + rng.normal(0, 1, n)
    return pd.DataFrame(dict(y=y, x=x, g=g.astype(str), h=h.astype(str)))


@pytest.mark.parametrize("exact", [False, True])
def test_newton_leaves_a_bound_where_the_optimum_is_inside(exact):
    """A simulated case where the steps stop with both slopes' diagonals at 0 and BOBYQA
    finds h's inside: the probes reach BOBYQA's optimum."""
    import lmmfast

    df = _singular_slopes()
    f = "y ~ x + (x|g) + (x|h)"
    fit = lmmfast.lmer(f, df, REML=False, optimizer="newton", exact_gradient=exact)
    ref = lmmfast.lmer(f, df, REML=False, optimizer="bobyqa")
    assert ref.theta[5] > 0.01                       # h's slope: inside
    assert fit.objective <= ref.objective + 1e-9 * abs(ref.objective)
    np.testing.assert_allclose(fit.theta, ref.theta, atol=1e-3)


def test_newton_differences_probe_keeps_the_lower_probes_factor():
    """Forward differences: f = 10⁶(x² − 10⁻⁴)² + (y − 1)² + (z + 1)², x, z ≥ 0.  The
    differences at x = 0 overshoot the minimum at x = 0.01 and push outward, so the steps
    stop on both bounds; of the two probes the first (x) is lower, the last (z) not.  The
    steps then go on from x's probe, with the information at that point (the factor is
    brought back there), and reach x = 0.01."""
    last = {}

    def f(v):
        last["v"] = v.copy()
        x, y, z = v
        return 1e6 * (x * x - 1e-4) ** 2 + (y - 1.0) ** 2 + (z + 1.0) ** 2

    at = []

    def info():
        at.append(last["v"].copy())
        x = last["v"][0]
        return np.diag([1e6 * 8.0 * x * x, 2.0, 2.0])
    lower = np.array([0.0, -np.inf, 0.0])
    opt = optsummary.minimize_newton(f, info, np.array([0.0, 3.0, 0.0]), lower, stop=1e-12)
    assert opt.converged
    np.testing.assert_allclose(opt.final, [0.01, 1.0, 0.0], atol=1e-4)
    assert any(np.allclose(a, [1e-3, 1.0, 0.0], atol=1e-6) for a in at)

"""The profiled objective at a fixed θ (no optimizer), against independent evaluations.

* ``LinearMixedModel.objective(θ)`` (blocked Cython factor) against the dense numpy
  oracle ``pls.dense_objective`` built from dense Z, X, y and Λ, at random θ;
* at lme4's reference θ, against lme4's reference objective (an oracle outside lmmfast).
"""
from __future__ import annotations

import zlib

import numpy as np
import pandas as pd
import pytest

from lmmfast import LinearMixedModel
from lmmfast.pls import dense_lambda, dense_objective
from helpers import CASES, case_data, dense_parts, load_csv, load_ref, random_theta


# ---------------------------------------------------------------------------- the data
def _sim(seed=0, n=240):
    """Simulated data: g1 (40 levels) > g2 (8) > g3 (5), numeric x and z."""
    rng = np.random.default_rng(seed)
    g1 = rng.integers(0, 40, n)
    g2 = rng.integers(0, 8, n)
    g3 = rng.integers(0, 5, n)
    x = rng.normal(size=n)
    z = rng.uniform(-1, 1, size=n)
    y = (1.0 + 0.5 * x - z + rng.normal(size=40)[g1] + rng.normal(size=8)[g2] * (1 + x)
         + rng.normal(size=5)[g3] * z + rng.normal(scale=0.7, size=n))
    return pd.DataFrame({"g1": [f"s{i}" for i in g1], "g2": [f"t{i}" for i in g2],
                         "g3": [f"u{i}" for i in g3], "x": x, "z": z, "y": y})


SIM = _sim()

MODELS = [
    # (id, data loader, formula)
    ("sleepstudy_corr", lambda: load_csv("sleepstudy.csv", ["Subject"]),
     "Reaction ~ Days + (Days | Subject)"),
    ("sleepstudy_uncorr", lambda: load_csv("sleepstudy.csv", ["Subject"]),
     "Reaction ~ Days + (Days || Subject)"),
    ("penicillin_crossed", lambda: load_csv("penicillin.csv", ["plate", "sample"]),
     "diameter ~ 1 + (1 | plate) + (1 | sample)"),
    ("pastes_nested", lambda: load_csv("pastes.csv", ["batch", "cask", "sample"]),
     "strength ~ 1 + (1 | batch/cask)"),
    ("cake_fixed_factors", lambda: load_csv("cake.csv", ["replicate", "recipe", "temperature"]),
     "angle ~ recipe * temperature + (1 | recipe:replicate)"),
    ("orthodont", lambda: load_csv("orthodont.csv", ["Subject", "Sex"]),
     "distance ~ age + Sex + (age | Subject)"),
    ("machines_nested", lambda: load_csv("machines.csv", ["Worker", "Machine"]),
     "score ~ Machine + (1 | Worker/Machine)"),
    ("machines_factor_slope", lambda: load_csv("machines.csv", ["Worker", "Machine"]),
     "score ~ Machine + (0 + Machine | Worker)"),
    ("sim_slope_only", lambda: SIM, "y ~ x + (0 + x | g2)"),
    ("sim_three_columns", lambda: SIM, "y ~ x + z + (1 + x + z | g2)"),
    ("sim_rest_term_k2", lambda: SIM, "y ~ x + (1 | g1) + (1 + x | g2)"),
    ("sim_rest_terms_k2_k3", lambda: SIM, "y ~ x + (1 | g1) + (1 + x | g2) + (1 + x + z | g3)"),
    ("sim_first_k3_rest_k2", lambda: SIM, "y ~ z + (1 + x + z | g1) + (0 + z | g3) + (x | g2)"),
    ("sim_rest_slope_only", lambda: SIM, "y ~ x + (1 | g1) + (0 + x | g2)"),
    ("sim_uncorr_crossed", lambda: SIM, "y ~ x + (x || g2) + (1 | g1)"),
    ("sim_no_fixed_effects", lambda: SIM, "y ~ 0 + (1 | g2) + (1 | g1)"),
]
MODEL_PARAMS = [pytest.param(d, f, id=i) for i, d, f in MODELS]


def _methods():
    """Factorizations LinearMixedModel offers here (``method=``), if it has the argument."""
    import inspect

    if "method" not in inspect.signature(LinearMixedModel).parameters:
        return [None]
    out = ["blocked"]
    try:
        from lmmfast.sparsepls import cholmod_available
    except ImportError:
        return out
    return out + (["cholmod"] if cholmod_available() else [])


METHODS = _methods()


def _model(formula, data, reml, method=None):
    kw = {} if method is None else {"method": method}
    return LinearMixedModel(formula, data, REML=reml, **kw)


def _dense_objective(model, theta):
    Z, X, y = dense_parts(model)
    Lam = dense_lambda(model.terms, np.asarray(theta, float), model.theta_offsets)
    return dense_objective(Z, X, y, Lam, model.REML)


# ------------------------------------------------------------ blocked vs dense at random θ
def _oracle_params():
    out = []
    for i, loader, formula in MODELS:
        for method in METHODS:
            out.append(pytest.param(loader, formula, method, id=f"{i}-{method}"))
    return out


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("loader,formula,method", _oracle_params())
def test_objective_matches_dense_oracle(loader, formula, method, reml):
    model = _model(formula, loader(), reml, method)
    rng = np.random.default_rng(zlib.crc32(f"{formula}{reml}".encode()))
    thetas = [model.theta_start] + [random_theta(model, rng, zero_prob=0.2) for _ in range(6)]
    for theta in thetas:
        ours = model.objective(theta)
        dense = _dense_objective(model, theta)
        assert np.isfinite(ours)
        assert ours == pytest.approx(dense, rel=1e-9, abs=1e-8), f"theta={theta}"


@pytest.mark.parametrize("loader,formula", MODEL_PARAMS)
def test_reml_and_ml_differ_as_the_formulas_say(loader, formula):
    """REML - ML at the same θ is log|R_X|² + the (n-p) vs n terms (JSS eqs. 34, 41)."""
    data = loader()
    ml = LinearMixedModel(formula, data, REML=False)
    reml = LinearMixedModel(formula, data, REML=True)
    rng = np.random.default_rng(7)
    theta = random_theta(ml, rng)
    ml.pls.factor(theta)
    ldz, ldx, r2 = ml.pls.pieces()
    n, p = ml.nobs, ml.p
    log2pi = np.log(2 * np.pi)
    want_ml = ldz + n * (1 + log2pi + np.log(r2 / n))
    want_reml = ldz + ldx + (n - p) * (1 + log2pi + np.log(r2 / (n - p)))
    assert ml.objective(theta) == pytest.approx(want_ml, rel=1e-12)
    assert reml.objective(theta) == pytest.approx(want_reml, rel=1e-12)


@pytest.mark.parametrize("loader,formula", MODEL_PARAMS)
def test_objective_invariant_to_column_signs_of_T(loader, formula):
    """Λ → Λ D (D = diag(±1) per column of each T) leaves ΛΛ' and so the objective unchanged."""
    model = LinearMixedModel(formula, loader(), REML=True)
    rng = np.random.default_rng(11)
    theta = random_theta(model, rng)
    flipped = theta.copy()
    for t, off in zip(model.terms, model.theta_offsets):
        signs = rng.choice([-1.0, 1.0], size=t.k)
        cols = [j for j in range(t.k) for i in range(j, t.k)]     # θ is column-major lower-tri
        flipped[off: off + t.ntheta] *= signs[cols]
    assert model.objective(flipped) == pytest.approx(model.objective(theta), rel=1e-10)


def test_objective_is_repeatable_and_stateless():
    model = LinearMixedModel("y ~ x + (1 | g1) + (1 + x | g2)", SIM)
    rng = np.random.default_rng(3)
    a, b = random_theta(model, rng), random_theta(model, rng)
    fa = model.objective(a)
    fb = model.objective(b)
    assert model.objective(a) == fa
    assert model.objective(b) == fb
    assert fa != fb


def test_objective_rejects_wrong_theta_length():
    model = LinearMixedModel("Reaction ~ Days + (Days | Subject)", load_csv("sleepstudy.csv", ["Subject"]))
    with pytest.raises(ValueError, match="theta"):
        model.objective([1.0, 0.0])
    with pytest.raises(ValueError, match="theta"):
        model.objective(np.ones(4))


# ------------------------------------------------------------- independent Z and Λ checks
def test_dense_lambda_fills_T_column_major():
    """θ fills each T's lower triangle column by column (lme4's Lind); Λ = ⊕ I_m ⊗ T."""
    model = LinearMixedModel("y ~ x + (1 | g1) + (1 + x + z | g3)", SIM)
    t3 = next(t for t in model.terms if t.k == 3)
    t1 = next(t for t in model.terms if t.k == 1)
    theta = np.arange(1.0, model.ntheta + 1)
    Lam = dense_lambda(model.terms, theta, model.theta_offsets)
    blocks = []
    for t, off in zip(model.terms, model.theta_offsets):
        th = theta[off: off + t.ntheta]
        if t is t3:
            T = np.array([[th[0], 0, 0], [th[1], th[3], 0], [th[2], th[4], th[5]]])
        else:
            assert t is t1
            T = np.array([[th[0]]])
        blocks.append(np.kron(np.eye(t.nlevels), T))
    q = sum(b.shape[0] for b in blocks)
    want = np.zeros((q, q))
    o = 0
    for b in blocks:
        want[o: o + b.shape[0], o: o + b.shape[0]] = b
        o += b.shape[0]
    np.testing.assert_array_equal(Lam, want)


def test_Z_is_level_major_model_matrix():
    df = load_csv("sleepstudy.csv", ["Subject"])
    model = LinearMixedModel("Reaction ~ Days + (Days | Subject)", df)
    (t,) = model.terms
    Z = t.Z().toarray()
    levels = sorted(df["Subject"].unique())
    assert t.levels == levels
    want = np.zeros((len(df), 2 * len(levels)))
    for r, (s, d) in enumerate(zip(df["Subject"], df["Days"])):
        j = levels.index(s)
        want[r, 2 * j] = 1.0
        want[r, 2 * j + 1] = d
    np.testing.assert_array_equal(Z, want)
    np.testing.assert_array_equal(model.y, df["Reaction"].to_numpy(float))
    np.testing.assert_array_equal(model.X, np.column_stack([np.ones(len(df)), df["Days"]]))


# ---------------------------------------------------------- at lme4's θ: lme4's objective
@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in CASES])
def test_objective_at_lme4_theta_is_lme4_objective(case):
    ref = load_ref(case["id"])
    model = LinearMixedModel(case["py_formula"], case_data(case), REML=bool(case["REML"]))
    assert model.nobs == ref["nobs"]
    got = model.objective(ref["theta"])
    assert got == pytest.approx(ref["objective"], rel=1e-6)
    for alt in ref.get("alt_fits") or []:
        if alt.get("objective") is not None:
            assert model.objective(alt["theta"]) == pytest.approx(alt["objective"], rel=1e-6)

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


# ------------------------------------- large dense blocks: row-wise and heavy-level products
def _structured(formula, reml, transposed, heavy_rows, seed=3):
    """A model on ``crossed`` data with the cross-products built as asked (row-wise
    transposed pattern, heavy levels), for the gradient's large-block paths."""
    from lmmfast.blocks import BlockedCrossprod
    from lmmfast.pls import BlockedPLS

    df, _ = lmmfast.simulate.crossed(3000, 120, 40, slope=True, seed=seed)
    df["f"] = np.random.default_rng(seed).integers(0, 4, len(df)).astype(str)
    m = lmmfast.LinearMixedModel(formula, df, REML=reml, method="blocked")
    m.pls = BlockedPLS(BlockedCrossprod(m.terms, m.X, m.y, m.theta_offsets,
                                        transposed=transposed, heavy_rows=heavy_rows))
    return m


@pytest.mark.parametrize("reml", [False, True])
@pytest.mark.parametrize("formula", ["y ~ 1 + x + (1|g1) + (1 + x|g2)",
                                     "y ~ x * f + (1 + x|g1) + (1|g2)",
                                     "y ~ x + (1|g1) + (1|g2)"])
@pytest.mark.parametrize("transposed,heavy_rows", [(True, 10 ** 9), (True, 25), (False, 25)])
def test_gradient_row_wise_and_heavy_paths_match_finite_differences(formula, reml,
                                                                    transposed, heavy_rows):
    """The gradient where M⁻¹'s products with the panels come row by row (transposed
    pattern) and from one dense product (heavy levels): central differences agree, and so
    does the per-level gather path (no transposed pattern, no heavy levels)."""
    m = _structured(formula, reml, transposed, heavy_rows)
    xp = m.pls.xp
    if heavy_rows < 100:
        assert 0 < len(xp.heavy) < xp.m1
    assert (xp.tptr is not None) == transposed
    rng = np.random.default_rng(11)
    diag = m.theta_lower == 0
    th = np.where(diag, rng.uniform(0.3, 1.2, m.ntheta), rng.normal(scale=0.3, size=m.ntheta))
    _, g = m.objective_and_gradient(th)
    plain = _structured(formula, reml, False, 10 ** 9)
    assert len(plain.pls.xp.heavy) == 0
    _, g0 = plain.objective_and_gradient(th)
    np.testing.assert_allclose(g, g0, rtol=1e-9, atol=1e-9 * np.abs(g0).max())
    gn = numeric_gradient(m.objective, th, h=1e-6)
    np.testing.assert_allclose(g, gn, rtol=2e-5, atol=2e-5 * max(1.0, np.abs(gn).max()))


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 40), st.integers(2, 12), st.integers(1, 3), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_rowwise_products_match_reference(m1, nlev2, k1, reml_rows, seed):
    """_gradient.rowwise_products against its numpy oracle on random panel patterns (the
    transposed pattern built as BlockedCrossprod builds it), a random symmetric Minv over
    the first Dp rows, threads 1 and 2."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    nz = nlev2 * 2
    p = 2
    D = nz + p + 1
    Dp = nz + p if reml_rows else nz
    # every level: a random subset of the random-effects rows, then all X/y rows
    pieces = [np.concatenate([np.sort(rng.choice(nz, rng.integers(1, nz + 1), replace=False)),
                              nz + np.arange(p + 1)]) for _ in range(m1)]
    indptr = np.zeros(m1 + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(q) for q in pieces])
    rows = np.concatenate(pieces).astype(np.int64)
    V = rng.normal(size=(len(rows), k1))
    lev = np.repeat(np.arange(m1), np.diff(indptr))
    keep = np.flatnonzero(rows < nz)
    kptr = np.zeros(m1 + 1, dtype=np.int64)
    np.cumsum(np.bincount(lev[keep], minlength=m1), out=kptr[1:])
    P_ = sp.csr_matrix((keep, rows[keep], kptr), shape=(m1, D)).tocsc()
    tptr, tlev, tidx = (P_.indptr.astype(np.int64), P_.indices.astype(np.int64),
                        P_.data.astype(np.int64))
    A = rng.normal(size=(Dp, Dp))
    Minv = A + A.T
    ref = np.full_like(V, np.nan)
    _gradient.rowwise_products_reference(Minv, indptr, rows, V, tptr, tidx, tlev, ref)
    for nt in (1, 2):
        P = np.full_like(V, np.nan)
        _gradient.rowwise_products(Minv, indptr, rows.astype(np.int32), V, tptr, tidx, tlev,
                                   P, nt)
        np.testing.assert_allclose(P[keep], ref[keep], rtol=1e-12, atol=1e-12)
        assert np.isnan(P[rows >= nz]).all()                   # untouched outside the pattern
    bad = tidx.copy()
    bad[0] = indptr[-1]
    with pytest.raises(ValueError, match="transposed pattern"):
        _gradient.rowwise_products(Minv, indptr, rows.astype(np.int32), V, tptr, bad, tlev,
                                   np.empty_like(V))


@pytest.mark.parametrize("formula", ["y ~ 1 + x + (1|g1) + (1 + x|g2)",
                                     "y ~ x + (1 + x + z|g1) + (1|g2) + (x|g3)",
                                     "y ~ x + z + (1 + x|g1) + (1 + x + z|g2) + (0 + z|g3)"])
@pytest.mark.parametrize("reml", [False, True])
def test_rest_trace_matches_numpy(formula, reml):
    """_gradient.rest_trace against the dense products: Λ_rest'A22 formed by row
    operations and the later terms' diagonal blocks of Minv ∘ (Λ_rest'A22) summed."""
    from helpers import sim_three_factors
    from lmmfast.information import _lam_t_rows

    m = lmmfast.LinearMixedModel(formula, sim_three_factors(), REML=reml, method="blocked")
    rng = np.random.default_rng(2)
    th = np.where(m.theta_lower == 0, rng.uniform(0.3, 1.2, m.ntheta),
                  rng.normal(scale=0.3, size=m.ntheta))
    m.objective(th)
    pls, xp = m.pls, m.pls.xp
    nz = xp.nz
    Dp = nz + xp.p if reml else nz
    A = rng.normal(size=(Dp, Dp))
    Minv = A + A.T
    got = _gradient.rest_trace(Minv, xp.A22, nz, pls.rscale, xp.rk, xp.rtoff, pls.Tflat,
                               xp.term_shapes[1:], xp.rest_offsets)
    AL = _lam_t_rows(xp.A22[:Dp, :nz], xp, pls.rscale, pls.Tflat, Dp)
    for G, (mm, k), o in zip(got, xp.term_shapes[1:], xp.rest_offsets):
        Mi = Minv[:, o: o + mm * k].reshape(Dp, mm, k)
        Ai = AL[:, o: o + mm * k].reshape(Dp, mm, k)
        np.testing.assert_allclose(G, np.einsum("rlb,rla->ba", Mi, Ai), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError):
        _gradient.rest_trace(Minv[:, :-1], xp.A22, nz, pls.rscale, xp.rk, xp.rtoff,
                             pls.Tflat, xp.term_shapes[1:], xp.rest_offsets)

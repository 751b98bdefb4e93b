"""The compiled blocked Cholesky kernel (``lmmfast._blockchol``, ``lmmfast._pls``) against dense linear algebra.

Random block structures (hypothesis): a first term with m1 levels and k1 = 1..3 columns,
0..2 further terms with k = 1..3 columns and a few levels (sometimes on the first term's
own grouping factor, as ``||`` produces), p = 0..3 fixed effects.  The blocked factor
(L11 blocks, L21 panels, tril(L22)) is assembled into one lower-triangular matrix in the
full order [term 1 (level-major), other terms, X, y] and compared with
``numpy.linalg.cholesky`` of the dense Ω(θ) from ``pls.dense_factor``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmmfast import LinearMixedModel, _blockchol, _pls
from lmmfast.blocks import BlockedCrossprod
from lmmfast.pls import BlockedPLS, dense_factor, dense_lambda, dense_objective
from helpers import dense_parts, random_theta

HSETTINGS = settings(max_examples=50, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------- structures
@st.composite
def structures(draw):
    """A random mixed model: data frame, formula, θ."""
    # sampled_from spreads the examples more evenly over the shapes than integers() does
    k1 = draw(st.sampled_from([1, 2, 3]))
    m1 = draw(st.integers(2, 7))
    rest = []
    for _ in range(draw(st.sampled_from([0, 1, 2, 2]))):
        k = draw(st.sampled_from([1, 2, 3]))
        same_factor = draw(st.booleans()) and draw(st.booleans())     # ~1/4: share g0
        m = m1 if same_factor else draw(st.integers(2, 4))
        rest.append((k, m, same_factor, draw(st.booleans())))
    p = draw(st.sampled_from([0, 1, 2, 3]))
    intercept1 = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    zero_prob = draw(st.sampled_from([0.0, 0.0, 0.3]))
    extra = draw(st.integers(0, 25))
    reml = draw(st.booleans())

    rng = np.random.default_rng(seed)
    q_max = max([m1 * k1] + [m * k for k, m, _, _ in rest])
    n = max(q_max, m1, p + 1) + 2 + extra

    def codes(m):
        c = np.concatenate([np.arange(m), rng.integers(0, m, n - m)])
        return rng.permutation(c)

    def lhs(k, intercept):
        slopes = [f"x{i}" for i in range(1, k + (0 if intercept else 1))]
        return " + ".join((["1"] if intercept else ["0"]) + slopes)

    df = pd.DataFrame({f"x{i}": rng.normal(size=n) for i in range(1, 4)})
    df["g0"] = [f"a{c}" for c in codes(m1)]
    bars = [f"({lhs(k1, intercept1)} | g0)"]
    for i, (k, m, same, icpt) in enumerate(rest, start=1):
        if same:
            bars.append(f"({lhs(k, icpt)} | g0)")
        else:
            df[f"g{i}"] = [f"b{c}" for c in codes(m)]
            bars.append(f"({lhs(k, icpt)} | g{i})")
    for j in range(1, 4):
        df[f"f{j}"] = rng.uniform(-2, 2, size=n)
    fixed = "0" if p == 0 else " + ".join(["1"] + [f"f{j}" for j in range(1, p)])
    df["y"] = rng.normal(size=n) * 2 + df["x1"]
    formula = f"y ~ {fixed} + " + " + ".join(bars)
    model = LinearMixedModel(formula, df, REML=reml)
    theta = random_theta(model, rng, zero_prob=zero_prob)
    return model, theta


def blocked(model):
    """A BlockedPLS for the model's terms (whatever factorization the model picked)."""
    if isinstance(model.pls, BlockedPLS):
        return model.pls
    return BlockedPLS(BlockedCrossprod(model.terms, model.X, model.y, model.theta_offsets))


def row_descriptors(model, theta, D):
    """rscale, rk, rtoff, Tflat for the dense block, built here from the terms (not from
    BlockedCrossprod): a k=1 term scales its rows by θ, a k>1 term transforms each level's
    k rows by its row-major T."""
    rscale = np.ones(D)
    rk = np.ones(D, dtype=np.int64)
    rtoff = np.zeros(D, dtype=np.int64)
    tflat = []
    o = 0
    for t, off in zip(model.terms[1:], model.theta_offsets[1:]):
        T = t.T(theta[off: off + t.ntheta])
        if t.k == 1:
            rscale[o: o + t.q] = T[0, 0]
        else:
            start = len(tflat)
            tflat.extend(T.ravel())
            rk[o: o + t.q] = 0
            rk[o: o + t.q: t.k] = t.k
            rtoff[o: o + t.q: t.k] = start
        o += t.q
    return rscale, rk, rtoff, np.asarray(tflat if tflat else [0.0])


def run_kernel(model, theta):
    """Call update_blocked directly; returns (info, L11, L21, L22, xp)."""
    xp = blocked(model).xp
    t1 = model.terms[0]
    T1 = np.ascontiguousarray(t1.T(theta[: t1.ntheta]))
    rscale, rk, rtoff, tflat = row_descriptors(model, theta, xp.D)
    L11 = np.zeros_like(xp.A11)
    L21 = np.zeros_like(xp.A21)
    L22 = np.zeros_like(xp.A22)
    info = _blockchol.update_blocked(xp.A11, T1, xp.indptr, xp.rows, xp.A21, xp.A22, xp.nz,
                               rscale, rk, rtoff, tflat, L11, L21, L22)
    return info, L11, L21, L22, xp


def assemble(L11, L21, L22, xp):
    """The full lower-triangular factor from its blocked pieces."""
    m1, k1, _ = L11.shape
    q1 = m1 * k1
    N = q1 + xp.D
    L = np.zeros((N, N))
    for j in range(m1):
        L[j * k1:(j + 1) * k1, j * k1:(j + 1) * k1] = L11[j]
        p0, p1 = xp.indptr[j], xp.indptr[j + 1]
        L[q1 + xp.rows[p0:p1], j * k1:(j + 1) * k1] = L21[p0:p1]
    L[q1:, q1:] = np.tril(L22)            # the strict upper triangle of L22 is scratch
    return L


def dense_L(model, theta):
    Z, X, y = dense_parts(model)
    Lam = dense_lambda(model.terms, theta, model.theta_offsets)
    return dense_factor(Z, X, y, Lam)


# ------------------------------------------------------------------------------ tests
def check_factor(mt):
    model, theta = mt
    info, L11, L21, L22, xp = run_kernel(model, theta)
    assert info == 0
    L = assemble(L11, L21, L22, xp)
    Ld = dense_L(model, theta)
    assert L.shape == Ld.shape
    scale = max(1.0, np.abs(Ld).max())
    np.testing.assert_allclose(L, Ld, rtol=1e-9, atol=1e-10 * scale)
    # the pieces reproduce Ω: L L' == Ω
    Om = Ld @ Ld.T
    np.testing.assert_allclose(L @ L.T, Om, rtol=1e-9, atol=1e-9 * np.abs(Om).max())


@HSETTINGS
@given(structures())
def test_blocked_factor_equals_dense_cholesky(mt):
    check_factor(mt)


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(structures())
def test_blocked_factor_equals_dense_cholesky_many(mt):
    """The same comparison over many more structures (``pytest -m slow``)."""
    check_factor(mt)


@HSETTINGS
@given(structures())
def test_small_and_term_by_term_cross_products_agree(mt):
    """Small models form their cross-products in one compiled pass (``_small``); the
    term-by-term path (bincounts and pair codes) that larger models take must give the
    same arrays, so the dense-oracle tests above (all small) cover both."""
    import lmmfast.blocks as blocks

    model, _ = mt
    args = (model.terms, model.X, model.y, model.theta_offsets)
    small = BlockedCrossprod(*args)
    old = blocks.SMALL_COUPLING
    blocks.SMALL_COUPLING = -1
    try:
        general = BlockedCrossprod(*args)
        # the model's [X y]'[X y] (scipy's BLAS) in place of the path's own X/y product
        given_gram = BlockedCrossprod(*args, xy_gram=model.xy_gram)
    finally:
        blocks.SMALL_COUPLING = old
    for other in (general, given_gram):
        for name in ["A11", "A22", "indptr", "rows", "A21", "batch", "heavy"]:
            np.testing.assert_allclose(getattr(small, name), getattr(other, name),
                                       rtol=1e-12, atol=1e-12, err_msg=name)
    Xy = np.column_stack([model.X, model.y])
    np.testing.assert_allclose(model.xy_gram, Xy.T @ Xy, rtol=1e-12, atol=1e-12)


@HSETTINGS
@given(structures())
def test_logdets_equal_dense_diagonal(mt):
    model, theta = mt
    info, L11, L21, L22, xp = run_kernel(model, theta)
    assert info == 0
    ldz, ldx, r2 = _pls.logdets(L11, L22, xp.nz)
    d = np.diag(dense_L(model, theta))
    q, p = sum(t.q for t in model.terms), model.p
    assert ldz == pytest.approx(2 * np.log(d[:q]).sum(), rel=1e-9, abs=1e-9)
    assert ldx == pytest.approx(2 * np.log(d[q:q + p]).sum(), rel=1e-9, abs=1e-9)
    assert r2 == pytest.approx(d[-1] ** 2, rel=1e-9)
    assert len(d) == q + p + 1


@settings(max_examples=60, deadline=None, database=None)
@given(st.integers(1, 3000), st.integers(1, 3), st.integers(0, 40), st.integers(0, 2 ** 31))
def test_logdets_over_extreme_diagonals(m1, k1, D, seed):
    """The log-determinants multiply diagonals before taking logs: diagonals from 1e-250
    to 1e250 (products far beyond double range), runs of values near 1, zeros: the sum
    of numpy's logs (-inf with a zero)."""
    rng = np.random.default_rng(seed)
    D = D + 2
    nz = int(rng.integers(0, D - 1))

    def diag(n):
        kind = rng.integers(0, 4, n)
        return np.where(kind == 0, 10.0 ** rng.uniform(-250, 250, n),
                        np.where(kind == 1, 1.0 + rng.uniform(0, 1e-3, n),
                                 rng.uniform(0.5, 1e6, n)))

    L11 = np.zeros((m1, k1, k1))
    L11[:, np.arange(k1), np.arange(k1)] = diag(m1 * k1).reshape(m1, k1)
    L22 = np.eye(D)
    L22[np.arange(D), np.arange(D)] = diag(D)
    L22[-1, -1] = rng.uniform(0.5, 10.0)          # r, the residual's root
    if seed % 7 == 0:
        L11[m1 // 2, 0, 0] = 0.0
    ldz, ldx, r2 = _pls.logdets(L11, L22, nz)
    with np.errstate(divide="ignore"):
        want_z = 2 * (np.log(np.diagonal(L11, axis1=1, axis2=2)).sum()
                      + np.log(L22.diagonal()[:nz]).sum())
    want_x = 2 * np.log(L22.diagonal()[nz:D - 1]).sum()
    if np.isinf(want_z):
        assert ldz == want_z
    else:
        assert ldz == pytest.approx(want_z, rel=1e-12, abs=1e-9)
    assert ldx == pytest.approx(want_x, rel=1e-12, abs=1e-9)
    assert r2 == pytest.approx(L22[-1, -1] * L22[-1, -1], rel=1e-15)


@HSETTINGS
@given(structures())
def test_blocked_pls_factor_and_objective(mt):
    """BlockedPLS.factor (θ → kernel arguments via BlockedCrossprod's index maps) gives the
    same factor as the directly built arguments; its objective is the dense one."""
    model, theta = mt
    pls = blocked(model)
    assert pls.factor(theta) == 0
    _, L11, L21, L22, xp = run_kernel(model, theta)
    np.testing.assert_allclose(pls.L11, L11, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(pls.L21, L21, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(np.tril(pls.L22), np.tril(L22), rtol=1e-13, atol=1e-13)
    Z, X, y = dense_parts(model)
    Lam = dense_lambda(model.terms, theta, model.theta_offsets)
    want = dense_objective(Z, X, y, Lam, model.REML)
    assert pls.objective(theta, model.REML) == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert model.objective(theta) == pytest.approx(want, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("lhs", ["1 + a*b*c", "1 + a*b", "1 + a"])
def test_wide_panels_equal_dense_cholesky(lhs):
    """A maximal crossed design (every subject meets every item): panels of 67-265 rows and
    k1 = 2..8 columns, wide enough for the kernel's BLAS panel product."""
    from lmmfast import simulate
    from helpers import random_theta

    df = simulate.kb07_like(seed=3, nsubj=32, nitem=32)[0].rename(
        columns={"spkr": "a", "prec": "b", "load": "c"})
    model = LinearMixedModel(f"y ~ 1 + a*b*c + ({lhs} | subj) + ({lhs} | item)", df)
    k1 = model.terms[0].k
    nr = int(np.diff(model.pls.xp.indptr).max())
    assert nr * k1 * k1 >= 2048 or k1 == 2         # the BLAS path (k1 = 2: the loops)
    for seed in range(3):
        theta = random_theta(model, np.random.default_rng(seed))
        check_factor((model, theta))


# ------------------------------------------------------------------ the def's validation
def _valid_args():
    rng = np.random.default_rng(0)
    n = 40
    df = pd.DataFrame({"g": [f"l{i % 5}" for i in range(n)], "h": [f"m{i % 3}" for i in range(n)],
                       "x": rng.normal(size=n), "y": rng.normal(size=n)})
    model = LinearMixedModel("y ~ x + (1 + x | g) + (1 + x | h)", df)
    theta = random_theta(model, rng)
    xp = blocked(model).xp
    t1 = model.terms[0]
    rscale, rk, rtoff, tflat = row_descriptors(model, theta, xp.D)
    args = dict(A11=xp.A11, T1=np.ascontiguousarray(t1.T(theta[: t1.ntheta])), indptr=xp.indptr,
                rows=xp.rows, A21=xp.A21, A22=xp.A22, nz=xp.nz, rscale=rscale, rk=rk, rtoff=rtoff,
                Tflat=tflat, L11_out=np.zeros_like(xp.A11), L21_out=np.zeros_like(xp.A21),
                L22_out=np.zeros_like(xp.A22))
    return args


ORDER = ["A11", "T1", "indptr", "rows", "A21", "A22", "nz", "rscale", "rk", "rtoff", "Tflat",
         "L11_out", "L21_out", "L22_out"]


def _call(args):
    return _blockchol.update_blocked(*[args[k] for k in ORDER])


def test_valid_arguments_succeed():
    assert _call(_valid_args()) == 0


def test_check_only_validates_without_writing():
    args = _valid_args()
    args["L22_out"][:] = 7.0
    assert _blockchol.update_blocked(*[args[k] for k in ORDER], check_only=True) == 0
    assert np.all(args["L22_out"] == 7.0)


BAD = [  # (test id, argument, replacement built from the valid arguments)
    ("A11_blocks_not_square", "A11", lambda a: np.zeros((a["A11"].shape[0], 2, 3))),
    ("T1_wrong_size", "T1", lambda a: np.eye(3)),
    ("indptr_too_short", "indptr", lambda a: np.ascontiguousarray(a["indptr"][:-1])),
    ("indptr_not_from_zero", "indptr", lambda a: a["indptr"] + 1),
    ("indptr_int32", "indptr", lambda a: a["indptr"].astype(np.int32)),
    ("rows_length", "rows", lambda a: np.ascontiguousarray(a["rows"][:-1])),
    ("A21_columns", "A21", lambda a: np.zeros((a["A21"].shape[0], 3))),
    ("A22_not_square", "A22", lambda a: np.zeros((a["A22"].shape[0], a["A22"].shape[0] + 1))),
    ("A22_not_contiguous", "A22", lambda a: a["A22"][:, ::-1]),
    ("nz_equals_D", "nz", lambda a: a["A22"].shape[0]),
    ("nz_negative", "nz", lambda a: -1),
    ("rscale_length", "rscale", lambda a: np.ones(a["rscale"].size + 1)),
    ("rk_length", "rk", lambda a: np.ones(a["rk"].size - 1, dtype=np.int64)),
    ("rtoff_length", "rtoff", lambda a: np.zeros(a["rtoff"].size + 2, dtype=np.int64)),
    ("L11_out_shape", "L11_out", lambda a: np.zeros((a["A11"].shape[0] + 1, 2, 2))),
    ("L21_out_shape", "L21_out", lambda a: np.zeros((a["A21"].shape[0] + 1, 2))),
    ("L22_out_shape", "L22_out", lambda a: np.zeros((a["A22"].shape[0] - 1, a["A22"].shape[0] - 1))),
    ("rows_past_the_block", "rows", lambda a: np.where(np.arange(a["rows"].size) == a["rows"].size - 1,
                                                         a["A22"].shape[0], a["rows"])),
    ("rows_negative", "rows", lambda a: np.where(np.arange(a["rows"].size) == 0, -1, a["rows"])),
    ("rows_not_ascending", "rows", lambda a: np.ascontiguousarray(a["rows"][::-1])),
]


@pytest.mark.parametrize("key,make", [pytest.param(k, f, id=i) for i, k, f in BAD])
def test_wrapper_rejects_mismatched_arguments(key, make):
    args = _valid_args()
    args[key] = make(args)
    with pytest.raises(ValueError):
        _call(args)


def test_kernel_reports_failed_diagonal_block():
    args = _valid_args()
    args["A11"] = -10.0 * np.broadcast_to(np.eye(2), args["A11"].shape).copy()
    args["T1"] = np.eye(2)
    assert _call(args) == -1


def test_kernel_reports_failed_dense_block():
    args = _valid_args()
    A22 = args["A22"].copy()
    A22[-1, -1] = -1e6                      # y'y negative: Ω is not positive definite
    args["A22"] = A22
    assert _call(args) > 0


def test_objective_is_inf_when_factor_fails():
    rng = np.random.default_rng(5)
    n = 30
    df = pd.DataFrame({"g": [f"l{i % 5}" for i in range(n)], "x": rng.normal(size=n),
                       "y": rng.normal(size=n)})
    model = LinearMixedModel("y ~ x + (1 | g)", df)
    pls = blocked(model)
    pls.xp.A11[...] = -10.0                            # corrupted in place: Z'Z negative
    assert pls.objective(np.array([1.0]), True) == np.inf


@pytest.mark.parametrize("formula", ["y ~ 1 + x + (1|g1) + (1 + x|g2)", "y ~ 1 + x + (1 + x|g1) + (1|g2)",
                                     "y ~ x + (1 + x|g1)", "y ~ x * f + (1|g1) + (1|g2)",
                                     "y ~ x * f + (1 + x|g1) + (1|g2)"])
def test_transposed_downdate_matches_per_level_and_dense(formula):
    """The row-by-row (transposed) downdate used for large dense blocks, with the X/y rows
    gathered column-wise (one to a dozen of them), gives the same factor."""
    import lmmfast

    df, _ = lmmfast.simulate.crossed(3000, 150, 40, slope=True, seed=3)
    df["f"] = np.random.default_rng(4).integers(0, 6, len(df)).astype(str)   # a wide fixed part
    model = LinearMixedModel(formula, df, REML=True, method="blocked")
    check_transposed_downdate(model)


def check_transposed_downdate(model):
    """At a random θ, the transposed downdate's factor equals the per-level one and its
    objective the dense oracle's; returns the transposed PLS."""
    theta = np.abs(np.random.default_rng(7).normal(size=model.ntheta)) + 0.2
    a, b = (BlockedPLS(BlockedCrossprod(model.terms, model.X, model.y, model.theta_offsets,
                                        transposed=tr)) for tr in (False, True))
    fa, fb = a.objective(theta, True), b.objective(theta, True)
    np.testing.assert_allclose(np.tril(a.L22), np.tril(b.L22), rtol=1e-10, atol=1e-10)
    assert fb == pytest.approx(fa, rel=1e-12)
    Z, X, y = dense_parts(model)
    Lam = dense_lambda(model.terms, theta, model.theta_offsets)
    assert fb == pytest.approx(dense_objective(Z, X, y, Lam, True), rel=1e-9)
    return b


@pytest.mark.parametrize("n", [0, 1, 37, 64, 65, 200])
def test_symmetrize_lower_matches_numpy(n):
    rng = np.random.default_rng(5)
    A = rng.normal(size=(n, n))
    ref = np.tril(A) + np.tril(A, -1).T
    _blockchol.symmetrize_lower(A)
    np.testing.assert_array_equal(A, ref)
    with pytest.raises(ValueError):
        _blockchol.symmetrize_lower(np.zeros((3, 4)))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("formula", ["y ~ 1 + x + (1|g1) + (1 + x|g2)", "y ~ 1 + x + (1 + x|g1) + (1|g2)"])
def test_heavy_levels_dense_update_matches_scattered_and_dense(formula, transposed):
    """Levels whose downdates go through one dense rank-k update (heavy) give the same
    factor as the per-level scattered downdates, and the objective the dense oracle's."""
    import lmmfast

    df, _ = lmmfast.simulate.crossed(4000, 60, 30, slope=True, seed=4)
    model = LinearMixedModel(formula, df, REML=False, method="blocked")
    theta = np.abs(np.random.default_rng(8).normal(size=model.ntheta)) + 0.2
    args = (model.terms, model.X, model.y, model.theta_offsets)
    a = BlockedPLS(BlockedCrossprod(*args, transposed=transposed, heavy_rows=10 ** 9))
    xb = BlockedCrossprod(*args, transposed=transposed, heavy_rows=20)
    assert 0 < len(xb.heavy) < xb.m1                  # some heavy, some not
    b = BlockedPLS(xb)
    fa, fb = a.objective(theta, False), b.objective(theta, False)
    np.testing.assert_allclose(np.tril(b.L22), np.tril(a.L22), rtol=1e-10, atol=1e-10)
    assert fb == pytest.approx(fa, rel=1e-12)
    Z = np.column_stack([t.Z().toarray() for t in model.terms])
    Lam = dense_lambda(model.terms, theta, model.theta_offsets)
    assert fb == pytest.approx(dense_objective(Z, model.X, model.y, Lam, False), rel=1e-9)


def test_wrapper_rejects_bad_heavy_levels():
    args = _valid_args()
    m1 = args["A11"].shape[0]
    for heavy in ([m1], [-1], [1, 0]):
        with pytest.raises(ValueError, match="heavy"):
            _blockchol.update_blocked(*[args[k] for k in ORDER], heavy=np.array(heavy, dtype=np.int64))


def test_factor_object_rejects_bad_heavy_levels():
    """The factor object validates the cross-products' heavy levels (once, by the same
    check as the kernel wrapper)."""
    import lmmfast

    df, _ = lmmfast.simulate.crossed(4000, 60, 30, slope=True, seed=4)
    model = LinearMixedModel("y ~ 1 + x + (1|g1) + (1 + x|g2)", df, REML=False, method="blocked")
    xp = BlockedCrossprod(model.terms, model.X, model.y, model.theta_offsets, heavy_rows=20)
    assert len(xp.heavy) > 1
    BlockedPLS(xp)                                   # as built: accepted
    for bad in (xp.heavy[::-1], np.array([xp.m1], dtype=np.int64)):
        xp.heavy = np.ascontiguousarray(bad)
        with pytest.raises(ValueError, match="heavy"):
            BlockedPLS(xp)


def test_threaded_row_wise_downdate_matches_one_thread(monkeypatch):
    """The OpenMP row loop (forced on for a small model) gives the one-thread factor."""
    import lmmfast

    df, _ = lmmfast.simulate.crossed(5000, 200, 60, slope=True, seed=6)
    model = LinearMixedModel("y ~ 1 + x + (1|g1) + (1 + x|g2)", df, REML=True, method="blocked")
    theta = np.abs(np.random.default_rng(9).normal(size=model.ntheta)) + 0.2
    args = (model.terms, model.X, model.y, model.theta_offsets)
    one = BlockedPLS(BlockedCrossprod(*args, transposed=True))
    assert one._f.nthreads == 1                         # small: below the threading threshold
    monkeypatch.setattr(_pls, "THREAD_MIN_WORK", 0.0)
    monkeypatch.setenv("LMMFAST_NUM_THREADS", "3")
    many = BlockedPLS(BlockedCrossprod(*args, transposed=True))
    assert many._f.nthreads == (3 if _pls.OPENMP else 1)
    f1, f2 = one.objective(theta, True), many.objective(theta, True)
    np.testing.assert_allclose(np.tril(many.L22), np.tril(one.L22), rtol=1e-12, atol=1e-12)
    assert f2 == pytest.approx(f1, rel=1e-13)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_threaded_downdate_after_fork_runs_in_the_child(monkeypatch):
    """GNU OpenMP's thread pool does not survive fork(); a forked child (multiprocessing's
    default on Linux) must still evaluate the objective, on one thread."""
    import os
    import signal

    import lmmfast

    df, _ = lmmfast.simulate.crossed(5000, 200, 60, slope=True, seed=6)
    model = LinearMixedModel("y ~ 1 + x + (1|g1) + (1 + x|g2)", df, REML=True, method="blocked")
    monkeypatch.setattr(_pls, "THREAD_MIN_WORK", 0.0)
    monkeypatch.setenv("LMMFAST_NUM_THREADS", "2")
    pls = BlockedPLS(BlockedCrossprod(model.terms, model.X, model.y, model.theta_offsets,
                                      transposed=True))
    theta = np.abs(np.random.default_rng(9).normal(size=model.ntheta)) + 0.2
    f = pls.objective(theta, True)                 # the parent runs the threaded region
    pid = os.fork()
    if pid == 0:                                   # child: must not hang, must agree
        signal.alarm(60)
        ok = pls.objective(theta, True) == pytest.approx(f, rel=1e-12)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_bad_thread_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LMMFAST_NUM_THREADS", "two")
    if _pls.OPENMP:
        with pytest.raises(ValueError, match="LMMFAST_NUM_THREADS"):
            _pls._n_threads()
    monkeypatch.setenv("LMMFAST_NUM_THREADS", "0")
    assert _pls._n_threads() == 1


def test_threads_follow_openmp_limits(monkeypatch):
    """Without LMMFAST_NUM_THREADS, each evaluation stays within OpenMP's current limit
    (threadpoolctl, omp_set_num_threads, OMP_NUM_THREADS)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import lmmfast

    if not _pls.OPENMP:
        pytest.skip("built without OpenMP")
    df, _ = lmmfast.simulate.crossed(5000, 200, 60, slope=True, seed=6)
    model = LinearMixedModel("y ~ 1 + x + (1|g1) + (1 + x|g2)", df, REML=True, method="blocked")
    monkeypatch.setattr(_pls, "THREAD_MIN_WORK", 0.0)
    monkeypatch.delenv("LMMFAST_NUM_THREADS", raising=False)
    pls = BlockedPLS(BlockedCrossprod(model.terms, model.X, model.y, model.theta_offsets,
                                      transposed=True))
    theta = np.abs(np.random.default_rng(9).normal(size=model.ntheta)) + 0.2
    f = pls.objective(theta, True)
    assert 1 <= pls._f.last_nthreads <= pls._f.nthreads
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        assert pls.objective(theta, True) == pytest.approx(f, rel=1e-13)
        assert pls._f.last_nthreads == 1


def test_row_wise_pattern_must_leave_out_heavy_and_batched_levels():
    """The row-wise kernel trusts its pattern to hold only the levels it downdates; a pattern
    that also holds heavy levels (downdated by dsyrk) would downdate them twice."""
    import lmmfast

    df, _ = lmmfast.simulate.crossed(4000, 60, 30, slope=True, seed=4)
    model = LinearMixedModel("y ~ 1 + x + (1|g1) + (1 + x|g2)", df, REML=False, method="blocked")
    xp = BlockedCrossprod(model.terms, model.X, model.y, model.theta_offsets,
                          transposed=True, heavy_rows=20)
    assert len(xp.heavy)
    BlockedPLS(xp)                                   # as built: accepted
    nr = np.diff(xp.indptr)
    lev = np.repeat(np.arange(xp.m1, dtype=np.int64), nr)
    order = np.argsort(xp.rows, kind="stable")       # every level, heavy ones included
    xp.tidx, xp.tlev = order.astype(np.int64), lev[order]
    xp.tptr = np.concatenate([[0], np.cumsum(np.bincount(xp.rows, minlength=xp.D))]).astype(np.int64)
    with pytest.raises(ValueError, match="transposed pattern"):
        BlockedPLS(xp)


def _three_crossed_factors():
    import lmmfast

    df, _ = lmmfast.simulate.crossed(3000, 150, 40, slope=True, seed=3)
    # each g2 level meets about three of g3's 60: a sparse block of pair counts
    g2 = pd.factorize(df["g2"])[0]
    near = np.random.default_rng(5).integers(0, 3, len(df))
    df["g3"] = ((g2 * 7 + near) % 60).astype(str)
    return LinearMixedModel("y ~ 1 + x + (1|g1) + (1|g2) + (1|g3)", df, REML=True,
                            method="blocked")


def test_random_effects_block_of_a22_sparse_and_its_lower_pattern():
    """A22's random-effects block (the later terms' Z'Z: their diagonals and, between two
    crossed terms, the level pairs' counts) as a sparse matrix, and the strictly lower
    pattern the transposed downdate reads, against numpy on the dense block."""
    model = _three_crossed_factors()
    xp = BlockedCrossprod(model.terms, model.X, model.y, model.theta_offsets, transposed=True)
    nz = xp.nz
    dense = xp.A22[:nz, :nz]
    B = xp.re_block()
    assert B is not None and B.nnz < nz * nz / 4
    np.testing.assert_array_equal(B.toarray(), dense)
    ptr, cols = xp.re_lower_pattern()
    r, c = np.nonzero(np.tril(dense, -1))
    assert np.array_equal(np.repeat(np.arange(nz), np.diff(ptr)), r)
    assert np.array_equal(cols, c) and len(c) > 0


@pytest.mark.parametrize("sparse_max", [0.25, 0.0])
def test_products_with_a22_by_blocks_equal_numpy(monkeypatch, sparse_max):
    """A22 @ V through the sparse random-effects block and the dense X/y rows (and, where
    the block counts as dense, by one product) equals numpy's, for a vector and a matrix."""
    from lmmfast import blocks

    monkeypatch.setattr(blocks, "RE_SPARSE_MAX", sparse_max)
    model = _three_crossed_factors()
    xp = BlockedCrossprod(model.terms, model.X, model.y, model.theta_offsets, transposed=True)
    assert (xp.re_block() is None) == (sparse_max == 0.0)
    rng = np.random.default_rng(2)
    v = rng.normal(size=xp.D)
    V = rng.normal(size=(xp.D, 3))
    np.testing.assert_allclose(xp.dense_times(v), xp.A22 @ v, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(xp.dense_times(V), xp.A22 @ V, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("sparse_max", [0.25, 0.0])
def test_transposed_downdate_reading_a22_at_its_nonzeros_equals_dense(monkeypatch, sparse_max):
    """The transposed downdate writes the random-effects rows from A22's nonzeros only
    (three crossed factors: pair counts off the diagonal) or, where the block counts as
    dense, from whole rows; the same factor either way, and the dense oracle's objective."""
    from lmmfast import blocks

    monkeypatch.setattr(blocks, "RE_SPARSE_MAX", sparse_max)
    b = check_transposed_downdate(_three_crossed_factors())
    assert (b._f.lptr_arr is None) == (sparse_max == 0.0)


def test_factor_object_rejects_a_bad_lower_pattern():
    model = _three_crossed_factors()
    xp = BlockedCrossprod(model.terms, model.X, model.y, model.theta_offsets, transposed=True)
    ptr, cols = xp.re_lower_pattern()
    bad = cols.copy()
    bad[-1] = xp.nz                                  # beyond its row
    xp.re_lower_pattern = lambda: (ptr, bad)
    with pytest.raises(ValueError, match="lower pattern"):
        _pls.BlockedFactor(xp)


@pytest.mark.parametrize("nz", [0, 1, 2, 7, 40])
def test_lower_nonzeros_match_numpy(nz):
    rng = np.random.default_rng(nz)
    D = nz + 3
    A = rng.normal(size=(D, D)) * (rng.random((D, D)) < 0.2)
    got = _blockchol.lower_nonzeros(A, nz)
    r, c = np.nonzero(np.tril(A[:nz, :nz], -1))
    ptr, cols = got
    assert np.array_equal(np.repeat(np.arange(nz), np.diff(ptr)), r)
    assert np.array_equal(cols, c) and cols.dtype == np.int32
    if len(c):
        assert _blockchol.lower_nonzeros(A, nz, len(c) - 1) is None
        assert _blockchol.lower_nonzeros(A, nz, len(c)) is not None
    with pytest.raises(ValueError, match="within"):
        _blockchol.lower_nonzeros(A, D + 1)

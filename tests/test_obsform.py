"""The coupling in observation form (``lmmfast/_obsform.pyx``, ``lmmfast/obsform.py``):
the factor it gives against the dense numpy factor and against the panel path, on random
crossed designs with vector-valued terms (replicated and missing cells, several later
terms), on one and two threads; its cost rule; its validation."""
import numpy as np
import pandas as pd
import pytest
from hypothesis import assume, given, settings, strategies as st

import lmmfast
from lmmfast import obsform
from lmmfast.errors import DataError
from lmmfast.blocks import BlockedCrossprod
from lmmfast.model import LinearMixedModel
from lmmfast.pls import BlockedPLS, dense_lambda, dense_objective

HSETTINGS = settings(max_examples=40, deadline=None, database=None)

FORMULAS = [
    "y ~ 1 + x1 + (1 + x1 + x2 | g1) + (1 + x1 | g2)",                  # k1 = 3, k = 2
    "y ~ 1 + x1 * x2 + (1 + x1 * x2 | g1) + (1 + x1 * x2 | g2)",        # 4 and 4
    "y ~ 1 + x1 + (1 | g1) + (1 + x1 | g2) + (1 | g3)",                 # scalar term 1, two later
    "y ~ 1 + x1 + (1 + x1 | g1) + (0 + x2 | g2) + (1 + x1 + x2 | g3)",  # 2, then 1 and 3
    "y ~ 1 + a*b*c + (1 + a*b*c | g1) + (1 + a*b*c | g2)",              # 8 and 8 (kb07's widths)
]


def crossed_frame(seed, n1, n2, n3, reps, drop):
    """Every g1 × g2 cell ``reps`` times, a fraction ``drop`` of the rows removed; g3
    random; continuous x1, x2 and ±0.5 factors a, b, c."""
    rng = np.random.default_rng(seed)
    g1, g2 = np.meshgrid(np.arange(n1), np.arange(n2), indexing="ij")
    g1 = np.repeat(g1.ravel(), reps)
    g2 = np.repeat(g2.ravel(), reps)
    keep = rng.random(len(g1)) >= drop
    keep[rng.integers(len(g1))] = True
    g1, g2 = g1[keep], g2[keep]
    n = len(g1)
    df = pd.DataFrame({
        "g1": [f"s{i}" for i in g1], "g2": [f"i{i}" for i in g2],
        "g3": [f"c{i}" for i in rng.integers(0, n3, n)],
        "x1": rng.normal(size=n), "x2": rng.normal(size=n),
        "a": rng.choice([-0.5, 0.5], n), "b": rng.choice([-0.5, 0.5], n),
        "c": rng.choice([-0.5, 0.5], n)})
    df["y"] = rng.normal(size=n) + 0.3 * df["x1"] + rng.normal(size=n1)[g1] \
        + rng.normal(size=n2)[g2]
    return df


def both_paths(model, **kw):
    args = (model.terms, model.X, model.y, model.theta_offsets)
    return BlockedPLS(BlockedCrossprod(*args, obs=False)), \
        BlockedPLS(BlockedCrossprod(*args, obs=True, **kw))


def random_theta(model, rng):
    th = rng.normal(scale=0.6, size=model.ntheta)
    low = np.isfinite(model.theta_lower)
    th[low] = np.abs(th[low]) + 0.05
    return th


@HSETTINGS
@given(st.integers(0, 2 ** 31), st.integers(3, 9), st.integers(3, 7), st.integers(1, 3),
       st.sampled_from([0.0, 0.3]), st.sampled_from(range(len(FORMULAS))), st.booleans())
def test_obs_form_gives_the_dense_factor(seed, n1, n2, reps, drop, which, reml):
    k = 8 if which == 4 else 3            # widest term: enough rows for its levels
    df = crossed_frame(seed, n1 + k, n2 + k, 3, reps + (which == 4), drop)
    try:
        model = LinearMixedModel(FORMULAS[which], df, REML=reml, method="blocked")
    except DataError:           # more random effects than observations in a term
        assume(False)
    assert len(model.terms) >= 2
    panel, obs = both_paths(model)
    assert obs.xp.obs is not None and panel.xp.obs is None
    rng = np.random.default_rng(seed)
    for _ in range(2):
        theta = random_theta(model, rng)
        fa, fb = panel.objective(theta, reml), obs.objective(theta, reml)
        np.testing.assert_allclose(obs.L11, panel.L11, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(obs.L21, panel.L21, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(np.tril(obs.L22), np.tril(panel.L22), rtol=1e-9, atol=1e-9)
        Z = np.column_stack([t.Z().toarray() for t in model.terms])
        Lam = dense_lambda(model.terms, theta, model.theta_offsets)
        want = dense_objective(Z, model.X, model.y, Lam, reml)
        assert fb == pytest.approx(want, rel=1e-9, abs=1e-8)
        assert fb == pytest.approx(fa, rel=1e-11, abs=1e-9)


MIXED_WIDTHS = "y ~ 1 + a*b*c + (1 + a*b*c | g1) + (1 + a*b | g2) + (1 + a*b*c | g3)"


@pytest.mark.parametrize("which, n2, n3", [(0, 11, 6), (1, 11, 6), (4, 11, 6),
                                           (MIXED_WIDTHS, 11, 6), (MIXED_WIDTHS, 9, 12)])
def test_every_vector_copy_gives_the_dense_factor(which, n2, n3):
    """The kernels' copies for each vector width the CPU has (baseline: vectors of two
    doubles, what a CPU without AVX2 runs; AVX2 with FMA; AVX-512) give the same factor,
    and the dense objective; with an 8-wide and a 4-wide later term in either order, the
    8 × 4 and 4 × 8 blocks' kernels too."""
    from lmmfast import _obsform

    df = crossed_frame(8, 14, n2, n3, 2, 0.2)
    formula = which if isinstance(which, str) else FORMULAS[which]
    model = LinearMixedModel(formula, df, REML=False, method="blocked")
    theta = random_theta(model, np.random.default_rng(2))
    _, obs = both_paths(model)
    Z = np.column_stack([t.Z().toarray() for t in model.terms])
    Lam = dense_lambda(model.terms, theta, model.theta_offsets)
    dense = dense_objective(Z, model.X, model.y, Lam, False)
    out = {}
    try:
        for cap in (0, 1, 2):
            isa = _obsform._vector_copies(cap)
            f = obs.objective(theta, False)
            out[isa] = (f, obs.L21.copy(), np.tril(obs.L22))
    finally:
        _obsform._vector_copies(2)
    assert 0 in out
    f0, L21, L22 = out[0]
    assert f0 == pytest.approx(dense, rel=1e-9)
    for f, L21_, L22_ in out.values():
        np.testing.assert_allclose(L21_, L21, rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(L22_, L22, rtol=1e-10, atol=1e-10)
        assert f == pytest.approx(f0, rel=1e-12)


@pytest.mark.parametrize("which", [1, 2, 4])
def test_obs_form_on_two_threads_equals_one(monkeypatch, which):
    """Levels and blocks shared among two threads (forced on for a small model): the same
    factor as on one, and as the panels'."""
    df = crossed_frame(3, 12, 9, 3, 1, 0.1)
    model = LinearMixedModel(FORMULAS[which], df, REML=True, method="blocked")
    theta = random_theta(model, np.random.default_rng(1))
    panel, one = both_paths(model)
    assert one._f.nthreads == 1
    monkeypatch.setattr(obsform, "OBS_THREAD_MIN_WORK", 0)
    monkeypatch.setenv("LMMFAST_NUM_THREADS", "2")
    _, two = both_paths(model)
    assert two._f.nthreads == 2
    f1, f2, fp = one.objective(theta, True), two.objective(theta, True), panel.objective(theta, True)
    np.testing.assert_allclose(two.L21, one.L21, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(np.tril(two.L22), np.tril(one.L22), rtol=1e-11, atol=1e-11)
    assert f2 == pytest.approx(f1, rel=1e-12) and f2 == pytest.approx(fp, rel=1e-11)


def test_gradient_and_fit_through_the_obs_form():
    """The gradient reads the panels the observation form writes: equal to the panel
    path's; a whole kb07-like fit chooses the form by itself and reaches the panel path's
    objective."""
    from lmmfast.gradient import blocked_gradient

    df, truth = lmmfast.simulate.kb07_like(nsubj=20, nitem=16, seed=2)
    model = LinearMixedModel(truth["formula"], df, REML=True)
    assert model.pls.xp.obs is not None                 # chosen by cost
    panel, obs = both_paths(model)
    theta = random_theta(model, np.random.default_rng(4))
    panel.objective(theta, True)
    obs.objective(theta, True)
    np.testing.assert_allclose(blocked_gradient(obs, True), blocked_gradient(panel, True),
                               rtol=1e-8, atol=1e-8)
    fit = model.fit()
    other = LinearMixedModel(truth["formula"], df, REML=True)
    other.pls = panel
    ref = other.fit()
    assert fit.objective == pytest.approx(ref.objective, abs=1e-6)


def test_cost_rule_takes_the_obs_form_only_where_it_pays():
    kb, truth = lmmfast.simulate.kb07_like(nsubj=56, nitem=32, seed=1)
    assert LinearMixedModel(truth["formula"], kb, REML=True).pls.xp.obs is not None
    sleep = lmmfast.datasets.load("sleepstudy")
    assert LinearMixedModel("Reaction ~ Days + (Days | Subject)", sleep).pls.xp.obs is None
    pen = lmmfast.datasets.load("penicillin")
    assert LinearMixedModel("diameter ~ 1 + (1 | plate) + (1 | sample)", pen).pls.xp.obs is None
    # a 2 x 2 maximal design, each cell once (predicted 1.8x: its evaluation 1.2-1.4x
    # faster, its fit not) and four times each (predicted 0.13x): the panels
    f4 = "y ~ 1 + a*b + (1 + a*b | g1) + (1 + a*b | g2)"
    for reps in (1, 4):
        assert LinearMixedModel(f4, crossed_frame(1, 56, 32, 3, reps, 0.0), REML=True,
                                method="blocked").pls.xp.obs is None
    # scalar crossed terms with many observations per level: the panels
    df = crossed_frame(0, 40, 30, 3, 4, 0.0)
    m = LinearMixedModel("y ~ 1 + x1 + (1 | g1) + (1 | g2)", df, method="blocked")
    assert m.pls.xp.obs is None


def test_width_rule_keeps_later_terms_without_a_vector_kernel_on_the_panels(monkeypatch):
    """With the cost bar removed (GAIN 0) the widths decide: later terms 4 or 8 wide take
    the observation form, 1 or 3 wide keep the panels."""
    monkeypatch.setattr(obsform, "GAIN", 0.0)
    df = crossed_frame(1, 30, 20, 3, 1, 0.0)
    for f, want in [("y ~ 1 + a*b*c + (1 + a*b*c | g1) + (1 | g2)", False),
                    ("y ~ 1 + a*b*c + (1 + a*b*c | g1) + (1 + a + b | g2)", False),
                    ("y ~ 1 + a*b + (1 + a | g1) + (1 + a*b | g2)", True),
                    ("y ~ 1 + a*b*c + (1 + a | g1) + (1 + a*b*c | g2)", True)]:
        m = LinearMixedModel(f, df, method="blocked")
        assert (m.pls.xp.obs is not None) == want, f


def test_obs_form_is_validated_against_the_panels():
    df = crossed_frame(5, 8, 6, 3, 1, 0.0)
    model = LinearMixedModel(FORMULAS[1], df, method="blocked")
    args = (model.terms, model.X, model.y, model.theta_offsets)
    with pytest.raises(ValueError, match="second random-effects term"):
        BlockedCrossprod(model.terms[:1], model.X, model.y, model.theta_offsets[:1], obs=True)

    def spoiled(field, change):
        xp = BlockedCrossprod(*args, obs=True)
        a = getattr(xp.obs, field).copy()
        change(a)
        setattr(xp.obs, field, a)
        return xp

    cases = [("uprow", lambda a: a.__setitem__((0, 0), a[0, 0] + 1), "panel rows"),
             ("upos", lambda a: a.__setitem__((0, 0), 10 ** 6), "one level of a term"),
             ("soff", lambda a: a.__setitem__((0, 0), a[1, 0]), "overlap|range"),
             ("pair", lambda a: a.__setitem__((0, 0), 10 ** 9), "Gram entry"),
             ("pair", lambda a: a.__setitem__((0, 1), a[-1, 1]), "not at its block"),
             ("optr", lambda a: a.__setitem__(-1, a[-1] - 1), "shapes"),
             ("mbase", lambda a: a.__setitem__(1, a[1] + 1), "Gram matrices"),
             ("pair", lambda a: a.__setitem__((0, 0), 1), "above the diagonal"),
             ("assign", lambda a: a.__setitem__(np.flatnonzero(a)[0], 0), "once"),
             ("lam", lambda a: a.__setitem__(0, a[-1]), "once"),
             ("lam", lambda a: a.__setitem__((0, 0), a[0, 0] + 1), "unit block")]
    for field, change, msg in cases:
        with pytest.raises(ValueError, match=msg):
            BlockedPLS(spoiled(field, change))


@pytest.mark.parametrize("threads", ["1", "2"])
def test_a_theta_the_factor_cannot_take_gives_inf(monkeypatch, threads):
    """NaN in term 1's T: its diagonal blocks fail, on one thread and on two, and the
    objective is +inf (as on the panel path)."""
    monkeypatch.setattr(obsform, "OBS_THREAD_MIN_WORK", 0)
    monkeypatch.setenv("LMMFAST_NUM_THREADS", threads)
    df = crossed_frame(2, 10, 8, 3, 1, 0.0)
    model = LinearMixedModel(FORMULAS[1], df, method="blocked")
    panel, obs = both_paths(model)
    assert obs._f.nthreads == int(threads)
    theta = random_theta(model, np.random.default_rng(0))
    theta[0] = np.nan
    assert obs.objective(theta, False) == np.inf == panel.objective(theta, False)
    theta[0] = 0.7                       # and it recovers
    assert obs.objective(theta, False) == pytest.approx(panel.objective(theta, False), rel=1e-11)


def test_panels_left_out_of_an_objective_are_formed_when_read():
    """An objective-only evaluation leaves the panels' unit rows out; reading L21 forms
    them for the current θ (not the previous one): the panel path's L21 at each θ, and
    the gradient through them the panel path's."""
    from lmmfast.gradient import blocked_gradient

    df = crossed_frame(4, 12, 9, 3, 1, 0.1)
    model = LinearMixedModel(FORMULAS[4], df, REML=True, method="blocked")
    panel, obs = both_paths(model)
    rng = np.random.default_rng(3)
    for _ in range(3):
        theta = random_theta(model, rng)
        fo, fp = obs.objective(theta, True), panel.objective(theta, True)
        assert fo == pytest.approx(fp, rel=1e-11)
        assert obs._f.panels_stale
        np.testing.assert_allclose(obs.L21, panel.L21, rtol=1e-11, atol=1e-12)
        assert not obs._f.panels_stale
        np.testing.assert_allclose(blocked_gradient(obs, True), blocked_gradient(panel, True),
                                   rtol=1e-8, atol=1e-8)

"""The moment-based starting θ: an independent one-way ANOVA computation, and closeness to
the optimum on crossed designs where one-factor-at-a-time moments are biased."""
import numpy as np
import pytest

import lmmfast
from lmmfast.model import LinearMixedModel


def test_one_way_moment_start_is_the_anova_estimate():
    df = lmmfast.datasets.load("dyestuff")
    m = LinearMixedModel("Yield ~ 1 + (1 | Batch)", df)
    g = df.groupby("Batch")["Yield"]
    m_lev, n0 = g.ngroups, int(g.size().iloc[0])
    ssw = float(((df["Yield"] - g.transform("mean")) ** 2).sum())
    ssb = float((g.size() * (g.mean() - df["Yield"].mean()) ** 2).sum())
    msw, msb = ssw / (len(df) - m_lev), ssb / (m_lev - 1)
    theta2 = ((m_lev - 1) / m_lev * msb - msw) / (n0 * msw)
    assert m.moment_start()[0] == pytest.approx(np.sqrt(theta2), rel=1e-10)


@pytest.mark.parametrize("slope", [False, True])
def test_moment_start_is_near_the_optimum_on_crossed_factors(slope):
    df, truth = lmmfast.simulate.crossed(40000, 800, 60, slope=slope, seed=2)
    m = LinearMixedModel(truth["formula"], df, REML=False)
    th0 = m.moment_start()
    fit = m.fit()
    np.testing.assert_allclose(th0, fit.theta, rtol=0.12, atol=0.03)


def test_scalar_moment_start_solves_the_score_equation():
    """Crossed scalar terms with Zipf-like level sizes: the start re-weighted by
    1 / var(b̂_j)² is within a fraction of a percent of the ML optimum (size weights alone
    are several percent off on such designs)."""
    df, truth = lmmfast.simulate.crossed(40000, 800, 60, slope=False, seed=2)
    m = LinearMixedModel(truth["formula"], df, REML=False)
    fit = m.fit()
    np.testing.assert_allclose(m.moment_start(), fit.theta, rtol=5e-3)
    assert fit.optsummary.feval <= 20


def test_moment_start_floors_a_null_variance():
    import pandas as pd

    # every level holds the same values: no between-level variance at all
    df = pd.DataFrame({"g": np.repeat(list("abcdef"), 5), "y": np.tile([1.0, 2.0, 4.0, 7.0, 11.0], 6)})
    m = LinearMixedModel("y ~ 1 + (1 | g)", df)
    assert m.moment_start()[0] == pytest.approx(0.01)       # sqrt(1e-4), the floor


def _exact_density(terms):
    """Density of Z_r'Z_r + (Z_1'Z_r)'(Z_1'Z_r) by dense indicator matrices (the oracle)."""
    n = len(terms[0].codes)
    Z1 = np.zeros((n, terms[0].nlevels))
    Z1[np.arange(n), terms[0].codes] = 1
    Zr = np.hstack([np.eye(t.nlevels)[t.codes] for t in terms[1:]])
    B = Z1.T @ Zr
    S = B.T @ B + Zr.T @ Zr
    return np.count_nonzero(S) / S.size


@pytest.mark.parametrize("nested", [False, True])
def test_method_choice_follows_the_density_of_the_dense_block(nested):
    import pandas as pd

    from lmmfast.model import choose_method
    from lmmfast.sparsepls import cholmod_available

    if not cholmod_available():
        pytest.skip("scikit-sparse is not installed")
    rng = np.random.default_rng(1)
    n = 6000
    if nested:   # classes within schools: eliminating classes leaves the school block diagonal
        cls = rng.integers(0, 600, n)
        df = pd.DataFrame({"a": cls, "b": cls // 4, "c": rng.integers(0, 40, n) + 1000 * (cls // 150)})
    else:        # fully crossed
        df = pd.DataFrame({"a": rng.integers(0, 600, n), "b": rng.integers(0, 150, n),
                           "c": rng.integers(0, 40, n)})
    df["y"] = rng.normal(size=n)
    m = LinearMixedModel("y ~ 1 + (1|a) + (1|b) + (1|c)", df.astype({"a": str, "b": str, "c": str}),
                         method="blocked")
    dens = _exact_density(m.terms)
    expect = "blocked" if dens > 0.25 else "cholmod"
    assert (dens > 0.25) != nested
    assert choose_method(m.terms, m.p, dense_limit=10) == expect                   # sampled
    assert choose_method(m.terms, m.p, dense_limit=10, sample=10 ** 6) == expect   # exact


def _nested_frame(nb=40, na=5, nr=4, seed=3):
    rng = np.random.default_rng(seed)
    b = np.repeat(np.arange(nb), na * nr)
    a = np.repeat(np.arange(nb * na), nr)
    y = 1 + rng.normal(0, 2, nb)[b] + rng.normal(0, 1, nb * na)[a] + rng.normal(0, 1, len(a))
    import pandas as pd

    return pd.DataFrame({"b": b.astype(str), "a": (a % na).astype(str), "y": y})


def test_nested_moment_start_is_the_nested_anova_estimate():
    """Balanced (1 | b/a): the start is the nested ANOVA estimate, (MS_B − MS_A(B)) /
    (n_a n_r) and (MS_A(B) − MS_E) / n_r over MS_E (with the one-way test's (m−1)/m)."""
    nb, na, nr = 40, 5, 4
    df = _nested_frame(nb, na, nr)
    m = LinearMixedModel("y ~ 1 + (1 | b/a)", df)
    assert m.theta_names == ["a:b.(Intercept)", "b.(Intercept)"]
    y = df["y"]
    mb = y.groupby(df["b"]).transform("mean")
    ma = y.groupby([df["b"], df["a"]]).transform("mean")
    NA = nb * na
    mse = float(((y - ma) ** 2).sum()) / (len(df) - NA)
    msa = float(((ma - mb) ** 2).sum()) / (NA - nb)
    msb = float(((mb - y.mean()) ** 2).sum()) / (nb - 1)
    theta_a = np.sqrt(((NA - 1) / NA * msa - mse) / (nr * mse))
    theta_b = np.sqrt(((nb - 1) / nb * msb - (NA - 1) / NA * msa) / (na * nr * mse))
    np.testing.assert_allclose(m.moment_start(), [theta_a, theta_b], rtol=1e-10)


def test_nested_moment_start_is_near_the_optimum():
    m = LinearMixedModel("y ~ 1 + (1 | b/a)", _nested_frame(300))
    fit = m.fit()
    np.testing.assert_allclose(m.moment_start(), fit.theta, rtol=0.05)
    assert fit.optsummary.feval < m.fit(start="lme4").optsummary.feval

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


def test_moment_start_floors_a_null_variance():
    import pandas as pd

    # every level holds the same values: no between-level variance at all
    df = pd.DataFrame({"g": np.repeat(list("abcdef"), 5), "y": np.tile([1.0, 2.0, 4.0, 7.0, 11.0], 6)})
    m = LinearMixedModel("y ~ 1 + (1 | g)", df)
    assert m.moment_start()[0] == pytest.approx(0.1)        # sqrt(0.01), the floor

"""The average information matrix (``lmmfast.information``) against its dense numpy
oracle, and as the Hessian it approximates: near the optimum of a well-determined model it
must be close to the finite-difference Hessian of the objective."""
import numpy as np
import pytest

import lmmfast
from lmmfast.gradient import numeric_gradient
from lmmfast.information import average_information, dense_information

from helpers import DERIVATIVE_MODELS, dense_parts, derivative_data, random_theta, sim_three_factors


@pytest.mark.parametrize("reml", [False, True])
@pytest.mark.parametrize("name,formula", DERIVATIVE_MODELS)
def test_information_matches_dense_oracle(name, formula, reml):
    m = lmmfast.LinearMixedModel(formula, derivative_data(name), REML=reml, method="blocked")
    rng = np.random.default_rng(abs(hash((formula, reml))) % 2**32)
    th = random_theta(m, rng)
    m.objective(th)
    H = average_information(m.pls, reml)
    Z, X, y = dense_parts(m)
    Hd = dense_information(Z, X, y, m.terms, th, m.theta_offsets, reml)
    np.testing.assert_allclose(H, Hd, rtol=1e-7, atol=1e-9 * np.abs(Hd).max())
    assert np.linalg.eigvalsh(H).min() >= -1e-8 * np.abs(H).max()     # semi-definite


@pytest.mark.parametrize("reml", [False, True])
def test_information_approximates_the_hessian_at_the_optimum(reml):
    """At θ̂ of a well-determined model the average information is the Hessian up to the
    terms whose expectation vanishes.  Penicillin's terms are scalar, so for REML those
    terms are multiples of the score and vanish at θ̂ (agreement to rounding); for ML the
    rank-p difference between V⁻¹ and Q remains (within 10 % here)."""
    df = lmmfast.datasets.load("penicillin")
    fit = lmmfast.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", df, REML=reml)
    m, th = fit.model, np.asarray(fit.theta)
    m.objective(th)
    H = average_information(m.pls, reml)
    grad = lambda t: m.objective_and_gradient(t)[1]
    Hn = np.column_stack([numeric_gradient(lambda t, i=i: grad(t)[i], th, h=1e-5) for i in range(len(th))])
    Hn = 0.5 * (Hn + Hn.T)
    tol = 1e-5 if reml else 0.1
    np.testing.assert_allclose(H, Hn, rtol=tol, atol=tol * np.abs(Hn).max())


def test_information_scale():
    """1/√H_kk from the oracle's diagonal; capped at max(1, |θ_k|) where a column of T is
    0 (H_kk = 0 there); ones where the objective is not finite."""
    df = sim_three_factors()
    m = lmmfast.LinearMixedModel("y ~ x + (1 + x + z|g1) + (1|g2) + (x|g3)", df, REML=True)
    th = random_theta(m, np.random.default_rng(4))
    Z, X, y = dense_parts(m)
    Hd = dense_information(Z, X, y, m.terms, th, m.theta_offsets, True)
    np.testing.assert_allclose(m.information_scale(th),
                               np.minimum(1 / np.sqrt(np.diag(Hd)), np.maximum(1, np.abs(th))),
                               rtol=1e-6)
    zero = th.copy()
    zero[5] = 0.0                        # T1's last diagonal: its column is 0
    s = m.information_scale(zero)
    assert np.all(np.isfinite(s) & (s > 0)) and s[5] == 1.0
    bad = th.copy()
    bad[0] = np.nan
    np.testing.assert_array_equal(m.information_scale(bad), np.ones(m.ntheta))

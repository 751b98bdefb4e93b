"""Seeded simulators for the benchmark ladder, with their true parameters.

Each function returns ``(data, truth)``: a DataFrame and a dict of the parameters that
generated it (fixed effects ``beta``, random-effect standard deviations / covariance
``re``, residual ``sigma``), so anyone can rebuild a rung exactly and check recovery.
"""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

__all__ = ["kb07_like", "crossed", "zipf_codes"]


def zipf_codes(rng, nlevels: int, n: int, s: float = 0.8) -> np.ndarray:
    """``n`` level codes in ``0..nlevels-1`` with Zipf-like frequencies ∝ (rank+1)^-s.

    Every level occurs at least once when ``n >= nlevels`` (the first ``nlevels`` draws
    are a permutation), the rest are drawn from the Zipf-like law; the result is shuffled.
    """
    if n < nlevels:
        raise ValueError("need n >= nlevels so that every level occurs")
    p = (np.arange(nlevels) + 1.0) ** -s
    p /= p.sum()
    codes = np.concatenate([rng.permutation(nlevels), rng.choice(nlevels, size=n - nlevels, p=p)])
    rng.shuffle(codes)
    return codes


def kb07_like(seed: int = 42, nsubj: int = 56, nitem: int = 32):
    """A kb07-like maximal design: subjects × items, 2×2×2 within factors coded ±0.5.

    Every subject sees every item once; the 8 conditions rotate over items by a Latin
    square (condition = (subject + item) mod 8).  Fits
    ``y ~ 1 + spkr*prec*load + (1 + spkr*prec*load | subj) + (1 + spkr*prec*load | item)``
    (two 8×8 covariance matrices, 72 θ).
    """
    rng = np.random.default_rng(seed)
    conds = np.array(list(itertools.product([-0.5, 0.5], repeat=3)))
    subj = np.repeat(np.arange(nsubj), nitem)
    item = np.tile(np.arange(nitem), nsubj)
    c = conds[(subj + item) % 8]
    spkr, prec, load = c[:, 0], c[:, 1], c[:, 2]
    Xf = np.column_stack([np.ones(len(subj)), spkr, prec, load, spkr * prec, spkr * load,
                          prec * load, spkr * prec * load])
    beta = np.array([2180.0, 67.0, -333.0, 78.0, 21.0, 18.0, -4.0, 3.0])

    def cov(sds, rho):
        C = np.full((8, 8), rho)
        np.fill_diagonal(C, 1.0)
        return np.outer(sds, sds) * C

    S_subj = cov(np.array([300.0, 60.0, 60.0, 40.0, 30.0, 30.0, 20.0, 20.0]), 0.2)
    S_item = cov(np.array([370.0, 70.0, 100.0, 30.0, 40.0, 30.0, 20.0, 20.0]), 0.1)
    sigma = 670.0
    # Cholesky factors (unique): numpy's default SVD draws differ with the LAPACK
    # (signs of singular vectors), so the same seed gave other data on other machines
    bs = rng.multivariate_normal(np.zeros(8), S_subj, size=nsubj, method="cholesky")
    bi = rng.multivariate_normal(np.zeros(8), S_item, size=nitem, method="cholesky")
    y = Xf @ beta + np.einsum("rk,rk->r", Xf, bs[subj]) + np.einsum("rk,rk->r", Xf, bi[item])
    y += rng.normal(scale=sigma, size=len(y))
    df = pd.DataFrame({"subj": [f"S{s:03d}" for s in subj], "item": [f"I{i:03d}" for i in item],
                       "spkr": spkr, "prec": prec, "load": load, "y": y})
    truth = {"beta": beta, "re": {"subj": S_subj, "item": S_item}, "sigma": sigma,
             "formula": "y ~ 1 + spkr*prec*load + (1 + spkr*prec*load | subj) "
                        "+ (1 + spkr*prec*load | item)"}
    return df, truth


def crossed(n: int, n1: int, n2: int, slope: bool = True, seed: int = 1, s: float = 0.8):
    """Two crossed grouping factors with Zipf-like level frequencies.

    ``y = 1 + 0.5 x + u1[g1] + u2[g2] (+ v2[g2] x) + ε`` with sd(u1) = 0.6, sd(u2) = 0.8,
    sd(v2) = 0.3, corr(u2, v2) = 0.3, σ = 1.  Rung 5 of the ladder is
    ``crossed(1_000_000, 50_000, 2_000)`` fitted with ``y ~ 1 + x + (1|g1) + (1 + x|g2)``;
    rung 6 ``crossed(10_000_000, 100_000, 5_000, slope=False)`` with
    ``y ~ 1 + x + (1|g1) + (1|g2)``.  Grouping columns are integer codes (categorical).
    """
    rng = np.random.default_rng(seed)
    g1 = zipf_codes(rng, n1, n, s)
    g2 = zipf_codes(rng, n2, n, s)
    x = rng.standard_normal(n)
    sd1, sd2, sdv, rho, sigma = 0.6, 0.8, 0.3, 0.3, 1.0
    u1 = rng.normal(scale=sd1, size=n1)
    S2 = np.array([[sd2 ** 2, rho * sd2 * sdv], [rho * sd2 * sdv, sdv ** 2]])
    u2 = rng.multivariate_normal(np.zeros(2), S2, size=n2, method="cholesky")   # see kb07_like
    y = 1.0 + 0.5 * x + u1[g1] + u2[g2, 0] + rng.normal(scale=sigma, size=n)
    if slope:
        y += u2[g2, 1] * x
    df = pd.DataFrame({"y": y, "x": x,
                       "g1": pd.Categorical.from_codes(g1, categories=np.arange(n1)),
                       "g2": pd.Categorical.from_codes(g2, categories=np.arange(n2))})
    truth = {"beta": np.array([1.0, 0.5]), "re": {"g1": sd1, "g2": S2 if slope else sd2},
             "sigma": sigma,
             "formula": "y ~ 1 + x + (1|g1) + (1 + x|g2)" if slope else "y ~ 1 + x + (1|g1) + (1|g2)"}
    return df, truth

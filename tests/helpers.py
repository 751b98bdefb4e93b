"""Shared helpers for the lmmfast test suite (imported by the test modules).

The suite stands alone: the lme4 reference fits (``tests/refs/``) and the data they need
(``tests/data/``, factor columns read as strings) are copied into the repository.  InstEval
is too large to copy; it is loaded from the gzipped copy lmmfast ships
(``lmmfast.datasets.load("insteval")``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

import lmmfast

TESTS_DIR = Path(__file__).resolve().parent
REFS_DIR = TESTS_DIR / "refs"
DATA_DIR = TESTS_DIR / "data"

# data sets that lmmfast ships and the tests load from the package instead of tests/data
PACKAGED = {"insteval.csv": "insteval"}


def load_cases() -> list:
    with open(REFS_DIR / "cases.json") as fh:
        return json.load(fh)


CASES = load_cases()
CASE_BY_ID = {c["id"]: c for c in CASES}


def load_ref(case_id: str) -> dict:
    with open(REFS_DIR / f"{case_id}.json") as fh:
        return json.load(fh)


_DATA_CACHE: dict = {}


def load_csv(name: str, factors) -> pd.DataFrame:
    """Read ``tests/data/<name>`` as check_refs.py does: factor columns as strings.

    Returns a fresh copy each call (tests may modify it).
    """
    key = (name, tuple(factors))
    if key not in _DATA_CACHE:
        if name in PACKAGED:
            df = lmmfast.datasets.load(PACKAGED[name])
        else:
            df = pd.read_csv(DATA_DIR / name, dtype={f: str for f in factors})
        for f in factors:
            if f not in df.columns:
                raise KeyError(f"factor column {f!r} not in {name}")
            col = df[f]
            df[f] = col.where(col.isna(), col.astype(str))
        _DATA_CACHE[key] = df
    return _DATA_CACHE[key].copy()


def case_data(case: dict) -> pd.DataFrame:
    return load_csv(case["data"], case.get("factors", []))


_FIT_CACHE: dict = {}


def fit_case(case_id: str):
    """Fit a reference case once per test session (the fit is treated as read-only)."""
    if case_id not in _FIT_CACHE:
        case = CASE_BY_ID[case_id]
        _FIT_CACHE[case_id] = lmmfast.lmer(case["py_formula"], case_data(case), REML=bool(case["REML"]))
    return _FIT_CACHE[case_id]


def dense_parts(model):
    """Dense Z (terms in model order, level-major columns), X and y of a LinearMixedModel."""
    Z = np.hstack([t.Z().toarray() for t in model.terms])
    return Z, np.asarray(model.X, dtype=float), np.asarray(model.y, dtype=float)


def random_theta(model, rng, zero_prob=0.0):
    """A random θ: positive diagonals (sometimes exactly 0), arbitrary off-diagonals."""
    th = np.empty(model.ntheta)
    for i, low in enumerate(model.theta_lower):
        if low == 0:
            th[i] = 0.0 if rng.random() < zero_prob else rng.uniform(0.05, 2.5)
        else:
            th[i] = rng.normal(scale=1.0)
    return th


# ---------------------------------------------------------------- models for the θ-derivatives
def sim_three_factors(seed=0, n=400):
    """Three crossed factors (30, 8 and 5 levels), two covariates, random slopes on x."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"g1": rng.integers(0, 30, n).astype(str), "g2": rng.integers(0, 8, n).astype(str),
                       "g3": rng.integers(0, 5, n).astype(str),
                       "x": rng.normal(size=n), "z": rng.normal(size=n)})
    df["y"] = (rng.normal(size=n) + df.x + rng.normal(size=30)[df.g1.astype(int)]
               + rng.normal(size=8)[df.g2.astype(int)] * (1 + df.x))
    return df


# (data, formula): scalar, vector, uncorrelated, nested and crossed terms, for the tests of
# the gradient and of the average information ("sim": :func:`sim_three_factors`)
DERIVATIVE_MODELS = [
    ("sleepstudy", "Reaction ~ Days + (Days | Subject)"),
    ("sleepstudy", "Reaction ~ Days + (Days || Subject)"),
    ("penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)"),
    ("pastes", "strength ~ 1 + (1 | batch/cask)"),
    ("sim", "y ~ x + (1|g1) + (1 + x|g2)"),
    ("sim", "y ~ x + z + (1 + x|g1) + (1 + x + z|g2) + (0 + z|g3)"),
    ("sim", "y ~ x + (1 + x + z|g1) + (1|g2) + (x|g3)"),
    ("sim", "y ~ 1 + (1|g2) + (1|g1)"),
]


def derivative_data(name):
    return sim_three_factors() if name == "sim" else lmmfast.datasets.load(name)

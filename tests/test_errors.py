"""Bad input gives a clear error naming the culprit; the input frame is never modified;
missing values drop only the rows they spoil."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import pytest

import lmmfast
from lmmfast import (DataError, FormulaError, LinearMixedModel, LmmError, MissingColumnError,
                     RankDeficiencyWarning)
from helpers import load_csv


@pytest.fixture
def df():
    rng = np.random.default_rng(1)
    n = 48
    g = np.repeat(np.arange(6), 8)
    out = pd.DataFrame({
        "g": [f"G{i}" for i in g],
        "h": rng.choice(["u", "v", "w"], n),
        "x": rng.normal(size=n),
        "z": rng.uniform(size=n),
        "s": rng.choice(["p", "q"], n),
        "id": [f"obs{i}" for i in range(n)],
    })
    out["y"] = 2.0 + out["x"] + rng.normal(size=6)[g] + rng.normal(scale=0.5, size=n)
    return out


def _raises(exc, formula, data, *words, **kw):
    with pytest.raises(exc) as ei:
        LinearMixedModel(formula, data, **kw)
    msg = str(ei.value)
    for w in words:
        assert w in msg, f"{w!r} not in the message {msg!r}"
    assert isinstance(ei.value, ValueError), "every input error is a ValueError"
    return ei.value


# ----------------------------------------------------------------------- unknown columns
@pytest.mark.parametrize("formula,where", [
    ("y ~ x + nope + (1 | g)", "fixed"),
    ("y ~ x + (1 + nope | g)", "(1 + nope | g)"),
    ("y ~ x + (1 | nope)", "(1 | nope)"),
    ("y ~ x + (1 | g:nope)", "nope"),
    ("y ~ x + (1 | nope/g)", "nope"),
    ("nope ~ x + (1 | g)", "response"),
])
def test_unknown_column(df, formula, where):
    err = _raises(MissingColumnError, formula, df, "'nope'", where)
    assert isinstance(err, KeyError) and isinstance(err, LmmError)
    # the message stays readable (no KeyError quoting)
    assert not str(err).startswith('"')


# ---------------------------------------------------------------------------- response
def test_non_numeric_response(df):
    _raises(DataError, "s ~ x + (1 | g)", df, "'s'", "numeric")


def test_constant_response(df):
    _raises(DataError, "c ~ x + (1 | g)", df.assign(c=3.5), "'c'", "constant")


def test_all_missing_response(df):
    _raises(DataError, "m ~ x + (1 | g)", df.assign(m=np.nan), "no rows left", "m")


def test_infinite_response(df):
    y = df["y"].to_numpy().copy()
    y[3] = np.inf
    _raises(DataError, "y ~ x + (1 | g)", df.assign(y=y), "'y'", "infinite")


def test_no_rows_left_after_dropping_missing(df):
    d = df.copy()
    d.loc[::2, "x"] = np.nan
    d.loc[1::2, "z"] = np.nan
    _raises(DataError, "y ~ x + z + (1 | g)", d, "no rows left")


# ------------------------------------------------------------------- grouping factors
def test_grouping_factor_with_one_level(df):
    _raises(DataError, "y ~ x + (1 | one)", df.assign(one="only"), "'one'", "1 level")


def test_grouping_factor_with_a_level_per_observation(df):
    _raises(DataError, "y ~ x + (1 | id)", df, "'id'", "48 levels")


def test_too_many_random_effects_for_the_observations(df):
    d = df.assign(half=[f"k{i // 2}" for i in range(len(df))])      # 24 levels, 2 obs each
    _raises(DataError, "y ~ x + (1 + x + z | half)", d, "half")


# ------------------------------------------------------------------------------ formulas
@pytest.mark.parametrize("formula,words", [
    ("y ~ x + (1 | g", ["unbalanced", "not closed"]),
    ("y ~ x + 1 | g)", ["unbalanced"]),
    ("y ~ x + ((1 | g)", ["unbalanced"]),
    ("y ~ x + (| g)", ["nothing before the bar"]),
    ("y ~ x + (1 |)", ["no grouping factor"]),
    ("y ~ x + (1 || )", ["no grouping factor"]),
    ("y ~ x", ["no random-effects term"]),
    ("y ~ x + (1 | g/)", ["empty grouping factor"]),
    ("y + (1 | g)", ["response ~ terms"]),
    ("y ~ ", ["nothing to the right"]),
    ("y ~ x + (1 | g | h)", ["more than one bar"]),
])
def test_bad_formula(df, formula, words):
    _raises(FormulaError, formula, df, *words)


def test_bad_fixed_syntax(df):
    _raises(FormulaError, "y ~ x + * z + (1 | g)", df)


# ----------------------------------------------------------------------------- fit args
def test_bad_fit_arguments(df):
    m = LinearMixedModel("y ~ x + (1 | g)", df)
    with pytest.raises(ValueError, match="optimizer"):
        m.fit(optimizer="no-such-optimizer")
    with pytest.raises(ValueError, match="length"):
        m.fit(start=[1.0, 2.0])
    with pytest.raises(ValueError, match="bound"):
        m.fit(start=[-1.0])


# --------------------------------------------------------------------- rank deficiency
def test_rank_deficient_fixed_effects_drop_the_aliased_column(df):
    d = df.assign(x2=2.0 * df["x"] - 1.0)
    with pytest.warns(RankDeficiencyWarning, match="x2"):
        fit = lmmfast.lmer("y ~ x + x2 + (1 | g)", d)
    assert list(fit.fixef.index) == ["(Intercept)", "x"]
    assert fit.model.dropped == ["x2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RankDeficiencyWarning)
        ref = lmmfast.lmer("y ~ x + (1 | g)", df)
    assert fit.objective == pytest.approx(ref.objective, rel=1e-10)
    np.testing.assert_allclose(fit.theta, ref.theta, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(fit.fixef.to_numpy(), ref.fixef.to_numpy(), rtol=1e-6, atol=1e-8)
    assert fit.sigma == pytest.approx(ref.sigma, rel=1e-8)
    np.testing.assert_allclose(fit.vcov.to_numpy(), ref.vcov.to_numpy(), rtol=1e-6)
    assert fit.df == ref.df and fit.aic == pytest.approx(ref.aic, rel=1e-10)
    np.testing.assert_allclose(fit.predict(d), ref.predict(df), rtol=1e-8, atol=1e-10)


def test_rank_deficient_factor_cells(df):
    """An empty cell of an interaction is dropped with a warning naming it (as lme4 does)."""
    d = df.copy()
    d.loc[(d["s"] == "q") & (d["h"] == "w"), "h"] = "v"          # no (q, w) cell left
    with pytest.warns(RankDeficiencyWarning, match=re.escape("sq:hw")):
        m = LinearMixedModel("y ~ s * h + (1 | g)", d)
    assert "sq:hw" not in m.xnames
    assert np.linalg.matrix_rank(m.X) == m.X.shape[1]


# ---------------------------------------------------------------- the input is untouched
def _assorted_frame(df):
    d = df.copy()
    d["cat"] = pd.Categorical(d["h"], categories=["w", "v", "u", "unused"])
    d["i"] = np.arange(len(d)) % 4
    d["b"] = d["x"] > 0
    d.loc[2, "x"] = np.nan
    d.loc[5, "g"] = None
    d["extra"] = np.nan
    d.index = np.arange(len(d))[::-1] * 3          # not a default RangeIndex
    return d


@pytest.mark.filterwarnings("ignore::lmmfast.RankDeficiencyWarning")
@pytest.mark.parametrize("formula", [
    "y ~ x + (1 | g)",
    "y ~ x * cat + i + (1 + x | g)",
    "y ~ b + C(i) + (1 | g) + (1 | cat)",
    "np.log(z) ~ x + (x || g)",
])
def test_input_frame_is_not_modified(df, formula):
    d = _assorted_frame(df)
    before = d.copy(deep=True)
    fit = lmmfast.lmer(formula, d)
    pd.testing.assert_frame_equal(d, before, check_dtype=True, check_index_type=True,
                                  check_column_type=True, check_categorical=True, check_exact=True)
    fit.predict(d)
    _ = fit.summary(), fit.ranef, fit.ranef_sd, fit.varcorr
    pd.testing.assert_frame_equal(d, before, check_exact=True)


# --------------------------------------------------------------------------- missingness
def test_rows_with_missing_used_values_are_dropped(df):
    d = df.copy()
    d.loc[[0, 7], "x"] = np.nan          # fixed effect
    d.loc[11, "g"] = None                # grouping factor
    d.loc[20, "y"] = np.nan              # response
    d["unused"] = np.nan                 # a column the model does not use: drops nothing
    d.loc[30, "z"] = np.nan              # ditto
    fit = lmmfast.lmer("y ~ x + (1 | g)", d)
    assert fit.nobs == len(d) - 4
    assert fit.n_dropped == 4
    assert "4 observations deleted due to missingness" in fit.summary()
    complete = d.drop(index=[0, 7, 11, 20]).drop(columns=["unused"])
    ref = lmmfast.lmer("y ~ x + (1 | g)", complete)
    assert ref.n_dropped == 0
    assert fit.objective == pytest.approx(ref.objective, rel=1e-12)
    np.testing.assert_allclose(fit.fitted, ref.fitted, rtol=1e-10)
    assert "deleted" not in ref.summary()


def test_missing_values_in_unused_columns_drop_no_rows(df):
    d = df.assign(unused=np.nan, also=None)
    fit = lmmfast.lmer("y ~ x + (1 | g)", d)
    assert fit.nobs == len(d) and fit.n_dropped == 0
    ref = lmmfast.lmer("y ~ x + (1 | g)", df)
    assert fit.objective == ref.objective


def test_missing_in_random_slope_drops_the_row(df):
    d = df.copy()
    d.loc[4, "z"] = np.nan
    fit = lmmfast.lmer("y ~ x + (0 + z | g)", d)
    assert fit.nobs == len(d) - 1 and fit.n_dropped == 1


def test_one_dropped_row_is_singular_in_summary(df):
    d = df.copy()
    d.loc[4, "x"] = np.nan
    fit = lmmfast.lmer("y ~ x + (1 | g)", d)
    assert "1 observation deleted due to missingness" in fit.summary()


def test_na_in_real_data():
    d = load_csv("sleepstudy.csv", ["Subject"])
    d.loc[[3, 50, 51], "Reaction"] = np.nan
    fit = lmmfast.lmer("Reaction ~ Days + (Days | Subject)", d)
    assert fit.nobs == 177 and fit.n_dropped == 3


def test_missing_in_nullable_integer_column_drops_the_row(df):
    # a nullable Int64 column reports dtype kind 'i' yet can hold <NA>
    d = df.assign(k=pd.array(np.arange(len(df)) % 5, dtype="Int64"))
    d.loc[6, "k"] = pd.NA
    fit = lmmfast.lmer("y ~ x + k + (1 | g)", d)
    assert fit.nobs == len(d) - 1 and fit.n_dropped == 1
    ref = lmmfast.lmer("y ~ x + k + (1 | g)", d.drop(index=[6]).astype({"k": float}))
    assert fit.objective == pytest.approx(ref.objective, rel=1e-12)


def test_nearly_aliased_column_is_judged_by_the_qr(df):
    # far below the Gram-matrix shortcut's margin: the pivoted decision is the QR's
    d = df.assign(x2=df["x"] + 1e-9 * np.sin(np.arange(len(df))))
    with pytest.warns(RankDeficiencyWarning, match="x2"):
        fit = lmmfast.lmer("y ~ x + x2 + (1 | g)", d)
    assert list(fit.fixef.index) == ["(Intercept)", "x"]
    d = df.assign(x2=df["x"] + 1e-3 * np.sin(np.arange(len(df))))   # kept: above tol
    with warnings.catch_warnings():
        warnings.simplefilter("error", RankDeficiencyWarning)
        fit = lmmfast.lmer("y ~ x + x2 + (1 | g)", d)
    assert list(fit.fixef.index) == ["(Intercept)", "x", "x2"]


def test_missing_in_categorical_grouping_factor_drops_the_row(df):
    d = df.assign(g=pd.Categorical(df["g"], categories=sorted(df["g"].unique()) + ["G-unused"]))
    d.loc[[2, 9], "g"] = np.nan
    fit = lmmfast.lmer("y ~ x + (1 | g)", d)
    assert fit.nobs == len(d) - 2 and fit.n_dropped == 2
    ref = lmmfast.lmer("y ~ x + (1 | g)", df.drop(index=[2, 9]))
    assert fit.objective == pytest.approx(ref.objective, rel=1e-12)
    assert list(fit.ranef["g"].index) == list(ref.ranef["g"].index)      # unused level dropped


def test_categorical_grouping_factor_keeps_category_order_and_drops_levels_left_empty(df):
    """A grouping factor given as a Categorical: its levels in category order (R's factor
    levels), a level whose rows all have a missing value elsewhere dropped with them, the
    same fit as on the complete rows with that level never there."""
    levels = sorted(df["g"].unique())
    order = levels[::-1]                                  # not sorted: category order rules
    d = df.assign(g=pd.Categorical(df["g"], categories=order))
    gone = order[1]
    d.loc[d["g"] == gone, "x"] = np.nan                   # every row of one level dropped
    fit = lmmfast.lmer("y ~ x + (1 | g)", d)
    keep = df[df["g"] != gone]
    ref = lmmfast.lmer("y ~ x + (1 | g)", keep.assign(
        g=pd.Categorical(keep["g"], categories=[c for c in order if c != gone])))
    assert fit.n_dropped == int((df["g"] == gone).sum())
    assert list(fit.ranef["g"].index) == [c for c in order if c != gone]
    assert list(fit.ranef["g"].index) == list(ref.ranef["g"].index)
    assert fit.objective == pytest.approx(ref.objective, rel=1e-12)
    np.testing.assert_allclose(fit.ranef["g"].to_numpy(), ref.ranef["g"].to_numpy(),
                               rtol=1e-8, atol=1e-10)


def _exact_response_frame(n=2000):
    """A response constant within the levels of ``id`` (a subject-level covariate used as
    the response): (1 | id) fits it exactly."""
    rng = np.random.default_rng(11)
    ids = rng.integers(0, 200, n)
    return pd.DataFrame({"id": ids.astype(str), "item": rng.integers(0, 24, n).astype(str),
                         "y": rng.normal(size=200)[ids]})


def test_exact_fit_of_the_response_is_not_a_start():
    """The moment start has no residual variance to scale by: lme4's start, not θ ≈ 1e15."""
    m = LinearMixedModel("y ~ 1 + (1 | id) + (1 | item)", _exact_response_frame())
    np.testing.assert_array_equal(m.moment_start(), [1.0, 1.0])


def test_no_finite_objective_is_a_clear_error_not_a_fit():
    """From a start where Ω(θ) is numerically singular and the response is fitted exactly,
    every evaluation is +inf: an error naming the start, never estimates computed from a
    failed factorization."""
    m = LinearMixedModel("y ~ 1 + (1 | id) + (1 | item)", _exact_response_frame())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="not finite at any θ"):
            m.fit(start=[1e15, 0.01])


def test_duplicate_column_names_are_named(df):
    dup = pd.concat([df, df[["x"]]], axis=1)
    _raises(DataError, "y ~ x + (1 | g)", dup, "2 columns named 'x'", "rename")


def test_complex_columns_are_refused(df):
    _raises(DataError, "y ~ x + (1 | g)", df.assign(x=df["x"] + 1j), "'x'", "complex")


def test_model_frame_without_pandas_internal_column_accessor(df, monkeypatch):
    """The model frame reads columns through pandas' internal accessor when it has one;
    through Series otherwise (a pandas without it, or one whose accessor fails): same
    rows, same levels, same fit, over numeric, nullable, categorical and text columns."""
    d = df.assign(k=pd.array(np.arange(len(df)) % 5, dtype="Int64"),
                  c=pd.Categorical(df["h"], categories=["w", "v", "u", "unused"]),
                  t=df["s"].astype("string"), i=np.arange(len(df)) % 4)
    d.loc[6, "k"] = pd.NA
    d.loc[[2, 9], "c"] = np.nan
    d.loc[11, "x"] = np.nan
    formula = "y ~ x + k + c + t + i + (1 | g) + (1 | c:t)"
    ref = lmmfast.lmer(formula, d)
    assert ref.nobs == len(d) - 4
    for how in ("fails", "absent"):
        with monkeypatch.context() as mp:
            if how == "fails":
                def broken(self, i):
                    raise AttributeError("changed")
                mp.setattr(pd.DataFrame, "_get_column_array", broken, raising=False)
            else:
                mp.delattr(pd.DataFrame, "_get_column_array", raising=False)
            fit = lmmfast.lmer(formula, d)
        assert fit.nobs == ref.nobs
        assert list(fit.fixef.index) == list(ref.fixef.index)
        assert list(fit.ranef["c:t"].index) == list(ref.ranef["c:t"].index)
        assert fit.objective == pytest.approx(ref.objective, rel=1e-12)


def test_model_arrays_are_never_the_users_writable_memory(df):
    """The model frame reads the user's columns without copies: what the model holds of
    them is read-only, so no later step can write into the user's frame."""
    d = df.copy()
    m = LinearMixedModel("y ~ x + (1 + x | g)", d)
    assert not m.y.flags.writeable or not np.shares_memory(m.y, d["y"].to_numpy())
    with pytest.raises(ValueError):
        m.y[0] = 0.0
    pd.testing.assert_frame_equal(d, df)


def _long_text_frame(dtype, n=12_000):
    rng = np.random.default_rng(3)
    g, h, f = rng.integers(0, 300, n), rng.integers(0, 40, n), rng.integers(0, 4, n)
    y = (1.0 + 0.5 * f + rng.normal(size=300)[g] + 0.7 * rng.normal(size=40)[h]
         + rng.normal(size=n))

    def text(prefix, codes):
        return pd.Series([f"{prefix}{i:03d}" for i in codes], dtype=dtype)

    return pd.DataFrame({"g": text("s", g), "h": text("d", h), "f": text("c", f), "y": y})


@pytest.mark.parametrize("dtype", [object, pd.StringDtype("python", na_value=np.nan)],
                         ids=["object", "str"])
@pytest.mark.parametrize("with_missing", [False, True])
def test_long_text_columns_fit_as_their_categoricals(dtype, with_missing):
    """Text columns of 10,000 rows and more are hashed once by the model frame, whose codes
    then serve the grouping factors and the fixed part's cells: the fit is the one with the
    same columns as Categoricals (codes from pandas, another path), missing text values
    dropping their rows."""
    d = _long_text_frame(dtype)
    if with_missing:
        d.loc[[5, 77], "g"] = None
        d.loc[[9], "f"] = None
    cat = d.assign(**{c: pd.Categorical(d[c]) for c in ("g", "h", "f")})
    before = d.copy()
    fit = lmmfast.lmer("y ~ f + (1 | g) + (1 | h)", d)
    ref = lmmfast.lmer("y ~ f + (1 | g) + (1 | h)", cat)
    pd.testing.assert_frame_equal(d, before)
    assert fit.n_dropped == (3 if with_missing else 0) == ref.n_dropped
    assert fit.objective == pytest.approx(ref.objective, rel=1e-12)
    assert list(fit.fixef.index) == list(ref.fixef.index) == ["(Intercept)", "fc001", "fc002",
                                                              "fc003"]
    np.testing.assert_allclose(fit.fixef, ref.fixef, rtol=1e-9)
    for g in ("g", "h"):
        assert list(fit.ranef[g].index) == list(ref.ranef[g].index)
        np.testing.assert_allclose(fit.ranef[g].to_numpy(), ref.ranef[g].to_numpy(), rtol=1e-8,
                                   atol=1e-10)


@pytest.mark.parametrize("n", [40, 12_000])
def test_unhashable_grouping_values_are_a_clear_error(n):
    d = pd.DataFrame({"g": pd.Series([[1], [2]] * (n // 2), dtype=object),
                      "y": np.arange(n, dtype=float)})
    _raises(DataError, "y ~ 1 + (1 | g)", d, "'g'", "(1 | g)", "strings")

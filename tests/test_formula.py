"""Formula parsing (lme4's findbars / expandDoubleVerts / expandSlash), term and level order,
and lme4-style column names."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmmfast import FormulaError, LinearMixedModel, RankDeficiencyWarning
from lmmfast.bars import Bar, parse_formula
from lmmfast.remat import factor_codes, grouping_factor, lme4_name, order_terms
from helpers import load_csv


def bars(formula):
    return [(b.lhs.replace(" ", ""), b.factors) for b in parse_formula(formula).bars]


# ------------------------------------------------------------------------------ bars
@pytest.mark.parametrize("formula,want", [
    ("y ~ x + (x | g)", [("x", ("g",))]),
    ("y ~ x + (1 + x | g)", [("1+x", ("g",))]),
    ("y ~ (0 + x | g)", [("0+x", ("g",))]),
    ("y ~ (1 | g)", [("1", ("g",))]),
    ("y ~ (1 | a:b)", [("1", ("a", "b"))]),
    ("y ~ (1 | a/b)", [("1", ("b", "a")), ("1", ("a",))]),
    ("y ~ (1 | a/b/c)", [("1", ("c", "b", "a")), ("1", ("b", "a")), ("1", ("a",))]),
    ("y ~ x + (1 | g) + (0 + x | h) + (1 | k)", [("1", ("g",)), ("0+x", ("h",)), ("1", ("k",))]),
    ("y~(1|g)+(1|h)", [("1", ("g",)), ("1", ("h",))]),
])
def test_bars_are_found_in_order(formula, want):
    assert bars(formula) == want


@pytest.mark.parametrize("formula,want", [
    ("y ~ x + (1 + x || g)", [("1", ("g",)), ("0+x", ("g",))]),
    ("y ~ x + (x || g)", [("1", ("g",)), ("0+x", ("g",))]),
    ("y ~ (1 + x + z || g)", [("1", ("g",)), ("0+x", ("g",)), ("0+z", ("g",))]),
    ("y ~ (0 + x + z || g)", [("0+x", ("g",)), ("0+z", ("g",))]),
    ("y ~ (x + z - 1 || g)", [("0+x", ("g",)), ("0+z", ("g",))]),
])
def test_double_bar_expands_to_uncorrelated_terms(formula, want):
    assert bars(formula) == want


def test_double_bar_expands_interactions_like_lme4():
    assert bars("y ~ (x*z || g)") == [("1", ("g",)), ("0+x", ("g",)), ("0+z", ("g",)), ("0+x:z", ("g",))]


def test_double_bar_with_nesting_orders_bars_like_lme4():
    assert bars("y ~ (1 + x || g/h)") == [("1", ("h", "g")), ("1", ("g",)),
                                          ("0+x", ("h", "g")), ("0+x", ("g",))]


def test_bar_objects():
    mf = parse_formula("Reaction ~ Days + (Days | Subject)")
    assert mf.response == "Reaction"
    assert mf.fixed.replace(" ", "") == "Days"
    (b,) = mf.bars
    assert isinstance(b, Bar)
    assert b.group == "Subject"
    assert str(b) == "(Days | Subject)"
    assert parse_formula("y ~ (1 | a/b)").bars[0].group == "b:a"
    assert mf.text == "Reaction ~ Days + (Days | Subject)"


@pytest.mark.parametrize("formula,fixed", [
    ("y ~ x + (1 | g)", "x"),
    ("y ~ (1 | g)", "1"),
    ("y ~ 1 + (1 | g)", "1"),
    ("y ~ (1 | g) + x + z", "x+z"),
    ("y ~ x + (1 | g) + z", "x+z"),
    ("y ~ 0 + x + (1 | g)", "0+x"),
    ("y ~ x - 1 + (1 | g)", "x-1"),
    ("y ~ I(x**2) + np.log(x) + (1 | g)", "I(x**2)+np.log(x)"),
    ("y ~ C(f) + x:z + (1 | g)", "C(f)+x:z"),
])
def test_fixed_part_keeps_everything_but_the_bars(formula, fixed):
    assert parse_formula(formula).fixed.replace(" ", "") == fixed


def test_function_calls_with_parentheses_are_not_bars():
    mf = parse_formula("y ~ np.log(x) + I(x + z) + (1 | g)")
    assert [b.group for b in mf.bars] == ["g"]
    assert "np.log(x)" in mf.fixed and "I(x + z)" in mf.fixed


# ------------------------------------------------------------------- fixed-effects columns
def _sim(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "g": rng.choice(["g1", "g2", "g3", "g4", "g5"], n),
        "f": rng.choice(["lo", "hi", "Mid"], n),
        "x": rng.uniform(0.5, 2.0, n),
        "z": rng.normal(size=n),
        "y": rng.normal(size=n),
    })


def test_transformed_fixed_columns():
    df = _sim()
    m = LinearMixedModel("y ~ I(x**2) + np.log(x) + (1 | g)", df)
    assert m.xnames[0] == "(Intercept)" and len(m.xnames) == 3
    np.testing.assert_allclose(m.X[:, 1], df["x"] ** 2)
    np.testing.assert_allclose(m.X[:, 2], np.log(df["x"]))


def test_C_makes_a_numeric_column_categorical():
    df = _sim()
    df["k"] = np.where(df["z"] > 0, 2, 1)
    m = LinearMixedModel("y ~ C(k) + (1 | g)", df)
    assert m.X.shape[1] == 2
    np.testing.assert_array_equal(m.X[:, 1], (df["k"] == 2).astype(float))
    assert "2" in m.xnames[1]


@pytest.mark.parametrize("formula", ["y ~ 0 + x + (1 | g)", "y ~ x - 1 + (1 | g)", "y ~ -1 + x + (1 | g)"])
def test_no_intercept(formula):
    df = _sim()
    m = LinearMixedModel(formula, df)
    assert m.xnames == ["x"]
    np.testing.assert_array_equal(m.X[:, 0], df["x"])


def test_factor_without_intercept_gets_all_levels_in_byte_order():
    m = LinearMixedModel("y ~ 0 + f + (1 | g)", _sim())
    assert m.xnames == ["fMid", "fhi", "flo"]          # "M" < "h" < "l" in byte order


def test_treatment_contrasts_and_interaction_names_like_lme4():
    df = _sim()
    m = LinearMixedModel("y ~ x * f + (1 | g)", df)
    assert m.xnames == ["(Intercept)", "x", "fhi", "flo", "x:fhi", "x:flo"]
    np.testing.assert_allclose(m.X[:, 4], df["x"] * (df["f"] == "hi"))


def test_unused_categories_do_not_change_the_reference_level():
    df = _sim()
    used = df[df["f"] != "Mid"]
    cat = used.assign(f=pd.Categorical(used["f"], categories=["Mid", "hi", "lo"]))  # "Mid" unused
    with warnings.catch_warnings():
        warnings.simplefilter("error", RankDeficiencyWarning)
        m = LinearMixedModel("y ~ f + (1 | g)", cat)
    assert m.xnames == ["(Intercept)", "flo"]           # as with the plain strings:
    assert LinearMixedModel("y ~ f + (1 | g)", used).xnames == ["(Intercept)", "flo"]


def test_cake_column_names_like_lme4():
    df = load_csv("cake.csv", ["replicate", "recipe", "temperature"])
    m = LinearMixedModel("angle ~ recipe * temperature + (1 | recipe:replicate)", df)
    assert m.xnames[:4] == ["(Intercept)", "recipeB", "recipeC", "temperature185"]
    assert m.xnames[8:10] == ["recipeB:temperature185", "recipeC:temperature185"]
    assert len(m.xnames) == 18
    assert m.terms[0].group == "recipe:replicate"


@pytest.mark.parametrize("formulaic_name,lme4", [
    ("Intercept", "(Intercept)"),
    ("recipe[T.B]", "recipeB"),
    ("recipe[T.B]:temperature[T.185]", "recipeB:temperature185"),
    ("x", "x"),
    ("x:z", "x:z"),
])
def test_lme4_name(formulaic_name, lme4):
    assert lme4_name(formulaic_name) == lme4


def test_random_term_column_names():
    m = LinearMixedModel("y ~ x + (1 + x + z | g)", _sim())
    (t,) = m.terms
    assert t.cnames == ["(Intercept)", "x", "z"]
    assert m.theta_names == ["g.(Intercept)", "g.x.(Intercept)", "g.z.(Intercept)", "g.x", "g.z.x", "g.z"]


# ---------------------------------------------------------------------------- term order
def _t(name, nlevels):
    return SimpleNamespace(name=name, nlevels=nlevels)


@pytest.mark.parametrize("nl,want", [
    ([5, 3, 2], [0, 1, 2]),          # already non-increasing: untouched
    ([5, 5, 3], [0, 1, 2]),          # ties without any increase: untouched
    ([3, 3], [0, 1]),
    ([2, 5], [1, 0]),
    ([2, 5, 5, 3], [2, 1, 3, 0]),    # rev(order(nl)): later terms first among ties
    ([4, 4, 6], [2, 1, 0]),
    ([3, 7, 3, 7], [3, 1, 2, 0]),
    ([1, 2, 1, 2], [3, 1, 2, 0]),
])
def test_order_terms_is_lme4s_rev_order(nl, want):
    terms = [_t(f"t{i}", n) for i, n in enumerate(nl)]
    assert [t.name for t in order_terms(terms)] == [f"t{i}" for i in want]


def test_model_terms_in_lme4_order():
    df = load_csv("penicillin.csv", ["plate", "sample"])
    m = LinearMixedModel("diameter ~ 1 + (1 | sample) + (1 | plate)", df)
    assert [t.group for t in m.terms] == ["plate", "sample"]      # 24 plates > 6 samples
    df = load_csv("pastes.csv", ["batch", "cask", "sample"])
    m = LinearMixedModel("strength ~ 1 + (1 | batch/cask)", df)
    assert [t.group for t in m.terms] == ["cask:batch", "batch"]
    assert m.terms[0].nlevels == 30 and m.terms[1].nlevels == 10


# ---------------------------------------------------------------------------- level order
def test_levels_sort_in_byte_order():
    codes, levels, _ = factor_codes(pd.Series(["2", "10", "1", "a", "B", "10", "b", "A"]))
    assert levels == ["1", "10", "2", "A", "B", "a", "b"]
    assert [levels[c] for c in codes] == ["2", "10", "1", "a", "B", "10", "b", "A"]


def test_numeric_levels_sort_numerically():
    codes, levels, _ = factor_codes(pd.Series([10, 2, 1, 2]))
    assert levels == ["1", "2", "10"]
    np.testing.assert_array_equal(codes, [2, 1, 0, 1])


def test_categorical_levels_keep_category_order_and_drop_unused():
    col = pd.Series(pd.Categorical(["lo", "hi", "lo"], categories=["mid", "lo", "hi"]))
    codes, levels, _ = factor_codes(col)
    assert levels == ["lo", "hi"]
    np.testing.assert_array_equal(codes, [0, 1, 0])


def test_interaction_levels_are_lex_by_first_factor():
    frame = pd.DataFrame({"a": ["B", "A", "A", "B", "A", "A-"], "b": ["2", "1", "10", "1", "2", "1"]})
    codes, labels, _ = grouping_factor(frame, ("a", "b"), "(1 | a:b)")
    # first factor slowest, each factor in its own level order; unused combinations dropped.
    # "A:.." precedes "A-:.." although '-' < ':' in byte order: levels sort per factor.
    assert labels == ["A:1", "A:10", "A:2", "A-:1", "B:1", "B:2"]
    assert [labels[c] for c in codes] == ["B:2", "A:1", "A:10", "B:1", "A:2", "A-:1"]


def test_machines_interaction_levels_match_lme4():
    df = load_csv("machines.csv", ["Worker", "Machine"])
    m = LinearMixedModel("score ~ Machine + (1 | Worker/Machine)", df)
    t = m.terms[0]
    assert t.group == "Machine:Worker"
    assert t.levels[:7] == ["A:1", "A:2", "A:3", "A:4", "A:5", "A:6", "B:1"]


def test_insteval_like_numeric_strings_sort_as_strings():
    df = pd.DataFrame({"dept": ["1", "10", "2", "11", "3", "1", "2", "3", "10", "11"],
                       "y": np.arange(10.0) ** 1.5})
    m = LinearMixedModel("y ~ 1 + (1 | dept)", df)
    assert m.terms[0].levels == ["1", "10", "11", "2", "3"]


def test_parse_formula_rejects_non_strings():
    with pytest.raises(FormulaError):
        parse_formula(None)


def test_levels_of_mixed_types_fall_back_to_pandas_order():
    col = pd.Series([3, "b", 1, "a", 3], dtype=object)     # ints and strings do not compare
    codes, levels, _ = factor_codes(col)
    assert sorted(levels) == ["1", "3", "a", "b"] and len(set(codes)) == 4
    assert [levels[c] for c in codes] == ["3", "b", "1", "a", "3"]


def test_factor_codes_agree_with_pandas_sorted_factorize():
    rng = np.random.default_rng(3)
    for col in (pd.Series(rng.choice(["x10", "x2", "Y", "é", "a b"], 500)),
                pd.Series(rng.integers(-5, 50, 500)), pd.Series(rng.normal(size=50).round(1)),
                pd.Series(rng.choice(["u", "v"], 80), dtype="string")):
        ref_codes, ref_uniq = pd.factorize(col, sort=True)
        # values at hand (a model frame's: the sort / dict paths) or not (pandas' path)
        for got in (factor_codes(col), factor_codes(col, col.to_numpy())):
            codes, levels, _ = got
            np.testing.assert_array_equal(codes, ref_codes)
            assert levels == [str(u) for u in ref_uniq]


@settings(max_examples=80, deadline=None, database=None)
@given(st.sampled_from(["int8", "uint8", "int16", "int32", "int64", "uint64", "bool"]),
       st.integers(1, 300), st.integers(0, 2 ** 31), st.sampled_from([2, 50, 10 ** 6]))
def test_integer_levels_by_table_or_sort_agree_with_numpy_unique(dtype, n, seed, spread):
    """Short integer and boolean columns, over the whole range of each type (int8 from
    -128 to 127, uint64 near 2^64): numpy's sorted levels and codes, levels in the
    column's own type."""
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype) if dtype != "bool" else None
    if info is None:
        vals = rng.integers(0, 2, n).astype(bool)
    else:
        lo = [int(info.min), int(info.max) - spread, 0][int(rng.integers(0, 3))]
        lo = max(lo, int(info.min))
        hi = min(int(info.max), lo + spread)
        vals = rng.integers(lo, hi, n, endpoint=True, dtype=dtype)
    codes, levels, idx = factor_codes(None, vals)
    ref_uniq, ref_codes = np.unique(vals, return_inverse=True)
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_array_equal(idx, ref_uniq)
    assert np.asarray(idx).dtype == vals.dtype
    assert levels == [str(u) for u in ref_uniq.tolist()]


def test_long_columns_take_the_hash_path_with_the_same_codes():
    import lmmfast.remat as remat

    rng = np.random.default_rng(4)
    n = remat._SORT_MAX + 1
    for col in (pd.Series(rng.integers(0, 900, n)), pd.Series(rng.choice(["b", "a", "c"], n))):
        codes, levels, _ = factor_codes(col, col.to_numpy())
        ref_codes, ref_uniq = pd.factorize(col, sort=True)
        np.testing.assert_array_equal(codes, ref_codes)
        assert levels == [str(u) for u in ref_uniq]


def test_short_object_levels_of_mixed_types_fall_back_to_pandas_order():
    col = pd.Series([3, "b", 1, "a", 3], dtype=object)
    codes, levels, _ = factor_codes(col, col.to_numpy())
    assert [levels[c] for c in codes] == ["3", "b", "1", "a", "3"] and len(levels) == 4


def _cells_frame(rng, n=400):
    cat = pd.Categorical(rng.choice(list("abcd"), n), categories=list("dcbaz"))   # unused "z"
    return pd.DataFrame({
        "f": cat,
        "s": rng.choice(["x", "y", "w"], n).astype(object),
        "t": pd.Series(rng.choice(["p", "q"], n), dtype=object),
        "o": pd.Categorical(rng.choice(["lo", "mid", "hi"], n), categories=["lo", "mid", "hi"],
                            ordered=True),
        "x": rng.normal(size=n),
        "b": rng.random(n) < 0.5,
    })


@pytest.mark.parametrize("rhs,cells", [
    ("1 + f * s", True), ("0 + f:s:t", True), ("1 + f + s + t + f:t", True), ("o * s", True),
    ("1 + f", True), ("0 + s", True),
    ("1 + f * x", False), ("1 + C(s)", False), ("1 + f + b", False),
])
def test_design_by_cells_equals_formulaic_on_every_row(rhs, cells):
    """Factor-only designs are built on one row per cell and taken by cell: the same matrix
    and names as formulaic's on all rows; numeric, boolean and transformed terms take
    formulaic's path on all rows."""
    import formulaic
    from lmmfast.fixed import design, design_cells

    df = _cells_frame(np.random.default_rng(7))
    got = design_cells(formulaic.Formula("~ " + rhs), df)
    assert (got is not None) == cells
    if cells:
        assert len(got[1]) < len(df) and got[0].shape == (len(df),)
    X, names, _, cells_out = design(rhs, df, "the fixed effects")
    mm = formulaic.model_matrix("~ " + rhs, df, output="numpy")
    np.testing.assert_array_equal(X, np.asarray(mm))
    assert names == [lme4_name(c) for c in mm.model_spec.column_names]
    assert X.flags.c_contiguous
    assert (cells_out is not None) == cells
    if cells:       # [X y]'[X y] from the cells against numpy's product over every row
        from lmmfast.fixed import xy_gram
        y = np.random.default_rng(1).normal(size=len(df))
        Xy = np.column_stack([X, y])
        np.testing.assert_allclose(xy_gram(X, y, cells_out), Xy.T @ Xy, rtol=1e-12, atol=1e-9)


def test_design_cells_step_aside_for_many_cells_and_missing_values():
    import formulaic
    from lmmfast.fixed import design_cells

    rng = np.random.default_rng(3)
    many = pd.DataFrame({"g": [f"l{i}" for i in rng.permutation(100)]})      # 100 cells / 100 rows
    assert design_cells(formulaic.Formula("~ g"), many) is None
    na = pd.DataFrame({"g": pd.Categorical(["a", None, "b", "a"] * 10)})
    assert design_cells(formulaic.Formula("~ g"), na) is None


def test_fit_with_factor_interactions_matches_the_all_rows_design():
    """A whole fit over the cell path (factors only in the fixed part) equals the fit with
    the same X built by formulaic on every row (a numeric copy of the columns: same X,
    all-rows path)."""
    rng = np.random.default_rng(11)
    n = 600
    df = pd.DataFrame({"a": pd.Categorical(rng.choice(["u", "v", "w"], n)),
                       "c": rng.choice(["k", "m"], n).astype(object),
                       "g": rng.integers(0, 30, n)})
    df["y"] = rng.normal(size=n) + (df["a"] == "v") * 0.5 + rng.normal(size=30)[df["g"]]
    m = LinearMixedModel("y ~ a * c + (1 | g)", df)
    dummies = pd.get_dummies(df[["a", "c"]], drop_first=True, dtype=float)
    df2 = pd.concat([df, dummies], axis=1)
    m2 = LinearMixedModel("y ~ a_v + a_w + c_m + a_v:c_m + a_w:c_m + (1 | g)", df2)
    np.testing.assert_array_equal(m.X, m2.X)
    assert m.objective(np.array([0.7])) == pytest.approx(m2.objective(np.array([0.7])), rel=1e-12)


def test_nullable_string_columns_are_factors():
    """pandas' nullable "string" dtype is a factor like any text column (formulaic alone
    reads it as numbers and the model matrix failed to convert)."""
    rng = np.random.default_rng(5)
    n = 200
    df = pd.DataFrame({"t": rng.choice(["p", "q", "r"], n).astype(object), "g": rng.integers(0, 20, n),
                       "y": rng.normal(size=n)})
    df2 = df.assign(t=df["t"].astype("string"))
    m, m2 = LinearMixedModel("y ~ t + (1 | g)", df), LinearMixedModel("y ~ t + (1 | g)", df2)
    assert m2.xnames == m.xnames == ["(Intercept)", "tq", "tr"]
    np.testing.assert_array_equal(m2.X, m.X)
    assert pd.api.types.is_string_dtype(df2["t"]) and df2["t"].dtype == "string"   # untouched

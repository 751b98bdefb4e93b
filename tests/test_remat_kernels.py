"""The compiled random-effects bookkeeping kernels against their numpy oracles."""
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmmfast import _remat
from lmmfast.fixed import drop_unused_categories


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 300), st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_pair_codes_match_numpy_unique(n, ma, mb, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, ma, n)
    b = rng.integers(0, mb, n)
    got = _remat.pair_codes(a, ma, b, mb)
    ref = _remat.pair_codes_reference(a, ma, b, mb)
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)


def test_pair_codes_rejects_bad_codes():
    a = np.array([0, 1, 2], dtype=np.int64)
    with pytest.raises(ValueError, match="levels"):
        _remat.pair_codes(a, 2, a, 3)
    with pytest.raises(ValueError, match="levels"):
        _remat.pair_codes(a - 1, 3, a, 3)
    with pytest.raises(ValueError, match="length"):
        _remat.pair_codes(a, 3, a[:2].copy(), 3)


@pytest.mark.parametrize("ordered", [False, True])
def test_drop_unused_categories_matches_pandas(ordered):
    rng = np.random.default_rng(2)
    cats = [f"c{i}" for i in range(12)]
    vals = rng.choice(cats[2:9], 200).astype(object)
    vals[[3, 50]] = None
    col = pd.Series(pd.Categorical(vals, categories=cats, ordered=ordered), name="g")
    pd.testing.assert_series_equal(drop_unused_categories(col), col.cat.remove_unused_categories())
    full = col.cat.remove_unused_categories()
    assert drop_unused_categories(full) is full

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


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 20000), st.integers(1, 3), st.integers(1, 5000),
       st.sampled_from(["random", "ascending", "descending", "few", "organ"]),
       st.integers(0, 2**31 - 1))
def test_pair_codes_with_many_partners_per_level(n, ma, mb, pattern, seed):
    """Levels of a with hundreds to thousands of distinct partners in b (the per-level
    sort's quicksort, not only its insertion sort), arriving in sorted, reversed,
    organ-pipe or heavily repeated order."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, ma, n)
    b = {"random": rng.integers(0, mb, n),
         "ascending": np.sort(rng.integers(0, mb, n)),
         "descending": np.sort(rng.integers(0, mb, n))[::-1].copy(),
         "few": rng.integers(0, min(mb, 3), n),
         "organ": np.abs(np.arange(n) - n // 2) % mb}[pattern].astype(np.int64)
    got = _remat.pair_codes(a, ma, b, mb)
    ref = _remat.pair_codes_reference(a, ma, b, mb)
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)
        assert g.flags.c_contiguous and g.flags.owndata and g.dtype == np.int64


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


def _sparse_rows(rng, n, D, w):
    """Each row: w strictly ascending positions in [0, D) and their values."""
    R = np.sort(np.stack([rng.choice(D, w, replace=False) for _ in range(n)]), axis=1)
    return np.ascontiguousarray(R, dtype=np.int64), rng.normal(size=(n, w))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 120), st.integers(1, 12), st.integers(1, 3), st.integers(1, 15),
       st.integers(0, 2**31 - 1))
def test_dense_crossprod_matches_dense_products(n, m1, k1, D, seed):
    rng = np.random.default_rng(seed)
    w = int(rng.integers(0, D + 1))
    codes = rng.integers(0, m1, n).astype(np.int64)
    Z1 = rng.normal(size=(n, k1))
    R, V = _sparse_rows(rng, n, D, w)
    got = _remat.dense_crossprod(codes, m1, Z1, R, V, D)
    ref = _remat.dense_crossprod_reference(codes, m1, Z1, R, V, D)
    for name, g, r in zip(["A11", "A22", "indptr", "rows", "A21"], got, ref):
        assert g.shape == r.shape, name
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12, err_msg=name)


def test_dense_crossprod_rejects_bad_input():
    codes = np.array([0, 1, 1], dtype=np.int64)
    Z1 = np.ones((3, 1))
    R = np.array([[0, 2], [1, 2], [0, 1]], dtype=np.int64)
    V = np.ones((3, 2))
    _remat.dense_crossprod(codes, 2, Z1, R, V, 3)
    with pytest.raises(ValueError, match="codes1"):
        _remat.dense_crossprod(codes, 1, Z1, R, V, 3)
    with pytest.raises(ValueError, match="ascending"):
        _remat.dense_crossprod(codes, 2, Z1, R[:, ::-1].copy(), V, 3)
    with pytest.raises(ValueError, match="ascending"):
        _remat.dense_crossprod(codes, 2, Z1, R, V, 2)
    with pytest.raises(ValueError, match="one row per"):
        _remat.dense_crossprod(codes, 2, Z1, R[:2].copy(), V, 3)


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 30), st.integers(1, 10), st.integers(0, 2**31 - 1))
def test_panel_batches_match_numpy(m, D, seed):
    from lmmfast.blocks import panel_batches_reference

    rng = np.random.default_rng(seed)
    # runs of identical contiguous panels mixed with scattered ones
    pats, prev = [], None
    for _ in range(m):
        kind = rng.integers(0, 3)
        if kind == 0 and prev is not None:
            pat = prev
        elif kind == 1:
            a = int(rng.integers(0, D))
            pat = np.arange(a, int(rng.integers(a + 1, D + 1)))
        else:
            pat = np.sort(rng.choice(D, int(rng.integers(1, D + 1)), replace=False))
        pats.append(pat)
        prev = pat
    indptr = np.concatenate([[0], np.cumsum([len(p) for p in pats])]).astype(np.int64)
    rows = (np.concatenate(pats) if pats else np.zeros(0)).astype(np.int64)
    np.testing.assert_array_equal(_remat.panel_batches(indptr, rows),
                                  panel_batches_reference(indptr, rows))


def test_panel_batches_rejects_bad_pointers():
    with pytest.raises(ValueError, match="indptr"):
        _remat.panel_batches(np.array([0, 3, 2], dtype=np.int64), np.arange(2, dtype=np.int64))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 200), st.integers(1, 15), st.integers(0, 4), st.integers(0, 3),
       st.integers(0, 2**31 - 1))
def test_level_xy_sums_match_bincounts(n, m, p, k, seed):
    """k = 0 stands for Z = None (a lone intercept)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, m, n)
    X = rng.normal(size=(n, p))
    y = rng.normal(size=n)
    Z = None if k == 0 else rng.normal(size=(n, k))
    np.testing.assert_allclose(_remat.level_xy_sums(codes, m, Z, X, y),
                               _remat.level_xy_sums_reference(codes, m, Z, X, y),
                               rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 200), st.integers(1, 15), st.integers(0, 3), st.integers(0, 2**31 - 1))
def test_level_refit_matches_numpy(n, m, k, seed):
    """_remat.level_refit (δ_j = A_j⁻¹ Z_j'r, r −= Z δ) against bincounts and einsum; k = 0
    stands for Z = None (a lone intercept)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, m, n)
    kk = max(k, 1)
    Z = None if k == 0 else rng.normal(size=(n, k))
    B = rng.normal(size=(m, kk, kk))
    Ainv = np.ascontiguousarray(B @ B.transpose(0, 2, 1))
    r = rng.normal(size=n)
    r_ref = r.copy()
    d_ref = _remat.level_refit_reference(codes, m, Z, r_ref, Ainv)
    d = _remat.level_refit(codes, m, Z, r, Ainv)
    np.testing.assert_allclose(d, d_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r, r_ref, rtol=1e-12, atol=1e-12)


def test_level_refit_rejects_bad_input():
    codes = np.array([0, 1, 2], dtype=np.int64)
    r = np.ones(3)
    with pytest.raises(ValueError, match="codes"):
        _remat.level_refit(codes, 2, None, r, np.ones((2, 1, 1)))
    with pytest.raises(ValueError, match="length"):
        _remat.level_refit(codes, 3, None, r[:2], np.ones((3, 1, 1)))
    with pytest.raises(ValueError, match="Ainv"):
        _remat.level_refit(codes, 3, np.ones((3, 2)), r, np.ones((3, 1, 1)))
    with pytest.raises(ValueError, match="Z"):
        _remat.level_refit(codes, 3, np.ones((2, 1)), r, np.ones((3, 1, 1)))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 300), st.integers(1, 15), st.integers(1, 12), st.integers(0, 4),
       st.integers(0, 3), st.integers(0, 2**31 - 1))
def test_level_xy_sums_through_cells_match_bincounts(n, m, nc, p, k, seed):
    """The sums through X's cells (counts per level and cell, times the cells' matrix),
    also where there are too many (level, cell) pairs and the direct pass runs."""
    from lmmfast.blocks import level_xy_sums_cells

    rng = np.random.default_rng(seed)
    codes = rng.integers(0, m, n)
    cell = rng.integers(0, nc, n)
    Xc = rng.normal(size=(nc, p))
    X = np.ascontiguousarray(Xc[cell]) if n else np.zeros((0, p))
    y = rng.normal(size=n)
    Z = None if k == 0 else np.ascontiguousarray(rng.normal(size=(n, k)))
    want = _remat.level_xy_sums_reference(codes, m, Z, X, y)
    np.testing.assert_allclose(level_xy_sums_cells(codes, m, Z, X, y, (cell, Xc)), want,
                               rtol=1e-12, atol=1e-12)


def test_level_xy_sums_rejects_bad_input():
    codes = np.array([0, 1, 2], dtype=np.int64)
    X, y = np.ones((3, 2)), np.ones(3)
    with pytest.raises(ValueError, match="codes"):
        _remat.level_xy_sums(codes, 2, None, X, y)
    with pytest.raises(ValueError, match="rows"):
        _remat.level_xy_sums(codes, 3, None, X[:2], y)
    with pytest.raises(ValueError, match="Z"):
        _remat.level_xy_sums(codes, 3, np.ones((2, 1)), X, y)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 30), st.integers(1, 40), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_panel_dot_matches_numpy(m, D, k, seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, min(D, 6) + 1, m)            # empty panels included
    indptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    rows = np.concatenate([np.sort(rng.choice(D, s, replace=False)) for s in sizes]
                          + [np.zeros(0)]).astype(np.int64)
    P = rng.normal(size=(len(rows), k))
    w = rng.normal(size=D)
    np.testing.assert_allclose(_remat.panel_dot(indptr, rows, P, w),
                               _remat.panel_dot_reference(indptr, rows, P, w), rtol=1e-13, atol=1e-13)


def test_panel_dot_rejects_bad_input():
    indptr = np.array([0, 2], dtype=np.int64)
    rows = np.array([0, 3], dtype=np.int64)
    P = np.ones((2, 1))
    with pytest.raises(ValueError, match="rows"):
        _remat.panel_dot(indptr, rows, P, np.ones(3))
    with pytest.raises(ValueError, match="indptr"):
        _remat.panel_dot(np.array([0, 1], dtype=np.int64), rows, P, np.ones(4))
    with pytest.raises(ValueError, match="one row"):
        _remat.panel_dot(indptr, rows, np.ones((3, 1)), np.ones(4))
    # panel_scatter shares these checks and adds B's shape
    with pytest.raises(ValueError, match="rows"):
        _remat.panel_scatter(indptr, rows, P, np.ones((1, 1)), 3)
    with pytest.raises(ValueError, match="B must"):
        _remat.panel_scatter(indptr, rows, P, np.ones((2, 1)), 4)



def _panels(rng, m, D, k):
    sizes = rng.integers(0, min(D, 6) + 1, m)            # empty panels included
    indptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    rows = np.concatenate([np.sort(rng.choice(D, s, replace=False)) for s in sizes]
                          + [np.zeros(0)]).astype(np.int64)
    return indptr, rows, rng.normal(size=(len(rows), k))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 30), st.integers(1, 40), st.integers(1, 4), st.integers(0, 5),
       st.integers(0, 2**31 - 1))
def test_panel_products_of_many_vectors_match_numpy(m, D, k, K, seed):
    """panel_dot_many / panel_scatter_many against their oracles and against the
    one-vector kernels column by column (K = 0 included)."""
    rng = np.random.default_rng(seed)
    indptr, rows, P = _panels(rng, m, D, k)
    W = rng.normal(size=(D, K))
    B = rng.normal(size=(m, k, K))
    dot = _remat.panel_dot_many(indptr, rows, P, W)
    sc = _remat.panel_scatter_many(indptr, rows, P, B, D)
    assert dot.shape == (m, k, K) and sc.shape == (D, K)
    np.testing.assert_allclose(dot, _remat.panel_dot_many_reference(indptr, rows, P, W),
                               rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(sc, _remat.panel_scatter_many_reference(indptr, rows, P, B, D),
                               rtol=1e-13, atol=1e-13)
    for u in range(K):
        np.testing.assert_allclose(dot[:, :, u], _remat.panel_dot(indptr, rows, P, W[:, u].copy()),
                                   rtol=1e-13, atol=1e-13)


def test_panel_products_of_many_vectors_reject_bad_input():
    indptr = np.array([0, 2], dtype=np.int64)
    rows = np.array([0, 3], dtype=np.int64)
    P = np.ones((2, 1))
    with pytest.raises(ValueError, match="rows"):
        _remat.panel_dot_many(indptr, rows, P, np.ones((3, 2)))
    with pytest.raises(ValueError, match="B must"):
        _remat.panel_scatter_many(indptr, rows, P, np.ones((1, 2, 2)), 4)

@settings(max_examples=60, deadline=None)
@given(st.integers(0, 30), st.integers(1, 40), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_panel_scatter_matches_numpy(m, D, k, seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, min(D, 6) + 1, m)
    indptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    rows = np.concatenate([np.sort(rng.choice(D, s, replace=False)) for s in sizes]
                          + [np.zeros(0)]).astype(np.int64)
    P = rng.normal(size=(len(rows), k))
    B = rng.normal(size=(m, k))
    np.testing.assert_allclose(_remat.panel_scatter(indptr, rows, P, B, D),
                               _remat.panel_scatter_reference(indptr, rows, P, B, D),
                               rtol=1e-13, atol=1e-13)
    # the transpose of panel_dot: <panel_dot(w), B> = <w, panel_scatter(B)>
    w = rng.normal(size=D)
    assert np.sum(_remat.panel_dot(indptr, rows, P, w) * B) == pytest.approx(
        w @ _remat.panel_scatter(indptr, rows, P, B, D), rel=1e-12, abs=1e-12)

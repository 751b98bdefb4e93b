"""The model frame and the fixed-effects side: response y and model matrix X.

lme4's ``lFormula`` first builds a model frame holding only the variables the formula
uses, drops incomplete rows (``na.omit``), then builds X with treatment contrasts and
drops aliased columns (``check.rankX = "message+drop.cols"``).  The same steps here;
formulaic builds X.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy.linalg.blas import ddot, dgemv, dsyrk
from scipy.linalg.lapack import dpotrf

from .errors import DataError, FormulaError, MissingColumnError, RankDeficiencyWarning
from .remat import lme4_name

__all__ = ["ModelFrame", "model_frame", "fixed_matrix", "drop_aliased", "xy_gram"]

# Text columns from this length are hashed once by the model frame (pandas.factorize's
# fixed cost, ~60 µs, is more than a short column's whole coding by a dict).
_FACTORIZE_MIN = 10_000


def _simple_terms(rhs: str):
    """``(intercept, [names])`` when ``rhs`` is only '1'/'0' and plain column names, else None.

    Such right-hand sides (``1 + Days``, ``0 + x``) are built directly, skipping formulaic's
    parser; anything else (factors, transforms, interactions) goes through formulaic."""
    intercept, names = True, []
    for t in rhs.split("+"):
        t = t.strip()
        if t == "1":
            continue
        if t == "0":
            intercept = False
            continue
        if not t.isidentifier() or t in names:
            return None
        names.append(t)
    return intercept, names


class SimpleSpec:
    """Model-matrix spec for a simple right-hand side (intercept and numeric columns)."""

    def __init__(self, intercept: bool, names: list):
        self.intercept, self.names = intercept, names

    def column_names(self) -> list:
        return (["(Intercept)"] if self.intercept else []) + list(self.names)

    def get_model_matrix(self, frame, na_action=None) -> np.ndarray:
        n = len(frame)
        X = np.empty((n, int(self.intercept) + len(self.names)))
        if self.intercept:
            X[:, 0] = 1.0
        get = frame.array_of if isinstance(frame, ColumnFrame) else (lambda c: frame[c].to_numpy())
        for j, c in enumerate(self.names, start=int(self.intercept)):
            X[:, j] = get(c)
        return X


def _plain_numeric(dtype) -> bool:
    """A numeric, non-boolean dtype: the column enters X as it is."""
    if isinstance(dtype, np.dtype):
        return dtype.kind in "iuf"
    return pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)


def design(rhs: str, frame: pd.DataFrame, what: str):
    """Model matrix of ``~ rhs`` on ``frame``: (X, lme4 column names, spec, cells).

    ``cells`` is ``(cell of each row, the cells' model matrix)`` when X was built by
    :func:`design_cells` (X = that matrix's rows taken by cell), else None.

    A simple right-hand side over numeric columns is built directly; everything else
    by formulaic (treatment contrasts, levels in sorted order, R's column order)."""
    simple = _simple_terms(rhs)
    if simple is not None and all(_plain_numeric(dtype_of(frame, c)) for c in simple[1]):
        spec = SimpleSpec(*simple)
        return spec.get_model_matrix(frame), spec.column_names(), spec, None
    import formulaic

    try:
        formula = formulaic.Formula("~ " + rhs)
        cells = design_cells(formula, frame)
        # numpy output: no pandas frame of the model matrix to convert (on 73k × 28 that
        # costs as much as building the matrix)
        mm = formulaic.model_matrix(formula, as_pandas(frame) if cells is None else cells[1],
                                    na_action="ignore", output="numpy")
    except Exception as e:  # formulaic raises several exception types
        raise FormulaError(f"cannot build the model matrix of {what}: {e}") from e
    X = np.asarray(mm, dtype=np.float64)
    names = [lme4_name(c) for c in mm.model_spec.column_names]
    if cells is None:
        return np.ascontiguousarray(X), names, mm.model_spec, None
    Xc = np.ascontiguousarray(X)
    return np.take(Xc, cells[0], axis=0), names, mm.model_spec, (cells[0], Xc)


def design_cells(formula, frame, most: float = 0.25):
    """The design's cells: ``(cell of each row, a frame with one row per cell)``, or None.

    When every variable of ``formula`` (a parsed formulaic Formula) enters by name and is
    a factor (pandas Categorical or strings), a row of the model matrix depends only on
    the row's combination of levels, its cell; formulaic then builds the matrix of the
    cells and X is that matrix's rows taken by cell (InstEval's ``service * dept``: 28
    cells for 73k rows).  The cells' frame keeps each column's dtype (a Categorical's
    categories, strings' set of values), so formulaic finds the same levels and columns.
    None, and formulaic builds X from all rows, when a variable is numeric or boolean, a
    term calls a function (transforms such as ``scale(x)`` learn from all rows), a value
    is missing, or there are more than ``most`` × n cells.
    """
    names = []
    for term in formula:
        for fac in term.factors:
            how = getattr(getattr(fac, "eval_method", None), "value", None)
            if how == "literal":
                continue
            if how != "lookup":
                return None
            if fac.expr not in names:
                names.append(fac.expr)
    n = len(frame)
    if not names or n == 0:
        return None
    codes, sizes, decode = [], [], []
    for c in names:
        if c not in frame:
            return None
        col = frame[c]
        dt = col.dtype
        if isinstance(dt, pd.CategoricalDtype):
            cc, k = col.array.codes, len(dt.categories)
            decode.append(lambda u, dt=dt: pd.Categorical.from_codes(u, dtype=dt))
        elif dt == object or isinstance(dt, pd.StringDtype):
            # a model frame's numpy values: pandas hashes an object array about three
            # times faster than a Series of its "str" dtype (8 -> 3 ms on 73k rows)
            if isinstance(frame, ColumnFrame):
                fc = frame.codes_of(c)
                cc, uniq = fc if fc is not None else pd.factorize(frame.array_of(c))
            else:
                cc, uniq = pd.factorize(col)
            k = len(uniq)
            decode.append(lambda u, uniq=uniq, dt=dt: pd.array(np.asarray(uniq, dtype=object)[u],
                                                                dtype=dt))
        else:
            return None
        if k == 0 or cc.min() < 0:
            return None
        codes.append(cc)
        sizes.append(k)
    key = np.zeros(n, dtype=np.int64)
    total = 1
    for cc, k in zip(codes, sizes):          # mixed radix: the first variable varies slowest
        if total * k > 2 ** 62:
            return None
        key *= k
        key += cc
        total *= k
    if total <= 4 * n + 1024:
        occupied = np.flatnonzero(np.bincount(key, minlength=total))
        if len(occupied) > most * n:
            return None
        remap = np.empty(total, dtype=np.intp)
        remap[occupied] = np.arange(len(occupied))
        cell = remap[key]
    else:
        occupied, cell = np.unique(key, return_inverse=True)
        if len(occupied) > most * n:
            return None
    cols, rest = {}, occupied
    for c, k, dec in reversed(list(zip(names, sizes, decode))):
        cols[c] = dec(rest % k)
        rest = rest // k
    return cell, pd.DataFrame({c: cols[c] for c in names})


def _required(formula: str, what: str) -> set:
    """The data columns a formula (``resp ~ rhs`` or ``~ rhs``) needs."""
    lhs, _, rhs = formula.rpartition("~")
    lhs = lhs.strip()
    simple = _simple_terms(rhs)
    if simple is not None and (not lhs or lhs.isidentifier()):
        return set(simple[1]) | ({lhs} if lhs else set())
    import formulaic

    try:
        return set(formulaic.Formula(formula).required_variables)
    except Exception as e:  # formulaic raises several exception types on bad syntax
        raise FormulaError(f"cannot parse {what} {formula!r}: {e}") from e


class ColumnFrame:
    """The used columns of the model frame, as arrays or Series, built column by column on
    demand.

    A pandas DataFrame of the used columns costs ~0.3 ms to build even for 180 rows, most
    of a small model's set-up, and even one Series ~18 µs; most models only need a few
    numeric columns as arrays (:meth:`array_of`, :meth:`dtype_of`).  Series come from the
    user's frame restricted to complete rows (a new Series: the user's
    frame is never touched), categoricals with unused categories dropped (lme4's
    ``drop.unused.levels``).  :meth:`to_pandas` materialises a DataFrame for formulaic.
    """

    def __init__(self, data, used: list, complete, n: int, arrays=None, dtypes=None,
                 factorized=None, categoricals=None):
        self._data, self.columns = data, list(used)
        self._factorized = dict(factorized or {})   # long text columns: (codes, uniques)
        self._categoricals = dict(categoricals or {})   # full-length pandas Categoricals
        self._mask = complete                  # None: every row is complete
        self._cache = {}
        self._arrays = dict(arrays or {})      # full-length numpy values already fetched
        self._dtypes = dict(dtypes or {})      # the columns' dtypes in ``data``
        self._values = {}
        self._df = None
        self._n = n

    def dtype_of(self, name):
        """The column's dtype, without building its Series where it is the data's own:
        all but categoricals (unused categories dropped) and pandas' nullable strings
        (taken as Python strings, see :meth:`__getitem__`)."""
        dt = self._dtypes.get(name)
        if dt is None or isinstance(dt, pd.CategoricalDtype) or _na_strings(dt):
            return self[name].dtype
        return dt

    def array_of(self, name) -> np.ndarray:
        """The column's values as a numpy array over the complete rows (cached).

        Non-categorical columns only need this, not a Series: the model frame already
        converted them once to find missing values."""
        v = self._values.get(name)
        if v is None:
            a = self._arrays.get(name)
            if a is None:
                v = self[name].to_numpy()
            else:
                v = a if self._mask is None else a[self._mask]
            self._values[name] = v
        return v

    def categorical_of(self, name):
        """A categorical column over the complete rows as (int64 codes, categories), its
        unused categories dropped (as :meth:`__getitem__`'s Series), read from the
        Categorical itself (a Series costs tens of µs: on a small model a tenth of the
        whole fit per grouping factor); None for other columns."""
        arr = self._categoricals.get(name)
        if arr is None:
            return None
        codes = np.asarray(arr.codes)
        if self._mask is not None:
            codes = codes[self._mask]
        codes, cats = _used_categories(codes, arr.categories)
        return codes.astype(np.int64), cats

    def codes_of(self, name):
        """``pandas.factorize`` of a long text column, as the model frame found its missing
        values with it: (codes over the rows, uniques in order of appearance); None for
        other columns, or when rows were dropped (uniques might then be unused)."""
        if self._mask is not None:
            return None
        return self._factorized.get(name)

    def __len__(self):
        return self._n

    def __contains__(self, name):
        return name in self.columns

    def __getitem__(self, name) -> pd.Series:
        col = self._cache.get(name)
        if col is None:
            if name not in self.columns:
                raise KeyError(name)
            col = self._data[name]
            if self._mask is not None:
                col = col[self._mask]
            col = col.reset_index(drop=True) if not _plain_index(col.index) else col
            if isinstance(col.dtype, pd.CategoricalDtype):
                col = drop_unused_categories(col)
            elif _na_strings(col.dtype):
                # formulaic takes pandas' nullable "string" columns for numbers (and X then
                # fails to convert); as Python strings they are a factor like any text
                col = col.astype(object)
            self._cache[name] = col
        return col

    def to_pandas(self) -> pd.DataFrame:
        """The used columns as a DataFrame (for formulaic)."""
        if self._df is None:
            self._df = pd.DataFrame({c: self[c] for c in self.columns})
        return self._df


def _python_strings(dtype) -> bool:
    """pandas' text dtype held as Python objects (``"str"``/``"string"``, python storage)."""
    return isinstance(dtype, pd.StringDtype) and dtype.storage == "python"


def _na_strings(dtype) -> bool:
    """pandas' nullable ``"string"`` dtype (missing value pd.NA)."""
    return isinstance(dtype, pd.StringDtype) and dtype.na_value is pd.NA


def drop_unused_categories(col: pd.Series) -> pd.Series:
    """``col.cat.remove_unused_categories()`` in O(n) (pandas sorts all n codes to find
    the used ones: seconds on ten million rows); the column itself when all are used."""
    arr = col.array                      # the Categorical itself: no Series per access
    codes, cats = _used_categories(arr.codes, arr.categories)
    if len(cats) == len(arr.categories):
        return col
    cat = pd.Categorical.from_codes(codes, categories=cats, ordered=arr.ordered)
    return pd.Series(cat, index=col.index, name=col.name)


def _used_categories(codes, cats):
    """(codes, categories) with the categories no code uses dropped and the codes
    renumbered (-1, missing, kept): one bincount, O(n); the inputs themselves when all
    are used."""
    used = np.bincount(codes[codes >= 0], minlength=len(cats)) > 0
    if used.all():
        return codes, cats
    remap = np.cumsum(used) - 1
    return np.where(codes >= 0, remap[np.maximum(codes, 0)], -1), cats[used]


def _plain_index(idx) -> bool:
    return isinstance(idx, pd.RangeIndex) and idx.start == 0 and idx.step == 1


def _column_array(data: pd.DataFrame, loc: int):
    """The values of ``data``'s column at position ``loc``: a numpy array, or pandas' own
    array (Categorical, nullable, strings).  Read through pandas' internal accessor where
    it has one (~1 µs; a Series costs ~18 µs to build, a fifth of a small model's frame),
    else through a Series.  numpy values come as a read-only view: they are the user's
    memory, which the model never writes."""
    get = getattr(data, "_get_column_array", None)
    arr = None
    if get is not None:
        try:
            arr = get(loc)
        except Exception:           # an accessor that changed meaning: the public way
            arr = None
        if not isinstance(arr, (np.ndarray, pd.api.extensions.ExtensionArray)):
            arr = None
    if arr is None:
        col = data.iloc[:, loc]
        arr = col.to_numpy() if isinstance(col.dtype, np.dtype) else col.array
    if isinstance(arr, np.ndarray):
        arr = arr.view()
        arr.flags.writeable = False
    return arr


def dtype_of(frame, name):
    """A column's dtype in a model frame (:meth:`ColumnFrame.dtype_of`) or a DataFrame."""
    return frame.dtype_of(name) if isinstance(frame, ColumnFrame) else frame[name].dtype


def as_pandas(frame) -> pd.DataFrame:
    return frame.to_pandas() if isinstance(frame, ColumnFrame) else frame


class ModelFrame:
    """The rows and columns a model uses, after dropping incomplete rows.

    Attributes
    ----------
    frame : ColumnFrame
        The used columns, complete rows only (the user's frame is never touched).
    n_dropped : int
        Rows dropped because a used column was missing.
    """

    def __init__(self, frame: pd.DataFrame, n_dropped: int, row_index):
        self.frame = frame
        self.n_dropped = n_dropped
        self.row_index = row_index


def model_frame(mf, data) -> ModelFrame:
    """Select the columns formula ``mf`` uses and drop rows missing any of them."""
    if not isinstance(data, pd.DataFrame):
        try:
            data = pd.DataFrame(data)
        except Exception as e:
            raise DataError(f"data must be a pandas DataFrame (or convertible to one): {e}") from e
    cols = data.columns
    used = []

    def need(names, where):
        for v in sorted(names):
            if v not in cols:
                raise MissingColumnError(
                    f"column {v!r} used in {where} is not in the data; available columns: "
                    f"{', '.join(map(str, cols[:20]))}{' ...' if len(cols) > 20 else ''}")
            if v not in used:
                used.append(v)

    need(_required(f"{mf.response} ~ 1", "the response"), f"the response {mf.response!r}")
    need(_required("~ " + mf.fixed, "the fixed effects"), f"the fixed effects ({mf.fixed})")
    for bar in mf.bars:
        need(_required("~ " + bar.lhs, f"random-effects term {bar}"), f"random-effects term {bar}")
        need(set(bar.factors), f"the grouping factor of random-effects term {bar}")
    missing = []                                # per column with missing values: the mask
    arrays = {}                                 # numpy values, converted once
    categoricals = {}                           # pandas Categoricals, as the data holds them
    dtypes = {}
    factorized = {}                             # long text columns: codes, uniques
    long = len(data) >= _FACTORIZE_MIN
    for c in used:
        loc = cols.get_loc(c)
        if not isinstance(loc, (int, np.integer)):      # a label the data holds more than once
            raise DataError(f"the data has {int(np.count_nonzero(cols == c))} columns named "
                            f"{c!r}; the model cannot tell which to use: rename or drop the "
                            "duplicates")
        raw = _column_array(data, int(loc))
        dt = dtypes[c] = raw.dtype
        if isinstance(dt, np.dtype) and dt.kind == "c":
            raise DataError(f"column {c!r} holds complex numbers; a mixed model's variables "
                            "are real: use its real part, modulus or angle as a column")
        if isinstance(dt, pd.CategoricalDtype):                     # missing: code -1
            categoricals[c] = raw
            miss = raw.codes < 0
        else:
            arr = arrays[c] = raw if isinstance(raw, np.ndarray) else raw.to_numpy()
            if arr.dtype.kind in "iub":                             # never missing
                continue
            fc = None
            if long and arr.dtype.kind == "O" and (dt.kind == "O" if isinstance(dt, np.dtype)
                                                   else _python_strings(dt)):
                # text: hashing finds the missing values (code -1) as fast as a scan, and
                # its codes then serve the grouping factors and the design's cells
                try:
                    fc = factorized[c] = pd.factorize(arr)
                except TypeError:               # unhashable values: the scan below
                    pass
            if fc is not None:
                miss = fc[0] < 0
            elif not isinstance(dt, np.dtype):  # pandas' own arrays (strings, nullable):
                miss = np.asarray(raw.isna(), dtype=bool)           # their mask, no object scan
            else:
                miss = np.isnan(arr) if arr.dtype.kind in "fc" else pd.isna(arr)
        if miss.any():
            missing.append(miss)
    n = len(data)
    complete = None                             # the rows kept; None: all of them
    if missing:
        complete = ~np.logical_or.reduce(missing)
        n = int(complete.sum())
    n_drop = len(data) - n
    if n == 0:
        raise DataError(f"no rows left after dropping the {n_drop} rows with a missing value in "
                        f"the model's columns ({', '.join(used)})")
    row_index = data.index[complete] if n_drop else data.index
    frame = ColumnFrame(data, used, complete, n, arrays, dtypes, factorized, categoricals)
    return ModelFrame(frame, n_drop, row_index)


def response(mf, frame: pd.DataFrame) -> np.ndarray:
    """The response vector; it must be numeric and not constant."""
    name = mf.response
    if name in frame:
        dt = dtype_of(frame, name)
        if not ((isinstance(dt, np.dtype) and dt.kind in "iufb")
                or pd.api.types.is_numeric_dtype(dt) or pd.api.types.is_bool_dtype(dt)):
            raise DataError(f"response {name!r} must be numeric, but its dtype is {dt}; "
                            "convert it (e.g. pd.to_numeric) before fitting")
        y = (np.asarray(frame.array_of(name), dtype=np.float64) if isinstance(frame, ColumnFrame)
             and isinstance(dt, np.dtype) else frame[name].to_numpy(dtype=np.float64))
    else:
        import formulaic

        try:
            mm = formulaic.model_matrix(f"{name} ~ 1", as_pandas(frame), na_action="ignore")
        except Exception as e:
            raise FormulaError(f"cannot evaluate the response {name!r}: {e}") from e
        if mm.lhs.shape[1] != 1:
            raise DataError(f"response {name!r} must be one numeric column, "
                            f"it gives {mm.lhs.shape[1]} columns {list(mm.lhs.columns)}")
        y = np.asarray(mm.lhs, dtype=np.float64).ravel()
    lo, hi = (y.min(), y.max()) if len(y) else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):         # NaN or ±inf anywhere
        raise DataError(f"response {name!r} has infinite values")
    if len(y) > 1 and lo == hi:
        raise DataError(f"response {name!r} is constant ({float(y[0])!r} in all {len(y)} rows); "
                        "there is no variance to model")
    return y


def fixed_matrix(mf, frame: pd.DataFrame):
    """The fixed-effects model matrix X, its lme4-style column names, its spec and its
    cells (:func:`design`)."""
    X, names, spec, cells = design(mf.fixed, frame, f"the fixed effects ({mf.fixed})")
    if not np.all(np.isfinite(X) if cells is None else np.isfinite(cells[1])):
        bad = [nm for nm, ok in zip(names, np.isfinite(X).all(axis=0)) if not ok]
        raise DataError(f"fixed-effects columns {bad} have infinite or undefined values "
                        "(e.g. log of zero)")
    return X, names, spec, cells


def xy_gram(X: np.ndarray, y: np.ndarray, cells=None) -> np.ndarray:
    """[X y]'[X y]: X'X, X'y and y'y in one symmetric (p + 1)² array.

    Formed once per model (the rank check, the dense block's X/y part and the moment
    start all read it) by scipy's BLAS, the one the compiled kernel calls: numpy and
    scipy wheels each bundle an OpenBLAS, whose threads spin for a while after a threaded
    call, and a threaded call into the other library meanwhile runs against them (on two
    cores, 73k × 28 took up to 0.1 s instead of 5 ms right after a factorization).
    With X's ``cells`` (:func:`design`: row i of X is row ``cell[i]`` of ``Xc``),
    X'X = Xc' diag(count) Xc and X'y = Xc' (y summed by cell): one pass over y."""
    n, p = X.shape
    if cells is not None and p:
        cell, Xc = cells
        m = Xc.shape[0]
        count = np.bincount(cell, minlength=m).astype(float)
        ysum = np.bincount(cell, weights=y, minlength=m)
        G = np.empty((p + 1, p + 1))
        G[:p, :p] = Xc.T @ (count[:, None] * Xc)
        G[:p, p] = G[p, :p] = Xc.T @ ysum
        G[p, p] = ddot(y, y)
        return G
    if n * (p + 1) ** 2 <= 2 ** 18:            # below OpenBLAS's threading: numpy is quicker
        Xy = np.empty((n, p + 1))
        Xy[:, :p] = X
        Xy[:, p] = y
        return Xy.T @ Xy
    G = np.empty((p + 1, p + 1))
    Xt = X.T if X.flags.c_contiguous else np.ascontiguousarray(X).T   # X' column-major: no copy
    if p:
        XtX = dsyrk(1.0, Xt, lower=1)          # lower triangle; the upper one is 0
        G[:p, :p] = XtX + np.tril(XtX, -1).T if p > 1 else XtX
        G[:p, p] = G[p, :p] = dgemv(1.0, Xt, y)
    G[p, p] = ddot(y, y)
    return G


def _clearly_full_rank(X: np.ndarray, margin: float = 1e-4, G=None) -> bool:
    """True when X has full column rank by a wide margin (a cheap test before the QR).

    The Cholesky factor of X'X is the R of X's unpivoted QR (up to signs), so
    R_jj / ||x_j|| comes from it too; squaring loses half the digits, which is why this
    only answers for ratios far above :func:`drop_aliased`'s tolerance and leaves the
    doubtful cases to the QR."""
    n, p = X.shape
    if n < p:
        return False
    G = X.T @ X if G is None else G
    norms2 = G.diagonal()
    if not (norms2.min() > 0):
        return False
    if p == 1:                      # one nonzero column
        return True
    L, info = dpotrf(G, lower=1)    # LAPACK directly: numpy's wrapper costs ~10 µs more
    return info == 0 and bool((L.diagonal() ** 2 > margin ** 2 * norms2).all())


def drop_aliased(X: np.ndarray, names: list, tol: float = 1e-7, XtX=None):
    """Drop columns of X that are linear combinations of earlier ones (lme4's rule).

    Column j is kept when the norm of its residual on the columns before it exceeds
    ``tol`` times its own norm: the diagonal of the R factor of an unpivoted QR, which is
    what LINPACK's limited-pivoting ``dqrdc2`` (used by lme4) tests.  ``XtX``: X'X when
    already formed (:func:`xy_gram`).
    """
    if X.shape[1] == 0:
        return X, names, []
    if _clearly_full_rank(X, G=XtX):
        return X, names, []
    import scipy.linalg as sla

    R = sla.qr(X, mode="r", check_finite=False)[0]
    norms = np.linalg.norm(X, axis=0)
    diag = np.abs(np.diag(R[: X.shape[1], : X.shape[1]])) if R.shape[0] >= X.shape[1] else None
    if diag is None:  # fewer rows than columns: pad
        diag = np.zeros(X.shape[1])
        d = np.abs(np.diag(R))
        diag[: len(d)] = d
    keep = (diag > tol * norms) & (norms > 0)
    dropped = [nm for nm, k in zip(names, keep) if not k]
    if dropped:
        warnings.warn(f"fixed-effect model matrix is rank deficient so dropping {len(dropped)} "
                      f"column{'s' if len(dropped) > 1 else ''} / coefficient"
                      f"{'s' if len(dropped) > 1 else ''}: {', '.join(dropped)}",
                      RankDeficiencyWarning, stacklevel=4)
        X = np.ascontiguousarray(X[:, keep])
        names = [nm for nm, k in zip(names, keep) if k]
    return X, names, dropped

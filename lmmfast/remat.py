"""Random-effects terms: level codes, the term's model matrix, and how θ maps into Λ.

One :class:`ReTerm` is one expanded bar ``(lhs | g)``.  With ``k`` columns in the lhs
model matrix ``X_i`` (n × k) and ``m`` levels of ``g``, the term contributes ``q = m k``
columns to Z, ordered level-major as in lme4 (level 1's k columns, then level 2's, ...):
``Z[r, code[r] * k + c] = X_i[r, c]``.  Its relative covariance factor is the lower
triangular k × k matrix ``T`` filled column-major from θ (lme4's ``Lind``), and
``Λ_i = I_m ⊗ T``.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from ._remat import pair_codes
from .errors import DataError, FormulaError, MissingColumnError

__all__ = ["ReTerm", "lme4_name", "factor_codes", "grouping_factor", "order_terms"]

_LEVEL = re.compile(r"\[(?:T\.)?(.*?)\]")
_SORT_MAX = 50_000      # integer grouping columns up to this length are coded by sorting


def lme4_name(name: str) -> str:
    """Translate a formulaic column name into lme4's (``recipe[T.B]:x`` -> ``recipeB:x``)."""
    if name == "Intercept":
        return "(Intercept)"
    return ":".join(_LEVEL.sub(r"\1", part) for part in name.split(":"))


def factor_codes(col, values=None, factorized=None):
    """Codes 0..m-1, level labels and level values of a column used as a factor.

    Levels are sorted as R's ``factor()`` does under ``sort(method = "radix")``: strings
    in byte order, numbers numerically, a pandas Categorical in its category order
    (unused categories dropped).  ``values``: the column's numpy values when already at
    hand, a model frame's (no missing values: short object columns are then coded by a
    dict); ignored for a Categorical; ``col`` may then be None (the values are not a
    Categorical's).  ``factorized``: ``pandas.factorize`` of ``values`` (codes, uniques),
    done already (a model frame's long text columns): only the levels are then sorted.
    """
    if col is not None and isinstance(col.dtype, pd.CategoricalDtype):
        from .fixed import drop_unused_categories

        arr = drop_unused_categories(col).array
        cats = arr.categories
        return arr.codes.astype(np.int64), [str(c) for c in cats.tolist()], cats
    complete = values is not None          # a model frame's values: no missing ones
    if values is None:
        values = col.to_numpy()
    short = len(values) <= _SORT_MAX
    codes = uniques = None
    if factorized is not None:
        codes, uniques = _sorted_levels(values, *factorized)
    elif short and values.dtype.kind in "iub":
        # a short integer column (never missing): one sort gives the sorted levels and
        # the codes, with less fixed cost than hashing
        uniques, codes = np.unique(values, return_inverse=True)
    elif short and complete and values.dtype.kind == "O":
        codes, uniques = _code_objects(values.tolist())
    if codes is None:
        # Hash, then sort the (few) distinct values: cheaper than pandas' sort=True path,
        # which has ~0.15 ms of overhead on small columns
        codes, uniques = _sorted_levels(values, *pd.factorize(values))
    plain = isinstance(uniques, np.ndarray) and uniques.dtype.kind in "iufbOU"
    labels = list(map(str, uniques.tolist() if plain else uniques))
    return codes.astype(np.int64, copy=False).reshape(-1), labels, uniques


def _sorted_levels(values, codes, uniques):
    """Codes and uniques of ``pandas.factorize(values)`` renumbered so that the levels are
    sorted; values of mixed types that do not compare go to pandas' safe sort."""
    try:
        order = np.argsort(uniques, kind="stable")
    except TypeError:
        return pd.factorize(values, sort=True)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank[codes], uniques[order]


def _code_objects(values: list):
    """(codes, sorted levels) of a short list of objects, none missing, by a dict (a few
    C-level passes; pandas' factorize costs ~60 µs of fixed overhead on a small column);
    (None, None) when the values do not sort (mixed types: pandas' safe sort decides)."""
    try:
        levels = sorted(set(values))
    except TypeError:
        return None, None
    look = dict(zip(levels, range(len(levels))))
    codes = np.fromiter(map(look.__getitem__, values), dtype=np.int64, count=len(values))
    uniques = np.empty(len(levels), dtype=object)
    uniques[:] = levels
    return codes, uniques


def grouping_factor(frame, factors: tuple, term: str):
    """Codes and labels of the grouping factor ``a:b:...`` (lme4's lex-ordered interaction).

    Returns
    -------
    codes : (n,) int64 array
    labels : list of str
    encoder : GroupEncoder
        Maps new data to these codes by value (for prediction).
    """
    codes = labels = None
    values, steps = [], []
    for f in factors:
        if f not in frame:
            raise MissingColumnError(f"grouping factor {f!r} of random-effects term {term} "
                                     f"is not a column of the data")
        array_of = getattr(frame, "array_of", None)     # a model frame (unused levels dropped)
        try:
            got = frame.categorical_of(f) if array_of is not None else None
            if got is not None:                         # a Categorical's codes: no Series
                c, idx = got
                lab = [str(x) for x in idx.tolist()]
            elif array_of is None:
                c, lab, idx = factor_codes(frame[f])
            else:                                       # its values: no Series needed
                c, lab, idx = factor_codes(None, array_of(f), factorized=frame.codes_of(f))
        except TypeError as e:                          # lists, dicts, sets ...
            raise DataError(f"grouping factor {f!r} of random-effects term {term} holds values "
                            f"that cannot serve as levels ({e}); convert the column to strings "
                            "or numbers") from e
        values.append(idx)
        if len(factors) == 1:
            return c, lab, GroupEncoder(tuple(factors), values, steps)
        if codes is None:
            codes, labels = c, np.asarray(lab, dtype=object)
            continue
        pa, pb, codes = pair_codes(codes, len(labels), c, len(lab))
        uniq = pa * len(lab) + pb
        steps.append(uniq)
        labels = np.array([f"{labels[u // len(lab)]}:{lab[u % len(lab)]}" for u in uniq], dtype=object)
        codes = codes.astype(np.int64, copy=False)
    return codes, [str(x) for x in labels], GroupEncoder(tuple(factors), values, steps)


class GroupEncoder:
    """Maps rows of new data to a fitted grouping factor's codes (-1: level not seen)."""

    def __init__(self, factors, values, steps):
        self.factors, self._values, self.steps = factors, values, steps

    @property
    def values(self) -> list:
        """The level values of each factor, as pandas Indexes (built on first use)."""
        self._values = [v if isinstance(v, pd.Index) else pd.Index(v) for v in self._values]
        return self._values

    def codes(self, frame: pd.DataFrame) -> np.ndarray:
        codes = None
        for f, idx, k in zip(self.factors, self.values, range(len(self.factors))):
            c = np.asarray(idx.get_indexer(pd.Series(frame[f]).to_numpy()), dtype=np.int64)
            if codes is None:
                codes = c
                continue
            ok = (codes >= 0) & (c >= 0)
            key = codes * len(idx) + c
            uniq = self.steps[k - 1]
            pos = np.clip(np.searchsorted(uniq, key), 0, len(uniq) - 1)
            codes = np.where(ok & (uniq[pos] == key), pos, -1)
        return codes


class ReTerm:
    """One random-effects term ``(lhs | group)``.

    Attributes
    ----------
    group : str
        Grouping factor name (``"b:a"`` for an interaction).
    lhs : str
        Right-hand side of the term's model formula.
    cnames : list of str
        Column names of the term's model matrix, lme4 style (``"(Intercept)"``, ``"Days"``).
    codes : (n,) int64 array
        Level code of each observation.
    levels : list of str
        Level labels, in code order.
    X : (n, k) float array
        The term's model matrix.
    """

    def __init__(self, bar, frame: pd.DataFrame):
        from .fixed import SimpleSpec, design

        self.bar = bar
        self.group = bar.group
        self.lhs = bar.lhs
        self.codes, self.levels, self.encoder = grouping_factor(frame, bar.factors, str(bar))
        if bar.lhs.strip() == "1":
            # (1 | g): a read-only broadcast column of ones, no n-long array (80 MB on ten
            # million rows); nothing writes it, and the kernels see the intercept as
            # column(0) being None
            self.spec = SimpleSpec(True, [])
            self.cnames = self.spec.column_names()
            self.X = np.broadcast_to(np.ones((1, 1)), (len(self.codes), 1))
        else:
            self.X, self.cnames, self.spec, _ = design(bar.lhs, frame,
                                                       f"random-effects term {bar}")
        if self.X.shape[1] == 0:
            raise FormulaError(f"random-effects term {bar} has no columns")

    def column(self, a: int):
        """Column a of the term's model matrix; None for the intercept (all ones), which
        :func:`weighted_counts` then never multiplies."""
        return None if self.cnames[a] == "(Intercept)" else self.X[:, a]

    @property
    def intercept_only(self) -> bool:
        """A lone intercept, ``(1 | g)``: one column of ones, never multiplied by."""
        return self.k == 1 and self.column(0) is None

    def level_gram(self) -> np.ndarray:
        """Per level j, the k × k cross-product X_j'X_j of the term's columns over its rows
        (the diagonal blocks of Z_i'Z_i), as an (m, k, k) array."""
        k, m = self.k, self.nlevels
        G = np.empty((m, k, k))
        for a in range(k):
            for b in range(a + 1):
                v = weighted_counts(self.codes, m, self.column(a), self.column(b))
                G[:, a, b] = v
                G[:, b, a] = v
        return G

    def pairs(self, other: "ReTerm"):
        """(levels of self, levels of other, each row's pair) of the distinct level pairs
        that share a row, sorted (:func:`lmmfast._remat.pair_codes`).  Kept until
        :meth:`forget_pairs`: the method choice and the cross-products both need them."""
        cache = self.__dict__.setdefault("_pairs", {})
        key = id(other)
        if key not in cache:
            cache[key] = pair_codes(self.codes, self.nlevels, other.codes, other.nlevels)
        return cache[key]

    def forget_pairs(self):
        self.__dict__.pop("_pairs", None)

    @property
    def k(self) -> int:
        return self.X.shape[1]

    @property
    def nlevels(self) -> int:
        return len(self.levels)

    @property
    def q(self) -> int:
        return self.k * self.nlevels

    @property
    def ntheta(self) -> int:
        return self.k * (self.k + 1) // 2

    def theta_lower(self) -> np.ndarray:
        """Lower bounds of this term's θ: 0 on the diagonal of T, -inf below it."""
        k = self.k
        return np.array([0.0 if i == j else -np.inf for j in range(k) for i in range(j, k)])

    def theta_start(self) -> np.ndarray:
        k = self.k
        return np.array([1.0 if i == j else 0.0 for j in range(k) for i in range(j, k)])

    def theta_names(self) -> list:
        k, c = self.k, self.cnames
        return [f"{self.group}.{c[i]}" if i == j else f"{self.group}.{c[i]}.{c[j]}"
                for j in range(k) for i in range(j, k)]

    def T(self, theta: np.ndarray) -> np.ndarray:
        """The k × k lower-triangular relative covariance factor from this term's θ."""
        k = self.k
        T = np.zeros((k, k))
        rows, cols = _tril_colmajor(k)
        T[rows, cols] = theta
        return T

    def Z(self):
        """This term's block of Z as a scipy CSC matrix (n × q), never dense."""
        import scipy.sparse as sp

        n, k = self.X.shape
        rows = np.repeat(np.arange(n), k)
        cols = (self.codes[:, None] * k + np.arange(k)[None, :]).ravel()
        return sp.csc_matrix((self.X.ravel(), (rows, cols)), shape=(n, self.q))

    def __repr__(self):
        return f"ReTerm({self.bar}, levels={self.nlevels}, k={self.k})"


def weighted_counts(codes, m: int, u, v):
    """Σ of u·v over the rows of each code, a length-m vector; None stands for a column of
    ones (an intercept), so no n-long product or array of ones is formed, and with both
    None it is a plain count."""
    if u is None:
        u, v = v, None
    if u is None:
        return np.bincount(codes, minlength=m).astype(float)
    return np.bincount(codes, weights=u if v is None else u * v, minlength=m)


def _tril_colmajor(k: int):
    """Row and column indices of a k × k lower triangle in column-major order (lme4's θ)."""
    rows = [i for j in range(k) for i in range(j, k)]
    cols = [j for j in range(k) for i in range(j, k)]
    return np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64)


def order_terms(terms: list) -> list:
    """Order terms as lme4's ``mkReTrms``: by decreasing number of levels.

    lme4 reorders only when some later term has more levels than an earlier one, and then
    uses ``rev(order(nl))``, which puts later terms first among ties.
    """
    nl = [t.nlevels for t in terms]
    if not any(b > a for a, b in zip(nl, nl[1:])):
        return list(terms)
    asc = sorted(range(len(terms)), key=lambda i: nl[i])  # stable, like R's order()
    return [terms[i] for i in reversed(asc)]


def check_term_sizes(terms: list, n: int) -> None:
    """lme4's identifiability checks on grouping factors (check.nlev.gtr.1, nobs.vs.nlev/nRE)."""
    for t in terms:
        if t.nlevels < 2:
            raise DataError(f"grouping factor {t.group!r} of term {t.bar} has {t.nlevels} level; "
                            "a random effect needs at least 2 levels")
        if t.nlevels >= n:
            raise DataError(f"grouping factor {t.group!r} of term {t.bar} has {t.nlevels} levels for "
                            f"{n} observations: its variance cannot be told apart from the residual "
                            "variance (lme4 refuses this model too); drop the term")
        if t.q >= n:
            raise DataError(f"term {t.bar} has {t.q} random effects for {n} observations: the "
                            "random-effects parameters and the residual variance are unidentifiable")

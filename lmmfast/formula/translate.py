"""Translate statsmodels-style ``mixedlm`` arguments into one lme4 formula.

``mixedlm(formula, data, groups=, re_formula=, vc_formula=)`` describes random effects in
up to four places: lme4 bars in ``formula``, the ``groups`` factor with its string
``re_formula``, a dict ``re_formula`` (factor -> random-effects formula) and ``vc_formula``
(factor -> covariance structure, or statsmodels' variance-component formulas).  Here they
are collected per grouping factor as *blocks* -- one block is one lme4 bar ``(lhs | g)``,
whose columns have a full covariance matrix -- and written out as a single lme4 formula
that :class:`lmmfast.LinearMixedModel` fits.  The rules are documented in
:func:`lmmfast.formula.api.mixedlm`.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..bars import parse_formula
from ..errors import DataError, FormulaError

__all__ = ["SamePartitionWarning", "Block", "Translation", "translate", "same_partitions",
           "check_same_partitions", "STRUCTURES"]

#: Covariance-structure names accepted as ``vc_formula`` values, and what they mean.
STRUCTURES = {
    "diag": "diag", "diagonal": "diag", "independent": "diag",
    "full": "full", "unstructured": "full",
}

_SENTINEL = "lmmfast_no_bar_sentinel"
_CALL = re.compile(r"^C\(\s*([^,()]+?)\s*(?:,.*)?\)$", re.S)


class SamePartitionWarning(UserWarning):
    """Two grouping factors split the rows into the same groups.

    Their variances cannot be told apart: only their sum is identified.  The fit is still
    the maximum of the (RE)ML criterion, as lme4's, but how the total is shared between
    the two factors is arbitrary.
    """


# ---------------------------------------------------------------------------- parsing
def _split_top(s: str, seps: str):
    """Split ``s`` at depth-0 characters in ``seps``; returns (sign_char, piece) pairs."""
    out, depth, cur, sign = [], 0, [], "+"
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if depth == 0 and ch in seps:
            out.append((sign, "".join(cur).strip()))
            cur, sign = [], ch
            continue
        cur.append(ch)
    out.append((sign, "".join(cur).strip()))
    return out


def _norm(term: str) -> str:
    return re.sub(r"\s+", "", term)


@dataclass
class Block:
    """One lme4 bar ``(lhs | group)``: an optional intercept plus model terms."""

    intercept: bool
    terms: list = field(default_factory=list)

    @classmethod
    def parse(cls, rhs: str, what: str) -> "Block":
        """Parse a random-effects right-hand side such as ``"1 + age"``, ``"~age"``, ``"0 + x"``."""
        rhs = rhs.strip()
        if rhs.startswith("~"):
            rhs = rhs[1:].strip()
        if not rhs:
            raise FormulaError(f"{what} is empty; write '1' for a random intercept")
        if "~" in rhs:
            raise FormulaError(f"{what} {rhs!r} must be a one-sided formula such as '~ 1 + x'")
        intercept, terms = True, []
        for sign, t in _split_top(rhs, "+-"):
            if not t:
                if sign == "-":
                    raise FormulaError(f"{what} {rhs!r}: dangling '-'")
                continue
            if t in ("0", "-1") or (t == "1" and sign == "-"):
                intercept = False
            elif t == "1":
                intercept = True
            elif sign == "-":
                raise FormulaError(f"{what} {rhs!r}: only '- 1' can be subtracted")
            elif _norm(t) not in [_norm(x) for x in terms]:
                terms.append(t)
        if not intercept and not terms:
            raise FormulaError(f"{what} {rhs!r} has no columns")
        return cls(intercept, terms)

    def columns(self) -> list:
        """Normalised column keys: ``"1"`` for the intercept, then the terms."""
        return (["1"] if self.intercept else []) + [_norm(t) for t in self.terms]

    def lhs(self) -> str:
        if self.intercept:
            return " + ".join(["1"] + self.terms)
        return " + ".join(["0"] + self.terms)

    def copy(self) -> "Block":
        return Block(self.intercept, list(self.terms))


def _group_key(name: str, what: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise FormulaError(f"{what}: grouping factor names must be non-empty strings, got {name!r}")
    if "/" in name:
        raise FormulaError(f"{what}: grouping factor {name!r} uses '/'; give each level of the "
                           "nesting its own entry (e.g. 'school' and 'school:classroom')")
    return ":".join(p.strip() for p in name.split(":"))


# ---------------------------------------------------------------------------- translation
@dataclass
class Translation:
    """The outcome of :func:`translate`.

    Attributes
    ----------
    formula : str
        The lme4 formula equivalent to the arguments.
    data : DataFrame
        The data to fit: the user's frame, or a copy with the ``groups`` column added.
    groups : str or None
        Name of the ``groups`` column in ``data``.
    blocks : dict
        Grouping factor -> list of :class:`Block`, in formula order.
    """

    formula: str
    data: pd.DataFrame
    groups: str | None
    blocks: dict
    response: str
    fixed: str


def _groups_column(groups, data: pd.DataFrame):
    """Resolve ``groups=`` to a column name, adding it to a copy of ``data`` when needed."""
    if groups is None:
        return None, data
    if isinstance(groups, str):
        if groups not in data.columns:
            raise FormulaError(f"groups={groups!r} is not a column of the data; available: "
                               f"{', '.join(map(str, data.columns[:20]))}")
        return groups, data
    values = groups.to_numpy() if isinstance(groups, (pd.Series, pd.Index)) else np.asarray(groups)
    if values.ndim != 1 or len(values) != len(data):
        raise DataError(f"groups must be a column name or a 1-d array of length {len(data)} "
                        f"(one label per row of data), got shape {np.shape(values)}")
    name = getattr(groups, "name", None)
    name = str(name) if name is not None and str(name).strip() else "groups"
    if not name.isidentifier():
        name = "groups"
    if name in data.columns:
        same = pd.Series(data[name].to_numpy(), dtype=object).equals(pd.Series(values, dtype=object))
        if same:
            return name, data
        base, i = f"{name}_groups", 1
        name = base
        while name in data.columns:
            i += 1
            name = f"{base}{i}"
    out = data.copy()
    out[name] = values
    return name, out


def _union(blocks: list, new: Block) -> list:
    """One term per factor whose design is the union: see :func:`mixedlm`."""
    if not blocks:
        return [new.copy()]
    have = {c for b in blocks for c in b.columns()}
    if len(blocks) == 1:
        b = blocks[0].copy()
        b.intercept = b.intercept or new.intercept
        b.terms += [t for t in new.terms if _norm(t) not in have]
        return [b]
    out = [b.copy() for b in blocks]           # several uncorrelated terms (e.g. from ||)
    if new.intercept and "1" not in have:
        out.insert(0, Block(True, []))
    out += [Block(False, [t]) for t in new.terms if _norm(t) not in have]
    return out


def _restructure(blocks: list, structure: str) -> list:
    intercept = any(b.intercept for b in blocks)
    terms, seen = [], set()
    for b in blocks:
        for t in b.terms:
            if _norm(t) not in seen:
                seen.add(_norm(t))
                terms.append(t)
    if structure == "full":
        return [Block(intercept, terms)]
    return ([Block(True, [])] if intercept else []) + [Block(False, [t]) for t in terms]


def _is_structure_name(value: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value.strip()))


def _vc_components(key, value: str, gname: str) -> tuple:
    """A statsmodels variance-component formula -> (grouping factor, Block)."""
    what = f"vc_formula[{key!r}]"
    v = value.strip()
    if v.startswith("~"):
        v = v[1:].strip()
    parts = [(s, t) for s, t in _split_top(v, "+-") if t]
    has_zero = any(t in ("0",) or (t == "1" and s == "-") for s, t in parts)
    terms = [t for s, t in parts if t not in ("0", "1")]
    if not has_zero:
        raise FormulaError(
            f"{what} = {value!r} has an intercept; statsmodels' variance-component formulas are "
            "written without one, e.g. '0 + C(classroom)'")
    if len(terms) != 1:
        raise FormulaError(
            f"{what} = {value!r}: a variance component must be a single term such as "
            "'0 + C(classroom)' (one variance shared by all its columns); give each term its own "
            "key, or use a bar such as (1 + x | classroom) for correlated effects")
    factors, others = [], []
    for _, piece in _split_top(terms[0], ":"):
        m = _CALL.match(piece)
        (factors if m else others).append(m.group(1).strip() if m else piece)
    group = ":".join([gname] + factors)
    if others:
        return group, Block(False, [":".join(others)])
    return group, Block(True, [])


def translate(formula: str, data, groups=None, re_formula=None, vc_formula=None) -> Translation:
    """Collect the random effects of a ``mixedlm`` call into one lme4 formula.

    Parameters
    ----------
    formula, data, groups, re_formula, vc_formula
        As :func:`lmmfast.formula.api.mixedlm`.

    Returns
    -------
    Translation

    Raises
    ------
    FormulaError
        Unknown covariance-structure names, a string ``re_formula`` or a variance-component
        formula without ``groups``, malformed random-effects formulas, no random effects.
    """
    if not isinstance(data, pd.DataFrame):
        try:
            data = pd.DataFrame(data)
        except Exception as e:
            raise DataError(f"data must be a pandas DataFrame (or convertible to one): {e}") from e
    if not isinstance(formula, str):
        raise FormulaError(f"formula must be a string, got {type(formula).__name__}")
    parsed = parse_formula(f"{formula} + (1 | {_SENTINEL})")
    blocks: dict = {}
    for bar in parsed.bars:
        if bar.factors == (_SENTINEL,):
            continue
        blocks.setdefault(bar.group, []).append(Block.parse(bar.lhs, f"random-effects term {bar}"))

    gname, data = _groups_column(groups, data)
    if isinstance(re_formula, str) or (re_formula is None and gname is not None):
        if gname is None:
            raise FormulaError(
                "a string re_formula gives the random effects of the groups= factor, but no groups= "
                "was given; pass groups=, or a dict such as {'classroom': '~1 + age'}")
        rhs = re_formula if isinstance(re_formula, str) else "1"
        blocks[gname] = _union(blocks.get(gname, []), Block.parse(rhs, "re_formula"))
    elif isinstance(re_formula, dict):
        if gname is not None:
            blocks[gname] = _union(blocks.get(gname, []), Block(True, []))
        for key, rhs in re_formula.items():
            g = _group_key(key, "re_formula")
            if not isinstance(rhs, str):
                raise FormulaError(f"re_formula[{key!r}] must be a formula string such as '~1 + x'")
            blocks[g] = _union(blocks.get(g, []), Block.parse(rhs, f"re_formula[{key!r}]"))
    elif re_formula is not None:
        raise FormulaError("re_formula must be a string (random effects of groups=) or a dict "
                           f"mapping grouping factors to formulas, got {type(re_formula).__name__}")

    vc_blocks = []
    if vc_formula is not None:
        if not isinstance(vc_formula, dict):
            raise FormulaError("vc_formula must be a dict: grouping factor -> covariance structure "
                               f"('diag', 'full') or variance-component formula, got "
                               f"{type(vc_formula).__name__}")
        for key, value in vc_formula.items():
            if not isinstance(value, str):
                raise FormulaError(f"vc_formula[{key!r}] must be a string")
            if _is_structure_name(value):
                s = value.strip().lower()
                if s not in STRUCTURES:
                    known = ", ".join(repr(k) for k in STRUCTURES)
                    raise FormulaError(
                        f"vc_formula[{key!r}] = {value!r} is not a known covariance structure; "
                        f"known structures: {known}. (A variance-component formula needs "
                        "groups= and reads like '0 + C(classroom)'.)")
                g = _group_key(key, "vc_formula")
                blocks[g] = _restructure(blocks.get(g, [Block(True, [])]), STRUCTURES[s])
            else:
                if gname is None:
                    raise FormulaError(
                        f"vc_formula[{key!r}] = {value!r} is a statsmodels variance-component "
                        "formula, which defines effects nested in groups=; pass groups=, or "
                        f"write a bar such as (1 | {key})")
                vc_blocks.append(_vc_components(key, value, gname))
    for g, b in vc_blocks:                         # independent of everything else
        blocks.setdefault(g, []).append(b)

    if not blocks:
        raise FormulaError(
            f"formula {formula!r} has no random effects: add a bar such as (1 | group), or pass "
            "groups= (statsmodels style)")
    bars = [f"({b.lhs()} | {g})" for g, bl in blocks.items() for b in bl]
    lme4 = f"{parsed.response} ~ {parsed.fixed} + " + " + ".join(bars)
    return Translation(formula=lme4, data=data, groups=gname, blocks=blocks,
                       response=parsed.response, fixed=parsed.fixed)


# ---------------------------------------------------------------------------- partitions
def same_partitions(terms) -> list:
    """Pairs of distinct grouping factors that split the rows into the same groups.

    Parameters
    ----------
    terms : list of lmmfast.remat.ReTerm
        ``LinearMixedModel.terms``.

    Returns
    -------
    list of (str, str)
        Two factors define the same partition iff the number of distinct (a, b) level
        pairs equals both the number of levels of a and that of b.
    """
    codes = {}
    for t in terms:
        codes.setdefault(t.group, (np.asarray(t.codes, dtype=np.int64), t.nlevels))
    names = list(codes)
    out = []
    for i, a in enumerate(names):
        ca, na = codes[a]
        for b in names[i + 1:]:
            cb, nb = codes[b]
            if na != nb:
                continue
            npairs = len(np.unique(ca * nb + cb))
            if npairs == na == nb:
                out.append((a, b))
    return out


def check_same_partitions(terms, stacklevel: int = 3) -> list:
    """Warn (:class:`SamePartitionWarning`) for each pair found by :func:`same_partitions`."""
    pairs = same_partitions(terms)
    for a, b in pairs:
        warnings.warn(
            f"grouping factors {a!r} and {b!r} define the same partition of the rows (every "
            f"level of one is exactly one level of the other): their variances cannot be told "
            f"apart, only their sum is estimated; drop one of the two terms", SamePartitionWarning,
            stacklevel=stacklevel)
    return pairs

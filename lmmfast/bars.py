"""lme4's random-effects bars: find ``(expr | group)`` terms in a formula and expand them.

A mixed-model formula is a fixed-effects formula plus parenthesised *bar* terms
``(lhs | g)`` (correlated effects) and ``(lhs || g)`` (uncorrelated effects).  formulaic
reads ``|`` differently, so the bars are pulled out here before it sees the formula, and
expanded exactly as lme4's ``findbars``/``expandDoubleVerts``/``expandSlash`` do:

* ``(1 + x || g)``  ->  ``(1 | g) + (0 + x | g)`` (one term per term label: ``x*z`` gives
  ``x``, ``z`` and ``x:z``)
* ``(1 | a/b)``     ->  ``(1 | b:a) + (1 | a)``,   ``a/b/c`` -> ``c:b:a``, ``b:a``, ``a``
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .errors import FormulaError

__all__ = ["Bar", "MixedFormula", "parse_formula"]


@dataclass(frozen=True)
class Bar:
    """One expanded random-effects term ``(lhs | group)``.

    Attributes
    ----------
    lhs : str
        The term's model formula right-hand side, e.g. ``"1 + Days"`` or ``"0 + x"``.
    factors : tuple of str
        Column names whose interaction is the grouping factor (``("b", "a")`` for ``b:a``).
    """

    lhs: str
    factors: tuple

    @property
    def group(self) -> str:
        """The grouping factor's name as lme4 prints it (``"b:a"``)."""
        return ":".join(self.factors)

    def __str__(self):
        return f"({self.lhs} | {self.group})"


@dataclass(frozen=True)
class MixedFormula:
    """A parsed mixed-model formula: response, fixed part and expanded bars."""

    response: str
    fixed: str
    bars: tuple
    text: str

    def fixed_formula(self) -> str:
        return f"{self.response} ~ {self.fixed}"


def _split_top(s: str, sep: str) -> list:
    """Split ``s`` on ``sep`` at parenthesis depth 0."""
    out, depth, cur, i = [], 0, [], 0
    while i < len(s):
        ch = s[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if depth == 0 and s.startswith(sep, i):
            out.append("".join(cur))
            cur = []
            i += len(sep)
            continue
        cur.append(ch)
        i += 1
    out.append("".join(cur))
    return out


def _check_balanced(s: str, formula: str) -> None:
    depth = 0
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise FormulaError(f"unbalanced parentheses in formula {formula!r}: "
                                   "a ')' has no matching '('")
    if depth != 0:
        raise FormulaError(f"unbalanced parentheses in formula {formula!r}: "
                           f"{depth} '(' not closed")


def _matching(s: str, i: int) -> int:
    depth = 0
    for j in range(i, len(s)):
        if s[j] == "(":
            depth += 1
        elif s[j] == ")":
            depth -= 1
            if depth == 0:
                return j
    return -1  # pragma: no cover  (balanced already checked)


def _bar_split(inner: str):
    """Return (lhs, group, double) if ``inner`` has a top-level bar, else None."""
    depth = 0
    for i, ch in enumerate(inner):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "|" and depth == 0:
            double = inner.startswith("||", i)
            rhs = inner[i + (2 if double else 1):]
            if "|" in rhs:
                raise FormulaError(f"random-effects term ({inner}) has more than one bar")
            return inner[:i], rhs, double
    return None


def _expand_group(group: str, term: str) -> list:
    """``a/b/c`` -> [("c","b","a"), ("b","a"), ("a",)] ; ``a:b`` -> [("a","b")]."""
    parts = [p.strip() for p in _split_top(group, "/")]
    if any(not p for p in parts):
        raise FormulaError(f"random-effects term {term}: empty grouping factor in {group.strip()!r}")
    nested = []
    for p in parts:
        facs = tuple(f.strip() for f in _split_top(p, ":"))
        if any(not f for f in facs):
            raise FormulaError(f"random-effects term {term}: empty factor in {p!r}")
        nested.append(facs)
    out = []
    for depth in range(len(nested), 0, -1):
        facs = ()
        for level in reversed(nested[:depth]):
            facs += level
        out.append(facs)
    return out


def _expand_double(lhs: str, term: str) -> list:
    """lme4's expandDoubleVerts: one term per term label of the left-hand side.

    ``1 + x*z`` -> ["1", "0 + x", "0 + z", "0 + x:z"] (labels in formula order: by degree,
    as R's ``terms()``, which formulaic follows)."""
    import formulaic

    try:
        labels = [str(t) for t in formulaic.Formula(lhs)]
    except Exception as e:  # formulaic raises several exception types
        raise FormulaError(f"cannot parse the left-hand side of random-effects term {term}: {e}") from e
    return (["1"] if "1" in labels else []) + [f"0 + {t}" for t in labels if t != "1"]


def parse_formula(formula: str) -> MixedFormula:
    """Parse an lme4 formula into response, fixed part and expanded bar terms.

    Parameters
    ----------
    formula : str
        e.g. ``"Reaction ~ Days + (Days | Subject)"``.

    Raises
    ------
    FormulaError
        For a missing ``~``, unbalanced parentheses, an empty side of a bar, or no
        random-effects term at all.
    """
    if not isinstance(formula, str):
        raise FormulaError(f"formula must be a string, got {type(formula).__name__}")
    return _parse(formula)


@lru_cache(maxsize=256)
def _parse(formula: str) -> MixedFormula:
    """:func:`parse_formula` of a string, cached (the result is immutable)."""
    _check_balanced(formula, formula)
    sides = _split_top(formula, "~")
    if len(sides) != 2 or not sides[0].strip():
        raise FormulaError(f"formula {formula!r} must have the form 'response ~ terms'")
    response, rhs = sides[0].strip(), sides[1]
    if not rhs.strip():
        raise FormulaError(f"formula {formula!r} has nothing to the right of '~'")

    bars, pieces, i = [], [], 0
    while i < len(rhs):
        ch = rhs[i]
        if ch == "(":
            prev = rhs[:i].rstrip()[-1:] if rhs[:i].strip() else ""
            j = _matching(rhs, i)
            inner = rhs[i + 1:j]
            split = None if (prev and (prev.isalnum() or prev in "_.)]")) else _bar_split(inner)
            if split is not None:
                lhs, grp, double = split
                term = f"({inner.strip()})"
                if not lhs.strip():
                    raise FormulaError(f"random-effects term {term} has nothing before the bar; "
                                       "write (1 | g) for a random intercept")
                if not grp.strip():
                    raise FormulaError(f"random-effects term {term} has no grouping factor after the bar")
                groups = _expand_group(grp, term)
                # lme4 expands || over the whole formula before it expands /
                lhss = _expand_double(lhs, term) if double else [lhs.strip()]
                for lh in lhss:
                    for facs in groups:
                        bars.append(Bar(lh, facs))
                pieces.append(" ")
                i = j + 1
                continue
        pieces.append(ch)
        i += 1

    fixed_terms = [t.strip() for t in _split_top("".join(pieces), "+")]
    # Re-join, dropping the empty slots the bars left behind (a '-' term stays attached).
    fixed = " + ".join(t for t in fixed_terms if t)
    fixed = fixed.replace("+ -", "-")
    if not fixed:
        fixed = "1"
    if not bars:
        raise FormulaError(f"formula {formula!r} has no random-effects term: add one such as "
                           "(1 | group), or use an ordinary linear model")
    return MixedFormula(response=response, fixed=fixed, bars=tuple(bars), text=formula)

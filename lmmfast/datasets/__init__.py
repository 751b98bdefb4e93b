"""Classic mixed-model datasets shipped with lmmfast (as exported from R's lme4).

>>> from lmmfast import datasets
>>> datasets.load("sleepstudy").shape
(180, 3)
"""
from __future__ import annotations

from importlib import resources

import pandas as pd

__all__ = ["load", "names"]

# grouping / categorical columns are read as strings so that levels sort as in lme4
_FACTORS = {
    "sleepstudy": ["Subject"],
    "dyestuff": ["Batch"],
    "penicillin": ["plate", "sample"],
    "pastes": ["batch", "cask", "sample"],
    "insteval": ["s", "d", "studage", "lectage", "service", "dept"],
    "students": ["sex", "classroom", "school", "province", "student_id"],
}
_FILES = {"insteval": "insteval.csv.gz", "students": "students.csv.gz"}


def names() -> list:
    """Names of the shipped datasets."""
    return sorted(_FACTORS)


def load(name: str) -> pd.DataFrame:
    """Load a shipped dataset as a new DataFrame (factor columns as strings).

    Parameters
    ----------
    name : str
        One of :func:`names`: sleepstudy, dyestuff, penicillin, pastes, insteval, students.
    """
    key = name.lower()
    if key not in _FACTORS:
        raise KeyError(f"unknown dataset {name!r}; available: {', '.join(names())}")
    fname = _FILES.get(key, f"{key}.csv")
    with resources.as_file(resources.files(__name__) / fname) as path:
        return pd.read_csv(path, dtype={c: str for c in _FACTORS[key]})

"""The rung's data as handed to the workers: one raw little-endian file per column (float64
for numbers, int32 codes plus levels for factors), written once per rung by the parent and
read by every worker, Python (``numpy.fromfile``) or R (``readBin``), without parsing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

def write_data(df: pd.DataFrame, workdir: Path, stem: str) -> tuple:
    """Write ``df`` as one raw little-endian file per column; return ``(columns, nrow)``.

    Numeric columns become float64 (``.f64``); factor columns (strings or pandas Categoricals)
    become int32 0-based codes (``.i32``) plus their levels: a Categorical's in category order,
    strings' sorted by code point (R's ``sort(method = "radix")``, the order lmmfast uses).
    Python reads them with ``numpy.fromfile``, R with ``readBin``: no parsing, so even the
    10-million-row rung loads in seconds on both sides (a CSV would be ~400 MB and take R's
    ``read.csv`` minutes).
    """
    columns = []
    for name in df.columns:
        col = df[name]
        entry = {"name": name}
        if isinstance(col.dtype, pd.CategoricalDtype):
            codes = col.cat.codes.to_numpy()
            levels = [str(c) for c in col.cat.categories]
        elif pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
            codes, levels = None, None
        else:
            codes, uniques = pd.factorize(col, sort=True)
            levels = [str(u) for u in uniques]
        if codes is None:
            entry.update(kind="double", file=str(workdir / f"{stem}.{name}.f64"))
            col.to_numpy(dtype="<f8").tofile(entry["file"])
        else:
            if (codes < 0).any():
                raise ValueError(f"column {name!r} has missing values; the ladder has none")
            entry.update(kind="factor", file=str(workdir / f"{stem}.{name}.i32"), levels=levels)
            np.asarray(codes, dtype="<i4").tofile(entry["file"])
        columns.append(entry)
    return columns, len(df)


def read_data(spec: dict) -> pd.DataFrame:
    """Read the rung's column files (factor columns as pandas Categoricals, as R's factors)."""
    out = {}
    n = spec["nrow"]
    for col in spec["columns"]:
        if col["kind"] == "factor":
            codes = np.fromfile(col["file"], dtype="<i4", count=n)
            out[col["name"]] = pd.Categorical.from_codes(codes, categories=pd.Index(col["levels"]))
        else:
            out[col["name"]] = np.fromfile(col["file"], dtype="<f8", count=n)
    return pd.DataFrame(out)


def factor_names(spec: dict) -> list:
    return [c["name"] for c in spec["columns"] if c["kind"] == "factor"]

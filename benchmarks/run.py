#!/usr/bin/env python
"""The benchmark ladder: lmmfast against lme4 and the Python peers, in one run, one table.

Usage::

    python benchmarks/run.py [--rungs NAME|NUMBER ...] [--quick] [--repeat N] [--budget SEC]
                             [--timeout SEC] [--tools TOOL ...] [--no-r] [--no-peers]
                             [--peers-python PATH] [--blas-threads N] [--out FILE.json]
                             [--readme] [--list]

Every tool fits every rung in a fresh child process of its own -- ``python benchmarks/run.py
--worker TOOL SPEC`` for the Python tools (lmmfast with this interpreter, the peers with the
interpreter of the separate peer environment, ``--peers-python``), ``Rscript`` for lme4 -- so
that the peak memory reported is that process's own high-water mark (``VmHWM`` in
``/proc/self/status``).  Each child reads the rung's data from the column files this script
wrote once per rung, prepares what its library needs, prints ``BENCH_START``, fits once to
warm up, then repeats the fit until ``--repeat`` fits are timed or ``--budget`` seconds are
spent, and prints one JSON line that this script parses.  A child still fitting ``--timeout``
seconds after ``BENCH_START`` is killed and shown as ``timeout (> N s)``.

A rung is one entry of :data:`RUNGS`; add a :class:`Rung` there to benchmark another model
(simulated data: give it a ``load`` function that builds the data frame from a fixed seed).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

MARKER = "BENCH_JSON:"
START = "BENCH_START"      # a worker has its data ready and starts fitting (the timeout clock)
FITTED = "BENCH_FITTED"    # a worker has finished fitting (the clock stops)
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_PEERS_PYTHON = HERE / ".venv-peers" / "bin" / "python"

PEERS = ["statsmodels", "mixedlm", "lme-python", "gpboost"]   # the Python peers
TOOLS = ["lmmfast", "lme4"] + PEERS                           # table order
PEER_MODULES = {"statsmodels": "statsmodels", "mixedlm": "mixedlm",
                "lme-python": "lme_python", "gpboost": "gpboost"}


# ---------------------------------------------------------------------------------- rungs
@dataclass(frozen=True)
class GpboostSpec:
    """How gpboost fits a rung: a ``GPModel`` with crossed random intercepts.

    Attributes
    ----------
    fixed : str
        Right-hand side of the fixed part, expanded by patsy into the ``X`` given to ``fit``.
    groups : tuple of str
        The grouping columns, one random intercept each (``group_data``).
    """

    fixed: str
    groups: tuple


@dataclass(frozen=True)
class Rung:
    """One model to benchmark.

    Attributes
    ----------
    number : int
        Step of the ladder (several rungs may share one).
    name : str
        Short identifier, used by ``--rungs``.
    load : callable
        ``load(scale) -> DataFrame``; factor columns as strings or pandas Categoricals (they
        become R factors).  ``scale`` (hidden ``--scale``, default 1) shrinks simulated data
        for development; loaders of fixed data ignore it.  Must not depend on global state
        other than a fixed seed.
    formula : str
        The formula given to ``lmmfast.lmer``, ``mixedlm.lmer`` and ``lme_python.lmer``.
    r_formula : str
        The formula given to ``lme4::lmer``.
    reml : bool
        REML (True) or ML (False), for every tool.
    statsmodels : callable, optional
        ``statsmodels(df, reml) -> MixedLMResults`` fitting the same model with statsmodels'
        ``MixedLM``; None where statsmodels cannot express it (reason in ``cannot``).
    gpboost : GpboostSpec, optional
        None where gpboost cannot express the model (reason in ``cannot``).
    cannot : dict
        ``{tool: reason}`` for the tools that cannot express this rung (not run).
    formulas : dict
        ``{tool: (formula, why)}`` where a Python peer needs the same model spelled otherwise.
    heavy : bool
        Skipped by ``--quick``.
    description : str
        One line for the README.
    """

    number: int
    name: str
    load: Callable[[float], pd.DataFrame]
    formula: str
    r_formula: str
    reml: bool
    statsmodels: Optional[Callable] = None
    gpboost: Optional[GpboostSpec] = None
    cannot: dict = field(default_factory=dict)
    formulas: dict = field(default_factory=dict)
    heavy: bool = False
    description: str = ""

    @property
    def label(self) -> str:
        return f"{self.number} {self.name}"


def shipped(name: str) -> Callable[[float], pd.DataFrame]:
    """Return a loader for one of the datasets shipped in ``lmmfast.datasets``."""
    def load(scale: float = 1.0) -> pd.DataFrame:
        from lmmfast import datasets
        return datasets.load(name)
    load.__name__ = f"shipped_{name}"
    return load


def load_kb07(scale: float = 1.0) -> pd.DataFrame:
    """Rung 4: ``lmmfast.simulate.kb07_like(seed=42)`` (56 subjects x 32 items).

    Adds the products of the ±0.5 factors as columns (``sp``, ``sl``, ``pl``, ``spl``), for
    lme-python, whose formula parser has no three-way interactions (:data:`KB07_PRODUCTS`).
    """
    from lmmfast import simulate
    df = simulate.kb07_like(seed=42)[0]
    return df.assign(sp=df.spkr * df.prec, sl=df.spkr * df.load, pl=df.prec * df.load,
                     spl=df.spkr * df.prec * df.load)


KB07_TERMS = "1 + spkr + prec + load + sp + sl + pl + spl"
KB07_PRODUCTS = f"y ~ {KB07_TERMS} + ({KB07_TERMS} | subj) + ({KB07_TERMS} | item)"


def crossed_loader(n: int, n1: int, n2: int, slope: bool) -> Callable[[float], pd.DataFrame]:
    """A loader for ``lmmfast.simulate.crossed(n, n1, n2, slope, seed=1)``, scaled by ``scale``."""
    def load(scale: float = 1.0) -> pd.DataFrame:
        from lmmfast import simulate
        sn, s1, s2 = (max(int(round(v * scale)), 10) for v in (n, n1, n2))
        return simulate.crossed(sn, s1, s2, slope=slope, seed=1)[0]
    load.__name__ = f"crossed_{n}"
    return load


def sm_sleepstudy(df: pd.DataFrame, reml: bool):
    """statsmodels: ``Reaction ~ Days`` with correlated random intercept and slope by Subject."""
    import statsmodels.formula.api as smf
    model = smf.mixedlm("Reaction ~ Days", df, groups=df["Subject"], re_formula="~Days")
    return model.fit(reml=reml, full_output=True)


def sm_penicillin(df: pd.DataFrame, reml: bool):
    """statsmodels: crossed intercepts for plate and sample as variance components of one group."""
    import statsmodels.formula.api as smf
    df = df.assign(_one=1)
    vc = {"plate": "0 + C(plate)", "sample": "0 + C(sample)"}
    model = smf.mixedlm("diameter ~ 1", df, groups="_one", re_formula="0", vc_formula=vc)
    return model.fit(reml=reml, full_output=True)


SM_CROSSED = ("crossed random effects need a single all-observation group with dense "
              "variance-component design matrices (n x levels): impractical at this size")
SM_CORR_CROSSED = ("no correlated random slopes for crossed factors (variance components "
                   "are independent)")
GP_NO_REML = "gpboost fits ML only (no REML criterion)"
GP_NO_CORR = "gpboost has no correlated random slopes (only independent random coefficients)"

RUNGS = [
    Rung(1, "sleepstudy", shipped("sleepstudy"),
         "Reaction ~ Days + (Days | Subject)", "Reaction ~ Days + (Days | Subject)", True,
         statsmodels=sm_sleepstudy, cannot={"gpboost": GP_NO_CORR},
         description="180 obs; correlated random intercept + slope for 18 subjects (3 θ), REML."),
    Rung(2, "penicillin", shipped("penicillin"),
         "diameter ~ 1 + (1 | plate) + (1 | sample)", "diameter ~ 1 + (1 | plate) + (1 | sample)",
         True, statsmodels=sm_penicillin, cannot={"gpboost": GP_NO_REML},
         description="144 obs; fully crossed intercepts, 24 plates x 6 samples (2 θ), REML."),
    Rung(3, "insteval-ml", shipped("insteval"),
         "y ~ 1 + service + (1 | s) + (1 | d) + (1 | dept)",
         "y ~ 1 + service + (1 | s) + (1 | d) + (1 | dept)", False,
         gpboost=GpboostSpec("1 + service", ("s", "d", "dept")),
         cannot={"statsmodels": SM_CROSSED},
         description="73,421 obs; crossed intercepts for 2,972 students, 1,128 lecturers, "
                     "14 departments (3 θ), ML."),
    Rung(3, "insteval-service-dept", shipped("insteval"),
         "y ~ 1 + service * dept + (1 | s) + (1 | d)",
         "y ~ 1 + service * dept + (1 | s) + (1 | d)", True,
         cannot={"statsmodels": SM_CROSSED, "gpboost": GP_NO_REML},
         description="73,421 obs; 28 fixed effects (service x dept), crossed intercepts for "
                     "students and lecturers (2 θ), REML."),
    Rung(4, "kb07", load_kb07,
         "y ~ 1 + spkr*prec*load + (1 + spkr*prec*load | subj) + (1 + spkr*prec*load | item)",
         "y ~ 1 + spkr*prec*load + (1 + spkr*prec*load | subj) + (1 + spkr*prec*load | item)",
         True, cannot={"statsmodels": SM_CORR_CROSSED, "gpboost": GP_NO_CORR},
         formulas={"lme-python": (KB07_PRODUCTS, "the same model: lme-python's formula parser "
                                 "has no three-way interactions, so the products of the ±0.5 "
                                 "factors are precomputed columns")},
         description="1,792 obs simulated by `lmmfast.simulate.kb07_like(seed=42)`: 56 subjects x "
                     "32 items, 2x2x2 within factors coded ±0.5, maximal model (two 8x8 "
                     "covariances, 72 θ), REML."),
    Rung(5, "crossed-1m", crossed_loader(1_000_000, 50_000, 2_000, True),
         "y ~ 1 + x + (1 | g1) + (1 + x | g2)", "y ~ 1 + x + (1 | g1) + (1 + x | g2)", False,
         cannot={"statsmodels": SM_CROSSED, "gpboost": GP_NO_CORR}, heavy=True,
         description="1,000,000 obs simulated by `lmmfast.simulate.crossed(1_000_000, 50_000, "
                     "2_000, slope=True, seed=1)`: 50,000 x 2,000 crossed levels with Zipf-like "
                     "frequencies, correlated intercept + slope on g2 (4 θ), ML."),
    Rung(6, "crossed-10m", crossed_loader(10_000_000, 100_000, 5_000, False),
         "y ~ 1 + x + (1 | g1) + (1 | g2)", "y ~ 1 + x + (1 | g1) + (1 | g2)", False,
         cannot={"statsmodels": SM_CROSSED}, heavy=True,
         description="10,000,000 obs simulated by `lmmfast.simulate.crossed(10_000_000, 100_000, "
                     "5_000, slope=False, seed=1)`: 100,000 x 5,000 crossed levels, Zipf-like "
                     "frequencies (2 θ), ML (the scale on which gpboost is compared)."),
]


def find_rungs(names) -> list:
    """The rungs named (or numbered) in ``names``, in ladder order."""
    chosen = []
    for name in names:
        hits = [r for r in RUNGS if r.name == name or str(r.number) == str(name)]
        if not hits:
            raise SystemExit(f"unknown rung {name!r}; available: "
                             f"{', '.join(r.name for r in RUNGS)} or numbers 1-{RUNGS[-1].number}")
        chosen.extend(h for h in hits if h not in chosen)
    return [r for r in RUNGS if r in chosen]


def find_rung(name: str) -> Rung:
    """The rung called ``name``."""
    return next(r for r in RUNGS if r.name == name)


# ---------------------------------------------------------------------------------- data files
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


# ---------------------------------------------------------------------------------- memory
def memory_mb() -> dict:
    """Current and peak resident set size of this process, in MB.

    Returns
    -------
    dict
        ``{"rss": float, "hwm": float}`` from ``/proc/self/status`` (``VmRSS``, ``VmHWM``);
        without ``/proc``, ``rss`` is None and ``hwm`` is ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        return {key: int(fields[name].split()[0]) / 1024.0
                for key, name in (("rss", "VmRSS"), ("hwm", "VmHWM"))}
    except (OSError, KeyError, ValueError):
        import resource
        scale = 1 / 1024.0 if sys.platform != "darwin" else 1 / 1024.0 ** 2
        return {"rss": None, "hwm": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale}


def loaded_blas() -> list:
    """Basenames of the BLAS / LAPACK / CHOLMOD shared libraries mapped into this process."""
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "/" in line}
    except OSError:
        return []
    keys = ("blas", "lapack", "cholmod", "mkl")
    names = {os.path.basename(p) for p in paths}
    return sorted(n for n in names if n.startswith("lib") and any(k in n.lower() for k in keys))


# ---------------------------------------------------------------------------------- python workers
# Each tool: prepare(spec, df) -> state (untimed: what a user does once with the data, e.g.
# convert it to the library's frame type), fit(spec, state) -> result (timed: model
# construction from formula/data + optimisation), describe(result) -> dict.
def prepare_frame(spec: dict, df: pd.DataFrame):
    return df


def fit_lmmfast(spec: dict, df: pd.DataFrame):
    """lmmfast.lmer (model construction included, as in ``lme4::lmer``)."""
    import lmmfast
    return lmmfast.lmer(spec["formula"], df, REML=spec["reml"])


def describe_lmmfast(fit) -> dict:
    """Evaluations, objective, convergence and the per-evaluation floor of an lmmfast fit."""
    opt = fit.optsummary
    out = {"feval": int(opt.feval), "objective": float(fit.objective),
           "converged": bool(opt.converged), "messages": [str(m) for m in opt.messages],
           "method": str(fit.model.method), "ntheta": int(fit.model.ntheta),
           "revision": git_revision()}
    out.update(eval_floor(fit.model))
    return out


def _best_time(fn, budget: float = 2.0, most: int = 7) -> float:
    """Fewest seconds of ``fn()`` over up to ``most`` calls or about ``budget`` seconds
    (the minimum: a floor should not carry the noise of a busy machine)."""
    times = []
    while len(times) < most and (not times or sum(times) < budget):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def eval_floor(model) -> dict:
    """A floor for one objective evaluation of the blocked method, in ms.

    One dense Cholesky (``scipy.linalg.cholesky``) of a random SPD matrix the size D of the
    dense block (``model.pls.xp.D``) plus one pass over the stored cross-products (a copy
    of ``A22`` and of ``A21``): an evaluation has to factor that block and read those.
    Each part is the fastest of up to 7 calls.  Only for ``method == "blocked"``; empty
    otherwise.
    """
    if getattr(model, "method", None) != "blocked":
        return {}
    import scipy.linalg
    xp = model.pls.xp
    D = int(xp.D)
    rng = np.random.default_rng(0)
    S = rng.random((D, D))
    S += S.T
    S[np.diag_indices(D)] += 2.0 * D            # diagonally dominant: SPD
    chol = _best_time(lambda S=S: scipy.linalg.cholesky(S, lower=True, check_finite=False))
    del S
    copy = _best_time(lambda: (xp.A22.copy(), xp.A21.copy()))
    return {"D": D, "floor_chol_ms": 1000 * chol, "floor_copy_ms": 1000 * copy,
            "floor_ms": 1000 * (chol + copy),
            "A22_mb": xp.A22.nbytes / 2 ** 20, "A21_mb": xp.A21.nbytes / 2 ** 20}


def fit_statsmodels(spec: dict, df: pd.DataFrame):
    """statsmodels' MixedLM through the rung's own fitter (the rung must define one)."""
    return find_rung(spec["rung"]).statsmodels(df, spec["reml"])


def describe_statsmodels(fit) -> dict:
    """Function evaluations (over all optimizers tried), -2 log-likelihood and convergence."""
    hist = getattr(fit, "hist", None) or []
    fcalls = [h.get("fcalls") for h in hist if isinstance(h, dict)]
    feval = sum(fcalls) if fcalls and None not in fcalls else None
    return {"feval": feval, "objective": -2.0 * float(fit.llf),
            "converged": bool(fit.converged), "messages": []}


def fit_mixedlm(spec: dict, df: pd.DataFrame):
    """mixedlm.lmer with the lme4 formula (its defaults: L-BFGS-B with native gradients)."""
    import mixedlm
    return mixedlm.lmer(spec["formula"], df, REML=spec["reml"])


def describe_mixedlm(fit) -> dict:
    """``function_evals`` (scipy's nfev: value+gradient evaluations), ``deviance`` (REML
    criterion for REML fits), convergence and the optimizer's message."""
    msg = str(getattr(fit, "message", "") or "")
    return {"feval": int(fit.function_evals), "objective": float(fit.deviance),
            "converged": bool(fit.converged),
            "messages": [] if fit.converged else [f"optimizer: {msg}"]}


def prepare_lme_python(spec: dict, df: pd.DataFrame):
    """A polars frame (lme-python's input; factors as strings, gathered from the levels)."""
    import polars as pl
    cols = {}
    for name in df.columns:
        col = df[name]
        if isinstance(col.dtype, pd.CategoricalDtype):
            levels = pl.Series(name, [str(c) for c in col.cat.categories], dtype=pl.String)
            cols[name] = levels.gather(pl.Series(col.cat.codes.to_numpy().astype(np.uint32)))
        else:
            cols[name] = pl.Series(name, col.to_numpy())
    return pl.DataFrame(cols)


def fit_lme_python(spec: dict, frame):
    """lme_python.lmer with the lme4 formula (its defaults)."""
    import lme_python
    formula = spec["formulas"].get("lme-python", spec["formula"])
    return lme_python.lmer(formula, data=frame, reml=spec["reml"])


def describe_lme_python(fit) -> dict:
    """Outer optimizer iterations (not evaluations), the objective it minimised, convergence."""
    diag = fit.diagnostics or {}
    obj = diag.get("objective")
    if obj is None:
        obj = fit.reml_criterion if fit.reml_criterion is not None else fit.deviance
    msgs = [str(w) for w in diag.get("warnings") or []]
    if diag.get("termination") not in (None, "Converged"):
        msgs.append(f"termination: {diag.get('termination')}")
    return {"feval": fit.iterations, "feval_kind": "iterations", "objective": float(obj),
            "converged": bool(fit.converged), "messages": msgs}


def prepare_gpboost(spec: dict, df: pd.DataFrame):
    """Response, fixed-effects matrix (patsy, treatment coding as R) and group codes."""
    import patsy
    gp = spec["gpboost"]
    X = np.asarray(patsy.dmatrix(gp["fixed"], df, return_type="matrix"), dtype=float)
    groups = np.column_stack([df[g].cat.codes.to_numpy().astype(np.int64) for g in gp["groups"]])
    y = df[spec["response"]].to_numpy(dtype=float)
    return y, X, groups


def fit_gpboost(spec: dict, state):
    """``GPModel(group_data, likelihood="gaussian", matrix_inversion_method="cholesky").fit``.

    ``"cholesky"`` makes the reported negative log-likelihood exact; gpboost's default for
    grouped random effects ("iterative") estimates log-determinants stochastically
    (Lanczos with random probe vectors), and reports an approximate objective.
    """
    import gpboost
    y, X, groups = state
    model = gpboost.GPModel(group_data=groups, likelihood="gaussian",
                            matrix_inversion_method="cholesky")
    model.fit(y=y, X=X)
    return model


def describe_gpboost(model) -> dict:
    """Optimizer iterations, ``2 * get_current_neg_log_likelihood()`` (= lme4's ML deviance)."""
    status = model._get_convergence_status()
    return {"feval": int(model._get_num_optim_iter()), "feval_kind": "iterations",
            "objective": 2.0 * float(model.get_current_neg_log_likelihood()),
            "converged": status == 0,
            "messages": [] if status == 0 else [f"convergence status {status}"]}


# tool -> (module imported before the data is read, prepare, fit, describe)
PY_TOOLS = {
    "lmmfast": ("lmmfast", prepare_frame, fit_lmmfast, describe_lmmfast),
    "statsmodels": ("statsmodels.formula.api", prepare_frame, fit_statsmodels,
                    describe_statsmodels),
    "mixedlm": ("mixedlm", prepare_frame, fit_mixedlm, describe_mixedlm),
    "lme-python": ("lme_python", prepare_lme_python, fit_lme_python, describe_lme_python),
    "gpboost": ("gpboost", prepare_gpboost, fit_gpboost, describe_gpboost),
}


def timed_fits(fit: Callable[[], object], nrepeat: int, budget: float, warmup: int,
               min_repeat: int = 1, timeout: Optional[float] = None):
    """Fit ``warmup`` times untimed, then time fits until ``nrepeat`` or ``budget`` s spent.

    A warm-up fit that takes ``budget`` seconds or more is kept as the first timed fit:
    at that length one-time costs are noise, and fitting twice would double the run.

    Parameters
    ----------
    fit : callable
        ``fit() -> result``.
    nrepeat : int
        Most timed fits.
    budget : float
        Stop timing once this many seconds of fitting have been spent ...
    warmup : int
        Untimed fits before timing.
    min_repeat : int
        ... but only after at least this many timed fits, unless those already took more
        than ``20 * budget`` seconds in all.
    timeout : float, optional
        Start no fit that would, at the longest time seen so far, end later than this many
        seconds after the first fit began (the parent kills the worker then).

    Returns
    -------
    wall, cpu : list of float
        Seconds per timed fit (wall clock; process CPU over all threads).
    result : object
        The last fit.
    warm_kept : bool
        Whether the warm-up fit was kept as a timed fit.
    """
    t_start = time.perf_counter()
    wall, cpu = [], []
    warm_kept = False

    def one():
        gc.collect()
        w0, c0 = time.perf_counter(), time.process_time()
        res = fit()
        w1, c1 = time.perf_counter(), time.process_time()
        print(f"{FITTED} {w1 - w0:.6f}", flush=True)
        return res, w1 - w0, c1 - c0

    result = None
    for _ in range(warmup):
        result, w, c = one()
        if w >= budget:
            wall, cpu, warm_kept = [w], [c], True
            break
    while True:
        enough = len(wall) >= nrepeat or sum(wall) >= budget
        if wall and (len(wall) >= min_repeat or sum(wall) > 20 * budget) and enough:
            break
        if wall and timeout is not None and \
                time.perf_counter() - t_start + max(wall) > timeout:
            break
        result, w, c = one()
        wall.append(w)
        cpu.append(c)
    return wall, cpu, result, warm_kept


def worker(tool: str, spec_path: str) -> None:
    """Child-process entry: time one Python tool on one rung and print a JSON line."""
    spec = json.loads(Path(spec_path).read_text())
    module, prepare, fit, describe = PY_TOOLS[tool]
    importlib.import_module(module)  # as R loads lme4 first: imports are not in the timings
    state = prepare(spec, read_data(spec))
    gc.collect()
    base = memory_mb()
    print(START, flush=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wall, cpu, result, warm_kept = timed_fits(
            lambda: fit(spec, state), spec["nrepeat"], spec["budget"], spec["warmup"],
            spec["min_repeat"].get(tool, 1), spec["timeouts"].get(tool, spec["timeout"]))
    print(FITTED + " done", flush=True)
    peak = memory_mb()   # before describe(): lmmfast's floor measurement allocates a D x D matrix
    out = describe(result)
    out["messages"] = sorted(set(out["messages"]) | {str(w.message) for w in caught})
    out.update(tool=tool, wall=wall, cpu=cpu, warm_kept=warm_kept, base_mb=base["rss"],
               peak_mb=peak["hwm"], blas=loaded_blas())
    print(MARKER + json.dumps(out), flush=True)


def peer_probe() -> None:
    """Child-process entry (``--probe-peers``): versions of the peers importable here."""
    from importlib import metadata, util
    out = {"python": platform.python_version(), "executable": sys.executable}
    for dist in ["numpy", "scipy", "pandas"] + PEERS:
        mod = PEER_MODULES.get(dist, dist)
        if util.find_spec(mod) is None:
            continue
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "?"
    print(MARKER + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------- R / lme4
R_WORKER = r"""
args <- commandArgs(trailingOnly = TRUE)
spec <- jsonlite::fromJSON(args[[1]], simplifyVector = FALSE)
memory_mb <- function() {
  f <- "/proc/self/status"
  if (!file.exists(f)) return(list(rss = NA, hwm = NA))
  s <- readLines(f)
  get <- function(key) as.numeric(gsub("[^0-9]", "", grep(paste0("^", key, ":"), s, value = TRUE))) / 1024
  list(rss = get("VmRSS"), hwm = get("VmHWM"))
}
suppressPackageStartupMessages(library(lme4))
read_columns <- function(spec) {
  n <- as.integer(spec$nrow)
  d <- list()
  for (col in spec$columns) {
    con <- file(col$file, "rb")
    if (identical(col$kind, "factor")) {
      codes <- readBin(con, "integer", n = n, size = 4L, endian = "little")
      d[[col$name]] <- structure(codes + 1L, levels = as.character(unlist(col$levels)),
                                 class = "factor")
    } else {
      d[[col$name]] <- readBin(con, "double", n = n, size = 8L, endian = "little")
    }
    close(con)
  }
  structure(d, class = "data.frame", row.names = c(NA_integer_, -n))
}
d <- read_columns(spec)
form <- as.formula(spec$r_formula)
msgs <- character(0)
fit <- function() withCallingHandlers(
  lmer(form, data = d, REML = spec$reml),
  warning = function(w) { msgs <<- c(msgs, conditionMessage(w)); invokeRestart("muffleWarning") },
  message = function(m) { msgs <<- c(msgs, trimws(conditionMessage(m))); invokeRestart("muffleMessage") })
one <- function() {
  invisible(gc())
  w0 <- Sys.time(); c0 <- proc.time()
  m <- fit()
  c1 <- proc.time(); w1 <- Sys.time()
  w <- as.numeric(difftime(w1, w0, units = "secs"))
  cat("BENCH_FITTED ", w, "\n", sep = ""); flush(stdout())
  list(m = m, wall = w, cpu = (c1 - c0)[["user.self"]] + (c1 - c0)[["sys.self"]])
}
invisible(gc())
base <- memory_mb()
cat("BENCH_START\n"); flush(stdout())
t_start <- Sys.time()
wall <- numeric(0); cpu <- numeric(0); warm_kept <- FALSE
min_repeat <- if (is.null(spec$min_repeat$lme4)) 1 else spec$min_repeat$lme4
for (i in seq_len(spec$warmup)) {
  r <- one(); m <- r$m
  if (r$wall >= spec$budget) { wall <- r$wall; cpu <- r$cpu; warm_kept <- TRUE; break }
}
repeat {
  enough <- length(wall) >= spec$nrepeat || sum(wall) >= spec$budget
  if (length(wall) >= max(1, min_repeat) && enough) break
  elapsed <- as.numeric(difftime(Sys.time(), t_start, units = "secs"))
  if (length(wall) >= 1 && !is.null(spec$timeout) && elapsed + max(wall) > spec$timeout) break
  r <- one(); m <- r$m
  wall <- c(wall, r$wall); cpu <- c(cpu, r$cpu)
}
cat("BENCH_FITTED done\n"); flush(stdout())
peak <- memory_mb()$hwm
conv <- m@optinfo$conv$opt
out <- list(tool = "lme4", wall = I(wall), cpu = I(cpu), feval = m@optinfo$feval,
            objective = -2 * as.numeric(logLik(m)), converged = identical(as.integer(conv), 0L),
            warm_kept = warm_kept, messages = I(unique(msgs)), base_mb = base$rss,
            peak_mb = peak)
cat("BENCH_JSON:", jsonlite::toJSON(out, auto_unbox = TRUE, digits = NA, na = "null"), "\n", sep = "")
"""

R_PROBE = r"""
ok <- requireNamespace("lme4", quietly = TRUE) && requireNamespace("jsonlite", quietly = TRUE)
out <- list(ok = ok, R = R.version.string, blas = unname(extSoftVersion()[["BLAS"]]),
            lapack = La_library())
if (ok) out$lme4 <- as.character(packageVersion("lme4"))
if (ok) out$Matrix <- as.character(packageVersion("Matrix"))
cat("BENCH_JSON:", if (ok) jsonlite::toJSON(out, auto_unbox = TRUE) else
    sprintf('{"ok": false, "R": "%s"}', R.version.string), "\n", sep = "")
"""


def probe_r(env: dict) -> Optional[dict]:
    """Versions and BLAS of R, or None when ``Rscript``, lme4 or jsonlite is missing."""
    if shutil.which("Rscript") is None:
        return None
    try:
        info = run_child(["Rscript", "-e", R_PROBE], env)
    except (RuntimeError, ChildTimeout):
        return None
    return info if info.get("ok") else None


def probe_peers(python: Optional[str], env: dict) -> dict:
    """``{"python": ..., dist: version}`` of the peer environment ({} if unusable)."""
    if not python:
        return {}
    try:
        return run_child([python, str(Path(__file__).resolve()), "--probe-peers"], env)
    except (RuntimeError, ChildTimeout, OSError):
        return {}


# ---------------------------------------------------------------------------------- orchestration
class ChildTimeout(Exception):
    """A worker ran past its time limit and was killed."""

    def __init__(self, phase: str, limit: float, fits: list):
        super().__init__(f"killed after {limit:.0f} s while {phase}")
        self.phase, self.limit, self.fits = phase, limit, fits


def run_child(cmd: list, env: dict, timeout: Optional[float] = None, progress: bool = False) -> dict:
    """Run a worker process and return the JSON it printed after :data:`MARKER`.

    With ``timeout``, the worker is killed (its whole process group) when it is still
    fitting ``timeout`` seconds after it printed :data:`START`, or when it spends longer
    than that loading its data or after fitting.

    Raises
    ------
    RuntimeError
        If the process fails or prints no result; the message carries its stderr tail.
    ChildTimeout
        If it was killed for running past ``timeout``.
    """
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                                cwd=REPO, start_new_session=True)
        lines, fits = [], []
        clock = {"start": None, "end": None}

        def reader():
            for line in proc.stdout:
                line = line.rstrip("\n")
                lines.append(line)
                if line.startswith(START):
                    clock["start"] = time.monotonic()
                elif line.startswith(FITTED):
                    arg = line[len(FITTED):].strip()
                    if arg == "done":
                        clock["end"] = time.monotonic()
                    else:
                        fits.append(float(arg))
                        if progress:
                            print(f"{float(arg):.3g}s", end=" ", file=sys.stderr, flush=True)

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        launched = time.monotonic()
        killed = None
        try:
            while True:
                try:
                    proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if timeout is None:
                    continue
                now = time.monotonic()
                if clock["start"] is None:
                    phase, since = "loading data", launched
                elif clock["end"] is None:
                    phase, since = "fitting", clock["start"]
                else:
                    phase, since = "reporting", clock["end"]
                if now - since > timeout:
                    killed = phase
                    break
        finally:   # timeout, or this script interrupted: take the worker down with it
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        thread.join(timeout=10)
        if killed is not None:
            raise ChildTimeout(killed, timeout, fits)
        err.seek(0)
        stderr = err.read()
    found = [ln for ln in lines if ln.startswith(MARKER)]
    if proc.returncode != 0 or not found:
        tail = (stderr or "\n".join(lines)).strip().splitlines()[-5:]
        raise RuntimeError(f"exit {proc.returncode}: " + " | ".join(tail))
    return json.loads(found[-1][len(MARKER):])


def write_inputs(rung: Rung, workdir: Path, args) -> Path:
    """Load the rung's data, write its column files and spec (JSON); return the spec path."""
    df = rung.load(args.scale)
    columns, nrow = write_data(df, workdir, rung.name)
    spec = {"rung": rung.name, "columns": columns, "nrow": nrow, "formula": rung.formula,
            "r_formula": rung.r_formula, "reml": rung.reml, "formulas": {t: f for t, (f, _) in rung.formulas.items()},
            "response": rung.formula.split("~")[0].strip(), "nrepeat": args.repeat,
            "budget": args.budget, "warmup": args.warmup, "timeout": args.timeout,
            "timeouts": {"lmmfast": args.lmmfast_timeout},
            "min_repeat": {"lmmfast": args.min_repeat},
            "gpboost": None if rung.gpboost is None else
            {"fixed": rung.gpboost.fixed, "groups": list(rung.gpboost.groups)}}
    path = workdir / f"{rung.name}.json"
    path.write_text(json.dumps(spec))
    return path


def tool_commands(rung: Rung, spec: Path, ctx: dict) -> dict:
    """``{tool: command line, or a string saying why it does not run}`` for ``rung``."""
    me = str(Path(__file__).resolve())
    cmds = {}
    for tool in ctx["tools"]:
        if tool == "lmmfast":
            cmds[tool] = [sys.executable, me, "--worker", "lmmfast", str(spec)]
        elif tool == "lme4":
            cmds[tool] = (["Rscript", str(ctx["r_script"]), str(spec)] if ctx["r_script"]
                          else "skipped: " + ctx["r_reason"])
        elif tool in rung.cannot:
            cmds[tool] = "cannot express: " + rung.cannot[tool]
        elif tool not in ctx["peer_versions"]:
            cmds[tool] = "skipped: not installed in the peer environment " \
                         f"({ctx['peers_python'] or 'none'})"
        else:
            cmds[tool] = [ctx["peers_python"], me, "--worker", tool, str(spec)]
    return cmds


def run_rung(rung: Rung, workdir: Path, ctx: dict, env: dict, args) -> list:
    """Run every tool on ``rung`` one after another; return one record per tool."""
    print(f"[{rung.label}] writing data ...", file=sys.stderr, flush=True)
    spec = write_inputs(rung, workdir, args)
    gc.collect()
    records = []
    try:
        for tool, cmd in tool_commands(rung, spec, ctx).items():
            record = {"rung": rung.name, "number": rung.number, "tool": tool}
            if isinstance(cmd, str):
                record["status"] = cmd.split(":")[0]
                record["reason"] = cmd
                records.append(record)
                continue
            if tool in rung.formulas:
                formula, why = rung.formulas[tool]
                record["messages_pre"] = [f"fitted as {formula!r} ({why})"]
            print(f"[{rung.label}] {tool} ...", end=" ", file=sys.stderr, flush=True)
            record["load_before"] = load_average()
            t0 = time.monotonic()
            try:
                limit = args.lmmfast_timeout if tool == "lmmfast" else args.timeout
                record.update(run_child(cmd, env, timeout=limit, progress=True))
                record["time"] = statistics.median(record["wall"])
                record["status"] = "ok"
                print(f"-> {record['time']:.4g} s x {len(record['wall'])}", file=sys.stderr)
            except ChildTimeout as exc:
                record["status"] = f"timeout (> {exc.limit:.0f} s)"
                record["reason"] = str(exc)
                record["timeout_s"] = exc.limit
                record["timeout_phase"] = exc.phase
                print(f"-> timeout ({exc})", file=sys.stderr)
            except RuntimeError as exc:
                record["status"] = "failed"
                record["reason"] = str(exc)
                print(f"-> failed: {exc}", file=sys.stderr)
            record["elapsed"] = time.monotonic() - t0
            records.append(record)
    finally:
        for path in workdir.glob(f"{rung.name}.*"):
            path.unlink()
    judge(records, args.obj_tol)
    return records


def obj_tolerance(best: float, tol: float) -> float:
    """Objective differences up to this count as the same optimum (abs, or relative at scale)."""
    return max(tol, 1e-10 * abs(best))


def judge(records: list, tol: float) -> None:
    """Add ``speedup``, ``dobj`` (vs lme4), ``dbest`` and flag worse optima, in place.

    ``speedup`` = lme4 time / tool time; where lme4 timed out it is a lower bound
    (``speedup_lower``).  A tool whose objective is more than :func:`obj_tolerance` above
    the best objective any tool reached on the rung gets the status ``worse optimum``.
    """
    done = [r for r in records if "time" in r]
    ref = next((r for r in done if r["tool"] == "lme4"), None)
    r_to = next((r for r in records if r["tool"] == "lme4" and "timeout_s" in r
                 and r.get("timeout_phase") == "fitting"), None)
    best = min((r["objective"] for r in done if r.get("objective") is not None), default=None)
    for r in done:
        if ref is not None:
            r["speedup"] = ref["time"] / r["time"]
            r["dobj"] = r["objective"] - ref["objective"]
        elif r_to is not None:
            r["speedup"] = r_to["timeout_s"] / r["time"]
            r["speedup_lower"] = True
        if best is not None:
            r["dbest"] = r["objective"] - best
            if r["dbest"] > obj_tolerance(best, tol):
                r["status"] = "worse optimum"
                r.setdefault("messages", []).append(
                    f"objective {r['dbest']:+.3g} above the best reached on this rung")


# ---------------------------------------------------------------------------------- report
def load_average() -> Optional[float]:
    """The 1-minute load average, or None where the platform has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (or ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_total_gb() -> Optional[float]:
    """Physical memory in GB, from ``/proc/meminfo``."""
    try:
        with open("/proc/meminfo") as fh:
            return int(fh.readline().split()[1]) / 1024.0 ** 2
    except (OSError, ValueError, IndexError):
        return None


def git_revision() -> str:
    """``git describe --always --dirty`` of the repository, or "unknown"."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO,
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def python_versions() -> dict:
    """Versions of Python and the libraries of lmmfast's side."""
    import scipy
    import lmmfast
    return {"python": platform.python_version(), "numpy": np.__version__,
            "scipy": scipy.__version__, "pandas": pd.__version__,
            "lmmfast": f"{lmmfast.__version__} ({git_revision()})"}


def machine_info() -> dict:
    """CPU, cores, memory, OS and load average of this machine."""
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    mem = memory_total_gb()
    return {"cpu": cpu_model(), "cores": cores, "usable_cores": usable,
            "memory_gb": None if mem is None else round(mem, 1),
            "os": f"{platform.system()} {platform.release()}",
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None}


def fmt(value, spec: str, missing: str = "n/a") -> str:
    """Format ``value`` with ``spec``, or ``missing`` when it is None."""
    return missing if value is None else format(value, spec)


def fmt_time(t: float) -> str:
    return f"{t:.4g}"


HEADER = ["rung", "tool", "status", "time (s)", "n", "cpu (s)", "evals", "ms/eval",
          "floor ms/eval", "objective", "peak MB", "+MB", "vs lme4", "Δobj vs lme4"]


def table_row(r: dict) -> list:
    """The cells of one record's table row."""
    label = f"{r['number']} {r['rung']}"
    if "time" not in r:
        return [label, r["tool"], r["status"]] + ["-"] * (len(HEADER) - 3)
    feval = r.get("feval")
    iters = r.get("feval_kind") == "iterations"
    ms_eval = 1000.0 * r["time"] / feval if feval and not iters else None
    evals = "n/a" if feval is None else f"{feval}{'*' if iters else ''}"
    base = r.get("base_mb")
    extra = None if base is None or r.get("peak_mb") is None else r["peak_mb"] - base
    speed = r.get("speedup")
    speed_s = "n/a" if speed is None else (">" if r.get("speedup_lower") else "") + f"{speed:.2f}"
    floor = r.get("floor_ms")
    return [label, r["tool"], r["status"], fmt_time(r["time"]), str(len(r["wall"])),
            f"{statistics.median(r['cpu']):.4g}", evals, fmt(ms_eval, ".3g"),
            fmt(floor, ".3g", "-" if r["tool"] != "lmmfast" else "n/a"),
            f"{r['objective']:.4f}", fmt(r.get("peak_mb"), ".0f"), fmt(extra, ".0f"),
            speed_s, fmt(r.get("dobj"), "+.2e")]


def format_table(records: list) -> str:
    """Fixed-width table of all records (text columns left-, numbers right-aligned)."""
    rows = [HEADER] + [table_row(r) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]

    def line(row):
        cells = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), rule] + [line(row) for row in rows[1:]])


# ---------------------------------------------------------------------------------- targets
def _rec(records, name, tool):
    return next((r for r in records if r["rung"] == name and r["tool"] == tool), None)


def check_targets(records: list, tol: float) -> list:
    """The issue's targets, each as ``(target, verdict, evidence)``; only for rungs that ran.

    Verdicts: MET, MISSED, or n/a (the rung or a needed tool did not run).
    """
    out = []

    def lm(name):
        r = _rec(records, name, "lmmfast")
        return r if r is not None and "time" in r else None

    def add(target, ok, evidence):
        out.append((target, "n/a" if ok is None else ("MET" if ok else "MISSED"), evidence))

    ran = {r["rung"] for r in records}
    if "sleepstudy" in ran:
        r = lm("sleepstudy")
        add("rung 1: lmmfast under 1 ms", None if r is None else r["time"] < 1e-3,
            "no lmmfast time" if r is None else f"{1000 * r['time']:.3g} ms")
    for name in ("insteval-ml", "insteval-service-dept", "kb07"):
        if name not in ran:
            continue
        r, ref = lm(name), _rec(records, name, "lme4")
        target = f"rung {find_rung(name).number} ({name}): >= 20x faster than lme4"
        if name == "kb07":
            target += " at an objective no worse than lme4's"
        if r is not None and r.get("speedup_lower"):
            ev = f"lme4 timed out: > {r['speedup']:.1f}x"
            met = True if r["speedup"] >= 20 and name != "kb07" else None
            add(target, met, ev + ("" if met is not None or name != "kb07" else
                                   ", lme4's objective unknown"))
            continue
        if r is None or ref is None or "time" not in ref:
            add(target, None, "lmmfast or lme4 has no time")
            continue
        ok = r["speedup"] >= 20
        ev = f"{r['speedup']:.1f}x ({fmt_time(ref['time'])} s / {fmt_time(r['time'])} s)"
        if name == "kb07":
            same = r["dobj"] <= obj_tolerance(ref["objective"], tol)
            ok = ok and same
            ev += f", Δobj vs lme4 {r['dobj']:+.3g}"
        add(target, ok, ev)
    if "crossed-1m" in ran:
        r = lm("crossed-1m")
        add("rung 5: lmmfast under 5 s", None if r is None else r["time"] < 5,
            "no lmmfast time" if r is None else f"{fmt_time(r['time'])} s")
    if "crossed-10m" in ran:
        r = lm("crossed-10m")
        add("rung 6: lmmfast under 60 s and peak memory under 4 GB",
            None if r is None else (r["time"] < 60 and r["peak_mb"] < 4096),
            "no lmmfast time" if r is None else
            f"{fmt_time(r['time'])} s, peak {r['peak_mb']:.0f} MB")
    for rung in RUNGS:
        if rung.name not in ran:
            continue
        r = lm(rung.name)
        tried = [p for p in records if p["rung"] == rung.name and p["tool"] in PEERS
                 and not p["status"].startswith("skipped")]
        peers = [p for p in tried if "time" in p]
        target = f"rung {rung.label}: faster than the fastest Python peer, same or better optimum"
        if r is None:
            add(target, None, "no lmmfast time")
            continue
        if not tried:
            add(target, None, "no Python peer was run")
            continue
        if not peers:
            why = sorted({f"{p['tool']}: {p['status']}" for p in tried})
            add(target, True, "no Python peer produced a fit (" + "; ".join(why) + ")")
            continue
        fastest = min(peers, key=lambda p: p["time"])
        slower = all(r["time"] < p["time"] for p in peers)
        not_worse = all(r["objective"] - p["objective"] <= obj_tolerance(p["objective"], tol)
                        for p in peers)
        ev = (f"lmmfast {fmt_time(r['time'])} s vs fastest peer {fastest['tool']} "
              f"{fmt_time(fastest['time'])} s ({fastest['time'] / r['time']:.2f}x, peer "
              f"{fastest['status']}); lmmfast objective "
              f"{'not worse than' if not_worse else 'WORSE than'} every peer's")
        add(target, slower and not_worse, ev)
    return out


def format_targets(records: list, tol: float) -> str:
    rows = check_targets(records, tol)
    if not rows:
        return ""
    w = max(len(t) for t, _, _ in rows)
    return "\n".join(["targets:"] + [f"  {v:6s}  {t.ljust(w)}  {e}" for t, v, e in rows])


def format_footer(meta: dict, records: list) -> str:
    """Machine, versions, BLAS, settings and per-fit messages, below the table."""
    m, v, r = meta["machine"], meta["python"], meta.get("r")
    lines = [
        "time: median wall seconds per fit (model construction + optimisation, data load "
        f"excluded) over n timed fits after {meta['warmup']} warm-up fit(s) (a warm-up fit "
        f"of >= {meta['budget']} s counts as the first timed fit); cpu: median process CPU "
        "seconds per fit (all threads)",
        "evals: objective evaluations (lmmfast optsummary.feval, lme4 @optinfo$feval, "
        "statsmodels summed fcalls, mixedlm function_evals = scipy nfev of value+gradient "
        "calls); * = optimizer iterations, not evaluations (lme-python: Nelder-Mead/grid "
        "iterations; gpboost: L-BFGS iterations); ms/eval: time / evals (includes model setup)",
        "floor ms/eval (lmmfast, method 'blocked'): one scipy.linalg.cholesky of a random SPD "
        "matrix of the dense block's size D plus one copy of the stored cross-products "
        "A22 and A21 (fastest of up to 7 calls each), measured in the lmmfast worker",
        "objective: -2 log-likelihood on lme4's scale: the REML criterion for REML rungs, "
        "the deviance for ML rungs (gpboost: 2 x get_current_neg_log_likelihood() with "
        "matrix_inversion_method='cholesky', exact)",
        "status: ok; worse optimum (objective more than max(--obj-tol, 1e-10 |best|) above "
        f"the best on the rung; --obj-tol {meta['obj_tol']}); cannot express; failed; "
        "timeout (> N s: still fitting N s after its data were ready, killed); skipped",
        "peak MB: the fitting process's peak RSS (VmHWM); +MB: peak minus RSS after loading "
        "data",
        "vs lme4: lme4 time / tool time (>1: faster than lme4; '>x' where lme4 timed out); "
        "Δobj: objective - lme4's (>0: worse optimum)",
        "",
        f"date: {meta['date']}",
        f"machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"{m['memory_gb']} GB RAM, {m['os']}; load average at start "
        f"{fmt_load(meta['load_start'])}, at end {fmt_load(meta['load_end'])}",
        "lmmfast side: " + ", ".join(f"{k} {val}" for k, val in v.items()),
    ]
    revs = sorted({rec["revision"] for rec in records if rec.get("revision")})
    if len(revs) > 1:
        lines.append("lmmfast revision changed during the run: " + ", ".join(
            f"{rec['rung']} at {rec['revision']}" for rec in records if rec.get("revision")))
    blas = sorted({b for rec in records if rec["tool"] == "lmmfast" for b in rec.get("blas", [])})
    lines.append("lmmfast BLAS/LAPACK/CHOLMOD libraries loaded: " + (", ".join(blas) or "n/a"))
    if r is None:
        lines.append("R side: not run (" + meta.get("r_reason", "") + ")")
    else:
        lines.append(f"R side: {r['R']}, lme4 {r['lme4']}, Matrix {r['Matrix']}")
        lines.append(f"R BLAS: {r['blas']}; LAPACK: {r['lapack']}")
    pv = meta.get("peers") or {}
    if pv:
        lines.append(f"peer environment ({meta['peers_python']}): " +
                     ", ".join(f"{k} {val}" for k, val in pv.items()
                               if k not in ("executable",)))
    else:
        lines.append("peer environment: none (" + (meta.get("peers_reason") or "") + ")")
    threads = meta["openblas_threads"]
    lines.append(f"OPENBLAS_NUM_THREADS={threads if threads is not None else 'unset'} (all "
                 f"workers); --repeat {meta['repeat']}, --budget {meta['budget']} s, --warmup "
                 f"{meta['warmup']}, --min-repeat {meta['min_repeat']} (lmmfast), --timeout "
                 f"{meta['timeout']:g} s per tool and rung (lmmfast: --lmmfast-timeout "
                 f"{meta['lmmfast_timeout']:g} s)")
    if meta.get("scale", 1.0) != 1.0:
        lines.append(f"--scale {meta['scale']}: SIMULATED RUNGS 5-6 AT REDUCED SIZE "
                     "(development only; not the ladder)")
    lines.extend(format_notes(records, m["usable_cores"]))
    return "\n".join(lines)


def fmt_load(load) -> str:
    """Load averages as ``1.00/0.50/0.20``."""
    return "n/a" if load is None else "/".join(f"{x:.2f}" for x in load)


def format_notes(records: list, cores: int) -> list:
    """Warnings, non-convergence, errors and a busy machine per fit, as footnote lines."""
    notes = []
    for r in records:
        what = list(r.get("messages_pre") or []) + list(r.get("messages") or [])
        load = r.get("load_before")
        if "time" in r and load is not None and load > cores:
            what.append(f"1-min load average {load:.2f} > {cores} cores before this run: "
                        "the machine was busy, timing unreliable")
        if "time" in r and not r.get("converged", True):
            what.insert(0, "optimizer reports non-convergence")
        if r.get("tool") == "lmmfast" and "D" in r:
            what.append(f"method {r['method']}, {r['ntheta']} θ, dense block D = {r['D']}: "
                        f"floor = Cholesky {r['floor_chol_ms']:.3g} ms + copy of A22 "
                        f"({r['A22_mb']:.3g} MB) and A21 ({r['A21_mb']:.3g} MB) "
                        f"{r['floor_copy_ms']:.3g} ms")
        elif r.get("tool") == "lmmfast" and "method" in r:
            what.append(f"method {r['method']}, {r['ntheta']} θ (no floor: not blocked)")
        if "reason" in r:
            what.append(r["reason"])
        notes.extend(f"note [{r['number']} {r['rung']} / {r['tool']}]: {msg}" for msg in what)
    return notes


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rungs", nargs="+", metavar="NAME",
                   help="rungs to run, by name or ladder number (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="skip the heavy rungs (5 and 6, the million-row simulations)")
    p.add_argument("--tools", nargs="+", choices=TOOLS, metavar="TOOL",
                   help=f"tools to run (default: all available: {', '.join(TOOLS)})")
    p.add_argument("--repeat", type=int, default=10, help="most timed fits per rung and tool")
    p.add_argument("--budget", type=float, default=5.0,
                   help="stop timing a rung/tool after this many seconds (at least 1 fit)")
    p.add_argument("--min-repeat", type=int, default=3,
                   help="fewest timed fits for lmmfast, whatever the budget (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed fits before timing")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="kill a tool still fitting a rung after this many seconds (default 900)")
    p.add_argument("--lmmfast-timeout", type=float, default=3600.0,
                   help="the same limit for lmmfast (default 3600: its number is the point of "
                        "the run, so it gets a longer leash than the peers)")
    p.add_argument("--obj-tol", type=float, default=1e-3,
                   help="objective gap counted as the same optimum (default 1e-3)")
    p.add_argument("--no-r", action="store_true", help="do not run lme4")
    p.add_argument("--no-peers", action="store_true", help="do not run the Python peers")
    p.add_argument("--peers-python", metavar="PATH",
                   help="interpreter of the peer environment (default: "
                        "benchmarks/.venv-peers/bin/python if it exists)")
    p.add_argument("--blas-threads", type=int, metavar="N",
                   help="set OPENBLAS_NUM_THREADS=N for every worker (default: inherit)")
    p.add_argument("--out", metavar="FILE", help="also write all results as JSON to FILE")
    p.add_argument("--list", action="store_true", help="list the rungs and exit")
    p.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=2, metavar=("TOOL", "SPEC"), help=argparse.SUPPRESS)
    p.add_argument("--probe-peers", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def child_env(args) -> dict:
    """The environment for every worker, with ``OPENBLAS_NUM_THREADS`` if requested."""
    env = dict(os.environ)
    if args.blas_threads is not None:
        env["OPENBLAS_NUM_THREADS"] = str(args.blas_threads)
    return env


def selected_rungs(args) -> list:
    rungs = find_rungs(args.rungs) if args.rungs else list(RUNGS)
    if args.quick:
        rungs = [r for r in rungs if not r.heavy]
    return rungs


def run_all(args) -> tuple:
    """Run the selected rungs; return ``(records, meta)``."""
    env = child_env(args)
    rungs = selected_rungs(args)
    tools = [t for t in TOOLS if (args.tools is None or t in args.tools)
             and not (args.no_r and t == "lme4") and not (args.no_peers and t in PEERS)]
    meta = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine_info(), "python": python_versions(),
            "openblas_threads": env.get("OPENBLAS_NUM_THREADS"), "repeat": args.repeat,
            "budget": args.budget, "warmup": args.warmup, "min_repeat": args.min_repeat,
            "timeout": args.timeout, "lmmfast_timeout": args.lmmfast_timeout,
            "obj_tol": args.obj_tol, "scale": args.scale,
            "rungs": [r.name for r in rungs], "tools": tools,
            "command": " ".join(["python", "benchmarks/run.py"] + sys.argv[1:])}
    meta["load_start"] = meta["machine"]["loadavg"]
    meta["r"] = None if args.no_r or "lme4" not in tools else probe_r(env)
    if meta["r"] is None:
        meta["r_reason"] = ("--no-r" if args.no_r or "lme4" not in tools
                            else "Rscript with lme4 and jsonlite not found")
    peers_python = args.peers_python or (str(DEFAULT_PEERS_PYTHON)
                                         if DEFAULT_PEERS_PYTHON.exists() else None)
    meta["peers_python"] = peers_python
    meta["peers"] = {} if args.no_peers else probe_peers(peers_python, env)
    if not meta["peers"]:
        meta["peers_reason"] = ("--no-peers" if args.no_peers else
                                f"no usable interpreter at {peers_python or DEFAULT_PEERS_PYTHON}")
    ctx = {"tools": tools, "peers_python": peers_python,
           "peer_versions": {k for k in meta["peers"] if k in PEERS}}
    records = []
    with tempfile.TemporaryDirectory(prefix="lmmfast-bench-") as tmp:
        workdir = Path(tmp)
        ctx["r_script"] = None
        ctx["r_reason"] = meta.get("r_reason", "")
        if meta["r"] is not None:
            ctx["r_script"] = workdir / "lme4_worker.R"
            ctx["r_script"].write_text(R_WORKER)
        for rung in rungs:
            records.extend(run_rung(rung, workdir, ctx, env, args))
            if args.out:       # keep what is done so far
                Path(args.out).write_text(json.dumps({"meta": meta, "records": records},
                                                     indent=1))
    meta["load_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return records, meta


def main(argv=None) -> None:
    """Entry point: run the benchmark (or one worker) and print the table."""
    args = parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return
    if args.probe_peers:
        peer_probe()
        return
    if args.list:
        for r in RUNGS:
            print(f"{r.number}  {r.name:22s} {'REML' if r.reml else 'ML  '}  {r.formula}"
                  f"{'   (heavy)' if r.heavy else ''}")
        return
    def interrupted(signum, frame):      # SIGTERM: unwind, so workers and temp files go too
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupted)
    records, meta = run_all(args)
    print(format_table(records))
    print()
    targets = format_targets(records, args.obj_tol)
    if targets:
        print(targets)
        print()
    print(format_footer(meta, records))
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "records": records}, indent=1))


if __name__ == "__main__":
    main()

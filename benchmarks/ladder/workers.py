"""The Python worker processes (``run.py --worker TOOL SPEC``): the memory readings of the
process (current and peak RSS, the BLAS libraries mapped), then, per tool, how to prepare the
data, fit the rung (the timed part) and describe the fit, the timing loop, and the two
child-process entries (:func:`worker`, :func:`peer_probe`).  The peers' workers run with the peer
environment's interpreter, which has no lmmfast: every tool's library is imported inside its
functions only.
"""
from __future__ import annotations

import gc
import importlib
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from ladder.common import FITTED, MARKER, PEER_MODULES, PEERS, START
from ladder.data import read_data
from ladder.report import git_revision
from ladder.rungs import find_rung


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
    out.update(eval_timings(fit))
    return out


def _best_times(fns, budget: float = 4.0, most: int = 15) -> list:
    """Fewest seconds of each of ``fns`` over up to ``most`` rounds or about ``budget``
    seconds, each round calling every one once in turn (so that an evaluation and its
    floor see the same machine; the minimum: neither should carry a busy moment)."""
    times = [[] for _ in fns]
    spent = 0.0
    while len(times[0]) < most and (not times[0] or spent < budget):
        for t, fn in zip(times, fns):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
            spent += t[-1]
    return [min(t) for t in times]


def eval_timings(fit) -> dict:
    """One objective evaluation at θ̂ (the same call the optimizer makes), with the
    gradient where the fit used it (L-BFGS-B), and for the blocked method its floor, in
    ms: one dense Cholesky (``scipy.linalg.cholesky``) of a random SPD matrix the size D
    of the dense block (``model.pls.xp.D``) plus one pass over the stored cross-products (a
    copy of ``A22`` and of ``A21``) -- an evaluation has to factor that block and read
    those.  All measured round by round, the fastest of up to 15 rounds each."""
    model, theta = fit.model, np.asarray(fit.theta, dtype=float)
    fns = [lambda: model.objective(theta)]
    if fit.optsummary.optimizer == "lbfgs":
        fns.append(lambda: model.objective_and_gradient(theta))
    blocked = getattr(model, "method", None) == "blocked"
    if blocked:
        import scipy.linalg
        xp = model.pls.xp
        D = int(xp.D)
        rng = np.random.default_rng(0)
        S = rng.random((D, D))
        S += S.T
        S[np.diag_indices(D)] += 2.0 * D            # diagonally dominant: SPD
        fns.append(lambda: scipy.linalg.cholesky(S, lower=True, check_finite=False))
        fns.append(lambda: (xp.A22.copy(), xp.A21.copy()))
    best = _best_times(fns)
    out = {"eval_ms": 1000 * best[0]}
    if fit.optsummary.optimizer == "lbfgs":
        out["eval_grad_ms"] = 1000 * best[1]
    if blocked:
        chol, copy = best[-2:]
        out.update({"D": D, "floor_chol_ms": 1000 * chol, "floor_copy_ms": 1000 * copy,
                    "floor_ms": 1000 * (chol + copy),
                    "A22_mb": xp.A22.nbytes / 2 ** 20, "A21_mb": xp.A21.nbytes / 2 ** 20})
    return out


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
               min_repeat: int = 1, timeout: Optional[float] = None, warmup_time: float = 0.0):
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
        Untimed fits before timing ...
    warmup_time : float
        ... and more of them while the untimed fits have taken less than this in all.
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
        # No forced collection between fits: a full gc.collect() walks every object and
        # leaves the caches cold, which costs a sub-millisecond Python-level fit more than
        # the fit itself (measured: 2.2 -> 3.7 ms on sleepstudy); fits in a loop, as users
        # run them, see no such pass.  Every Python tool is timed the same way.
        w0, c0 = time.perf_counter(), time.process_time()
        res = fit()
        w1, c1 = time.perf_counter(), time.process_time()
        print(f"{FITTED} {w1 - w0:.6f}", flush=True)
        return res, w1 - w0, c1 - c0

    # one fit alive at a time: the last one is dropped before the next begins (kept, it
    # would add a whole model to the next fit's peak memory)
    result = None
    warm = 0.0
    for i in range(max(warmup, 1) if warmup_time > 0 else warmup):
        result = None
        result, w, c = one()
        warm += w
        if w >= budget:
            wall, cpu, warm_kept = [w], [c], True
            break
    # short fits: keep warming up until warmup_time seconds are spent (the first dozens of
    # sub-millisecond fits run measurably slower: cold caches, Python's adaptive
    # interpreter specialising the code); one long fit is warm-up enough
    while not warm_kept and warm < warmup_time:
        result = None
        result, w, c = one()
        warm += w
    while True:
        enough = len(wall) >= nrepeat or sum(wall) >= budget
        if wall and (len(wall) >= min_repeat or sum(wall) > 20 * budget) and enough:
            break
        if wall and timeout is not None and \
                time.perf_counter() - t_start + max(wall) > timeout:
            break
        result = None
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
            spec["min_repeat"].get(tool, 1), spec["timeouts"].get(tool, spec["timeout"]),
            spec.get("warmup_time", 0.0))
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

#!/usr/bin/env python
"""Time lmmfast against lme4 (and statsmodels, if importable) on the same models, in one run.

Usage::

    python benchmarks/run.py [--rungs NAME ...] [--repeat N] [--budget SEC] [--no-r]
                             [--blas-threads N] [--out FILE.json] [--list]

Every fit runs in a fresh child process per rung and tool -- ``python benchmarks/run.py
--worker TOOL SPEC`` for the Python tools, ``Rscript`` for lme4 -- so that the peak memory
reported is that process's own high-water mark (``VmHWM`` in ``/proc/self/status``).  Each
child reads the same CSV written by this script, fits once to warm up, then repeats the fit
until ``--repeat`` fits are timed or ``--budget`` seconds are spent (at least one), and prints
one JSON line that this script parses.  The table reports the median time per fit.

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
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

MARKER = "BENCH_JSON:"
HERE = Path(__file__).resolve().parent
REPO = HERE.parent


# ---------------------------------------------------------------------------------- rungs
@dataclass(frozen=True)
class Rung:
    """One model to benchmark.

    Attributes
    ----------
    name : str
        Short identifier, used by ``--rungs``.
    load : callable
        ``load() -> DataFrame``; factor columns as strings (they become R factors with
        C-locale sorted levels).  Must not depend on global state other than a fixed seed.
    formula : str
        The formula given to ``lmmfast.lmer``.
    r_formula : str
        The formula given to ``lme4::lmer``.
    reml : bool
        REML (True) or ML (False), for every tool.
    statsmodels : callable, optional
        ``statsmodels(df, reml) -> MixedLMResults`` fitting the same model with statsmodels'
        ``MixedLM``; None where statsmodels cannot express it (reported as n/a).
    description : str
        One line for the README.
    """

    name: str
    load: Callable[[], pd.DataFrame]
    formula: str
    r_formula: str
    reml: bool
    statsmodels: Optional[Callable] = None
    description: str = ""


def shipped(name: str) -> Callable[[], pd.DataFrame]:
    """Return a loader for one of the datasets shipped in ``lmmfast.datasets``.

    Parameters
    ----------
    name : str
        Dataset name, e.g. ``"sleepstudy"``.
    """
    def load() -> pd.DataFrame:
        from lmmfast import datasets
        return datasets.load(name)
    load.__name__ = f"shipped_{name}"
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


RUNGS = [
    Rung("sleepstudy", shipped("sleepstudy"),
         "Reaction ~ Days + (Days | Subject)", "Reaction ~ Days + (Days | Subject)", True,
         statsmodels=sm_sleepstudy,
         description="180 obs; correlated random intercept + slope for 18 subjects (3 θ)."),
    Rung("penicillin", shipped("penicillin"),
         "diameter ~ 1 + (1 | plate) + (1 | sample)", "diameter ~ 1 + (1 | plate) + (1 | sample)",
         True, statsmodels=sm_penicillin,
         description="144 obs; fully crossed intercepts, 24 plates x 6 samples (2 θ)."),
    Rung("insteval-ml", shipped("insteval"),
         "y ~ 1 + service + (1 | s) + (1 | d) + (1 | dept)",
         "y ~ 1 + service + (1 | s) + (1 | d) + (1 | dept)", False,
         description="73,421 obs; crossed intercepts for 2,972 students, 1,128 lecturers, "
                     "14 departments (3 θ), ML."),
    Rung("insteval-service-dept", shipped("insteval"),
         "y ~ 1 + service * dept + (1 | s) + (1 | d)",
         "y ~ 1 + service * dept + (1 | s) + (1 | d)", True,
         description="73,421 obs; 28 fixed effects (service x dept), crossed intercepts for "
                     "students and lecturers (2 θ), REML."),
]


def find_rung(name: str) -> Rung:
    """Return the rung called ``name`` from :data:`RUNGS`."""
    for rung in RUNGS:
        if rung.name == name:
            return rung
    raise SystemExit(f"unknown rung {name!r}; available: {', '.join(r.name for r in RUNGS)}")


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
def fit_lmmfast(spec: dict, df: pd.DataFrame):
    """Fit the spec's model with lmmfast (model construction included, as in ``lme4::lmer``)."""
    import lmmfast
    return lmmfast.lmer(spec["formula"], df, REML=spec["reml"])


def describe_lmmfast(fit) -> dict:
    """Evaluations, objective and convergence of an lmmfast fit."""
    opt = fit.optsummary
    return {"feval": int(opt.feval), "objective": float(fit.objective),
            "converged": bool(opt.converged), "messages": [str(m) for m in opt.messages]}


def fit_statsmodels(spec: dict, df: pd.DataFrame):
    """Fit the spec's rung with statsmodels' MixedLM (the rung must define ``statsmodels``)."""
    return find_rung(spec["rung"]).statsmodels(df, spec["reml"])


def describe_statsmodels(fit) -> dict:
    """Function evaluations (over all optimizers tried), -2 log-likelihood and convergence."""
    hist = getattr(fit, "hist", None) or []
    fcalls = [h.get("fcalls") for h in hist if isinstance(h, dict)]
    feval = sum(fcalls) if fcalls and None not in fcalls else None
    return {"feval": feval, "objective": -2.0 * float(fit.llf),
            "converged": bool(fit.converged), "messages": []}


# tool -> (module imported before the data is read, fit(spec, df), describe(fit))
PY_TOOLS = {
    "lmmfast": ("lmmfast", fit_lmmfast, describe_lmmfast),
    "statsmodels": ("statsmodels.formula.api", fit_statsmodels, describe_statsmodels),
}


def read_bench_csv(spec: dict) -> pd.DataFrame:
    """Read the rung's CSV with its factor columns as strings (as R reads them)."""
    return pd.read_csv(spec["csv"], dtype={c: str for c in spec["factors"]},
                       keep_default_na=False, na_values=[""])


def timed_fits(fit: Callable[[], object], nrepeat: int, budget: float, warmup: int):
    """Fit ``warmup`` times untimed, then time fits until ``nrepeat`` or ``budget`` s spent.

    Parameters
    ----------
    fit : callable
        ``fit() -> result``.
    nrepeat : int
        Most timed fits.
    budget : float
        Stop timing once this many seconds of fitting have been spent (at least one fit).
    warmup : int
        Untimed fits before timing.

    Returns
    -------
    wall, cpu : list of float
        Seconds per timed fit (wall clock; process CPU over all threads).
    result : object
        The last fit.
    """
    for _ in range(warmup):
        fit()
    wall, cpu = [], []
    while True:
        gc.collect()
        w0, c0 = time.perf_counter(), time.process_time()
        result = fit()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
        if len(wall) >= nrepeat or sum(wall) >= budget:
            return wall, cpu, result


def worker(tool: str, spec_path: str) -> None:
    """Child-process entry: time one Python tool on one rung and print a JSON line."""
    spec = json.loads(Path(spec_path).read_text())
    module, fit, describe = PY_TOOLS[tool]
    importlib.import_module(module)  # as R loads lme4 first: imports are not in the timings
    df = read_bench_csv(spec)
    base = memory_mb()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wall, cpu, result = timed_fits(lambda: fit(spec, df), spec["nrepeat"], spec["budget"],
                                       spec["warmup"])
    out = describe(result)
    out["messages"] = sorted(set(out["messages"]) | {str(w.message) for w in caught})
    peak = memory_mb()
    out.update(tool=tool, wall=wall, cpu=cpu, base_mb=base["rss"], peak_mb=peak["hwm"],
               blas=loaded_blas())
    print(MARKER + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------- R / lme4
R_WORKER = r"""
args <- commandArgs(trailingOnly = TRUE)
spec <- jsonlite::fromJSON(args[[1]])
memory_mb <- function() {
  f <- "/proc/self/status"
  if (!file.exists(f)) return(list(rss = NA, hwm = NA))
  s <- readLines(f)
  get <- function(key) as.numeric(gsub("[^0-9]", "", grep(paste0("^", key, ":"), s, value = TRUE))) / 1024
  list(rss = get("VmRSS"), hwm = get("VmHWM"))
}
suppressPackageStartupMessages(library(lme4))
factors <- as.character(unlist(spec$factors))
classes <- if (length(factors)) setNames(rep("character", length(factors)), factors) else NA
d <- read.csv(spec$csv, colClasses = classes, na.strings = "", check.names = FALSE)
for (v in factors) d[[v]] <- factor(d[[v]], levels = sort(unique(d[[v]]), method = "radix"))
form <- as.formula(spec$r_formula)
msgs <- character(0)
fit <- function() withCallingHandlers(
  lmer(form, data = d, REML = spec$reml),
  warning = function(w) { msgs <<- c(msgs, conditionMessage(w)); invokeRestart("muffleWarning") },
  message = function(m) { msgs <<- c(msgs, trimws(conditionMessage(m))); invokeRestart("muffleMessage") })
base <- memory_mb()
for (i in seq_len(spec$warmup)) m <- fit()
wall <- numeric(0); cpu <- numeric(0)
repeat {
  invisible(gc())
  w0 <- Sys.time(); c0 <- proc.time()
  m <- fit()
  c1 <- proc.time(); w1 <- Sys.time()
  wall <- c(wall, as.numeric(difftime(w1, w0, units = "secs")))
  cpu <- c(cpu, (c1 - c0)[["user.self"]] + (c1 - c0)[["sys.self"]])
  if (length(wall) >= spec$nrepeat || sum(wall) >= spec$budget) break
}
conv <- m@optinfo$conv$opt
out <- list(tool = "lme4", wall = I(wall), cpu = I(cpu), feval = m@optinfo$feval,
            objective = -2 * as.numeric(logLik(m)), converged = identical(as.integer(conv), 0L),
            messages = I(unique(msgs)), base_mb = base$rss, peak_mb = memory_mb()$hwm)
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
    except RuntimeError:
        return None
    return info if info.get("ok") else None


# ---------------------------------------------------------------------------------- orchestration
def run_child(cmd: list, env: dict) -> dict:
    """Run a worker process and return the JSON it printed after :data:`MARKER`.

    Raises
    ------
    RuntimeError
        If the process fails or prints no result; the message carries its stderr tail.
    """
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"exit {proc.returncode}: " + " | ".join(tail))
    return json.loads(lines[-1][len(MARKER):])


def write_inputs(rung: Rung, df: pd.DataFrame, workdir: Path, args) -> Path:
    """Write the rung's data (CSV) and its spec (JSON) for the workers; return the spec path."""
    csv = workdir / f"{rung.name}.csv"
    df.to_csv(csv, index=False, na_rep="")
    factors = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    spec = {"rung": rung.name, "csv": str(csv), "factors": factors, "formula": rung.formula,
            "r_formula": rung.r_formula, "reml": rung.reml, "nrepeat": args.repeat,
            "budget": args.budget, "warmup": args.warmup}
    path = workdir / f"{rung.name}.json"
    path.write_text(json.dumps(spec))
    return path


def tool_commands(rung: Rung, spec: Path, r_script: Optional[Path], have_sm: bool) -> dict:
    """The command line per tool for ``rung`` (None: the tool cannot express the rung)."""
    cmds = {"lmmfast": [sys.executable, str(Path(__file__).resolve()), "--worker", "lmmfast",
                        str(spec)]}
    if have_sm:
        cmds["statsmodels"] = (None if rung.statsmodels is None else
                               [sys.executable, str(Path(__file__).resolve()), "--worker",
                                "statsmodels", str(spec)])
    if r_script is not None:
        cmds["lme4"] = ["Rscript", str(r_script), str(spec)]
    return cmds


def run_rung(rung: Rung, workdir: Path, r_script, have_sm: bool, env: dict, args) -> list:
    """Run every tool on ``rung`` one after another; return one record per tool."""
    spec = write_inputs(rung, rung.load(), workdir, args)
    records = []
    for tool, cmd in tool_commands(rung, spec, r_script, have_sm).items():
        record = {"rung": rung.name, "tool": tool}
        if cmd is None:
            record["error"] = f"n/a: {tool} cannot express this model (not run)"
        else:
            print(f"[{rung.name}] {tool} ...", end=" ", file=sys.stderr, flush=True)
            record["load_before"] = load_average()
            try:
                record.update(run_child(cmd, env))
                record["time"] = statistics.median(record["wall"])
                print(f"{record['time']:.4g} s x {len(record['wall'])}", file=sys.stderr)
            except RuntimeError as exc:
                record["error"] = str(exc)
                print("failed", file=sys.stderr)
        records.append(record)
    add_ratios(records)
    return records


def add_ratios(records: list) -> None:
    """Add ``speedup`` (lme4 time / tool time) and ``dobj`` (objective - lme4's) in place."""
    ref = next((r for r in records if r["tool"] == "lme4" and "time" in r), None)
    for r in records:
        if ref is None or "time" not in r:
            continue
        r["speedup"] = ref["time"] / r["time"]
        r["dobj"] = r["objective"] - ref["objective"]


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
    """Versions of Python and the libraries of the Python side."""
    import numpy
    import scipy
    import lmmfast
    versions = {"python": platform.python_version(), "numpy": numpy.__version__,
                "scipy": scipy.__version__, "pandas": pd.__version__,
                "lmmfast": f"{lmmfast.__version__} ({git_revision()})"}
    try:
        import statsmodels
        versions["statsmodels"] = statsmodels.__version__
    except ImportError:
        pass
    return versions


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


def table_row(r: dict) -> list:
    """The cells of one record's table row."""
    if "time" not in r:
        status = "n/a" if r.get("error", "n/a").startswith("n/a") else "failed"
        return [r["rung"], r["tool"], status] + ["-"] * (len(HEADER) - 3)
    feval = r.get("feval")
    ms_eval = 1000.0 * r["time"] / feval if feval else None
    base = r.get("base_mb")
    extra = None if base is None or r.get("peak_mb") is None else r["peak_mb"] - base
    return [r["rung"], r["tool"], f"{r['time']:.4g}", str(len(r["wall"])),
            f"{statistics.median(r['cpu']):.4g}", fmt(feval, "d"), fmt(ms_eval, ".3g"),
            f"{r['objective']:.4f}", fmt(r.get("peak_mb"), ".0f"), fmt(extra, ".0f"),
            fmt(r.get("speedup"), ".2f"), fmt(r.get("dobj"), "+.2e")]


HEADER = ["rung", "tool", "time (s)", "n", "cpu (s)", "evals", "ms/eval", "objective",
          "peak MB", "+MB", "vs lme4", "Δobj vs lme4"]


def format_table(records: list) -> str:
    """Fixed-width table of all records (text columns left-, numbers right-aligned)."""
    rows = [HEADER] + [table_row(r) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]

    def line(row):
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), rule] + [line(row) for row in rows[1:]])


def format_footer(meta: dict, records: list) -> str:
    """Machine, versions, BLAS, settings and per-fit messages, below the table."""
    m, v, r = meta["machine"], meta["python"], meta.get("r")
    lines = [
        "time: median wall seconds per fit (model setup + optimisation, data load excluded) over "
        f"n timed fits after {meta['warmup']} warm-up fit(s); cpu: median process CPU seconds "
        "per fit (all threads)",
        "evals: objective evaluations (lmmfast optsummary.feval, lme4 @optinfo$feval, "
        "statsmodels fcalls); ms/eval: time / evals (includes model setup)",
        "objective: REML criterion or deviance (-2 logLik), as the rung is REML or ML",
        "peak MB: the fitting process's peak RSS (VmHWM); +MB: peak minus RSS after loading data",
        "vs lme4: lme4 time / tool time (>1: faster than lme4); Δobj: objective - lme4's "
        "(>0: worse optimum)",
        "",
        f"date: {meta['date']}",
        f"machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"{m['memory_gb']} GB RAM, {m['os']}; load average at start "
        f"{fmt_load(meta['load_start'])}, at end {fmt_load(meta['load_end'])}",
        "python side: " + ", ".join(f"{k} {val}" for k, val in v.items()),
    ]
    blas = sorted({b for rec in records if rec["tool"] == "lmmfast" for b in rec.get("blas", [])})
    lines.append("lmmfast BLAS/LAPACK/CHOLMOD libraries loaded: " + (", ".join(blas) or "n/a"))
    if r is None:
        lines.append("R side: not run (" + meta.get("r_reason", "") + ")")
    else:
        lines.append(f"R side: {r['R']}, lme4 {r['lme4']}, Matrix {r['Matrix']}")
        lines.append(f"R BLAS: {r['blas']}; LAPACK: {r['lapack']}")
    if "statsmodels" not in v:
        lines.append("statsmodels: not importable, skipped")
    threads = meta["openblas_threads"]
    lines.append(f"OPENBLAS_NUM_THREADS={threads if threads is not None else 'unset'} (both sides); "
                 f"--repeat {meta['repeat']}, --budget {meta['budget']} s, --warmup {meta['warmup']}")
    lines.extend(format_notes(records, m["usable_cores"]))
    return "\n".join(lines)


def fmt_load(load) -> str:
    """Load averages as ``1.00/0.50/0.20``."""
    return "n/a" if load is None else "/".join(f"{x:.2f}" for x in load)


def format_notes(records: list, cores: int) -> list:
    """Warnings, non-convergence, errors and a busy machine per fit, as footnote lines.

    Parameters
    ----------
    records : list of dict
    cores : int
        Usable cores: a 1-minute load average above this before a fit flags its timing.
    """
    notes = []
    for r in records:
        what = list(r.get("messages") or [])
        load = r.get("load_before")
        if "time" in r and load is not None and load > cores:
            what.append(f"1-min load average {load:.2f} > {cores} cores before this run: "
                        "the machine was busy, timing unreliable")
        if "time" in r and not r.get("converged", True):
            what.insert(0, "optimizer reports non-convergence")
        if "error" in r:
            what.append(r["error"])
        notes.extend(f"note [{r['rung']} / {r['tool']}]: {msg}" for msg in what)
    return notes


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rungs", nargs="+", metavar="NAME", help="rungs to run (default: all)")
    p.add_argument("--repeat", type=int, default=10, help="most timed fits per rung and tool")
    p.add_argument("--budget", type=float, default=5.0,
                   help="stop timing a rung/tool after this many seconds (at least 1 fit)")
    p.add_argument("--warmup", type=int, default=1, help="untimed fits before timing")
    p.add_argument("--no-r", action="store_true", help="do not run lme4")
    p.add_argument("--blas-threads", type=int, metavar="N",
                   help="set OPENBLAS_NUM_THREADS=N for every worker (default: inherit)")
    p.add_argument("--out", metavar="FILE", help="also write all results as JSON to FILE")
    p.add_argument("--list", action="store_true", help="list the rungs and exit")
    p.add_argument("--worker", nargs=2, metavar=("TOOL", "SPEC"), help=argparse.SUPPRESS)
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


def run_all(args) -> tuple:
    """Run the selected rungs; return ``(records, meta)``."""
    env = child_env(args)
    rungs = [find_rung(n) for n in args.rungs] if args.rungs else RUNGS
    meta = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine_info(), "python": python_versions(),
            "openblas_threads": env.get("OPENBLAS_NUM_THREADS"), "repeat": args.repeat,
            "budget": args.budget, "warmup": args.warmup}
    meta["load_start"] = meta["machine"]["loadavg"]
    meta["r"] = None if args.no_r else probe_r(env)
    if meta["r"] is None:
        meta["r_reason"] = "--no-r" if args.no_r else "Rscript with lme4 and jsonlite not found"
    have_sm = "statsmodels" in meta["python"]
    records = []
    with tempfile.TemporaryDirectory(prefix="lmmfast-bench-") as tmp:
        workdir = Path(tmp)
        r_script = None
        if meta["r"] is not None:
            r_script = workdir / "lme4_worker.R"
            r_script.write_text(R_WORKER)
        for rung in rungs:
            records.extend(run_rung(rung, workdir, r_script, have_sm, env, args))
    meta["load_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return records, meta


def main(argv=None) -> None:
    """Entry point: run the benchmark (or one worker) and print the table."""
    args = parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return
    if args.list:
        for r in RUNGS:
            print(f"{r.name:24s} {'REML' if r.reml else 'ML  '}  {r.formula}")
        return
    records, meta = run_all(args)
    print(format_table(records))
    print()
    print(format_footer(meta, records))
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "records": records}, indent=1))


if __name__ == "__main__":
    main()

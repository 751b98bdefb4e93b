"""The report: the machine and versions of a run, the fixed-width table of all records, the
footer below it (what each column means, machine, versions, BLAS, settings, per-fit notes),
and the issue's targets, each judged MET, MISSED or n/a from the records.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
from typing import Optional

import numpy as np
import pandas as pd

from ladder.common import PEERS, REPO, obj_tolerance
from ladder.rungs import RUNGS, find_rung


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
          "eval ms", "floor ms/eval", "objective", "peak MB", "+MB", "vs lme4", "Δobj vs lme4"]


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
            fmt(r.get("eval_ms"), ".3g", "-" if r["tool"] != "lmmfast" else "n/a"),
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
        r = lm(rung.name) if rung.name in ran else None
        if r is not None and r.get("floor_ms") and r.get("eval_ms") is not None:
            add(f"rung {rung.label}: one objective evaluation within 2x of the floor",
                r["eval_ms"] <= 2 * r["floor_ms"],
                f"{r['eval_ms']:.3g} ms vs floor {r['floor_ms']:.3g} ms "
                f"({r['eval_ms'] / r['floor_ms']:.2f}x)")
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
        f"excluded) over n timed fits after {meta['warmup']} warm-up fit(s), more until "
        f"{meta.get('warmup_time', 0):g} s of warm-up fits were spent (a warm-up fit "
        f"of >= {meta['budget']} s counts as the first timed fit); cpu: median process CPU "
        "seconds per fit (all threads)",
        "evals: objective evaluations (lmmfast optsummary.feval, lme4 @optinfo$feval, "
        "statsmodels summed fcalls, mixedlm function_evals = scipy nfev of value+gradient "
        "calls); * = optimizer iterations, not evaluations (lme-python: Nelder-Mead/grid "
        "iterations; gpboost: L-BFGS iterations); ms/eval: time / evals (includes model setup)",
        "eval ms (lmmfast): one objective evaluation at the estimate, model.objective(θ̂), "
        "fastest of up to 15 rounds (ms/eval above also carries the set-up and, with L-BFGS-B, "
        "the gradients)",
        "floor ms/eval (lmmfast, method 'blocked'): one scipy.linalg.cholesky of a random SPD "
        "matrix of the dense block's size D plus one copy of the stored cross-products "
        "A22 and A21 (fastest of up to 15 rounds each), measured in the lmmfast worker in turn "
        "with the evaluation, round by round",
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
                 f"{meta['warmup']}, --warmup-time {meta.get('warmup_time', 0):g} s, --passes "
                 f"{meta.get('passes', 1)} (fits under {meta.get('pass_limit', 0):g} s), --min-repeat {meta['min_repeat']} (lmmfast), --timeout "
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
        if r.get("tool") == "lmmfast" and "eval_grad_ms" in r:
            what.append(f"objective with its gradient at θ̂ (L-BFGS-B's evaluation): "
                        f"{r['eval_grad_ms']:.3g} ms")
        if "reason" in r:
            what.append(r["reason"])
        notes.extend(f"note [{r['number']} {r['rung']} / {r['tool']}]: {msg}" for msg in what)
    return notes

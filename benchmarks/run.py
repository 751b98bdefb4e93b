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
wrote once per rung, prepares what its library needs, prints ``BENCH_START``, fits to warm up
(``--warmup`` fits, more until ``--warmup-time`` seconds are spent), then repeats the fit
until ``--repeat`` fits are timed or ``--budget`` seconds are spent, and prints one JSON line that this script parses.  A child still fitting ``--timeout``
seconds after ``BENCH_START`` is killed and shown as ``timeout (> N s)``.

A rung is one entry of :data:`RUNGS` (``benchmarks/ladder/rungs.py``); add a :class:`Rung`
there to benchmark another model (simulated data: give it a ``load`` function that builds the
data frame from a fixed seed).  The parts live in the ``ladder`` package next to this file
(imported by path: this script's directory is ``sys.path[0]``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ladder.child import ChildTimeout, run_child
from ladder.common import DEFAULT_PEERS_PYTHON, PEERS, TOOLS, obj_tolerance
from ladder.data import write_data
from ladder.rdriver import R_WORKER, probe_peers, probe_r
from ladder.report import (format_footer, format_table, format_targets, load_average,
                           machine_info, python_versions)
from ladder.rungs import RUNGS, Rung, find_rungs
from ladder.workers import peer_probe, worker


# ---------------------------------------------------------------------------------- orchestration
def write_inputs(rung: Rung, workdir: Path, args) -> Path:
    """Load the rung's data, write its column files and spec (JSON); return the spec path."""
    df = rung.load(args.scale)
    columns, nrow = write_data(df, workdir, rung.name)
    spec = {"rung": rung.name, "columns": columns, "nrow": nrow, "formula": rung.formula,
            "r_formula": rung.r_formula, "reml": rung.reml, "formulas": {t: f for t, (f, _) in rung.formulas.items()},
            "response": rung.formula.split("~")[0].strip(), "nrepeat": args.repeat,
            "budget": args.budget, "warmup": args.warmup, "warmup_time": args.warmup_time,
            "timeout": args.timeout,
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
        elif tool == "gpboost" and rung.gpboost is None:
            cmds[tool] = "cannot express: no gpboost spelling of this rung's model is given"
        elif tool not in ctx["peer_versions"]:
            cmds[tool] = "skipped: not installed in the peer environment " \
                         f"({ctx['peers_python'] or 'none'})"
        else:
            cmds[tool] = [ctx["peers_python"], me, "--worker", tool, str(spec)]
    return cmds


def run_tool(rung: Rung, tool: str, cmd, env: dict, args) -> dict:
    """One worker process for ``tool`` on ``rung``: its record (status, timings, objective)."""
    record = {"rung": rung.name, "number": rung.number, "tool": tool}
    if isinstance(cmd, str):
        record["status"] = cmd.split(":")[0]
        record["reason"] = cmd
        return record
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
    return record


def merge_passes(first: dict, later: list) -> dict:
    """One record from several passes of a tool: every timed fit pooled (the median of
    all of them is the time), the highest peak memory, the last pass's result."""
    ok = [first] + [r for r in later if r.get("status") == "ok"]
    if len(ok) == 1:
        return first
    out = dict(ok[-1])
    out["wall"] = [w for r in ok for w in r["wall"]]
    out["cpu"] = [c for r in ok for c in r["cpu"]]
    out["time"] = statistics.median(out["wall"])
    out["pass_times"] = [r["time"] for r in ok]
    out["messages"] = list(out.get("messages", [])) + [
        f"{len(ok)} passes (fresh processes, alternating with the other tools), median per "
        "pass: " + ", ".join(f"{t:.3g}" for t in out["pass_times"]) + " s"]
    out["peak_mb"] = max(r["peak_mb"] for r in ok)
    out["elapsed"] = sum(r["elapsed"] for r in ok)
    return out


def run_rung(rung: Rung, workdir: Path, ctx: dict, env: dict, args) -> list:
    """Run every tool on ``rung`` one after another; return one record per tool.

    Tools whose fits take under ``--pass-limit`` seconds run ``--passes`` times, in turn
    (tool A, tool B, ..., then A, B, ... again), each pass a fresh process; their timed
    fits are pooled.  On a shared VM the speed drifts by tens of percent over minutes, so
    back-to-back single runs of two tools compare two different machines; alternating
    passes spread the drift over all of them."""
    print(f"[{rung.label}] writing data ...", file=sys.stderr, flush=True)
    spec = write_inputs(rung, workdir, args)
    gc.collect()
    records = []
    try:
        cmds = tool_commands(rung, spec, ctx)
        for tool, cmd in cmds.items():
            records.append(run_tool(rung, tool, cmd, env, args))
        again = [i for i, r in enumerate(records)
                 if r.get("status") == "ok" and r["time"] < args.pass_limit]
        later = {i: [] for i in again}
        for _ in range(args.passes - 1):
            for i in again:
                later[i].append(run_tool(rung, records[i]["tool"], cmds[records[i]["tool"]],
                                         env, args))
        for i in again:
            records[i] = merge_passes(records[i], later[i])
    finally:
        for path in workdir.glob(f"{rung.name}.*"):
            path.unlink()
    judge(records, args.obj_tol)
    return records


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
    p.add_argument("--repeat", type=int, default=30, help="most timed fits per rung and tool")
    p.add_argument("--budget", type=float, default=5.0,
                   help="stop timing a rung/tool after this many seconds (at least 1 fit)")
    p.add_argument("--min-repeat", type=int, default=3,
                   help="fewest timed fits for lmmfast, whatever the budget (default 3)")
    p.add_argument("--passes", type=int, default=5,
                   help="passes over the tools for fits shorter than --pass-limit (each a "
                        "fresh process, tools alternating; timed fits pooled)")
    p.add_argument("--pass-limit", type=float, default=0.1, metavar="SEC",
                   help="fits shorter than this get --passes passes")
    p.add_argument("--warmup", type=int, default=1, help="untimed fits before timing")
    p.add_argument("--warmup-time", type=float, default=0.5, metavar="SEC",
                   help="keep fitting untimed until the warm-up fits took this long in all "
                        "(every tool alike; sub-millisecond fits run slower while cold)")
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
            "budget": args.budget, "warmup": args.warmup, "warmup_time": args.warmup_time,
            "passes": args.passes, "pass_limit": args.pass_limit, "min_repeat": args.min_repeat,
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

"""Constants shared by the ladder's modules: the markers a worker prints on its stdout (its
result line, the start and end of its fitting), the benchmarks directory and the repository
root, the default interpreter of the peer environment, the tools in table order with the
Python peers' module names, and :func:`obj_tolerance`, the objective gap that counts as the same
optimum (used by the judge and by the targets).
"""
from __future__ import annotations

from pathlib import Path

MARKER = "BENCH_JSON:"
START = "BENCH_START"      # a worker has its data ready and starts fitting (the timeout clock)
FITTED = "BENCH_FITTED"    # a worker has finished fitting (the clock stops)
HERE = Path(__file__).resolve().parent.parent   # benchmarks/
REPO = HERE.parent
DEFAULT_PEERS_PYTHON = HERE / ".venv-peers" / "bin" / "python"

PEERS = ["statsmodels", "mixedlm", "lme-python", "gpboost"]   # the Python peers
TOOLS = ["lmmfast", "lme4"] + PEERS                           # table order
PEER_MODULES = {"statsmodels": "statsmodels", "mixedlm": "mixedlm",
                "lme-python": "lme_python", "gpboost": "gpboost"}


def obj_tolerance(best: float, tol: float) -> float:
    """Objective differences up to this count as the same optimum (abs, or relative at scale)."""
    return max(tol, 1e-10 * abs(best))

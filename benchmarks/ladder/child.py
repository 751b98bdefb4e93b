"""Running one worker process: the parent's side of the protocol.  :func:`run_child` starts a
worker in its own process group, follows its stdout (the start and end of its fitting, each
fit's time), kills it when it runs past its time limit (:class:`ChildTimeout`), and returns the
JSON result line it printed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

from ladder.common import FITTED, MARKER, REPO, START

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
                        if progress and len(fits) <= 12:      # the first dozen fits, then dots
                            print(f"{float(arg):.3g}s", end=" ", file=sys.stderr, flush=True)
                        elif progress and len(fits) % 100 == 0:
                            print(".", end="", file=sys.stderr, flush=True)

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

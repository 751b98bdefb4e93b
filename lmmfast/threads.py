"""The threads of a factorization: OpenMP's pool with its idle threads asleep, BLAS's.

A factorization runs compiled OpenMP loops (the row-wise downdate, the tiled dense
Cholesky of ``_chol``) and calls BLAS.  A habit of these libraries makes a fit several
times slower as soon as other busy processes share the cores (models fitted in parallel
workers, a loaded server), though it costs little on an idle machine: OpenBLAS's threads,
and OpenMP's with the default wait policy, keep spinning after their work is done, taking
the cores the other threads of the same computation wait for.  Measured on 2 cores beside
two busy loops (InstEval ``service*dept``, REML, a 0.4 s fit alone): with OpenBLAS's
threads 1.8 s, and 13 s in half the runs; with the dense algebra in OpenMP's pool alone
1.8-3.9 s; with that pool's idle threads asleep (``OMP_WAIT_POLICY=PASSIVE``) 0.8-1.6 s.

So the kernels (1) factor a large dense block (see ``_pls.TILED_MIN``; any block over
``_pls.SINGLE_MAX`` when ``LMMFAST_NUM_THREADS`` is set) in tiles shared among OpenMP's
threads, calling BLAS on each thread alone through OpenBLAS's thread-local setting
(``openblas_set_num_threads_local``, OpenBLAS 0.3.27 and later), and a small one on one
BLAS thread; middling blocks keep OpenBLAS's threads, which there are faster alone; and (2)
load OpenMP with the passive wait policy unless the user chose one (``OMP_WAIT_POLICY``):
the setting is read once, when the OpenMP runtime is loaded, and the environment is given
back unchanged right after.  Where BLAS has no thread-local setting (another BLAS, an older OpenBLAS), BLAS runs
with its own threads.

That setting is thread-local only in OpenBLAS's OpenMP builds.  In its pthreads builds
(the scipy and numpy wheels', Debian's ``libopenblas0-pthread``) it sets the process's
count: while a factorization runs, BLAS called from the process's other threads runs on
one thread too, and the count is given back when the last factorization running at once
ends (``_chol.blas_single_thread``; set and given back by each thread, fits on two
threads left every later BLAS call in the process on one thread).
"""
from __future__ import annotations

import ctypes
import os

__all__ = ["blas_setters", "load_kernels", "register"]

_registered = None     # how many setters ``_chol`` holds, once looked up


def load_kernels():
    """Import the compiled kernels (which loads the OpenMP runtime) with OpenMP's idle
    threads set to sleep, unless ``OMP_WAIT_POLICY`` is set; the environment is restored."""
    added = "OMP_WAIT_POLICY" not in os.environ
    if added:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        from . import _chol, _pls  # noqa: F401  (the runtime reads its settings on loading)
    finally:
        if added:
            os.environ.pop("OMP_WAIT_POLICY", None)


def blas_setters() -> tuple:
    """``openblas_set_num_threads_local`` of each loaded OpenBLAS library (found by
    threadpoolctl): (addresses, shared), ``shared[i]`` true unless that library was built
    with OpenMP (where the setting is the calling thread's alone)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:                       # pragma: no cover (a declared dependency)
        return [], []
    addrs, shared = [], []
    for lib in ThreadpoolController().lib_controllers:
        if lib.internal_api != "openblas":
            continue
        fn = getattr(getattr(lib, "dynlib", None), "openblas_set_num_threads_local", None)
        if fn is not None:
            addr = ctypes.cast(fn, ctypes.c_void_p).value
            if addr and addr not in addrs:
                addrs.append(addr)
                shared.append(getattr(lib, "threading_layer", None) != "openmp")
    return addrs, shared


def register() -> int:
    """Hand the setters to the kernels (once per process); returns how many there are
    (0: BLAS threads cannot be set per thread here)."""
    global _registered
    if _registered is None:
        from . import _chol

        _registered = _chol.register_blas_setters(*blas_setters())
    return _registered

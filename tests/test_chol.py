"""The tiled dense kernels (``lmmfast._chol``) against numpy, and the factorization's threads.

``potrf`` against ``numpy.linalg.cholesky`` and LAPACK's failure position, ``syrk_lower``
against ``C - W W'``, on random sizes, tile widths and thread counts (hypothesis); the
blocked factor with its dense block tiled against the dense oracle; BLAS's thread-local
setting switched and given back on every thread that calls BLAS.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmmfast
from lmmfast import LinearMixedModel, _chol, _pls, threads
from lmmfast.blocks import BlockedCrossprod
from lmmfast.pls import BlockedPLS, dense_lambda, dense_objective

HSETTINGS = settings(max_examples=60, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow])


def spd(n, seed):
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((n, n + 3))
    return B @ B.T / n + 0.1 * np.eye(n)


@HSETTINGS
@given(st.integers(0, 160), st.integers(1, 48), st.integers(1, 3), st.integers(0, 2 ** 31))
def test_potrf_equals_numpy_cholesky(n, nb, nthreads, seed):
    A = spd(n, seed)
    upper = np.triu(np.full((n, n), 7.0), 1)
    X = np.tril(A) + upper                     # the upper triangle must not be read or written
    assert _chol.potrf(X, nb=nb, nthreads=nthreads) == 0
    if n:
        np.testing.assert_allclose(np.tril(X), np.linalg.cholesky(A), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(np.triu(X, 1), upper)


@HSETTINGS
@given(st.integers(2, 120), st.integers(1, 40), st.integers(1, 3), st.integers(0, 2 ** 31),
       st.data())
def test_potrf_reports_lapacks_failing_minor(n, nb, nthreads, seed, data):
    """A matrix whose leading minor of order j + 1 is the first not positive definite:
    info is j + 1, as LAPACK's dpotrf says."""
    import scipy.linalg.lapack as lapack

    j = data.draw(st.integers(0, n - 1))
    A = spd(n, seed)
    A[j, j] = A[j, :j] @ np.linalg.solve(A[:j, :j], A[:j, j]) - 1.0 if j else -1.0
    _, want = lapack.dpotrf(A, lower=1)
    assert want == j + 1
    assert _chol.potrf(A.copy(), nb=nb, nthreads=nthreads) == want


@HSETTINGS
@given(st.integers(0, 150), st.integers(0, 40), st.integers(1, 48), st.integers(1, 3),
       st.integers(0, 2 ** 31))
def test_syrk_lower_equals_numpy(n, K, nb, nthreads, seed):
    rng = np.random.default_rng(seed)
    C = rng.standard_normal((n, n))
    W = rng.standard_normal((n, K))
    want = C - W @ W.T
    upper = np.triu(C, 1)
    _chol.syrk_lower(C, W, nb=nb, nthreads=nthreads)
    np.testing.assert_allclose(np.tril(C), np.tril(want), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.triu(C, 1), upper)


def test_wrappers_reject_bad_arguments():
    with pytest.raises(ValueError, match="square"):
        _chol.potrf(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="at least 1"):
        _chol.potrf(np.eye(3), nb=0)
    with pytest.raises(ValueError, match="at least 1"):
        _chol.syrk_lower(np.eye(3), np.ones((3, 2)), nthreads=0)
    with pytest.raises(ValueError, match="n×K"):
        _chol.syrk_lower(np.eye(3), np.ones((4, 2)))
    with pytest.raises(ValueError, match="NULL"):
        _chol.register_blas_setters([0])


# ------------------------------------------------------------------ the blocked factor
def crossed_model(formula="y ~ 1 + x + (1|g1) + (1 + x|g2)", n=4000, n1=60, n2=30):
    df, _ = lmmfast.simulate.crossed(n, n1, n2, slope=True, seed=4)
    return LinearMixedModel(formula, df, REML=True, method="blocked")


@pytest.mark.parametrize("heavy_rows", [None, 20])
@pytest.mark.parametrize("transposed", [False, True])
def test_tiled_dense_block_equals_lapack_and_dense(monkeypatch, transposed, heavy_rows):
    """The dense block factored in tiles on several threads (forced on for a small model,
    with heavy levels' update tiled too) gives LAPACK's factor and the dense objective."""
    if not _pls.OPENMP or not threads.register():
        pytest.skip("needs OpenMP and OpenBLAS's thread-local setting")
    model = crossed_model()
    theta = np.abs(np.random.default_rng(8).normal(size=model.ntheta)) + 0.2
    args = (model.terms, model.X, model.y, model.theta_offsets)
    monkeypatch.setattr(_pls, "TILED_MIN", 10 ** 9)
    plain = BlockedPLS(BlockedCrossprod(*args, transposed=transposed, heavy_rows=heavy_rows))
    assert plain._f.chol_threads == 1
    monkeypatch.setattr(_pls, "TILED_MIN", 8)
    monkeypatch.setattr(_pls, "TILE", 7)
    monkeypatch.setenv("LMMFAST_NUM_THREADS", "3")
    xp = BlockedCrossprod(*args, transposed=transposed, heavy_rows=heavy_rows)
    assert heavy_rows is None or len(xp.heavy) > 0
    tiled = BlockedPLS(xp)
    assert tiled._f.chol_threads == 3 and tiled._f.blas_single
    fa, fb = plain.objective(theta, True), tiled.objective(theta, True)
    assert tiled._f.last_chol_threads == 3
    np.testing.assert_allclose(np.tril(tiled.L22), np.tril(plain.L22), rtol=1e-10, atol=1e-10)
    assert fb == pytest.approx(fa, rel=1e-12)
    Z = np.column_stack([t.Z().toarray() for t in model.terms])
    Lam = dense_lambda(model.terms, theta, model.theta_offsets)
    assert fb == pytest.approx(dense_objective(Z, model.X, model.y, Lam, True), rel=1e-9)


def test_tiled_factor_reports_a_dense_block_that_is_not_positive_definite(monkeypatch):
    """A θ at which Ω(θ) is not positive definite (a negative scale on X's rows is not
    possible, so the cross-products are spoiled) gives +inf, tiled as plain."""
    if not _pls.OPENMP or not threads.register():
        pytest.skip("needs OpenMP and OpenBLAS's thread-local setting")
    model = crossed_model()
    monkeypatch.setattr(_pls, "TILED_MIN", 8)
    monkeypatch.setattr(_pls, "TILE", 5)
    monkeypatch.setenv("LMMFAST_NUM_THREADS", "2")
    xp = BlockedCrossprod(model.terms, model.X, model.y, model.theta_offsets)
    xp.A22 = xp.A22.copy()
    xp.A22[-1, -1] = -1.0                           # y'y < 0: the last pivot fails
    pls = BlockedPLS(xp)
    assert pls._f.chol_threads == 2
    assert pls.factor(model.theta_start) == xp.D
    assert pls.objective(model.theta_start, True) == np.inf


@pytest.fixture
def recording_setter():
    """A stand-in for OpenBLAS's thread-local setter that records (thread, value) calls;
    the real setters are registered again afterwards."""
    calls = []
    state = {}
    lock = threading.Lock()
    threads.register()          # first: a model built later must not register the real ones

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)
    def setter(n):
        with lock:
            tid = threading.get_ident()
            calls.append((tid, n))
            prev = state.get(tid, 0)
            state[tid] = n
            return prev

    _chol.register_blas_setters([ctypes.cast(setter, ctypes.c_void_p).value])
    try:
        yield calls, state
    finally:
        _chol.register_blas_setters(*threads.blas_setters())


def test_blas_runs_on_one_thread_during_a_factorization_and_is_given_back(monkeypatch,
                                                                         recording_setter):
    """Every thread that calls BLAS in a factorization first sets its BLAS threads to 1 and
    afterwards gives back what it had; the caller's setting is unchanged after."""
    if not _pls.OPENMP:
        pytest.skip("built without OpenMP")
    calls, state = recording_setter
    model = crossed_model()
    monkeypatch.setattr(threads, "_registered", 1)
    monkeypatch.setattr(_pls, "TILED_MIN", 8)
    monkeypatch.setattr(_pls, "TILE", 6)
    monkeypatch.setenv("LMMFAST_NUM_THREADS", "2")
    pls = BlockedPLS(BlockedCrossprod(model.terms, model.X, model.y, model.theta_offsets))
    assert pls._f.blas_single
    main = threading.get_ident()
    state[main] = 5                                  # the caller's own setting
    assert pls.factor(model.theta_start) == 0
    assert calls and calls[0] == (main, 1)
    by_thread = {}
    for tid, n in calls:
        by_thread.setdefault(tid, []).append(n)
    for tid, seq in by_thread.items():               # set 1 / give back, in pairs
        assert len(seq) % 2 == 0
        assert all(v == 1 for v in seq[0::2]), seq
    assert state[main] == 5                          # the caller's setting given back
    assert all(v != 1 for t, v in state.items() if t != main)


def test_small_dense_block_runs_blas_on_one_thread(monkeypatch, recording_setter):
    calls, state = recording_setter
    model = crossed_model("y ~ 1 + x + (1|g1) + (1|g2)", n=3000, n1=40, n2=25)
    monkeypatch.setattr(threads, "_registered", 1)
    pls = BlockedPLS(BlockedCrossprod(model.terms, model.X, model.y, model.theta_offsets))
    assert pls._f.L22.shape[0] > 16 and pls._f.chol_threads == 1 and pls._f.blas_single
    assert pls.factor(model.theta_start) == 0
    main = threading.get_ident()
    assert calls[0] == (main, 1) and calls[-1] == (main, 0) and state[main] == 0


@pytest.fixture
def process_wide_setter():
    """A stand-in for OpenBLAS's setter in its pthreads builds: one count for the whole
    process, whichever thread sets it; the real setters are registered again afterwards."""
    state = {"n": 5, "calls": 0}
    lock = threading.Lock()
    threads.register()          # first: a model built later must not register the real ones

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)
    def setter(n):
        with lock:
            prev, state["n"] = state["n"], n
            state["calls"] += 1
            return prev

    _chol.register_blas_setters([ctypes.cast(setter, ctypes.c_void_p).value], [True])
    try:
        yield state
    finally:
        _chol.register_blas_setters(*threads.blas_setters())


def test_factorizations_on_two_threads_give_a_process_wide_setting_back(monkeypatch,
                                                                       process_wide_setter):
    """With a process-wide setter, factorizations running at once on two threads (each
    with BLAS on one thread) leave the process's count as it was: set once by the first
    to start, given back by the last to end (each thread saving and giving back its own
    would leave 1 behind whenever the two interleave)."""
    state = process_wide_setter
    model = crossed_model("y ~ 1 + x + (1|g1) + (1|g2)", n=3000, n1=40, n2=25)
    monkeypatch.setattr(threads, "_registered", 1)
    plss = [BlockedPLS(BlockedCrossprod(model.terms, model.X, model.y, model.theta_offsets))
            for _ in range(2)]
    assert all(p._f.blas_single for p in plss)
    barrier = threading.Barrier(2)
    seen = []

    def work(pls):
        barrier.wait()
        for i in range(200):
            assert pls.factor(model.theta_start * (1.0 + 0.01 * (i % 5))) == 0
            seen.append(state["n"])

    ts = [threading.Thread(target=work, args=(p,)) for p in plss]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(seen) == 400
    assert state["n"] == 5
    assert state["calls"] >= 2 and state["calls"] % 2 == 0


def test_fork_while_another_thread_sets_blas_threads_leaves_the_child_working(monkeypatch):
    """A fork while another thread is inside the BLAS setting's lock (its setter call
    blocked): the child, which has no such thread, must still factor (a new lock), not hang
    on the one the vanished thread held."""
    import os
    import signal

    state = {"n": 5}
    entered, release = threading.Event(), threading.Event()
    main = threading.main_thread()

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)
    def setter(n):
        if threading.current_thread() is not main and not release.is_set():
            entered.set()
            release.wait(30)
        prev, state["n"] = state["n"], n
        return prev

    threads.register()          # first: a model built later must not register the real ones
    model = crossed_model("y ~ 1 + x + (1|g1) + (1|g2)", n=3000, n1=40, n2=25)
    _chol.register_blas_setters([ctypes.cast(setter, ctypes.c_void_p).value], [True])
    try:
        monkeypatch.setattr(threads, "_registered", 1)
        a, b = (BlockedPLS(BlockedCrossprod(model.terms, model.X, model.y,
                                            model.theta_offsets)) for _ in range(2))
        assert a._f.blas_single and b._f.blas_single
        t = threading.Thread(target=lambda: b.factor(model.theta_start))
        t.start()
        assert entered.wait(30)
        pid = os.fork()
        if pid == 0:                                   # child: must not hang
            signal.alarm(30)
            ok = a.factor(model.theta_start) == 0 and state["n"] == 5
            os._exit(0 if ok else 1)
        release.set()
        t.join()
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert state["n"] == 5
    finally:
        release.set()
        _chol.register_blas_setters(*threads.blas_setters())


def test_fits_on_two_threads_leave_blas_threads_as_they_were():
    """The real libraries: fits on two threads at once (a small dense block, BLAS on one
    thread in each factorization) leave every OpenBLAS library's thread count as it was."""
    from threadpoolctl import ThreadpoolController

    if not threads.register():
        pytest.skip("needs OpenBLAS's thread setter")
    df, _ = lmmfast.simulate.crossed(3000, 40, 25, slope=False, seed=5)
    libs = [lib for lib in ThreadpoolController().lib_controllers
            if lib.internal_api == "openblas"]
    before = [lib.num_threads for lib in libs]
    errors = []

    def work():
        try:
            for _ in range(15):
                lmmfast.lmer("y ~ 1 + x + (1|g1) + (1|g2)", df)
        except Exception as e:                       # pragma: no cover (reported below)
            errors.append(e)

    ts = [threading.Thread(target=work) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert [lib.num_threads for lib in libs] == before


def test_import_leaves_the_environment_as_it_was(tmp_path):
    """OpenMP is loaded with its idle threads asleep, but the process's environment is
    given back unchanged; a user's own OMP_WAIT_POLICY is kept.  (Run away from the source
    tree, so that the package under test is the one imported.)"""
    code = "import os, lmmfast; print(os.environ.get('OMP_WAIT_POLICY', '-'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}

    def run():
        return subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                              capture_output=True, text=True, check=True).stdout.strip()

    assert run() == "-"
    env["OMP_WAIT_POLICY"] = "active"
    assert run() == "active"


def test_middling_dense_block_uses_blas_threads_unless_lmmfast_threads_are_asked(monkeypatch):
    """Between SINGLE_MAX and TILED_MIN, LAPACK runs on BLAS's own threads (no thread-local
    setting), unless LMMFAST_NUM_THREADS asks for lmmfast's own: 1, one BLAS thread; more,
    the tiles on that many.  The factor is the same."""
    if not threads.register():
        pytest.skip("needs OpenBLAS's thread-local setting")
    model = crossed_model()
    theta = np.abs(np.random.default_rng(8).normal(size=model.ntheta)) + 0.2
    args = (model.terms, model.X, model.y, model.theta_offsets)
    monkeypatch.setattr(_pls, "SINGLE_MAX", 10)
    monkeypatch.setattr(_pls, "TILED_MIN", 10 ** 6)
    monkeypatch.delenv("LMMFAST_NUM_THREADS", raising=False)
    free = BlockedPLS(BlockedCrossprod(*args))
    assert not free._f.blas_single and free._f.chol_threads == 1
    monkeypatch.setenv("LMMFAST_NUM_THREADS", "1")
    one = BlockedPLS(BlockedCrossprod(*args))
    assert one._f.blas_single and one._f.chol_threads == 1
    assert one.objective(theta, True) == pytest.approx(free.objective(theta, True), rel=1e-13)
    np.testing.assert_allclose(np.tril(one.L22), np.tril(free.L22), rtol=1e-13, atol=1e-13)
    if _pls.OPENMP:
        monkeypatch.setenv("LMMFAST_NUM_THREADS", "2")
        monkeypatch.setattr(_pls, "TILE", 9)
        own = BlockedPLS(BlockedCrossprod(*args))
        assert own._f.blas_single and own._f.chol_threads == 2
        assert own.objective(theta, True) == pytest.approx(free.objective(theta, True),
                                                           rel=1e-12)
        assert own._f.last_chol_threads == 2

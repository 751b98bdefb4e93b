# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Dense Cholesky factorization and symmetric rank-K update, threaded over tiles.

Why not LAPACK's threaded ``dpotrf``: the factorization also runs OpenMP code (the
row-wise downdate of ``_pls``), and two thread pools on the same cores wait for each
other.  OpenBLAS's idle threads spin for a while after each call, OpenMP's after each
parallel region; on an idle machine this costs little, but beside other busy processes
(models fitted in parallel workers) a fit slowed from 0.5 s to 13 s in about a third of
the runs (InstEval, ``service*dept``, two busy loops on two cores).  Here the dense
algebra of a factorization runs in OpenMP's pool alone: BLAS is called single-threaded
on tiles (``openblas_set_num_threads_local``, OpenBLAS 0.3.27 and later: thread-local in
its OpenMP builds, process-wide in its pthreads builds -- the wheels', Debian's -- where
the first of the sections open at once sets it and the last gives it back), and the
tiles are shared among OpenMP threads.  Alone, this is as fast as
OpenBLAS's threaded ``dpotrf`` on large blocks (4,003: rung 5 of the ladder) and about
10 % slower on middling ones (1,157), which ``_pls`` therefore leaves to LAPACK unless
asked (see ``lmmfast.threads``).

Storage is column-major upper (LAPACK's ``'U'``), which is the row-major lower triangle
the factor keeps: ``potrf_tiled`` computes U with U'U = A (row-major: L L' = A, L = U'),
right-looking by column blocks of ``nb``: factor the diagonal block, solve the block row
to its right (``dtrsm``), update the trailing matrix (``syrk_tiled``).  The dense numpy
oracles are ``numpy.linalg.cholesky`` and ``A - W W'`` (tests/test_chol.py).
"""
from cython.parallel cimport prange
from scipy.linalg.cython_blas cimport dgemm, dsyrk, dtrsm
from scipy.linalg.cython_lapack cimport dpotrf

from cpython.pythread cimport (PyThread_acquire_lock, PyThread_allocate_lock,
                               PyThread_release_lock, PyThread_type_lock, WAIT_LOCK)

ctypedef int (*local_threads_fn)(int) noexcept nogil

cdef local_threads_fn _setters[MAX_BLAS_SETTERS]
cdef bint _shared[MAX_BLAS_SETTERS]       # the setter acts on the whole process
cdef int _nsetters = 0
cdef int _nshared = 0
# Process-wide setters (OpenBLAS's pthreads builds: the "thread-local" setter calls
# openblas_set_num_threads) are set to 1 by the first section to enter and given back by
# the last to leave, under a lock: set and given back by each thread, two fits on two
# threads would interleave (the second saves the first's 1) and leave BLAS on one thread
# for good, for everything else in the process too.
cdef PyThread_type_lock _lock = PyThread_allocate_lock()
cdef int _holders = 0
cdef int _shared_saved[MAX_BLAS_SETTERS]


def _after_fork_in_child():
    """A forked child has only the forking thread: sections other threads had open never
    end there.  A new lock (one held at the fork stays held), and the process-wide
    settings given back if a section was open."""
    global _lock, _holders
    cdef int i
    _lock = PyThread_allocate_lock()
    if _holders > 0:
        for i in range(_nsetters):
            if _shared[i]:
                _setters[i](_shared_saved[i])
    _holders = 0


import os as _os

if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_after_fork_in_child)


def register_blas_setters(addresses, shared=None):
    """Register the addresses of the BLAS libraries' ``int f(int)`` thread setters
    (``openblas_set_num_threads_local``: sets the BLAS threads, returns the previous
    setting); replaces earlier registrations.  ``shared[i]`` (default False) says that
    setter i acts on the whole process, not the calling thread alone (OpenBLAS built with
    pthreads rather than OpenMP).  Returns how many are kept.  Call it while no
    factorization runs (``lmmfast.threads.register`` does, once per process; tests swap in
    stand-ins): the count of open sections starts again from 0."""
    global _nsetters, _nshared, _holders
    cdef Py_ssize_t a
    addrs = [int(x) for x in addresses][:MAX_BLAS_SETTERS]
    flags = [False] * len(addrs) if shared is None else [bool(f) for f in shared]
    if len(flags) < len(addrs):
        raise ValueError("shared needs one flag per setter address")
    for a in addrs:
        if a == 0:
            raise ValueError("a BLAS thread setter address must not be NULL")
    PyThread_acquire_lock(_lock, WAIT_LOCK)
    _nsetters = 0
    _nshared = 0
    _holders = 0
    for a, f in zip(addrs, flags):
        _setters[_nsetters] = <local_threads_fn><void*>a
        _shared[_nsetters] = f
        _nshared += f
        _nsetters += 1
    PyThread_release_lock(_lock)
    return _nsetters


cdef int blas_single_thread(int* saved) noexcept nogil:
    """BLAS on one thread for the calling thread's next calls (each registered library);
    the previous settings of thread-local setters go to ``saved`` (MAX_BLAS_SETTERS ints),
    process-wide ones are set by the first of the sections open at once (see
    ``_holders``).  Returns the number of libraries set (0: none registered, BLAS threads
    as they were).  Every call is paired with :func:`blas_restore_threads`."""
    global _holders
    cdef int i
    for i in range(_nsetters):
        if not _shared[i]:
            saved[i] = _setters[i](1)
    if _nshared:
        PyThread_acquire_lock(_lock, WAIT_LOCK)
        if _holders == 0:
            for i in range(_nsetters):
                if _shared[i]:
                    _shared_saved[i] = _setters[i](1)
        _holders += 1
        PyThread_release_lock(_lock)
    return _nsetters


cdef void blas_restore_threads(const int* saved) noexcept nogil:
    """Undo :func:`blas_single_thread` (process-wide setters: when the last open section
    ends)."""
    global _holders
    cdef int i
    for i in range(_nsetters):
        if not _shared[i]:
            _setters[i](saved[i])
    if _nshared:
        PyThread_acquire_lock(_lock, WAIT_LOCK)
        if _holders > 0:             # (0: the setters were registered again meanwhile)
            _holders -= 1
        if _holders == 0:
            for i in range(_nsetters):
                if _shared[i]:
                    _setters[i](_shared_saved[i])
        PyThread_release_lock(_lock)


cdef void syrk_cols(double* C, Py_ssize_t ldc, Py_ssize_t j0, Py_ssize_t j1,
                    const double* H, Py_ssize_t K, Py_ssize_t ldh) noexcept nogil:
    """Column block [j0, j1) of the upper triangle: C[0:j1, j0:j1] -= H[:, 0:j1]' H[:, j0:j1]
    (column-major; H is K × n, leading dimension ldh).  Its own thread's BLAS, one thread."""
    cdef int saved[MAX_BLAS_SETTERS]
    cdef char tt = b'T', nn = b'N', up = b'U'
    cdef double one = 1.0, mone = -1.0
    cdef int m_i = <int>j0, w_i = <int>(j1 - j0), k_i = <int>K
    cdef int ldc_i = <int>ldc, ldh_i = <int>ldh
    if w_i <= 0 or k_i <= 0:
        return
    blas_single_thread(saved)
    if m_i > 0:
        dgemm(&tt, &nn, &m_i, &w_i, &k_i, &mone, <double*>H, &ldh_i, <double*>(H + j0 * ldh),
              &ldh_i, &one, C + j0 * ldc, &ldc_i)
    dsyrk(&up, &tt, &w_i, &k_i, &mone, <double*>(H + j0 * ldh), &ldh_i, &one,
          C + j0 + j0 * ldc, &ldc_i)
    blas_restore_threads(saved)


cdef void syrk_tiled(double* C, Py_ssize_t n, Py_ssize_t ldc, const double* H, Py_ssize_t K,
                     Py_ssize_t ldh, Py_ssize_t nb, int nthreads) noexcept nogil:
    """Upper triangle of C (n × n, column-major) -= H'H, H K × n: the column blocks of
    ``nb`` shared among ``nthreads`` threads, widest work first (block j updates j + 1
    tiles)."""
    cdef Py_ssize_t t, jb, nt
    if n <= 0 or K <= 0:
        return
    if nb < 1:
        nb = n
    nt = (n + nb - 1) // nb
    if nthreads <= 1 or nt == 1:
        syrk_cols(C, ldc, 0, n, H, K, ldh)
        return
    for t in prange(nt, schedule="dynamic", chunksize=1, num_threads=nthreads):
        jb = nt - 1 - t
        syrk_cols(C, ldc, jb * nb, min(n, (jb + 1) * nb), H, K, ldh)


cdef void trsm_cols(double* A, Py_ssize_t lda, Py_ssize_t k0, Py_ssize_t kb, Py_ssize_t c0,
                    Py_ssize_t cw) noexcept nogil:
    """A[k0:k0+kb, c0:c0+cw] = U_kk^{-T} A[k0:k0+kb, c0:c0+cw] (U_kk the factored diagonal
    block at k0), one BLAS thread."""
    cdef int saved[MAX_BLAS_SETTERS]
    cdef char lf = b'L', up = b'U', tt = b'T', nn = b'N'
    cdef double one = 1.0
    cdef int kb_i = <int>kb, cw_i = <int>cw, lda_i = <int>lda
    if cw_i <= 0:
        return
    blas_single_thread(saved)
    dtrsm(&lf, &up, &tt, &nn, &kb_i, &cw_i, &one, A + k0 + k0 * lda, &lda_i,
          A + k0 + c0 * lda, &lda_i)
    blas_restore_threads(saved)


cdef int potrf_one(double* A, Py_ssize_t n, Py_ssize_t lda) noexcept nogil:
    """LAPACK's dpotrf('U') on one BLAS thread."""
    cdef int saved[MAX_BLAS_SETTERS]
    cdef char up = b'U'
    cdef int n_i = <int>n, lda_i = <int>lda, info = 0
    blas_single_thread(saved)
    dpotrf(&up, &n_i, A, &lda_i, &info)
    blas_restore_threads(saved)
    return info


cdef int potrf_tiled(double* A, Py_ssize_t n, Py_ssize_t lda, Py_ssize_t nb,
                     int nthreads) noexcept nogil:
    """U'U = A in place (column-major upper, n × n, leading dimension lda), by column
    blocks of ``nb`` with ``nthreads`` OpenMP threads and single-threaded BLAS.  Returns
    LAPACK's info: 0, or j + 1 when the leading minor of order j + 1 is not positive
    definite."""
    cdef Py_ssize_t k0, kb, r0, m, t, nc
    cdef int info
    if n <= 0:
        return 0
    if nb < 1 or nthreads <= 1 or n <= nb:
        return potrf_one(A, n, lda)
    k0 = 0
    while k0 < n:
        kb = min(nb, n - k0)
        info = potrf_one(A + k0 + k0 * lda, kb, lda)
        if info != 0:
            return <int>(k0 + info)
        r0 = k0 + kb
        m = n - r0
        if m == 0:
            break
        nc = (m + nb - 1) // nb
        for t in prange(nc, schedule="static", num_threads=nthreads):
            trsm_cols(A, lda, k0, kb, r0 + t * nb, min(nb, n - r0 - t * nb))
        syrk_tiled(A + r0 + r0 * lda, m, lda, A + k0 + r0 * lda, kb, lda, nb, nthreads)
        k0 = r0
    return 0


def potrf(double[:, ::1] A, Py_ssize_t nb=128, int nthreads=1):
    """Lower Cholesky factor of the row-major square ``A`` in place (its lower triangle;
    the upper one is not touched), by :func:`potrf_tiled`.  Returns LAPACK's info."""
    cdef Py_ssize_t n = A.shape[0]
    cdef int info
    if A.shape[1] != n:
        raise ValueError(f"A must be square, not {A.shape[0]}×{A.shape[1]}")
    if nb < 1 or nthreads < 1:
        raise ValueError("nb and nthreads must be at least 1")
    if n == 0:
        return 0
    with nogil:
        info = potrf_tiled(&A[0, 0], n, n, nb, nthreads)
    return info


def syrk_lower(double[:, ::1] C, const double[:, ::1] W, Py_ssize_t nb=128, int nthreads=1):
    """Lower triangle of the row-major square ``C`` -= W W' (W: n × K, row-major), by
    :func:`syrk_tiled`; the upper triangle is not touched."""
    cdef Py_ssize_t n = C.shape[0], K = W.shape[1]
    if C.shape[1] != n or W.shape[0] != n:
        raise ValueError(f"C must be n×n and W n×K; got C {C.shape[0]}×{C.shape[1]}, "
                         f"W {W.shape[0]}×{W.shape[1]}")
    if nb < 1 or nthreads < 1:
        raise ValueError("nb and nthreads must be at least 1")
    if n == 0 or K == 0:
        return
    with nogil:
        syrk_tiled(&C[0, 0], n, n, &W[0, 0], K, K, nb, nthreads)

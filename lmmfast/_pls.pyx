# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""The blocked factor of the PLS system as an object: one compiled call per θ.

:class:`BlockedFactor` holds the stored cross-products and the factor's storage, maps θ
onto the relative covariance factors and refactors Ω(θ) (Bates et al. 2015, JSS 67(1),
eqs. 18-20) by the kernel of :mod:`lmmfast._blockchol`; it returns the profiled deviance
(eq. 34) or the REML criterion (eq. 41), also as a C function for a compiled optimizer
loop.  Here too: the log-determinants of the factor (:func:`logdets`) and the choice of
threads for each factorization.
"""
import os

import numpy as np
cimport numpy as cnp
from libc.math cimport log, INFINITY, M_PI
from scipy.linalg.cython_blas cimport dtrsv
from cpython.pycapsule cimport PyCapsule_New
from lmmfast._chol cimport MAX_BLAS_SETTERS, blas_restore_threads, blas_single_thread
from lmmfast._dense cimport BLAS_MIN, GATHER_MAX, max_panel
from lmmfast._blockchol cimport SMALL_CHOL, batched_width, update_blocked_core
from lmmfast._obsform cimport ObsForm, obs_panels
from lmmfast._obsform import scratch_doubles
from lmmfast._blockchol import (_heavy_setup, single_levels, transposed_pattern_ok,
                                update_blocked)

cnp.import_array()

cdef double LOG2PI = log(2.0 * M_PI)

cdef extern from *:
    """
    #ifdef _OPENMP
    #define LMMFAST_HAVE_OPENMP 1
    #else
    #define LMMFAST_HAVE_OPENMP 0
    #endif
    """
    int LMMFAST_HAVE_OPENMP

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int lmmfast_omp_max_threads(void) { return omp_get_max_threads(); }
    #else
    static int lmmfast_omp_max_threads(void) { return 1; }
    #endif
    """
    int lmmfast_omp_max_threads() nogil

OPENMP = bool(LMMFAST_HAVE_OPENMP)   # built with OpenMP: the row-wise downdate runs threaded

# Row-wise downdates with fewer multiply-adds than this run on one thread.
THREAD_MIN_WORK = 2e7
# Dense blocks up to SINGLE_MAX are factored by LAPACK on one BLAS thread (BLAS threads
# gain nothing there alone, and lose several times beside busy processes); above TILED_MIN
# tiled on OpenMP's threads with single-threaded BLAS (``_chol``: as fast as OpenBLAS's
# threads alone, robust beside busy processes); between, by LAPACK on BLAS's own threads
# (there about 10 % faster alone than the tiles, measured on InstEval).  TILE: the
# tiles' width (0: by size).
SINGLE_MAX = 512
TILED_MIN = 2048
TILE = 0


cdef struct LogSum:
    double acc       # logs taken so far
    double prod      # the product of the factors since
    int count        # ... and how many


cdef inline void logsum_add(LogSum* s, double d) noexcept nogil:
    """Add log(d): factors within 1e±100 are multiplied and their product's log taken
    every 64 factors or when it leaves 1e±200 (no overflow; a small model's evaluation
    otherwise spends a fifth of its time in log), others (and 0, NaN) logged at once."""
    if 1e-100 < d < 1e100:
        s.prod *= d
        s.count += 1
        if s.count == 64 or not (1e-200 < s.prod < 1e200):
            s.acc += log(s.prod)
            s.prod = 1.0
            s.count = 0
    else:
        s.acc += log(d)


cdef inline double logsum_total(LogSum* s) noexcept nogil:
    return s.acc + log(s.prod)


cdef void logdets_core(const double[:, :, ::1] L11, const double[:, ::1] L22, Py_ssize_t nz,
                       double* ldz, double* ldx, double* r2) noexcept nogil:
    cdef Py_ssize_t m1 = L11.shape[0], k1 = L11.shape[1], D = L22.shape[0], j, a
    cdef LogSum lz, lx
    cdef double r
    lz.acc = lx.acc = 0.0
    lz.prod = lx.prod = 1.0
    lz.count = lx.count = 0
    for j in range(m1):
        for a in range(k1):
            logsum_add(&lz, L11[j, a, a])
    for a in range(nz):
        logsum_add(&lz, L22[a, a])
    for a in range(nz, D - 1):
        logsum_add(&lx, L22[a, a])
    r = L22[D - 1, D - 1]
    ldz[0], ldx[0], r2[0] = 2.0 * logsum_total(&lz), 2.0 * logsum_total(&lx), r * r


def logdets(const double[:, :, ::1] L11, const double[:, ::1] L22, Py_ssize_t nz):
    """Return (log|L_Z|², log|R_X|², r²) from the blocked factor's diagonals (JSS eq. 34, 41)."""
    cdef double ldz, ldx, r2
    with nogil:
        logdets_core(L11, L22, nz, &ldz, &ldx, &r2)
    return ldz, ldx, r2


_omp_used = False      # this process ran a threaded region
_omp_forked = False    # ... and then forked: this is the child, whose OpenMP pool is dead


def _after_fork_in_child():
    global _omp_forked
    _omp_forked = _omp_forked or _omp_used


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


cdef cnp.int64_t _imax(const cnp.int64_t[::1] a, cnp.int64_t empty) noexcept:
    """The largest entry of ``a`` (``empty`` when it has none): np.max costs ~5 µs a call,
    a fifth of a small model's factor set-up for four of them."""
    cdef Py_ssize_t i
    cdef cnp.int64_t m = empty
    for i in range(a.shape[0]):
        if i == 0 or a[i] > m:
            m = a[i]
    return m


def _lower_pattern_ok(ptr, cols, Py_ssize_t nz):
    """A CSR pattern of strictly lower columns per row: pointers ascending from 0 to
    len(cols), and every column of row r in [0, r)."""
    ptr = np.asarray(ptr)
    cols = np.asarray(cols)
    if ptr[0] != 0 or ptr[-1] != len(cols) or np.any(np.diff(ptr) < 0):
        return False
    r = np.repeat(np.arange(nz), np.diff(ptr))
    return bool(np.all((cols >= 0) & (cols < r)))


def _thread_request():
    """``LMMFAST_NUM_THREADS`` as a number of threads (at least 1), None when unset: the one
    place that reads it."""
    env = os.environ.get("LMMFAST_NUM_THREADS", "").strip()
    if not env:
        return None
    try:
        return max(1, int(env))
    except ValueError:
        raise ValueError(f"LMMFAST_NUM_THREADS must be a whole number of threads, "
                         f"not {env!r}") from None


def _n_threads() -> int:
    """Threads for the row-parallel downdate: ``LMMFAST_NUM_THREADS`` when set, else the
    CPUs this process may use (at most 8; each call then also stays within OpenMP's own
    limit: ``OMP_NUM_THREADS``, ``omp_set_num_threads``, threadpoolctl); 1 when the
    extension was built without OpenMP."""

    if not OPENMP:
        return 1
    req = _thread_request()
    if req is not None:
        return req
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _lines(Py_ssize_t n):
    """n zeros starting at a 64-byte boundary (a cache line): scratch that threads write
    in parts shares no line between them where the parts are whole lines."""
    buf = np.zeros(n + 8)
    cdef Py_ssize_t skip = (-(buf.ctypes.data % 64) // 8) % 8
    return buf[skip:skip + n]


cdef class BlockedFactor:
    """The blocked factor of Ω(θ) with its cross-products: one compiled call per θ.

    Holds the stored cross-products of a ``blocks.BlockedCrossprod`` (validated once by
    :func:`update_blocked`'s rules) and the factor's storage.  ``factor(θ)`` maps θ onto
    T1, Λ_rest's row scales and group factors (θ index -1: 1.0, -2: 0.0) and refactors;
    ``objective(θ, reml)`` adds the profiled deviance (JSS eqs. 34, 41).
    """
    cdef readonly object L11, L21, L22, T1, rscale, Tflat, theta
    cdef readonly int nthreads, last_nthreads, chol_threads, last_chol_threads
    cdef readonly bint blas_single      # BLAS on the calling thread only, in every factorization
    cdef bint fixed_threads
    cdef Py_ssize_t tile
    cdef object xp, buf, wbuf, rbuf
    cdef const double[:, :, ::1] A11
    cdef const double[:, ::1] A21, A22
    cdef const cnp.int64_t[::1] indptr, rows, rk, rtoff, batch, rs_index, t1_index, tflat_index
    cdef const cnp.int64_t[::1] tptr, tidx
    cdef const cnp.int32_t[::1] rows32
    cdef const cnp.int64_t[::1] tstart
    cdef readonly object rows32_arr, tstart_arr
    cdef readonly object lptr_arr, lcol_arr     # A22's random-effects lower pattern (or None)
    cdef const cnp.int64_t[::1] lptr
    cdef const cnp.int32_t[::1] lcol
    cdef double[::1] accv, wxyv
    cdef object acc, wxy
    cdef bint transposed
    cdef double[:, :, ::1] L11v
    cdef double[:, ::1] L21v, L22v, T1v
    cdef double[::1] rsv, tfv, bufv, wbufv, rbufv, thv
    cdef Py_ssize_t m1, k1, D, nz, nbatch, n, p, nheavy, hchunk, max_theta_index
    cdef bint use_buf
    cdef object heavy_arr, hflag_arr, hbuf
    cdef const cnp.int64_t[::1] heavyv
    cdef const char[::1] hflagv
    cdef double[::1] hbufv
    cdef ObsForm obsf
    cdef bint use_obs
    cdef readonly bint panels_stale      # the observation form's panels wait for ensure_panels
    cdef readonly object obs_arrays      # what obsf points into, kept alive here

    def __init__(self, xp):
        self.xp = xp
        # np.zeros (calloc: the kernel's zero pages, touched first by the factorization)
        # rather than zeros_like (a pass writing zeros: on large dense blocks 0.03-0.2 s
        # of page faults before any work)
        self.L11 = np.zeros(np.shape(xp.A11))
        self.L21 = np.zeros(np.shape(xp.A21))
        self.L22 = np.zeros(np.shape(xp.A22))
        self.T1 = np.zeros((xp.k1, xp.k1))
        self.rscale = np.ones(xp.D)
        self.Tflat = np.zeros(max(len(xp.tflat_index), 1))
        # the checked wrapper validates the cross-products once (no factorization)
        heavy = getattr(xp, "heavy", None)
        if heavy is None:
            heavy = np.zeros(0, dtype=np.int64)
        update_blocked(xp.A11, self.T1, xp.indptr, xp.rows, xp.A21, xp.A22,
                       xp.nz, self.rscale, xp.rk, xp.rtoff, self.Tflat, self.L11, self.L21,
                       self.L22, xp.batch, check_only=True)
        # the heavy levels are validated by _heavy_setup, once
        self.heavy_arr = np.ascontiguousarray(heavy, dtype=np.int64)
        self.hflag_arr, self.hchunk, self.hbuf = _heavy_setup(self.heavy_arr, xp.batch, xp.m1,
                                                              xp.k1, xp.A22.shape[0])
        self.nheavy = len(self.heavy_arr)
        self.heavyv = self.heavy_arr if self.nheavy else np.zeros(1, dtype=np.int64)
        self.hflagv, self.hbufv = self.hflag_arr, self.hbuf
        self.A11, self.A21, self.A22 = xp.A11, xp.A21, xp.A22
        self.indptr, self.rows, self.rk, self.rtoff, self.batch = xp.indptr, xp.rows, xp.rk, xp.rtoff, xp.batch
        self.rs_index, self.t1_index, self.tflat_index = xp.rs_index, xp.t1_index, xp.tflat_index
        self.max_theta_index = max(_imax(xp.t1_index, -1), _imax(xp.rs_index, -1),
                                   _imax(xp.tflat_index, -1))
        self.L11v, self.L21v, self.L22v, self.T1v = self.L11, self.L21, self.L22, self.T1
        self.rsv, self.tfv = self.rscale, self.Tflat
        self.m1, self.k1, self.D, self.nz = xp.m1, xp.k1, xp.D, xp.nz
        self.nbatch = len(xp.batch) - 1
        self.n, self.p = xp.n, xp.p
        cdef Py_ssize_t nrmax = max_panel(xp.indptr)
        self.use_buf = nrmax * self.k1 >= BLAS_MIN
        self.buf = np.empty(min(nrmax, GATHER_MAX) ** 2 if self.use_buf else 1)
        self.wbuf = np.empty(batched_width(&self.batch[0], self.nbatch, &self.indptr[0],
                                           self.k1))
        self.rbuf = np.empty(max(2 * self.k1 * self.k1 + self.k1,
                                 int(max(_imax(xp.rk, 1), 1)) ** 2))
        self.bufv, self.wbufv, self.rbufv = self.buf, self.wbuf, self.rbuf
        self.transposed = xp.tptr is not None
        self.nthreads = 1
        if self.transposed:
            self.tptr, self.tidx = xp.tptr, xp.tidx
            self.rows32_arr = np.asarray(xp.rows, dtype=np.int32)   # rows < D: fits
            self.rows32 = self.rows32_arr
            # where each entry's panel starts (the kernel needs no level numbers)
            self.tstart_arr = np.asarray(xp.indptr)[np.asarray(xp.tlev)]
            self.tstart = self.tstart_arr
            tp, ti, tl = np.asarray(xp.tptr), np.asarray(xp.tidx), np.asarray(xp.tlev)
            ip = np.asarray(xp.indptr)
            # the levels the row-wise downdate may hold: alone in their batch, not heavy
            rowwise = single_levels(xp.batch, self.m1)
            rowwise[self.heavy_arr] = False
            if (len(tp) != self.D + 1 or len(ti) > self.rows.shape[0]
                    or not transposed_pattern_ok(tp, ti, tl, ip)
                    or (len(ti) and not rowwise[tl].all())):
                raise ValueError("transposed pattern does not match the panels")
            # the X/y rows' downdate (xy_accumulate) takes the last D - nz rows of each
            # panel to be the X/y rows nz..D-1
            nxy = self.D - self.nz
            lv = np.flatnonzero(rowwise)
            ends = ip[lv + 1]
            tail = np.asarray(self.rows)[(ends[:, None] - nxy + np.arange(nxy)).clip(0)]
            if np.any(ip[lv + 1] - ip[lv] < nxy) or not np.array_equal(
                    tail, np.broadcast_to(self.nz + np.arange(nxy), tail.shape)):
                raise ValueError("every panel must end with the X/y rows of the dense block")
            # A22's random-effects nonzeros: the transposed downdate reads A22 there alone
            # where it writes those rows itself (update_blocked_core's ``fused``); the
            # pattern, kept on xp, also serves its products (BlockedCrossprod.dense_times)
            pattern = getattr(xp, "re_lower_pattern", lambda: None)()
            if pattern is not None:
                self.lptr_arr, self.lcol_arr = pattern
                if len(self.lptr_arr) != self.nz + 1 or not _lower_pattern_ok(
                        self.lptr_arr, self.lcol_arr, self.nz):
                    raise ValueError("the lower pattern of A22 does not fit its rows")
                self.lptr, self.lcol = self.lptr_arr, self.lcol_arr
            # threads only where the row-wise downdate is big enough to pay for waking them
            # (under ~10⁷ updates it is a few ms; idle OpenMP threads then spin against
            # OpenBLAS's and make every evaluation slower)
            nr = np.diff(ip).astype(float)
            if float((nr[rowwise] ** 2).sum()) * self.k1 > THREAD_MIN_WORK:
                self.nthreads = _n_threads()
        # Threads of the dense algebra (see SINGLE_MAX, TILED_MIN and _chol): a large dense
        # block tiled on OpenMP's threads (as many as the row-wise downdate may use) with
        # BLAS on the calling thread only, a small one on one BLAS thread, a middling one
        # by BLAS's own threads -- unless LMMFAST_NUM_THREADS asks for lmmfast's own
        # threads (tiles; one thread: plain LAPACK on one BLAS thread).  Where BLAS has no
        # thread-local setting (not OpenBLAS >= 0.3.27), BLAS runs as called.
        from lmmfast import threads
        self.chol_threads = 1
        self.blas_single = False
        request = _thread_request()
        if self.D > SMALL_CHOL and threads.register():
            if OPENMP and (self.D > TILED_MIN or (request is not None and self.D > SINGLE_MAX)):
                self.chol_threads = _n_threads()
                self.blas_single = True
            self.blas_single = self.blas_single or self.D <= SINGLE_MAX or request == 1
        self.tile = TILE if TILE > 0 else (128 if self.D < 4500 else 192)
        # LMMFAST_NUM_THREADS is obeyed as given; otherwise OpenMP's limit applies per call
        self.fixed_threads = (self.nthreads > 1 or self.chol_threads > 1) and request is not None
        self.acc = np.zeros(self.D * self.nthreads)       # one accumulator row per thread
        self.accv = self.acc
        # the X/y rows' downdate (xy_accumulate): W (nz × nxy) then XX (nxy × nxy)
        self.wxy = np.zeros((self.D - self.nz) * self.D if self.transposed else 1)
        self.wxyv = self.wxy
        self.use_obs = getattr(xp, "obs", None) is not None
        if self.use_obs:
            self._set_obs(xp.obs)
            self.fixed_threads = (self.nthreads > 1 or self.chol_threads > 1) and request is not None

    def _set_obs(self, ob):
        """Point the kernel's struct at the observation form (``obsform.ObsData``,
        validated against the panels once by :func:`lmmfast.obsform.checked_arrays`) and
        at its scratch."""
        if self.transposed or self.nheavy:
            raise ValueError("the observation form excludes heavy levels and the transposed pattern")
        from lmmfast.obsform import OBS_THREAD_MIN_WORK, checked_arrays, obs_cost
        D, nz, k1 = self.D, self.nz, self.k1
        nxy = D - nz
        c = checked_arrays(ob, np.asarray(self.indptr), np.asarray(self.rows),
                           np.asarray(self.rk), nz, D, k1, ob.lam, ob.assign)
        optr, z1, upos, uprow, uk, uzoff, uz, xy, soff, mbase, bptr, bpos, pair, lam, assign = (
            c[k] for k in ("optr", "z1", "upos", "uprow", "uk", "uzoff", "uz", "xy", "soff",
                           "mbase", "bptr", "bpos", "pair", "lam", "assign"))
        n, nu, zw, nblk = len(z1), len(uk), int(uk.sum()), len(bpos)
        nobs = np.diff(optr)
        kmax = int(uk.max(initial=1))
        nmax = int(nobs.max(initial=0))
        s_ = _lines(max(n * zw, 1))
        gram_ = _lines(max(int(mbase[-1]), 1))
        # threads: the levels and blocks are shared among them where the work pays for
        # waking them (see obsform.OBS_THREAD_MIN_WORK)
        if obs_cost(nobs, k1, list(uk), nxy) >= OBS_THREAD_MIN_WORK:
            self.nthreads = _n_threads()
        stride = -(-scratch_doubles(k1, nmax, nxy, D, kmax) // 8) * 8    # whole cache lines
        thr_ = _lines(stride * self.nthreads)
        upos, uprow, z1, uz, xy, soff, bpos, pair, lam = (
            a.ravel() for a in (upos, uprow, z1, uz, xy, soff, bpos, pair, lam))   # views
        self.obs_arrays = (optr, z1, upos, uprow, uk, uzoff, uz, xy, soff, mbase, bptr,
                           bpos, pair, lam, assign, s_, gram_, thr_)
        cdef const cnp.int64_t[::1] optr_v = optr, upos_v = upos, uprow_v = uprow
        cdef const cnp.int64_t[::1] uk_v = uk, uzoff_v = uzoff, soff_v = soff, mbase_v = mbase
        cdef const cnp.int64_t[::1] bptr_v = bptr, bpos_v = bpos, pair_v = pair
        cdef const cnp.int64_t[::1] lam_v = lam, assign_v = assign
        cdef const double[::1] z1_v = z1, uz_v = uz, xy_v = xy
        cdef double[::1] s_v = s_, gr_v = gram_, thr_v = thr_
        self.obsf.n, self.obsf.nu, self.obsf.zw, self.obsf.nxy = n, nu, zw, nxy
        self.obsf.optr = &optr_v[0]
        self.obsf.z1 = &z1_v[0] if n * k1 else NULL
        self.obsf.upos = &upos_v[0] if n else NULL
        self.obsf.uprow = &uprow_v[0] if n else NULL
        self.obsf.uk = &uk_v[0]
        self.obsf.uzoff = &uzoff_v[0]
        self.obsf.uz = &uz_v[0] if n else NULL
        self.obsf.xy = &xy_v[0] if n else NULL
        self.obsf.soff = &soff_v[0] if n else NULL
        self.obsf.mbase = &mbase_v[0]
        self.obsf.nblk = nblk
        self.obsf.bptr = &bptr_v[0]
        self.obsf.bpos = &bpos_v[0] if nblk else NULL
        self.obsf.pair = &pair_v[0] if len(pair) else NULL
        self.obsf.nlam = len(lam) // 2
        self.obsf.lam = &lam_v[0] if len(lam) else NULL
        self.obsf.assign = &assign_v[0] if nblk else NULL
        self.obsf.uk_at = &self.rk[0]
        self.obsf.s, self.obsf.gram, self.obsf.thr = &s_v[0], &gr_v[0], &thr_v[0]
        self.obsf.nmax, self.obsf.max_threads, self.obsf.thr_stride = nmax, self.nthreads, stride

    cdef int _threads(self) noexcept:
        """Threads for the next factorization: OpenMP's current limit (OMP_NUM_THREADS,
        omp_set_num_threads, threadpoolctl) unless LMMFAST_NUM_THREADS fixed the count."""
        global _omp_used
        cdef int nthreads = self.nthreads, ct = self.chol_threads, omax
        if (nthreads > 1 or ct > 1) and not self.fixed_threads:
            omax = lmmfast_omp_max_threads()
            nthreads = max(1, min(nthreads, omax))
            ct = max(1, min(ct, omax))
        if nthreads > 1 or ct > 1:
            if _omp_forked:          # GNU OpenMP's threads do not survive a fork: one thread
                nthreads = ct = 1
            else:
                _omp_used = True
        self.last_nthreads = nthreads
        self.last_chol_threads = ct
        return nthreads

    cdef int _factor_ptr(self, const double* theta, int nthreads,
                         bint panels=True) noexcept nogil:
        """Map θ (of the length ``self.theta`` was made for) onto T1, the row scales and
        the group factors, and refactor; the kernel's info.  In the observation form the
        panels' rows of the units are formed only with ``panels`` (else by
        :meth:`ensure_panels`, when something reads them)."""
        cdef Py_ssize_t i, ix
        for i in range(self.thv.shape[0]):
            self.thv[i] = theta[i]
        for i in range(self.k1 * self.k1):
            ix = self.t1_index[i]
            self.T1v[i // self.k1, i % self.k1] = theta[ix] if ix >= 0 else 0.0
        for i in range(self.D):
            ix = self.rs_index[i]
            self.rsv[i] = theta[ix] if ix >= 0 else 1.0
        for i in range(self.tflat_index.shape[0]):
            ix = self.tflat_index[i]
            self.tfv[i] = theta[ix] if ix >= 0 else 0.0
        cdef int saved[MAX_BLAS_SETTERS]
        cdef int info
        if self.blas_single:
            blas_single_thread(saved)
        info = update_blocked_core(
            &self.A11[0, 0, 0], self.m1, self.k1, &self.T1v[0, 0], &self.indptr[0],
            &self.rows[0] if self.rows.shape[0] > 0 else NULL,
            &self.A21[0, 0] if self.A21.shape[0] > 0 else NULL,
            &self.A22[0, 0], self.D, self.nz, &self.rsv[0], &self.rk[0], &self.rtoff[0],
            &self.tfv[0], &self.batch[0], self.nbatch, &self.L11v[0, 0, 0],
            &self.L21v[0, 0] if self.L21v.shape[0] > 0 else NULL, &self.L22v[0, 0],
            &self.bufv[0] if self.use_buf else NULL, &self.wbufv[0],
            &self.tptr[0] if self.transposed else NULL,
            &self.tidx[0] if self.transposed else NULL,
            &self.tstart[0] if self.transposed else NULL,
            &self.rows32[0] if self.transposed else NULL, &self.accv[0], &self.wxyv[0],
            &self.heavyv[0] if self.nheavy else NULL, self.nheavy,
            &self.hflagv[0] if self.nheavy else NULL, &self.hbufv[0], self.hchunk,
            nthreads, &self.rbufv[0], self.last_chol_threads, self.tile,
            &self.obsf if self.use_obs else NULL,
            &self.lptr[0] if self.lptr_arr is not None else NULL,
            &self.lcol[0] if self.lptr_arr is not None and self.lcol.shape[0] else NULL)
        self.panels_stale = False
        if self.use_obs and info == 0:
            if panels:
                self._form_panels(nthreads)
            else:
                self.panels_stale = True
        if self.blas_single:
            blas_restore_threads(saved)
        return info

    cdef void _form_panels(self, int nthreads) noexcept nogil:
        """The observation form's panel rows of the units (L21) for the current factor."""
        obs_panels(self.m1, self.k1, &self.T1v[0, 0], &self.L11v[0, 0, 0], &self.indptr[0],
                   self.D, &self.L21v[0, 0], &self.obsf, nthreads)

    def ensure_panels(self):
        """Form the panels (L21) of the current factor where an objective-only evaluation
        in the observation form left them out; nothing otherwise."""
        cdef int nthreads
        if self.panels_stale:
            nthreads = self.last_nthreads if self.last_nthreads > 0 else 1
            with nogil:
                self._form_panels(nthreads)
            self.panels_stale = False

    cdef void _pieces(self, double* ldz, double* ldx, double* r2) noexcept nogil:
        logdets_core(self.L11v, self.L22v, self.nz, ldz, ldx, r2)

    cdef double _deviance(self, bint reml) noexcept nogil:
        """Profiled deviance (JSS eq. 34) or REML criterion (eq. 41) of the current factor;
        +inf when r² is not positive."""
        cdef double ldz, ldx, r2, nn
        self._pieces(&ldz, &ldx, &r2)
        if not (r2 > 0.0):
            return INFINITY
        if reml:
            nn = <double>(self.n - self.p)
            return ldz + ldx + nn * (1.0 + LOG2PI + log(r2 / nn))
        nn = <double>self.n
        return ldz + nn * (1.0 + LOG2PI + log(r2 / nn))

    cdef int _check_theta(self, Py_ssize_t nt) except -1:
        """θ of length ``nt`` must cover every index the maps use; sizes ``self.theta``."""
        if nt <= self.max_theta_index:
            raise ValueError("theta is too short for this model")
        if self.theta is None or self.theta.shape[0] != nt:
            self.theta = np.empty(nt)
            self.thv = self.theta
        return 0

    cdef int _refactor(self, const double[::1] theta, bint panels) except? -99:
        """Size θ's buffer when needed, pick the threads and refactor (without the GIL);
        the kernel's info (``panels``: see :meth:`_factor_ptr`)."""
        cdef int info, nthreads
        if self.theta is None or self.theta.shape[0] != theta.shape[0]:
            self._check_theta(theta.shape[0])
        nthreads = self._threads()
        with nogil:
            info = self._factor_ptr(&theta[0] if theta.shape[0] else NULL, nthreads, panels)
        return info

    cpdef int factor(self, const double[::1] theta) except? -99:
        """Refactor Ω(θ) in place; 0 on success (else the kernel's info)."""
        return self._refactor(theta, True)

    cdef double _objective_ptr(self, const double* theta, bint reml) noexcept:
        """The objective at θ of the length checked by :meth:`objective_capsule`."""
        cdef int nthreads = self._threads(), info
        cdef double f
        with nogil:
            info = self._factor_ptr(theta, nthreads, False)
            f = self._deviance(reml) if info == 0 else INFINITY
        return f

    def objective_capsule(self, bint reml, Py_ssize_t ntheta):
        """The objective as a C function for a compiled optimizer loop.

        Returns a ``PyCapsule`` named ``"lmmfast.theta_objective"`` holding a
        ``double (*)(void *factor, const double *theta)`` to be called with this factor
        (kept alive by the caller) and θ of length ``ntheta`` (checked here, once), with
        the GIL held; the factorization itself runs without it."""
        self._check_theta(ntheta)
        return PyCapsule_New(<void*>(_reml_objective if reml else _ml_objective),
                             b"lmmfast.theta_objective", NULL)

    cpdef tuple pieces(self):
        """(log|L_θ|², log|R_X|², r²) of the current factor."""
        cdef double ldz, ldx, r2
        with nogil:
            self._pieces(&ldz, &ldx, &r2)
        return ldz, ldx, r2

    cpdef double objective(self, const double[::1] theta, bint reml) except? -1.0:
        """Profiled deviance (ML) or REML criterion at θ; +inf where Ω(θ) is not PD (the
        factor is left at θ; in the observation form without its panels until
        :meth:`ensure_panels`)."""
        if self._refactor(theta, False) != 0:
            return INFINITY
        return self._deviance(reml)

    def solve_dense(self):
        """z solving L22[:D-1, :D-1]' z = L22[D-1, :D-1]: the dense block's solution.

        Its first nz entries are the spherical random effects of the dense block's terms,
        the next p are β̂ (Bates et al. 2015, eqs. 19-20); read in place (no copy of L22,
        which on large models is hundreds of MB)."""
        cdef Py_ssize_t Dm = self.D - 1, i
        z = np.empty(Dm)
        cdef double[::1] zv = z
        cdef int n_i = <int>Dm, lda = <int>self.D, inc = 1
        cdef char up = b'U', nt = b'N', nd = b'N'
        if Dm == 0:
            return z
        with nogil:
            for i in range(Dm):
                zv[i] = self.L22v[Dm, i]
            # row-major lower L is column-major upper L': solve L' z = c
            dtrsv(&up, &nt, &nd, &n_i, &self.L22v[0, 0], &lda, &zv[0], &inc)
        return z


cdef double _ml_objective(void* factor, const double* theta) noexcept:
    return (<BlockedFactor>factor)._objective_ptr(theta, False)


cdef double _reml_objective(void* factor, const double* theta) noexcept:
    return (<BlockedFactor>factor)._objective_ptr(theta, True)

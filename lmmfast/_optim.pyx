# cython: language_level=3, boundscheck=False, wraparound=False
"""BOBYQA on a compiled objective: nlopt's C library calling a C function of θ.

Through nlopt's Python interface every evaluation crosses into Python and back (about
6 µs, plus the objective's own argument handling): on a 180-row model that is half of the
fit.  Here the optimizer loop and the objective meet in C; Python is entered once per fit.

The objective comes as a ``PyCapsule`` named ``"lmmfast.theta_objective"`` holding a
``double (*)(void *ctx, const double *theta)`` (``BlockedFactor.objective_capsule``),
called with the GIL held.  Built only where nlopt's C headers are found (``libnlopt-dev``);
:func:`lmmfast.optsummary.minimize_bobyqa` falls back to nlopt's Python interface elsewhere.
"""
import numpy as np
cimport numpy as cnp
from libc.math cimport INFINITY
from libc.string cimport memcpy
from cpython.pycapsule cimport PyCapsule_GetPointer

cnp.import_array()

cdef extern from "nlopt.h":
    # called back with the GIL held (nlopt_optimize is called with it)
    ctypedef double (*nlopt_func)(unsigned n, const double* x, double* gradient, void* data) noexcept

cdef extern from "nlopt.h" nogil:
    ctypedef struct nlopt_opt_s:
        pass
    ctypedef nlopt_opt_s* nlopt_opt
    ctypedef enum nlopt_algorithm:
        NLOPT_LN_BOBYQA
    ctypedef int nlopt_result
    nlopt_opt nlopt_create(nlopt_algorithm algorithm, unsigned n)
    void nlopt_destroy(nlopt_opt opt)
    nlopt_result nlopt_optimize(nlopt_opt opt, double* x, double* opt_f)
    nlopt_result nlopt_set_min_objective(nlopt_opt opt, nlopt_func f, void* f_data)
    nlopt_result nlopt_set_lower_bounds(nlopt_opt opt, const double* lb)
    nlopt_result nlopt_set_xtol_abs1(nlopt_opt opt, double tol)
    nlopt_result nlopt_set_ftol_abs(nlopt_opt opt, double tol)
    nlopt_result nlopt_set_ftol_rel(nlopt_opt opt, double tol)
    nlopt_result nlopt_set_maxeval(nlopt_opt opt, int maxeval)
    nlopt_result nlopt_set_initial_step(nlopt_opt opt, const double* dx)
    nlopt_result nlopt_force_stop(nlopt_opt opt)
    void nlopt_version(int* major, int* minor, int* bugfix)

cdef extern from "Python.h":
    int check_signals "PyErr_CheckSignals" ()    # -1 with the exception set: no except clause

ctypedef double (*theta_objective)(void* ctx, const double* theta) noexcept

cdef struct Loop:
    theta_objective fn
    void* ctx
    nlopt_opt opt
    long neval
    double best_f
    double* best_x
    bint interrupted


cdef double _evaluate(unsigned n, const double* x, double* grad, void* data) noexcept:
    cdef Loop* lp = <Loop*>data
    cdef double f
    if lp.interrupted:
        return 1e300
    f = lp.fn(lp.ctx, x)
    lp.neval += 1
    if f < lp.best_f:
        lp.best_f = f
        memcpy(lp.best_x, x, n * sizeof(double))
    if check_signals() != 0:        # Ctrl-C: stop, re-raised after the loop
        lp.interrupted = True
        nlopt_force_stop(lp.opt)
    return f if f < INFINITY else 1e300    # nlopt wants a finite value (as the Python path)


cdef int _reraise() except -1:
    return -1


def version():
    """The nlopt C library's version, ``(major, minor, bugfix)``."""
    cdef int a, b, c
    nlopt_version(&a, &b, &c)
    return a, b, c


def bobyqa(capsule, ctx, x0, lower, double xtol_abs, double ftol_abs, double ftol_rel,
           long maxeval, initial_step=None):
    """Minimise the compiled objective with NLOPT_LN_BOBYQA.

    Parameters
    ----------
    capsule : PyCapsule ``"lmmfast.theta_objective"``
    ctx : object
        Passed to the capsule's function; must accept θ of ``len(x0)``.
    x0, lower : (n,) float arrays
        Start and lower bounds (``-inf`` where unbounded).
    xtol_abs, ftol_abs, ftol_rel, maxeval :
        nlopt's stopping rules (0 turns ``ftol_rel`` off).
    initial_step : (n,) array, optional
        BOBYQA's first trust-region radius per element (nlopt's default when None).

    Returns
    -------
    x : ndarray
        nlopt's returned point.
    code : int
        nlopt's return code (negative on failure; -4 roundoff limited).
    neval : int
    best_x : ndarray or None
        The best point evaluated (None when nothing was).
    best_f : float
    """
    cdef cnp.ndarray[double, ndim=1, mode="c"] x = np.array(x0, dtype=np.float64, copy=True)
    cdef cnp.ndarray[double, ndim=1, mode="c"] lb = np.ascontiguousarray(lower, dtype=np.float64)
    cdef cnp.ndarray[double, ndim=1, mode="c"] best = np.empty_like(x)
    cdef cnp.ndarray[double, ndim=1, mode="c"] step
    cdef unsigned n = <unsigned>x.shape[0]
    cdef Loop lp
    cdef double fmin = INFINITY
    cdef nlopt_result code
    if lb.shape[0] != n or n == 0:
        raise ValueError("x0 and lower must be non-empty and of the same length")
    lp.fn = <theta_objective>PyCapsule_GetPointer(capsule, b"lmmfast.theta_objective")
    if lp.fn == NULL:
        raise ValueError("not an lmmfast objective capsule")
    lp.ctx = <void*>ctx
    lp.neval = 0
    lp.best_f = INFINITY
    lp.best_x = &best[0]
    lp.interrupted = False
    lp.opt = nlopt_create(NLOPT_LN_BOBYQA, n)
    if lp.opt == NULL:
        raise MemoryError("nlopt_create failed")
    try:
        nlopt_set_min_objective(lp.opt, _evaluate, &lp)
        nlopt_set_lower_bounds(lp.opt, &lb[0])
        nlopt_set_xtol_abs1(lp.opt, xtol_abs)
        nlopt_set_ftol_abs(lp.opt, ftol_abs)
        if ftol_rel:
            nlopt_set_ftol_rel(lp.opt, ftol_rel)
        nlopt_set_maxeval(lp.opt, <int>min(maxeval, 2 ** 31 - 1))
        if initial_step is not None:
            step = np.ascontiguousarray(initial_step, dtype=np.float64)
            if step.shape[0] != n:
                raise ValueError("initial_step must have the length of x0")
            nlopt_set_initial_step(lp.opt, &step[0])
        code = nlopt_optimize(lp.opt, &x[0], &fmin)
    finally:
        nlopt_destroy(lp.opt)
    if lp.interrupted:
        _reraise()                      # the KeyboardInterrupt PyErr_CheckSignals set
    return x, int(code), int(lp.neval), (best if lp.neval and lp.best_f < INFINITY else None), \
        float(lp.best_f)

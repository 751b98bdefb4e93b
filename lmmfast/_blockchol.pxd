"""Declarations of the blocked Cholesky kernel (``_blockchol.pyx``) for ``_pls``."""
cimport numpy as cnp
from lmmfast._obsform cimport ObsForm

# Dense blocks up to this size are factored by plain loops (chol_lower): LAPACK calls
# cost more there.
cdef enum:
    SMALL_CHOL = 16

cdef int update_blocked_core(
        const double* A11, Py_ssize_t m1, Py_ssize_t k1, const double* T1,
        const cnp.int64_t* indptr, const cnp.int64_t* rows, const double* A21,
        const double* A22, Py_ssize_t D, Py_ssize_t nz,
        const double* rscale, const cnp.int64_t* rk, const cnp.int64_t* rtoff,
        const double* Tflat, const cnp.int64_t* batch, Py_ssize_t nbatch,
        double* L11, double* L21, double* L22, double* buf, double* wbuf,
        const cnp.int64_t* tptr, const cnp.int64_t* tidx, const cnp.int64_t* tstart,
        const cnp.int32_t* rows32, double* acc, double* wxy, const cnp.int64_t* heavy, Py_ssize_t nheavy,
        const char* hflag, double* hbuf, Py_ssize_t hchunk, int nthreads,
        double* rbuf, int chol_threads=*, Py_ssize_t tile=*,
        const ObsForm* obs=*, const cnp.int64_t* lptr=*,
        const cnp.int32_t* lcol=*) noexcept nogil

cdef Py_ssize_t batched_width(const cnp.int64_t* batch, Py_ssize_t nbatch,
                              const cnp.int64_t* indptr, Py_ssize_t k1) noexcept nogil

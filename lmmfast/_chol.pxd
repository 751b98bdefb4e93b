# cython: language_level=3
"""Tiled dense Cholesky and symmetric rank-K update, threaded over tiles (``_chol.pyx``)."""

cdef enum:
    MAX_BLAS_SETTERS = 8      # BLAS libraries whose thread-local setting is kept

cdef int blas_single_thread(int* saved) noexcept nogil
cdef void blas_restore_threads(const int* saved) noexcept nogil
cdef int potrf_tiled(double* A, Py_ssize_t n, Py_ssize_t lda, Py_ssize_t nb,
                     int nthreads) noexcept nogil
cdef void syrk_tiled(double* C, Py_ssize_t n, Py_ssize_t ldc, const double* H, Py_ssize_t K,
                     Py_ssize_t ldh, Py_ssize_t nb, int nthreads) noexcept nogil

"""Declarations of the observation-form coupling kernel (``_obsform.pyx``) for
``_blockchol`` and ``_pls``."""
cimport numpy as cnp


cdef struct ObsForm:
    # the observations sorted by level of term 1 (level j: optr[j] .. optr[j + 1])
    Py_ssize_t n            # observations
    Py_ssize_t nu           # units per observation: one per later random-effects term
    Py_ssize_t zw           # Σ k_t over the later terms (doubles of a row of uz and s)
    Py_ssize_t nxy          # p + 1: X and y
    const cnp.int64_t* optr     # (m1 + 1,)
    const double* z1            # (n, k1): the observation's row of term 1's model matrix
    const cnp.int64_t* upos     # (n, nu): dense-block row where the unit's level starts
    const cnp.int64_t* uprow    # (n, nu): that row's place in the level's panel
    const cnp.int64_t* uk       # (nu,): k_t
    const cnp.int64_t* uzoff    # (nu,): where term t's values start in a row of uz
    const double* uz            # (n, zw): the later terms' model-matrix rows
    const double* xy            # (n, nxy): [x_i y_i]
    const cnp.int64_t* soff     # (n, nu): where each unit's Λ_t' z sits in s (rows of s
                                # in the order of the units' dense-block rows)
    const cnp.int64_t* mbase    # (m1 + 1,): where level j's Gram matrix starts in gram
    # the random-effects blocks of the downdate: block b of L22 starts at row bpos[2b],
    # column bpos[2b + 1] (bpos[2b] >= bpos[2b + 1]); its pairs are bptr[b] .. bptr[b + 1],
    # each (index of the pair's Gram entry, offsets of the two units in s): two units of
    # observations of one level of term 1 whose levels meet in that block
    Py_ssize_t nblk
    const cnp.int64_t* bptr     # (nblk + 1,)
    const cnp.int64_t* bpos     # (nblk, 2)
    const cnp.int64_t* pair     # (npair, 3)
    const cnp.int64_t* assign   # (nblk,): 1 where the block's pairs write it alone (its
                                # A22 block is zero: no Λ' A22 Λ there), else 0
    # the unit blocks of the lower triangle that Λ' A22 Λ (+ I) writes: (row, column) of
    # each one's first entry (ObsData.lam_plan)
    Py_ssize_t nlam
    const cnp.int64_t* lam      # (nlam, 2)
    const cnp.int64_t* uk_at    # (nz,): k of the unit starting at a dense-block row
    double* s                   # (n, zw) scratch: Λ_t' z per unit
    double* gram                # (Σ n_j²,) scratch: the levels' Gram matrices
    Py_ssize_t nmax             # most observations in a level
    int max_threads             # threads the per-thread scratch is made for
    Py_ssize_t thr_stride       # doubles of one thread's scratch:
    double* thr                 # per thread: see _obsform.scratch_layout

cdef int obs_update(const double* A11, Py_ssize_t m1, Py_ssize_t k1, const double* T1,
                    const cnp.int64_t* indptr, const double* A22, Py_ssize_t D,
                    Py_ssize_t nz, const double* rscale, const cnp.int64_t* rk,
                    const cnp.int64_t* rtoff, const double* Tflat, double* L11, double* L21,
                    double* L22, const ObsForm* ob, int nthreads, double* rbuf) noexcept nogil

cdef void obs_panels(Py_ssize_t m1, Py_ssize_t k1, const double* T1, const double* L11,
                     const cnp.int64_t* indptr, Py_ssize_t D, double* L21, const ObsForm* ob,
                     int nthreads) noexcept nogil

"""The linear mixed model: formula and data in, profiled objective out, fit on request.

The staged pipeline of lme4 (``lFormula`` -> ``mkLmerDevfun`` -> ``optimizeLmer``), each
stage usable alone::

    m = LinearMixedModel("Reaction ~ Days + (Days | Subject)", data)   # lFormula
    m.objective(theta)                                                  # the deviance function
    fit = m.fit()                                                       # optimise -> results
"""
from __future__ import annotations

import numpy as np

from .bars import parse_formula
from .blocks import BlockedCrossprod
from .errors import DataError
from .fixed import drop_aliased, fixed_matrix, model_frame, response, xy_gram
from .optsummary import metric_scale, minimize_bobyqa, minimize_lbfgs, minimize_newton
from .pls import BlockedPLS
from .sparsepls import SparsePLS, cholmod_available
from .moments import moment_start
from .remat import ReTerm, check_term_sizes, order_terms

__all__ = ["LinearMixedModel", "lmer"]


class LinearMixedModel:
    """A linear mixed model ready to evaluate its objective at any θ.

    Parameters
    ----------
    formula : str
        lme4 formula, e.g. ``"y ~ x + (1 + x | g) + (1 | h)"``.
    data : pandas.DataFrame
        Never modified.
    REML : bool, default True
        Minimise the REML criterion (True) or the ML deviance (False).
    method : {"auto", "blocked", "cholmod"}
        How Ω(θ) is factored: ``"blocked"`` (the term with most levels block diagonal,
        the rest one dense block; MixedModels.jl's layout), ``"cholmod"`` (sparse
        supernodal Cholesky with a fill-reducing ordering; lme4's method) or ``"auto"``
        (blocked unless the dense block would be large and stay sparse after
        eliminating the first term; see :func:`choose_method`).

    Attributes
    ----------
    terms : list of ReTerm
        Random-effects terms in lme4's order (decreasing number of levels).
    X : (n, p) array, fixed-effects model matrix (aliased columns dropped)
    y : (n,) array
    theta_lower, theta_start : arrays
    """

    def __init__(self, formula: str, data, REML: bool = True, method: str = "auto"):
        if method not in ("auto", "blocked", "cholmod"):
            raise ValueError(f"method must be 'auto', 'blocked' or 'cholmod', not {method!r}")
        self.formula = parse_formula(formula)
        self.REML = bool(REML)
        mf = model_frame(self.formula, data)
        self.n_dropped = mf.n_dropped
        self.row_index = mf.row_index
        frame = mf.frame
        self.y = response(self.formula, frame)
        X, names, spec, cells = fixed_matrix(self.formula, frame)
        self.fixed_spec = spec
        G = xy_gram(X, self.y, cells)
        self.X, self.xnames, self.dropped = drop_aliased(X, names, XtX=G[:-1, :-1])
        self._xkeep = [names.index(nm) for nm in self.xnames]
        if self.dropped:
            keep = self._xkeep + [len(names)]
            G = np.ascontiguousarray(G[np.ix_(keep, keep)])
        self.xy_gram = G        # [X y]'[X y] of the kept columns
        terms = [ReTerm(b, frame) for b in self.formula.bars]
        n = len(self.y)
        check_term_sizes(terms, n)
        self.terms = order_terms(terms)
        if self.REML and n <= self.X.shape[1]:
            raise DataError(f"REML needs more observations ({n}) than fixed effects ({self.X.shape[1]})")
        offs, o = [], 0
        for t in self.terms:
            offs.append(o)
            o += t.ntheta
        self.theta_offsets = offs
        self.theta_lower = np.concatenate([t.theta_lower() for t in self.terms])
        self.theta_start = np.concatenate([t.theta_start() for t in self.terms])
        self.theta_names = [nm for t in self.terms for nm in t.theta_names()]
        if method == "auto":
            method = choose_method(self.terms, self.p)
        self.method = method
        if method == "cholmod":
            self.pls = SparsePLS(self.terms, self.X, self.y, offs)
        else:
            kept = None if cells is None else (cells[0], cells[1][:, self._xkeep])
            self.pls = BlockedPLS(BlockedCrossprod(self.terms, self.X, self.y, offs,
                                                   xy_gram=self.xy_gram, cells=kept))
        for t in self.terms:
            t.forget_pairs()

    # ------------------------------------------------------------------ sizes
    @property
    def nobs(self) -> int:
        return len(self.y)

    @property
    def p(self) -> int:
        return self.X.shape[1]

    @property
    def ntheta(self) -> int:
        return len(self.theta_start)

    # ------------------------------------------------------------------ objective
    def objective(self, theta) -> float:
        """The profiled deviance (ML) or REML criterion at ``theta`` (lme4's devfun).

        Parameters
        ----------
        theta : array_like
            Relative covariance parameters in lme4's order (``getME(m, "theta")``).
        """
        theta = np.asarray(theta, dtype=float).ravel()
        if theta.shape != self.theta_start.shape:
            raise ValueError(f"theta must have length {self.ntheta} ({', '.join(self.theta_names)}), "
                             f"got {theta.size}")
        return self.pls.objective(theta, self.REML)

    def objective_and_gradient(self, theta):
        """The objective and its analytic gradient in θ (``method="blocked"`` only)."""
        from .gradient import blocked_gradient

        theta = np.asarray(theta, dtype=float).ravel()
        f = self.objective(theta)
        if not np.isfinite(f):
            return f, np.zeros_like(theta)
        return f, blocked_gradient(self.pls, self.REML)

    def information_scale(self, theta) -> np.ndarray:
        """A scale for each element of θ from the average information H at ``theta``
        (:func:`lmmfast.information.average_information`): 1/√H_kk, the step that changes
        the objective by about ½ — the scale an approximate Hessian gives L-BFGS-B from its
        first step.  Diagonals of H below 10⁻⁸ of their largest (elements the objective
        hardly depends on there, such as those of a column of T at 0) are raised to that,
        and no scale exceeds max(1, |θ_k|); where H cannot be formed (the objective is not
        finite at ``theta``) every scale is 1."""
        from .information import average_information

        theta = np.asarray(theta, dtype=float).ravel()
        if self.method != "blocked" or not np.isfinite(self.objective(theta)):
            return np.ones(self.ntheta)
        scale = metric_scale(average_information(self.pls, self.REML),
                             np.maximum(1.0, np.abs(theta)))
        return np.ones(self.ntheta) if scale is None else scale

    # ------------------------------------------------------------------ fitting
    def moment_start(self) -> np.ndarray:
        """A method-of-moments starting θ (:func:`lmmfast.moments.moment_start`)."""
        return self._moments()[0]

    def _moments(self):
        """(moment start θ, relative first step of each element: NaN where not estimated)."""
        return moment_start(self.terms, self.theta_offsets, self.X, self.y, self.p,
                            self.theta_start, xy_gram=self.xy_gram)

    def fit(self, optimizer: str = "auto", start="auto", verbose: bool = False, callback=None,
            **control):
        """Minimise the objective over θ and return the fitted model.

        Parameters
        ----------
        optimizer : {"auto", "bobyqa", "lbfgs", "newton"}
            ``"bobyqa"``: nlopt's BOBYQA with lme4's bounds and tolerances (derivative
            free, lme4's default).  ``"lbfgs"``: L-BFGS-B with the analytic gradient of
            the objective (``method="blocked"``): several times fewer evaluations, each
            dearer (about three evaluations' worth each); from the moment start, θ scaled
            by the average information there (:meth:`information_scale`).  ``"newton"``
            (``method="blocked"``): Newton steps on the average information with gradients
            by finite differences in its metric, or analytic from
            :data:`NEWTON_EXACT_MIN_THETA` elements of θ
            (:func:`lmmfast.optsummary.minimize_newton`; BOBYQA takes over where it stalls):
            from the moment start, half the evaluations of BOBYQA or fewer (the 1 M-row
            crossed rung: 2 evaluations and 2 gradients).  ``"auto"`` (default) takes
            L-BFGS-B when θ has 8 or more elements, where BOBYQA's evaluation count grows
            fastest (and it stops short of the optimum more often); Newton from
            :data:`NEWTON_MIN_NOBS` observations with a moment start, where evaluations
            cost milliseconds to seconds; BOBYQA otherwise.
        start : "auto", "lme4", "moments" or array_like
            Starting θ.  ``"lme4"``: 1 on diagonals, 0 elsewhere.  ``"moments"``:
            :meth:`moment_start`, which takes about half the evaluations of lme4's start
            on crossed and nested models.  ``"auto"`` (default): the moment start from
            1,000 observations up; below, lme4's (a whole fit takes about a millisecond
            there, and the moments cost as much as the evaluations they save).
        verbose : bool
            Print the evaluation count, objective and elapsed time as the fit goes.
        callback : callable, optional
            ``callback(neval, theta, objective)`` after every evaluation.
        **control
            For BOBYQA ``xtol_abs``, ``ftol_abs``, ``ftol_rel``, ``maxeval``,
            ``initial_step``; for L-BFGS-B ``gtol``, ``ftol``, ``maxeval``, ``scale``
            (one positive number per element of θ, or None for none); for Newton
            ``delta``, ``stop``, ``maxiter``, ``exact_gradient`` (True: the analytic
            gradient, False: forward differences; default: analytic from
            :data:`NEWTON_EXACT_MIN_THETA` elements of θ).

        Returns
        -------
        LmerFit
        """
        from .results import LmerFit

        step = None
        if start is None or (isinstance(start, str) and start == "lme4"):
            x0 = self.theta_start
        elif isinstance(start, str) and start in ("auto", "moments"):
            big = start == "moments" or self.nobs >= 1000
            x0, step = self._moments() if big else (self.theta_start, None)
        elif isinstance(start, str):
            raise ValueError(f"start must be 'auto', 'lme4', 'moments' or a θ vector, not {start!r}")
        else:
            x0 = np.asarray(start, dtype=float).ravel()
        if x0.shape != self.theta_start.shape:
            raise ValueError(f"start must have length {self.ntheta}")
        if np.any(x0 < self.theta_lower):
            raise ValueError("start violates the lower bounds of theta (diagonal elements >= 0)")
        name = optimizer.lower()
        if name not in ("auto", "bobyqa", "nloptwrap", "lbfgs", "newton"):
            raise ValueError(f"unknown optimizer {optimizer!r}; available: 'auto', 'bobyqa', "
                             "'lbfgs', 'newton'")
        if name == "auto":
            if self.method == "blocked" and self.ntheta >= 8:
                name = "lbfgs"
            elif self.method == "blocked" and step is not None and self.nobs >= NEWTON_MIN_NOBS:
                name = "newton"
            else:
                name = "bobyqa"
        if name in ("lbfgs", "newton") and self.method != "blocked":
            raise ValueError(f"optimizer={name!r} needs the factor's derivatives, available with "
                             "method='blocked'; use optimizer='bobyqa' with method='cholmod'")
        # BOBYQA's first trust region: about a third of the standard error of a moment
        # estimate (it is close: 7-15 evaluations on large crossed models), nlopt's default
        # (a quarter of |θ|, or 1) elsewhere.
        first_step = (step * np.maximum(x0, 0.1)
                      if step is not None and not np.isnan(step).all() else None)

        def bobyqa(start, **ctl):
            ctl.setdefault("initial_step", first_step)
            compiled = getattr(self.pls, "compiled_objective", None)
            return minimize_bobyqa(self.pls.objective_function(self.REML), start,
                                   self.theta_lower, verbose=verbose, callback=callback,
                                   compiled=compiled(self.REML, self.ntheta) if compiled else None,
                                   **ctl)

        if name == "newton":
            from .gradient import blocked_gradient
            from .information import average_information

            exact = control.pop("exact_gradient", None)
            if exact is None:
                exact = self.ntheta >= NEWTON_EXACT_MIN_THETA
            try:
                opt = minimize_newton(
                    self.pls.objective_function(self.REML),
                    lambda: average_information(self.pls, self.REML), x0, self.theta_lower,
                    gradient=(lambda: blocked_gradient(self.pls, self.REML, keep=True))
                    if exact else None,
                    verbose=verbose, callback=callback, fallback=bobyqa, **control)
            finally:
                self.pls._minv = None           # the gradients' buffer (see blocked_gradient)
        elif name == "lbfgs":
            if "scale" not in control:
                # from the moment start (near the optimum) the average information is a
                # good metric: kb07-like fits take half the evaluations, simulated maximal
                # models 13 % fewer, none ending above BOBYQA's optimum; from lme4's
                # T = I it is not (6 % more, 3 of 32 above BOBYQA's optimum by 0.01-0.06)
                control["scale"] = self.information_scale(x0) if step is not None else None
            opt = minimize_lbfgs(self.objective_and_gradient, x0, self.theta_lower,
                                 verbose=verbose, callback=callback, **control)
        else:
            opt = bobyqa(x0, **control)
        return LmerFit(self, opt)

    def __repr__(self):
        return (f"LinearMixedModel({self.formula.text!r}, n={self.nobs}, p={self.p}, "
                f"terms={[str(t.bar) for t in self.terms]}, REML={self.REML})")


# From this many observations (and a moment start), fits with fewer than 8 elements of θ
# take Newton steps on the average information instead of BOBYQA: there an evaluation
# costs milliseconds to seconds and the steps need half the evaluations or fewer.
NEWTON_MIN_NOBS = 10_000
# From this many elements of θ, Newton takes the analytic gradient (about two to three
# evaluations' worth: a dense inverse and one pass over the panels) instead of n forward
# differences (n evaluations), and stops right after a step, at the factor of the
# estimate.  Measured (whole fits, alternating): InstEval 3 factors (3 θ) 0.26 s with 3
# evaluations against 0.33 s with 13; service × dept (2 θ) 0.30 against 0.29 s: equal,
# the differences stay there; the 1 M-row crossed rung (4 θ) 2 evaluations against 11.
NEWTON_EXACT_MIN_THETA = 3


def choose_method(terms, p: int, dense_limit: int = 2000, density: float = 0.25,
                  sample: int = 64) -> str:
    """Pick the factorization: ``"blocked"`` or ``"cholmod"``.

    The blocked method costs about D³/3 flops per θ for its dense block of size
    D = Σ_{i>1} q_i + p + 1.  Below ``dense_limit`` that is always cheap.  Above it, the
    density of the dense block's random-effects part after eliminating the first term
    (the pattern of Z_r'Z_r plus the fill Z_r'Z_1 Z_1'Z_r) tells whether the structure
    stays sparse (nested or partially crossed factors): then CHOLMOD wins.  The density
    is measured on ``sample`` random columns of that pattern (seeded; exact when there
    are fewer columns), so the choice costs a fraction of one product.
    """
    import scipy.sparse as sp

    nz = sum(t.q for t in terms[1:])
    D = nz + p + 1
    if D <= dense_limit or not cholmod_available():
        return "blocked"
    if D > 20000:
        return "cholmod"
    m1 = terms[0].nlevels
    rest = terms[1:]
    offs = np.cumsum([0] + [t.nlevels for t in rest])
    nlev = int(offs[-1])

    def pattern(rows, cols, nrow):            # 0/1 matrix of (row, col) pairs
        return sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(nrow, nlev))

    # first-term levels × later levels (the pairs the cross-products reuse), and the
    # later levels' own pattern Z_r'Z_r (diagonal within a term)
    B = None
    for t, o in zip(rest, offs):
        pa, pb, _ = terms[0].pairs(t)
        B = pattern(pa, pb + o, m1) if B is None else B + pattern(pa, pb + o, m1)
    R = pattern(np.arange(nlev), np.arange(nlev), nlev)
    for i, (ti, oi) in enumerate(zip(rest, offs)):
        for tl, ol in zip(rest[i + 1:], offs[i + 1:]):
            pa, pb, _ = ti.pairs(tl)              # the cross-products reuse these too
            R = R + pattern(pa + oi, pb + ol, nlev) + pattern(pb + ol, pa + oi, nlev)
    cols = np.arange(nlev)
    if nlev > sample:
        cols = np.sort(np.random.default_rng(0).choice(nlev, sample, replace=False))
    S = B[:, cols].T @ B + R[cols, :]         # the sampled rows of the pattern
    return "blocked" if S.nnz > density * len(cols) * nlev else "cholmod"


def lmer(formula: str, data, REML: bool = True, **fit_kwargs):
    """Fit a linear mixed model as lme4's ``lmer`` does.

    Parameters
    ----------
    formula : str
        lme4 formula with random-effects bars: ``(1|g)``, ``(x|g)``, ``(0+x|g)``,
        ``(1+x||g)``, ``(1|a:b)``, ``(1|a/b)``; any fixed part formulaic understands.
    data : pandas.DataFrame
    REML : bool, default True
    **fit_kwargs
        ``method`` goes to :class:`LinearMixedModel`; the rest to
        :meth:`LinearMixedModel.fit` (``optimizer``, ``start``, ``verbose``, ...).

    Returns
    -------
    LmerFit
        With ``theta``, ``fixef``, ``sigma``, ``objective``, ``ranef``, ``varcorr``, ``vcov``,
        ``summary()`` and the rest.

    Examples
    --------
    >>> import lmmfast
    >>> df = lmmfast.datasets.load("sleepstudy")
    >>> m = lmmfast.lmer("Reaction ~ Days + (Days | Subject)", df)
    >>> round(m.objective, 2)
    1743.63
    """
    method = fit_kwargs.pop("method", "auto")
    return LinearMixedModel(formula, data, REML=REML, method=method).fit(**fit_kwargs)

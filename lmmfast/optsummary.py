"""The optimizer's record, and the optimizers that minimise the profiled deviance over θ."""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from .errors import ConvergenceWarning

try:                      # built where nlopt's C library is found (libnlopt-dev)
    from . import _optim
except ImportError:       # pragma: no cover (then nlopt's Python interface runs the loop)
    _optim = None

__all__ = ["OptSummary", "metric_scale", "minimize_bobyqa", "minimize_lbfgs", "minimize_newton"]

# nlopt's return codes
_NLOPT_CODES = {
    1: "NLOPT_SUCCESS", 2: "NLOPT_STOPVAL_REACHED", 3: "NLOPT_FTOL_REACHED",
    4: "NLOPT_XTOL_REACHED", 5: "NLOPT_MAXEVAL_REACHED", 6: "NLOPT_MAXTIME_REACHED",
    -1: "NLOPT_FAILURE", -2: "NLOPT_INVALID_ARGS", -3: "NLOPT_OUT_OF_MEMORY",
    -4: "NLOPT_ROUNDOFF_LIMITED", -5: "NLOPT_FORCED_STOP",
}


@dataclass
class OptSummary:
    """What the optimizer did (MixedModels.jl's ``optsum``, lme4's ``@optinfo``).

    Attributes
    ----------
    optimizer : str
    initial : ndarray
        Starting θ.
    lower : ndarray
        Lower bounds of θ (0 on diagonals of the relative covariance factors, -inf else).
    final : ndarray
        θ at the optimum.
    fmin : float
        Objective at ``final``.
    feval : int
        Number of objective evaluations (including the boundary checks after the optimizer).
    returnvalue : str
        The optimizer's return code, e.g. ``"NLOPT_FTOL_REACHED"``.
    converged : bool
    xtol_abs, ftol_abs, ftol_rel, maxeval :
        The convergence settings used.
    elapsed : float
        Seconds spent optimising.
    messages : list of str
        Warnings raised about the fit (non-convergence, boundary adjustments).
    """

    optimizer: str
    initial: np.ndarray
    lower: np.ndarray
    final: np.ndarray = None
    fmin: float = math.inf
    feval: int = 0
    returnvalue: str = ""
    converged: bool = False
    xtol_abs: float = 1e-8
    ftol_abs: float = 1e-8
    ftol_rel: float = 0.0
    maxeval: int = 100000
    elapsed: float = 0.0
    messages: list = field(default_factory=list)

    def __str__(self):
        lines = [
            "Optimizer summary",
            f"  optimizer:    {self.optimizer}",
            f"  initial θ:    {np.array2string(np.asarray(self.initial), precision=4)}",
            f"  final θ:      {np.array2string(np.asarray(self.final), precision=6)}",
            f"  objective:    {self.fmin:.6f}",
            f"  evaluations:  {self.feval}",
            f"  return value: {self.returnvalue}",
            f"  elapsed:      {self.elapsed:.3f} s",
        ]
        return "\n".join(lines + [f"  message: {m}" for m in self.messages])

    __repr__ = __str__


class _Counted:
    """Wraps the objective: counts calls, remembers the best point, reports progress."""

    def __init__(self, fn, verbose=False, callback=None):
        self.fn, self.verbose, self.callback = fn, verbose, callback
        self.n = 0
        self.best_f = math.inf
        self.best_x = None
        self.t0 = time.perf_counter()

    def __call__(self, x, grad=None):
        f = self.record(x, self.fn(x))
        return f if f < math.inf else 1e300

    def record(self, x, f):
        """Count one evaluation at ``x`` with value ``f``; report progress; return f."""
        self.n += 1
        if f < self.best_f:
            self.best_f, self.best_x = f, np.array(x, dtype=float)
        if self.verbose and (self.n <= 10 or self.n % 10 == 0):
            print(f"  eval {self.n:5d}  objective {f:.6f}  ({time.perf_counter() - self.t0:.2f} s)",
                  flush=True)
        if self.callback is not None:
            # a copy: nlopt's x is a view of its own buffer, reused (and freed) after the call
            self.callback(self.n, np.array(x, dtype=float), f)
        return f


def _check_boundary(fn, x, fx, lower, counter):
    """lme4's check.boundary: components within 1e-5 of their bound of 0 are tried at the
    bound, kept when the objective is not worse."""
    near = np.isfinite(lower) & (x - lower < 1e-5) & (x != lower)
    if near.any():
        xb = np.where(near, lower, x)
        fb = fn(xb)
        counter.n += 1
        if fb <= fx:
            return xb, fb
    return x, fx


def _finish(summ, fn, f, x, fx, lower, code, codes, t0):
    if f.best_x is not None and f.best_f < fx:
        x, fx = f.best_x, f.best_f
    x, fx = _check_boundary(fn, x, fx, lower, f)
    summ.final, summ.fmin, summ.feval = x, float(fx), f.n
    summ.returnvalue = codes.get(code, str(code))
    summ.elapsed = time.perf_counter() - t0
    if not summ.converged:
        msg = (f"the optimizer stopped without converging ({summ.returnvalue} after {f.n} "
               "evaluations); the estimates may not be the optimum")
        summ.messages.append(msg)
        warnings.warn(msg, ConvergenceWarning, stacklevel=4)
    return summ


class _Stalled(Exception):
    """Raised inside the objective to end a descent stuck at the rounding level."""


def minimize_lbfgs(fg, x0, lower, *, gtol=None, ftol=1e-15, maxeval=100000,
                   probe_step=1e-3, stall_evals=8, stall_rel=1e-13, scale=None, verbose=False,
                   callback=None):
    """Minimise with L-BFGS-B using the analytic gradient (``fg(θ) -> (f, ∇f)``).

    ``scale`` (positive, one per element of θ) runs the descent in z = (θ − θ₀) / scale:
    with the square roots of the inverse diagonal of a Hessian approximation
    (:func:`lmmfast.information.average_information`) its first steps are already in
    proportion, which L-BFGS otherwise learns over many evaluations (kb07-like fits: about
    half the evaluations).  Bounds stay bounds (the map is diagonal); the gradient tolerance
    applies to the gradient in z, and everything reported is in θ.

    Stops when the projected gradient's largest component is below ``gtol`` or the
    relative decrease below ``ftol``.  ``gtol`` defaults to 1e-10 × max(|f(θ₀)|, 10⁵):
    1e-5 on objectives up to 10⁵, growing with the objective beyond that, where rounding
    in the gradient of a sum over millions of rows is of that order.  A line search that
    cannot improve further at the optimum (floating-point limit) counts as converged when
    the projected gradient is small, and so does a descent whose last ``stall_evals``
    evaluations improved on the best objective by less than ``stall_rel`` (relative): on
    large data the line search can otherwise spend dozens of evaluations on rounding noise.
    Where it stops with diagonal elements of T at 0, one evaluation ``probe_step`` inside
    the bound decides whether to restart from there.
    """
    import scipy.optimize as so

    x0 = np.asarray(x0, dtype=float)
    lower = np.asarray(lower, dtype=float)
    summ = OptSummary("lbfgs", x0.copy(), lower.copy(), xtol_abs=0.0, ftol_abs=0.0,
                      ftol_rel=ftol, maxeval=maxeval)
    last = {}
    s = np.ones_like(x0) if scale is None else np.asarray(scale, dtype=float)
    c = np.zeros_like(x0) if scale is None else x0.copy()
    if s.shape != x0.shape or not np.all(np.isfinite(s) & (s > 0)):
        raise ValueError("scale must hold one positive number per element of θ")

    def to_z(x):
        return (np.asarray(x, dtype=float) - c) / s

    def fonly(x):
        return fg(x)[0]

    f = _Counted(fonly, verbose, callback)

    stall = {"n": 0, "f": math.inf, "x": None, "g": None}

    def to_theta(z):
        # L-BFGS-B keeps z within its bounds; the clip only removes the rounding of the map
        return np.maximum(c + s * np.asarray(z, dtype=float), lower)

    def fgc(z):
        val, g = fgx(to_theta(z))
        return val, g * s

    def fgx(x):
        x = np.asarray(x, dtype=float)
        if "x" in last and np.array_equal(last["x"], x):     # scipy re-asks for θ₀
            val, g = last["f"], last["g"]
        else:
            val, g = fg(x)
            f.record(x, val)
            last["x"], last["f"], last["g"] = x.copy(), val, g
            # the rounding floor: line searches that no longer improve the objective by
            # more than its rounding error, evaluation after evaluation, end the descent
            if val < stall["f"] - stall_rel * max(1.0, abs(stall["f"])):
                stall["n"] = 0
            else:
                stall["n"] += 1
            if val < stall["f"]:
                stall["f"], stall["x"], stall["g"] = val, x.copy(), g
            if stall["n"] >= stall_evals:
                raise _Stalled
        if not np.isfinite(val):
            return 1e300, np.zeros_like(x)
        return val, g

    def descend(start):
        stall["n"] = 0
        try:
            r = so.minimize(fgc, to_z(start), jac=True, method="L-BFGS-B", bounds=bounds,
                            options=dict(ftol=ftol, gtol=gtol, maxcor=20,
                                         maxfun=max(1, int(maxeval) - f.n),
                                         maxiter=int(maxeval)))
            r.x = to_theta(r.x)                                    # back to θ
            if getattr(r, "jac", None) is not None:
                r.jac = np.asarray(r.jac) / s
            return r
        except _Stalled:
            return so.OptimizeResult(x=stall["x"], fun=stall["f"], jac=stall["g"], success=True,
                                     status=0, message="STALLED AT THE ROUNDING LEVEL")

    if gtol is None:
        f0 = fgx(x0)[0]
        gtol = 1e-10 * max(abs(f0) if f0 < 1e300 else 0.0, 1e5)
    t0 = time.perf_counter()
    bounds = [(lo if np.isfinite(lo) else None, None) for lo in to_z(lower)]
    start = x0
    x = fx = r = None
    for attempt in range(4):
        rr = descend(start)
        if r is None or rr.fun < fx - 1e-10 * max(1.0, abs(fx)):
            r, x, fx = rr, np.asarray(rr.x, dtype=float), float(rr.fun)
        elif attempt:
            break
        # A diagonal element of T at its bound of 0 is often a stationary point of the
        # objective in that coordinate, so a gradient method can stop there even when the
        # optimum is inside.  Probe just inside the bound (one evaluation): when the
        # objective rises there and its slope points back to the bound in every such
        # coordinate, the bound is the optimum; else restart from inside, keep the better end.
        edge = np.isfinite(lower) & (x <= lower)
        if not edge.any() or f.n >= maxeval:
            break
        probe = np.where(edge, lower + probe_step, x)
        stall["n"] = 0
        fp, gp = fgx(probe)
        inward = edge & (np.asarray(gp) < 0)
        if fp >= fx and not inward.any():
            break
        start = np.where(inward if inward.any() else edge, lower + 0.1, x)
    if "x" in last and np.array_equal(last["x"], x):
        g = np.asarray(last["g"])
    elif getattr(r, "jac", None) is not None and np.array_equal(np.asarray(r.x), x):
        g = np.asarray(r.jac)
    else:
        g = np.asarray(fg(x)[1])
        f.n += 1
    pg = np.where((x <= lower) & (g > 0), 0.0, g)       # projected gradient
    small = np.max(np.abs(pg)) <= max(1e-3, 1e-8 * abs(fx)) if len(pg) else True
    code = 1 if r.success else (4 if small and r.status == 2 else -1)
    summ.converged = code > 0
    return _finish(summ, fonly, f, x, fx, lower, code,
                   {1: "CONVERGENCE", 4: "ABNORMAL_TERMINATION_IN_LNSRCH (at optimum)",
                    -1: str(r.message)}, t0)


def minimize_newton(fn, information, x0, lower, *, gradient=None, delta=1e-2, stop=1e-5,
                    maxiter=30, max_damping=1e6, probe_step=1e-3, verbose=False,
                    callback=None, fallback=None):
    """Minimise with Newton steps on the average information, gradients by finite
    differences in its metric (``fn(θ) -> f``; ``information() -> H`` at the θ of the last
    call of ``fn``, :func:`lmmfast.information.average_information`).

    At θ, each element k is stepped by h_k = ``delta``/√H_kk (inward: every bound is a lower
    bound), which changes the objective by about ½ delta²; the gradient is the forward
    difference less the curvature H gives, g_k = (f(θ + h_k e_k) − f(θ))/h_k − ½ H_kk h_k
    (exact for a quadratic with that curvature).  The step solves
    (H_FF + λ diag H_FF) d = −g_F on the free elements F (all but those at their bound
    with g pushing outward), projected onto the bounds; λ (Levenberg-Marquardt) starts at
    0 and grows tenfold while a step does not lower the objective.  Near the optimum the
    steps converge about quadratically (the information is the Hessian in expectation), so
    a fit from the moment start takes n + 1 evaluations per step and 2-3 steps: InstEval
    and the 1 M-row crossed rung in 9-13 evaluations where BOBYQA takes 15-24.

    With ``gradient`` (``gradient() -> ∇f`` at the θ of the last call of ``fn``, e.g.
    :func:`lmmfast.gradient.blocked_gradient`) the gradient is exact instead: one call
    after each accepted step in place of n evaluations (cheaper where an evaluation is
    dominated by a large dense Cholesky and θ has 3 or more elements: the gradient costs
    about two evaluations there).

    Stops before stepping when the step's predicted decrease −(g'd + ½ d'Hd) is below
    max(10⁻⁹, 10⁻¹³ |f|) (the objective's rounding), or after an undamped step whose
    predicted decrease was below ``stop`` + 10⁻¹² |f|: taken where it lowers the
    objective (the next would gain about its square), left where it does not (a step that
    small is lost in the rounding of the objective's differences).  With an exact gradient
    such a step is not taken: θ is within ``stop`` of the model's minimum already, and the
    factor stays at θ.  It also stops after an undamped step that lowered the objective
    by between half and twice its predicted decrease p, as did the step before it
    (predicted p'), where p²/p' -- the next step's gain, were the decreases to shrink by
    their last ratio (Newton's shrink faster) -- is at the rounding level max(10⁻⁹,
    10⁻¹³ |f|): there, at the step's own evaluation, with no gradient or probes after it,
    and the factor left at the estimate (InstEval: two evaluations or a gradient fewer).
    Where the damping passes
    ``max_damping``, or after ``maxiter`` steps, ``fallback(θ) -> OptSummary`` continues from
    the best point (the caller passes BOBYQA).

    A diagonal element of T at its bound of 0 is a stationary point of the objective in
    that coordinate (it depends on the element's square), where both the gradient and the
    information's row vanish: the steps cannot leave it even where the optimum is inside
    (a Newton step that lands on the bound stays there).  So where the steps stop with
    elements at their bound, one evaluation each ``probe_step`` inside decides: where
    lower, the steps go on from the lowest of them (two such rounds at most).
    """
    x0 = np.asarray(x0, dtype=float)
    lower = np.asarray(lower, dtype=float)
    summ = OptSummary("newton", x0.copy(), lower.copy(), xtol_abs=0.0, ftol_abs=stop,
                      ftol_rel=1e-12, maxeval=(maxiter + 2) * (len(x0) + 2) + 1)
    t0 = time.perf_counter()
    counter = _Counted(fn, verbose, callback)
    bounded = np.isfinite(lower)
    x = x0.copy()
    fx = counter.record(x, fn(x))
    code = 0
    if not np.isfinite(fx):
        code = -1
    else:
        g = np.asarray(gradient(), dtype=float) if gradient is not None else None
        H = np.asarray(information(), dtype=float)
    stale = False            # H from the previous point (exact gradient: see below)
    prev = None              # the last accepted undamped step's predicted decrease, where
    it = 0                   # the objective fell by about as much
    probes = 2
    while code == 0 or (code in (1, 3, 4) and probes > 0):
        if code:
            # converged: elements at their bound stay there only where the objective
            # rises just inside it (see the docstring)
            edge = np.flatnonzero(bounded & (x <= lower))
            if not len(edge):
                break
            probes -= 1
            best = None
            for k in edge:       # one at a time: another may rightly stay at its bound
                xp = x.copy()
                xp[k] = lower[k] + probe_step
                fp = counter.record(xp, fn(xp))
                if fp < fx - max(1e-9, 1e-13 * abs(fx)) and (best is None or fp < best[1]):
                    best = (xp, fp)
            if best is None:
                break
            if not np.array_equal(best[0], xp):
                # the information (and the gradient) need the factor at the point kept
                counter.record(best[0], fn(best[0]))
            (x, fx), code, stale, prev = best, 0, False, None
            if gradient is not None:
                g = np.asarray(gradient(), dtype=float)
            H = np.asarray(information(), dtype=float)
        if it >= maxiter:
            code = 5
            break
        it += 1
        if gradient is None:
            g, code = _difference_gradient(fn, counter, x, fx, H, delta)
            if code:
                break
        free = ~(bounded & (x <= lower) & (g > 0))
        if stale:
            # after an accepted step, the stop test on the previous point's information
            # first (near the optimum it hardly moves; refreshing it costs a pass)
            d = np.zeros_like(x)
            d[free], ok = _damped_step(H[np.ix_(free, free)], g[free], 0.0)
            if ok and -(g @ d + 0.5 * d @ H @ d) <= stop + 1e-12 * abs(fx):
                code = 1
                continue
            H = np.asarray(information(), dtype=float)
            stale = False
        lam = 0.0
        while True:
            d = np.zeros_like(x)
            d[free], ok = _damped_step(H[np.ix_(free, free)], g[free], lam)
            pred = -(g @ d + 0.5 * d @ H @ d) if ok else 0.0
            if ok and lam == 0.0 and pred <= max(1e-9, 1e-13 * abs(fx)):
                code = 3
                break
            small = lam == 0.0 and pred <= stop + 1e-12 * abs(fx)
            if ok and small and gradient is not None:
                code = 1
                break
            if ok:
                xn = np.maximum(x + d, np.where(bounded, lower, -np.inf))
                fn_ = counter.record(xn, fn(xn))
                better = fn_ < fx
                if better:
                    # the model held (the objective fell by about the predicted decrease,
                    # here and at the step before): the decreases shrink by their ratio
                    # or faster, so the next would gain about pred² / prev -- at the
                    # objective's rounding, stop here, at this step's factor
                    held = lam == 0.0 and 0.5 * pred <= fx - fn_ <= 2.0 * pred
                    if held and prev is not None and \
                            pred * pred / prev <= max(1e-9, 1e-13 * abs(fn_)):
                        x, fx, code = xn, fn_, 4
                        break
                    prev = pred if held else None
                    x, fx = xn, fn_
                    if gradient is not None:
                        g = np.asarray(gradient(), dtype=float)
                        stale = True
                    else:
                        H = np.asarray(information(), dtype=float)
                if small:   # taken or not (then lost in the objective's rounding): converged
                    code = 1
                if better or small:
                    break
            lam = max(10.0 * lam, 1e-3)
            if lam > max_damping:
                code = -4
                break
    if code < 0 or code == 5:
        if fallback is not None:
            rest = fallback(counter.best_x if counter.best_x is not None else x)
            rest.feval += counter.n
            rest.optimizer = "newton+" + rest.optimizer
            rest.initial = x0.copy()
            rest.elapsed = time.perf_counter() - t0
            return rest
    summ.converged = code > 0
    return _finish(summ, fn, counter, x, fx, lower, code,
                   {1: "CONVERGENCE: LAST STEP'S PREDICTED DECREASE BELOW STOP",
                    3: "CONVERGENCE: PREDICTED DECREASE AT ROUNDING LEVEL",
                    4: "CONVERGENCE: NEXT STEP'S DECREASE EXTRAPOLATED TO ROUNDING LEVEL",
                    5: "MAXITER_REACHED", -1: "OBJECTIVE NOT FINITE",
                    -4: "DAMPING LIMIT: THE INFORMATION DOES NOT MODEL THE OBJECTIVE"}, t0)


def _difference_gradient(fn, counter, x, fx, H, delta):
    """The gradient by forward differences in H's metric (see :func:`minimize_newton`):
    h_k = ``delta``/√H_kk (at most 0.1 max(1, |θ_k|)), g_k = (f(θ + h_k e_k) − f(θ))/h_k
    − ½ H_kk h_k.  Returns (g, 0), or (None, code): −4 where H has no positive diagonal,
    −1 where an evaluation is not finite."""
    unit = metric_scale(H, (0.1 / delta) * np.maximum(1.0, np.abs(x)))
    if unit is None:
        return None, -4
    hd = np.diag(H)
    hk = delta * unit
    g = np.empty_like(x)
    for k in range(len(x)):
        xk = x.copy()
        xk[k] += hk[k]
        fk = counter.record(xk, fn(xk))
        if not np.isfinite(fk):
            return None, -1
        g[k] = (fk - fx) / hk[k] - 0.5 * hd[k] * hk[k]
    return g, 0


def metric_scale(H, cap):
    """1/√H_kk for each k — the step that changes a quadratic with Hessian H by about ½ —
    each H_kk raised to at least 10⁻⁸ of the largest (elements the objective hardly
    depends on) and the result capped at ``cap``; None where H has no positive finite
    diagonal."""
    h = np.diag(np.asarray(H, dtype=float))
    top = float(np.max(h, initial=0.0))
    if not (np.isfinite(top) and top > 0.0):
        return None
    return np.minimum(1.0 / np.sqrt(np.maximum(h, 1e-8 * top)), cap)


def _damped_step(H, g, lam):
    """(d, ok): d solving (H + λ diag⁺H) d = −g by Cholesky, diag⁺H the diagonal of H
    floored at 10⁻¹² of its largest entry; ok False where that matrix is not positive
    definite (the caller raises λ)."""
    if len(g) == 0:
        return np.zeros(0), True
    dg = np.diag(H)
    floor = 1e-12 * max(float(np.max(np.abs(dg))), 1e-300)
    A = H + np.diag(lam * np.maximum(dg, floor) + floor)
    try:
        c = np.linalg.cholesky(A)
    except np.linalg.LinAlgError:
        return np.zeros_like(g), False
    return np.linalg.solve(c.T, np.linalg.solve(c, -g)), True


def minimize_bobyqa(fn, x0, lower, *, xtol_abs=1e-8, ftol_abs=1e-8, ftol_rel=1e-12,
                    maxeval=100000, initial_step=None, verbose=False, callback=None,
                    compiled=None):
    """Minimise ``fn`` over θ with nlopt's BOBYQA under lme4's bounds and tolerances.

    lme4's default ``lmer`` optimizer is ``nloptwrap`` (NLOPT_LN_BOBYQA, ``xtol_abs = 1e-8``,
    ``ftol_abs = 1e-8``); here ``ftol_rel = 1e-12`` is added, which stops the last steps
    that only chase rounding noise on large objectives (relative changes below 1e-12).
    After the optimizer stops, components that end within 1e-5 of their bound of 0 are
    tried at the bound (lme4's ``check.boundary``), kept when the objective is not worse.

    ``compiled``, a ``(capsule, context)`` pair computing ``fn`` in C (see
    ``BlockedPLS.compiled_objective``), lets nlopt's C library run the loop without
    entering Python per evaluation (small models spend most of their fit there); it is
    used when lmmfast was built with nlopt's C headers and there is nothing to report per
    evaluation (no ``verbose``, no ``callback``).  Same algorithm, same settings.

    Returns
    -------
    OptSummary
    """
    import nlopt

    x0 = np.asarray(x0, dtype=float)
    lower = np.asarray(lower, dtype=float)
    summ = OptSummary("bobyqa", x0.copy(), lower.copy(), xtol_abs=xtol_abs, ftol_abs=ftol_abs,
                      ftol_rel=ftol_rel, maxeval=maxeval)
    f = _Counted(fn, verbose, callback)
    t0 = time.perf_counter()
    step = None
    if initial_step is not None:
        step = np.array(np.broadcast_to(np.asarray(initial_step, dtype=float), x0.shape))
    lb = np.where(np.isfinite(lower), lower, -np.inf)
    if step is not None and np.isnan(step).any():
        step = np.where(np.isnan(step), _default_step(nlopt, x0, lb), step)  # NaN: default
    if compiled is not None and _optim is not None and not verbose and callback is None:
        x, code, f.n, f.best_x, f.best_f = _optim.bobyqa(
            compiled[0], compiled[1], x0, lb, xtol_abs, ftol_abs, ftol_rel, maxeval, step)
        if code < 0:
            if code != -4:
                summ.messages.append(f"optimizer failed: {_NLOPT_CODES.get(code, code)}")
            x = f.best_x
    else:
        x, code = _bobyqa_python(nlopt, f, x0, lb, xtol_abs, ftol_abs, ftol_rel, maxeval, step,
                                 summ)
    if x is None:
        x = x0
    x = np.asarray(x, dtype=float)
    if f.best_x is not None and np.array_equal(x, f.best_x):
        fx = f.best_f                      # nlopt returns its best point: no re-evaluation
    else:
        fx = fn(x)
        f.n += 1
    summ.converged = code > 0 and code != 5
    return _finish(summ, fn, f, x, fx, lower, code, _NLOPT_CODES, t0)


def _default_step(nlopt, x0, lb):
    """nlopt's default first step at ``x0`` under the lower bounds ``lb``."""
    opt = nlopt.opt(nlopt.LN_BOBYQA, len(x0))
    opt.set_lower_bounds(lb)
    return opt.get_initial_step(x0)


def _bobyqa_python(nlopt, f, x0, lb, xtol_abs, ftol_abs, ftol_rel, maxeval, step, summ):
    """BOBYQA through nlopt's Python interface, ``f`` called per evaluation; (x, code)."""
    opt = nlopt.opt(nlopt.LN_BOBYQA, len(x0))
    opt.set_min_objective(f)
    opt.set_lower_bounds(lb)
    opt.set_xtol_abs(xtol_abs)
    opt.set_ftol_abs(ftol_abs)
    if ftol_rel:
        opt.set_ftol_rel(ftol_rel)
    opt.set_maxeval(int(maxeval))
    if step is not None:
        opt.set_initial_step(step)
    try:
        x = opt.optimize(x0)
        code = opt.last_optimize_result()
    except nlopt.RoundoffLimited:
        x, code = f.best_x, -4
    except (RuntimeError, ValueError) as e:  # nlopt.failure and friends
        x, code = f.best_x, -1
        summ.messages.append(f"optimizer failed: {e}")
    return x, code

"""The rungs of the ladder: one :class:`Rung` per model benchmarked, with its data loader
(shipped datasets, or seeded simulations from ``lmmfast.simulate``), its formulas for lmmfast,
lme4 and the Python peers, statsmodels' and gpboost's spellings of it where they can express it,
and the reasons where they cannot.  Add a :class:`Rung` to :data:`RUNGS` to benchmark another
model.  lmmfast is imported inside the loaders only, so that the peer environment (which has no
lmmfast) can import this module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import pandas as pd

@dataclass(frozen=True)
class GpboostSpec:
    """How gpboost fits a rung: a ``GPModel`` with crossed random intercepts.

    Attributes
    ----------
    fixed : str
        Right-hand side of the fixed part, expanded by patsy into the ``X`` given to ``fit``.
    groups : tuple of str
        The grouping columns, one random intercept each (``group_data``).
    """

    fixed: str
    groups: tuple


@dataclass(frozen=True)
class Rung:
    """One model to benchmark.

    Attributes
    ----------
    number : int
        Step of the ladder (several rungs may share one).
    name : str
        Short identifier, used by ``--rungs``.
    load : callable
        ``load(scale) -> DataFrame``; factor columns as strings or pandas Categoricals (they
        become R factors).  ``scale`` (hidden ``--scale``, default 1) shrinks simulated data
        for development; loaders of fixed data ignore it.  Must not depend on global state
        other than a fixed seed.
    formula : str
        The formula given to ``lmmfast.lmer``, ``mixedlm.lmer`` and ``lme_python.lmer``.
    r_formula : str
        The formula given to ``lme4::lmer``.
    reml : bool
        REML (True) or ML (False), for every tool.
    statsmodels : callable, optional
        ``statsmodels(df, reml) -> MixedLMResults`` fitting the same model with statsmodels'
        ``MixedLM``; None where statsmodels cannot express it (reason in ``cannot``).
    gpboost : GpboostSpec, optional
        None where gpboost cannot express the model (reason in ``cannot``).
    cannot : dict
        ``{tool: reason}`` for the tools that cannot express this rung (not run).
    formulas : dict
        ``{tool: (formula, why)}`` where a Python peer needs the same model spelled otherwise.
    heavy : bool
        Skipped by ``--quick``.
    description : str
        One line for the README.
    """

    number: int
    name: str
    load: Callable[[float], pd.DataFrame]
    formula: str
    r_formula: str
    reml: bool
    statsmodels: Optional[Callable] = None
    gpboost: Optional[GpboostSpec] = None
    cannot: dict = field(default_factory=dict)
    formulas: dict = field(default_factory=dict)
    heavy: bool = False
    description: str = ""

    @property
    def label(self) -> str:
        return f"{self.number} {self.name}"


def shipped(name: str) -> Callable[[float], pd.DataFrame]:
    """Return a loader for one of the datasets shipped in ``lmmfast.datasets``."""
    def load(scale: float = 1.0) -> pd.DataFrame:
        from lmmfast import datasets
        return datasets.load(name)
    load.__name__ = f"shipped_{name}"
    return load


def load_kb07(scale: float = 1.0) -> pd.DataFrame:
    """Rung 4: ``lmmfast.simulate.kb07_like(seed=42)`` (56 subjects x 32 items).

    Adds the products of the ±0.5 factors as columns (``sp``, ``sl``, ``pl``, ``spl``), for
    lme-python, whose formula parser has no three-way interactions (:data:`KB07_PRODUCTS`).
    """
    from lmmfast import simulate
    df = simulate.kb07_like(seed=42)[0]
    return df.assign(sp=df.spkr * df.prec, sl=df.spkr * df.load, pl=df.prec * df.load,
                     spl=df.spkr * df.prec * df.load)


KB07_TERMS = "1 + spkr + prec + load + sp + sl + pl + spl"
KB07_PRODUCTS = f"y ~ {KB07_TERMS} + ({KB07_TERMS} | subj) + ({KB07_TERMS} | item)"


def crossed_loader(n: int, n1: int, n2: int, slope: bool) -> Callable[[float], pd.DataFrame]:
    """A loader for ``lmmfast.simulate.crossed(n, n1, n2, slope, seed=1)``, scaled by ``scale``."""
    def load(scale: float = 1.0) -> pd.DataFrame:
        from lmmfast import simulate
        sn, s1, s2 = (max(int(round(v * scale)), 10) for v in (n, n1, n2))
        return simulate.crossed(sn, s1, s2, slope=slope, seed=1)[0]
    load.__name__ = f"crossed_{n}"
    return load


def sm_sleepstudy(df: pd.DataFrame, reml: bool):
    """statsmodels: ``Reaction ~ Days`` with correlated random intercept and slope by Subject."""
    import statsmodels.formula.api as smf
    model = smf.mixedlm("Reaction ~ Days", df, groups=df["Subject"], re_formula="~Days")
    return model.fit(reml=reml, full_output=True)


def sm_penicillin(df: pd.DataFrame, reml: bool):
    """statsmodels: crossed intercepts for plate and sample as variance components of one group."""
    import statsmodels.formula.api as smf
    df = df.assign(_one=1)
    vc = {"plate": "0 + C(plate)", "sample": "0 + C(sample)"}
    model = smf.mixedlm("diameter ~ 1", df, groups="_one", re_formula="0", vc_formula=vc)
    return model.fit(reml=reml, full_output=True)


SM_CROSSED = ("crossed random effects need a single all-observation group with dense "
              "variance-component design matrices (n x levels): impractical at this size")
SM_CORR_CROSSED = ("no correlated random slopes for crossed factors (variance components "
                   "are independent)")
GP_NO_REML = "gpboost fits ML only (no REML criterion)"
GP_NO_CORR = "gpboost has no correlated random slopes (only independent random coefficients)"

RUNGS = [
    Rung(1, "sleepstudy", shipped("sleepstudy"),
         "Reaction ~ Days + (Days | Subject)", "Reaction ~ Days + (Days | Subject)", True,
         statsmodels=sm_sleepstudy, cannot={"gpboost": GP_NO_CORR},
         description="180 obs; correlated random intercept + slope for 18 subjects (3 θ), REML."),
    Rung(2, "penicillin", shipped("penicillin"),
         "diameter ~ 1 + (1 | plate) + (1 | sample)", "diameter ~ 1 + (1 | plate) + (1 | sample)",
         True, statsmodels=sm_penicillin, cannot={"gpboost": GP_NO_REML},
         description="144 obs; fully crossed intercepts, 24 plates x 6 samples (2 θ), REML."),
    Rung(3, "insteval-ml", shipped("insteval"),
         "y ~ 1 + service + (1 | s) + (1 | d) + (1 | dept)",
         "y ~ 1 + service + (1 | s) + (1 | d) + (1 | dept)", False,
         gpboost=GpboostSpec("1 + service", ("s", "d", "dept")),
         cannot={"statsmodels": SM_CROSSED},
         description="73,421 obs; crossed intercepts for 2,972 students, 1,128 lecturers, "
                     "14 departments (3 θ), ML."),
    Rung(3, "insteval-service-dept", shipped("insteval"),
         "y ~ 1 + service * dept + (1 | s) + (1 | d)",
         "y ~ 1 + service * dept + (1 | s) + (1 | d)", True,
         cannot={"statsmodels": SM_CROSSED, "gpboost": GP_NO_REML},
         description="73,421 obs; 28 fixed effects (service x dept), crossed intercepts for "
                     "students and lecturers (2 θ), REML."),
    Rung(4, "kb07", load_kb07,
         "y ~ 1 + spkr*prec*load + (1 + spkr*prec*load | subj) + (1 + spkr*prec*load | item)",
         "y ~ 1 + spkr*prec*load + (1 + spkr*prec*load | subj) + (1 + spkr*prec*load | item)",
         True, cannot={"statsmodels": SM_CORR_CROSSED, "gpboost": GP_NO_CORR},
         formulas={"lme-python": (KB07_PRODUCTS, "the same model: lme-python's formula parser "
                                 "has no three-way interactions, so the products of the ±0.5 "
                                 "factors are precomputed columns")},
         description="1,792 obs simulated by `lmmfast.simulate.kb07_like(seed=42)`: 56 subjects x "
                     "32 items, 2x2x2 within factors coded ±0.5, maximal model (two 8x8 "
                     "covariances, 72 θ), REML."),
    Rung(5, "crossed-1m", crossed_loader(1_000_000, 50_000, 2_000, True),
         "y ~ 1 + x + (1 | g1) + (1 + x | g2)", "y ~ 1 + x + (1 | g1) + (1 + x | g2)", False,
         cannot={"statsmodels": SM_CROSSED, "gpboost": GP_NO_CORR}, heavy=True,
         description="1,000,000 obs simulated by `lmmfast.simulate.crossed(1_000_000, 50_000, "
                     "2_000, slope=True, seed=1)`: 50,000 x 2,000 crossed levels with Zipf-like "
                     "frequencies, correlated intercept + slope on g2 (4 θ), ML."),
    Rung(6, "crossed-10m", crossed_loader(10_000_000, 100_000, 5_000, False),
         "y ~ 1 + x + (1 | g1) + (1 | g2)", "y ~ 1 + x + (1 | g1) + (1 | g2)", False,
         gpboost=GpboostSpec("1 + x", ("g1", "g2")),
         cannot={"statsmodels": SM_CROSSED}, heavy=True,
         description="10,000,000 obs simulated by `lmmfast.simulate.crossed(10_000_000, 100_000, "
                     "5_000, slope=False, seed=1)`: 100,000 x 5,000 crossed levels, Zipf-like "
                     "frequencies (2 θ), ML (the scale on which gpboost is compared)."),
]


def find_rungs(names) -> list:
    """The rungs named (or numbered) in ``names``, in ladder order."""
    chosen = []
    for name in names:
        hits = [r for r in RUNGS if r.name == name or str(r.number) == str(name)]
        if not hits:
            raise SystemExit(f"unknown rung {name!r}; available: "
                             f"{', '.join(r.name for r in RUNGS)} or numbers 1-{RUNGS[-1].number}")
        chosen.extend(h for h in hits if h not in chosen)
    return [r for r in RUNGS if r in chosen]


def find_rung(name: str) -> Rung:
    """The rung called ``name``."""
    return next(r for r in RUNGS if r.name == name)

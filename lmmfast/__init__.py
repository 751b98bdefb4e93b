"""lmmfast: linear mixed-effects models with lme4's formulas and lme4's answers, fast.

>>> import lmmfast
>>> m = lmmfast.lmer("Reaction ~ Days + (Days | Subject)", lmmfast.datasets.load("sleepstudy"))
>>> print(m.summary())                                          # doctest: +SKIP
"""
from . import datasets, icc, simulate
from .errors import (ConvergenceWarning, DataError, FormulaError, LmmError, MissingColumnError,
                     RankDeficiencyWarning)
from .model import LinearMixedModel, lmer
from .results import LmerFit

__version__ = "0.1.0"

__all__ = ["lmer", "LinearMixedModel", "LmerFit", "datasets", "simulate", "icc", "LmmError", "FormulaError",
           "DataError", "MissingColumnError", "ConvergenceWarning", "RankDeficiencyWarning"]

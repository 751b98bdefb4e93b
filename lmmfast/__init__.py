"""lmmfast: linear mixed-effects models with lme4's formulas and lme4's answers, fast.

>>> import lmmfast
>>> m = lmmfast.lmer("Reaction ~ Days + (Days | Subject)", lmmfast.datasets.load("sleepstudy"))
>>> print(m.summary())                                          # doctest: +SKIP
"""
from . import threads as _threads

_threads.load_kernels()     # first: OpenMP reads its wait policy once, when it is loaded

from . import datasets, icc, simulate  # noqa: E402
from .errors import (ConvergenceWarning, DataError, FormulaError, LmmError,  # noqa: E402
                     MissingColumnError, RankDeficiencyWarning)
from .model import LinearMixedModel, lmer  # noqa: E402
from .results import LmerFit  # noqa: E402

__version__ = "0.1.0"

__all__ = ["lmer", "LinearMixedModel", "LmerFit", "datasets", "simulate", "icc", "LmmError", "FormulaError",
           "DataError", "MissingColumnError", "ConvergenceWarning", "RankDeficiencyWarning"]

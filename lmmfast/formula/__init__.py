"""statsmodels-style interface: ``import lmmfast.formula.api as smf``; ``smf.mixedlm(...)``.

See :func:`lmmfast.formula.api.mixedlm` for how ``groups``, ``re_formula`` and
``vc_formula`` map onto lme4 random-effects terms.
"""
from . import api
from .api import MixedLM, mixedlm
from .results import MixedLMResults, Summary
from .translate import SamePartitionWarning

__all__ = ["api", "mixedlm", "MixedLM", "MixedLMResults", "Summary", "SamePartitionWarning"]

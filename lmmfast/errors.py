"""Exceptions and warnings raised by lmmfast.

Every error about the user's input is a subclass of ``ValueError`` (or ``KeyError`` for
columns that do not exist), so ``except ValueError`` catches all of them.
"""


class LmmError(ValueError):
    """Base class of lmmfast's input errors."""


class FormulaError(LmmError):
    """The formula cannot be parsed or names an invalid term."""


class DataError(LmmError):
    """The data cannot be used for this model (response, rows, levels)."""


class MissingColumnError(KeyError, LmmError):
    """A column named in the formula is not in the data."""

    def __str__(self):  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ConvergenceWarning(UserWarning):
    """The optimizer stopped without meeting its convergence criteria."""


class RankDeficiencyWarning(UserWarning):
    """Fixed-effects columns were dropped because they are linear combinations of others."""

"""Exceptions raised by tensornet.

Every error derives from :class:`TensornetError` and from the builtin a caller would
catch anyway (``ValueError``, ``TypeError`` or ``ImportError``), so ``except ValueError``
keeps working. Every exception class of the package is defined here, the command line's
and the data loaders' included.
"""

from __future__ import annotations

__all__ = [
    "TensornetError",
    "ShapeError",
    "ConfigError",
    "RankError",
    "ToleranceError",
    "DTypeError",
    "NonFiniteError",
    "AdapterMismatchError",
    "AdapterFileError",
    "PeftVersionError",
    "DataError",
    "UsageError",
]


class TensornetError(Exception):
    """Base class of every error raised by tensornet."""


class ShapeError(TensornetError, ValueError):
    """An array's shape, or a list of modes, does not fit the request."""


class ConfigError(TensornetError, ValueError):
    """An option or an adapter configuration value is invalid."""


class RankError(ConfigError):
    """A rank specification is invalid (the one error for ``rank`` everywhere).

    Raised by the decompositions, the counting functions and the adapter configs alike;
    a :class:`ConfigError` (and so a ``ValueError``).
    """


class ToleranceError(ConfigError):
    """An error tolerance ``tol`` is not a number in (0, 1), or below what the dtype reaches."""


class DTypeError(TensornetError, TypeError):
    """A value has the wrong type, or an array a dtype the operation cannot take."""


class NonFiniteError(TensornetError, ValueError):
    """An array holds NaN or Inf values, or a result would (an overflow of its dtype)."""


class AdapterMismatchError(TensornetError, ValueError):
    """A saved adapter does not match the model or configuration it is loaded into."""


class AdapterFileError(TensornetError, ValueError):
    """A saved adapter file is missing, truncated, damaged or inconsistent with its config."""


class PeftVersionError(TensornetError, ImportError):
    """The installed peft is a version tensornet's methods were not tested with."""


class DataError(TensornetError, ValueError):
    """A data file or a data option is invalid (the message names the file and line)."""


class UsageError(TensornetError, ValueError):
    """Bad command-line input; the command line reports it as one line with exit code 2."""

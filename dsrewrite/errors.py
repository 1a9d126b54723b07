# SPDX-License-Identifier: Apache-2.0
"""The one exception hierarchy of dsrewrite.

Every error a user can cause derives from :class:`DsRewriteError`. Messages say
what went wrong, where (a file, key path or module's qualified name), the
offending value, and what to do about it.

The CLI maps :class:`UsageError` (bad input: files, recipes, shapes, outputs)
to exit code 2 and every other :class:`DsRewriteError` (the rewrite itself
failed) to exit code 1.

Example:
    >>> from dsrewrite.errors import RecipeError, UsageError
    >>> issubclass(RecipeError, UsageError)
    True
"""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = [
    "DsRewriteError",
    "UsageError",
    "RecipeError",
    "ModelLoadError",
    "UnsafePickleError",
    "OutputError",
    "InputShapeError",
    "UnsupportedConvError",
    "UnsupportedModelError",
    "CaptureError",
    "PlanError",
    "PlanFileError",
    "RewriteError",
    "CalibrationError",
    "did_you_mean",
    "TrustedPickleWarning",
]


class DsRewriteError(Exception):
    """Base class of every error raised by dsrewrite on purpose."""


class TrustedPickleWarning(UserWarning):
    """A file was read with ``trust_pickle=True`` (CLI ``--trust-pickle``): code in it may have run."""


class UsageError(DsRewriteError):
    """Bad input from the user: a file, a recipe, a shape, an output path (CLI exit 2)."""


class RecipeError(UsageError):
    """A recipe could not be loaded or validated."""


class ModelLoadError(UsageError):
    """A model file or architecture spec could not be loaded."""


class UnsafePickleError(ModelLoadError):
    """A model file names, calls or holds something the safe loader does not admit."""


class OutputError(UsageError):
    """An output path cannot be written (exists, equals the input, unwritable)."""


class InputShapeError(UsageError):
    """The model cannot run on the given example input."""


class UnsupportedModelError(UsageError):
    """The model as a whole cannot be rewritten: quantized convs, or weights on the meta device (CLI exit 2)."""


class UnsupportedConvError(DsRewriteError):
    """A convolution cannot be represented as a depthwise-separable one."""


class CaptureError(DsRewriteError):
    """The model's graph could not be captured."""


class PlanError(DsRewriteError):
    """A plan does not fit the model it is applied to."""


class PlanFileError(PlanError, UsageError):
    """A plan (a ``.plan.json`` file, or a Plan's values) is malformed or does not fit the model's weights
    (CLI exit 2: bad input, found before anything is built)."""


class RewriteError(DsRewriteError):
    """The rewrite itself failed (CLI exit 1)."""


class CalibrationError(DsRewriteError):
    """Calibration or healing failed."""


def did_you_mean(value: object, options: Iterable[str]) -> str:
    """Return ``' (did you mean 'x'?)'`` for the closest option, or ``''``.

    Example:
        >>> did_you_mean("decoder_onyl", ["decoder_only", "all_3x3"])
        " (did you mean 'decoder_only'?)"
    """
    matches = difflib.get_close_matches(str(value), list(options), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""

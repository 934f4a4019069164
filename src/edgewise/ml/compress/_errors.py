"""Errors raised by `edgewise.ml.compress`.

Invariant: every failure of a recipe, a measurement or a selection reaches the caller as a
`CompressError` (an `MLError`), with onnxruntime/onnx/torch errors wrapped where they happen.
"""

from __future__ import annotations

from ..errors import MLError

__all__ = ["CompressError", "NoFitError", "NotApplicableError"]


class CompressError(MLError):
    """A compression recipe, a measurement or a report failed."""


class NotApplicableError(CompressError):
    """A recipe cannot run on this bundle (e.g. pruning without torch weights); not a bug."""


class NoFitError(CompressError):
    """No candidate satisfies the device profile; the message says what each one missed."""

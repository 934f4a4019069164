"""Exceptions raised by `edgewise.ml`.

Invariant: every failure the ml package reports to a caller is an `MLError`; errors from torch,
onnxruntime, gzip or the file system are wrapped at the seam where they happen, so callers (the
CLI) catch one root and print one clear message.
"""

from __future__ import annotations

__all__ = ["BackboneError", "DatasetError", "ExportError", "MLError"]


class MLError(Exception):
    """Root of every error raised by `edgewise.ml`."""


class DatasetError(MLError):
    """A dataset on disk is missing, truncated or inconsistent (untrusted input)."""


class BackboneError(MLError):
    """A backbone name is unknown, or its weights cannot be found or do not fit the model."""


class ExportError(MLError):
    """The exported ONNX model does not reproduce the torch model it was exported from."""

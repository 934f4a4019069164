"""Errors raised by the artifacts package.

Every error here means *untrusted input was rejected*: a bundle or manifest that is not what
it claims to be. Nothing here is a transport or operator error.
"""

__all__ = ["ArtifactError", "BundleError"]


class ArtifactError(Exception):
    """Root of every error raised by `edgewise.artifacts`."""


class BundleError(ArtifactError):
    """A bundle (directory or manifest) is malformed, tampered with or unsafe."""

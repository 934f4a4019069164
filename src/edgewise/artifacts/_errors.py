"""Errors raised by the artifacts package.

Every error here means *untrusted input was rejected*: a bundle or manifest that is not what
it claims to be. Nothing here is a transport or operator error.
"""

__all__ = [
    "ArtifactError",
    "BundleError",
    "DeltaBaseError",
    "DeltaError",
    "DeltaFormatError",
    "DeltaResultError",
    "DeltaTruncatedError",
    "DeltaVersionError",
]


class ArtifactError(Exception):
    """Root of every error raised by `edgewise.artifacts`."""


class BundleError(ArtifactError):
    """A bundle (directory or manifest) is malformed, tampered with or unsafe."""


# --- delta patches (edgewise.artifacts.delta) ---------------------------------------------
# A patch is untrusted input like a bundle: it is checked (container checksum, base hash,
# every record's bounds, the result hash) and refused with one of these; callers fall back
# to the full file on any DeltaError.


class DeltaError(ArtifactError):
    """A delta patch was refused: nothing was written at the output path."""


class DeltaFormatError(DeltaError):
    """The patch is not a delta patch, or is corrupt (checksum or record out of bounds)."""


class DeltaTruncatedError(DeltaFormatError):
    """The patch ends before its header says it does (e.g. an interrupted download)."""


class DeltaVersionError(DeltaError):
    """The patch is a delta patch of a format version this code does not know."""


class DeltaBaseError(DeltaError):
    """The old file is not the base the patch was made from (wrong base)."""


class DeltaResultError(DeltaError):
    """Decoding produced bytes whose hash is not the expected result."""

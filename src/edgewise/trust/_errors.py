"""Errors of the trust package, rooted by origin.

`VerificationError`: untrusted input (metadata or a target) failed TUF verification.
`TransportError`: the network or the server failed; nothing untrusted was accepted.
`KeyFileError`: an operator-side problem with key or root files.
"""

__all__ = ["KeyFileError", "TransportError", "TrustError", "VerificationError"]


class TrustError(Exception):
    """Root of every error raised by `edgewise.trust`."""


class VerificationError(TrustError):
    """Metadata or a target did not verify: wrong signature, hash, length, version or expiry."""


class TransportError(TrustError):
    """Fetching metadata or a target failed (connection, HTTP status, timeout)."""


class KeyFileError(TrustError):
    """A key or trusted-root file is missing, unreadable or does not match."""

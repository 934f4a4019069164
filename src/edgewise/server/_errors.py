"""Domain errors of the server; `app.py` maps each class to one HTTP status in one handler."""

from __future__ import annotations

from ..trust._device_auth import REPLAY_HEADER, DeviceAuthError, ReplayedRequest

__all__ = [
    "Conflict",
    "DomainError",
    "Forbidden",
    "InvalidInput",
    "NotFound",
    "ServiceBusy",
    "Unauthorized",
]


class DomainError(Exception):
    status_code = 400

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers


class InvalidInput(DomainError):
    """The request was understood but its content is unacceptable (untrusted input)."""

    status_code = 422


class Unauthorized(DomainError):
    status_code = 401

    @classmethod
    def device(cls, exc: DeviceAuthError) -> Unauthorized:
        """A device request refused; a replayed nonce says so in a header (`DeviceAuth` then
        signs the request anew: its first send was taken, the answer lost)."""
        headers = {REPLAY_HEADER: "replayed"} if isinstance(exc, ReplayedRequest) else None
        return cls(str(exc), headers=headers)


class Forbidden(DomainError):
    status_code = 403


class NotFound(DomainError):
    status_code = 404


class Conflict(DomainError):
    status_code = 409


class ServiceBusy(DomainError):
    """Too many requests need the database at once: come back after `retry_after_s`."""

    status_code = 503

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

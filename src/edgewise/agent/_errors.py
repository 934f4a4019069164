"""Agent errors, rooted by origin.

`AgentTransportError`: the server or network failed (retry later, nothing was changed).
`UpdateRejected`: an update is untrusted or invalid (verification, bundle validation).
`HealthCheckFailed`: the new model does not reproduce its golden set or is too slow.
`AgentConfigError`: the device was not set up (not enrolled, bad state directory).
"""

__all__ = [
    "AgentConfigError",
    "AgentError",
    "AgentTransportError",
    "DependencyUnmet",
    "HealthCheckFailed",
    "InsufficientDisk",
    "NoModelError",
    "UpdateRejected",
]


class AgentError(Exception):
    """Root of every error raised by `edgewise.agent`."""


class AgentConfigError(AgentError):
    pass


class AgentTransportError(AgentError):
    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class UpdateRejected(AgentError):
    pass


class DependencyUnmet(AgentError):
    """The release needs other components at versions this device does not run (or would
    break a committed component's dependency); nothing was downloaded. Retried when the
    device's committed components change."""


class InsufficientDisk(AgentError):
    """The update does not fit on this device's disk now; nothing was downloaded."""


class HealthCheckFailed(AgentError):
    pass


class NoModelError(AgentError):
    """There is no committed model in the active slot (nothing installed yet)."""

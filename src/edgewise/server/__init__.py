"""The Edgewise update server (FastAPI control plane + TUF repository) and the operator's
HTTP client for it. The client needs only httpx, so the app is imported lazily."""

from typing import TYPE_CHECKING, Any

from .client import OperatorClient, ServerApiError, publish_bundle

if TYPE_CHECKING:
    from .app import ServerConfig, create_app, resolve_admin_token

__all__ = [
    "OperatorClient",
    "ServerApiError",
    "ServerConfig",
    "create_app",
    "publish_bundle",
    "resolve_admin_token",
]


def __getattr__(name: str) -> Any:
    if name in ("ServerConfig", "create_app", "resolve_admin_token"):
        from . import app

        return getattr(app, name)
    raise AttributeError(name)

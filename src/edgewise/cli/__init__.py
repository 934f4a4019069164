"""The `edgewise` command: thin wrappers that parse arguments and call the packages."""

from ._app import app


def main() -> None:
    app()


__all__ = ["app", "main"]

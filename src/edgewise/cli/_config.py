"""`edgewise config build`: configuration files as a release (a thin wrapper over
`edgewise.artifacts.write_config_bundle`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._apps import Depends, _depends
from ._common import fail, out, print_json

config_app = typer.Typer(help="Configuration files as releases: checked, switched atomically, "
                         "rolled back with the app that reads them.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")


@config_app.command("build")
def build(
    files: Annotated[list[str], typer.Argument(
        help="files (each by its own name), directories (their files, by path inside), or "
             "NAME=PATH (the file PATH installed as NAME)")],
    name: Annotated[str, typer.Option(help="the component's name (one per device)")],
    version: Annotated[str, typer.Option(help="the release version")],
    out_dir: Annotated[Path, typer.Option("--out", help="the bundle directory to write (new)")],
    app: Annotated[str | None, typer.Option(
        help="the app component that reads the files: it sees them read-only in its "
             "container, is restarted with them, and its health check decides")] = None,
    mount: Annotated[str | None, typer.Option(
        help="where the app sees the files [default: /etc/edgewise/config/NAME]")] = None,
    check: Annotated[str | None, typer.Option(
        help="a command the device runs in the new files' directory before they become "
             "active (exit 0: valid; also given EDGEWISE_CONFIG_DIR)")] = None,
    check_timeout_s: Annotated[float, typer.Option(help="seconds the check may take")] = 10.0,
    format_: Annotated[list[str] | None, typer.Option(
        "--format", help="NAME=json|toml|text: how the device checks file NAME (repeatable; "
        ".json and .toml files are checked as such by default)")] = None,
    depends: Depends = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Make a config bundle of files; `edgewise publish` ships it."""
    import shlex

    from edgewise.artifacts import BundleError, write_config_bundle

    named = [item for item in files if "=" in item]
    if named and len(named) != len(files):
        fail("give every file as NAME=PATH, or none")
    sources: dict[str, Path] | list[Path | str] = (
        {n: Path(p) for n, _, p in (item.partition("=") for item in named)} if named
        else list(files))
    formats = {}
    for item in format_ or []:
        rel, sep, fmt = item.partition("=")
        if not sep or fmt not in ("json", "toml", "text"):
            fail(f"--format {item!r}: expected NAME=json, NAME=toml or NAME=text")
        formats[rel] = fmt
    spec = ({"command": shlex.split(check), "timeout_s": check_timeout_s}
            if check is not None else None)
    try:
        manifest = write_config_bundle(out_dir, sources, name=name, version=version,
                                       formats=formats, check=spec, app=app, mount=mount,
                                       depends=_depends(depends))
    except BundleError as exc:
        fail(str(exc))
    total = sum(e.size for e in manifest.files.values())
    if json_out:
        print_json({"bundle": str(out_dir), "release": manifest.release_name,
                    "files": sorted(manifest.files), "bytes": total,
                    "formats": manifest.config.formats, "app": manifest.config.app})
    else:
        out.print(f"wrote {out_dir}: {manifest.release_name}, {len(manifest.files)} file(s), "
                  f"{total} bytes" + (f", read by app {app}" if app else ""))

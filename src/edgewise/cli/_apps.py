"""`edgewise app import` and `edgewise app build`: container images as app bundles (thin
wrappers over `edgewise.artifacts.import_app` / `build_app`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ._common import fail, out, print_json

app_app = typer.Typer(help="Container apps as releases: OCI images with a health check.",
                      no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(app_app, name="app")


Name = Annotated[str, typer.Option(help="the app's name (one container per name on a device)")]
Version = Annotated[str, typer.Option(help="the release version")]
Out = Annotated[Path, typer.Option("--out", help="the bundle directory to write (new)")]
HealthHttp = Annotated[str | None, typer.Option(
    "--health-http", help="health check: GET http://127.0.0.1:PORT/PATH must answer 200 "
    "(PORT or PORT/PATH; PATH defaults to /health)")]
HealthCmd = Annotated[str | None, typer.Option(
    "--health-cmd", help="health check: this command, run inside the container, exits 0")]
Timeout = Annotated[float, typer.Option(help="seconds one probe may take")]
Retries = Annotated[int, typer.Option(help="failed probes before the app is unhealthy")]
Interval = Annotated[float, typer.Option(help="seconds between probes")]
Restart = Annotated[str, typer.Option(help="restart policy: no, always, unless-stopped, "
                                      "on-failure[:N]")]
Env = Annotated[list[str] | None, typer.Option("--env", help="KEY=VALUE (repeatable)")]
Port = Annotated[list[int] | None, typer.Option("--port", help="a port the app listens on "
                                                "(repeatable; host network)")]
Depends = Annotated[list[str] | None, typer.Option(
    "--depends", help="NAME=RANGE: the device must run a release NAME in this version range "
    "(e.g. fashion='>=3,<4'; repeatable); checked at publish and on the device")]


def _depends(items: list[str] | None) -> dict[str, str]:
    depends = {}
    for item in items or []:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            fail(f"--depends {item!r}: expected NAME=RANGE, e.g. fashion='>=3'")
        depends[name.strip()] = spec.strip()
    return depends


def _app_section(image: str, health_http: str | None, health_cmd: str | None, timeout_s: float,
                 retries: int, interval_s: float, restart: str, env: list[str] | None,
                 ports: list[int] | None) -> dict[str, Any]:
    import shlex

    if (health_http is None) == (health_cmd is None):
        fail("give exactly one health check: --health-http PORT[/PATH] or --health-cmd CMD")
    health: dict[str, Any] = {"timeout_s": timeout_s, "retries": retries,
                              "interval_s": interval_s}
    if health_http is not None:
        port, _, path = health_http.partition("/")
        if not port.isdigit():
            fail(f"--health-http {health_http!r}: expected PORT or PORT/PATH")
        health["http"] = {"port": int(port), "path": "/" + path if path else "/health"}
    else:
        health["command"] = shlex.split(health_cmd or "")
    variables = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--env {item!r}: expected KEY=VALUE")
        variables[key] = value
    return {"image": image, "health": health, "restart": restart, "env": variables,
            "ports": list(ports or [])}


def _done(manifest, out_dir: Path, json_out: bool) -> None:
    image = sum(e.size for rel, e in manifest.files.items() if rel.startswith("blobs/"))
    if json_out:
        print_json({"bundle": str(out_dir), "release": manifest.release_name,
                    "digest": manifest.app.digest, "image_bytes": image,
                    "blobs": sum(1 for rel in manifest.files if rel.startswith("blobs/"))})
    else:
        out.print(f"wrote {out_dir}: {manifest.release_name}, image {manifest.app.digest[:19]} "
                  f"({image / 1e6:.2f} MB in {len(manifest.files) - 2} blobs)")


@app_app.command("import")
def import_(
    archive: Annotated[Path, typer.Argument(help="an OCI archive (podman save --format "
                                            "oci-archive) or a Docker archive (docker save)")],
    name: Name, version: Version, out_dir: Out,
    health_http: HealthHttp = None, health_cmd: HealthCmd = None,
    health_timeout_s: Timeout = 3.0, health_retries: Retries = 20,
    health_interval_s: Interval = 0.5, restart: Restart = "on-failure:3",
    env: Env = None, port: Port = None, depends: Depends = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Make an app bundle from an image archive; `edgewise publish` ships it."""
    from edgewise.artifacts import BundleError, import_app

    section = _app_section(archive.name, health_http, health_cmd, health_timeout_s,
                           health_retries, health_interval_s, restart, env, port)
    try:
        manifest = import_app(archive, out_dir, name=name, version=version, app=section,
                              depends=_depends(depends))
    except BundleError as exc:
        fail(str(exc))
    _done(manifest, out_dir, json_out)


@app_app.command("build")
def build(
    context: Annotated[Path, typer.Argument(help="build context with a Containerfile")],
    name: Name, version: Version, out_dir: Out,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="[default: "
                                              "CONTEXT/Containerfile or Dockerfile]")] = None,
    storage: Annotated[Path | None, typer.Option(help="podman store for the build [default: "
                                                 "your own]")] = None,
    health_http: HealthHttp = None, health_cmd: HealthCmd = None,
    health_timeout_s: Timeout = 3.0, health_retries: Retries = 20,
    health_interval_s: Interval = 0.5, restart: Restart = "on-failure:3",
    env: Env = None, port: Port = None, depends: Depends = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """podman build a Containerfile and make an app bundle of the image."""
    from edgewise.artifacts import BundleError, build_app

    section = _app_section(f"localhost/edgewise-build/{name}", health_http, health_cmd,
                           health_timeout_s, health_retries, health_interval_s, restart, env,
                           port)
    try:
        manifest = build_app(context, out_dir, name=name, version=version, app=section,
                             containerfile=file, storage=storage, depends=_depends(depends))
    except BundleError as exc:
        fail(str(exc))
    _done(manifest, out_dir, json_out)

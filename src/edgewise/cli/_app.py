from __future__ import annotations

from pathlib import Path

import typer

from ._agent import agent_app
from ._ops import (
    assign,
    audit_app,
    bundle_app,
    devices_app,
    events,
    keys_app,
    publish,
    releases_app,
    tokens_app,
)
from ._server import certs_app, server_app

app = typer.Typer(
    name="edgewise",
    help="Build image models on a CPU, ship them signed to edge devices, run them privately.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(keys_app, name="keys")
app.add_typer(server_app, name="server")
app.add_typer(certs_app, name="certs")
app.add_typer(agent_app, name="agent")
app.add_typer(devices_app, name="devices")
app.add_typer(releases_app, name="releases")
app.add_typer(bundle_app, name="bundle")
app.add_typer(tokens_app, name="tokens")
app.add_typer(audit_app, name="audit")
app.command()(publish)
# Commands owned by other modules register themselves (train/eval, delta, compress, ...).
for _module in ("_rollouts", "_ml", "_delta", "_compress", "_llm", "_sim", "_gen", "_apps",
                "_config", "_detect"):
    try:
        __import__(f"{__package__}.{_module}", fromlist=["register"]).register(app)
    except ModuleNotFoundError as _exc:
        if _exc.name != f"{__package__}.{_module}":
            raise
app.command()(assign)
app.command()(events)


@app.command()
def demo(
    workdir: str = typer.Option(None, help="keep everything here (default: a temp dir)"),
    devices: int = typer.Option(None, min=1, max=20, help="number of simulated devices "
                                "(default 3; --app runs one)"),
    bundle: Path = typer.Option(None, help="ship this bundle as v1 instead of training one: "
                                           "an `edgewise train --out DIR` result (DIR or "
                                           "DIR/bundle)"),
    llm: bool = typer.Option(False, "--llm", help="ship an LLM instead (SmolLM2-135M): v1, "
                             "a new chat template as a delta, a collapsed quant rolled back"),
    app_: bool = typer.Option(False, "--app", help="ship a container app that calls the model "
                              "next to it: an update of one layer, a broken version rolled "
                              "back, a model update while the app runs (needs podman)"),
    detect: bool = typer.Option(False, "--detect", help="ship an object detector instead: "
                                "trained on synthetic scenes, its int8 build, a mislabelled "
                                "v2 rolled back"),
    detect_budget: str = typer.Option("2m", help="--detect: training budget, e.g. 90s"),
) -> None:
    """Build a model, serve it, update 3 agents to v1, then watch them reject a broken v2."""
    from ._common import fail

    if app_:
        if llm or detect or bundle is not None or (devices or 1) != 1:
            fail("--app builds its own model and app and runs one device (its app listens "
                 "on a fixed loopback port); leave out --llm, --detect, --bundle and --devices")
        from ._demo_app import run_app_demo

        run_app_demo(workdir=workdir)
        return
    devices = devices or 3
    if detect:
        if llm or bundle is not None:
            fail("--detect trains its own detector; leave out --llm and --bundle")
        from ..ml.train import parse_duration
        from ._demo_detect import run_detect_demo

        try:
            budget_s = parse_duration(detect_budget)
        except ValueError as exc:
            fail(str(exc))
        run_detect_demo(workdir=workdir, n_devices=devices, budget_s=budget_s)
        return
    if llm:
        if bundle is not None:
            fail("--llm builds its own model; --bundle is for image classifiers")
        from ._demo_llm import run_llm_demo

        run_llm_demo(workdir=workdir, n_devices=devices)
        return
    from ._demo import run_demo

    run_demo(workdir=workdir, n_devices=devices, bundle=bundle)

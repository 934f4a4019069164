"""`edgewise agent ...`: everything that runs on the device."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from ._common import console, fail, print_json, setup_logging

agent_app = typer.Typer(help="The device agent.", no_args_is_help=True)

StateOpt = Annotated[Path, typer.Option("--state", help="the agent's state directory")]


@agent_app.command("enroll")
def enroll(
    state: StateOpt,
    server: Annotated[str, typer.Option(envvar="EDGEWISE_SERVER", help="update server URL")],
    token: Annotated[str, typer.Option(help="single-use enrollment token")],
    root: Annotated[Path, typer.Option(help="trusted root.json (provisioned, not downloaded)")],
    name: Annotated[str, typer.Option(help="device name")] = "device",
    hardware: Annotated[str, typer.Option(help="hardware id")] = "generic",
    tag: Annotated[list[str] | None, typer.Option("--tag", help="tag (repeat), e.g. site=berlin")]
    = None,
    timezone: Annotated[str, typer.Option(help="IANA zone for maintenance windows")] = "UTC",
    ca: Annotated[Path | None, typer.Option(help="CA certificate to pin for the server")]
    = None,
    insecure_dev: Annotated[bool, typer.Option("--insecure-dev",
                                               help="allow plain HTTP (development only)")]
    = False,
) -> None:
    """Enroll this device: generate its key pair, register the public key with the token, pin
    the root."""
    from ..agent import AgentError
    from ..agent import enroll as do_enroll
    from ..trust import TrustError

    try:
        identity = do_enroll(state, server_url=server, token=token, root_path=root, name=name,
                             hardware=hardware, tags=tag or [], timezone=timezone,
                             ca_path=ca, insecure_dev=insecure_dev)
    except (AgentError, TrustError) as exc:
        fail(str(exc))
    console.print(f"[green]enrolled[/] as {identity.device_id}")
    print_json({"device_id": identity.device_id})


@agent_app.command("run")
def run(
    state: StateOpt,
    once: Annotated[bool, typer.Option(help="check once, finish any update, exit")] = False,
    poll_interval_s: Annotated[float, typer.Option(help="seconds between checks")] = 30.0,
    api_port: Annotated[int, typer.Option(help="localhost inference API port")] = 8787,
    no_api: Annotated[bool, typer.Option("--no-api", help="do not serve the local API")]
    = False,
    mqtt_url: Annotated[str | None, typer.Option(envvar="EDGEWISE_MQTT_URL",
                                                 help="mqtts://HOST:PORT for push wake-ups")]
    = None,
    mqtt_ca: Annotated[Path | None, typer.Option(help="CA certificate to pin for MQTT")] = None,
    ram_limit_mb: Annotated[float | None, typer.Option(help="RAM a new model may use (LLM "
                                                       "health checks) [default: what the "
                                                       "kernel reports available]")] = None,
    log_json: Annotated[bool, typer.Option("--log-json", help="structured JSON logs")] = False,
    verbose: bool = False,
) -> None:
    """Run the update loop (and the localhost-only inference and chat API)."""
    from ..agent import Agent, AgentConfig, AgentError, FaultPoint, LocalApi

    setup_logging(verbose, json_lines=log_json)
    fault_spec = os.environ.get("EDGEWISE_FAULT")  # fault injection, for tests and the simulator
    try:
        fault = FaultPoint.parse(fault_spec) if fault_spec else None
        agent = Agent(AgentConfig(state_dir=state, poll_interval_s=poll_interval_s, fault=fault,
                                  ram_limit_mb=ram_limit_mb))
    except (AgentError, ValueError) as exc:
        fail(str(exc))
    try:
        if once:
            final = agent.run_cycle()
            print_json({"state": final.value, "release": agent.record.installed.label
                        if agent.record.installed else None,
                        "components": {name: {"state": sub.state.value, "release":
                                              sub.installed.label if sub.installed else None}
                                       for name, sub in sorted(agent.record.components.items())}})
            return
        api = None
        if not no_api:
            api = LocalApi(state, port=api_port)
            api.start()
            console.print(f"local API on http://127.0.0.1:{api.port}")
        stop, wake = threading.Event(), threading.Event()

        def _stop(*_: object) -> None:
            stop.set()
            wake.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        wakeup = None
        if mqtt_url:
            from ..agent._wakeup import MqttWakeup, WakeupConfig

            wakeup = MqttWakeup(WakeupConfig(url=mqtt_url, ca_path=mqtt_ca),
                                device_id=agent.identity.device_id, wake=wake)
            wakeup.start()
        agent.run_forever(stop, wake)
        if wakeup:
            wakeup.stop()
        if api:
            api.stop()
    except AgentError as exc:
        fail(str(exc))
    finally:
        agent.close()


@agent_app.command("status")
def status(state: StateOpt) -> None:
    """What this device runs, what it is doing, and its recent history."""
    from ..agent import AgentError, agent_status

    try:
        print_json(agent_status(state))
    except AgentError as exc:
        fail(str(exc))


@agent_app.command("predict")
def predict(
    images: Annotated[list[Path], typer.Argument(help="image files (PNG, JPEG, ...)")],
    state: StateOpt,
    top_k: int = 3,
    draw: Annotated[Path | None, typer.Option(
        help="object detector: write each image with its boxes drawn to DIR/NAME.boxes.png")]
    = None,
) -> None:
    """Classify images (or find objects in them) with the active model, on this device
    (nothing is sent anywhere)."""
    from ..agent import AgentError, DetectionPrediction, LocalModel, draw_detections

    model = LocalModel(state)
    failed = False
    for path in images:
        try:
            data = path.read_bytes()
            prediction, meta = model.predict(data, top_k=top_k)
        except AgentError as exc:
            fail(str(exc))
        except (OSError, ValueError) as exc:
            console.print(f"[red]{path}: {exc}[/]")
            failed = True
            continue
        drawn = {}
        if draw is not None and not isinstance(prediction, DetectionPrediction):
            fail("--draw draws an object detector's boxes; the active model does not find "
                 "objects")
        if draw is not None and isinstance(prediction, DetectionPrediction):
            draw.mkdir(parents=True, exist_ok=True)
            target = draw / f"{path.stem}.boxes.png"
            target.write_bytes(draw_detections(data, prediction))
            drawn = {"drawn": str(target)}
        print_json({"image": str(path), **prediction.to_json(), **drawn,
                    "release": f"{meta.get('name')}@{meta.get('version')}"})
    if failed:
        raise typer.Exit(1)


@agent_app.command("chat")
def chat(
    state: StateOpt,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="ask once and exit "
                                               "[default: an interactive session]")] = None,
    system: Annotated[str | None, typer.Option(help="a system message")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="[default: the release's]")] = None,
    temperature: Annotated[float | None, typer.Option(help="[default: the release's]")]
    = None,
) -> None:
    """Chat with the device's LLM release, on this device (nothing is sent anywhere)."""
    import sys

    from ..agent import AgentError, LocalModel
    from ..agent._chat import ChatError, chat_stream

    model = LocalModel(state)
    messages = [{"role": "system", "content": system}] if system else []

    def ask(text: str) -> None:
        messages.append({"role": "user", "content": text})
        request = {"messages": messages, "max_tokens": max_tokens,
                   "temperature": temperature}
        parts = []
        try:
            for chunk in chat_stream(model, {k: v for k, v in request.items() if v is not None}):
                piece = chunk["choices"][0]["delta"].get("content") or ""
                parts.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except (AgentError, ChatError) as exc:
            fail(str(exc))
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(parts)})

    if prompt is not None:
        ask(prompt)
        return
    console.print("chatting with the device's model; an empty line or Ctrl-D ends")
    while True:
        try:
            text = input("> ")
        except EOFError:
            break
        if not text.strip():
            break
        ask(text)


@agent_app.command("defer")
def defer(state: StateOpt,
          seconds: Annotated[int, typer.Option("--for-s", help="postpone by this long")] = 3600,
          ) -> None:
    """Postpone the pending update (within the policy's limit)."""
    from ..agent import AgentError, StateDir, defer_update

    try:
        print_json(defer_update(StateDir(state), seconds=seconds))
    except AgentError as exc:
        fail(str(exc))


@agent_app.command("feedback")
def feedback(
    state: StateOpt,
    rating: Annotated[int | None, typer.Option(min=1, max=5, help="1 (bad) .. 5 (good)")] = None,
    comment: Annotated[str, typer.Option(help="free text")] = "",
    wrong: Annotated[str | None, typer.Option(help="flag a wrong prediction: what it said")]
    = None,
    correct: Annotated[str | None, typer.Option(help="...and what it should have said")] = None,
) -> None:
    """Rate the running release, comment, or flag a wrong prediction (no image is sent)."""
    from ..agent import AgentError, StateDir, submit_feedback

    try:
        print_json(submit_feedback(StateDir(state), rating=rating, comment=comment,
                                   predicted=wrong, correct=correct))
    except (AgentError, ValueError) as exc:
        fail(str(exc))


@agent_app.command("tuf-client", context_settings={"allow_extra_args": True,
                                                   "ignore_unknown_options": True})
def tuf_client(ctx: typer.Context) -> None:
    """The agent's TUF client behind the tuf-conformance client protocol (init, refresh,
    download with --metadata-dir/--metadata-url/--target-name/--target-base-url/--target-dir)."""
    from ..agent._tuf_client import main

    raise typer.Exit(main(list(ctx.args)))


@agent_app.command("generate")
def generate(
    state: StateOpt,
    class_name: Annotated[str | None, typer.Option("--class", help="class to generate "
                                                   "(class-conditional bundles)")] = None,
    n: Annotated[int, typer.Option("-n", min=1, max=1024, help="number of images")] = 16,
    out: Annotated[Path, typer.Option("--out", help="PNG grid to write")] = Path("grid.png"),
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
) -> None:
    """Sample images from the active generator bundle on this CPU and write a PNG grid."""
    from ..agent import AgentError, LocalModel, generate_images, image_grid_png

    try:
        model = LocalModel(state).model()
        images, ms = generate_images(model.dir, model.manifest, label=class_name, n=n,
                                     seed=seed)
        image_grid_png(images, out)
    except AgentError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write {out}: {exc}")
    console.print(f"{n} image(s) in {ms:.1f} ms ({ms / n:.2f} ms/image, 1 thread) -> {out}")
    print_json({"out": str(out), "n": n, "class": class_name, "latency_ms": round(ms, 2),
                "ms_per_image": round(ms / n, 3), "release": model.manifest.release_name})


@agent_app.command("denoise")
def denoise(
    images: Annotated[list[Path], typer.Argument(help="noisy image file(s)")],
    state: StateOpt,
    sigma: Annotated[float, typer.Option(help="noise standard deviation, pixels in [0, 1]")]
    = 0.2,
    out_dir: Annotated[Path, typer.Option("--out", help="folder for the denoised PNGs")]
    = Path("denoised"),
) -> None:
    """Denoise images on this CPU with the active bundle's denoiser (a DDPM bundle); the
    images never leave the device."""
    import numpy as np
    from PIL import Image

    from ..agent import AgentError, LocalModel, denoise_images

    dests = [out_dir / (path.stem + ".png") for path in images]
    if len(set(dests)) < len(dests):
        fail("two inputs share a file name stem; their outputs would overwrite each other")
    if existing := [str(d) for d in dests if d.exists()]:
        fail(f"{', '.join(existing)} already exist(s); nothing written")
    try:
        model = LocalModel(state).model()
        h, w = model.manifest.preprocessing.input_size
        pixels = []
        for path in images:
            try:
                with Image.open(path) as img:
                    if img.size != (w, h):  # resizing would change the noise it carries
                        fail(f"{path}: {img.size[0]}x{img.size[1]} pixels, the denoiser takes "
                             f"{w}x{h}; nothing written")
                    pixels.append(np.asarray(img.convert("L"), np.float32) / 255)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                fail(f"{path}: not a readable image ({exc}); nothing written")
        clean, ms = denoise_images(model.dir, model.manifest, np.stack(pixels), sigma=sigma)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for dest, img in zip(dests, clean, strict=True):
            Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), "L").save(dest)
            written.append(str(dest))
    except AgentError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write to {out_dir}: {exc}")
    console.print(f"{len(written)} image(s) denoised in {ms:.1f} ms -> {out_dir}")
    print_json({"out": written, "sigma": sigma, "latency_ms": round(ms, 2),
                "release": model.manifest.release_name})


@agent_app.command("learn-normal")
def learn_normal(
    images: Annotated[Path, typer.Argument(help="folder of this device's normal images")],
    state: StateOpt,
    target_fpr: Annotated[float, typer.Option(help="share of normal images to flag")] = 0.05,
    time_budget: Annotated[float, typer.Option("--time-budget-s", help="stop scoring after "
                                               "this many seconds")] = 60.0,
) -> None:
    """Fit the active detector's threshold to this device's own images (kept across updates
    of the same release; images and scores never leave the device)."""
    from ..agent import AgentError, LocalModel
    from ..agent import learn_normal as do_learn

    try:
        model = LocalModel(state).model()
        print_json(do_learn(state, model, images, target_fpr=target_fpr,
                            time_budget_s=time_budget))
    except AgentError as exc:
        fail(str(exc))

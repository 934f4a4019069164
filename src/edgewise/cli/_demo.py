"""`edgewise demo`: the whole loop, build -> ship -> run, on embedded defaults.

Reads top to bottom: build a real model bundle (v1) and a broken one (v2), make keys, start
a real server, enroll and start real agents, ship v1 (all commit), ship v2 (all roll back by
themselves), classify an image on a device, print a summary table and the JSON summary.
"""

from __future__ import annotations

import io
import secrets
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.live import Live
from rich.table import Table

from ._common import console, fail, out, print_json, stage_progress

NAME = "fashion-mnist"
WAIT_S = 240.0


@contextmanager
def demo_fleet(work: Path, n_devices: int, *, api_ports: list[int] | None = None
               ) -> Iterator[tuple[Any, Any, list[Path]]]:
    """Keys (root/targets stay here, the online key goes to the server), a real server over
    TLS (private CA) and `n_devices` enrolled, running agents (with their loopback API on
    `api_ports[i]` when given, else none); yields (operator client, keys, device state
    directories) and stops everything after."""
    from ..agent import enroll
    from ..server.client import OperatorClient
    from ..sim import AgentProcess, ServerProcess
    from ..trust import init_certs, init_keys

    keys = init_keys(work / "keys")
    certs = init_certs(work / "certs", hostnames=["127.0.0.1", "localhost"])
    admin_token = secrets.token_urlsafe(24)
    server = ServerProcess(data_dir=work / "server", root_path=keys.root_json,
                           online_key_path=keys.online_key, admin_token=admin_token,
                           tls_cert=certs.server_cert, tls_key=certs.server_key,
                           ca_path=certs.ca_cert, log_path=work / "server.log").start()
    agents: list[AgentProcess] = []
    try:
        client = OperatorClient(server.url, token=admin_token, verify=str(certs.ca_cert))
        console.print(f"[green]server[/] on {server.url} over TLS (private CA; OpenAPI at "
                      f"{server.url}/docs)")
        states = []
        for i in range(n_devices):
            state = work / f"device-{i + 1}"
            enroll(state, server_url=server.url, token=client.create_enrollment_token(),
                   root_path=keys.root_json, name=f"device-{i + 1}", hardware="demo-x86_64",
                   ca_path=certs.ca_cert)
            states.append(state)
            agents.append(AgentProcess(state_dir=state, poll_interval_s=1.0,
                                       api_port=api_ports[i] if api_ports else None,
                                       log_path=work / f"device-{i + 1}.log").start())
        console.print(f"[green]enrolled[/] {n_devices} device{'s' if n_devices > 1 else ''}, "
                      f"agent{'s' if n_devices > 1 else ''} running")
        with client:
            yield client, keys, states
    finally:
        for agent in agents:
            agent.stop()
        server.stop()


def run_demo(*, workdir: str | None, n_devices: int, bundle: Path | None = None) -> None:
    from ..server.client import publish_bundle

    work = demo_workdir(workdir)
    started = time.monotonic()

    # ---- 1. build: a real model (or the user's bundle), and a bad release of it ----------
    if bundle is not None:
        manifest, v1_dir = _adopt(bundle, work)
        console.print(f"[green]shipping[/] {manifest.release_name} from {bundle}: test accuracy "
                      f"{manifest.metrics.get('test_accuracy', float('nan')):.3f}")
    else:
        v1_dir = work / f"{NAME}-1.0.0"
        manifest = _build(v1_dir)
        console.print(f"[green]built[/] {manifest.release_name}: test accuracy "
                      f"{manifest.metrics.get('test_accuracy', float('nan')):.3f}")
    name, v1_version, v2_version = manifest.name, manifest.version, _next_major(manifest.version)
    v1_name, v2_name = f"{name}@{v1_version}", f"{name}@{v2_version}"
    v2_dir = work / f"{name}-{v2_version}"
    _make_broken_release(v1_dir, v2_dir, version=v2_version)
    console.print(f"[yellow]built[/] {v2_name}: the same model with a broken export "
                  "(class weights scrambled), which its golden set must catch")

    # ---- 2-3. keys, a real server over TLS, real agents ---------------------------------
    with demo_fleet(work, n_devices) as (client, keys, states):
        # ---- 4. ship v1: every device installs it ----------------------------------------
        v1 = publish_bundle(client, v1_dir, root_path=keys.root_json,
                            targets_key_path=keys.targets_key)
        client.assign(v1["id"])
        console.print(f"[green]published[/] {v1_name} as {v1['id']} (signed here, "
                      "verified on each device) and assigned it to all devices")
        _wait(client, lambda d: d["state"] == "committed" and d["release_id"] == v1["id"],
              "installing v1")

        # ---- 5. private inference on a device --------------------------------------------
        _predict_on_device(states[0], work)

        # ---- 6. ship the broken v2: every device rolls back by itself -----------------------
        v2 = publish_bundle(client, v2_dir, root_path=keys.root_json,
                            targets_key_path=keys.targets_key)
        client.assign(v2["id"])
        console.print(f"[yellow]published[/] {v2_name} as {v2['id']} and assigned it")
        _wait(client, lambda d: d["state"] == "rolled-back" and d["release_id"] == v1["id"],
              "v2 health checks")

        # ---- 7. summary ----------------------------------------------------------------------
        summary = _summary(client, {v1["id"]: v1_version, v2["id"]: v2_version})

    v2_downloads = [h["download"] for d in summary for h in d["history"]
                    if h["release"] == v2_name and h.get("download")]
    ok_v1 = sum(1 for d in summary if d["release"] == v1_name)
    ok_v2 = sum(1 for d in summary if d["state"] == "rolled-back")
    _print_table(summary)
    if v2_downloads:
        sent = sum(d["sent_bytes"] for d in v2_downloads)
        full = sum(d["full_bytes"] for d in v2_downloads)
        console.print(f"v2 reached {len(v2_downloads)} devices as delta updates: "
                      f"{sent / 1e6:.2f} MB sent instead of {full / 1e6:.2f} MB "
                      f"({sent / max(full, 1):.1%})")
    console.print(f"v1 installed on {ok_v1}/{n_devices} devices; broken v2 rolled back on "
                  f"{ok_v2}/{n_devices}; {time.monotonic() - started:.0f} s in all")
    print_json({"devices": summary})
    if ok_v1 != n_devices or ok_v2 != n_devices:
        raise typer.Exit(1)


def demo_workdir(workdir: str | None) -> Path:
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="edgewise-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    console.rule("[bold]Edgewise demo")
    console.print(f"working directory: {work}")
    return work


def _build(out_dir: Path):
    """Train v1 with `edgewise train`'s pipeline: a feature-extract run (frozen
    EfficientNet-Lite0, 64 px, 800 images per class), then ship its bundle as `out_dir`."""
    import shutil

    from ..ml.train import TrainConfig, train

    work = out_dir.parent / f"{out_dir.name}.run"  # checkpoints, config: not part of the bundle
    config = TrainConfig(data="fashion-mnist", out_dir=str(work), name=NAME, version="1.0.0",
                         strategy="feature-extract", resolution=64, train_per_class=800,
                         test_per_class=300,
                         val_fraction=0.2, track=False)
    with stage_progress() as (report, out_console):
        result = train(config, progress=report, notify=out_console.print)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(result.bundle_dir, out_dir)
    return result.manifest


def _adopt(bundle: Path, work: Path):
    """The user's bundle (`edgewise train --out DIR`: DIR or DIR/bundle), checked, copied
    into the working directory as v1; returns its manifest and the copy."""
    import shutil

    from ..artifacts import ArtifactError, validate_bundle

    src = bundle / "bundle" if (bundle / "bundle" / "edgewise.json").is_file() else bundle
    try:
        manifest = validate_bundle(src)
    except ArtifactError as exc:
        fail(f"--bundle {bundle}: not a bundle Edgewise can ship ({exc})")
    if manifest.kind != "image-classifier" or manifest.detector is not None:
        what = "an image classifier with an anomaly detector" if manifest.detector \
            else f"a {manifest.kind}"
        fail(f"--bundle {bundle}: the demo ships image classifiers (`edgewise train`); this "
             f"bundle is {what}")
    dest = work / f"{manifest.name}-{manifest.version}"
    a, b = src.resolve(), dest.resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        fail(f"--bundle {bundle}: the demo copies it to {dest}, which overlaps it; pass "
             "another --workdir")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    return manifest, dest


def _next_major(version: str) -> str:
    """The broken release's version: the major one after v1's (1.0.0 -> 2.0.0); a version
    that does not start with a number gets "-broken" appended."""
    head = version.partition(".")[0]
    return f"{int(head) + 1}.0.0" if head.isdigit() else f"{version}-broken"


def _make_broken_release(good: Path, out_dir: Path, *, version: str) -> None:
    """A bad release like a real botched export: the classifier's class rows are permuted,
    while the golden set still holds what the correct model answers."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from ..artifacts import load_golden, read_manifest, write_bundle

    manifest = read_manifest(good)
    model = onnx.load(str(good / manifest.model))
    n_classes = len(manifest.labels)
    inits = {t.name: t for t in model.graph.initializer}
    # The head: the last initializer whose leading or trailing dimension is the class count.
    head = [t for t in model.graph.initializer
            if n_classes in tuple(t.dims)[:1] + tuple(t.dims)[-1:]]
    if not head:
        raise RuntimeError("cannot find the classifier head in the ONNX graph")
    for tensor in head[-2:]:  # weight and bias
        array = numpy_helper.to_array(tensor)
        axis = 0 if array.shape[0] == n_classes else array.ndim - 1
        scrambled = np.roll(array, 1, axis=axis)
        inits[tensor.name].CopyFrom(numpy_helper.from_array(scrambled, tensor.name))
    golden = load_golden(good, manifest)
    extra = {rel: good / rel for rel in manifest.files
             if rel not in (manifest.model, manifest.golden.file)}
    write_bundle(out_dir, name=manifest.name, version=version, labels=manifest.labels,
                 preprocessing=manifest.preprocessing, model=model.SerializeToString(),
                 golden_inputs=golden.inputs, golden_outputs=golden.outputs,
                 atol=manifest.golden.atol, max_latency_ms=manifest.golden.max_latency_ms,
                 extra_files=extra, metrics=manifest.metrics,
                 provenance={**manifest.provenance,
                             "deliberately_broken": True,
                             "note": "deliberately broken export for the rollback demo"})


def _wait(client, done, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    with Live(console=console, refresh_per_second=4, transient=True) as live:
        while True:
            devices = client.devices()
            table = Table(title=f"waiting for {what}", show_header=True)
            for col in ("device", "state", "release"):
                table.add_column(col)
            for d in devices:
                table.add_row(d["name"], d["state"], d["release_id"] or "-")
            live.update(table)
            if devices and all(done(d) for d in devices):
                break
            if time.monotonic() > deadline:
                console.print(f"[red]timed out after {WAIT_S:.0f}s waiting for {what}[/]")
                break
            time.sleep(0.5)
    console.print(f"[green]done[/]: {what}")


def _predict_on_device(state: Path, work: Path) -> None:
    import json
    import subprocess

    import numpy as np
    from PIL import Image

    from ..ml.data import FASHION_MNIST_LABELS, FASHION_MNIST_ROOT, load_idx_dataset
    from ..sim import edgewise_command

    images, labels = load_idx_dataset(FASHION_MNIST_ROOT, "test")
    path = work / "sample.png"
    buf = io.BytesIO()
    Image.fromarray(np.asarray(images[0], np.uint8)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    result = subprocess.run(edgewise_command("agent", "predict", str(path), "--state", str(state)),
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        console.print(f"[red]local inference failed:[/] {result.stderr.strip()}")
        return
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    console.print(f"[green]local inference[/] on {state.name}: {path.name} -> "
                  f"{answer['label']} ({answer['score']:.2f}); truth: "
                  f"{FASHION_MNIST_LABELS[int(labels[0])]}; the image never left the device")


def _summary(client, versions: dict[str, str]) -> list[dict[str, Any]]:
    releases = {r["id"]: f"{r['name']}@{r['version']}" for r in client.releases()}
    summary = []
    for d in client.devices():
        history: list[dict[str, Any]] = []
        for e in client.events(device_id=d["id"]):
            if not e["state"] or e["release_id"] not in versions:
                continue
            if not history or history[-1]["release"] != releases[e["release_id"]] \
                    or history[-1]["outcome"] in ("committed", "rolled-back", "failed"):
                history.append({"release": releases[e["release_id"]], "states": [],
                                "outcome": None, "reason": ""})
            entry = history[-1]
            entry["states"].append(e["state"])
            if e["kind"] == "downloaded" and e["detail"].get("download"):
                stats = e["detail"]["download"]
                entry["download"] = {"sent_bytes": stats["sent_bytes"],
                                     "full_bytes": stats["full_bytes"],
                                     "delta_files": stats["delta_files"]}
            if e["state"] in ("committed", "rolled-back", "failed"):
                entry["outcome"] = e["state"]
            if e["kind"] == "unhealthy" and e["message"]:
                entry["reason"] = e["message"]
        summary.append({"id": d["id"], "name": d["name"],
                        "release": releases.get(d["release_id"]) if d["release_id"] else None,
                        "state": d["state"], "history": history})
    return summary


def _print_table(summary: list[dict[str, Any]]) -> None:
    table = Table(title="Edgewise demo: the fleet after two releases")
    for col in ("device", "release", "state", "what happened"):
        table.add_column(col)
    for d in summary:
        lines = []
        for h in d["history"]:
            line = f"{h['release'].split('@')[1]}: {h['outcome'] or 'in progress'}"
            if h["reason"]:
                line += " - " + h["reason"].removeprefix("health check failed: ").split(";")[0]
            lines.append(line)
        table.add_row(d["name"], d["release"] or "-", d["state"], "\n".join(lines))
    out.print(table)

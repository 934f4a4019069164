"""`edgewise demo --app`: a container app that calls the model, updated on its own.

Reads top to bottom: train a small Fashion-MNIST CNN (v1, and a better-trained 1.1.0 for the
model update), compile a static C app (FROM scratch: no registry, no base image) that sends a
picture to the device's model through the agent's loopback API and answers what it said,
build app v1, v2 (only its app.conf layer changes) and a broken v3 (it calls an API path the
agent does not serve), start a real server and one agent, ship the model and app v1, app v2
(the device downloads only the changed layer), app v3 (its health check, which makes the
model call, fails: the device rolls back to v2 by itself), then the model update while the
app keeps answering; print a summary table and, as the very last line, the facts as JSON.

One device: its app listens on a fixed loopback port and calls a fixed agent port, both in
the app's manifest, so two devices on one machine would collide.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.table import Table

from ._common import console, fail, out, print_json
from ._demo import WAIT_S, _wait, demo_fleet, demo_workdir

MODEL = "fashion-mnist"
APP = "camera"
HEALTH = {"timeout_s": 2, "interval_s": 0.2, "retries": 15}

APP_C = r"""
/* The demo's camera app: GET / or /health sends /sample.png to the device's model (the
   agent's loopback API, 127.0.0.1:$MODEL_PORT, path from /app.conf) and answers 200 with
   what the model said, or 503 when the model call failed. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
static char version[128] = "unknown", path[128] = "/predict";
static char image[65536], answer[16384];
static long image_len;
static int tcp(int port) {
  int s = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(s, (struct sockaddr *)&a, sizeof a)) { close(s); return -1; }
  return s;
}
static int ask_model(int port, const char **body) { /* HTTP status, 0: no answer */
  int s = tcp(port), n = 0, got;
  *body = "";
  if (s < 0) return 0;
  char head[256];
  int len = snprintf(head, sizeof head, "POST %s HTTP/1.0\r\nContent-Type: image/png\r\n"
                     "Content-Length: %ld\r\n\r\n", path, image_len);
  if (write(s, head, len) != len || write(s, image, image_len) != image_len) { close(s); return 0; }
  while (n < (int)sizeof answer - 1 && (got = read(s, answer + n, sizeof answer - 1 - n)) > 0)
    n += got;
  close(s);
  answer[n] = 0;
  char *end = strstr(answer, "\r\n\r\n");
  if (n < 12 || !end) return 0;
  *body = end + 4;
  return atoi(answer + 9);
}
static void line(FILE *f, char *buf, int size) {
  if (fgets(buf, size, f)) buf[strcspn(buf, "\n")] = 0;
}
int main(void) {
  FILE *f = fopen("/app.conf", "r");
  if (f) { line(f, version, sizeof version); line(f, path, sizeof path); fclose(f); }
  f = fopen("/sample.png", "rb");
  if (!f) { perror("/sample.png"); return 1; }
  image_len = fread(image, 1, sizeof image, f);
  fclose(f);
  int port = getenv("PORT") ? atoi(getenv("PORT")) : 8080;
  int model_port = getenv("MODEL_PORT") ? atoi(getenv("MODEL_PORT")) : 8787, one = 1;
  signal(SIGPIPE, SIG_IGN);
  int s = socket(AF_INET, SOCK_STREAM, 0);
  setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 16)) { perror("bind"); return 1; }
  for (;;) {
    int c = accept(s, 0, 0);
    if (c < 0) continue;
    char req[1024];
    ssize_t n = read(c, req, sizeof req - 1);
    req[n > 0 ? n : 0] = 0;
    const char *body;
    int status = ask_model(model_port, &body), code = status == 200 ? 200 : 503;
    static char out[20000];
    char json[17000];
    int len = snprintf(json, sizeof json,
                       "{\"app\": \"%s\", \"model_status\": %d, \"model\": %s}\n",
                       version, status, body[0] == '{' ? body : "null");
    len = snprintf(out, sizeof out, "HTTP/1.0 %d %s\r\nContent-Type: application/json\r\n"
                   "Content-Length: %d\r\nConnection: close\r\n\r\n%s", code,
                   code == 200 ? "OK" : "Service Unavailable", len, json);
    if (write(c, out, len) < 0) perror("write");
    close(c);
  }
}
"""

# Each version's app layer: /app.conf, its version and the API path it sends pictures to.
APP_VERSIONS = {"1.0.0": "/predict", "2.0.0": "/predict", "3.0.0": "/v2/predict"}


def run_app_demo(*, workdir: str | None) -> None:
    from ..artifacts import ArtifactError, BundleError, build_app
    from ..server.client import publish_bundle
    from ..sim import free_port

    missing = [t for t in ("podman", "skopeo", "gcc") if shutil.which(t) is None]
    if missing:
        fail(f"--app builds and runs a container: install {', '.join(missing)} "
             "(apt-get install podman runc skopeo gcc; `make system-deps` does)")
    work = demo_workdir(workdir)
    started = time.monotonic()

    # ---- 1. build: two models, the app binary, three app versions ------------------------
    # 1.1.0 is the same CNN trained on more images for longer (~0.73 -> ~0.77 accuracy).
    models = {"1.0.0": _train(work, "1.0.0", per_class=300, epochs=3),
              "1.1.0": _train(work, "1.1.0", per_class=1000, epochs=4)}
    for version, manifest in models.items():
        console.print(f"[green]built[/] {MODEL}@{version} (a small CNN): test accuracy "
                      f"{manifest.metrics['test_accuracy']:.3f}")
    app_port, api_port = free_port(), free_port()
    binary = _compile(work / "app-src")
    sample, truth = _sample_png()
    app_section = {"image": f"localhost/{APP}", "env": {"PORT": str(app_port),
                                                         "MODEL_PORT": str(api_port)},
                   "ports": [app_port], "restart": "on-failure:3",
                   "health": {"http": {"port": app_port, "path": "/health"}, **HEALTH}}
    apps: dict[str, Path] = {}
    try:
        for version, api_path in APP_VERSIONS.items():
            ctx = _context(work / f"app-ctx-{version}", binary, sample, version, api_path)
            apps[version] = work / f"{APP}-{version}"
            if apps[version].exists():
                shutil.rmtree(apps[version])
            build_app(ctx, apps[version], name=APP, version=version, app=app_section,
                      storage=work / "build-store", depends={MODEL: ">=1,<2"})
    except (BundleError, ArtifactError) as exc:
        fail(f"cannot build the demo app: {exc}")
    finally:
        _reset_store(work / "build-store")  # the bundles are what ships
    image_bytes = sum(f.stat().st_size for f in (apps["1.0.0"] / "blobs").rglob("*")
                      if f.is_file())
    console.print(f"[green]built[/] {APP}@1.0.0, 2.0.0, 3.0.0: FROM scratch, a static C app "
                  f"({binary.stat().st_size / 1e3:.0f} kB) + a picture + app.conf; "
                  f"{image_bytes / 1e3:.0f} kB image; 3.0.0 calls {APP_VERSIONS['3.0.0']}, a path "
                  "the agent does not serve (a bug)")

    facts: dict[str, Any] = {"truth": truth}
    try:
        with demo_fleet(work, 1, api_ports=[api_port]) as (client, keys, states):
            state = states[0]
            device = client.devices()[0]
            names: dict[str, str] = {}

            def publish(bundle: Path) -> str:
                release = publish_bundle(client, bundle, root_path=keys.root_json,
                                         targets_key_path=keys.targets_key)
                client.assign(release["id"])
                names[release["id"]] = f"{release['name']}@{release['version']}"
                console.print(f"[green]published[/] {names[release['id']]} as {release['id']} "
                              "and assigned it")
                return release["id"]

            # ---- 2. the model, then app v1 next to it ---------------------------------------
            model_v1 = publish(work / f"{MODEL}-1.0.0")
            _wait(client, lambda d: d["state"] == "committed" and d["release_id"] == model_v1,
                  f"{MODEL}@1.0.0")
            app_v1 = publish(apps["1.0.0"])
            _wait_app(client, device["id"], app_v1, "committed", f"{APP}@1.0.0")
            first = _ask(app_port)
            if first["model_status"] != 200:
                fail(f"{APP}@1.0.0 is committed but its model call failed: {first}")
            console.print(f"[green]the app[/] on {device['name']} asked the model about its "
                          f"picture: {first['model']['label']} ({first['model']['score']:.2f}; "
                          f"truth: {truth}); the picture never left the device")

            # ---- 3. app v2: only the app layer travels ----------------------------------------
            app_v2 = publish(apps["2.0.0"])
            _wait_app(client, device["id"], app_v2, "committed", f"{APP}@2.0.0")
            v1_download = _event(client, device["id"], app_v1, "downloaded")["detail"]["download"]
            v2_download = _event(client, device["id"], app_v2, "downloaded")["detail"]["download"]
            sent, full = v2_download["sent_bytes"], v2_download["full_bytes"]
            console.print(f"{APP}@2.0.0 reached the device as {sent:,} bytes of {full:,} "
                          f"({sent / max(full, 1):.2%}): the new app.conf layer, config and "
                          "manifest; the binary's layer was copied from the slot of 1.0.0")

            # ---- 4. app v3 is broken: the device rolls back to v2 by itself -------------------
            t0 = time.monotonic()
            app_v3 = publish(apps["3.0.0"])
            _wait_app(client, device["id"], app_v2, "rolled-back", f"{APP}@3.0.0's health check")
            rollback_s = time.monotonic() - t0
            reason = _event(client, device["id"], app_v3, "unhealthy")["message"]
            # The health check's reason ends with what the app answered: its model call's status.
            said = re.search(r'"model_status": (\d+)', reason)
            after_rollback = _ask(app_port)
            console.print(f"[yellow]{APP}@3.0.0 rolled back[/] ({reason}); "
                          f"{APP}@{after_rollback['app']} answers again")

            # ---- 5. a model update while the app keeps running -------------------------------
            container = _container_id(state)
            with _Poll(app_port) as poll:
                model_next = publish(work / f"{MODEL}-1.1.0")
                _wait(client, lambda d: d["state"] == "committed" and d["release_id"] == model_next,
                      f"{MODEL}@1.1.0")
                time.sleep(1.0)  # a few answers from the new model
            restarted = _container_id(state) != container
            final = _ask(app_port)
            served_by = [names.get(a["model"]["release"].get("release_id"), "?")
                         for a in poll.answers if a.get("model")]
            seen = list(dict.fromkeys(served_by))
            console.print(f"[green]{MODEL}@1.1.0 committed[/] while the app answered "
                          f"{len(poll.answers)} requests ({len(poll.errors)} errors; models that "
                          f"answered: {', '.join(seen)}); the app's container was "
                          f"{'restarted' if restarted else 'not restarted'}")

            rows = {r["component"]: r for r in client.device_components(device["id"])}
            device = next(d for d in client.devices() if d["id"] == device["id"])
            facts.update({
                "device": device["name"],
                "model": {"release": names.get(device["release_id"]), "state": device["state"]},
                "app": {"release": names.get(rows[APP]["release_id"]), "state": rows[APP]["state"],
                        "healthy": final["model_status"] == 200, "answer": final},
                "first_answer": first,
                "app_v1_download": _bytes(v1_download),
                "app_update": {**_bytes(v2_download), "ratio": sent / max(full, 1)},
                "rollback": {"release": f"{APP}@3.0.0", "reason": reason,
                             "model_status": int(said.group(1)) if said else None,
                             "back_on": f"{APP}@{after_rollback['app']}",
                             "healthy_after": after_rollback["model_status"] == 200,
                             "seconds": round(rollback_s, 1)},
                "model_update": {"release": f"{MODEL}@1.1.0", "app_answers": len(poll.answers),
                                 "app_errors": len(poll.errors), "models_seen": seen,
                                 "container_restarted": restarted},
            })
    finally:  # the device goes away, and so does its app
        _reset_store(work / "device-1" / "containers")
    facts["seconds"] = round(time.monotonic() - started, 1)
    _print_table(facts)
    print_json(facts)
    ok = (facts["app"]["release"] == f"{APP}@2.0.0" and facts["app"]["healthy"]
          and facts["app"]["state"] == "rolled-back" and facts["model"]["state"] == "committed"
          and facts["model"]["release"] == f"{MODEL}@1.1.0" and not restarted)
    if not ok:
        raise typer.Exit(1)


def _train(work: Path, version: str, *, per_class: int, epochs: int):
    """`edgewise train`'s pipeline, from scratch on a small CNN: seconds, not minutes."""
    from ..ml.train import TrainConfig, train

    out_dir = work / f"{MODEL}-{version}"
    run = work / f"{MODEL}-{version}.run"
    config = TrainConfig(data="fashion-mnist", out_dir=str(run), name=MODEL, version=version,
                         strategy="from-scratch", backbone="small-cnn", epochs=epochs,
                         train_per_class=per_class, test_per_class=100, track=False)
    with console.status(f"training {MODEL}@{version} ..."):
        result = train(config)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(result.bundle_dir, out_dir)
    return result.manifest


def _compile(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "app.c").write_text(APP_C)
    binary = directory / "app"
    proc = subprocess.run(["gcc", "-static", "-Os", "-s", "-o", str(binary),
                           str(directory / "app.c")], capture_output=True, text=True)
    if proc.returncode != 0:
        fail(f"gcc -static failed (glibc's static libraries: apt-get install libc6-dev): "
             f"{proc.stderr.strip()[-800:]}")
    return binary


def _sample_png() -> tuple[bytes, str]:
    import numpy as np
    from PIL import Image

    from ..ml.data import FASHION_MNIST_LABELS, FASHION_MNIST_ROOT, load_idx_dataset

    images, labels = load_idx_dataset(FASHION_MNIST_ROOT, "test")
    buf = io.BytesIO()
    Image.fromarray(np.asarray(images[0], np.uint8)).save(buf, format="PNG")
    return buf.getvalue(), FASHION_MNIST_LABELS[int(labels[0])]


def _context(directory: Path, binary: Path, sample: bytes, version: str, api_path: str) -> Path:
    """Three layers, in the order they change least: the binary and the picture (the same
    bytes and times in every version, so the same layers) and app.conf."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, directory / "app")
    (directory / "sample.png").write_bytes(sample)
    (directory / "app.conf").write_text(f"{version}\n{api_path}\n")
    for name in ("app", "sample.png"):
        os.utime(directory / name, (1_700_000_000, 1_700_000_000))
    (directory / "Containerfile").write_text(
        "FROM scratch\nCOPY app /app\nCOPY sample.png /sample.png\nCOPY app.conf /app.conf\n"
        'ENTRYPOINT ["/app"]\n')
    return directory


def _ask(port: int) -> dict[str, Any]:
    response = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
    return response.json()


class _Poll:
    """Asks the app over and over in a thread; keeps its answers and every failure."""

    def __init__(self, port: int) -> None:
        self.port, self.answers, self.errors = port, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                answer = _ask(self.port)
                (self.answers if answer["model_status"] == 200 else self.errors).append(answer)
            except (httpx.HTTPError, ValueError) as exc:
                self.errors.append(repr(exc))
            self._stop.wait(0.1)

    def __enter__(self) -> _Poll:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


def _wait_app(client, device_id: str, release_id: str, state: str, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    with console.status(f"waiting for {what} ..."):
        while time.monotonic() < deadline:
            rows = {r["component"]: r for r in client.device_components(device_id)}
            row = rows.get(APP)
            if row and row["release_id"] == release_id and row["state"] == state:
                console.print(f"[green]done[/]: {what}")
                return
            time.sleep(0.5)
    fail(f"timed out after {WAIT_S:.0f}s waiting for {what}")


def _event(client, device_id: str, release_id: str, kind: str) -> dict[str, Any]:
    events = [e for e in client.events(device_id=device_id)
              if e["release_id"] == release_id and e["kind"] == kind]
    if not events:
        fail(f"the device reported no '{kind}' event for release {release_id}")
    return events[0]


def _bytes(download: dict[str, Any]) -> dict[str, int]:
    return {"sent_bytes": download["sent_bytes"], "full_bytes": download["full_bytes"]}


def _podman(state: Path, *args: str) -> subprocess.CompletedProcess:
    from ..artifacts import PodmanStore

    store = PodmanStore(state / "containers")
    return subprocess.run(["podman", *store.podman_args(), *args], capture_output=True,
                          text=True, env={**os.environ, **store.env()}, timeout=120)


def _container_id(state: Path) -> str:
    return _podman(state, "inspect", "--format", "{{.Id}}", f"edgewise-{APP}").stdout.strip()


def _reset_store(directory: Path) -> None:
    """The demo's device and build go away: so do their containers (the app's port is free
    again), images and podman's mounts (the working directory can be deleted); the app
    bundles stay."""
    from ..artifacts import PodmanStore

    store = PodmanStore(directory)
    if store.graph_root.exists():
        subprocess.run(["podman", *store.podman_args(), "system", "reset", "--force"],
                       capture_output=True, env={**os.environ, **store.env()}, timeout=120)
    shutil.rmtree(store.run_root.parent, ignore_errors=True)  # /run/edgewise-HASH


def _print_table(facts: dict[str, Any]) -> None:
    update, rollback, model = facts["app_update"], facts["rollback"], facts["model_update"]
    first = facts["first_answer"]
    table = Table(title=f"Edgewise demo --app: {facts['device']} after three app releases and "
                        "a model update")
    for col in ("step", "release", "outcome", "what happened"):
        table.add_column(col)
    table.add_row("model", f"{MODEL}@1.0.0", "committed", "the agent serves it on loopback")
    table.add_row("app v1", f"{APP}@1.0.0", "committed",
                  f"{facts['app_v1_download']['sent_bytes']:,} bytes (the whole image); "
                  f"the model told it {first['model']['label']} (truth: {facts['truth']})")
    table.add_row("app v2", f"{APP}@2.0.0", "committed",
                  f"{update['sent_bytes']:,} of {update['full_bytes']:,} bytes "
                  f"({update['ratio']:.2%}): only the changed layer")
    table.add_row("app v3", rollback["release"], "rolled-back",
                  f"/health answered 503 (the app's model call got "
                  f"{rollback['model_status']}); back on {rollback['back_on']} by itself, "
                  f"{rollback['seconds']:.0f} s after publish")
    table.add_row("model update", model["release"], facts["model"]["state"],
                  f"the app answered {model['app_answers']} requests meanwhile, "
                  f"{model['app_errors']} errors; container "
                  f"{'restarted' if model['container_restarted'] else 'kept running'}")
    table.add_row("now", f"{facts['model']['release']}\n{facts['app']['release']}",
                  f"{facts['model']['state']}\n{facts['app']['state']}",
                  f"app {'healthy' if facts['app']['healthy'] else 'UNHEALTHY'}: the model "
                  f"says {(facts['app']['answer']['model'] or {}).get('label')}; "
                  f"{facts['seconds']:.0f} s in all")
    out.print(table)

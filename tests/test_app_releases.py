"""Container apps as releases, end to end with real containers: `edgewise app build/import`,
a real server, a real agent running podman (runc, its own storage) or docker (a daemon of the
tests' own); an update that ships only the changed layer; a broken version rolled back by the
device itself; the engine's restart policy; the app removed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from edgewise.agent import agent_status
from edgewise.agent._containers import ContainerEngine
from edgewise.artifacts import PodmanStore, validate_bundle
from edgewise.sim import AgentProcess, edgewise_command, free_port
from tests._apps import (
    app_context,
    build_hello,
    require_podman,
    reset_store,
    server_binary,
)
from tests.test_e2e_update import run_once, server_device


@pytest.fixture
def podman() -> None:
    require_podman()


@pytest.fixture(params=["podman", "docker"])
def engine_kind(request, monkeypatch) -> Iterator[str]:
    """The engine the test's agents run apps with (`EDGEWISE_CONTAINER_ENGINE`): podman with
    their own store, or the session's own dockerd (emptied after the test). Images are built
    with podman either way."""
    require_podman()
    daemon = request.getfixturevalue("dockerd") if request.param == "docker" else None
    if daemon is not None:
        monkeypatch.setenv("DOCKER_HOST", daemon.host)
    monkeypatch.setenv("EDGEWISE_CONTAINER_ENGINE", request.param)
    yield request.param
    if daemon is not None:
        daemon.reset()


def get(port: int, path: str = "/") -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)


def app_status(state: Path) -> dict:
    """The app's component in the agent's status (a device's apps are components of their
    own, beside its model)."""
    return agent_status(state)["components"]["hello"]


def app_pid(port: int) -> int | None:
    """The host pid of the test server for `port` (its environment says PORT), if running."""
    for proc in Path("/proc").iterdir():
        try:
            if ((proc / "cmdline").read_bytes() == b"/server\x00"
                    and f"PORT={port}".encode() in (proc / "environ").read_bytes().split(b"\0")):
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


def download_stats(live_server, state: Path, release_id: str) -> dict:
    device = server_device(live_server, state)
    with live_server.client() as c:
        events = [e for e in c.events(device_id=device["id"])
                  if e["release_id"] == release_id and e["kind"] == "downloaded"]
    assert len(events) == 1
    return events[0]["detail"]["download"]


@pytest.mark.slow
def test_app_release_runs_ships_one_layer_and_rolls_back(
        engine_kind, live_server, enroll_agent, tmp_path: Path) -> None:
    port = free_port()
    binary = server_binary(tmp_path / "bin")
    storage = tmp_path / "build-store"
    state = enroll_agent("app")
    engine = None
    try:
        # v1, built with the real CLI.
        ctx = app_context(tmp_path / "ctx-1", binary, "v1")
        cli = subprocess.run(edgewise_command(
            "app", "build", str(ctx), "--name", "hello", "--version", "1.0.0", "--out",
            str(tmp_path / "hello-1"), "--storage", str(storage), "--health-http",
            f"{port}/health", "--env", f"PORT={port}", "--port", str(port),
            "--health-timeout-s", "2", "--health-interval-s", "0.2", "--json"),
            capture_output=True, text=True)
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["release"] == "hello@1.0.0"
        v1 = live_server.publish(tmp_path / "hello-1")
        assert run_once(state, tmp_path) == 0
        engine = ContainerEngine.detect(state / "containers")
        status = app_status(state)
        assert (status["state"], status["release"]) == ("committed", "hello@1.0.0"), status
        health = status["last_health"]
        assert health["passed"] and health["engine"] == engine_kind and health["probes"] >= 1
        assert get(port).text == "v1\n" and get(port, "/health").status_code == 200
        assert engine.status("edgewise-hello") == ("running", "localhost/edgewise/hello:1.0.0")
        first = download_stats(live_server, state, v1["id"])
        assert first["sent_bytes"] == first["full_bytes"] > 300_000

        # v2 changes only the version layer: the device downloads that layer, the new config
        # and image manifest and the index, nothing else; the server layer is copied locally.
        # Its health check is a command run in its container.
        v2_dir, v2_manifest = build_hello(tmp_path, binary, "2.0.0", "v2", port, storage,
                                          http=None, command=["/server", "check"])
        v1_files = validate_bundle(tmp_path / "hello-1").files
        new = {rel: e.size for rel, e in v2_manifest.files.items()
               if v1_files.get(rel) != e}
        shared = set(v2_manifest.files) - set(new)
        assert any(v1_files[rel].size > 300_000 for rel in shared)  # the server layer
        v2 = live_server.publish(v2_dir)
        assert run_once(state, tmp_path) == 0
        status = app_status(state)
        assert (status["state"], status["release"]) == ("committed", "hello@2.0.0"), status
        assert get(port).text == "v2\n"
        stats = download_stats(live_server, state, v2["id"])
        assert stats["sent_bytes"] == sum(new.values()) < 5_000, (stats, new)
        assert stats["full_bytes"] > 300_000 and stats["reused_files"] == len(shared)
        assert stats["sent_bytes"] / stats["full_bytes"] < 0.02

        # v3 fails its health check (500): the device stops it and starts v2 again, from the
        # image it kept, and v2 answers.
        v3_dir, _ = build_hello(tmp_path, binary, "3.0.0", "broken v3", port, storage)
        v3 = live_server.publish(v3_dir)
        assert run_once(state, tmp_path) == 0
        status = app_status(state)
        assert (status["state"], status["release"]) == ("rolled-back", "hello@2.0.0"), status
        assert "answered 500" in status["last_error"]
        assert get(port).text == "v2\n" and get(port, "/health").status_code == 200
        assert engine.status("edgewise-hello") == ("running", "localhost/edgewise/hello:2.0.0")
        device = server_device(live_server, state)
        assert device["release_id"] is None  # the device runs no model
        with live_server.client() as c:
            assert c.device_components(device["id"]) == [{
                "component": "hello", "assigned_release_id": v3["id"],
                "release_id": v2["id"], "state": "rolled-back"}]
            kinds = [e["kind"] for e in c.events(device_id=device["id"])
                     if e["release_id"] == v3["id"] and e["state"]]
        assert kinds[-2:] == ["unhealthy", "rolled-back"]
        # Both slots' images are kept (v2 to run, v3 in the inactive slot); v1's is gone.
        assert sorted(engine.images("localhost/edgewise/hello:")) == [
            "localhost/edgewise/hello:2.0.0", "localhost/edgewise/hello:3.0.0"]

        # The app's container is stopped behind the agent's back (a reboot): the next agent
        # start brings the committed version back.
        engine.remove("edgewise-hello")
        assert run_once(state, tmp_path) == 0
        assert get(port).text == "v2\n"

        # The app dies (killed): the engine's restart policy (on-failure:3) starts it again,
        # with no agent running.
        pid = app_pid(port)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while not (engine.status("edgewise-hello")[0] == "running"
                   and app_pid(port) not in (None, pid)):
            assert time.monotonic() < deadline, engine.status("edgewise-hello")
            time.sleep(0.1)
        assert get(port).text == "v2\n"

        # Unassigned: the device removes the app, its container and every image of it.
        with live_server.client() as c:
            c.unassign_component(device["id"], "hello")
        assert run_once(state, tmp_path) == 0
        assert agent_status(state)["components"] == {}
        assert engine.status("edgewise-hello") == ("missing", None)
        assert engine.images("localhost/edgewise/hello:") == []
    finally:
        reset_store(state / "containers")
        reset_store(storage)


def _save(storage: Path, image: str, fmt: str, dest: Path) -> None:
    store = PodmanStore(storage)
    subprocess.run(["podman", *store.podman_args(), "save", "--format", fmt, "-o", str(dest),
                    image], check=True, env={**os.environ, **store.env()})


def _import(archive: Path, out: Path, port: int) -> subprocess.CompletedProcess:
    return subprocess.run(edgewise_command(
        "app", "import", str(archive), "--name", "hello", "--version", "1.0.0", "--out",
        str(out), "--health-http", str(port), "--env", f"PORT={port}"),
        capture_output=True, text=True)


def test_app_import_reads_oci_and_docker_archives_and_refuses_malformed_ones(
        podman, tmp_path: Path) -> None:
    storage = tmp_path / "store"
    binary = server_binary(tmp_path / "bin")
    build_hello(tmp_path, binary, "1.0.0", "v1", 8080, storage)
    image = "localhost/edgewise-build/hello:1.0.0"
    try:
        for fmt in ("oci-archive", "docker-archive"):
            _save(storage, image, fmt, tmp_path / f"{fmt}.tar")
    finally:
        reset_store(storage)
    for fmt in ("oci-archive", "docker-archive"):
        archive = tmp_path / f"{fmt}.tar"
        out = tmp_path / f"imported-{fmt}"
        proc = _import(archive, out, 8080)
        assert proc.returncode == 0, proc.stderr
        manifest = validate_bundle(out)
        assert manifest.kind == "app" and manifest.requires == ("oci-app",)
        assert manifest.provenance["format"] == fmt
        layers = [rel for rel, e in manifest.files.items() if e.size > 300_000]
        assert len(layers) == 1  # the server binary's layer

    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x00not a tar at all" * 100)
    no_image = tmp_path / "no-image.tar"
    with tarfile.open(no_image, "w") as tar:
        tar.add(binary, arcname="server")
    truncated = tmp_path / "truncated.tar"
    data = (tmp_path / "oci-archive.tar").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for archive, message in ((junk, "not a readable tar archive"),
                             (no_image, "neither an OCI image archive"),
                             (truncated, "")):
        out = tmp_path / f"out-{archive.stem}"
        proc = _import(archive, out, 8080)
        assert proc.returncode == 1 and "error:" in proc.stderr, proc.stderr
        assert message in proc.stderr
        assert not out.exists()
        assert not list(tmp_path.glob(f".out-{archive.stem}*"))


# The states of an app update the agent can be killed in (`_machine.State`), besides the check
# in the rest state it starts from; the rollback's only in an update that fails.
UPDATE_STATES = ["downloading", "verifying", "awaiting-window", "installing", "activating",
                 "health-checking"]
# Cut points after which the new version runs while the agent is down (activated, not yet
# rolled back); at every other one the old version does.
NEW_RUNS = {"activating:after", "health-checking:before", "health-checking:after",
            "rolling-back:before"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["healthy", "broken"])
def test_power_cuts_in_every_state_of_an_app_update_end_on_a_running_version(
        podman, live_server, enroll_agent, tmp_path: Path, kind: str) -> None:
    """kill -9 of the agent in every state of a container app update, before and after the
    state's side effect, and in the check of the rest state it starts from: an update that
    is healthy commits, a broken one (its health check fails) rolls back. While the agent is
    down the app runs, the old version or the activated new one; the restarted agent ends
    with the app running the old or the new version, healthy, its record, its slots, its
    images and the server's view agreeing. One agent, one new version per cut point; the
    health probes alternate between HTTP and a command run in the container."""
    port = free_port()
    binary = server_binary(tmp_path / "bin")
    storage = tmp_path / "build-store"
    state = enroll_agent(f"app-cuts-{kind}")
    device = server_device(live_server, state)
    by_command = {"http": None, "command": ["/server", "check"]}
    hour = datetime.now(UTC).hour
    closed = {"days": "daily", "start": f"{(hour + 3) % 24:02d}:00", "duration_min": 60}
    always = {"days": "daily", "start": "00:00", "duration_min": 1440}

    def window(policy: dict) -> None:
        with live_server.client() as c:
            c.request("PATCH", f"/api/v1/devices/{device['id']}", json={"window": policy})

    try:
        bundle, _ = build_hello(tmp_path, binary, "1.0.0", "v1", port, storage)
        running = live_server.publish(bundle)  # the release that should run
        running_text = "v1"
        assert run_once(state, tmp_path) == 0
        engine = ContainerEngine.detect(state / "containers")
        states = ["rest", *UPDATE_STATES] + (["rolling-back"] if kind == "broken" else [])
        cuts = [(cut, when) for cut in states for when in ("before", "after")]
        for n, (cut, when) in enumerate(cuts, start=2):
            version, text = f"{n}.0.0", f"v{n}" if kind == "healthy" else f"broken v{n}"
            before = app_status(state)
            fault = f"{before['state'] if cut == 'rest' else cut}:{when}"
            # (A broken version fails 4 probes, not 15: the test is long enough.)
            bundle, _ = build_hello(tmp_path, binary, version, text, port, storage,
                                    **(by_command if n % 2 else {}),
                                    **({"retries": 4} if kind == "broken" else {}))
            if cut == "awaiting-window":
                window(closed)
            new = live_server.publish(bundle)
            assert run_once(state, tmp_path, fault=fault) == -signal.SIGKILL, fault
            # The agent is down: the app runs on.
            runs = (version, text) if fault in NEW_RUNS else (
                running["version"], running_text)
            assert engine.status("edgewise-hello") == (
                "running", f"localhost/edgewise/hello:{runs[0]}"), fault
            assert _wait_for(lambda: _answers(port), "the app") == runs[1] + "\n", fault
            if cut == "awaiting-window":
                # A power cut takes the app down too: the restarted agent starts the old
                # version again, though the update still waits for its window.
                engine.remove("edgewise-hello")
                assert run_once(state, tmp_path) == 0
                assert app_status(state)["state"] == "awaiting-window", fault
                assert _wait_for(lambda: _answers(port), "the app") == runs[1] + "\n", fault
                window(always)
            assert run_once(state, tmp_path) == 0, fault

            if kind == "healthy":
                running, running_text = new, text
            status = app_status(state)
            final = "committed" if kind == "healthy" else "rolled-back"
            assert (status["state"], status["release"]) == (
                final, f"hello@{running['version']}"), (fault, status)
            if kind == "broken":
                assert "answered 500" in status["last_error"] or (
                    "/server check exited 1" in status["last_error"]), (fault, status)
            assert engine.status("edgewise-hello") == (
                "running", f"localhost/edgewise/hello:{running['version']}"), fault
            # (A rollback starts the old version without waiting for it to listen.)
            assert _wait_for(lambda: _answers(port), "the app") == running_text + "\n", fault
            assert get(port, "/health").status_code == 200, fault
            record = json.loads((state / "state.json").read_text())
            lane = record["components"]["hello"]
            assert (lane["target"], lane["pending_slot"], lane["entries"]) == (
                None, None, {}), fault
            assert lane["installed"]["release_id"] == running["id"], fault
            assert lane["installed_slot"] == status["active_slot"], fault
            assert record["outbox"] == [], fault  # the server heard everything
            # The images of both slots (the new version and the one it replaced), no other.
            assert sorted(engine.images("localhost/edgewise/hello:")) == sorted(
                f"localhost/edgewise/hello:{v}"
                for v in (version, before["release"].split("@")[1])), fault
            with live_server.client() as c:
                assert c.device_components(device["id"]) == [{
                    "component": "hello", "assigned_release_id": new["id"],
                    "release_id": running["id"], "state": final}], fault
    finally:
        reset_store(state / "containers")
        reset_store(storage)


def _app_pid(state: Path, timeout_s: float = 10.0) -> int:
    """The app's own process: the child of its container's init (apps run with --init)."""
    store = PodmanStore(state / "containers")
    deadline = time.monotonic() + timeout_s
    while True:
        init = subprocess.run(["podman", *store.podman_args(), "inspect", "--format",
                               "{{.State.Pid}}", "edgewise-hello"], capture_output=True,
                              text=True, env={**os.environ, **store.env()}).stdout.strip()
        children = Path(f"/proc/{init}/task/{init}/children")
        if init.isdigit() and int(init) > 0 and children.exists() and (
                kids := children.read_text().split()):
            return int(kids[0])
        assert time.monotonic() < deadline, "the app has no process"
        time.sleep(0.05)


def _wait_for(predicate, what: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def _answers(port: int) -> str | None:
    try:
        return get(port).text
    except httpx.TransportError:
        return None


@pytest.mark.slow
def test_kill_9_of_the_app_itself_is_restarted_or_rolled_back(
        podman, live_server, enroll_agent, tmp_path: Path) -> None:
    """kill -9 of the app (its process in the container; the agent is not touched). After
    commit its restart policy (on-failure:3) brings it back, three times; once the policy
    gave up, the agent's next start does. During the health check of an update, the crash
    fails the check even though the policy brought the app back at once: the update rolls
    back to the old version, running."""
    port = free_port()
    binary = server_binary(tmp_path / "bin")
    storage = tmp_path / "build-store"
    state = enroll_agent("app-kill")
    try:
        bundle, _ = build_hello(tmp_path, binary, "1.0.0", "v1", port, storage)
        live_server.publish(bundle)
        assert run_once(state, tmp_path) == 0
        engine = ContainerEngine.detect(state / "containers")
        for restarts in (1, 2, 3):
            os.kill(_app_pid(state), signal.SIGKILL)
            _wait_for(lambda r=restarts: engine.inspect("edgewise-hello")[2] == r,
                      f"restart {restarts}")
            assert _wait_for(lambda: _answers(port), "the app again") == "v1\n"
        os.kill(_app_pid(state), signal.SIGKILL)  # a 4th crash: the policy gives up
        _wait_for(lambda: engine.status("edgewise-hello")[0] == "exited", "the app to stay down")
        assert _answers(port) is None
        assert run_once(state, tmp_path) == 0
        assert engine.status("edgewise-hello") == ("running", "localhost/edgewise/hello:1.0.0")
        assert _wait_for(lambda: _answers(port), "v1 again") == "v1\n"
        assert get(port, "/health").status_code == 200

        # v2 answers 503 on /health for its first seconds, then 200: it would pass its check,
        # but it is killed while being checked.
        bundle, _ = build_hello(tmp_path, binary, "2.0.0", "slow v2", port, storage,
                                retries=80, interval_s=0.25)
        live_server.publish(bundle)
        agent = AgentProcess(state_dir=state, once=True,
                             log_path=tmp_path / "app-kill.log").start()
        try:
            _wait_for(lambda: json.loads((state / "state.json").read_text())["components"][
                "hello"]["state"] == "health-checking" and engine.status("edgewise-hello") == (
                "running", "localhost/edgewise/hello:2.0.0"), "the health check", 60)
            os.kill(_app_pid(state), signal.SIGKILL)
            assert agent.wait(timeout_s=120) == 0
        finally:
            agent.kill()
        status = app_status(state)
        assert (status["state"], status["release"]) == ("rolled-back", "hello@1.0.0"), status
        assert "the app exited during its health check and was restarted 1 time(s) by its " \
            "restart policy (on-failure:3)" in status["last_error"], status["last_error"]
        assert engine.status("edgewise-hello") == ("running", "localhost/edgewise/hello:1.0.0")
        assert _wait_for(lambda: _answers(port), "v1 again") == "v1\n"
        assert get(port, "/health").status_code == 200
    finally:
        reset_store(state / "containers")
        reset_store(storage)

"""A device runs a set of components, each updated on its own: a model the agent serves and
a container app (real podman), assigned, signed by the director and reported per component.
Updating the app leaves the model serving, updating the model leaves the app running, and
dependencies between them are checked at publish and on the device before anything is
installed."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
from PIL import Image

from edgewise.agent import LocalModel, agent_status
from edgewise.artifacts import (
    MANIFEST_NAME,
    BundleError,
    PodmanStore,
    build_app,
    parse_manifest,
    satisfies,
    unmet_dependencies,
)
from edgewise.server.client import ServerApiError
from edgewise.sim import free_port
from tests._apps import app_context, app_section, require_podman, reset_store, server_binary
from tests.test_checkin import app  # noqa: F401  (the SQLite + PostgreSQL server fixture)
from tests.test_e2e_update import run_once, server_device


def test_dependency_ranges_and_the_manifest_rules(tiny_bundle) -> None:
    assert satisfies("3.0.0", ">=3") and satisfies("3.1.0-rc1", ">=3,<4")
    assert not satisfies("2.9.0", ">=3") and not satisfies("not-a-version", ">=0")
    assert unmet_dependencies({"tiny": ">=3"}, {"tiny": "3.0.0"}) == []
    assert unmet_dependencies({"tiny": ">=3", "cam": "==1"}, {"tiny": "2.0.0"}) == [
        "cam ==1 (none installed)", "tiny >=3 (it has tiny@2.0.0)"]
    raw = (tiny_bundle("1.0.0") / MANIFEST_NAME).read_text()
    assert "depends" not in raw  # older agents still read bundles without dependencies
    with_depends = raw.replace('"files"', '"depends": {"labels": ">=3"}, "files"', 1)
    with pytest.raises(BundleError, match="must require the reader feature 'depends'"):
        parse_manifest(with_depends)
    required = with_depends.replace('"files"', '"requires": ["depends"], "files"', 1)
    assert parse_manifest(required).depends == {"labels": ">=3"}
    with pytest.raises(BundleError, match="invalid version range"):
        parse_manifest(required.replace('">=3"', '"three or more"'))


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (4, 4), 128).save(buf, format="PNG")
    return buf.getvalue()


class _Watch:
    """Calls `probe` over and over in a thread until stopped; keeps what it answered and
    every error."""

    def __init__(self, probe) -> None:
        self.probe, self.answers, self.errors = probe, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.answers.append(self.probe())
            except Exception as exc:  # noqa: BLE001 (any failure is what the test counts)
                self.errors.append(repr(exc))
            self._stop.wait(0.05)

    def __enter__(self) -> _Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def _container_id(state: Path, name: str) -> str:
    store = PodmanStore(state / "containers")
    return subprocess.run(["podman", *store.podman_args(), "inspect", "--format", "{{.Id}}",
                           name], capture_output=True, text=True, check=True,
                          env={**os.environ, **store.env()}).stdout.strip()


def _hello(tmp: Path, binary: Path, version: str, port: int, storage: Path,
           depends: dict[str, str] | None = None) -> Path:
    ctx = app_context(tmp / f"ctx-{version}", binary, f"v{version[0]}")
    out = tmp / f"hello-{version}"
    build_app(ctx, out, name="hello", version=version, app=app_section(port), storage=storage,
              depends=depends)
    return out


@pytest.mark.slow
def test_a_model_and_an_app_update_independently_and_dependencies_hold(
        live_server, enroll_agent, tiny_bundle, tmp_path: Path) -> None:
    require_podman()
    port = free_port()
    binary = server_binary(tmp_path / "bin")
    storage = tmp_path / "build-store"
    state = enroll_agent("two")
    image = _png()
    try:
        # The model, then an app that needs it: two components, each committed.
        tiny1 = live_server.publish(tiny_bundle("1.0.0"))
        assert run_once(state, tmp_path) == 0
        hello1 = live_server.publish(_hello(tmp_path, binary, "1.0.0", port, storage,
                                            depends={"tiny": ">=1"}))
        assert run_once(state, tmp_path) == 0
        status = agent_status(state)
        assert (status["state"], status["release"]) == ("committed", "tiny@1.0.0"), status
        app = status["components"]["hello"]
        assert (app["state"], app["release"]) == ("committed", "hello@1.0.0"), app
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text == "v1\n"
        device = server_device(live_server, state)
        assert device["release_id"] == tiny1["id"] and device["state"] == "committed"
        with live_server.client() as c:
            rows = c.device_components(device["id"])
        assert rows == [{"component": "hello", "assigned_release_id": hello1["id"],
                         "release_id": hello1["id"], "state": "committed"}]

        # The app only, with a power cut right after its new container started: the model
        # answers every request while the app is replaced, and the restarted agent finishes.
        model = LocalModel(state)
        with _Watch(lambda: model.predict(image)[1]["release_id"]) as served:
            live_server.publish(_hello(tmp_path, binary, "2.0.0", port, storage))
            assert run_once(state, tmp_path, fault="activating:after") == -signal.SIGKILL
            assert run_once(state, tmp_path) == 0
        assert served.errors == [] and set(served.answers) == {tiny1["id"]}, served.errors[:3]
        assert len(served.answers) > 5
        status = agent_status(state)
        assert status["release"] == "tiny@1.0.0"
        assert status["components"]["hello"]["release"] == "hello@2.0.0"
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text == "v2\n"

        # The model only, with a power cut in its health check: the app's container is not
        # restarted (not even by the restarted agent) and answers all along.
        running = _container_id(state, "edgewise-hello")
        with _Watch(lambda: httpx.get(f"http://127.0.0.1:{port}/", timeout=2).text) as app_up:
            tiny2 = live_server.publish(tiny_bundle("2.0.0"))
            assert run_once(state, tmp_path, fault="health-checking:before") == -signal.SIGKILL
            assert run_once(state, tmp_path) == 0
        assert app_up.errors == [] and set(app_up.answers) == {"v2\n"}, app_up.errors[:3]
        assert len(app_up.answers) > 5
        assert _container_id(state, "edgewise-hello") == running
        status = agent_status(state)
        assert status["release"] == "tiny@2.0.0"
        assert status["components"]["hello"]["release"] == "hello@2.0.0"
        assert model.predict(image)[1]["release_id"] == tiny2["id"]

        # Refused at publish: no published tiny can satisfy >=3.
        needs3 = _hello(tmp_path, binary, "3.0.0", port, storage, depends={"tiny": ">=3,<4"})
        with pytest.raises(ServerApiError, match=r"depends on tiny >=3,<4, and no published "
                           r"release satisfies it \(published: tiny@1.0.0, tiny@2.0.0\)"):
            live_server.publish(needs3)

        # Published once tiny 3 exists, but this device runs tiny 2: it says why and installs
        # nothing (no blob of hello 3 is fetched); the app keeps running hello 2.
        tiny3 = live_server.publish(tiny_bundle("3.0.0"), assign=False)
        hello3 = live_server.publish(needs3)
        assert run_once(state, tmp_path) == 0
        app = agent_status(state)["components"]["hello"]
        assert (app["state"], app["release"]) == ("failed", "hello@2.0.0"), app
        assert "needs tiny >=3,<4 (it has tiny@2.0.0): nothing was installed" in \
            app["last_error"]
        assert not (state / "downloads" / hello3["id"]).exists()
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text == "v2\n"
        with live_server.client() as c:
            events = [e for e in c.events(device_id=device["id"])
                      if e["release_id"] == hello3["id"] and e["state"] == "failed"]
        assert len(events) == 1 and "needs tiny >=3,<4" in events[0]["message"]
        assert events[0]["detail"]["waiting_for_dependencies"]
        # Nothing changed on the device: the next check does not try (or report) again.
        with live_server.client() as c:
            before = len([e for e in c.events(device_id=device["id"])
                          if e["release_id"] == hello3["id"]])
            assert run_once(state, tmp_path) == 0
            assert len([e for e in c.events(device_id=device["id"])
                        if e["release_id"] == hello3["id"]]) == before

        # tiny 3 assigned: in one cycle the model updates, then the app's dependency is met.
        with live_server.client() as c:
            c.assign(tiny3["id"])
        assert run_once(state, tmp_path) == 0
        status = agent_status(state)
        assert status["release"] == "tiny@3.0.0"
        assert status["components"]["hello"]["release"] == "hello@3.0.0", status
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text == "v3\n"

        # A model that would break the committed app's range is refused before download.
        tiny4 = live_server.publish(tiny_bundle("4.0.0"))
        assert run_once(state, tmp_path) == 0
        status = agent_status(state)
        assert (status["state"], status["release"]) == ("failed", "tiny@3.0.0"), status
        assert "tiny@4.0.0 would break hello@3.0.0, which needs tiny >=3,<4 (it has " \
            "tiny@4.0.0)" in status["last_error"]
        assert not (state / "downloads" / tiny4["id"]).exists()
    finally:
        reset_store(state / "containers")
        reset_store(storage)


def test_a_rollout_moves_one_component_and_the_check_in_answers_each(app) -> None:  # noqa: F811
    """Server side, no containers: an app's rollout assigns the app component of the group's
    devices and leaves their model alone; the check-in lists the app beside the model only
    for devices that have one; one rollout in progress per group and component; an abort
    puts the app component back. On SQLite and on PostgreSQL (whose check-in is
    `checkin_pg`'s, on the event loop)."""
    from edgewise.server._errors import Conflict
    from edgewise.server.devices import service as devices
    from edgewise.server.devices.models import Device
    from edgewise.server.groups.models import Group, GroupMember
    from edgewise.server.releases.models import Release
    from edgewise.server.rollouts import service as rollouts
    from edgewise.server.rollouts.engine import Stage
    from tests.conftest import ADMIN
    from tests.test_checkin import check_in, enroll

    api = app
    in_group, model_only = enroll(api), enroll(api)
    with api.app.state.ctx.sessions() as session:
        for rid, name, version, kind in (("rel-m1", "tiny", "1.0.0", "classifier"),
                                         ("rel-m2", "tiny", "2.0.0", "classifier"),
                                         ("rel-a1", "hello", "1.0.0", "app"),
                                         ("rel-a2", "hello", "2.0.0", "app")):
            session.add(Release(id=rid, name=name, version=version,
                                manifest_target=f"{name}/{version}/edgewise.json",
                                targets_version=1, size_bytes=1, manifest={"kind": kind}))
        session.add(Group(name="lab", kind="static", selector=[], window=None))
        session.flush()
        session.add(GroupMember(group_name="lab", device_id=in_group[0]))
        for device_id, _key in (in_group, model_only):
            device = session.get(Device, device_id)
            device.assigned_release_id = device.release_id = "rel-m1"
        session.commit()
        app_rollout = rollouts.create_rollout(session, release_id="rel-a1",
                                              group_name="lab", stages=[Stage("all", 100)])
        rollouts.tick(session, app_rollout)
        with pytest.raises(Conflict, match="of its hello component in progress"):
            rollouts.create_rollout(session, release_id="rel-a2", group_name="lab",
                                    stages=[Stage("all", 100)])
        # The model's rollout in the same group is another component's: allowed.
        model_rollout = rollouts.create_rollout(session, release_id="rel-m2",
                                                group_name="lab",
                                                stages=[Stage("all", 100)])
        rollouts.tick(session, model_rollout)
        app_rollout_id = app_rollout.id

    answer = check_in(api, *in_group)
    assert (answer["release_id"], answer["version"]) == ("rel-m2", "2.0.0")
    assert [(c["component"], c["release_id"], c["rollout_id"])
            for c in answer["components"]] == [("hello", "rel-a1", app_rollout_id)]
    assert "components" not in check_in(api, *model_only)  # unchanged for older agents
    api.cookies.set("edgewise_token", ADMIN)  # the dashboard's session cookie
    page = api.get(f"/dashboard/devices/{in_group[0]}")
    assert page.status_code == 200
    assert 'data-testid="component-hello"' in page.text and "hello@1.0.0</a>" in page.text

    with api.app.state.ctx.sessions() as session:
        rollouts.operator_action(session, rollout_id=app_rollout_id, action="abort",
                                 actor="test")
        device = session.get(Device, in_group[0])
        assert devices.assigned_release(session, device=device, component="hello") is None
        assert device.assigned_release_id == "rel-m2"  # the model's rollout is untouched
    assert "components" not in check_in(api, *in_group)  # no app assigned any more

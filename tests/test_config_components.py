"""Configuration files as a component of their own: built, published, checked on the device
before they become current, switched atomically at a stable path, mounted into the app that
reads them, health-checked through that app, rolled back by the device itself; and any
component (config or app) removed from a device when the server no longer assigns it.
A real server process, real agent processes, real podman."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from edgewise.agent import LocalModel, agent_status
from edgewise.artifacts import (
    MANIFEST_NAME,
    BundleError,
    ConfigManifest,
    PodmanStore,
    build_app,
    component_of,
    parse_manifest,
    validate_bundle,
    write_config_bundle,
)
from edgewise.cli import app as cli
from edgewise.server.client import ServerApiError
from edgewise.sim import free_port
from tests._apps import app_context, app_section, require_podman, reset_store, server_binary
from tests.conftest import ADMIN
from tests.test_components import _container_id, _png, _Watch
from tests.test_e2e_update import run_once, server_device

AUTH = {"Authorization": f"Bearer {ADMIN}"}


def _files(directory: Path, **files: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, text in files.items():
        (directory / name.replace("_", ".")).write_text(text)
        out.append(directory / name.replace("_", "."))
    return out


def test_a_config_bundle_is_built_checked_and_bad_input_writes_nothing(tmp_path: Path) -> None:
    src = _files(tmp_path / "src", app_json='{"threshold": 0.8}\n', limits_toml="max = 3\n",
                 notes_txt="anything\n")
    manifest = write_config_bundle(tmp_path / "cfg", src, name="site", version="1.0.0",
                                   app="camera", check={"command": ["true"]})
    assert isinstance(validate_bundle(tmp_path / "cfg"), ConfigManifest)
    assert manifest.config.formats == {"app.json": "json", "limits.toml": "toml"}
    assert manifest.requires == ("config-file",) and manifest.component == "site"
    assert component_of("config", "site") == "site"
    assert manifest.mount == "/etc/edgewise/config/site"
    assert sorted(manifest.files) == ["app.json", "limits.toml", "notes.txt"]

    # An agent that predates config components refuses it and says to update.
    raw = json.loads((tmp_path / "cfg" / MANIFEST_NAME).read_text())
    with pytest.raises(BundleError, match=r"needs features.*\(config-next\).*update the agent"):
        parse_manifest(json.dumps({**raw, "requires": ["config-file", "config-next"]}))
    with pytest.raises(BundleError, match="must require the reader feature 'config-file'"):
        parse_manifest(json.dumps({**raw, "requires": []}))

    bad = _files(tmp_path / "bad", broken_json='{"threshold": ', broken_toml="max = = 3\n",
                 slot_json="{}")
    cases = [
        ([tmp_path / "src" / "missing.json"], "missing.json: no such file"),
        ([bad[0]], r"broken.json: invalid JSON: Expecting value \(line 1, column 15\)"),
        ([bad[1]], "broken.toml: invalid TOML"),
        ({"../escape.json": src[0]}, "'..' is not allowed"),
        ({"/etc/passwd": src[0]}, "absolute paths are not allowed"),
        ([bad[2]], "slot.json is the device's own slot record"),
        ({".env": src[2]}, "hidden files"),
    ]
    for files, message in cases:
        with pytest.raises(BundleError, match=message):
            write_config_bundle(tmp_path / "out", files, name="site", version="1.0.0")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "cfg", "src"], message
    with pytest.raises(BundleError, match="invalid JSON"):  # a declared format, any suffix
        write_config_bundle(tmp_path / "out", {"app.conf": bad[0]}, name="site",
                            version="1.0.0", formats={"app.conf": "json"})

    # The CLI: NAME=PATH names files; errors are one clear line and write nothing.
    runner = CliRunner()
    result = runner.invoke(cli, ["config", "build", f"settings.json={src[0]}",
                                 f"conf/limits.toml={src[1]}", "--name", "site", "--version",
                                 "2.0.0", "--out", str(tmp_path / "cli"), "--app", "camera",
                                 "--check", "sh -c 'test -s settings.json'", "--json"])
    assert result.exit_code == 0, result.output
    built = json.loads(result.output)
    assert built["files"] == ["conf/limits.toml", "settings.json"] and built["app"] == "camera"
    assert validate_bundle(tmp_path / "cli").config.check.command == (
        "sh", "-c", "test -s settings.json")
    result = runner.invoke(cli, ["config", "build", f"../up.json={src[0]}", "--name", "site",
                                 "--version", "3.0.0", "--out", str(tmp_path / "nope")])
    assert result.exit_code != 0 and "'..' is not allowed" in result.output
    assert not (tmp_path / "nope").exists()


def test_removing_a_component_is_an_unassignment_the_devices_report_ends(api) -> None:
    """Server side: DELETE clears the assignment (the check-in stops listing the component,
    the director stops signing it); the row goes when the device reports it removed."""
    from edgewise.server.devices.models import Device
    from edgewise.server.releases.models import Release
    from tests.test_checkin import check_in, enroll

    device_id, key = enroll(api)
    with api.app.state.ctx.sessions() as session:
        session.add(Release(id="rel-c1", name="site", version="1.0.0",
                            manifest_target="site/1.0.0/edgewise.json", targets_version=1,
                            size_bytes=1, manifest={"kind": "config"}))
        session.commit()
    assert api.post("/api/v1/assignments", json={"release_id": "rel-c1",
                                                 "device_ids": [device_id]},
                    headers=AUTH).status_code == 200
    assert [c["component"] for c in check_in(api, device_id, key)["components"]] == ["site"]
    with api.app.state.ctx.sessions() as session:
        assert session.get(Device, device_id).assigned_release_id is None  # the model's

    path = f"/api/v1/devices/{device_id}/components"
    assert api.delete(f"{path}/model", headers=AUTH).status_code == 422
    assert api.delete(f"{path}/nothing", headers=AUTH).status_code == 404
    assert api.delete(f"{path}/site").status_code == 401
    removed = api.delete(f"{path}/site", headers=AUTH)
    assert removed.status_code == 200 and removed.json()["assigned_release_id"] is None
    assert "components" not in check_in(api, device_id, key)
    assert api.get(path, headers=AUTH).json() == [
        {"component": "site", "assigned_release_id": None, "release_id": None,
         "state": "idle"}]

    from edgewise.server.devices import service

    with api.app.state.ctx.sessions() as session:
        service.report(session, device=session.get(Device, device_id), state="idle",
                       event="removed", release_id="rel-c1", target_release_id=None,
                       message="removed site@1.0.0", detail={}, component="site")
    assert api.get(path, headers=AUTH).json() == []


def test_removing_a_component_takes_the_device_out_of_its_rollouts(api) -> None:
    """A rollout in progress never gives an app back to a device the operator removed it
    from: not when its stage comes, not by an abort (which puts the previous release back
    on the rollout's other devices). The device leaves the rollout, recorded as an event;
    the rollout goes on without it."""
    from edgewise.server.devices import service as devices
    from edgewise.server.devices.models import Device
    from edgewise.server.events import service as events
    from edgewise.server.groups.models import Group, GroupMember
    from edgewise.server.releases.models import Release
    from edgewise.server.rollouts import service as rollouts
    from edgewise.server.rollouts.engine import Action, Stage
    from edgewise.server.rollouts.models import RolloutDevice
    from tests.test_checkin import check_in, enroll

    enrolled = dict(enroll(api) for _ in range(3))
    with api.app.state.ctx.sessions() as session:
        for rid, version in (("rel-a1", "1.0.0"), ("rel-a2", "2.0.0")):
            session.add(Release(id=rid, name="hello", version=version,
                                manifest_target=f"hello/{version}/edgewise.json",
                                targets_version=1, size_bytes=1, manifest={"kind": "app"}))
        session.add(Group(name="lab", kind="static", selector=[], window=None))
        session.flush()
        for device_id in enrolled:
            session.add(GroupMember(group_name="lab", device_id=device_id))
            devices.report(session, device=session.get(Device, device_id), state="committed",
                           event="healthy", release_id="rel-a1", target_release_id="rel-a1",
                           message="", detail={}, component="hello", commit=False)
        session.commit()
        rollout = rollouts.create_rollout(session, release_id="rel-a2", group_name="lab",
                                          stages=[Stage("canary", count=1),
                                                  Stage("all", percent=100)])
        rollout_id = rollout.id
        assert rollouts.tick(session, rollout) is Action.WAIT
        order = [r.device_id for r in session.query(RolloutDevice).filter_by(
            rollout_id=rollout_id).order_by(RolloutDevice.position)]
    canary, removed, last = order

    def report(device_id: str, state: str, event: str, release_id: str | None) -> None:
        with api.app.state.ctx.sessions() as session:
            devices.report(session, device=session.get(Device, device_id), state=state,
                           event=event, release_id=release_id, target_release_id="rel-a2",
                           message="", detail={}, component="hello")

    def assigned(device_id: str) -> str | None:
        with api.app.state.ctx.sessions() as session:
            return devices.assigned_release(session, device=session.get(Device, device_id),
                                            component="hello")

    def tick() -> Action | None:
        with api.app.state.ctx.sessions() as session:
            return rollouts.tick(session, rollouts.get_rollout(session, rollout_id=rollout_id))

    # A device of the later stage loses its app while the canary installs: it removes it.
    path = f"/api/v1/devices/{removed}/components/hello"
    assert api.delete(path, headers=AUTH).status_code == 200
    report(removed, "idle", "removed", "rel-a1")
    assert "components" not in check_in(api, removed, enrolled[removed])
    report(canary, "committed", "healthy", "rel-a2")
    assert tick() is Action.ADVANCE
    assert tick() is Action.WAIT  # the last stage: the rest of the group, but not `removed`
    assert (assigned(canary), assigned(last), assigned(removed)) == ("rel-a2", "rel-a2", None)
    assert "components" not in check_in(api, removed, enrolled[removed])
    with api.app.state.ctx.sessions() as session:
        left = [e for e in events.list_events(session, device_id=removed)
                if e.kind == "rollout-left"]
        assert [(e.rollout_id, e.release_id) for e in left] == [(rollout_id, "rel-a2")]
        assert left[0].message == (f"out of rollout {rollout_id}: hello removed from the "
                                   "device by admin")
        assert rollouts.progress(session, rollouts.get_rollout(
            session, rollout_id=rollout_id))["devices"] == 2
    api.cookies.set("edgewise_token", ADMIN)  # the dashboard's session cookie
    page = api.get(f"/dashboard/rollouts/{rollout_id}").text
    assert 'Devices in this rollout <span class="count">2</span>' in page
    assert f"out of rollout {rollout_id}: hello removed from the device by admin" in page

    # The last device runs the new release, then loses the app too; before it reports the
    # removal, the operator aborts: the canary gets the old release back, it gets nothing.
    report(last, "committed", "healthy", "rel-a2")
    assert api.delete(f"/api/v1/devices/{last}/components/hello",
                      headers=AUTH).status_code == 200
    with api.app.state.ctx.sessions() as session:
        rollouts.operator_action(session, rollout_id=rollout_id, action="abort", actor="test")
    assert (assigned(canary), assigned(last), assigned(removed)) == ("rel-a1", None, None)
    assert "components" not in check_in(api, last, enrolled[last])
    # Removing it again finds no rollout to leave: no second event.
    assert api.delete(f"/api/v1/devices/{last}/components/hello",
                      headers=AUTH).status_code == 200
    with api.app.state.ctx.sessions() as session:
        assert len([e for e in events.list_events(session, device_id=last)
                    if e.kind == "rollout-left"]) == 1


def _hello(tmp: Path, binary: Path, port: int, storage: Path) -> Path:
    """The test app, reading its version from the `greeting` config's file once there is
    one (until then it answers "unknown")."""
    ctx = app_context(tmp / "ctx-hello", binary, "image")
    section = app_section(port)
    section["env"]["VERSION_FILE"] = "/etc/edgewise/config/greeting/version.txt"
    build_app(ctx, tmp / "hello-1", name="hello", version="1.0.0", app=section,
              storage=storage)
    return tmp / "hello-1"


def _greeting(tmp: Path, version: str, text: str) -> Path:
    """Config `greeting`: the version the app answers, plus a settings file; the device
    refuses files whose version.txt starts with "invalid" (the manifest's own check)."""
    src = _files(tmp / f"greeting-src-{version}", version_txt=text + "\n",
                 settings_json=json.dumps({"greeting": text}))
    out = tmp / f"greeting-{version}"
    write_config_bundle(out, src, name="greeting", version=version, app="hello",
                        check={"command": ["sh", "-c", "! grep -q ^invalid version.txt"],
                               "timeout_s": 10}, depends={"hello": ">=1"})
    return out


@pytest.mark.slow
def test_config_files_update_roll_back_survive_power_cuts_and_components_are_removed(
        live_server, enroll_agent, tiny_bundle, tmp_path: Path) -> None:
    require_podman()
    port = free_port()
    binary = server_binary(tmp_path / "bin")
    storage = tmp_path / "build-store"
    state = enroll_agent("cfg")
    current = state / "config" / "greeting" / "current"

    def answer(wait_s: float = 10.0) -> str:
        """The app's answer; a rollback restarts it without waiting for it to listen."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    try:
        tiny1 = live_server.publish(tiny_bundle("1.0.0"))
        live_server.publish(_hello(tmp_path, binary, port, storage))
        assert run_once(state, tmp_path) == 0
        assert answer() == "unknown\n"  # no configuration yet

        # First files the app fails with: rolled back to no files at all, the link removed
        # and the app restarted without them.
        live_server.publish(_greeting(tmp_path, "0.1.0", "broken"))
        assert run_once(state, tmp_path) == 0
        app = agent_status(state)["components"]["greeting"]
        assert (app["state"], app["release"]) == ("rolled-back", None), app
        assert not current.exists() and not current.is_symlink()
        assert answer() == "unknown\n"

        # The first files: checked, made current, the app restarted with them mounted,
        # healthy: committed. The model answers throughout.
        model = LocalModel(state)
        with _Watch(lambda: model.predict(_png())[1]["release_id"]) as served:
            cfg1 = live_server.publish(_greeting(tmp_path, "1.0.0", "cfg1"))
            assert run_once(state, tmp_path) == 0
        assert served.errors == [] and set(served.answers) == {tiny1["id"]}, served.errors[:3]
        status = agent_status(state)
        assert status["components"]["greeting"]["state"] == "committed", status
        assert status["components"]["greeting"]["release"] == "greeting@1.0.0"
        assert status["release"] == "tiny@1.0.0" and status["state"] == "committed"
        assert current.is_symlink() and (current / "version.txt").read_text() == "cfg1\n"
        assert json.loads((current / "settings.json").read_text()) == {"greeting": "cfg1"}
        assert answer() == "cfg1\n"
        assert status["components"]["greeting"]["last_health"]["app"] == "hello"

        # Power cuts: before the switch the old files stay current; after it, the new ones.
        # Either way the restarted agent finishes the update.
        for version, fault in (("2.0.0", "activating:before"), ("3.0.0", "activating:after")):
            live_server.publish(_greeting(tmp_path, version, f"cfg{version[0]}"))
            assert run_once(state, tmp_path, fault=fault) == -signal.SIGKILL
            expected = "cfg1\n" if version == "2.0.0" else "cfg3\n"
            assert (current / "version.txt").read_text() == expected, fault
            assert run_once(state, tmp_path) == 0
            assert (current / "version.txt").read_text() == f"cfg{version[0]}\n"
            assert answer() == f"cfg{version[0]}\n"
        assert agent_status(state)["components"]["greeting"]["release"] == "greeting@3.0.0"

        # Files the app cannot work with (its /health says 500): rolled back by the device,
        # the app restarted on the previous files; also after a power cut mid-check.
        for version, fault in (("4.0.0", None), ("5.0.0", "health-checking:before")):
            bad = live_server.publish(_greeting(tmp_path, version, "broken"))
            if fault:
                assert run_once(state, tmp_path, fault=fault) == -signal.SIGKILL
            assert run_once(state, tmp_path) == 0
            app = agent_status(state)["components"]["greeting"]
            assert (app["state"], app["release"]) == ("rolled-back", "greeting@3.0.0"), app
            assert "app hello: " in app["last_error"] and "answered 500" in app["last_error"]
            assert (current / "version.txt").read_text() == "cfg3\n"
            assert answer() == "cfg3\n"
            with live_server.client() as c:
                device = server_device(live_server, state)
                rows = {r["component"]: r for r in c.device_components(device["id"])}
                events = [e for e in c.events(device_id=device["id"])
                          if e["release_id"] == bad["id"] and e["state"] == "rolled-back"]
            assert rows["greeting"]["state"] == "rolled-back" and len(events) == 1

        # Files that fail the manifest's own check never become current: the app is not
        # even restarted, and the release is never tried again.
        running = _container_id(state, "edgewise-hello")
        invalid = live_server.publish(_greeting(tmp_path, "6.0.0", "invalid"))
        assert run_once(state, tmp_path) == 0
        app = agent_status(state)["components"]["greeting"]
        assert (app["state"], app["release"]) == ("failed", "greeting@3.0.0"), app
        assert "greeting@6.0.0 is invalid: its check" in app["last_error"]
        assert (current / "version.txt").read_text() == "cfg3\n"
        assert _container_id(state, "edgewise-hello") == running and answer() == "cfg3\n"
        with live_server.client() as c:
            failed = [e for e in c.events(device_id=device["id"])
                      if e["release_id"] == invalid["id"] and e["state"] == "failed"]
        assert len(failed) == 1 and failed[0]["detail"]["will_retry"] is False

        # The app cannot go while the config that depends on it stays.
        with live_server.client() as c:
            c.unassign_component(device["id"], "hello")
        assert run_once(state, tmp_path) == 0
        app = agent_status(state)["components"]["hello"]
        assert "hello@1.0.0 stays: greeting@3.0.0 needs hello >=1" in app["last_error"], app
        assert answer() == "cfg3\n"

        # Removing the config too: its files go (the app restarts without them), then, in
        # the same cycle, nothing depends on the app any more, and its container, images and
        # slots go. The model is untouched throughout.
        with live_server.client() as c:
            c.unassign_component(device["id"], "greeting")
        assert run_once(state, tmp_path) == 0
        status = agent_status(state)
        assert status["components"] == {} and status["release"] == "tiny@1.0.0", status
        assert not current.exists() and not (state / "config" / "greeting").exists()
        for name in ("greeting", "hello"):
            assert not (state / "slots" / "components" / name).exists()
        with pytest.raises(httpx.HTTPError):
            answer(wait_s=0)
        store = PodmanStore(state / "containers")
        images = subprocess.run(["podman", *store.podman_args(), "images", "--format",
                                 "{{.Repository}}"], capture_output=True, text=True,
                                check=True, env={**os.environ, **store.env()}).stdout
        assert "edgewise/hello" not in images, images
        with live_server.client() as c:
            assert c.device_components(device["id"]) == []
            removed = [e for e in c.events(device_id=device["id"]) if e["kind"] == "removed"]
        assert sorted(e["message"].split(":")[0] for e in removed) == [
            "removed greeting@3.0.0", "removed hello@1.0.0"]
        assert model.predict(_png())[1]["release_id"] == tiny1["id"]
        assert cfg1["name"] == "greeting"
    finally:
        reset_store(state / "containers")
        reset_store(storage)


def test_the_fleet_and_release_pages_count_devices_per_component_release(api) -> None:
    """Devices run an app and config files beside their model: the summary API, the fleet
    page and each release's page count them per release, whatever its component."""
    import re

    from edgewise.server.devices.models import Device, DeviceComponent
    from edgewise.server.releases.models import Release
    from tests.test_checkin import enroll

    ids = [enroll(api)[0] for _ in range(3)]
    with api.app.state.ctx.sessions() as session:
        for rid, name, kind in (("rel-m1", "tiny", "image-classifier"), ("rel-a1", "hello", "app"),
                                ("rel-c1", "site", "config")):
            session.add(Release(id=rid, name=name, version="1.0.0",
                                manifest_target=f"{name}/1.0.0/edgewise.json",
                                targets_version=1, size_bytes=1, manifest={"kind": kind}))
        session.flush()
        for device_id in ids:
            session.get(Device, device_id).release_id = "rel-m1"
        for device_id, component, running, assigned, state in (
                (ids[0], "hello", "rel-a1", "rel-a1", "committed"),
                (ids[1], "hello", "rel-a1", "rel-a1", "committed"),
                (ids[2], "hello", None, "rel-a1", "downloading"),
                (ids[0], "site", "rel-c1", None, "rolled-back")):
            session.add(DeviceComponent(device_id=device_id, component=component,
                                        release_id=running, assigned_release_id=assigned,
                                        state=state))
        session.commit()

    summary = api.get("/api/v1/devices-summary", headers=AUTH).json()
    assert summary["by_release"] == {"rel-m1": 3}
    assert summary["by_component_release"] == {"rel-a1": 2, "rel-c1": 1}
    assert summary["by_component_state"] == {"hello": {"committed": 2, "downloading": 1},
                                             "site": {"rolled-back": 1}}

    api.cookies.set("edgewise_token", ADMIN)
    page = api.get("/dashboard/").text
    table = page.split('data-testid="by-release"', 1)[1].split("</table>", 1)[0]
    counts = dict(re.findall(r'<td>([^<]+)</td><td class="num">(\d+)</td>', table))
    assert counts == {"tiny@1.0.0": "3", "hello@1.0.0": "2", "site@1.0.0": "1"}
    tables = re.findall(r'data-testid="by-component-state" data-component="([^"]+)">(.*?)'
                        r'</table>', page, re.S)
    assert [(component, re.findall(r'>([a-z-]+)</span></td><td class="num">(\d+)</td>', rows))
            for component, rows in tables] == [
        ("hello", [("committed", "2"), ("downloading", "1")]), ("site", [("rolled-back", "1")])]
    releases = page.split('data-testid="releases"', 1)[1].split("</table>", 1)[0]
    running = dict(re.findall(r'>([a-z]+)@1\.0\.0</a>.*?<td class="num">(\d+)</td></tr>',
                              releases, re.S))
    assert running == {"tiny": "3", "hello": "2", "site": "1"}
    app_page = api.get("/dashboard/releases/rel-a1").text
    assert "2 running, 3 assigned (as their app component hello)" in app_page
    assert "1 running, 0 assigned (as their config component site)" in api.get(
        "/dashboard/releases/rel-c1").text
    assert "3 running, 0 assigned</dd>" in api.get("/dashboard/releases/rel-m1").text


@pytest.mark.slow  # 7 s on a quiet machine, 45 s at load 10
def test_config_files_without_an_app_and_a_removal_cut_short_finishes(
        live_server, enroll_agent, tiny_bundle, tmp_path: Path) -> None:
    """No containers: files no app reads are checked, made current and committed; removing
    them is finished by the next cycle whatever a power cut left on disk (the record, the
    link, the slots: each removal step is idempotent and the record goes last)."""
    state = enroll_agent("plain")
    current = state / "config" / "site" / "current"
    device = server_device(live_server, state)
    for left_on_disk in ("link and slots", "slots only", "nothing"):
        src = _files(tmp_path / f"site-{len(left_on_disk)}", site_toml='mode = "fast"\n')
        version = f"1.0.{len(left_on_disk)}"
        write_config_bundle(tmp_path / f"site-{version}", src, name="site", version=version)
        live_server.publish(tmp_path / f"site-{version}")
        assert run_once(state, tmp_path) == 0
        status = agent_status(state)["components"]["site"]
        assert (status["state"], status["release"]) == ("committed", f"site@{version}"), status
        assert status["last_health"]["reason"] == "ok"
        assert (current / "site.toml").read_text() == 'mode = "fast"\n'

        # Through the CLI: what the device has, then the removal.
        env = {"EDGEWISE_SERVER": live_server.url, "EDGEWISE_TOKEN": live_server.admin_token,
               "EDGEWISE_CA": str(live_server.ca)}
        listed = CliRunner().invoke(cli, ["devices", "components", device["id"], "--json"],
                                    env=env)
        assert listed.exit_code == 0, listed.output
        assert [(r["component"], r["state"]) for r in json.loads(listed.output)] == [
            ("site", "committed")]
        result = CliRunner().invoke(cli, ["devices", "remove-component", device["id"], "site"],
                                    env=env)
        assert result.exit_code == 0 and "the device removes it" in result.output, \
            result.output
        # What a power cut part way through the removal leaves (the record always stays).
        if left_on_disk != "link and slots":
            current.unlink()
        if left_on_disk == "nothing":
            import shutil

            shutil.rmtree(state / "slots" / "components" / "site")
        assert run_once(state, tmp_path) == 0
        assert agent_status(state)["components"] == {}, left_on_disk
        assert not (state / "config" / "site").exists()
        assert not (state / "slots" / "components" / "site").exists()
        with live_server.client() as c:
            assert c.device_components(device["id"]) == [], left_on_disk
            removed = [e for e in c.events(device_id=device["id"]) if e["kind"] == "removed"]
        last = max(removed, key=lambda e: e["id"])
        assert last["message"] == f"removed site@{version}: no longer assigned", last

    # A name keeps its kind: config files named like a model are refused at publish.
    live_server.publish(tiny_bundle("1.0.0"), assign=False)
    write_config_bundle(tmp_path / "tiny-cfg", _files(tmp_path / "tiny-src", a_json="{}"),
                        name="tiny", version="2.0.0")
    with pytest.raises(ServerApiError, match=r"tiny@2.0.0 is of kind config, and "
                       r"tiny@1.0.0 of kind image-classifier: a name keeps its kind"):
        live_server.publish(tmp_path / "tiny-cfg")


# (v2 kind, state to cut power in, when, expected final state, files current at the end)
CUTS = [
    (kind, state, when, final, text)
    for kind, states, final, text in [
        ("good", ["downloading", "verifying", "installing", "activating", "health-checking"],
         "committed", "two"),
        ("invalid", ["downloading", "verifying", "installing"], "failed", "one"),
    ]
    for state in states
    for when in ("before", "after")
]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "state", "when", "final", "text"), CUTS,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CUTS])
def test_power_cut_in_every_state_of_a_config_update(live_server, enroll_agent,
                                                      tmp_path: Path, kind: str, state: str,
                                                      when: str, final: str,
                                                      text: str) -> None:
    """SIGKILL the agent in every state of a config update (files no app reads; one whose
    check fails), before and after the state's side effect: while it is down the current
    files are the old or the new ones, whole, and the restarted agent finishes."""
    agent = enroll_agent("crashy-config")
    current = agent / "config" / "site" / "current"

    def publish(version: str, value: str) -> None:
        src = _files(tmp_path / f"src-{version}", site_json=json.dumps({"mode": value}))
        write_config_bundle(tmp_path / f"site-{version}", src, name="site", version=version,
                            check={"command": ["sh", "-c", "! grep -q invalid site.json"]})
        live_server.publish(tmp_path / f"site-{version}")

    publish("1.0.0", "one")
    assert run_once(agent, tmp_path) == 0
    publish("2.0.0", "two" if kind == "good" else "invalid")
    assert run_once(agent, tmp_path, fault=f"{state}:{when}") == -signal.SIGKILL
    saved = json.loads((agent / "state.json").read_text())["components"]["site"]["state"]
    assert saved == state if when == "before" else saved in (state, final)
    live = json.loads((current / "site.json").read_text())["mode"]
    assert live == "one" or (live == "two" and state in ("activating", "health-checking"))

    assert run_once(agent, tmp_path) == 0
    status = agent_status(agent)["components"]["site"]
    expected = "site@2.0.0" if final == "committed" else "site@1.0.0"
    assert (status["state"], status["release"]) == (final, expected), status
    assert json.loads((current / "site.json").read_text()) == {"mode": text}
    if final == "failed":
        assert "site@2.0.0 is invalid: its check" in status["last_error"]

"""The dashboard: its chart arithmetic, then a real server, real agents and a real Chromium.

The browser test drives what an operator does (sign in, read the fleet, pause and resume a
rollout) and what a viewer must not be able to do, and writes screenshots for people to look
at: under the test's tmp_path and in docs/screenshots/ for the README.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

from edgewise.server.dashboard._chart import Marker, Point, chart, progress_series
from edgewise.sim import AgentProcess
from tests.conftest import device_auth

CHROMIUM = Path("/usr/bin/chromium")
DOCS_SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
T0 = datetime(2026, 1, 1, 12, 0, 0)
# The tiny test model infers in ~0.01 ms: on a busy machine its latency ratio is noise, and
# this test is about the dashboard, not about the health gates (test_rollouts covers those).
RELAXED = {"max_latency_ratio": None, "max_memory_ratio": None}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# -- the chart, without a browser ---------------------------------------------------------


def test_progress_counts_each_device_once_by_its_latest_outcome() -> None:
    points = progress_series(
        start=T0,
        assigned=[(at(1), "a"), (at(5), "b"), (at(5), "c")],
        outcomes=[(at(3), "a", "committed"), (at(8), "b", "rolled-back"),
                  (at(9), "c", "failed"), (at(12), "c", "committed")])
    assert points[0] == Point(T0, 0, 0, 0)
    assert [(p.assigned, p.committed, p.failed) for p in points] == [
        (0, 0, 0), (1, 0, 0), (1, 1, 0), (2, 1, 0), (3, 1, 0), (3, 1, 1), (3, 1, 2), (3, 2, 1)]
    # An outcome at the same instant as its assignment comes after it.
    same = progress_series(start=T0, assigned=[(at(2), "a")], outcomes=[(at(2), "a", "committed")])
    assert [(p.assigned, p.committed) for p in same] == [(0, 0), (1, 0), (1, 1)]


def test_chart_lays_out_steps_markers_and_ticks_inside_the_plot() -> None:
    points = progress_series(start=T0, assigned=[(at(0), "a"), (at(50), "b")],
                             outcomes=[(at(20), "a", "committed"), (at(80), "b", "committed")])
    c = chart(points, [Marker(at(40), "broad", "stage")], total=2, end=at(100))
    left, top, right, bottom = c.plot
    committed = [tuple(map(float, xy.split(","))) for xy in c.lines["committed"].split()]
    # Starts at zero on the left, ends at the top (2 of 2) on the right, never decreases.
    assert committed[0] == (left, bottom) and committed[-1] == (right, top)
    ys = [y for _, y in committed]
    assert ys == sorted(ys, reverse=True)
    # Steps: every change is drawn across then up (consecutive points share x or y).
    for (x1, y1), (x2, y2) in zip(committed, committed[1:], strict=False):
        assert x1 == x2 or y1 == y2
    (x, label, kind), = c.markers
    assert label == "broad" and kind == "stage" and x == pytest.approx(left + 0.4 * (right - left),
                                                                       abs=0.1)
    assert [v for _, v in c.y_ticks] == [0, 1, 2]
    assert c.x_ticks[0][1] == "12:00:00" and c.x_ticks[-1][1] == "12:01:40"
    assert not c.empty


def test_the_chart_data_table_stays_small_however_many_devices_changed() -> None:
    # 30,000 devices, each committed at its own moment over an hour: the table keeps the
    # last point of each unit across, so a rollout page of 100,000 devices renders quickly.
    n = 30_000
    points = progress_series(start=T0, assigned_counts=[(at(0), n)],
                             outcomes=[(at(i * 3600 / n), f"d{i}", "committed")
                                       for i in range(n)])
    c = chart(points, [], total=n, end=at(3600))
    assert len(c.points) <= c.width + 1
    assert c.points[0] == points[0] and c.points[-1] == points[-1]
    assert [p.ts for p in c.points] == sorted(p.ts for p in c.points)
    assert c.points[-1].committed == n


def test_chart_of_a_rollout_that_has_not_started_is_empty_but_drawable() -> None:
    c = chart(progress_series(start=T0, assigned=[], outcomes=[]), [], total=0, end=T0)
    left, top, right, bottom = c.plot
    assert c.empty and c.markers == []
    assert c.lines["committed"] == f"{left},{bottom} {left},{bottom}"
    assert [v for _, v in c.y_ticks] == [0, 1]


# -- the dashboard in a real browser ------------------------------------------------------


def wait_for(predicate: Callable[[], object], what: str, timeout_s: float = 120) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def with_metrics(bundle: Path) -> Path:
    """Record training metrics and provenance in an (unsigned, unpublished) tiny bundle."""
    manifest_path = bundle / "edgewise.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["metrics"] = {"accuracy": 0.9132, "macro_f1": 0.9087, "params": 48,
                           "per_class_accuracy": {"zero": 0.94, "one": 0.9, "two": 0.9}}
    manifest["provenance"] = {"dataset": "tiny-synthetic", "recipe": "int8-dynamic",
                              "git": "0123abc"}
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return bundle


def ca_of(live_server) -> str | bool:
    ca = getattr(live_server, "ca", None)  # the server runs TLS with a throwaway test CA
    return str(ca) if ca else True


def identity(state: Path) -> dict:
    return json.loads((state / "identity.json").read_text())


@pytest.fixture
def fleet(live_server, enroll_agent, tmp_path: Path):
    """Three agent daemons on v1 in group `lab`; v2 rolled out through three stages."""
    from tests.conftest import make_tiny_bundle

    zones = ("Europe/Berlin", "America/New_York", "Asia/Tokyo")
    states = [enroll_agent(f"cam-{i}", tags=["site=lab", f"floor={i}"], timezone=zone)
              for i, zone in enumerate(zones)]
    procs = [AgentProcess(state_dir=s, poll_interval_s=0.5, log_path=tmp_path / f"{s.name}.log")
             .start() for s in states]
    try:
        v1 = live_server.publish(make_tiny_bundle(tmp_path / "v1"))
        with live_server.client() as c:
            wait_for(lambda: all(d["release_id"] == v1["id"] for d in c.devices()), "v1")
            # Markup in data must reach the page as text.
            c.request("PATCH", f"/api/v1/devices/{identity(states[0])['device_id']}",
                      json={"tags": ["site=lab", "floor=0", '<img class="xss" src="x">']})
            c.request("POST", "/api/v1/groups", json={"name": "lab", "kind": "dynamic",
                                                      "selector": ["site=lab"]})
            v2 = live_server.publish(
                with_metrics(make_tiny_bundle(tmp_path / "v2", version="2.0.0")), assign=False)
            done = c.request("POST", "/api/v1/rollouts", json={
                "release_id": v2["id"], "group": "lab", "stages": "canary:1,pilot:2,broad:100%",
                "min_soak_s": 1, "gates": RELAXED}).json()

            def finished() -> bool:
                r = c.request("GET", f"/api/v1/rollouts/{done['id']}").json()
                assert r["status"] in ("active", "completed"), (r["status"], r["reason"])
                return r["status"] == "completed"

            wait_for(finished, "rollout of v2")
        for state, body in ((states[0], {"rating": 4, "comment": "fast and <b>right</b>"}),
                            (states[1], {"rating": 2, "predicted": "one", "correct": "two"})):
            r = httpx.post(f"{live_server.url}/api/v1/device/feedback",
                           auth=device_auth(state)[1],
                           json={"release_id": v2["id"], **body}, verify=ca_of(live_server))
            assert r.status_code == 204, r.text
        yield {"states": states, "v1": v1, "v2": v2, "done": done}
    finally:
        for p in procs:
            p.stop()


@pytest.fixture
def browser():
    if not CHROMIUM.exists() and not os.environ.get("CI"):
        pytest.skip("Debian's /usr/bin/chromium is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            yield b
        finally:
            b.close()


@pytest.mark.slow
def test_dashboard_in_chromium(live_server, fleet, browser, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    from tests.conftest import make_tiny_bundle

    shots = tmp_path / "screenshots"
    shots.mkdir()
    base = f"{live_server.url}/dashboard"

    def shoot(page, name: str) -> None:
        page.screenshot(path=str(shots / f"{name}.png"), full_page=True)

    # A second rollout that holds at its canary for an hour: the one the buttons act on.
    v3 = live_server.publish(make_tiny_bundle(tmp_path / "v3", version="3.0.0"), assign=False)
    with live_server.client() as c:
        held = c.request("POST", "/api/v1/rollouts", json={
            "release_id": v3["id"], "group": "lab", "stages": "canary:1,broad:100%",
            "min_soak_s": 3600, "gates": RELAXED}).json()
        rid = held["id"]

        wait_for(lambda: c.request("GET", f"/api/v1/rollouts/{rid}").json()["progress"][
            "committed"] == 1, "canary commit")
        viewer = c.request("POST", "/api/v1/tokens",
                           json={"name": "vera", "role": "viewer"}).json()["token"]
        operator = c.request("POST", "/api/v1/tokens",
                             json={"name": "otto", "role": "operator"}).json()["token"]

    def api_status() -> str:
        with live_server.client() as c:
            return c.request("GET", f"/api/v1/rollouts/{rid}").json()["status"]

    # The throwaway test CA is not in Chromium's trust store.
    context = browser.new_context(viewport={"width": 1280, "height": 900},
                                  ignore_https_errors=base.startswith("https"))
    page = context.new_page()

    def sign_in(token: str) -> None:
        page.goto(f"{base}/login")
        page.fill("#token", token)
        page.click("button[type=submit]")

    # Signed out: every page leads to the login form; a wrong token is refused.
    page.goto(f"{base}/")
    assert page.url == f"{base}/login"
    sign_in("not-a-token-at-all")
    expect(page.get_by_test_id("error")).to_contain_text("not valid")
    shoot(page, "login")

    # -- viewer: reads everything, can act on nothing -----------------------------------
    sign_in(viewer)
    assert page.url == f"{base}/"
    expect(page.get_by_test_id("role")).to_have_text("viewer")
    cookie, = (k for k in context.cookies() if k["name"] == "edgewise_token")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/dashboard"
    assert cookie["secure"] == base.startswith("https")
    assert viewer not in page.content()  # the session token is never rendered

    devices = page.get_by_test_id("devices").locator("tbody tr")
    expect(devices).to_have_count(3)
    for name in ("cam-0", "cam-1", "cam-2", "Asia/Tokyo"):
        expect(page.get_by_test_id("devices")).to_contain_text(name)
    expect(page.get_by_test_id("devices")).to_contain_text('<img class="xss" src="x">')
    assert page.locator("img.xss").count() == 0
    expect(page.get_by_test_id("by-release")).to_contain_text("tiny@3.0.0")
    expect(page.locator(".rollout-mini")).to_have_count(1)
    shoot(page, "fleet-overview")

    page.goto(f"{base}/rollouts/{rid}")
    buttons = page.get_by_test_id("actions").locator("button")
    expect(buttons).to_have_count(4)
    for i in range(4):
        expect(buttons.nth(i)).to_be_disabled()
    shoot(page, "rollout-viewer")
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    assert csrf
    forced = page.request.post(f"{base}/rollouts/{rid}/pause", form={"csrf": csrf},
                               max_redirects=0)
    assert forced.status == 403 and "operator" in forced.text()
    assert api_status() == "active"

    page.click("text=Sign out")
    assert page.url == f"{base}/login"
    page.goto(f"{base}/rollouts/{rid}")
    assert page.url == f"{base}/login"

    # -- operator: pauses and resumes with the buttons ----------------------------------
    sign_in(operator)
    expect(page.get_by_test_id("role")).to_have_text("operator")
    page.goto(f"{base}/rollouts/{rid}")
    expect(page.locator("button.act-pause")).to_be_enabled()
    expect(page.locator("button.act-resume")).to_be_disabled()
    no_csrf = page.request.post(f"{base}/rollouts/{rid}/pause", form={"csrf": "forged"},
                                max_redirects=0)
    assert no_csrf.status == 403 and "CSRF" in no_csrf.text()
    assert api_status() == "active"

    page.click("button.act-pause")
    expect(page.get_by_test_id("status")).to_have_text("paused")
    assert api_status() == "paused"
    expect(page.get_by_test_id("reason")).to_have_text("pause by otto")
    expect(page.locator("button.act-resume")).to_be_enabled()
    expect(page.locator("svg[data-testid=chart] g.marker-pause")).to_have_count(1)
    shoot(page, "rollout-paused")
    page.click("button.act-resume")
    expect(page.get_by_test_id("status")).to_have_text("active")
    assert api_status() == "active"

    # The finished rollout: its chart climbs to 3 committed across two stage boundaries.
    page.goto(f"{base}/rollouts/{fleet['done']['id']}")
    expect(page.get_by_test_id("status")).to_have_text("completed")
    chart_svg = page.get_by_test_id("chart")
    expect(chart_svg.locator("g.marker-stage")).to_have_count(2)
    expect(chart_svg.locator("g.marker-stage text")).to_have_text(["pilot", "broad"])
    points = chart_svg.locator("polyline.series-committed").get_attribute("points").split()
    ys = [float(p.split(",")[1]) for p in points]
    assert len(points) >= 6 and ys[0] > ys[-1]  # climbs from the axis
    last = page.locator("details table tr").last.locator("td")
    expect(last.nth(2)).to_have_text("3")  # committed
    expect(page.get_by_test_id("progress")).to_contain_text("3")
    shoot(page, "rollout-completed")

    # A device: details and its event history, newest first.
    cam0 = identity(fleet["states"][0])["device_id"]
    page.goto(f"{base}/")
    page.get_by_test_id("devices").get_by_role("link", name="cam-0", exact=True).click()
    assert page.url == f"{base}/devices/{cam0}"
    expect(page.get_by_test_id("device-details")).to_contain_text("Europe/Berlin")
    expect(page.get_by_test_id("device-details")).to_contain_text("lab")
    history = page.get_by_test_id("device-events")
    expect(history).to_contain_text("committed")
    expect(history).to_contain_text("tiny@2.0.0")
    for version in ("1.0.0", "2.0.0"):  # v3 only if cam-0 happens to be its canary
        expect(page.get_by_test_id("device-results")).to_contain_text(f"tiny@{version}")
    shoot(page, "device")

    # A release: manifest, install results with model health, feedback.
    page.goto(f"{base}/releases/{fleet['v2']['id']}")
    expect(page.get_by_test_id("labels").locator(".tag")).to_have_text(["zero", "one", "two"])
    expect(page.get_by_test_id("metrics")).to_contain_text("accuracy")
    expect(page.get_by_test_id("metrics")).to_contain_text("0.9132")
    results = page.get_by_test_id("install-results").locator("tbody tr")
    expect(results).to_have_count(3)
    expect(results.first).to_contain_text("committed")
    assert re.search(r"\d", results.first.locator("td").nth(2).inner_text())  # top-1 agreement
    expect(page.get_by_test_id("feedback")).to_contain_text("3")  # mean rating of 4 and 2
    expect(page.locator("section", has_text="Feedback")).to_contain_text("one -> two")
    expect(page.locator("ul.comments")).to_contain_text("fast and <b>right</b>")
    shoot(page, "release")

    # Unknown things are an HTML 404, not a stack trace.
    missing = page.goto(f"{base}/devices/nope")
    assert missing is not None and missing.status == 404
    context.close()

    names = sorted(p.name for p in shots.iterdir())
    assert names == ["device.png", "fleet-overview.png", "login.png", "release.png",
                     "rollout-completed.png", "rollout-paused.png", "rollout-viewer.png"]
    DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for shot in shots.iterdir():
        assert shot.stat().st_size > 10_000, f"{shot.name} looks blank"
        shutil.copy2(shot, DOCS_SCREENSHOTS / shot.name)

"""A rollout tick over thousands of devices works in bulk, on SQLite and PostgreSQL: a stage's
assignments, the members' results and the transfer totals take a few statements however many
devices there are (a tick per device cost 17 s of one replica for a 10,000-device stage), and
they say exactly what the per-device rules say."""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import event, insert, select

from edgewise.server.devices.models import Device, DeviceComponent, InstallResult
from edgewise.server.events.models import Event
from edgewise.server.groups.models import Group
from edgewise.server.groups.service import is_member, member_ids
from edgewise.server.releases.models import Release
from edgewise.server.rollouts import service as rollouts
from edgewise.server.rollouts.engine import Action
from edgewise.server.rollouts.models import Rollout, RolloutDevice
from tests._postgres import pg_bin_dir, throwaway_postgres
from tests.conftest import ADMIN

N = 3000


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path: Path, keys):
    from fastapi.testclient import TestClient

    from edgewise.server.app import ServerConfig, create_app

    @contextmanager
    def database():
        if request.param == "sqlite":
            yield None
        elif pg_bin_dir() is None and not os.environ.get("CI"):
            pytest.skip("PostgreSQL binaries not installed")
        else:
            with throwaway_postgres() as url:
                yield url

    with database() as url:
        app = create_app(ServerConfig(data_dir=tmp_path / "srv", root_path=keys.root_json,
                                      online_key_path=keys.online_key, admin_token=ADMIN,
                                      db_url=url, rollout_tick_s=3600))
        with TestClient(app):
            yield app.state.ctx.sessions


def _fleet(session, *, n: int = N, component: str | None = None) -> datetime:
    """n devices, every one tagged "x" except each 10th; each 7th already runs the new
    release; a rollout of rel-new (model, or `component`) to the "x" devices."""
    now = datetime.utcnow()
    manifests = {"rel-old": {}, "rel-new": {}}
    if component:
        manifests = {r: {"kind": "app"} for r in manifests}
    for rid, manifest in manifests.items():
        session.add(Release(id=rid, name=component or "m", version=rid,
                            manifest_target=f"m/{rid}/e", targets_version=1, size_bytes=1,
                            manifest=manifest))
    session.flush()
    running = ["rel-new" if i % 7 == 0 else "rel-old" for i in range(n)]
    session.execute(insert(Device), [dict(
        id=f"dev-{i:06d}", name=f"d{i}", hardware="generic", public_key=None,
        state="committed", status={}, timezone="UTC", enrolled_at=now, last_seen_at=now,
        tags=None if i % 10 == 0 and i % 20 else ["x", f"site={i % 3}"] if i % 10 else ["y"],
        release_id=None if component else running[i]) for i in range(n)])
    if component:  # every 11th device has no row for the app yet
        session.execute(insert(DeviceComponent), [dict(
            device_id=f"dev-{i:06d}", component=component, state="committed",
            release_id=running[i], assigned_release_id=running[i], updated_at=now)
            for i in range(n) if i % 11])
    session.add(Group(name="all-x", kind="dynamic", selector=["x"], window=None))
    session.flush()
    session.add(Rollout(id="ro-bulk", release_id="rel-new", group_name="all-x",
                        status="active", stage_index=0, stage_started_at=now,
                        stages=[{"name": "canary", "count": 50},
                                {"name": "broad", "percent": 100.0}]))
    session.commit()
    return now


class Statements:
    def __init__(self, session) -> None:
        self.engine = session.get_bind()
        self.count = 0

    def __enter__(self):
        event.listen(self.engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *exc) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)

    def _seen(self, *args) -> None:
        self.count += 1


@pytest.mark.parametrize("component", [None, "viewer"])
def test_a_stage_is_assigned_in_bulk_as_the_per_device_rules_say(sessions, component) -> None:
    with sessions() as session:
        _fleet(session, component=component)
        members = [d.id for d in session.scalars(select(Device).order_by(Device.id))
                   if is_member(session, group=session.get(Group, "all-x"), device=d)]
        assert member_ids(session, group=session.get(Group, "all-x")) == members
        assert len(members) == N - N // 10

        rollout = session.get(Rollout, "ro-bulk")
        assert rollouts.tick(session, rollout) is Action.WAIT  # canary: 50 assigned
        rollout.stage_index = 1  # as an advance does
        session.commit()
        with Statements(session) as seen:
            assert rollouts.tick(session, rollout) is Action.WAIT
        assert seen.count < 40, f"{seen.count} statements for a stage of {len(members)}"

    with sessions() as session:
        rows = {r.device_id: r for r in session.scalars(select(RolloutDevice))}
        assert sorted(rows) == members
        assert sorted(r.position for r in rows.values()) == list(range(len(members)))
        assigned_events = {e.device_id for e in session.scalars(
            select(Event).where(Event.kind == "assigned", Event.rollout_id == "ro-bulk"))}
        assert assigned_events == set(members)
        for device_id in members:
            i = int(device_id.split("-")[1])
            has_row = component is None or i % 11 != 0
            was = ("rel-new" if i % 7 == 0 else "rel-old") if has_row else None
            row = rows[device_id]
            assert row.assigned_at is not None and row.previous_release_id == was, device_id
            if component is None:  # a device already running it keeps its assignment
                assert session.get(Device, device_id).assigned_release_id == (
                    None if was == "rel-new" else "rel-new"), device_id
            else:
                app = session.get(DeviceComponent, (device_id, component))
                assert app.assigned_release_id == "rel-new" and app.state == (
                    "committed" if has_row else "idle"), device_id
        outsider = session.get(Device, "dev-000010")  # tags None: not in the group
        assert outsider.assigned_release_id is None and "dev-000010" not in rows


def test_the_tick_reads_outcomes_and_health_as_the_engine_expects(sessions) -> None:
    with sessions() as session:
        now = _fleet(session, n=400)
        rollout = session.get(Rollout, "ro-bulk")
        rollout.stage_index = 1
        session.commit()
        rollouts.tick(session, rollout)
        # The last member ran the old release before (not one of those already on the new).
        members = sorted((r.device_id for r in session.scalars(select(RolloutDevice))),
                         key=lambda d: int(d.split("-")[1]) % 7 != 0)
        later = now + timedelta(minutes=5)
        session.execute(insert(InstallResult), [dict(
            device_id=d, release_id="rel-new", outcome="committed", finished_at=later,
            health={"top1_agreement": 0.5 if d == members[-1] else 1.0, "p95_latency_ms": 3.25,
                    "memory_mb": 12, "per_class": {"a": [1, 2]}})
            for d in members])
        session.commit()
        known = rollouts._Known(session, "rel-new", rollouts._sync_members(session, rollout))
        last = known.results[(members[-1], "rel-new")]
        assert (last.top1_agreement, last.p95_latency_ms, last.memory_mb) == (0.5, 3.25, 12)
        # One device agreed on half its golden set: the default gate (100%) aborts.
        assert rollouts.tick(session, rollout) is Action.ABORT


def test_transfer_totals_are_summed_in_sql(sessions) -> None:
    big = 5 * 2**31  # an LLM's bytes: beyond a 32-bit integer
    with sessions() as session:
        _fleet(session, n=300)
        rollout = session.get(Rollout, "ro-bulk")
        rollout.stage_index = 1
        session.commit()
        rollouts.tick(session, rollout)
        members = [r.device_id for r in session.scalars(select(RolloutDevice))]
        details = [{"download": {"sent_bytes": big + k, "full_bytes": 2 * big,
                                 "delta_files": k % 2, "delta_fallbacks": int(k == 3),
                                 "reused_files": 1}} for k in range(len(members))]
        details[5] = {}  # an older agent says nothing about the download
        session.execute(insert(Event), [dict(
            kind="downloaded", device_id=d, release_id="rel-new", detail=detail,
            message="") for d, detail in zip(members, details, strict=True)] + [dict(
                kind="downloaded", device_id="dev-000010", release_id="rel-new",  # not in it
                detail={"download": {"sent_bytes": 1}}, message="")])
        session.commit()
        got = rollouts.transfer(session, rollout)
    stats = [d.get("download", {}) for d in details]
    assert got == {"downloads": len(members),
                   "bytes_sent": sum(s.get("sent_bytes", 0) for s in stats),
                   "bytes_full": sum(s.get("full_bytes", 0) for s in stats),
                   "delta_files": sum(s.get("delta_files", 0) for s in stats),
                   "delta_fallbacks": 1, "reused_files": len(members) - 1}


def test_a_tick_with_nothing_new_skips_reading_the_members_results(sessions, monkeypatch) -> None:
    reads = []
    known = rollouts._Known
    monkeypatch.setattr(rollouts, "_Known", lambda *a: reads.append(1) or known(*a))
    with sessions() as session:
        now = _fleet(session, n=200)
        rollout = session.get(Rollout, "ro-bulk")
        rollout.stage_index = 1
        session.commit()

        def tick(after_s: float) -> Action:
            return rollouts.tick(session, rollout, now=now + timedelta(seconds=after_s))

        assert tick(0) is Action.WAIT and tick(1) is Action.WAIT
        assert len(reads) == 1  # the second tick: same inputs, same decision, nothing read
        members = [r.device_id for r in session.scalars(select(RolloutDevice))]
        session.execute(insert(InstallResult), [dict(
            device_id=d, release_id="rel-new", outcome="committed",
            finished_at=now + timedelta(seconds=2), health={}) for d in members[1:]])
        session.commit()
        assert tick(3) is Action.WAIT and len(reads) == 2  # reports: read again
        assert tick(4) is Action.WAIT and len(reads) == 2
        # What no count shows (a health rewritten in place, no newer time) is read again
        # once RECHECK_AFTER passed.
        updated = next(r.device_id for r in session.scalars(select(RolloutDevice))
                       if r.previous_release_id == "rel-old" and r.device_id != members[0])
        session.get(InstallResult, (updated, "rel-new")).health = {"top1_agreement": 0.1}
        session.commit()
        assert tick(5) is Action.WAIT and len(reads) == 2
        assert tick(3 + rollouts.RECHECK_AFTER.total_seconds()) is Action.ABORT
        assert len(reads) == 3


def test_the_background_tick_decides_on_its_lease_connection(sessions, caplog) -> None:
    """As the server's rollout loop calls it: on PostgreSQL the session is bound to the
    connection that holds the advisory lock, not to the engine."""
    from edgewise.server._schema import exclusive

    with sessions() as session:
        _fleet(session, n=120)
    for _ in range(3):  # assign, decide, then the unchanged tick
        with exclusive(sessions.kw["bind"], "rollout-tick") as lease:
            assert lease
            with lease.session(sessions) as session:
                rollouts.tick_all(session)
    assert "tick failed" not in caplog.text
    with sessions() as session:
        assigned = session.scalars(select(RolloutDevice).where(
            RolloutDevice.assigned_at.is_not(None))).all()
        assert len(assigned) == 50 and session.get(Rollout, "ro-bulk").status == "active"

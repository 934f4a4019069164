"""The agent driver: runs handlers, applies the transition table, persists, reports.

Invariant: the record (state + data) is persisted atomically *before* the handler of a state
runs, and each handler is idempotent, so a power cut anywhere leaves the device on its old
or its new release, and a restarted agent resumes from `resume_state(saved)`.

A device runs a set of components (`artifacts.component_of`): the model the agent serves,
each container app and each set of configuration files. Every component has its own record
(`AgentRecord.lanes`) and A/B slots, and goes through the one state machine; a cycle carries
each component's update to a rest state in turn, so updating one never stops another. A
release's `depends` are checked against the other components' committed releases before
anything is downloaded (`DependencyUnmet`). A component whose assignment the server cleared
is removed at rest (`_remove_component`): stopped, its slots deleted, then forgotten.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..artifacts import (
    MANIFEST_NAME,
    MODEL_COMPONENT,
    AppManifest,
    BundleError,
    ConfigManifest,
    LlmAdapterManifest,
    LlmManifest,
    Manifest,
    component_of,
    file_sha256,
    parse_manifest,
    read_manifest,
    unmet_dependencies,
    validate_bundle,
)
from ..artifacts.delta import READABLE_VERSIONS, DeltaError, apply_delta
from ..trust import (
    DELTAS_ROLE,
    DirectorClient,
    HttpxFetcher,
    TransportError,
    TrustedClient,
    VerificationError,
    check_director,
    check_terms,
)
from ..windows import in_window
from ._anomaly import flush_drift
from ._client import ServerClient
from ._configs import ConfigInvalid, ConfigRuntime
from ._containers import ContainerError, ContainerRuntime
from ._errors import (
    AgentConfigError,
    AgentTransportError,
    DependencyUnmet,
    HealthCheckFailed,
    InsufficientDisk,
    UpdateRejected,
)
from ._llm import BASE_GGUF, BASE_MANIFEST, adapter_base, device_ram_mb, llm_base
from ._machine import (
    MAX_STATE_ENTRIES,
    REST_STATES,
    WAITING_STATES,
    Event,
    State,
    next_state,
    resume_state,
)
from ._runtime import ComponentRuntime, ModelRuntime
from ._slots import SlotStore
from ._store import AgentRecord, ReleaseRef, StateDir, now_iso
from ._userinput import deferred_until, flush_feedback

if TYPE_CHECKING:
    import httpx

    from ._runtime import HealthReport

__all__ = ["Agent", "AgentConfig", "FaultPoint"]

log = logging.getLogger("edgewise.agent")

DISK_MARGIN_BYTES = 16 << 20  # left free after an install (logs, state, the next report)
# The states whose handlers start and stop a component's release.
_SWAPPING = frozenset({State.ACTIVATING, State.HEALTH_CHECKING, State.ROLLING_BACK})


@dataclass(frozen=True)
class FaultPoint:
    """Fault injection for crash tests and the simulator: SIGKILL this process when it is
    in `state`, either right after persisting it ("before" the handler acts) or right after
    the handler acted, before the outcome is persisted ("after")."""

    state: State
    when: Literal["before", "after"] = "before"

    @classmethod
    def parse(cls, spec: str) -> FaultPoint:
        state, _, when = spec.partition(":")
        if when not in ("", "before", "after"):
            raise ValueError(f"fault point {spec!r}: use STATE[:before|after]")
        return cls(State(state), when or "before")  # type: ignore[arg-type]


REPORT_BATCH = 100  # reports per request (the server takes up to 100)
REPORT_BATCH_RETRY_S = 300.0  # after a list of reports was refused (422): one at a time
MESSAGE_MAX = 2000  # characters of a report's message (the server refuses longer ones)


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    poll_interval_s: float = 30.0
    max_attempts_per_release: int = 3
    request_timeout_s: float = 15.0
    fault: FaultPoint | None = None
    drift_report_interval_s: float = 300.0  # input-drift aggregates go up at most this often
    # Reports of steps inside an update wait up to this long to go up together (rest states
    # and steps after a slow one are sent at once).
    report_batch_s: float = 1.0
    # RAM a new model may use (LLM health checks); None: what the kernel says is available.
    ram_limit_mb: float | None = None
    # Seams for the fleet simulator (edgewise.sim); None keeps the real default. The network
    # (an httpx transport), the slot backend, the health check, the device clock, and a hook
    # called where `fault` would cut power (it may raise to abandon this Agent mid-state).
    transport: httpx.BaseTransport | None = None
    slot_store: Callable[[Path], SlotStore] | None = None
    health_check: Callable[[Path], HealthReport] | None = None
    clock: Callable[[], datetime] | None = None
    fault_hook: Callable[[State, str], None] | None = None


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.paths = StateDir(config.state_dir)
        self.identity = self.paths.load_identity()
        self.slots = (config.slot_store or SlotStore)(self.paths.slots_dir)
        if self.identity.server_url.startswith("http://"):
            log.warning("talking to the server over plain HTTP (enrolled with --insecure-dev)")
        self.client = ServerClient(self.identity.server_url, device_id=self.identity.device_id,
                                   key=self.paths.device_key(),
                                   timeout_s=config.request_timeout_s,
                                   verify=self.paths.tls_verify(self.identity),
                                   transport=config.transport)
        self.record = self.paths.load_record()
        self._component_slots: dict[str, SlotStore] = {}
        # One assignment request per cycle answers every component (`run_cycle`).
        self._cycle_wanted: dict[str, ReleaseRef] | AgentTransportError | None = None
        # The component runtime seam, one backend per kind (`_runtime`).
        self.models = ModelRuntime(ram_limit_mb=config.ram_limit_mb)
        self.containers = ContainerRuntime(self.paths.root / "containers",
                                           config_root=self.paths.root / "config")
        self.configs = ConfigRuntime(self.paths.root / "config", containers=self.containers,
                                     committed_app=self._committed_app)
        self._app_checked = False
        self._lock = threading.RLock()
        self._reported_at = float("-inf")  # monotonic time of the last report sent
        # Monotonic time from which reports go up as lists again (a server answered a list
        # with 422: one from before batches, or one report in it it could not read).
        self._batch_from = float("-inf")
        self._offline = False  # the last send failed for want of the server
        self._handlers: dict[State, Callable[[AgentRecord], Event]] = {
            **{rest: self._check for rest in REST_STATES},
            State.DOWNLOADING: self._download,
            State.VERIFYING: self._verify,
            State.AWAITING_WINDOW: self._await_window,
            State.INSTALLING: self._install,
            State.ACTIVATING: self._activate,
            State.HEALTH_CHECKING: self._health_check,
            State.ROLLING_BACK: self._roll_back,
        }
        for lane in self.record.lanes():
            saved = lane.state
            if saved not in REST_STATES | WAITING_STATES:
                # We died in the middle of an update: count the re-entry (loop detection).
                resumed = resume_state(saved)
                log.warning("resuming %s after interruption in state %s -> %s",
                            lane.component, saved, resumed)
                lane.state = resumed
                lane.entries[resumed] = lane.entries.get(resumed, 0) + 1
                self._remember(lane, resumed, "resumed",
                               f"resumed after interruption in {saved}")
                self.paths.save_record(self.record)
                self._flush_reports()

    def close(self) -> None:
        self.client.close()

    # ---- driver -----------------------------------------------------------------------

    def slots_of(self, rec: AgentRecord) -> SlotStore:
        """The A/B slots of a component: the model's are `slots/` (the local API serves
        from there), each app's `slots/components/NAME/`."""
        if rec is self.record:
            return self.slots
        store = self._component_slots.get(rec.component)
        if store is None:
            store = (self.config.slot_store or SlotStore)(
                self.paths.slots_dir / "components" / rec.component)
            self._component_slots[rec.component] = store
        return store

    def step(self, lane: AgentRecord | None = None) -> tuple[State, Event, State]:
        """Run the handler of a component's current state once (the model's unless `lane`
        is given) and apply the transition."""
        with self._lock:
            rec = lane if lane is not None else self.record
            state = rec.state
            if (state not in REST_STATES | WAITING_STATES and state is not State.ROLLING_BACK
                    and rec.entries.get(state, 0) > MAX_STATE_ENTRIES):
                rec.last_error = f"state loop: entered {state} {rec.entries[state]} times"
                event = Event.ERROR
            else:
                self._maybe_fault(state, "before")
                event = self._handlers[state](rec)
                self._maybe_fault(state, "after")
            nxt = next_state(state, event)
            # Self-loops of rest and waiting states are polls; others are retries to record.
            if nxt != state or state not in REST_STATES | WAITING_STATES:
                self._transition(rec, state, event, nxt)
            return state, event, nxt

    def run_cycle(self, *, max_steps: int = 64) -> State:
        """Check once; for every component with an update, carry it through to a rest
        state, one component after the other. Returns the model component's state."""
        if not self._app_checked:
            self._app_checked = True
            self._ensure_app_running()
        flush_feedback(self.paths, self.client)
        flush_drift(self.paths.root, self.client, self.record.installed,
                    min_interval_s=self.config.drift_report_interval_s)
        if self.record.outbox:  # reports a dropped connection held back: retry every cycle
            self._flush_reports()
        try:
            self._cycle_wanted = self.client.assignments()
        except AgentTransportError as exc:
            self._cycle_wanted = exc  # each component's check records it, none asks again
        try:
            wanted = self._cycle_wanted if isinstance(self._cycle_wanted, dict) else {}
            if isinstance(self._cycle_wanted, dict):  # the server answered: it wants these
                for name in sorted(set(self.record.components) - set(wanted)):
                    if self.record.components[name].state in REST_STATES:
                        self._remove_component(self.record.components[name])
            for component in sorted(set(wanted) - {MODEL_COMPONENT}):
                if component not in self.record.components:
                    self.record.components[component] = AgentRecord(component=component)
            committed = self._committed_versions()
            for lane in self.record.lanes():
                self._run_lane(lane, max_steps)
            if self._committed_versions() != committed:
                # A component whose dependencies another one's update just met goes again.
                for lane in self.record.lanes():
                    if lane.blocked and lane.state in REST_STATES:
                        self._run_lane(lane, max_steps)
            if not self._offline:  # what steps held back (offline: tried next cycle)
                self._flush_reports()
        finally:
            self._cycle_wanted = None
        return self.record.state

    def _run_lane(self, lane: AgentRecord, max_steps: int) -> None:
        for _ in range(max_steps):
            before, _event, after = self.step(lane)
            if after in REST_STATES or after == before:
                return

    def run_forever(self, stop: threading.Event, wake: threading.Event | None = None) -> None:
        """Check, then sleep until the poll interval passes, `wake` is set (an MQTT push)
        or `stop` is set."""
        wake = wake or stop
        while not stop.is_set():
            if wake is not stop:
                wake.clear()
            try:
                self.run_cycle()
            except AgentConfigError as exc:
                log.error("%s", exc)
                raise
            wake.wait(self.config.poll_interval_s)

    def _ensure_app_running(self) -> None:
        """At start: every committed app runs (after a reboot, or after its restart policy
        gave up), unless its update is past installing (activating, health-checking, rolling
        back: that handler decides what runs). Before that the committed version is the one
        that runs, also while an update downloads or waits for its window."""
        for rec in self.record.lanes():
            if rec.state in _SWAPPING or rec.installed_slot is None:
                continue
            manifest = self._slot_manifest(rec, rec.installed_slot)
            if not isinstance(manifest, AppManifest):
                continue
            try:
                if self.containers.ensure_running(self.slots_of(rec).path(rec.installed_slot),
                                                  manifest):
                    log.warning("started %s: its container was not running",
                                manifest.release_name)
            except ContainerError as exc:
                log.error("cannot start the committed app %s: %s", manifest.release_name, exc)

    def _remove_component(self, rec: AgentRecord) -> None:
        """The server no longer assigns this component: stop it (an app's container and its
        images go; a config's current files go and its app restarts without them), delete
        its slots, forget its record and report it. Refused while a committed component
        depends on it. Each step is idempotent, and the record is dropped last, so a power
        cut part way removes the rest at the next cycle."""
        release = self._slot_manifest(rec, rec.installed_slot)
        if release is not None:
            after = self._committed_versions(besides=rec)
            for lane in self.record.lanes():
                committed = (self._slot_manifest(lane, lane.installed_slot)
                             if lane is not rec else None)
                broken = (unmet_dependencies(committed.depends, after)
                          if committed is not None else [])
                if broken:
                    why = (f"{release.release_name} stays: {committed.release_name} needs "
                           f"{'; '.join(broken)}; unassign or update it first")
                    if rec.last_error != why:
                        rec.last_error = why
                        log.warning("%s", why)
                        self._remember(rec, rec.state, "remove-refused", why)
                        self.paths.save_record(self.record)
                        self._flush_reports()
                    return
        slots = self.slots_of(rec)
        staged = (release or self._slot_manifest(rec, "a") or self._slot_manifest(rec, "b"))
        try:
            if isinstance(staged, AppManifest):  # its images too, a staged one's included
                self.containers.remove(staged)
            elif release is not None:
                assert rec.installed_slot is not None
                self._runtime(release).stop(slots.path(rec.installed_slot), release)
            shutil.rmtree(slots.dir, ignore_errors=True)
            shutil.rmtree(self.paths.root / "config" / rec.component, ignore_errors=True)
        except (OSError, RuntimeError, ContainerError) as exc:
            rec.last_error = f"removing failed, will retry: {exc}"
            log.warning("%s: %s", rec.component, rec.last_error)
            return
        self._component_slots.pop(rec.component, None)
        label = rec.installed.label if rec.installed is not None else "nothing installed"
        self._remember(rec, State.IDLE, "removed", f"removed {label}: no longer assigned",
                       target_id=None)
        del self.record.components[rec.component]
        self.paths.save_record(self.record)
        log.info("%s: removed (%s)", rec.component, label)
        self._flush_reports()

    def _committed_app(self, name: str) -> tuple[Path, AppManifest] | None:
        """(committed slot, manifest) of app component `name`, if the device runs it."""
        lane = self.record.components.get(name)
        if lane is None or lane.installed_slot is None:
            return None
        manifest = self._slot_manifest(lane, lane.installed_slot)
        if not isinstance(manifest, AppManifest):
            return None
        return self.slots_of(lane).path(lane.installed_slot), manifest

    def _slot_manifest(self, rec: AgentRecord, slot: str | None) -> Manifest | None:
        if slot is None:
            return None
        try:
            return read_manifest(self.slots_of(rec).path(slot))
        except (BundleError, OSError):
            return None

    def _committed_versions(self, *, besides: AgentRecord | None = None) -> dict[str, str]:
        """Release name -> version of every component's committed release (but `besides`)."""
        return {lane.installed.name: lane.installed.version for lane in self.record.lanes()
                if lane.installed is not None and lane is not besides}

    def _check_dependencies(self, rec: AgentRecord, manifest: Manifest) -> None:
        """`DependencyUnmet` unless the other components' committed releases satisfy the
        release's `depends`, and replacing this component's release breaks no committed
        component's `depends`."""
        others = self._committed_versions(besides=rec)
        unmet = unmet_dependencies(manifest.depends, others)
        if unmet:
            raise DependencyUnmet(
                f"{manifest.release_name} needs {'; '.join(unmet)}: nothing was installed; "
                "it installs once the device runs what it needs")
        now = self._committed_versions()
        after = {**others, manifest.name: manifest.version}
        for lane in self.record.lanes():
            committed = (self._slot_manifest(lane, lane.installed_slot)
                         if lane is not rec else None)
            if committed is None or not committed.depends:
                continue
            broken = unmet_dependencies(committed.depends, after)
            if broken and not unmet_dependencies(committed.depends, now):
                raise DependencyUnmet(
                    f"{manifest.release_name} would break {committed.release_name}, which "
                    f"needs {'; '.join(broken)}: nothing was installed; update "
                    f"{committed.name} first")

    def _runtime(self, manifest: Manifest) -> ComponentRuntime:
        if isinstance(manifest, AppManifest):
            return self.containers
        if isinstance(manifest, ConfigManifest):
            return self.configs
        return self.models

    def _transition(self, rec: AgentRecord, state: State, event: Event, nxt: State) -> None:
        target = rec.target
        rec.state = nxt
        rec.entries[nxt] = rec.entries.get(nxt, 0) + 1
        message = rec.last_error if event in (Event.ERROR, Event.UNHEALTHY) else ""
        extra = None
        waiting = target is not None and target.release_id in rec.blocked
        if nxt is State.FAILED and waiting:
            # Not an attempt: it waits for the device's other components to change.
            extra = {"waiting_for_dependencies": True, "will_retry": True}
        elif nxt is State.FAILED and target is not None:
            # Tell the server whether this failure is final: a dropped connection is retried
            # at the next check, and a rollout should wait for it, not count it as failed.
            attempt = rec.attempts.get(target.release_id, 0) + 1
            limit = self.config.max_attempts_per_release
            final = {target.release_id, target.manifest_target} & set(rec.rejected)
            extra = {"attempt": attempt, "max_attempts": limit,
                     "will_retry": attempt < limit and not final}
        self._remember(rec, nxt, event.value, message,
                       target_id=target.release_id if target else None, extra=extra)
        if nxt in REST_STATES:
            if nxt is State.FAILED and target is not None and not waiting:
                rec.attempts[target.release_id] = rec.attempts.get(target.release_id, 0) + 1
            rec.target = None
            rec.target_seen_at = None
            rec.pending_slot = None
            rec.entries = {}
            # Downloads of other components' updates in flight (awaiting a window) stay.
            keep = {lane.target.release_id for lane in self.record.lanes()
                    if lane.target is not None}
            if self.paths.downloads_dir.is_dir():
                for stale in self.paths.downloads_dir.iterdir():
                    if stale.name not in keep:
                        shutil.rmtree(stale, ignore_errors=True)
            self.paths.defer_path.unlink(missing_ok=True)
        self.paths.save_record(self.record)  # persist before the next handler acts
        log.info("%s: %s --%s--> %s", rec.component, state, event, nxt)
        # The start of an update and its end go up at once; the steps between may wait.
        self._flush_reports(urgent=state in REST_STATES or nxt in REST_STATES)

    def _remember(self, rec: AgentRecord, state: State, event: str, message: str,
                  target_id: str | None = None, extra: dict | None = None) -> None:
        if target_id is None and rec.target is not None:
            target_id = rec.target.release_id
        entry = {
            "ts": now_iso(), "state": state.value, "event": event,
            "message": message[:MESSAGE_MAX],
            "release_id": rec.installed.release_id if rec.installed else None,
            "target_release_id": target_id, "component": rec.component,
        }
        self.record.history.append(entry)
        detail = ({"health": rec.last_health}
                  if rec.last_health and event in ("healthy", "unhealthy", "rolled-back") else {})
        if event == "downloaded" and rec.last_download:
            detail = {"download": rec.last_download}
        if extra:
            detail = {**detail, **extra}
        self.record.outbox.append({**{k: entry[k] for k in (
            "state", "event", "message", "release_id", "target_release_id", "component")},
            "detail": detail})

    def _flush_reports(self, *, urgent: bool = True) -> None:
        """Send the outbox, oldest first, as one request. Not `urgent` (a step inside an
        update): held while the previous send was less than `report_batch_s` ago, so an
        update whose steps take milliseconds reports them together when it comes to rest;
        after a slow step (a download) the next report goes at once."""
        rec = self.record
        if not rec.outbox:
            return
        now = time.monotonic()
        if not urgent and now - self._reported_at < self.config.report_batch_s:
            return
        self._reported_at = now
        self._offline = False
        # What this agent reads now (the server picks delta patch formats from it).
        items = [{**item, "delta_versions": list(READABLE_VERSIONS)} for item in rec.outbox]
        sent = 0
        if now >= self._batch_from and len(items) > 1:
            try:
                for start in range(0, len(items), REPORT_BATCH):
                    chunk = items[start:start + REPORT_BATCH]
                    self.client.reports(chunk)
                    sent = start + len(chunk)
            except AgentTransportError as exc:
                if exc.status_code is None or not 400 <= exc.status_code < 500:
                    items = []  # offline: keep the rest for later, in order
                    self._offline = True
                elif exc.status_code == 422:
                    self._batch_from = now + REPORT_BATCH_RETRY_S
        for item in items[sent:]:  # one at a time: the server refused a batch
            try:
                self.client.report(item)
            except AgentTransportError as exc:
                if exc.status_code is not None and 400 <= exc.status_code < 500:
                    log.warning("server refused a report, dropping it: %s", exc)
                else:
                    self._offline = True
                    break  # offline: keep the rest for later, in order
            sent += 1
        if sent:
            rec.outbox = rec.outbox[sent:]
            self.paths.save_record(rec)

    def _maybe_fault(self, state: State, when: str) -> None:
        if self.config.fault_hook is not None:
            self.config.fault_hook(state, when)
        fault = self.config.fault
        if fault is not None and fault.state is state and fault.when == when:
            log.warning("fault injection: power cut in %s (%s)", state, when)
            os.kill(os.getpid(), signal.SIGKILL)

    # ---- handlers: one step each, return an event, never pick the next state -----------

    def _fail(self, rec: AgentRecord, exc: Exception) -> Event:
        rec.last_error = str(exc)
        log.warning("%s failed: %s", rec.state, exc)
        return Event.ERROR

    def _wanted(self) -> dict[str, ReleaseRef]:
        """Component -> assigned release: this cycle's answer, else a fresh one."""
        if isinstance(self._cycle_wanted, AgentTransportError):
            raise self._cycle_wanted
        if self._cycle_wanted is not None:
            return self._cycle_wanted
        return self.client.assignments()

    def _check(self, rec: AgentRecord) -> Event:
        try:
            wanted = self._wanted().get(rec.component)
        except AgentTransportError as exc:
            rec.last_error = str(exc)
            return Event.ERROR
        if wanted is None:
            return Event.NO_UPDATE
        if rec.installed is not None and wanted.release_id == rec.installed.release_id:
            return Event.NO_UPDATE
        if rec.blocked.get(wanted.release_id) == self._blocked_key(rec):
            return Event.NO_UPDATE  # its dependencies are still unmet: nothing changed
        if wanted.release_id in rec.rejected or wanted.manifest_target in rec.rejected:
            return Event.NO_UPDATE
        if rec.attempts.get(wanted.release_id, 0) >= self.config.max_attempts_per_release:
            return Event.NO_UPDATE
        rec.target = wanted
        rec.target_seen_at = now_iso()
        rec.last_error = ""
        rec.last_health = {}
        rec.last_download = {}
        rec.target_terms = None
        return Event.UPDATE_AVAILABLE

    def _download_dir(self, rec: AgentRecord) -> Path:
        assert rec.target is not None
        return self.paths.downloads_dir / rec.target.release_id

    def _download(self, rec: AgentRecord) -> Event:
        assert rec.target is not None
        dest = self._download_dir(rec)
        dest.mkdir(parents=True, exist_ok=True)
        for partial in dest.rglob(".*"):  # temp files of an interrupted download
            partial.unlink(missing_ok=True)
        trusted = TrustedClient(
            metadata_dir=self.paths.tuf_dir,
            trusted_root=self.paths.trusted_root(),
            base_url=self.identity.server_url,
            fetcher=HttpxFetcher(self.client.http, partial_dir=self.paths.root / "partial"),
        )
        manifest_target = rec.target.manifest_target
        if not manifest_target.endswith("/" + MANIFEST_NAME):
            return self._fail(rec, UpdateRejected(f"{manifest_target} is not a bundle manifest"))
        prefix = manifest_target[: -len(MANIFEST_NAME)]
        stats = {"full_bytes": 0, "sent_bytes": 0, "delta_files": 0, "delta_fallbacks": 0,
                 "reused_files": 0}
        try:
            info = trusted.target_info(manifest_target)
            try:
                terms = check_terms(info, hardware=self.identity.hardware,
                                    committed_counter=rec.release_counter,
                                    committed_fallbacks=rec.fallbacks)
            except VerificationError as exc:  # signed, so it will never change: stop asking
                self._reject(rec, str(exc), build_only=True)
                return self._fail(rec, UpdateRejected(str(exc)))
            # The director (a second TUF updater, this device's own signed instruction) must
            # name exactly this bundle, for this device and its hardware.
            director = DirectorClient(metadata_dir=self.paths.director_dir,
                                      trusted_root=self.paths.director_root(),
                                      base_url=self.identity.server_url,
                                      fetcher=HttpxFetcher(self.client.http))
            instructions = director.instructions()
            instructed = instructions.get(manifest_target)
            if instructed is None:
                raise VerificationError(
                    f"the director does not confirm {manifest_target} for this device "
                    f"(it says {', '.join(sorted(instructions)) or 'nothing'})")
            check_director(instructed, info, device_id=self.identity.device_id,
                           hardware=self.identity.hardware)
            rec.target_terms = {"counter": terms.counter, "fallbacks": list(terms.fallbacks)}
            trusted.download(manifest_target, dest / MANIFEST_NAME)
            manifest = parse_manifest((dest / MANIFEST_NAME).read_bytes())
            if component_of(getattr(manifest, "kind", ""), manifest.name) != rec.component:
                raise UpdateRejected(f"{manifest.release_name} is not a release of the "
                                     f"component {rec.component} it was assigned as")
            try:
                self._check_dependencies(rec, manifest)
            except DependencyUnmet as exc:
                rec.blocked = {rec.target.release_id: self._blocked_key(rec)}
                return self._fail(rec, exc)
            rec.blocked = {}
            try:
                self._check_can_install(manifest, dest)
            except UpdateRejected as exc:  # this build can never run here: stop asking
                self._reject(rec, str(exc), build_only=True)
                return self._fail(rec, exc)
            base = self._installed_files(rec)
            for rel, entry in manifest.files.items():
                stats["full_bytes"] += entry.size
                stats["sent_bytes"] += self._fetch_file(trusted, prefix + rel, dest / rel,
                                                        entry.sha256, base.get(rel), stats)
        except (VerificationError, TransportError, BundleError, OSError, UpdateRejected,
                InsufficientDisk) as exc:
            return self._fail(rec, exc)
        rec.last_download = stats
        return Event.DOWNLOADED

    def _blocked_key(self, rec: AgentRecord) -> str:
        """What a dependency check of `rec`'s component depends on: the other components'
        committed releases."""
        return ",".join(f"{n}@{v}" for n, v in
                        sorted(self._committed_versions(besides=rec).items()))

    def _check_can_install(self, manifest: Manifest, dest: Path) -> None:
        """Before any file is fetched: this device can run the release (its kind, its RAM;
        `UpdateRejected`, final for this build), and its disk holds the download plus the
        slot copy it is installed as, the committed slot staying (`InsufficientDisk`)."""
        if isinstance(manifest, AppManifest):
            why = self.containers.available()
            if why is not None:
                raise UpdateRejected(f"{manifest.release_name} is a container app, and this "
                                     f"device cannot run it: {why}")
        if isinstance(manifest, LlmAdapterManifest):
            self._check_adapter_base(manifest)
        if (isinstance(manifest, LlmManifest | LlmAdapterManifest)
                and importlib.util.find_spec("llama_cpp") is None):
            raise UpdateRejected(f"{manifest.release_name} is an LLM, and this device has "
                                 "no LLM runtime: update the agent with pip install "
                                 "'edgewise[llm]'")
        if isinstance(manifest, LlmManifest):
            limit = (self.config.ram_limit_mb if self.config.ram_limit_mb is not None
                     else device_ram_mb())
            if limit is not None and manifest.llm.ram_mb > limit:
                raise UpdateRejected(f"{manifest.release_name} needs {manifest.llm.ram_mb:.0f} "
                                     f"MB of RAM, this device allows {limit:.0f} MB")
        total = sum(e.size for e in manifest.files.values())
        have = sum(min((dest / rel).stat().st_size, e.size)
                   for rel, e in manifest.files.items() if (dest / rel).is_file())
        # An app's image is also unpacked into the image store: about its size again (at
        # most; the layers the store already holds take no more room).
        unpacked = total if isinstance(manifest, AppManifest) else 0
        need = (total - have) + total + unpacked + DISK_MARGIN_BYTES
        free = shutil.disk_usage(self.paths.root).free
        if free < need:
            raise InsufficientDisk(
                f"not enough free disk for {manifest.release_name}: it needs "
                f"{need / 2**20:.0f} MB (download {max(0, total - have) / 2**20:.0f} MB + "
                f"its slot copy {total / 2**20:.0f} MB + "
                + (f"its image {unpacked / 2**20:.0f} MB + " if unpacked else "")
                + f"margin), {free / 2**20:.0f} MB free; the current release keeps running")

    def _check_adapter_base(self, manifest: LlmAdapterManifest) -> tuple[str, Path, Path]:
        """An adapter installs only where the committed release runs its base: the exact
        GGUF it was trained on (by sha256), as that release or as another adapter on it.
        Returns that base (`llm_base`)."""
        spec = manifest.adapter
        slot = self.record.installed_slot
        committed = self._slot_manifest(self.record, slot)
        base = llm_base(self.slots.path(slot), committed) if slot is not None else None
        if base is None or base[0] != spec.base_sha256:
            runs = committed.release_name if committed is not None else "no release"
            raise UpdateRejected(
                f"{manifest.release_name} is a LoRA adapter for {spec.base_release} (GGUF "
                f"sha256 {spec.base_sha256[:12]}), and this device runs {runs}: roll out "
                f"{spec.base_release} to it first, then a new build of the adapter")
        return base

    def _installed_files(self, rec: AgentRecord) -> dict[str, tuple[str, Path]]:
        """rel path -> (sha256, path) of the component's committed release's files: delta
        bases, and files copied instead of downloaded when unchanged (an app's shared image
        layers: a blob's path is its hash)."""
        slot = rec.installed_slot
        manifest = self._slot_manifest(rec, slot)
        if slot is None or manifest is None:
            return {}
        slots = self.slots_of(rec)
        files = {rel: (e.sha256, slots.path(slot) / rel) for rel, e in manifest.files.items()}
        if isinstance(manifest, LlmAdapterManifest):
            # The base linked into an adapter's slot: a new base release is a delta against
            # it (or no download at all), as if the base itself were committed.
            try:
                model = adapter_base(slots.path(slot)).llm.model
            except HealthCheckFailed:
                return files
            files.setdefault(model, (manifest.adapter.base_sha256,
                                     slots.path(slot) / BASE_GGUF))
        return files

    def _fetch_file(self, trusted: TrustedClient, target: str, dest: Path, sha256: str,
                    base: tuple[str, Path] | None, stats: dict[str, int]) -> int:
        """Fetch one file, by delta when we hold a base and the server signed a delta for it;
        the result is checked against the full target's signed hash either way. Returns the
        bytes that crossed the network."""
        info = trusted.target_info(target)  # the offline-signed length and hash
        signed = (info.hashes.get("sha256"), info.length)
        dest.parent.mkdir(parents=True, exist_ok=True)  # files in folders (OCI blobs/sha256/)
        if dest.exists() and file_sha256(dest) == signed:
            return 0  # already here (resumed after a power cut)
        if base is not None and base[0] == signed[0] and base[1].is_file():
            # Unchanged since the installed release: copy it locally, check, no download.
            copy = dest.with_name(f".{dest.name}.copy")
            shutil.copyfile(base[1], copy)
            if file_sha256(copy) == signed:
                os.replace(copy, dest)
                stats["reused_files"] += 1
                return 0
            copy.unlink(missing_ok=True)  # the installed copy is damaged: download it
        if base is not None and base[0] != sha256 and base[1].is_file():
            patch = dest.with_name(f".{dest.name}.delta")
            try:
                delta = trusted.download(f"{DELTAS_ROLE}/{sha256}.{base[0]}", patch)
                apply_delta(base[1], patch, dest, expected_sha256=info.hashes["sha256"])
                if file_sha256(dest) != (info.hashes["sha256"], info.length):
                    raise VerificationError(f"{target}: delta result differs from the target")
                stats["delta_files"] += 1
                return delta.length
            except (VerificationError, TransportError, DeltaError, OSError, KeyError) as exc:
                # No delta for this base, or a bad one: the full file is always there.
                if not isinstance(exc, VerificationError) or "not a signed target" not in str(exc):
                    stats["delta_fallbacks"] += 1
                    log.warning("delta for %s unusable, downloading the full file: %s",
                                target, exc)
                dest.unlink(missing_ok=True)
            finally:
                patch.unlink(missing_ok=True)
        trusted.download(target, dest)
        return info.length

    def _verify(self, rec: AgentRecord) -> Event:
        assert rec.target is not None
        try:
            manifest = validate_bundle(self._download_dir(rec))
        except BundleError as exc:
            return self._fail(rec, UpdateRejected(f"bundle rejected: {exc}"))
        if (manifest.name, manifest.version) != (rec.target.name, rec.target.version):
            return self._fail(rec, UpdateRejected(
                f"bundle is {manifest.release_name}, but {rec.target.label} was assigned"))
        rec.pending_slot = self.slots_of(rec).inactive()
        return Event.VERIFIED if self._may_install(rec) else Event.OUTSIDE_WINDOW

    def _may_install(self, rec: AgentRecord) -> bool:
        """Inside the maintenance window (device-local time) and past any user deferral."""
        assert rec.target is not None
        now = self.config.clock() if self.config.clock is not None else datetime.now(UTC)
        deferred = deferred_until(self.paths, rec)
        if deferred is not None and now < deferred:
            return False
        try:
            return in_window(rec.target.window, now, rec.target.timezone)
        except ValueError as exc:  # a malformed policy must not block updates forever
            log.warning("ignoring invalid maintenance window: %s", exc)
            return True

    def _await_window(self, rec: AgentRecord) -> Event:
        assert rec.target is not None
        try:
            wanted = self._wanted().get(rec.component)
        except AgentTransportError:
            wanted = rec.target  # offline: the window is decided locally
        except AgentConfigError:
            raise
        if wanted is None or wanted.release_id != rec.target.release_id:
            rec.last_error = "assignment changed while waiting for the maintenance window"
            return Event.CANCELLED
        rec.target = wanted  # the policy may have changed
        return Event.IN_WINDOW if self._may_install(rec) else Event.OUTSIDE_WINDOW

    def _install(self, rec: AgentRecord) -> Event:
        assert rec.target is not None and rec.pending_slot is not None
        slots = self.slots_of(rec)
        try:
            # Again: another component may have changed since the download.
            self._check_dependencies(rec, read_manifest(self._download_dir(rec)))
        except DependencyUnmet as exc:
            rec.blocked = {rec.target.release_id: self._blocked_key(rec)}
            return self._fail(rec, exc)
        except (OSError, BundleError) as exc:
            return self._fail(rec, exc)
        try:
            slots.install(rec.pending_slot, self._download_dir(rec), meta={
                "release_id": rec.target.release_id, "name": rec.target.name,
                "version": rec.target.version}, links=self._base_links(rec))
            path = slots.path(rec.pending_slot)
            manifest = read_manifest(path)
            installed = self._slot_manifest(rec, rec.installed_slot)
            self._runtime(manifest).stage(path, manifest,
                                          keep=[installed] if installed is not None else [])
        except ConfigInvalid as exc:  # the files fail their own checks: never again
            self._reject(rec, str(exc))
            return self._fail(rec, exc)
        except (OSError, RuntimeError, BundleError, ContainerError, UpdateRejected) as exc:
            return self._fail(rec, exc)
        return Event.INSTALLED

    def _base_links(self, rec: AgentRecord) -> dict[str, Path] | None:
        """For an adapter: the committed slot's base GGUF and manifest, to link into its slot
        (checked byte for byte: the adapter means nothing on other weights)."""
        manifest = read_manifest(self._download_dir(rec))
        if not isinstance(manifest, LlmAdapterManifest):
            return None
        _sha, gguf, base_manifest = self._check_adapter_base(manifest)
        if file_sha256(gguf)[0] != manifest.adapter.base_sha256:
            raise BundleError(f"the base GGUF on this device ({gguf}) does not match its "
                              "signed sha256: it is damaged, the adapter cannot use it")
        return {BASE_GGUF: gguf, BASE_MANIFEST: base_manifest}

    def _activate(self, rec: AgentRecord) -> Event:
        assert rec.pending_slot is not None
        slots = self.slots_of(rec)
        try:
            slots.activate(rec.pending_slot)
            new = read_manifest(slots.path(rec.pending_slot))
            self._replace(rec, rec.installed_slot, new)
            self._runtime(new).activate(slots.path(rec.pending_slot), new)
        except (OSError, RuntimeError, BundleError, ContainerError) as exc:
            return self._fail(rec, exc)
        return Event.ACTIVATED

    def _replace(self, rec: AgentRecord, slot: str | None, new: Manifest | None) -> None:
        """Stop the release of `slot` unless `new` is the same release line (a model
        release of another name or kind replaces the model; the same one, and an app, are
        replaced in place by their runtime's `activate`)."""
        old = self._slot_manifest(rec, slot)
        if old is None or (new is not None and (old.name, old.kind) == (new.name, new.kind)):
            return
        assert slot is not None
        self._runtime(old).stop(self.slots_of(rec).path(slot), old)

    def _health_check(self, rec: AgentRecord) -> Event:
        assert rec.target is not None and rec.pending_slot is not None
        path = self.slots_of(rec).path(rec.pending_slot)
        try:
            manifest = read_manifest(path)
            runtime = self._runtime(manifest)
            if self.config.health_check is not None and runtime is self.models:
                report = self.config.health_check(path)
            else:
                report = runtime.health_check(path, manifest)
        except (HealthCheckFailed, UpdateRejected, OSError, BundleError, ContainerError) as exc:
            rec.last_health = {"passed": False, "reason": str(exc)}
            self._reject(rec, str(exc))
            return Event.UNHEALTHY
        rec.last_health = report.to_json()
        if not report.passed:
            self._reject(rec, f"health check failed: {report.reason}")
            return Event.UNHEALTHY
        # Commit: the new slot proved itself. Persisted together with the COMMITTED state.
        rec.installed = rec.target
        rec.installed_slot = rec.pending_slot
        terms = rec.target_terms
        if terms and terms["counter"] >= rec.release_counter:  # not when going to a fallback
            rec.release_counter = terms["counter"]
            rec.fallbacks = list(terms["fallbacks"])
        rec.last_error = ""
        return Event.HEALTHY

    def _reject(self, rec: AgentRecord, reason: str, *, build_only: bool = False) -> None:
        """Never try this release again (`build_only`: this build of it; another build, e.g.
        a variant for our hardware published later, may still come)."""
        assert rec.target is not None
        rec.last_error = reason
        key = rec.target.manifest_target if build_only else rec.target.release_id
        if key not in rec.rejected:
            rec.rejected.append(key)

    def _roll_back(self, rec: AgentRecord) -> Event:
        slots = self.slots_of(rec)
        try:
            # Back to the committed slot; with no earlier release there is no model at all.
            slots.activate(rec.installed_slot)
            installed = self._slot_manifest(rec, rec.installed_slot)
            if rec.pending_slot is not None and rec.pending_slot != rec.installed_slot:
                self._replace(rec, rec.pending_slot, installed)
            if installed is not None:
                assert rec.installed_slot is not None
                # The previous version runs again from its slot and the image kept in the
                # store: no download.
                self._runtime(installed).activate(slots.path(rec.installed_slot), installed)
        except (OSError, RuntimeError, ContainerError) as exc:
            rec.last_error = f"rollback failed, will retry: {exc}"
            return Event.ERROR
        return Event.ROLLED_BACK

"""The fleet runner: N real agents (`edgewise.agent.Agent`) in one process against a real
server process, with per-device network and hardware profiles and scripted faults.

Invariant: every simulated device is the shipped agent driver with its own state directory;
the simulator only schedules `run_cycle()` calls, supplies the agent's seams (transport, slot
backend, health check, clock, fault hook) and restarts an Agent after a power cut by building
a fresh one on the same state directory, as a device does when it boots.

With `push: true` a real Mosquitto broker runs beside the server and every device subscribes
with the agent's own MQTT client (`MqttWakeup`); a wake-up moves that device's next cycle to
now, as it ends the real agent's sleep.

Components: the scenario's config components (`components:`) are published beside the model
and installed at their baseline with it; the staged rollout moves one component's candidate
(`rollout.component`: the model or one of them), through the same seams and faults, and a
device is settled only when every one of its components is at rest.

Phases: server up -> releases published -> devices enrolled -> baseline releases installed by
the agents themselves -> faults armed -> staged rollout of the candidate -> settle -> invariants.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import os
import random
import secrets
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ..agent import REST_STATES, WAITING_STATES, Agent, AgentConfig, State, StateDir
from ..agent._store import AgentRecord, Identity
from ..agent._wakeup import MqttWakeup, WakeupConfig
from ..server.loadbalancer import LoadBalancer
from ..trust import KeyPaths, init_keys, public_key_hex
from ._broker import BrokerProcess
from ._bundles import synthetic_bundle, synthetic_config_bundle
from ._faults import (
    DiskFull,
    PowerCut,
    PowerCutPlan,
    disk_full_slots,
    hardware_health_check,
    power_cut_hook,
    skewed_clock,
)
from ._invariants import db_snapshot
from ._network import DeviceLink, LinkStats, SimTransport, shared_transport
from ._processes import (
    AgentProcess,
    ServerProcess,
    free_port,
    listening_postmaster,
    process_tree,
    tree_cpu_s,
    tree_rss_mb,
)
from ._scenario import (
    ComponentReleaseSpec,
    HardwareProfile,
    NetworkProfile,
    ReleaseSpec,
    Scenario,
)

__all__ = ["Fleet", "FleetResult", "SimDevice", "lane_of", "run_fleet"]

log = logging.getLogger("edgewise.sim")

TERMINAL = ("completed", "aborted", "paused", "rolled-back")
# Power cuts are planned in these states; rest states cut while checking for an update.
ALL_CUT_STATES = [s for s in State]


@dataclass
class SimDevice:
    index: int
    name: str
    state_dir: Path
    device_id: str
    hardware: HardwareProfile
    network: NetworkProfile
    timezone: str
    link: DeviceLink
    config: AgentConfig | None = None
    agent: Agent | None = None
    power_cut: PowerCutPlan | None = None
    disk_full: DiskFull = field(default_factory=lambda: DiskFull(0))
    skew_s: float = 0.0
    faults: list[str] = field(default_factory=list)
    boots: int = 0
    power_cuts: int = 0
    crashes: list[str] = field(default_factory=list)
    last_state: str = State.IDLE.value
    last_end: float = 0.0
    last_changed: bool = True
    busy: bool = False
    due: float = 0.0  # when its next cycle is scheduled (heap entries with another are stale)
    woken: bool = False  # a wake-up arrived while a cycle was running
    wakeup: MqttWakeup | None = None

    def record(self):
        return self.agent.record if self.agent is not None else StateDir(
            self.state_dir).load_record()


@dataclass
class ProcDevice:
    """A device run as a real agent process (`python -m edgewise agent run`)."""

    name: str
    state_dir: Path
    device_id: str
    fault: str
    proc: AgentProcess | None = None
    killed: bool = False
    exit_codes: list[int] = field(default_factory=list)


@dataclass
class FleetResult:
    scenario: Scenario
    workdir: Path
    db_url: str
    devices: list[SimDevice]
    proc_devices: list[ProcDevice]
    # baseline / candidate (the model's), NAME:baseline / NAME:candidate -> release id
    release_ids: dict[str, str]
    rollout_id: str | None
    rollout: dict[str, Any]
    timeline: list[dict[str, Any]]
    stats: LinkStats
    timings: dict[str, float]
    server_rss_mb_max: float
    restarts: list[dict[str, Any]]
    broker_outages: list[dict[str, Any]]
    push: dict[str, Any] | None
    load_avg: dict[str, list[float]]
    timed_out: bool
    server: ServerProcess  # the first replica
    admin_token: str
    url: str = ""  # where devices reach the server (the load balancer, with replicas)
    replicas: list[ServerProcess] = field(default_factory=list)
    replica_kills: list[dict[str, Any]] = field(default_factory=list)


class _Wake:
    """What `MqttWakeup` sets on a message (a threading.Event in the real agent)."""

    def __init__(self, fleet: Fleet, dev: SimDevice) -> None:
        self._fleet, self._dev = fleet, dev

    def set(self) -> None:
        self._fleet.wake(self._dev)


def lane_of(rec: AgentRecord, component: str) -> AgentRecord | None:
    """A device's record of one component ("model": the top record), None before it has one."""
    return rec if component == "model" else rec.components.get(component)


def _pick(rng: random.Random, items: list, weights: list[float]):
    return rng.choices(items, weights=weights, k=1)[0]


def _count(n: int, fraction: float, count: int | None) -> int:
    return count if count is not None else int(round(n * fraction))


class Fleet:
    def __init__(self, scenario: Scenario, workdir: Path, *, db_url: str | None = None,
                 progress: Callable[[str], None] | None = None, s3=None) -> None:
        self.sc = scenario
        self.s3 = s3  # server.storage.S3Config of the run's object store, if any
        self.workdir = Path(workdir)
        self.db_url = db_url
        self.say = progress or (lambda _msg: None)
        self.rng = random.Random(scenario.seed)
        self.stats = LinkStats()
        self.inner = shared_transport(max(8, scenario.workers * 2))
        self.devices: list[SimDevice] = []
        self.procs: list[ProcDevice] = []
        self.timeline: list[dict[str, Any]] = []
        self.timings: dict[str, float] = {}
        self.restarts: list[dict[str, Any]] = []
        self.replica_kills: list[dict[str, Any]] = []
        self._fault_lock = threading.Lock()
        self.broker: BrokerProcess | None = None
        self.broker_outages: list[dict[str, Any]] = []
        self.rollout_id: str | None = None
        self.rollout: dict[str, Any] = {}
        self.rss_max_mb = 0.0
        self._heap: list[tuple[float, int]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._t0 = time.monotonic()

    # ---- setup --------------------------------------------------------------------------

    def _start_server(self) -> None:
        self.admin_token = secrets.token_urlsafe(24)
        self.keys: KeyPaths = init_keys(self.workdir / "keys")
        if self.sc.push:
            self.broker = BrokerProcess(self.workdir / "broker").start()
        # Replicas share the database and the data directory (artifacts, TUF, director
        # keys): started one after the other, the first makes what they share.
        self.replicas = [ServerProcess(
            data_dir=self.workdir / "server", root_path=self.keys.root_json,
            online_key_path=self.keys.online_key, admin_token=self.admin_token,
            db_url=self.db_url, rollout_tick_s=self.sc.server.rollout_tick_s,
            mqtt_url=self.broker.url if self.broker else None,
            mqtt_ca=self.broker.ca if self.broker else None,
            workers=self.sc.server.workers, **self._s3_args(),
            log_path=self.workdir / f"server{i or ''}.log").start(timeout_s=60)
            for i in range(self.sc.server.replicas)]
        self.server = self.replicas[0]
        self.lb: LoadBalancer | None = None
        if len(self.replicas) > 1:
            self.lb = LoadBalancer(listen=f"127.0.0.1:{free_port()}",
                                   upstreams=[r.url for r in self.replicas],
                                   prefix=self.workdir / "lb").start()
        self.db_url = self.db_url or f"sqlite:///{(self.workdir / 'server' / 'edgewise.db')}"
        self.op = httpx.Client(base_url=self.url, timeout=120,
                               headers={"Authorization": f"Bearer {self.admin_token}"})

    def _s3_args(self) -> dict[str, Any]:
        if self.s3 is None:
            return {}
        return {"extra_args": ("--s3-endpoint", self.s3.endpoint_url,
                               "--s3-bucket", self.s3.bucket),
                "env": {"EDGEWISE_S3_ACCESS_KEY": self.s3.access_key,
                        "EDGEWISE_S3_SECRET_KEY": self.s3.secret_key}}

    @property
    def url(self) -> str:
        """Where devices and the operator reach the server: the load balancer, if any."""
        return self.lb.url if self.lb is not None else self.server.url

    def _api(self, method: str, path: str, **kw: Any) -> Any:
        for attempt in range(30):  # the server may be restarting under us
            try:
                r = self.op.request(method, path, **kw)
            except httpx.TransportError:
                time.sleep(0.5)
                continue
            if r.status_code >= 500 and attempt < 29:
                time.sleep(0.5)
                continue
            r.raise_for_status()
            return r.json() if r.content else None
        raise RuntimeError(f"{method} {path}: server unreachable")

    def _publish(self, spec: ReleaseSpec, seed: int) -> str:
        from ..server.client import OperatorClient, publish_bundle

        bundle = spec.bundle or synthetic_bundle(
            self.workdir / "bundles" / f"{spec.name}-{spec.version}", name=spec.name,
            version=spec.version, broken=spec.broken, max_latency_ms=spec.max_latency_ms,
            seed=seed)
        with OperatorClient(self.url, token=self.admin_token) as client:
            release = publish_bundle(client, bundle, root_path=self.keys.root_json,
                                     targets_key_path=self.keys.targets_key)
        return release["id"]

    def _publish_component(self, name: str, spec: ComponentReleaseSpec, seed: int) -> str:
        from ..server.client import OperatorClient, publish_bundle

        bundle = spec.bundle or synthetic_config_bundle(
            self.workdir / "bundles" / f"{name}-{spec.version}", name=name,
            version=spec.version, broken=spec.broken, seed=seed)
        with OperatorClient(self.url, token=self.admin_token) as client:
            release = publish_bundle(client, bundle, root_path=self.keys.root_json,
                                     targets_key_path=self.keys.targets_key)
        return release["id"]

    def _enroll_one(self, name: str, state_dir: Path, tags: list[str], hardware: str,
                    tz: str) -> str:
        token = self._api("POST", "/api/v1/enrollment-tokens", json={"ttl_s": 3600})["token"]
        paths = StateDir(state_dir)
        key = paths.ensure_device_key()
        body = self._api("POST", "/api/v1/devices/enroll", json={
            "token": token, "public_key": public_key_hex(key), "name": name,
            "hardware": hardware, "tags": tags, "timezone": tz})
        identity = Identity(server_url=self.url, device_id=body["device_id"], name=name,
                            hardware=hardware)
        paths.save_identity(identity, self._root_bytes,
                            json.dumps(body["director_root"]).encode())
        return body["device_id"]

    def _make_devices(self) -> None:
        sc = self.sc
        self._root_bytes = self.keys.root_json.read_bytes()
        plans = []
        for i in range(sc.devices):
            hw = _pick(self.rng, sc.hardware, [h.weight for h in sc.hardware])
            net = _pick(self.rng, sc.network, [n.weight for n in sc.network])
            tz = sc.timezones[i % len(sc.timezones)]
            link = DeviceLink(profile=net, rng=random.Random(sc.seed * 1_000_003 + i),
                              phase_s=self.rng.uniform(0, max(net.disconnect_every_s, 1)))
            plans.append((i, hw, net, tz, link))

        def enroll(plan) -> SimDevice:
            i, hw, net, tz, link = plan
            name = f"sim-{i:05d}"
            state_dir = self.workdir / "devices" / name
            dev_id = self._enroll_one(name, state_dir, ["sim", f"hw={hw.name}",
                                                        f"net={net.name}"], hw.name, tz)
            return SimDevice(index=i, name=name, state_dir=state_dir, device_id=dev_id,
                             hardware=hw, network=net, timezone=tz, link=link)

        with ThreadPoolExecutor(min(sc.workers, 16)) as pool:
            self.devices = list(pool.map(enroll, plans))
        for dev in self.devices:
            dev.config = self._agent_config(dev)
        if self.broker is not None:
            self._subscribe_all()
        if sc.faults.process_kill is not None:
            for j, fault in enumerate(sc.faults.process_kill.states):
                name = f"proc-{j:02d}"
                state_dir = self.workdir / "devices" / name
                dev_id = self._enroll_one(name, state_dir, ["sim", "hw=process", "net=real"],
                                          "process", "UTC")
                self.procs.append(ProcDevice(name=name, state_dir=state_dir, device_id=dev_id,
                                             fault=fault))

    def _agent_config(self, dev: SimDevice) -> AgentConfig:
        transport = SimTransport(self.inner, dev.link, self.stats, record_latency=True)
        return AgentConfig(
            state_dir=dev.state_dir, poll_interval_s=self.sc.poll_interval_s,
            request_timeout_s=30.0, transport=transport,
            slot_store=disk_full_slots(dev.disk_full),
            health_check=hardware_health_check(dev.hardware),
            clock=skewed_clock(lambda d=dev: d.skew_s),
            fault_hook=power_cut_hook(lambda d=dev: d.power_cut),
        )

    def _subscribe_all(self, timeout_s: float = 60.0) -> None:
        """Every device's own MQTT client (the agent's), connected before the run starts."""
        config = WakeupConfig(url=self.broker.url, ca_path=self.broker.ca)
        for dev in self.devices:
            dev.wakeup = MqttWakeup(config, device_id=dev.device_id, wake=_Wake(self, dev))
            dev.wakeup.start()
        deadline = time.monotonic() + timeout_s
        for dev in self.devices:
            if not dev.wakeup.connected.wait(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"{dev.name}: MQTT client did not connect to "
                                   f"{self.broker.url}")

    def _arm_faults(self) -> None:
        """Choose the faulty devices (disjoint sets, seeded) and arm their faults."""
        sc, f = self.sc, self.sc.faults
        order = list(self.devices)
        random.Random(sc.seed + 7).shuffle(order)
        pos = 0

        def take(k: int) -> list[SimDevice]:
            nonlocal pos
            chosen = order[pos:pos + k]
            pos += len(chosen)
            return chosen

        for dev in self.devices:
            dev.link.armed = True
        n = len(self.devices)
        states = ALL_CUT_STATES if f.power_cut.states == "all" else [
            State(s) for s in f.power_cut.states]
        combos = [(s, w) for s in states for w in f.power_cut.when]
        for k, dev in enumerate(take(_count(n, f.power_cut.fraction, f.power_cut.count))):
            state, when = combos[k % len(combos)]
            dev.power_cut = PowerCutPlan(state, when)
            dev.faults.append(f"power-cut:{state.value}:{when}")
        for dev in take(_count(n, f.disk_full.fraction, f.disk_full.count)):
            dev.disk_full.left = f.disk_full.times
            dev.faults.append("disk-full")
        for dev in take(_count(n, f.corrupt_download.fraction, f.corrupt_download.count)):
            dev.link.damage_left = f.corrupt_download.times
            dev.link.damage_mode = f.corrupt_download.mode
            dev.faults.append(f"{f.corrupt_download.mode}-download")
        for dev in take(_count(n, f.clock_skew.fraction, f.clock_skew.count)):
            dev.skew_s = f.clock_skew.skew_s
            dev.faults.append("clock-skew")

    # ---- driving agents ------------------------------------------------------------------

    def _schedule(self, dev: SimDevice, delay_s: float) -> None:
        with self._cond:
            self._push(dev, time.monotonic() + delay_s)

    def _push(self, dev: SimDevice, due: float) -> None:  # holding self._cond
        dev.due = due
        heapq.heappush(self._heap, (due, dev.index))
        self._cond.notify()

    def wake(self, dev: SimDevice) -> None:
        """An MQTT wake-up: cycle now (after the running cycle, if one is running)."""
        with self._cond:
            if dev.busy:
                dev.woken = True
            elif dev.due > time.monotonic():
                self._push(dev, time.monotonic())

    def _next_due(self) -> SimDevice | None:
        with self._cond:
            while not self._stop.is_set():
                now = time.monotonic()
                if self._heap and self._heap[0][0] <= now:
                    due, index = heapq.heappop(self._heap)
                    dev = self.devices[index]
                    if due != dev.due or dev.busy:
                        continue  # superseded by a wake-up
                    dev.busy = True
                    return dev
                wait = min(self._heap[0][0] - now, 0.2) if self._heap else 0.2
                self._cond.wait(wait)
        return None

    def _cycle(self, dev: SimDevice) -> None:
        try:
            if dev.agent is None:
                dev.agent = Agent(dev.config)  # boot: resumes whatever state was saved
                dev.boots += 1
            rec = dev.agent.record
            last = rec.history[-1] if rec.history else None
            dev.agent.run_cycle()
            rec = dev.agent.record
            dev.last_changed = (rec.history[-1] if rec.history else None) is not last
            rolled = lane_of(rec, self.sc.rollout.component)
            dev.last_state = (rolled or rec).state.value
        except PowerCut:
            dev.power_cuts += 1
            dev.agent = None  # abandoned mid-state; the next cycle boots a fresh Agent
            dev.last_changed = True
        except Exception as exc:  # an agent crash is a finding: record it, reboot
            log.exception("%s: agent crashed", dev.name)
            dev.crashes.append(f"{type(exc).__name__}: {exc}")
            dev.agent = None
            dev.last_changed = True
        finally:
            dev.last_end = time.monotonic()

    def _worker(self) -> None:
        while not self._stop.is_set():
            dev = self._next_due()
            if dev is None:
                return
            self._cycle(dev)
            with self._cond:
                dev.busy = False
                delay = 0.0 if dev.woken else self.sc.poll_interval_s * self.rng.uniform(0.5, 1.5)
                dev.woken = False
                if not self._stop.is_set():
                    self._push(dev, time.monotonic() + delay)

    # ---- observing -----------------------------------------------------------------------

    def _server_rss_mb(self) -> float:
        """Resident memory of every server replica (and their worker processes)."""
        total = 0.0
        for replica in self.replicas:
            if replica.proc is not None and replica.proc.poll() is None:
                total += tree_rss_mb(replica.proc.pid)
        return total
        return 0.0

    def _cpu(self) -> dict[str, float]:
        """CPU seconds so far by role: this simulator process (every in-process agent), the
        server replicas, nginx, PostgreSQL (a cluster on this machine, found by its port)."""
        sim = os.times()
        cpu = {"simulator": sim.user + sim.system,
               "server": sum(tree_cpu_s(r.proc.pid) for r in self.replicas
                             if r.proc is not None and r.proc.poll() is None)}
        if self.lb is not None and self.lb.proc is not None:
            cpu["nginx"] = tree_cpu_s(self.lb.proc.pid)
        port = httpx.URL(self.db_url.replace("+psycopg", "")).port \
            if self.db_url.startswith("postgresql") else None
        postmaster = listening_postmaster(port) if port else None
        if postmaster is not None:
            cpu["postgres"] = tree_cpu_s(postmaster)
        return cpu

    def _cpu_phase(self, name: str, since: dict[str, float]) -> dict[str, float]:
        """Record the CPU seconds each role spent since `since` as phase `name`."""
        now = self._cpu()
        self.timings.setdefault("cpu_s", {})[name] = {
            k: round(v - since.get(k, 0.0), 1) for k, v in now.items()}
        return now

    def _poll_rollout(self) -> None:
        if self.rollout_id is None:
            return
        try:
            r = self.op.get(f"/api/v1/rollouts/{self.rollout_id}")
            if r.status_code == 200:
                self.rollout = r.json()
        except httpx.HTTPError:
            pass

    def _sampler(self) -> None:
        while not self._stop.wait(self.sc.sample_s):
            self._poll_rollout()
            self.rss_max_mb = max(self.rss_max_mb, self._server_rss_mb())
            states = Counter(d.last_state for d in self.devices)
            on = Counter(self._on_version(d) for d in self.devices)
            with self.stats.lock:
                bytes_down, requests = self.stats.bytes_down, self.stats.requests
            self.timeline.append({
                "t": round(time.monotonic() - self._t0, 2), "states": dict(states),
                "on_version": {str(k): v for k, v in on.items()},
                "bytes_down": bytes_down, "requests": requests,
                "rollout_status": self.rollout.get("status"),
                "stage": self.rollout.get("stage"),
                "stage_index": self.rollout.get("stage_index"),
                "progress": self.rollout.get("progress"),
                "load1": os.getloadavg()[0],
            })

    def _on_version(self, dev: SimDevice) -> str | None:
        """The version of the rolled-out component the device runs (None: none yet)."""
        agent = dev.agent  # a worker may drop it (power cut) while the sampler reads
        lane = lane_of(agent.record, self.sc.rollout.component) if agent is not None else None
        return lane.installed.version if lane is not None and lane.installed else None

    def _settled(self, since: float) -> bool:
        # A device polling right now is not unsettled: its last finished cycle decides.
        for d in self.devices:
            if d.agent is None or d.last_end <= since or d.last_changed:
                return False
            rec = d.agent.record
            if rec.outbox or any(lane.state not in REST_STATES | WAITING_STATES
                                 for lane in rec.lanes()):
                return False
        return all(p.proc is None or p.proc.proc.poll() is not None or self._proc_at_rest(p)
                   for p in self.procs)

    @staticmethod
    def _proc_at_rest(p: ProcDevice) -> bool:
        try:
            rec = StateDir(p.state_dir).load_record()
        except Exception:
            return False
        return p.killed and not rec.outbox and all(lane.state in REST_STATES
                                                   for lane in rec.lanes())

    # ---- real agent processes -------------------------------------------------------------

    def _start_proc(self, p: ProcDevice, fault: str | None, *, once: bool = False) -> None:
        p.proc = AgentProcess(state_dir=p.state_dir, poll_interval_s=0.5, fault=fault,
                              once=once, log_path=self.workdir / f"{p.name}.log").start()

    def _watch_procs(self) -> None:
        while not self._stop.wait(0.3):
            for p in self.procs:
                if p.proc is not None and not p.killed and p.proc.proc.poll() is not None:
                    p.exit_codes.append(p.proc.proc.returncode)
                    p.killed = True
                    self._start_proc(p, None)  # reboot without the fault

    # ---- the run -------------------------------------------------------------------------

    def _baseline_ids(self) -> dict[str, str]:
        """Component -> its baseline release id."""
        return {"model": self.release_ids["baseline"],
                **{c.name: self.release_ids[f"{c.name}:baseline"] for c in self.sc.components}}

    def _wait_baseline(self, deadline: float) -> None:
        wanted = self._baseline_ids()

        def done(d: SimDevice) -> bool:
            if d.agent is None:
                return False
            for component, release_id in wanted.items():
                lane = lane_of(d.agent.record, component)
                if lane is None or lane.installed is None or \
                        lane.installed.release_id != release_id:
                    return False
            return True

        while time.monotonic() < deadline:
            if all(done(d) for d in self.devices):
                return
            time.sleep(0.25)
        raise TimeoutError("the fleet did not install the baseline releases in time")

    def _candidate_id(self) -> str:
        """The release the rollout moves: the candidate of `rollout.component`."""
        component = self.sc.rollout.component
        return self.release_ids["candidate" if component == "model" else
                                f"{component}:candidate"]

    def run(self) -> FleetResult:
        sc = self.sc
        load_start = list(os.getloadavg())
        self._start_server()
        threads: list[threading.Thread] = []
        timed_out = False
        try:
            t = time.monotonic()
            self.release_ids = {"baseline": self._publish(sc.baseline, sc.seed),
                                "candidate": self._publish(sc.candidate, sc.seed)}
            for comp in sc.components:
                for which in ("baseline", "candidate"):
                    spec = getattr(comp, which)
                    if spec is not None:
                        self.release_ids[f"{comp.name}:{which}"] = self._publish_component(
                            comp.name, spec, sc.seed)
            self.timings["publish_s"] = time.monotonic() - t
            t = time.monotonic()
            self._make_devices()
            self.timings["enroll_s"] = time.monotonic() - t
            self.say(f"{len(self.devices)} devices enrolled in {self.timings['enroll_s']:.1f}s")

            # Baseline: the agents install it themselves (the real update path).
            t = time.monotonic()
            cpu = self._cpu()
            deadline = t + sc.timeout_s
            for release_id in self._baseline_ids().values():
                self._api("POST", "/api/v1/assignments",
                          json={"release_id": release_id, "device_ids": None})
            for dev in self.devices:
                self._schedule(dev, self.rng.uniform(0, min(sc.poll_interval_s, 1.0)))
            threads = [threading.Thread(target=self._worker, name=f"sim-worker-{i}",
                                        daemon=True) for i in range(sc.workers)]
            threads.append(threading.Thread(target=self._sampler, name="sim-sampler",
                                            daemon=True))
            for th in threads:
                th.start()
            for p in self.procs:
                self._start_proc(p, None, once=True)
                p.proc.wait(timeout_s=sc.timeout_s)
            self._wait_baseline(deadline)
            self.timings["baseline_s"] = time.monotonic() - t
            cpu = self._cpu_phase("baseline", cpu)
            self.say(f"baseline installed on the fleet in {self.timings['baseline_s']:.1f}s")

            # Rollout, with faults armed.
            self._arm_faults()
            for p in self.procs:
                self._start_proc(p, p.fault)
            watcher = threading.Thread(target=self._watch_procs, daemon=True)
            watcher.start()
            threads.append(watcher)
            self._api("POST", "/api/v1/groups", json={
                "name": "sim", "kind": "dynamic", "selector": ["sim"], "members": [],
                "window": sc.window})
            t_roll = time.monotonic()
            self.rollout = self._api("POST", "/api/v1/rollouts", json={
                "release_id": self._candidate_id(), "group": "sim",
                "stages": sc.rollout.stages, "min_soak_s": sc.rollout.min_soak_s,
                "gates": {k: v for k, v in sc.rollout.gates.items()}})
            self.rollout_id = self.rollout["id"]
            self.say(f"rollout {self.rollout_id} of {sc.rollout.component} created: "
                     f"{sc.rollout.stages}")
            for spec in sorted(sc.faults.server_restarts, key=lambda s: s.at_s):
                threading.Timer(max(0.0, t_roll + spec.at_s - time.monotonic()),
                                self._restart_server, args=(spec,)).start()
            for spec in sorted(sc.faults.replica_kills, key=lambda s: s.at_s):
                threading.Timer(max(0.0, t_roll + spec.at_s - time.monotonic()),
                                self._kill_replica, args=(spec,)).start()
            for spec in sorted(sc.faults.broker_outages, key=lambda s: s.at_s):
                threading.Timer(max(0.0, t_roll + spec.at_s - time.monotonic()),
                                self._broker_outage, args=(spec,)).start()
            deadline = t_roll + sc.timeout_s
            terminal_at: float | None = None
            while time.monotonic() < deadline:
                time.sleep(0.5)
                self._poll_rollout()
                status = self.rollout.get("status")
                if status in TERMINAL and terminal_at is None:
                    terminal_at = time.monotonic()
                    self.say(f"rollout {status} at stage {self.rollout.get('stage')} after "
                             f"{terminal_at - t_roll:.1f}s; settling")
                if terminal_at is not None and not self._restarting and \
                        not self._broker_down and self._settled(terminal_at):
                    break
            else:
                timed_out = True
                self.say("timed out")
            self.timings["rollout_s"] = time.monotonic() - t_roll
            self._cpu_phase("rollout", cpu)
            self._stop.set()
            with self._cond:
                self._cond.notify_all()
            for th in threads:
                th.join(timeout=60)
            self._poll_rollout()
            self.rss_max_mb = max(self.rss_max_mb, self._server_rss_mb())
        finally:
            self._stop.set()
            for p in self.procs:
                if p.proc is not None:
                    p.proc.stop()
        return FleetResult(
            scenario=sc, workdir=self.workdir, db_url=self.db_url, devices=self.devices,
            proc_devices=self.procs, release_ids=self.release_ids, rollout_id=self.rollout_id,
            rollout=self.rollout, timeline=self.timeline, stats=self.stats,
            timings=self.timings, server_rss_mb_max=self.rss_max_mb, restarts=self.restarts,
            broker_outages=self.broker_outages, push=self._push_stats(),
            load_avg={"start": load_start, "end": list(os.getloadavg())},
            timed_out=timed_out, server=self.server, admin_token=self.admin_token,
            url=self.url, replicas=self.replicas, replica_kills=self.replica_kills)

    _restarting = False

    def _restart_server(self, spec) -> None:
        with self._one_fault():
            before = db_snapshot(self.db_url)
            t = time.monotonic()
            if getattr(spec, "hard", False):
                self.server.proc.kill()
                self.server.proc.wait()
            else:
                self.server.stop()
            time.sleep(spec.down_s)
            self.server.start(timeout_s=60)
            self.restarts.append({"t": round(t - self._t0, 2), "down_s": round(
                time.monotonic() - t, 2), "snapshot": before})
            self.say(f"server restarted ({time.monotonic() - t:.1f}s down)")

    def _kill_replica(self, spec) -> None:
        with self._one_fault():
            replica = self.replicas[spec.replica]
            before = db_snapshot(self.db_url)
            t = time.monotonic()
            for pid in process_tree(replica.proc.pid):  # the replica and its workers
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            replica.proc.wait()
            entry = {"t": round(t - self._t0, 2), "replica": spec.replica, "down_s": None}
            self.say(f"replica {spec.replica} killed (SIGKILL)")
            if spec.restart_after_s is not None:
                time.sleep(spec.restart_after_s)
                replica.start(timeout_s=60)
                entry["down_s"] = round(time.monotonic() - t, 2)
                self.say(f"replica {spec.replica} back after {entry['down_s']} s")
            self.replica_kills.append(entry)
            self.restarts.append({"t": entry["t"], "down_s": entry["down_s"],
                                  "snapshot": before})

    @contextlib.contextmanager
    def _one_fault(self):
        """One server fault at a time: a restart still waiting for its server to come up (a
        slow start under load) must not have that process killed by the next fault."""
        with self._fault_lock:
            self._restarting = True
            try:
                yield
            finally:
                self._restarting = False

    _broker_down = False

    def _broker_outage(self, spec) -> None:
        self._broker_down = True
        try:
            t = time.monotonic()
            connected = sum(1 for d in self.devices if d.wakeup and d.wakeup.connected.is_set())
            self.broker.stop(hard=spec.hard)
            time.sleep(spec.down_s)
            self.broker.start()
            self.broker_outages.append({"t": round(t - self._t0, 2), "down_s": round(
                time.monotonic() - t, 2), "hard": spec.hard, "connected_before": connected})
            self.say(f"broker back after {time.monotonic() - t:.1f}s down")
        finally:
            self._broker_down = False

    def _push_stats(self) -> dict[str, Any] | None:
        if self.broker is None:
            return None
        # Agents reconnect with back-off (up to 60 s): give them that long to come back.
        deadline = time.monotonic() + 65
        while time.monotonic() < deadline and not all(
                d.wakeup.connected.is_set() for d in self.devices):
            time.sleep(0.5)
        return {"devices": len(self.devices),
                "connected_at_end": sum(1 for d in self.devices if d.wakeup.connected.is_set()),
                "wakeups_received": sum(d.wakeup.messages for d in self.devices)}

    def close(self) -> None:
        for dev in self.devices:
            if dev.wakeup is not None:
                dev.wakeup.stop()
        if self.broker is not None:
            self.broker.stop()
        if self.lb is not None:
            self.lb.stop()
        for replica in self.replicas:
            replica.stop()
        self.op.close()
        self.inner.close()


def run_fleet(scenario: Scenario, workdir: Path, *, keep: bool = True,
              progress: Callable[[str], None] | None = None,
              after: Callable[[FleetResult], Any] | None = None) -> Any:
    """Run a scenario end to end; `after(result)` runs while the server is still up (the
    invariant checks and the report) and its value is returned."""
    from ._postgres import throwaway_postgres

    workdir = Path(workdir)
    if workdir.exists() and any(workdir.iterdir()):
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        db_url = None
        if scenario.server.db == "postgresql":
            db_url = scenario.server.url or stack.enter_context(throwaway_postgres())
        s3 = None
        if scenario.server.s3:
            from ._seaweed import throwaway_s3

            s3 = stack.enter_context(throwaway_s3())
        fleet = Fleet(scenario, workdir, db_url=db_url, progress=progress, s3=s3)
        try:
            result = fleet.run()
            return after(result) if after is not None else result
        finally:
            fleet.close()

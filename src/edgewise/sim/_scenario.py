"""The scenario file: what fleet to simulate, what to break, and what must hold afterwards.

Invariant: a scenario is fully described by its YAML (plus the seed): the same file gives the
same devices, profiles and fault assignments, so a failing rehearsal can be replayed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "BrokerOutageSpec",
    "ComponentReleaseSpec",
    "ComponentSpec",
    "ReplicaKillSpec",
    "Expectations",
    "FaultsSpec",
    "HardwareProfile",
    "NetworkProfile",
    "ReleaseSpec",
    "RolloutSpec",
    "Scenario",
    "ServerSpec",
    "load_scenario",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSpec(_Strict):
    db: Literal["sqlite", "postgresql"] = "sqlite"
    # PostgreSQL: this SQLAlchemy URL, else a throwaway cluster started for the run.
    url: str | None = None
    rollout_tick_s: float = Field(default=0.5, gt=0)
    # Server processes on one port (`edgewise server run --workers`); above 1: PostgreSQL only.
    workers: int = Field(default=1, ge=1, le=64)
    # Separate server processes (each with `workers`) behind nginx (`edgewise server lb`);
    # above 1: PostgreSQL only.
    replicas: int = Field(default=1, ge=1, le=16)
    # Artifacts in a throwaway S3 store (SeaweedFS); devices download from presigned URLs.
    s3: bool = False

    @model_validator(mode="after")
    def _shared_database(self) -> ServerSpec:
        if (self.workers > 1 or self.replicas > 1) and self.db != "postgresql":
            raise ValueError("several server processes (workers, replicas) share a "
                             "PostgreSQL database: set server.db: postgresql")
        return self


class ReleaseSpec(_Strict):
    """A release to publish: an existing bundle directory, or a tiny synthetic ONNX model."""

    version: str
    name: str = "sim-model"
    bundle: Path | None = None
    broken: bool = False  # synthetic only: outputs disagree with the golden set
    max_latency_ms: float = Field(default=1000.0, gt=0)  # synthetic only: health-check limit


class ComponentReleaseSpec(_Strict):
    """A release of a config component: an existing config bundle (`edgewise config build`),
    or small synthetic files (a JSON and a TOML file) built with the same builder."""

    version: str
    bundle: Path | None = None
    # Synthetic only: the files fail the manifest's own check on the device (`mode.txt` says
    # "invalid"), so every device refuses the release at install and stays on the old one.
    broken: bool = False


class ComponentSpec(_Strict):
    """A component beside the model, installed fleet-wide at its baseline before the rollout.
    Config files only: they need no container engine (an app would need a simulated one)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    kind: Literal["config"] = "config"
    baseline: ComponentReleaseSpec
    candidate: ComponentReleaseSpec | None = None  # needed when the rollout moves it


class RolloutSpec(_Strict):
    # Which component's candidate the rollout moves: "model", or the name of one of
    # `components` (the model and the other components then stay on their baseline).
    component: str = "model"
    stages: str = "canary:2%,pilot:20%,broad:100%"
    min_soak_s: float = Field(default=0.0, ge=0)
    # Gates as the server's API takes them (edgewise.server.rollouts.engine.Gates). Latency and
    # memory ratios are measured per process, which many simulated devices share: off here.
    gates: dict[str, float | None] = Field(default_factory=lambda: {
        "max_latency_ratio": None, "max_memory_ratio": None})


class NetworkProfile(_Strict):
    name: str
    weight: float = Field(default=1.0, gt=0)
    latency_ms: float = Field(default=0.0, ge=0)
    jitter_ms: float = Field(default=0.0, ge=0)
    bandwidth_kbps: float | None = Field(default=None, gt=0)
    loss: float = Field(default=0.0, ge=0, lt=1)  # chance a request fails to connect
    disconnect_every_s: float = Field(default=0.0, ge=0)  # 0: never goes offline
    disconnect_for_s: float = Field(default=0.0, ge=0)


class HardwareProfile(_Strict):
    name: str
    weight: float = Field(default=1.0, gt=0)
    latency_factor: float = Field(default=1.0, gt=0)  # scales measured inference latency
    extra_latency_ms: float = Field(default=0.0, ge=0)
    unsupported_versions: list[str] = Field(default_factory=list)  # fail the health check


class PowerCutSpec(_Strict):
    fraction: float = Field(default=0.0, ge=0, le=1)
    count: int | None = Field(default=None, ge=0)
    states: list[str] | Literal["all"] = "all"  # cycled over the chosen devices
    when: list[Literal["before", "after"]] = Field(default_factory=lambda: ["before", "after"])


class CountedFault(_Strict):
    fraction: float = Field(default=0.0, ge=0, le=1)
    count: int | None = Field(default=None, ge=0)
    times: int = Field(default=1, ge=1)  # how many attempts it breaks before clearing


class CorruptSpec(CountedFault):
    mode: Literal["corrupt", "truncate"] = "corrupt"


class ClockSkewSpec(_Strict):
    fraction: float = Field(default=0.0, ge=0, le=1)
    count: int | None = Field(default=None, ge=0)
    skew_s: float = 3600.0


class ProcessKillSpec(_Strict):
    """Real agent processes SIGKILLed by EDGEWISE_FAULT (fidelity check of the in-process
    power cuts); each runs in addition to the in-process devices."""

    states: list[str] = Field(default_factory=lambda: ["installing:before",
                                                       "health-checking:after"])


class ServerRestartSpec(_Strict):
    at_s: float = Field(ge=0)  # seconds after the rollout was created
    down_s: float = Field(default=1.0, ge=0)
    hard: bool = False  # SIGKILL the server instead of a clean shutdown


class ReplicaKillSpec(_Strict):
    """One server replica (of `server.replicas`) SIGKILLed in the middle of the rollout; the
    load balancer sends its requests to the others."""

    at_s: float = Field(ge=0)  # seconds after the rollout was created
    replica: int = Field(default=0, ge=0)
    restart_after_s: float | None = Field(default=None, ge=0)  # None: it stays down


class BrokerOutageSpec(_Strict):
    """The MQTT broker goes away (needs `push: true`); agents fall back to polling."""

    at_s: float = Field(ge=0)  # seconds after the rollout was created
    down_s: float = Field(default=5.0, ge=0)
    hard: bool = False  # SIGKILL the broker instead of a clean shutdown


class FaultsSpec(_Strict):
    power_cut: PowerCutSpec = Field(default_factory=PowerCutSpec)
    disk_full: CountedFault = Field(default_factory=CountedFault)
    corrupt_download: CorruptSpec = Field(default_factory=CorruptSpec)
    clock_skew: ClockSkewSpec = Field(default_factory=ClockSkewSpec)
    process_kill: ProcessKillSpec | None = None
    server_restarts: list[ServerRestartSpec] = Field(default_factory=list)
    replica_kills: list[ReplicaKillSpec] = Field(default_factory=list)
    broker_outages: list[BrokerOutageSpec] = Field(default_factory=list)


class Expectations(_Strict):
    rollout: Literal["completed", "aborted", "paused", "rolled-back"] | None = "completed"
    final_stage: str | None = None
    min_on_candidate: float | None = Field(default=None, ge=0, le=1)  # fraction of devices
    max_on_candidate: float | None = Field(default=None, ge=0, le=1)
    max_bricked: int = 0
    max_lost_records: int = 0
    max_wall_s: float | None = None
    invariants: bool = True


class Scenario(_Strict):
    name: str
    description: str = ""
    seed: int = 0
    devices: int = Field(ge=1)
    workers: int = Field(default=8, ge=1, le=256)  # threads driving the in-process agents
    poll_interval_s: float = Field(default=1.0, gt=0)
    timeout_s: float = Field(default=300.0, gt=0)
    sample_s: float = Field(default=1.0, gt=0)
    timezones: list[str] = Field(default_factory=lambda: ["UTC"])
    # Maintenance window for the whole fleet (the group's), e.g. {days: daily, start: "02:00",
    # duration_min: 60}; None: install at once.
    window: dict | None = None
    server: ServerSpec = Field(default_factory=ServerSpec)
    # Push wake-ups: a real Mosquitto broker (TLS) for the run, the server publishing to it and
    # every simulated device subscribed with the agent's own MQTT client (one connection each:
    # keep such fleets to hundreds of devices).
    push: bool = False
    baseline: ReleaseSpec = Field(default_factory=lambda: ReleaseSpec(version="1.0.0"))
    candidate: ReleaseSpec = Field(default_factory=lambda: ReleaseSpec(version="2.0.0"))
    components: list[ComponentSpec] = Field(default_factory=list)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    network: list[NetworkProfile] = Field(default_factory=lambda: [NetworkProfile(name="lan")])
    hardware: list[HardwareProfile] = Field(
        default_factory=lambda: [HardwareProfile(name="generic")])
    faults: FaultsSpec = Field(default_factory=FaultsSpec)
    # Health-check every device's active slot afterwards ("all"), or verify every slot's
    # hashes and health-check one device per release and hardware ("sample": for big fleets).
    invariant_health: Literal["all", "sample"] = "all"
    expect: Expectations = Field(default_factory=Expectations)

    @model_validator(mode="after")
    def _check(self) -> Scenario:
        if self.baseline.version == self.candidate.version and \
                self.baseline.name == self.candidate.name:
            raise ValueError("baseline and candidate must be different releases")
        names = [c.name for c in self.components]
        if len(set(names)) != len(names) or "model" in names:
            raise ValueError(f"components: names must be unique and not 'model' ({names})")
        if self.rollout.component != "model":
            spec = next((c for c in self.components if c.name == self.rollout.component), None)
            if spec is None:
                raise ValueError(f"rollout.component {self.rollout.component!r} is not one of "
                                 f"components ({', '.join(names) or 'none'})")
            if spec.candidate is None or spec.candidate.version == spec.baseline.version:
                raise ValueError(f"component {spec.name}: the rollout needs a candidate "
                                 "release other than its baseline")
        if self.faults.broker_outages and not self.push:
            raise ValueError("broker_outages need push: true (there is no broker without it)")
        for kill in self.faults.replica_kills:
            if kill.replica >= self.server.replicas:
                raise ValueError(f"replica_kills: replica {kill.replica} does not exist "
                                 f"(server.replicas: {self.server.replicas})")
        return self


def load_scenario(path: Path | str) -> Scenario:
    path = Path(path)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a scenario is a YAML mapping")
    scenario = Scenario.model_validate(data)
    # Bundle paths are relative to the scenario file.
    specs = [scenario.baseline, scenario.candidate]
    specs += [r for c in scenario.components for r in (c.baseline, c.candidate) if r is not None]
    for spec in specs:
        if spec.bundle is not None and not spec.bundle.is_absolute():
            spec.bundle = (path.parent / spec.bundle).resolve()
    return scenario

"""Rollout decisions: a pure function of what the devices reported. No I/O, no clock.

Invariant: `decide` only reads its arguments. Given the same view it always returns the same
decision, so every rule is table-testable; the runner (`runner.py`) does the database work.

A rollout moves one stage at a time. Stage k covers the first `stage_size(k)` devices of the
rollout's stable device order (cumulative, so the canary ring stays in every later ring).
Per stage, in this order:

1. abort   when failures (rolled back or failed) exceed `abort_failure_rate` of the stage, or
           the committed devices' model health regresses past a gate (golden-set agreement,
           p95 latency or memory vs. the previous release);
2. pause   when failures exceed `pause_failure_rate`, or users flag the release too often;
3. advance when at least `min_reporting` of the stage has finished, the stage has soaked for
           `min_soak_s`, and no gate tripped; after the last stage the rollout completes;
4. wait    otherwise.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = [
    "Action",
    "Decision",
    "DeviceOutcome",
    "Gates",
    "Stage",
    "StageView",
    "decide",
    "parse_stages",
    "stage_size",
]


class Action(StrEnum):
    WAIT = "wait"
    ADVANCE = "advance"
    COMPLETE = "complete"
    PAUSE = "pause"
    ABORT = "abort"


@dataclass(frozen=True)
class Gates:
    min_reporting: float = 1.0  # fraction of the stage's devices that must have finished
    pause_failure_rate: float = 0.0  # failures above this fraction pause the rollout
    abort_failure_rate: float = 0.2  # failures above this fraction abort it
    min_golden_agreement: float = 1.0  # top-1 agreement on the golden set
    max_latency_ratio: float | None = 1.5  # p95 latency vs the previous release (median)
    max_memory_ratio: float | None = 1.5  # model memory vs the previous release (median)
    # Ratios of tiny numbers are noise: a regression must also exceed these absolute margins.
    latency_slack_ms: float = 2.0
    memory_slack_mb: float = 16.0
    max_flag_rate: float | None = None  # wrong-prediction flags per device that reported
    min_rating: float | None = None  # mean user rating (1-5)
    # Input drift: share of inputs the release's own detector calls anomalous, pooled over
    # the stage's committed devices, once they scored at least `min_drift_inputs`.
    max_anomalous_share: float | None = None
    min_drift_inputs: int = 200


@dataclass(frozen=True)
class Stage:
    name: str
    percent: float | None = None
    count: int | None = None
    min_soak_s: float = 0.0
    gates: Gates = field(default_factory=Gates)

    def __post_init__(self) -> None:
        if (self.percent is None) == (self.count is None):
            raise ValueError(f"stage {self.name!r}: give exactly one of percent or count")
        if self.percent is not None and not 0 < self.percent <= 100:
            raise ValueError(f"stage {self.name!r}: percent must be in (0, 100]")
        if self.count is not None and self.count < 1:
            raise ValueError(f"stage {self.name!r}: count must be >= 1")


def stage_size(stage: Stage, total: int) -> int:
    if stage.count is not None:
        return min(stage.count, total)
    return min(total, max(1, math.ceil(total * stage.percent / 100)))  # type: ignore[operator]


def parse_stages(spec: str, *, min_soak_s: float = 0.0, gates: Gates | None = None) -> list[Stage]:
    """`canary:1,field-test:20%,broad:100%` -> stages (count or percent of the group)."""
    stages = []
    for part in spec.split(","):
        name, _, size = part.strip().partition(":")
        if not name or not size:
            raise ValueError(f"bad stage {part!r}: use NAME:COUNT or NAME:PERCENT%")
        try:
            if size.endswith("%"):
                stage = Stage(name, percent=float(size[:-1]), min_soak_s=min_soak_s,
                              gates=gates or Gates())
            else:
                stage = Stage(name, count=int(size), min_soak_s=min_soak_s,
                              gates=gates or Gates())
        except ValueError as exc:
            raise ValueError(f"bad stage {part!r}: {exc}") from None
        stages.append(stage)
    if not stages:
        raise ValueError("a rollout needs at least one stage")
    return stages


@dataclass(frozen=True)
class DeviceOutcome:
    device_id: str
    outcome: str | None  # None while in progress; "committed" | "rolled-back" | "failed"
    golden_agreement: float | None = None
    p95_latency_ms: float | None = None
    memory_mb: float | None = None
    previous_p95_latency_ms: float | None = None
    previous_memory_mb: float | None = None
    flags: int = 0
    rating: float | None = None
    inputs: int = 0  # inputs the device's anomaly detector scored (drift aggregates)
    anomalous: int = 0


@dataclass(frozen=True)
class StageView:
    stage: Stage
    is_last: bool
    stage_devices: int  # how many devices this stage covers (cumulative)
    soaked_s: float  # seconds since the stage started
    outcomes: tuple[DeviceOutcome, ...]  # one per device of the stage that is known


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str


def _regression(values: list[tuple[float, float]], *, max_ratio: float,
                slack: float) -> float | None:
    """The median new/old ratio if it exceeds `max_ratio` and the median growth exceeds
    `slack` (absolute units); else None."""
    pairs = [(new, old) for new, old in values if old and old > 0]
    if not pairs:
        return None
    ratio = statistics.median(new / old for new, old in pairs)
    growth = statistics.median(new - old for new, old in pairs)
    return ratio if ratio > max_ratio and growth > slack else None


def decide(view: StageView) -> Decision:
    gates = view.stage.gates
    n = max(view.stage_devices, 1)
    finished = [o for o in view.outcomes if o.outcome is not None]
    failed = [o for o in finished if o.outcome in ("rolled-back", "failed")]
    committed = [o for o in finished if o.outcome == "committed"]

    # 1. abort: failures, then health regressions of the devices that committed.
    if len(failed) / n > gates.abort_failure_rate:
        return Decision(Action.ABORT, f"{len(failed)}/{view.stage_devices} devices failed in "
                        f"{view.stage.name} (abort above {gates.abort_failure_rate:.0%})")
    agreements = [o.golden_agreement for o in committed if o.golden_agreement is not None]
    if agreements and min(agreements) < gates.min_golden_agreement:
        return Decision(Action.ABORT, f"golden-set agreement {min(agreements):.0%} < "
                        f"{gates.min_golden_agreement:.0%}")
    if gates.max_latency_ratio is not None:
        ratio = _regression([(o.p95_latency_ms, o.previous_p95_latency_ms) for o in committed
                             if o.p95_latency_ms is not None and o.previous_p95_latency_ms],
                            max_ratio=gates.max_latency_ratio, slack=gates.latency_slack_ms)
        if ratio is not None:
            return Decision(Action.ABORT, f"p95 latency {ratio:.2f}x the previous release "
                            f"(limit {gates.max_latency_ratio:.2f}x)")
    if gates.max_memory_ratio is not None:
        ratio = _regression([(o.memory_mb, o.previous_memory_mb) for o in committed
                             if o.memory_mb is not None and o.previous_memory_mb],
                            max_ratio=gates.max_memory_ratio, slack=gates.memory_slack_mb)
        if ratio is not None:
            return Decision(Action.ABORT, f"model memory {ratio:.2f}x the previous release "
                            f"(limit {gates.max_memory_ratio:.2f}x)")

    # 2. pause: softer failure threshold, user feedback.
    if failed and len(failed) / n > gates.pause_failure_rate:
        return Decision(Action.PAUSE, f"{len(failed)}/{view.stage_devices} devices failed in "
                        f"{view.stage.name} (pause above {gates.pause_failure_rate:.0%})")
    if gates.max_flag_rate is not None and committed:
        rate = sum(o.flags for o in committed) / len(committed)
        if rate > gates.max_flag_rate:
            return Decision(Action.PAUSE, f"users flagged {rate:.2f} wrong predictions per "
                            f"device (limit {gates.max_flag_rate:.2f})")
    ratings = [o.rating for o in committed if o.rating is not None]
    if gates.min_rating is not None and ratings and statistics.mean(ratings) < gates.min_rating:
        return Decision(Action.PAUSE, f"mean user rating {statistics.mean(ratings):.1f} < "
                        f"{gates.min_rating:.1f}")

    if gates.max_anomalous_share is not None and committed:
        inputs = sum(o.inputs for o in committed)
        share = sum(o.anomalous for o in committed) / inputs if inputs else 0.0
        if inputs >= gates.min_drift_inputs and share > gates.max_anomalous_share:
            return Decision(Action.PAUSE, f"{share:.1%} of {inputs} inputs look unlike the "
                            f"training data (limit {gates.max_anomalous_share:.1%}): drift")

    # 3. advance once enough devices finished and the stage soaked.
    needed = math.ceil(gates.min_reporting * view.stage_devices)
    if len(finished) < needed:
        return Decision(Action.WAIT, f"{len(finished)}/{needed} devices of {view.stage.name} "
                        "have finished")
    if view.soaked_s < view.stage.min_soak_s:
        return Decision(Action.WAIT, f"{view.stage.name} soaking: {view.soaked_s:.0f}/"
                        f"{view.stage.min_soak_s:.0f} s")
    if view.is_last:
        return Decision(Action.COMPLETE, f"{view.stage.name} finished: "
                        f"{len(committed)}/{view.stage_devices} committed")
    return Decision(Action.ADVANCE, f"{view.stage.name} passed its gates: "
                    f"{len(committed)}/{view.stage_devices} committed")

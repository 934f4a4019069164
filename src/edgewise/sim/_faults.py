"""Device faults injected through the agent's seams: power cuts, full disks, slow or
incompatible hardware, skewed clocks.

Invariant: a fault changes what the real agent *sees* (an exception where power would fail,
an ENOSPC from the slot backend, a health report of the hardware it runs on), never what the
agent decides: the transition table and handlers are the shipped ones.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ..agent import HealthReport, State, health_check
from ..agent._slots import SlotStore
from ..artifacts import read_manifest
from ._scenario import HardwareProfile

__all__ = ["DiskFull", "PowerCut", "PowerCutPlan", "disk_full_slots", "hardware_health_check",
           "power_cut_hook", "skewed_clock"]


class PowerCut(BaseException):  # noqa: N818 - not an error the agent may catch
    """Raised from the agent's fault hook: the Agent object is abandoned where it stands,
    exactly as a power cut would leave its state directory. BaseException so that no
    `except Exception` in the agent can swallow it."""


@dataclass
class PowerCutPlan:
    state: State
    when: str
    fired: bool = False


def power_cut_hook(plan_of: Callable[[], PowerCutPlan | None]) -> Callable[[State, str], None]:
    """The agent's fault hook: cut power once, at the plan's state (the plan may be armed
    later, hence the getter)."""

    def hook(state: State, when: str) -> None:
        plan = plan_of()
        if plan is not None and not plan.fired and state is plan.state and when == plan.when:
            plan.fired = True
            raise PowerCut(f"power cut in {state} ({when})")

    return hook


@dataclass
class DiskFull:
    left: int  # installs that still fail


def disk_full_slots(fault: DiskFull) -> Callable[[Path], SlotStore]:
    """A slot backend whose disk is full for the next `fault.left` installs."""

    class FullDiskSlotStore(SlotStore):
        def install(self, slot: str, source: Path, *, meta: dict,
                    links: dict[str, Path] | None = None) -> None:
            if fault.left > 0:
                fault.left -= 1
                raise OSError(errno.ENOSPC, "No space left on device (simulated)")
            super().install(slot, source, meta=meta, links=links)

    return FullDiskSlotStore


def hardware_health_check(hw: HardwareProfile) -> Callable[[Path], HealthReport] | None:
    """The real golden-set check, then judged as this hardware would run it: latency scaled
    (and the manifest's limit applied again), releases the hardware cannot run refused."""
    if hw.latency_factor == 1.0 and not hw.extra_latency_ms and not hw.unsupported_versions:
        return None

    def check(bundle_dir: Path) -> HealthReport:
        report = health_check(bundle_dir)
        manifest = read_manifest(bundle_dir)
        p95 = report.p95_latency_ms * hw.latency_factor + hw.extra_latency_ms
        reasons = [] if report.passed else [report.reason]
        if manifest.version in hw.unsupported_versions:
            reasons.append(f"{manifest.name}@{manifest.version} cannot run on {hw.name} "
                           "(simulated unsupported operator)")
        if p95 > manifest.golden.max_latency_ms:
            reasons.append(f"p95 latency {p95:.1f} ms > limit "
                           f"{manifest.golden.max_latency_ms:g} ms on {hw.name}")
        return HealthReport(not reasons, report.max_abs_diff, report.top1_agreement, p95,
                            "; ".join(reasons) or "ok", memory_mb=report.memory_mb)

    return check


def skewed_clock(skew_of: Callable[[], float]) -> Callable[[], datetime]:
    """The device's wall clock, off by `skew_of()` seconds (armed later, hence the getter)."""
    return lambda: datetime.now(UTC) + timedelta(seconds=skew_of())

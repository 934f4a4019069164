"""Rollout decisions, table-driven (pure: no server, no clock)."""

from __future__ import annotations

import pytest

from edgewise.server.rollouts.engine import (
    Action,
    DeviceOutcome,
    Gates,
    Stage,
    StageView,
    decide,
    parse_stages,
    stage_size,
)

C, RB, F, P = "committed", "rolled-back", "failed", None


def view(outcomes, *, size=None, soaked=100.0, last=False, gates=Gates(), soak=0.0, **health):
    devs = tuple(DeviceOutcome(device_id=f"d{i}", outcome=o, **health)
                 for i, o in enumerate(outcomes))
    return StageView(stage=Stage("s", count=size or len(outcomes), min_soak_s=soak, gates=gates),
                     is_last=last, stage_devices=size or len(outcomes), soaked_s=soaked,
                     outcomes=devs)


@pytest.mark.parametrize(("outcomes", "kwargs", "action"), [
    ([C], {}, Action.ADVANCE),
    ([C], {"last": True}, Action.COMPLETE),
    ([P], {}, Action.WAIT),  # nobody finished yet
    ([C, P], {}, Action.WAIT),  # min_reporting 100%
    ([C, P], {"gates": Gates(min_reporting=0.5)}, Action.ADVANCE),
    ([C], {"soak": 600, "soaked": 10}, Action.WAIT),  # soaking
    ([RB], {}, Action.ABORT),  # the canary failed its health check
    ([F, C, C, C, C, C], {}, Action.PAUSE),  # 1/6 failed: below abort (20%), above pause (0)
    ([F, C, C, C, C, C], {"gates": Gates(pause_failure_rate=0.2)}, Action.ADVANCE),
    ([F, F, C, C, C, C], {}, Action.ABORT),  # 2/6 > 20%
    ([F, F, P, P, P, P, P, P, P, P, P], {}, Action.PAUSE),  # 2/11 failed early: pause now
    ([F, F, F, P, P, P, P, P, P, P, P], {}, Action.ABORT),  # 3/11 > 20%: abort without waiting
])
def test_failure_gates(outcomes, kwargs, action) -> None:
    assert decide(view(outcomes, **kwargs)).action is action


@pytest.mark.parametrize(("health", "gates", "action"), [
    ({"golden_agreement": 1.0}, Gates(), Action.ADVANCE),
    ({"golden_agreement": 0.875}, Gates(), Action.ABORT),
    ({"golden_agreement": 0.875}, Gates(min_golden_agreement=0.8), Action.ADVANCE),
    ({"p95_latency_ms": 30, "previous_p95_latency_ms": 10}, Gates(), Action.ABORT),
    ({"p95_latency_ms": 12, "previous_p95_latency_ms": 10}, Gates(), Action.ADVANCE),
    ({"p95_latency_ms": 30, "previous_p95_latency_ms": 10}, Gates(max_latency_ratio=None),
     Action.ADVANCE),
    ({"memory_mb": 200, "previous_memory_mb": 50}, Gates(), Action.ABORT),
    ({"memory_mb": 60, "previous_memory_mb": 50}, Gates(), Action.ADVANCE),
    # 3x slower but by 0.02 ms, or 3x the memory but 2 MB more: noise, not a regression.
    ({"p95_latency_ms": 0.03, "previous_p95_latency_ms": 0.01}, Gates(), Action.ADVANCE),
    ({"memory_mb": 3, "previous_memory_mb": 1}, Gates(), Action.ADVANCE),
    ({"p95_latency_ms": 0.03, "previous_p95_latency_ms": 0.01},
     Gates(latency_slack_ms=0.0), Action.ABORT),
    ({"memory_mb": 60, "previous_memory_mb": None}, Gates(), Action.ADVANCE),  # first release
    ({"flags": 3}, Gates(max_flag_rate=1.0), Action.PAUSE),
    ({"flags": 1}, Gates(max_flag_rate=1.0), Action.ADVANCE),
    ({"rating": 2.0}, Gates(min_rating=3.5), Action.PAUSE),
    ({"rating": 4.5}, Gates(min_rating=3.5), Action.ADVANCE),
    # Input drift, pooled over the committed devices (2 x 150 inputs here).
    ({"inputs": 150, "anomalous": 60}, Gates(max_anomalous_share=0.2), Action.PAUSE),
    ({"inputs": 150, "anomalous": 15}, Gates(max_anomalous_share=0.2), Action.ADVANCE),
    ({"inputs": 150, "anomalous": 60}, Gates(), Action.ADVANCE),  # gate off
    ({"inputs": 50, "anomalous": 40}, Gates(max_anomalous_share=0.2), Action.ADVANCE),  # <200
])
def test_health_and_feedback_gates(health, gates, action) -> None:
    assert decide(view([C, C], gates=gates, **health)).action is action


def test_drift_pause_says_why() -> None:
    d = decide(view([C, C], gates=Gates(max_anomalous_share=0.1), inputs=300, anomalous=90))
    assert d.action is Action.PAUSE and "30.0% of 600 inputs" in d.reason and "drift" in d.reason


def test_decisions_explain_themselves() -> None:
    decision = decide(view([RB]))
    assert "1/1 devices failed" in decision.reason


@pytest.mark.parametrize(("spec", "total", "sizes"), [
    ("canary:1,field-test:20%,broad:100%", 10, [1, 2, 10]),
    ("canary:1,field-test:20%,broad:100%", 1, [1, 1, 1]),
    ("a:5%,b:50%", 3, [1, 2]),  # never an empty stage
    ("a:50,b:100%", 7, [7, 7]),  # a count larger than the group is the whole group
])
def test_stage_sizes(spec: str, total: int, sizes: list[int]) -> None:
    assert [stage_size(s, total) for s in parse_stages(spec)] == sizes


@pytest.mark.parametrize("spec", ["", "canary", "canary:0", "x:150%", "x:-1", "a:b"])
def test_bad_stage_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_stages(spec)

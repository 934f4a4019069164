"""The transition table: complete, closed, and every path ends in a rest state."""

from __future__ import annotations

import pytest

from edgewise.agent import REST_STATES, TRANSITIONS, Event, State, next_state, resume_state

HAPPY = [
    (State.IDLE, Event.UPDATE_AVAILABLE, State.DOWNLOADING),
    (State.DOWNLOADING, Event.DOWNLOADED, State.VERIFYING),
    (State.VERIFYING, Event.VERIFIED, State.INSTALLING),
    (State.INSTALLING, Event.INSTALLED, State.ACTIVATING),
    (State.ACTIVATING, Event.ACTIVATED, State.HEALTH_CHECKING),
    (State.HEALTH_CHECKING, Event.HEALTHY, State.COMMITTED),
]


@pytest.mark.parametrize(("state", "event", "expected"), HAPPY)
def test_happy_path(state: State, event: Event, expected: State) -> None:
    assert next_state(state, event) is expected


@pytest.mark.parametrize(("state", "event", "expected"), [
    (State.DOWNLOADING, Event.ERROR, State.FAILED),
    (State.VERIFYING, Event.ERROR, State.FAILED),
    (State.INSTALLING, Event.ERROR, State.FAILED),
    (State.ACTIVATING, Event.ERROR, State.ROLLING_BACK),
    (State.HEALTH_CHECKING, Event.UNHEALTHY, State.ROLLING_BACK),
    (State.HEALTH_CHECKING, Event.ERROR, State.ROLLING_BACK),
    (State.ROLLING_BACK, Event.ROLLED_BACK, State.ROLLED_BACK),
    (State.ROLLING_BACK, Event.ERROR, State.ROLLING_BACK),
])
def test_failure_paths(state: State, event: Event, expected: State) -> None:
    assert next_state(state, event) is expected


def test_failures_before_activation_never_roll_back() -> None:
    # The active slot is untouched until ACTIVATING, so nothing needs undoing before it.
    for state in (State.DOWNLOADING, State.VERIFYING, State.INSTALLING):
        assert next_state(state, Event.ERROR) is State.FAILED


def test_after_activation_every_failure_rolls_back() -> None:
    for (state, event), nxt in TRANSITIONS.items():
        if state in (State.ACTIVATING, State.HEALTH_CHECKING) and event is not Event.ACTIVATED \
                and event is not Event.HEALTHY:
            assert nxt is State.ROLLING_BACK


@pytest.mark.parametrize("rest", sorted(REST_STATES))
def test_rest_states_check_for_updates(rest: State) -> None:
    assert next_state(rest, Event.NO_UPDATE) is rest
    assert next_state(rest, Event.ERROR) is rest
    assert next_state(rest, Event.UPDATE_AVAILABLE) is State.DOWNLOADING


def test_every_state_reaches_a_rest_state() -> None:
    reachable_rest: dict[State, bool] = {}
    for state in State:
        seen, frontier = {state}, [state]
        while frontier:
            s = frontier.pop()
            for (src, _), dst in TRANSITIONS.items():
                if src is s and dst not in seen:
                    seen.add(dst)
                    frontier.append(dst)
        reachable_rest[state] = bool(seen & REST_STATES)
    assert all(reachable_rest.values()), reachable_rest


def test_every_state_has_a_handler_row_and_resume_point() -> None:
    sources = {s for s, _ in TRANSITIONS}
    assert sources == set(State)
    for state in State:
        assert resume_state(state) in State


def test_unknown_pair_is_an_error() -> None:
    with pytest.raises(ValueError, match="no transition"):
        next_state(State.COMMITTED, Event.HEALTHY)

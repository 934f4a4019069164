"""The device update state machine: states, events and the one transition table.

Invariant: the next state is decided here and nowhere else. Handlers (in `_daemon.py`) do one
step and return an `Event`; `next_state` looks the pair up in `TRANSITIONS`. A pair that is not
in the table is a programming error and raises.

    rest states (idle, committed, rolled-back, failed) -- check for an update
        -> downloading -> verifying [-> awaiting-window] -> installing -> activating
        -> health-checking
        -> committed                       (new slot proved itself)
        -> rolling-back -> rolled-back     (activation or health check failed)
    a failure before activation -> failed  (the active slot was never touched)
    awaiting-window: downloaded and verified, waiting for the maintenance window (or a
        user's deferral); a changed assignment cancels it (-> idle: nothing in progress)
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "MAX_STATE_ENTRIES",
    "REST_STATES",
    "TRANSITIONS",
    "WAITING_STATES",
    "Event",
    "State",
    "StateLoopError",
    "next_state",
    "resume_state",
]


class State(StrEnum):
    IDLE = "idle"  # never installed anything
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    AWAITING_WINDOW = "awaiting-window"
    INSTALLING = "installing"
    ACTIVATING = "activating"
    HEALTH_CHECKING = "health-checking"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling-back"
    ROLLED_BACK = "rolled-back"
    FAILED = "failed"


class Event(StrEnum):
    NO_UPDATE = "no-update"
    UPDATE_AVAILABLE = "update-available"
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    OUTSIDE_WINDOW = "outside-window"
    IN_WINDOW = "in-window"
    CANCELLED = "cancelled"
    INSTALLED = "installed"
    ACTIVATED = "activated"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    ROLLED_BACK = "rolled-back"
    ERROR = "error"


REST_STATES = frozenset({State.IDLE, State.COMMITTED, State.ROLLED_BACK, State.FAILED})
# Not rest (an update is staged) but nothing is in flight either: no crash-loop counting.
WAITING_STATES = frozenset({State.AWAITING_WINDOW})

TRANSITIONS: dict[tuple[State, Event], State] = {
    **{(rest, Event.NO_UPDATE): rest for rest in REST_STATES},
    **{(rest, Event.ERROR): rest for rest in REST_STATES},  # server unreachable: try later
    **{(rest, Event.UPDATE_AVAILABLE): State.DOWNLOADING for rest in REST_STATES},
    (State.DOWNLOADING, Event.DOWNLOADED): State.VERIFYING,
    (State.DOWNLOADING, Event.ERROR): State.FAILED,
    (State.VERIFYING, Event.VERIFIED): State.INSTALLING,
    (State.VERIFYING, Event.ERROR): State.FAILED,
    (State.VERIFYING, Event.OUTSIDE_WINDOW): State.AWAITING_WINDOW,
    (State.AWAITING_WINDOW, Event.OUTSIDE_WINDOW): State.AWAITING_WINDOW,
    (State.AWAITING_WINDOW, Event.IN_WINDOW): State.INSTALLING,
    (State.AWAITING_WINDOW, Event.CANCELLED): State.IDLE,
    (State.AWAITING_WINDOW, Event.ERROR): State.AWAITING_WINDOW,  # offline: keep waiting
    (State.INSTALLING, Event.INSTALLED): State.ACTIVATING,
    (State.INSTALLING, Event.ERROR): State.FAILED,
    (State.ACTIVATING, Event.ACTIVATED): State.HEALTH_CHECKING,
    (State.ACTIVATING, Event.ERROR): State.ROLLING_BACK,
    (State.HEALTH_CHECKING, Event.HEALTHY): State.COMMITTED,
    (State.HEALTH_CHECKING, Event.UNHEALTHY): State.ROLLING_BACK,
    (State.HEALTH_CHECKING, Event.ERROR): State.ROLLING_BACK,
    (State.ROLLING_BACK, Event.ROLLED_BACK): State.ROLLED_BACK,
    # Rolling back only rewrites the active-slot pointer; if even that fails, keep trying.
    (State.ROLLING_BACK, Event.ERROR): State.ROLLING_BACK,
}

# Where a restarted agent continues, given the state it saved before it died. Every handler
# is idempotent, so each in-flight state is simply redone: a half-written inactive slot is
# rewritten, the active pointer is set again, the health check runs again.
_RESUME: dict[State, State] = {state: state for state in State}

# A state entered this many times within one update attempt means a crash loop (e.g. the
# health check kills the process every time): the handler is skipped and ERROR is raised.
MAX_STATE_ENTRIES = 4


class StateLoopError(RuntimeError):
    pass


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise ValueError(f"no transition from {state} on {event}") from None


def resume_state(saved: State) -> State:
    return _RESUME[saved]

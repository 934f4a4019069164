"""Maintenance windows: recurring local-time windows, evaluated in the device's time zone.

Invariant: pure functions of (window, instant, zone). A window is
`{"days": ["mon", ...] | "daily", "start": "HH:MM", "duration_min": N, "max_defer_s": S}`;
it opens at `start` local time on the given days (wall clock, so DST shifts the UTC time)
and may run past midnight. The agent gets the same dict and uses the same code.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["DAYS", "in_window", "next_window_start", "parse_window", "zone"]

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r}") from exc


def parse_window(window: dict[str, Any]) -> tuple[frozenset[int], int, int, int]:
    """Validate; return (weekdays, start minute of day, duration minutes, max defer s)."""
    if not isinstance(window, dict):
        raise ValueError("a window is an object")
    days = window.get("days", "daily")
    if days == "daily":
        weekdays = frozenset(range(7))
    else:
        if not isinstance(days, list) or not days or any(d not in DAYS for d in days):
            raise ValueError(f"window days must be 'daily' or a list of {', '.join(DAYS)}")
        weekdays = frozenset(DAYS.index(d) for d in days)
    start = str(window.get("start", ""))
    try:
        hh, mm = (int(x) for x in start.split(":"))
        if not (0 <= hh < 24 and 0 <= mm < 60):
            raise ValueError
    except ValueError:
        raise ValueError(f"window start {start!r} is not HH:MM") from None
    duration = window.get("duration_min")
    if not isinstance(duration, int) or not 1 <= duration <= 7 * 24 * 60:
        raise ValueError("window duration_min must be an integer of minutes (1 .. 1 week)")
    max_defer = window.get("max_defer_s", 0)
    if not isinstance(max_defer, int) or max_defer < 0:
        raise ValueError("max_defer_s must be a non-negative integer")
    return weekdays, hh * 60 + mm, duration, max_defer


def _openings(window: dict[str, Any], now: datetime, tz: ZoneInfo):
    weekdays, start_min, duration, _ = parse_window(window)
    local = now.astimezone(tz)
    # Windows may span midnight (or days): look back far enough to catch one still open.
    for offset in range(-(duration // 1440) - 1, 8):
        day = (local + timedelta(days=offset)).date()
        if day.weekday() not in weekdays:
            continue
        opens = datetime(day.year, day.month, day.day, start_min // 60, start_min % 60,
                         tzinfo=tz)
        yield opens.astimezone(UTC), (opens + timedelta(minutes=duration)).astimezone(UTC)


def in_window(window: dict[str, Any] | None, now: datetime, tz_name: str = "UTC") -> bool:
    """No window means always allowed."""
    if window is None:
        return True
    return any(o <= now < c for o, c in _openings(window, now, zone(tz_name)))


def next_window_start(window: dict[str, Any] | None, now: datetime,
                      tz_name: str = "UTC") -> datetime | None:
    """The start of the window that is open now, or of the next one."""
    if window is None:
        return None
    for opens, closes in _openings(window, now, zone(tz_name)):
        if closes > now:
            return opens
    return None

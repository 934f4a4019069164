"""Maintenance windows in the device's own time zone, across midnight and DST."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from edgewise.windows import in_window, next_window_start, parse_window

NIGHT = {"days": "daily", "start": "02:00", "duration_min": 120}


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(("window", "now", "tz", "inside"), [
    (None, utc(2026, 6, 1, 12), "UTC", True),  # no window: always
    (NIGHT, utc(2026, 6, 1, 2, 30), "UTC", True),
    (NIGHT, utc(2026, 6, 1, 4, 0), "UTC", False),  # closes at 04:00 (exclusive)
    (NIGHT, utc(2026, 6, 1, 1, 59), "UTC", False),
    # Berlin is UTC+2 in June: 02:00-04:00 local is 00:00-02:00 UTC.
    (NIGHT, utc(2026, 6, 1, 0, 30), "Europe/Berlin", True),
    (NIGHT, utc(2026, 6, 1, 2, 30), "Europe/Berlin", False),
    # ... and UTC+1 in January: 01:00-03:00 UTC.
    (NIGHT, utc(2026, 1, 15, 2, 30), "Europe/Berlin", True),
    (NIGHT, utc(2026, 1, 15, 0, 30), "Europe/Berlin", False),
    # New York (UTC-4 in June): 02:00 local = 06:00 UTC.
    (NIGHT, utc(2026, 6, 1, 6, 30), "America/New_York", True),
    # Across midnight: 23:00 + 3 h, local Tokyo (UTC+9): 14:00-17:00 UTC.
    ({"days": "daily", "start": "23:00", "duration_min": 180}, utc(2026, 6, 1, 16, 59),
     "Asia/Tokyo", True),
    # Weekdays only: 2026-06-06 is a Saturday.
    ({"days": ["mon", "tue", "wed", "thu", "fri"], "start": "00:00", "duration_min": 1440},
     utc(2026, 6, 6, 12), "UTC", False),
    ({"days": ["sat"], "start": "00:00", "duration_min": 1440}, utc(2026, 6, 6, 12), "UTC",
     True),
])
def test_in_window(window, now, tz, inside) -> None:
    assert in_window(window, now, tz) is inside


def test_dst_spring_forward_day_keeps_local_wall_clock() -> None:
    # Europe/Berlin switches to summer time on 2026-03-29 at 02:00 local (01:00 UTC).
    window = {"days": "daily", "start": "04:00", "duration_min": 60}
    before = next_window_start(window, utc(2026, 3, 28, 0), "Europe/Berlin")
    after = next_window_start(window, utc(2026, 3, 29, 0), "Europe/Berlin")
    assert before == utc(2026, 3, 28, 3)  # 04:00 CET = 03:00 UTC
    assert after == utc(2026, 3, 29, 2)  # 04:00 CEST = 02:00 UTC


def test_next_window_start_is_the_open_one_or_the_next() -> None:
    assert next_window_start(NIGHT, utc(2026, 6, 1, 3), "UTC") == utc(2026, 6, 1, 2)
    assert next_window_start(NIGHT, utc(2026, 6, 1, 5), "UTC") == utc(2026, 6, 2, 2)
    assert next_window_start(None, utc(2026, 6, 1, 5), "UTC") is None


@pytest.mark.parametrize("bad", [
    {"start": "25:00", "duration_min": 10},
    {"start": "02:00"},
    {"start": "02:00", "duration_min": 0},
    {"days": ["funday"], "start": "02:00", "duration_min": 10},
    {"days": "daily", "start": "02:00", "duration_min": 10, "max_defer_s": -1},
    "not a dict",
])
def test_invalid_windows(bad) -> None:
    with pytest.raises(ValueError):
        parse_window(bad)


def test_unknown_time_zone() -> None:
    with pytest.raises(ValueError, match="unknown time zone"):
        in_window(NIGHT, utc(2026, 6, 1), "Mars/Olympus")

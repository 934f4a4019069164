"""Rollout progress over time, as plain numbers for an inline SVG. No I/O, no clock.

Invariant: `progress_series` only reads its arguments, and `chart` returns coordinates and
labels only (no markup): the template draws them, so Jinja's autoescape covers every label.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

__all__ = ["Chart", "Marker", "Point", "chart", "progress_series"]

FAILED_STATES = frozenset({"rolled-back", "failed"})


@dataclass(frozen=True)
class Point:
    ts: datetime
    assigned: int
    committed: int
    failed: int


@dataclass(frozen=True)
class Marker:
    ts: datetime
    label: str
    kind: str  # "stage" | "pause" | "resume" | "stop"


def progress_series(*, start: datetime, assigned: Iterable[tuple[datetime, str]] = (),
                    outcomes: Iterable[tuple[datetime, str, str]],
                    assigned_counts: Iterable[tuple[datetime, int]] = ()) -> list[Point]:
    """Cumulative counts after every change.

    `assigned`: (when, device) each time the rollout assigned a device its release;
    `assigned_counts`: (when, how many devices), for callers that know each device is
    assigned once (a rollout's members; the database counts them);
    `outcomes`: (when, device, final state) each time a device reported how the rollout's
    release ended for it. A device counts once, by its latest outcome.
    """
    changes: list[tuple[datetime, int, str | None, str, int]] = [
        (ts, 0, dev, "assigned", 1) for ts, dev in assigned]
    changes += [(ts, 0, None, "assigned", n) for ts, n in assigned_counts]
    counted_mode = any(dev is None for _ts, _o, dev, _w, _n in changes)
    changes += [(ts, 1, dev, state, 0) for ts, dev, state in outcomes]
    changes.sort(key=lambda c: (c[0], c[1]))
    seen: set[str] = set()
    counted = 0
    latest: dict[str, str] = {}
    committed = failed = 0  # kept as it changes: a rollout may hold 100,000 devices
    points = [Point(start, 0, 0, 0)]
    for ts, _order, device, what, n in changes:
        if device is None:
            counted += n
        elif what == "assigned" or not counted_mode:
            seen.add(device)
        if what != "assigned":
            before = latest.get(device)
            committed -= before == "committed"
            failed -= before in FAILED_STATES
            latest[device] = what
            committed += what == "committed"
            failed += what in FAILED_STATES
        points.append(Point(max(ts, start), len(seen) + counted, committed, failed))
    return points


@dataclass(frozen=True)
class Chart:
    """Everything the template needs, in SVG user units."""

    width: int
    height: int
    plot: tuple[float, float, float, float]  # left, top, right, bottom
    lines: dict[str, str]  # series name -> "x,y x,y ..." for <polyline points=...>
    any_failed: bool
    y_ticks: list[tuple[float, int]]
    x_ticks: list[tuple[float, str]]
    markers: list[tuple[float, str, str]]  # x, label, kind
    total: int
    empty: bool
    # The chart's data as a table: the last point in each unit across (at most `width` rows,
    # however many devices changed state), plus the first.
    points: list[Point] = field(default_factory=list)


def _nice_step(total: int, most: int = 5) -> int:
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000):
        if total / step <= most:
            return step
    return max(1, total // most)


def chart(points: Sequence[Point], markers: Sequence[Marker], *, total: int, end: datetime,
          width: int = 1120, height: int = 300) -> Chart:
    """Lay out step lines of assigned/committed/failed devices from the first point to `end`."""
    left, top, right, bottom = 48.0, 36.0, width - 16.0, height - 34.0
    start = points[0].ts if points else end
    last = max([end, *(p.ts for p in points), *(m.ts for m in markers)])
    span_s = max((last - start).total_seconds(), 1.0)
    y_max = max(total, *(p.assigned for p in points), 1) if points else max(total, 1)

    def x(ts: datetime) -> float:
        return round(left + (right - left) * (ts - start).total_seconds() / span_s, 1)

    def y(count: int) -> float:
        return round(bottom - (bottom - top) * count / y_max, 1)

    # One point per tenth of a unit across (the last there): the line looks the same, and
    # its size no longer grows with the fleet.
    drawn: dict[float, Point] = {}
    table: dict[int, Point] = {}
    for p in points:
        drawn[x(p.ts)] = p
        table[int(x(p.ts))] = p
    lines: dict[str, str] = {}
    for name in ("assigned", "committed", "failed"):
        coords: list[str] = []
        previous: int | None = None
        for p in drawn.values():
            value = getattr(p, name)
            if previous is not None and value != previous:
                coords.append(f"{x(p.ts)},{y(previous)}")  # a step: across, then up
            coords.append(f"{x(p.ts)},{y(value)}")
            previous = value
        if previous is not None:
            coords.append(f"{x(last)},{y(previous)}")
        lines[name] = " ".join(coords)

    step = _nice_step(y_max)
    y_ticks = [(y(v), v) for v in range(0, y_max + 1, step)]
    def label(ts: datetime) -> str:
        if span_s >= 3 * 3600:
            return ts.strftime("%m-%d %H:%M")
        if span_s < 20:  # ticks less than 5 s apart: tenths keep them distinct
            return ts.strftime("%H:%M:%S") + f".{ts.microsecond // 100_000}"
        return ts.strftime("%H:%M:%S")

    ticks = [start + timedelta(seconds=span_s * i / 4) for i in range(5)]
    x_ticks = [(x(ts), label(ts)) for ts in ticks]
    return Chart(width=width, height=height, plot=(left, top, right, bottom), lines=lines,
                 any_failed=any(p.failed for p in points),
                 y_ticks=y_ticks, x_ticks=x_ticks,
                 markers=[(x(m.ts), m.label, m.kind) for m in markers], total=total,
                 empty=not any(p.assigned for p in points),
                 points=[*points[:1], *(p for p in table.values() if p is not points[0])])

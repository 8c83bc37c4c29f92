"""The overview's chart, laid out in Python and drawn as inline SVG by the template: no script, no
library, and the numbers stay in the page (each bar has a title, and a table follows the chart)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Bar", "Chart", "throughput_chart"]

SERIES = (("succeeded", "succeeded"), ("retry_scheduled", "failed, retried"), ("dead_lettered", "failed for good"))
"""Stacked from the bottom: the kind of outcome and what the legend calls it."""


@dataclass(frozen=True)
class Bar:
    x: float
    width: float
    label: str
    segments: tuple[tuple[str, float, float], ...]
    """(kind, y, height) of each non-empty segment, bottom first."""
    failure_rate: float | None
    """Failed attempts over all attempts that ended in the slot; ``None`` when none ended."""


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    top: int
    """The largest count a bar may reach (the axis' top label)."""
    bars: tuple[Bar, ...]
    rate_points: str
    """The failure rate as an SVG polyline (0 % at the bottom, 100 % at the top)."""
    rate_dots: tuple[tuple[float, float], ...]
    """The polyline's points, each drawn as a dot (a lone point draws no line)."""
    totals: dict[str, int]
    failure_rate: float | None


def _nice(value: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50... at least ``value``."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= value:
                return step * factor
        step *= 10


def _rate(failed: int, ended: int) -> float | None:
    return None if ended == 0 else failed / ended


def throughput_chart(slots: Sequence[Any], *, width: int = 600, height: int = 140) -> Chart:
    """Stacked bars of attempt outcomes per slot (``slots``: the ``ActivitySlot`` of ``/v1/activity``)."""
    counts = [{kind: int(getattr(slot, kind)) for kind, _ in SERIES} for slot in slots]
    top = _nice(max([sum(c.values()) for c in counts] + [1]))
    step = width / max(len(slots), 1)
    bars: list[Bar] = []
    points: list[tuple[float, float]] = []
    for index, (slot, count) in enumerate(zip(slots, counts, strict=True)):
        x, y, segments = index * step, float(height), []
        for kind, _ in SERIES:
            if count[kind]:
                h = count[kind] / top * height
                y -= h
                segments.append((kind, round(y, 2), round(h, 2)))
        failed = count["retry_scheduled"] + count["dead_lettered"]
        rate = _rate(failed, sum(count.values()))
        label = (f"{slot.start:%H:%M}: {count['succeeded']} succeeded, {failed} failed"
                 + ("" if rate is None else f" ({rate:.0%} failure rate)"))
        bars.append(Bar(round(x + step * 0.1, 2), round(step * 0.8, 2), label, tuple(segments), rate))
        if rate is not None:
            points.append((round(x + step / 2, 1), round(height - rate * height, 1)))
    totals = {kind: sum(c[kind] for c in counts) for kind, _ in SERIES}
    failed_total = totals["retry_scheduled"] + totals["dead_lettered"]
    return Chart(width, height, top, tuple(bars), " ".join(f"{x},{y}" for x, y in points), tuple(points), totals,
                 _rate(failed_total, sum(totals.values())))

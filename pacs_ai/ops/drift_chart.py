"""One model's daily rates as a small inline SVG (no script) for the queue page: the positive rate
(circles, solid line) over the band the site expects (green), the abstention rate (squares,
dashed line) under its limit (dashed orange), one column per UTC day of the window. A day
outside the band is drawn red; a day with too few films to judge is hollow. Each point's
tooltip (its <title>) gives the day's counts.

The picture is well-formed XML, with the y of rates 0 and 1 on its axis lines (data-rate), so
a test can read each point's rate back from its position.
"""

from __future__ import annotations

import datetime
import html

from pacs_ai.config import DriftConfig
from pacs_ai.ops.drift import Day, ModelDays, judge

WIDTH, HEIGHT = 640, 170
LEFT, RIGHT, TOP, BOTTOM = 40, 12, 8, 22
POSITIVE = "#1f5fa8"  # blue
ABSTENTION = "#8a5a00"  # brown
OUT_OF_BAND = "#c00000"
BAND = "#d9f2d9"
LIMIT = "#d07000"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _percent(rate: float) -> str:
    return f"{rate * 100:.0f} %"


class _Scale:
    def __init__(self, first: datetime.date, last: datetime.date):
        self.first = first
        self.step = (WIDTH - LEFT - RIGHT) / ((last - first).days + 1)
        self.height = HEIGHT - TOP - BOTTOM

    def x(self, day: datetime.date) -> float:
        return LEFT + ((day - self.first).days + 0.5) * self.step

    def y(self, rate: float) -> float:
        return TOP + (1.0 - rate) * self.height


def _runs(days: tuple[Day, ...], rate_of) -> list[list[Day]]:
    """Consecutive days that have the rate: a line is not drawn across a day without films."""
    runs: list[list[Day]] = []
    for day in days:
        if rate_of(day) is None:
            continue
        if runs and (day.day - runs[-1][-1].day).days == 1:
            runs[-1].append(day)
        else:
            runs.append([day])
    return runs


def _line(run: list[Day], rate_of, scale: _Scale, colour: str, css: str, dashed: bool) -> str:
    if len(run) < 2:
        return ""
    points = " ".join(f"{scale.x(d.day):.1f},{scale.y(rate_of(d)):.1f}" for d in run)
    dash = ' stroke-dasharray="4 3"' if dashed else ""
    return (f'<polyline class="{css}" points="{points}" fill="none" stroke="{colour}" '
            f'stroke-width="1.5"{dash}/>')


def chart(model: ModelDays, drift: DriftConfig, first: datetime.date,
          last: datetime.date) -> str:
    """The SVG for one model over the days first..last (UTC)."""
    scale = _Scale(first, last)
    low, high = drift.expected_positive_rate
    right = WIDTH - RIGHT
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="drift-chart" width="{WIDTH}" '
             f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'data-from="{first.isoformat()}" data-to="{last.isoformat()}">',
             f"<title>{_e(model.model)} ({_e(model.role)}): daily positive and abstention "
             f"rates, {first.isoformat()} to {last.isoformat()} (UTC)</title>",
             f'<rect class="band" x="{LEFT}" y="{scale.y(high):.1f}" width="{right - LEFT}" '
             f'height="{scale.y(low) - scale.y(high):.1f}" fill="{BAND}" data-low="{low:g}" '
             f'data-high="{high:g}"><title>expected positive rate {_percent(low)} to '
             f"{_percent(high)}</title></rect>"]
    for rate in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = scale.y(rate)
        parts.append(f'<line class="axis" data-rate="{rate:g}" x1="{LEFT}" y1="{y:.1f}" '
                     f'x2="{right}" y2="{y:.1f}" stroke="#ccc" stroke-width="0.5"/>'
                     f'<text x="{LEFT - 4}" y="{y + 3:.1f}" font-size="10" text-anchor="end" '
                     f'fill="#555">{rate * 100:.0f}%</text>')
    limit = scale.y(drift.max_abstention_rate)
    parts.append(f'<line class="limit" data-rate="{drift.max_abstention_rate:g}" x1="{LEFT}" '
                 f'y1="{limit:.1f}" x2="{right}" y2="{limit:.1f}" stroke="{LIMIT}" '
                 f'stroke-width="1" stroke-dasharray="6 3"><title>abstention limit '
                 f"{_percent(drift.max_abstention_rate)}</title></line>")
    marks = {first: ("start", LEFT), first + (last - first) / 2: ("middle", None),
             last: ("end", right)}  # dates below the plot, the outer ones within it
    for day, (anchor, x) in sorted(marks.items()):
        parts.append(f'<text class="date" x="{scale.x(day) if x is None else x:.1f}" '
                     f'y="{HEIGHT - 6}" font-size="10" text-anchor="{anchor}" fill="#555">'
                     f"{day.isoformat()}</text>")

    def positive(day: Day) -> float | None:
        return day.positive_rate

    def abstention(day: Day) -> float | None:
        return day.abstention_rate

    for run in _runs(model.days, abstention):
        parts.append(_line(run, abstention, scale, ABSTENTION, "abstention-line", True))
    for run in _runs(model.days, positive):
        parts.append(_line(run, positive, scale, POSITIVE, "positive-line", False))
    for day in model.days:
        parts.append(_points(day, drift, scale))
    parts.append("</svg>")
    return "".join(parts)


def _points(day: Day, drift: DriftConfig, scale: _Scale) -> str:
    judgement = judge(day, drift)
    state = "" if judgement.judged else " few"
    x = scale.x(day.day)
    when = day.day.isoformat()
    note = "" if judgement.judged else f"; fewer than {drift.min_films} films, not judged"
    out = []
    if day.positive_rate is not None:
        bad = any(o.startswith("positive") for o in judgement.out_of_band)
        colour = OUT_OF_BAND if bad else POSITIVE
        fill = "#fff" if not judgement.judged else colour
        out.append(
            f'<circle class="positive{state}{" out" if bad else ""}" data-day="{when}" '
            f'cx="{x:.1f}" cy="{scale.y(day.positive_rate):.1f}" r="3.5" fill="{fill}" '
            f'stroke="{colour}" stroke-width="1.5"><title>{when}: {day.positive} of '
            f"{day.classified} classified found pneumonia ({_percent(day.positive_rate)})"
            f"{note}</title></circle>")
    if day.abstention_rate is not None:
        bad = "abstention-rate-high" in judgement.out_of_band
        colour = OUT_OF_BAND if bad else ABSTENTION
        fill = "#fff" if not judgement.judged else colour
        y = scale.y(day.abstention_rate)
        out.append(
            f'<rect class="abstention{state}{" out" if bad else ""}" data-day="{when}" '
            f'x="{x - 3:.1f}" y="{y - 3:.1f}" width="6" height="6" fill="{fill}" '
            f'stroke="{colour}" stroke-width="1.5"><title>{when}: {day.abstained} of '
            f"{day.assessed} assessed abstained ({_percent(day.abstention_rate)})"
            f"{note}</title></rect>")
    return "".join(out)

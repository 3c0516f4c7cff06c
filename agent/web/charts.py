"""Charts as SVG drawn on the server: a line (or step) chart over dates, a bar chart and a timeline.

Pure functions from exact inputs to escaped SVG (`markupsafe.Markup`, ready for a Jinja template): values are
integers (money in minor units), never floats, and every label goes through the caller's `format_value`, so a
chart shows amounts exactly as the rest of the page does. Pixel positions are rounded from exact fractions.
Colours come from classes styled in `static/parley.css` (the CSP allows no inline style); every chart carries a
<title> and a <desc> saying in words what it shows, for screen readers and for anyone who cannot read a chart.
"""

from __future__ import annotations

import html
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from fractions import Fraction

from markupsafe import Markup

__all__ = [
    "Bar",
    "Marker",
    "StepState",
    "TimelineStep",
    "bar_chart",
    "day_label",
    "line_chart",
    "timeline",
]

ValueFormatter = Callable[[int], str]
DayFormatter = Callable[[date], str]

_FONT = 12  # px, the size parley.css gives chart text; used to space rows and margins
_STEP_FONT, _DETAIL_FONT = 15, 13  # px, a timeline's labels and details (parley.css): read as text, not as axes
_VALUE_TICKS = 4  # about this many intervals on a value axis
_DAY_TICKS = 5  # about this many intervals on a date axis


def day_label(day: date) -> str:
    """The default date label: `3 Mar`."""
    return f"{day.day} {day:%b}"


@dataclass(frozen=True)
class Marker:
    """An event on a date chart, drawn as a labelled vertical line; `kind` becomes a class (`payday`, `due`...)."""

    day: date
    label: str
    kind: str = "event"


@dataclass(frozen=True)
class Bar:
    label: str
    value: int


class StepState(StrEnum):
    DONE = "done"
    CURRENT = "current"
    PENDING = "pending"


@dataclass(frozen=True)
class TimelineStep:
    label: str
    state: StepState
    detail: str = ""  # a second, quieter line: a date, an amount


def _text(value: str) -> str:
    return html.escape(value, quote=True)


def _class_name(kind: str) -> str:
    return "".join(character for character in kind.lower() if character.isalnum() or character == "-") or "event"


def _exact(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"chart values are exact integers (money in minor units), not {type(value).__name__}")
    return value


def _scale(offset: int, span: int, pixels: int) -> int:
    """`offset` out of `span` as a whole number of `pixels`, rounded from the exact fraction."""
    return round(Fraction(offset * pixels, span)) if span else 0


def _nice_step(span: int, intervals: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten that covers `span` in at most `intervals` steps."""
    target = max(1, -(-span // intervals))
    magnitude = 1
    while magnitude * 10 <= target:
        magnitude *= 10
    return next(factor * magnitude for factor in (1, 2, 5, 10) if factor * magnitude >= target)


@dataclass(frozen=True)
class _ValueAxis:
    low: int
    high: int
    step: int

    @classmethod
    def covering(cls, values: Sequence[int]) -> _ValueAxis:
        low, high = min(values), max(values)
        step = _nice_step(high - low or max(1, abs(high)), _VALUE_TICKS)
        low, high = low // step * step, -(-high // step) * step
        return cls(low, high if high > low else low + step, step)

    def ticks(self) -> range:
        return range(self.low, self.high + 1, self.step)

    def y(self, value: int, top: int, height: int) -> int:
        return top + _scale(self.high - value, self.high - self.low, height)


@dataclass(frozen=True)
class _Frame:
    """The SVG's size and, inside it, the plot area's edges (in pixels)."""

    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int

    def svg(self, kind: str, title: str, description: str, body: list[str]) -> Markup:
        return Markup(  # noqa: S704 -- every text and attribute in `body` went through _text()
            f'<svg xmlns="http://www.w3.org/2000/svg" class="chart chart-{kind}" '
            f'viewBox="0 0 {self.width} {self.height}" role="img">'
            f"<title>{_text(title)}</title><desc>{_text(description)}</desc>" + "".join(body) + "</svg>"
        )

    def value_y(self, axis: _ValueAxis, value: int) -> int:
        return axis.y(value, self.top, self.bottom - self.top)

    def gridlines(self, axis: _ValueAxis, format_value: ValueFormatter) -> list[str]:
        body = []
        for tick in axis.ticks():
            y = self.value_y(axis, tick)
            body.append(f'<line class="grid" x1="{self.left}" x2="{self.right}" y1="{y}" y2="{y}"/>')
            body.append(
                f'<text class="tick" x="{self.left - 6}" y="{y + 4}" text-anchor="end">'
                f"{_text(format_value(tick))}</text>"
            )
        return body


def _axis_label_width(axis: _ValueAxis, format_value: ValueFormatter) -> int:
    return 12 + 7 * max(len(format_value(tick)) for tick in axis.ticks())


@dataclass(frozen=True)
class _DateScale:
    first: date
    span_days: int
    frame: _Frame

    def x(self, day: date) -> int:
        return self.frame.left + _scale((day - self.first).days, self.span_days, self.frame.right - self.frame.left)

    def ticks(self, format_day: DayFormatter) -> list[str]:
        every = max(1, -(-self.span_days // _DAY_TICKS))
        body = []
        for offset in range(0, self.span_days + 1, every):
            day = date.fromordinal(self.first.toordinal() + offset)
            body.append(
                f'<text class="tick" x="{self.x(day)}" y="{self.frame.bottom + 16}" text-anchor="middle">'
                f"{_text(format_day(day))}</text>"
            )
        return body


def _marker_lines(markers: Sequence[Marker], dates: _DateScale) -> list[str]:
    """A dashed line per marker, its label above the plot on the first of two rows where it does not overlap."""
    frame, body = dates.frame, []
    row_ends = [frame.left - 10**6, frame.left - 10**6]  # where the last label of each row ends
    for marker in sorted(markers, key=lambda marker: marker.day):
        mx, kind = dates.x(marker.day), _class_name(marker.kind)
        body.append(f'<line class="marker marker-{kind}" x1="{mx}" x2="{mx}" y1="{frame.top}" y2="{frame.bottom}"/>')
        half = 7 * len(marker.label) // 2 + 2  # about half the label's width at 12px
        anchor = "start" if mx - half < frame.left else "end" if mx + half > frame.right else "middle"
        start = mx if anchor == "start" else mx - 2 * half if anchor == "end" else mx - half
        row = 0 if start > row_ends[0] else 1 if start > row_ends[1] else 0
        row_ends[row] = start + 2 * half + 4
        body.append(
            f'<text class="marker-label marker-{kind}" x="{mx}" y="{12 + row * (_FONT + 4)}" text-anchor="{anchor}">'
            f"{_text(marker.label)}</text>"
        )
    return body


def line_chart(
    points: Sequence[tuple[date, int]],
    *,
    title: str,
    format_value: ValueFormatter,
    format_day: DayFormatter = day_label,
    step: bool = True,
    threshold: int | None = None,
    threshold_label: str = "",
    markers: Sequence[Marker] = (),
    include_zero: bool = True,
    width: int = 640,
    height: int = 260,
) -> Markup:
    """A value by date, e.g. a projected balance by day.

    `step` draws a value as holding until the next point (a balance), otherwise points are joined straight.
    `threshold` adds a horizontal line (a buffer the balance should stay above) and points below it get the
    class `below`; `markers` are labelled vertical lines (pay days, due dates), on two label rows when crowded.
    Points must be in strictly increasing date order.
    """
    if not points:
        raise ValueError("a line chart needs at least one point")
    days = [day for day, _ in points]
    values = [_exact(value) for _, value in points]
    if any(later <= earlier for earlier, later in itertools.pairwise(days)):
        raise ValueError("a line chart's points must be in strictly increasing date order")
    extra = ([_exact(threshold)] if threshold is not None else []) + ([0] if include_zero else [])
    axis = _ValueAxis.covering(values + extra)
    first = min([days[0], *(marker.day for marker in markers)])
    last = max([days[-1], *(marker.day for marker in markers)])
    frame = _Frame(width, height, _axis_label_width(axis, format_value), width - 16, 12 + 2 * (_FONT + 4), height - 24)
    dates = _DateScale(first, max(1, (last - first).days), frame)
    body = frame.gridlines(axis, format_value) + dates.ticks(format_day)
    threshold_text = threshold_label or (format_value(threshold) if threshold is not None else "")
    if threshold is not None:
        ty = frame.value_y(axis, threshold)
        body.append(f'<line class="threshold" x1="{frame.left}" x2="{frame.right}" y1="{ty}" y2="{ty}"/>')
        body.append(f'<text class="threshold-label" x="{frame.left + 4}" y="{ty - 4}">{_text(threshold_text)}</text>')
    body += _marker_lines(markers, dates)

    coordinates = [(dates.x(day), frame.value_y(axis, value)) for day, value in points]
    path = [f"M{coordinates[0][0]} {coordinates[0][1]}"]
    path += [f"H{px} V{py}" if step else f"L{px} {py}" for px, py in coordinates[1:]]
    if step and dates.x(last) > coordinates[-1][0]:
        path.append(f"H{dates.x(last)}")  # the last value holds to the end of the chart
    body.append(f'<path class="series" d="{" ".join(path)}"/>')
    for (day, value), (px, py) in zip(points, coordinates, strict=True):
        below = " below" if threshold is not None and value < threshold else ""
        tip = _text(f"{format_day(day)}: {format_value(value)}")
        body.append(f'<circle class="point{below}" cx="{px}" cy="{py}" r="3"><title>{tip}</title></circle>')

    low, high = min(points, key=lambda point: point[1]), max(points, key=lambda point: point[1])
    said = [
        f"From {format_day(days[0])} to {format_day(days[-1])}: lowest {format_value(low[1])} on {format_day(low[0])}, "
        f"highest {format_value(high[1])} on {format_day(high[0])}."
    ]
    if threshold is not None:
        under = [format_day(day) for day, value in points if value < threshold]
        said.append(f"Below {threshold_text} on {', '.join(under)}." if under else f"Never below {threshold_text}.")
    said.extend(f"{marker.label}: {format_day(marker.day)}." for marker in markers)
    return frame.svg("line", title, " ".join(said), body)


def bar_chart(
    bars: Sequence[Bar], *, title: str, format_value: ValueFormatter, width: int = 640, height: int = 240
) -> Markup:
    """One bar per label, from a zero baseline (negative values hang below it), each with its value written on it."""
    if not bars:
        raise ValueError("a bar chart needs at least one bar")
    values = [_exact(bar.value) for bar in bars]
    axis = _ValueAxis.covering([*values, 0])
    frame = _Frame(width, height, _axis_label_width(axis, format_value), width - 8, 8 + _FONT + 4, height - 24)
    body = frame.gridlines(axis, format_value)
    band = Fraction(frame.right - frame.left, len(bars))
    bar_width = max(2, round(band * 3 / 5))
    zero = frame.value_y(axis, 0)
    for index, (bar, value) in enumerate(zip(bars, values, strict=True)):
        centre = frame.left + round(band * index + band / 2)
        y = frame.value_y(axis, value)
        sign = "negative" if value < 0 else "positive"
        amount = _text(format_value(value))
        body.append(
            f'<rect class="bar {sign}" x="{centre - bar_width // 2}" y="{min(y, zero)}" width="{bar_width}" '
            f'height="{abs(zero - y)}"><title>{_text(bar.label)}: {amount}</title></rect>'
        )
        value_y = y - 4 if value >= 0 else y + _FONT + 2
        body.append(f'<text class="value" x="{centre}" y="{value_y}" text-anchor="middle">{amount}</text>')
        body.append(
            f'<text class="tick" x="{centre}" y="{frame.bottom + 16}" text-anchor="middle">{_text(bar.label)}</text>'
        )
    body.append(f'<line class="baseline" x1="{frame.left}" x2="{frame.right}" y1="{zero}" y2="{zero}"/>')
    description = "; ".join(f"{bar.label}: {format_value(value)}" for bar, value in zip(bars, values, strict=True))
    return frame.svg("bar", title, description + ".", body)


_STATE_ORDER = {StepState.DONE: 0, StepState.CURRENT: 1, StepState.PENDING: 2}


def timeline(steps: Sequence[TimelineStep], *, title: str, width: int = 480) -> Markup:
    """Ordered steps, top to bottom, like a parcel tracker: done steps, at most one current step, pending steps."""
    if not steps:
        raise ValueError("a timeline needs at least one step")
    order = [_STATE_ORDER[step.state] for step in steps]
    if order != sorted(order) or order.count(_STATE_ORDER[StepState.CURRENT]) > 1:
        raise ValueError("a timeline's steps go done..., at most one current, then pending...")
    row = _STEP_FONT + _DETAIL_FONT + 20
    height = row * len(steps)
    body = []
    for index, step in enumerate(steps):
        cy = index * row + _STEP_FONT
        if index + 1 < len(steps):
            reached = "done" if steps[index + 1].state != StepState.PENDING else "pending"
            body.append(f'<line class="link {reached}" x1="14" x2="14" y1="{cy}" y2="{cy + row}"/>')
        radius = 8 if step.state == StepState.CURRENT else 6
        body.append(f'<circle class="step {step.state}" cx="14" cy="{cy}" r="{radius}"/>')
        label_y = cy + _STEP_FONT // 3  # centres the label's x-height on the circle
        body.append(f'<text class="step-label {step.state}" x="32" y="{label_y}">{_text(step.label)}</text>')
        if step.detail:
            detail_y = label_y + _DETAIL_FONT + 5
            body.append(f'<text class="step-detail" x="32" y="{detail_y}">{_text(step.detail)}</text>')
    said = [f"Step {index + 1} of {len(steps)}: {step.label} ({step.state})." for index, step in enumerate(steps)]
    return _Frame(width, height, 0, width, 0, height).svg("timeline", title, " ".join(said), body)

"""Charts as static SVG text: no script, no network, no library.

Each function returns one ``<svg>`` element, sized by its ``viewBox`` (it scales with the
page), to be placed inline in an HTML page: ``closedloop report --html`` uses them, and a
server can render the same charts on its pages. Every text that comes from the data (names,
labels, values) goes through :func:`esc`: HTML-escaped, with control characters shown as
``\\x1b``-style escapes, so stored text is always shown as data, never as markup.

- :func:`line_chart`: values over a sequence of periods, one line per series, each point's
  confidence interval drawn as a shaded band; a missing point breaks the line;
- :func:`interval_chart`: one row per value, a dot with its interval as an error bar;
- :func:`bar_chart`: one horizontal bar per row;
- :func:`spark_svg`: a small line without axes (for a table cell).

The output depends on the arguments only, so equal data give byte-equal charts.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PALETTE = ("#2563eb", "#dc2626", "#059669", "#9333ea", "#d97706", "#0891b2", "#db2777",
           "#4b5563")
"""Line colours, in the order of the series (distinct for readers with colour deficits
in the first four: blue, red, green, purple)."""
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
MAX_DOTS = 31
"""A line chart of more periods marks only the last point of each line (page size)."""
_CHAR_W = 7.4  # mean width of a character of the 12 px sans-serif labels, for layout


def esc(value: object, limit: int | None = None) -> str:
    """``value`` as HTML text: controls shown escaped, then ``&<>"'`` escaped; cut to
    ``limit`` characters (ending in "…") when longer."""
    text = value if isinstance(value, str) else str(value)
    text = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    if limit is not None and len(text) > limit:
        text = text[:max(limit - 1, 1)] + "…"
    return html.escape(text, quote=True)


def _num(x: float) -> str:
    """A coordinate: two decimals at most, no trailing zeros (stable across platforms)."""
    out = f"{x:.2f}".rstrip("0").rstrip(".")
    return "0" if out == "-0" else out


def _nice_max(high: float) -> float:
    """A round upper bound at or above ``high`` (1, 2, 2.5 or 5 times a power of ten)."""
    if not math.isfinite(high) or high <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(high))
    for step in (1.0, 2.0, 4.0, 6.0, 8.0, 10.0):  # a quarter of each is round too
        if high <= step * power * (1 + 1e-6):  # float noise of a sum of squares
            return step * power
    return 10.0 * power  # pragma: no cover - the loop always returns


def percent(x: float) -> str:
    """``0.125`` → ``12.5%``; whole percents past 10 % and when whole."""
    whole = abs(x * 100 - round(x * 100)) < 1e-9
    return f"{x:.0%}" if whole or abs(x) >= 0.1 else f"{x:.1%}"


def usd(x: float) -> str:
    """A dollar amount: cents from $1 on, else three significant digits ($0.00263)."""
    return f"${x:,.2f}" if abs(x) >= 1 else f"${x:.3g}"


def millis(x: float) -> str:
    """Milliseconds, grouped, no decimals past 100."""
    return f"{x:,.0f} ms" if abs(x) >= 100 else f"{x:.3g} ms"


@dataclass(frozen=True, slots=True)
class ChartPoint:
    """A value with its confidence interval (``low == high == value`` when it has none)."""

    value: float
    low: float
    high: float


@dataclass(frozen=True, slots=True)
class ChartLine:
    """One series of a :func:`line_chart`: a point (or None) per period."""

    name: str
    points: Sequence[ChartPoint | None]


@dataclass(frozen=True, slots=True)
class ChartRow:
    """One row of an :func:`interval_chart` or :func:`bar_chart`: ``label`` on the left,
    ``note`` on the right (both data), the value and its interval (``low``/``high``)."""

    label: str
    value: float
    low: float | None = None
    high: float | None = None
    note: str = ""


def _svg_open(width: float, height: float, title: str) -> str:
    return (f'<svg class="chart" viewBox="0 0 {_num(width)} {_num(height)}" '
            f'width="{_num(width)}" height="{_num(height)}" role="img" '
            f'aria-label="{esc(title)}" font-family="inherit" font-size="12">'
            f"<title>{esc(title)}</title>")


def line_chart(lines: Sequence[ChartLine], periods: Sequence[str], *, title: str,
               fmt: Callable[[float], str] = percent, y_max: float | None = None,
               width: int = 560, height: int = 240) -> str:
    """Values over ``periods`` (their labels, oldest first), one line per
    :class:`ChartLine`, each point's interval drawn as a band, each point a dot with its
    figures as a tooltip (past :data:`MAX_DOTS` periods, only the last one); the y axis
    starts at 0 and ends at ``y_max`` (default: a round number above the highest
    interval). A legend names the lines below the plot."""
    legend_rows = math.ceil(len(lines) / 3) if len(lines) > 1 else 0
    left, right, top, bottom = 58.0, 12.0, 10.0, 26.0 + 18.0 * legend_rows
    plot_w, plot_h = width - left - right, height - top - bottom
    highs = [p.high for line in lines for p in line.points if p is not None]
    top_value = y_max if y_max is not None else _nice_max(max(highs, default=0.0))
    n = max(len(periods), 1)

    def x(i: int) -> float:
        return left + (plot_w * (i + 0.5) / n)

    def y(v: float) -> float:
        v = min(max(v, 0.0), top_value)
        return top + plot_h * (1 - v / top_value)

    out = [_svg_open(width, height, title)]
    for k in range(5):  # grid lines and y labels
        v = top_value * k / 4
        out.append(f'<line x1="{_num(left)}" x2="{_num(width - right)}" y1="{_num(y(v))}" '
                   f'y2="{_num(y(v))}" stroke="#e5e7eb"/>'
                   f'<text x="{_num(left - 6)}" y="{_num(y(v) + 4)}" text-anchor="end" '
                   f'fill="#6b7280">{esc(fmt(v))}</text>')
    widest = max((min(len(p), 14) for p in periods), default=1) * _CHAR_W + 14
    stride = max(1, math.ceil(n / max(int(plot_w // widest), 1)))
    for i in range(0, n, stride):  # labels far enough apart not to overlap
        if i < len(periods):
            out.append(f'<text x="{_num(x(i))}" y="{_num(top + plot_h + 16)}" '
                       f'text-anchor="middle" fill="#6b7280">{esc(periods[i], 14)}</text>')
    out.append(f'<line x1="{_num(left)}" x2="{_num(width - right)}" y1="{_num(top + plot_h)}"'
               f' y2="{_num(top + plot_h)}" stroke="#9ca3af"/>')
    for index, line in enumerate(lines):
        colour = PALETTE[index % len(PALETTE)]
        runs: list[list[tuple[int, ChartPoint]]] = [[]]
        for i, p in enumerate(line.points[:n]):
            if p is None:
                runs.append([])
            else:
                runs[-1].append((i, p))
        for run in (r for r in runs if r):
            if len(run) > 1:
                band = [(x(i), y(p.high)) for i, p in run] + \
                       [(x(i), y(p.low)) for i, p in reversed(run)]
                out.append(f'<polygon points="{" ".join(f"{_num(a)},{_num(b)}" for a, b in band)}"'
                           f' fill="{colour}" fill-opacity="0.12"/>')
                path = " ".join(f"{_num(x(i))},{_num(y(p.value))}" for i, p in run)
                out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" '
                           f'stroke-width="2" stroke-linejoin="round"/>')
            dots = run if n <= MAX_DOTS else run[-1:]  # a dot (and tooltip) per point
            for i, p in dots:
                label = f"{line.name} — {periods[i]}: {fmt(p.value)}"
                if fmt(p.low) != fmt(p.high):  # as shown: float noise is no interval
                    label += f" [{fmt(p.low)}, {fmt(p.high)}]"
                out.append(f'<circle cx="{_num(x(i))}" cy="{_num(y(p.value))}" r="2.5" '
                           f'fill="{colour}"><title>{esc(label)}</title></circle>')
    if legend_rows:
        column = (width - left) / 3
        for index, line in enumerate(lines):
            lx = left + column * (index % 3)
            ly = height - 18.0 * (legend_rows - index // 3) + 6
            colour = PALETTE[index % len(PALETTE)]
            out.append(f'<rect x="{_num(lx)}" y="{_num(ly - 9)}" width="12" height="4" '
                       f'fill="{colour}"/><text x="{_num(lx + 17)}" y="{_num(ly - 3)}" '
                       f'fill="#374151">{esc(line.name, int((column - 24) / _CHAR_W))}'
                       f"<title>{esc(line.name)}</title></text>")
    if not highs:
        out.append(f'<text x="{_num(left + plot_w / 2)}" y="{_num(top + plot_h / 2)}" '
                   f'text-anchor="middle" fill="#6b7280">nothing to count</text>')
    out.append("</svg>")
    return "".join(out)


def _rows_chart(rows: Sequence[ChartRow], *, title: str, fmt: Callable[[float], str],
                x_max: float | None, width: int, bars: bool, label_width: int) -> str:
    row_h, top, label_w, note_w = 22.0, 6.0, float(label_width), 150.0
    height = top + row_h * max(len(rows), 1) + 22
    plot_l, plot_r = label_w + 8, width - note_w - 8
    highest = max((r.high if r.high is not None else r.value for r in rows), default=0.0)
    top_value = x_max if x_max is not None else _nice_max(highest)

    def x(v: float) -> float:
        return plot_l + (plot_r - plot_l) * min(max(v, 0.0), top_value) / top_value

    out = [_svg_open(width, height, title)]
    axis_y = top + row_h * max(len(rows), 1)
    for k in range(5):
        v = top_value * k / 4
        out.append(f'<line x1="{_num(x(v))}" x2="{_num(x(v))}" y1="{_num(top)}" '
                   f'y2="{_num(axis_y)}" stroke="#e5e7eb"/>'
                   f'<text x="{_num(x(v))}" y="{_num(axis_y + 15)}" text-anchor="middle" '
                   f'fill="#6b7280">{esc(fmt(v))}</text>')
    for i, r in enumerate(rows):
        mid = top + row_h * i + row_h / 2
        out.append(f'<text x="{_num(label_w)}" y="{_num(mid + 4)}" text-anchor="end" '
                   f'fill="#111827">{esc(r.label, int(label_w / _CHAR_W))}'
                   f"<title>{esc(r.label)}</title></text>")
        if bars:
            out.append(f'<rect x="{_num(plot_l)}" y="{_num(mid - 7)}" '
                       f'width="{_num(max(x(r.value) - plot_l, 1.0))}" height="14" rx="2" '
                       f'fill="{PALETTE[0]}" fill-opacity="0.8"/>')
        if r.low is not None and r.high is not None:
            out.append(f'<line x1="{_num(x(r.low))}" x2="{_num(x(r.high))}" y1="{_num(mid)}" '
                       f'y2="{_num(mid)}" stroke="#374151" stroke-width="1.5"/>')
            for end in (r.low, r.high):
                out.append(f'<line x1="{_num(x(end))}" x2="{_num(x(end))}" '
                           f'y1="{_num(mid - 5)}" y2="{_num(mid + 5)}" stroke="#374151" '
                           f'stroke-width="1.5"/>')
        if not bars:
            out.append(f'<circle cx="{_num(x(r.value))}" cy="{_num(mid)}" r="4" '
                       f'fill="{PALETTE[1]}"/>')
        note = r.note or fmt(r.value)
        out.append(f'<text x="{_num(plot_r + 10)}" y="{_num(mid + 4)}" fill="#374151">'
                   f"{esc(note, int(note_w / _CHAR_W))}<title>{esc(note)}</title></text>")
    out.append("</svg>")
    return "".join(out)


def interval_chart(rows: Sequence[ChartRow], *, title: str,
                   fmt: Callable[[float], str] = percent, x_max: float | None = None,
                   width: int = 560, label_width: int = 200) -> str:
    """One row per :class:`ChartRow`: a dot at its value and an error bar from ``low`` to
    ``high``, the label on the left (``label_width`` pixels, longer ones cut with "…") and
    the note (default: the value) on the right."""
    return _rows_chart(rows, title=title, fmt=fmt, x_max=x_max, width=width, bars=False,
                       label_width=label_width)


def bar_chart(rows: Sequence[ChartRow], *, title: str, fmt: Callable[[float], str] = str,
              x_max: float | None = None, width: int = 560, label_width: int = 200) -> str:
    """One horizontal bar per :class:`ChartRow` (an error bar too when it has an interval),
    laid out as :func:`interval_chart`."""
    return _rows_chart(rows, title=title, fmt=fmt, x_max=x_max, width=width, bars=True,
                       label_width=label_width)


def spark_svg(values: Sequence[float | None], *, title: str, width: int = 120,
              height: int = 24) -> str:
    """A small line of ``values`` (None: no data) scaled to its own maximum, no axes."""
    n = max(len(values), 1)
    top_value = max((v for v in values if v is not None), default=0.0) or 1.0
    points = [(2 + (width - 4) * (i + 0.5) / n, height - 2 - (height - 4) * v / top_value)
              for i, v in enumerate(values) if v is not None]
    out = [_svg_open(width, height, title).replace('class="chart"', 'class="spark"')]
    out.append(f'<line x1="2" x2="{width - 2}" y1="{height - 2}" y2="{height - 2}" '
               f'stroke="#e5e7eb"/>')
    if len(points) > 1:
        path = " ".join(f"{_num(a)},{_num(b)}" for a, b in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{PALETTE[0]}" '
                   f'stroke-width="1.5"/>')
    for a, b in points[-1:]:
        out.append(f'<circle cx="{_num(a)}" cy="{_num(b)}" r="2" fill="{PALETTE[0]}"/>')
    out.append("</svg>")
    return "".join(out)

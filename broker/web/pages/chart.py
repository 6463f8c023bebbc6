"""A small SVG line chart drawn on the server (the VM page's cycle chart).

Drawn here rather than by a vendored chart library in the browser: the page's data is a few
dozen points at most (a VM keeps up to 25 recovery points), the chart then needs no script, it
prints and reads the same with scripts off, the page's CSP needs nothing more than ``'self'``,
and the values are in a table beside it for screen readers and exact numbers. Every text is
escaped by the template that embeds the returned parts (autoescape); nothing here is markup made
from strings.
"""

from __future__ import annotations

import dataclasses

WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 16, 36


@dataclasses.dataclass(frozen=True)
class Series:
    """One line: its name (the legend and the title of each point) and its (x, y) values."""

    name: str
    css: str  # a class of static/app.css: colour and dash pattern, so lines differ without colour
    points: list[tuple[float, float]]


@dataclasses.dataclass(frozen=True)
class Chart:
    """What the template draws: lines as SVG point lists, axis ticks, each point's marker."""

    width: int
    height: int
    lines: list[tuple[Series, str]]
    markers: list[tuple[str, float, float, str]]  # css, x, y, title
    y_ticks: list[tuple[float, str]]
    x_ticks: list[tuple[float, str]]


def line_chart(
    series: list[Series],
    *,
    y_label: str,
    x_text: dict[float, str],
) -> Chart | None:
    """Scale ``series`` into the chart's box; None when there is nothing to draw.

    ``x_text`` names the x values that get a tick (at most six are shown)."""
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points]
    if not xs:
        return None
    x0, x1 = min(xs), max(xs)
    y1 = max(ys) or 1.0
    span = (x1 - x0) or 1.0

    def px(x: float) -> float:
        return round(LEFT + (x - x0) / span * (WIDTH - LEFT - RIGHT), 1)

    def py(y: float) -> float:
        return round(HEIGHT - BOTTOM - y / y1 * (HEIGHT - TOP - BOTTOM), 1)

    lines = []
    markers = []
    for s in series:
        lines.append((s, " ".join(f"{px(x)},{py(y)}" for x, y in s.points)))
        markers += [(s.css, px(x), py(y), f"{s.name}: {y:g} {y_label}") for x, y in s.points]
    y_ticks = [(py(y1 * i / 4), f"{y1 * i / 4:.3g}") for i in range(5)]
    ticked = sorted(x_text)
    step = max(1, len(ticked) // 6 + (1 if len(ticked) % 6 else 0))
    x_ticks = [(px(x), x_text[x]) for x in ticked[::step]]
    return Chart(WIDTH, HEIGHT, lines, markers, y_ticks, x_ticks)

"""Tables (Markdown, padded so they read as well on a terminal) and number formats."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    intro: str = ""

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def render(self) -> str:
        widths = [len(c) for c in self.columns]
        for row in self.rows:
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], len(cell))

        def line(cells: Sequence[str]) -> str:
            padded = [c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                      for i, c in enumerate(cells)]
            return "| " + " | ".join(padded) + " |"

        sep = "| " + " | ".join(("-" * w if i == 0 else "-" * (w - 1) + ":")
                                for i, w in enumerate(widths)) + " |"
        out = [f"### {self.title}", ""]
        if self.intro:
            out += [self.intro, ""]
        out += [line(self.columns), sep, *(line(r) for r in self.rows)]
        if self.notes:
            out.append("")
            out += [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def num(x: float | None, digits: int = 0) -> str:
    if x is None or x != x:  # NaN
        return "–"
    return f"{x:,.{digits}f}"


def spread(values: Sequence[float], digits: int = 0) -> str:
    """``median (min–max)`` of several repetitions, or the one value."""
    if not values:
        return "–"
    if len(values) == 1:
        return num(values[0], digits)
    return f"{num(median(values), digits)} ({num(min(values), digits)}–{num(max(values), digits)})"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or a != a or b != b or b == 0:
        return "–"
    return f"×{a / b:.2f}"


def ratio_value(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or a != a or b != b or b == 0:
        return None
    return a / b


def pct(x: float | None) -> str:
    return "–" if x is None or x != x else f"{100 * x:.0f}%"

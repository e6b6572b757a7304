"""Numbers and tables for people: what ``metallm stats``, ``decisions`` and the demo print.

Raw values stay raw (``--format csv|json``); a table shows them the way a person reads them:

>>> percent(0.30769230769230769231)
'30.8%'
>>> usd(7.42e-05), usd(0.001), usd(0.0123), usd(12.3456), usd(0)
('$0.0000742', '$0.001', '$0.0123', '$12.35', '$0')
>>> duration_ms(12.34), duration_ms(250), duration_ms(1530)
('12.3 ms', '250 ms', '1.53 s')

A table gets the columns that fit the terminal, most important first, each one whole; the
ones left out are named under it. When too few fit, each row is printed as a block of
``name: value`` lines instead, so nothing is ever cut to ``qu…``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from rich.cells import cell_len
from rich.console import Console, JustifyMethod
from rich.table import Table
from rich.text import Text


def _num(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, Decimal):
        return float(value)
    return float(value)


def percent(value: Any, digits: int = 1) -> str:
    """A fraction as a percentage (``0.5`` → ``50.0%``); blank for None."""
    v = _num(value)
    return "" if v is None else f"{v * 100:.{digits}f}%"


def usd(value: Any) -> str:
    """Dollars: cents for a dollar or more, else three significant digits, never exponents."""
    v = _num(value)
    if v is None:
        return ""
    if v == 0:
        return "$0"
    sign = "-" if v < 0 else ""
    v = abs(v)
    if v >= 1:
        return f"{sign}${v:,.2f}"
    decimals = min(12, 2 - math.floor(math.log10(v)))
    return f"{sign}${v:.{decimals}f}".rstrip("0").rstrip(".")


def duration_ms(value: Any) -> str:
    """A duration given in milliseconds: ``ms`` under a second, else seconds or minutes."""
    v = _num(value)
    if v is None:
        return ""
    if v < 10:
        return f"{v:.2f} ms"
    if v < 100:
        return f"{v:.1f} ms"
    if v < 1000:
        return f"{v:.0f} ms"
    if v < 60_000:
        return f"{v / 1000:.2f} s"
    return f"{v / 60_000:.1f} min"


def count(value: Any) -> str:
    return "" if value is None else f"{int(value):,}"


def decimal(digits: int) -> Callable[[Any], str]:
    def fmt(value: Any) -> str:
        v = _num(value)
        return "" if v is None else f"{v:.{digits}f}"

    return fmt


def significant(value: Any) -> str:
    v = _num(value)
    return "" if v is None else f"{v:.4g}"


def yes_no(value: Any) -> str:
    return "" if value is None else ("yes" if value else "no")


def timestamp(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def plain(value: Any, limit: int | None = None) -> str:
    s = "" if value is None else str(value)
    if limit is not None and len(s) > limit:
        return s[: limit - 1] + "…"
    return s


def short_text(limit: int) -> Callable[[Any], str]:
    return lambda value: plain(value, limit)


@dataclass(frozen=True)
class Column:
    """One column of a report: the row key it shows, its header, how its values read, and how
    much it matters (0 first) when the terminal cannot show every column."""

    key: str
    header: str
    fmt: Callable[[Any], str] = plain
    priority: int = 5
    justify: JustifyMethod = "left"

    def cell(self, row: dict[str, Any]) -> str:
        return self.fmt(row.get(self.key))


#: Fewer columns than this, and rows are printed one block each.
MIN_TABLE_COLUMNS = 3


def fit_columns(columns: Sequence[Column], cells: list[list[str]], width: int) -> list[int] | None:
    """The indexes (in display order) of the columns that fit in ``width`` terminal cells,
    taken by priority, or None when the ones that must be shown (priority 0) and enough
    others do not fit."""
    needed = [
        max([cell_len(c.header), *(cell_len(row[i]) for row in cells)])
        for i, c in enumerate(columns)
    ]
    # rich's default box: one border cell on the left, then per column 1 + value + 1 + border
    used = 1
    chosen: list[int] = []
    for i in sorted(range(len(columns)), key=lambda i: (columns[i].priority, i)):
        cost = needed[i] + 3
        if used + cost <= width:
            chosen.append(i)
            used += cost
        elif columns[i].priority == 0:
            return None
    if len(chosen) < min(MIN_TABLE_COLUMNS, len(columns)):
        return None
    return sorted(chosen)


def print_report(
    rows: list[dict[str, Any]],
    columns: Sequence[Column],
    title: str | None,
    console: Console | None = None,
) -> None:
    """Rows as a table that fits the console, or as one block per row when it cannot."""
    console = console or Console()
    if title is not None and cell_len(title) > console.width // 2:
        console.print(Text(title, style="bold"))  # a line of its own, not squeezed above a table
        title = None
    cells = [[c.cell(row) for c in columns] for row in rows]
    chosen = fit_columns(columns, cells, console.width)
    if chosen is None:
        _print_blocks(columns, cells, title, console)
        return
    table = Table(title=None if title is None else Text(title))
    for i in chosen:
        table.add_column(columns[i].header, justify=columns[i].justify, no_wrap=True)
    for row in cells:
        table.add_row(*(Text(row[i]) for i in chosen))  # values are text, never markup
    console.print(table)
    hidden = [c.header for i, c in enumerate(columns) if i not in chosen]
    if hidden:
        console.print(
            f"[dim]not shown at {console.width} columns: {', '.join(hidden)} "
            "(a wider terminal, or --format csv|json for every column)[/dim]",
            highlight=False,
        )


def _print_blocks(
    columns: Sequence[Column], cells: list[list[str]], title: str, console: Console
) -> None:
    if title is not None:
        console.print(Text(title, style="bold"))
    label = max(cell_len(c.header) for c in columns)
    for row in cells:
        console.print()
        for c, value in zip(columns, row, strict=True):
            if value:
                console.print(Text(f"{c.header.rjust(label)}  {value}"))

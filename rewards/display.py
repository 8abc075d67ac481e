"""How the rewards CLIs print: consoles that never read markup, tables that stay plain off a tty.

Peers choose run ids, paths and reasons, and analysts' query results hold them: a ``[/x]`` or
``[conceal]`` in such a string must be printed as those characters, never read as Rich markup,
and a control character (an ANSI escape, a newline, a bidi override) must not redraw the screen or
split a line. So these consoles have markup, emoji and highlighting off, and every cell goes
through :func:`safe`. When stdout is not a terminal (a pipe, a file, a test), tables are plain
aligned text and nothing wraps: hashes, keys and amounts stay whole on their line for copy and
paste and for scripts.

In human tables, money (DECIMAL(38,0) columns but scores, see docs/queries.md) is shown in tokens
with up to 18 decimals (``1500000000000000000`` -> ``1.5``); CSV and JSON keep the exact integers.
"""

from __future__ import annotations

import decimal
from collections.abc import Sequence
from typing import Any

import polars as pl
from rich.console import Console
from rich.table import Table
from rich.text import Text

TOKEN_DECIMALS = 18


def make_console(*, stderr: bool = False) -> Console:
    """A console that prints strings as they are: no markup, no emoji codes, no highlighting,
    no soft wrapping of long lines."""
    return Console(stderr=stderr, soft_wrap=True, markup=False, emoji=False, highlight=False)


def safe(text: object) -> str:
    """``text`` with every non-printable character (controls, line breaks, format characters such
    as bidi overrides) written as a Python escape, so that it prints as data on one line."""
    value = str(text)
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)


def tokens(amount: int | decimal.Decimal, decimals: int = TOKEN_DECIMALS) -> str:
    """Base units as tokens, exactly: ``1500000000000000000`` -> ``1.5``, ``500 * 10**18`` ->
    ``500``; integer arithmetic, no rounding."""
    value = int(amount)
    sign = "-" if value < 0 else ""
    whole, frac = divmod(abs(value), 10**decimals)
    digits = f"{frac:0{decimals}d}".rstrip("0") if decimals else ""
    return f"{sign}{whole}" + (f".{digits}" if digits else "")


SHOWN_DECIMALS = 6
"""Decimals a report prints a token amount with (the warehouse keeps the exact base units)."""


def tokens_shown(amount: Any, decimals: int = TOKEN_DECIMALS) -> str:
    """Base units as tokens for a page, rounded half-even to SHOWN_DECIMALS, with thousands
    separators: ``1234500000000000000`` -> ``1.234500``."""
    value = decimal.Decimal(int(amount)).scaleb(-decimals)
    shown = value.quantize(decimal.Decimal(1).scaleb(-SHOWN_DECIMALS), decimal.ROUND_HALF_EVEN)
    return f"{shown:,}"


def is_money(name: str, dtype: pl.DataType) -> bool:
    """The warehouse keeps money, and only money and scores, as DECIMAL(38,0) (docs/warehouse.md);
    sums of money stay DECIMAL(38,0) in DuckDB."""
    return isinstance(dtype, pl.Decimal) and dtype.scale == 0 and "score" not in name.lower()


def _cell(value: Any, money: bool) -> str:
    if value is None:
        return ""
    if money:
        return tokens(value)
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return safe(value)


def print_frame(console: Console, frame: pl.DataFrame, title: str | None = None) -> None:
    """A query result as a human table; money columns in tokens, headed ``name (tokens)``."""
    money = [is_money(n, t) for n, t in zip(frame.columns, frame.dtypes, strict=True)]
    headers = [f"{n} (tokens)" if m else n for n, m in zip(frame.columns, money, strict=True)]
    rows = [[_cell(v, m) for v, m in zip(row, money, strict=True)] for row in frame.iter_rows()]
    numeric = [m or t.is_numeric() for m, t in zip(money, frame.dtypes, strict=True)]
    print_table(console, headers, rows, title=title, right=numeric)


def print_table(
    console: Console,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    title: str | None = None,
    right: Sequence[bool] | None = None,
) -> None:
    """Rows of strings under ``headers``: a Rich table on a terminal, else plain aligned text.

    ``right`` marks right-aligned (numeric) columns, which never wrap. Every header and cell is
    printed through :func:`safe`, never as markup.
    """
    align = list(right) if right is not None else [False] * len(headers)
    headers = [safe(h) for h in headers]
    cells = [[safe(c) for c in row] for row in rows]
    if not console.is_terminal:
        _print_plain(console, headers, cells, title, align)
        return
    table = Table(title=None if title is None else Text(safe(title)))
    for header, numeric in zip(headers, align, strict=True):
        if numeric:
            table.add_column(Text(header), justify="right", no_wrap=True)
        else:
            table.add_column(Text(header), overflow="fold")
    for row in cells:
        table.add_row(*(Text(c) for c in row))
    console.print(table)


def _print_plain(
    console: Console,
    headers: list[str],
    rows: list[list[str]],
    title: str | None,
    align: list[bool],
) -> None:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if numeric else v.ljust(w)
            for v, w, numeric in zip(values, widths, align, strict=True)
        ]
        return "  ".join(parts).rstrip()

    if title is not None:
        console.print(safe(title))
    console.print(line(headers))
    for row in rows:
        console.print(line(row))

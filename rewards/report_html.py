"""The HTML pieces of the report pages (rewards.report, rewards.report_shared): escaped cells,
tables, sections and embedded images; every peer-supplied string is escaped here."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

OUTCOME_CLASSES = ("pass", "fail", "invalid", "verified", "failed", "pending")


def cell(value: Any) -> str:
    """One table cell's HTML: "-" for None, 4 significant digits for a float, an outcome as a
    coloured span, a long 0x string as a wrapping span, anything else escaped text."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.4g}"
    text = html.escape(str(value))
    if text in OUTCOME_CLASSES:
        return f'<span class="{text}">{text}</span>'
    if text.startswith("0x") and len(text) > 20:  # hashes and addresses may wrap anywhere
        return f'<span class="hex">{text}</span>'
    return text


def table(rows: Iterable[Sequence[Any]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def section(ident: str, title: str, *parts: str) -> str:
    return f'<section id="{ident}"><h2>{html.escape(title)}</h2>{"".join(parts)}</section>'


def img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'

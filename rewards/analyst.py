"""The analyst's interface: read-only SQL, Polars DataFrames, Parquet export of the warehouse.

Everything here runs on a read-only connection (rewards.warehouse.connect_read_only): a statement
that would write is refused with ReadOnlyViolation and the database is left untouched.

    >>> from rewards.analyst import Analyst
    >>> with Analyst("veritrain.duckdb") as a:
    ...     top = a.sql("SELECT account, sum(amount) AS paid FROM rewards GROUP BY 1")
"""

from __future__ import annotations

import decimal
import json
import logging
import os
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import duckdb
import polars as pl

from rewards.warehouse import ReadOnlyViolation, WarehouseError, connect_read_only, query

log = logging.getLogger(__name__)

OutputFormat = Literal["table", "csv", "json", "parquet"]
FORMATS: tuple[OutputFormat, ...] = ("table", "csv", "json", "parquet")


class QueryError(WarehouseError, ValueError):
    """A query is empty or invalid SQL (a write attempt raises ReadOnlyViolation instead)."""


def _is_write_refusal(exc: duckdb.Error) -> bool:
    text = str(exc)
    return (
        "read-only mode" in text
        or isinstance(exc, duckdb.PermissionException)
        or "lock_configuration" in text
        or "configuration has been locked" in text.lower()
    )


def run_sql(con: duckdb.DuckDBPyConnection, sql: str) -> pl.DataFrame:
    """Run ``sql`` (one or more statements) and return the last statement's result.

    Raises ReadOnlyViolation for any write or file access, QueryError for empty or invalid SQL.
    """
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"cannot parse query: {exc}") from exc
    if not statements:
        raise QueryError("empty query")
    frame = pl.DataFrame()
    for statement in statements:
        try:
            relation = con.sql(statement.query)
            frame = pl.DataFrame() if relation is None else relation.pl()
        except duckdb.Error as exc:
            if _is_write_refusal(exc):
                raise ReadOnlyViolation(
                    f"refused: the warehouse is opened read-only, so {statement.type.name} "
                    f"statements cannot run; nothing was changed ({exc})"
                ) from exc
            raise QueryError(f"query failed: {exc}") from exc
    return frame


class Analyst:
    """A read-only view of a warehouse returning Polars DataFrames. Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self.con = connect_read_only(path)

    def __enter__(self) -> Analyst:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.con.close()

    def sql(self, sql: str) -> pl.DataFrame:
        """The result of ``sql`` as a DataFrame (see :func:`run_sql`)."""
        return run_sql(self.con, sql)

    def tables(self) -> list[str]:
        """Every table and view of the warehouse, by name."""
        rows = query(
            self.con,
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
            " ORDER BY table_name",
        )
        return [str(r[0]) for r in rows]

    def table(self, name: str) -> pl.DataFrame:
        """A whole table or view; QueryError for an unknown name."""
        if name not in self.tables():
            raise QueryError(f"no table or view named {name!r}; known: {', '.join(self.tables())}")
        frame: pl.DataFrame = self.con.sql(f'SELECT * FROM "{name}"').pl()
        return frame

    def export_parquet(self, out_dir: str | os.PathLike[str]) -> list[Path]:
        """Write every table and view as ``<name>.parquet`` in ``out_dir`` (each atomically).

        Money columns stay DECIMAL(38,0) in Parquet, so other engines read exact integers.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name in self.tables():
            path = out / f"{name}.parquet"
            tmp = path.with_name(path.name + ".tmp")
            self.table(name).write_parquet(tmp)
            os.replace(tmp, path)
            written.append(path)
        log.info("exported %d tables to %s", len(written), out)
        return written


def _json_value(value: object) -> object:
    if isinstance(value, decimal.Decimal):
        # Money is integral; JSON numbers hold it exactly as text (readers must not use floats).
        return int(value) if value == value.to_integral_value() else str(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return str(value)


def to_json(frame: pl.DataFrame) -> str:
    """Rows as a JSON array of objects; decimals as exact integers, times in ISO 8601."""
    rows: list[dict[str, Any]] = frame.to_dicts()
    return json.dumps(rows, default=_json_value, indent=1)


def to_csv(frame: pl.DataFrame) -> str:
    """Rows as CSV with a header line."""
    return frame.write_csv()


def write_output(frame: pl.DataFrame, fmt: OutputFormat, out: str | os.PathLike[str]) -> Path:
    """Write ``frame`` to ``out`` as csv, json or parquet, atomically (temp file + rename)."""
    path = Path(out)
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "parquet":
        frame.write_parquet(tmp)
    elif fmt == "json":
        tmp.write_text(to_json(frame) + "\n", encoding="utf-8")
    elif fmt == "csv":
        tmp.write_text(to_csv(frame), encoding="utf-8")
    else:
        raise QueryError(f"cannot write format {fmt!r} to a file (csv, json or parquet)")
    os.replace(tmp, path)
    return path

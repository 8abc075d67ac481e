"""The analyst's interface: read-only SQL, Polars DataFrames, Parquet export of the warehouse.

Everything here runs on a read-only connection (rewards.warehouse.connect_read_only) to the
warehouse's analyst snapshot (``<db>.snapshot``, published by every writer as it closes), so a
running ingest never blocks a query; a warehouse that has no snapshot yet is read directly. A
statement that would write or touch a file is refused with ReadOnlyViolation and nothing is changed;
a statement running past its time limit is stopped with QueryTimeout.

    >>> from rewards.analyst import Analyst
    >>> with Analyst("veritrain.duckdb") as a:
    ...     top = a.sql("SELECT account, sum(amount) AS paid FROM rewards GROUP BY 1")
"""

from __future__ import annotations

import decimal
import json
import logging
import os
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import duckdb
import polars as pl

from rewards.warehouse import (
    ReadOnlyViolation,
    WarehouseError,
    connect_read_only,
    query,
    snapshot_path,
)

log = logging.getLogger(__name__)

OutputFormat = Literal["table", "csv", "json", "parquet"]
FORMATS: tuple[OutputFormat, ...] = ("table", "csv", "json", "parquet")


class QueryError(WarehouseError, ValueError):
    """A query is empty or invalid SQL (a write attempt raises ReadOnlyViolation instead)."""


class QueryTimeout(WarehouseError, TimeoutError):
    """A statement ran past its time limit and was stopped; nothing was changed."""


class OutputError(WarehouseError, OSError):
    """A query result could not be written where asked (missing folder, no permission...)."""


def _refusal(statement: Any, exc: duckdb.Error) -> str | None:
    """What was refused and why, for an error the sandbox raised; None for any other error."""
    text = str(exc)
    kind = statement.type.name
    if "read-only mode" in text:
        why = "it would change the warehouse, and analyst queries run read-only"
    elif "lock_configuration" in text or "configuration has been locked" in text.lower():
        why = "it changes a setting, and analyst connections have their settings locked"
    elif isinstance(exc, duckdb.PermissionException):
        why = "it reads or writes files or the network, which analyst queries may not"
    else:
        return None
    return f"refused: this {kind} statement cannot run because {why}; nothing was changed ({exc})"


def _run_statement(
    con: duckdb.DuckDBPyConnection, statement: Any, timeout: float | None
) -> pl.DataFrame:
    # DuckDB stops a running query when another thread calls interrupt(): the timer's thread.
    timer = None if timeout is None else threading.Timer(timeout, con.interrupt)
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        relation = con.sql(statement.query)
        frame: pl.DataFrame = pl.DataFrame() if relation is None else relation.pl()
        return frame
    except duckdb.InterruptException as exc:
        raise QueryTimeout(
            f"the {statement.type.name} statement ran past its time limit of {timeout:g} s"
            " and was stopped; nothing was changed"
        ) from exc
    finally:
        if timer is not None:
            timer.cancel()


def run_sql(
    con: duckdb.DuckDBPyConnection, sql: str, *, timeout: float | None = None
) -> pl.DataFrame:
    """Run ``sql`` (one or more statements) and return the last statement's result.

    Each statement may run ``timeout`` seconds (None: no limit). Raises ReadOnlyViolation for any
    write, setting change or file access, QueryTimeout for a statement stopped at its limit, and
    QueryError for empty or invalid SQL.
    """
    if timeout is not None and not timeout > 0:
        raise QueryError(f"time limit must be positive seconds, got {timeout!r}")
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"cannot parse query: {exc}") from exc
    if not statements:
        raise QueryError("empty query")
    frame = pl.DataFrame()
    for statement in statements:
        try:
            frame = _run_statement(con, statement, timeout)
        except duckdb.Error as exc:
            refused = _refusal(statement, exc)
            if refused is not None:
                raise ReadOnlyViolation(refused) from exc
            raise QueryError(f"query failed: {exc}") from exc
    return frame


class Analyst:
    """A read-only view of a warehouse returning Polars DataFrames. Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float | None = None) -> None:
        """Open the analyst snapshot of the warehouse at ``path`` (the file itself when no writer
        has published one yet). ``timeout``: each statement's time limit in seconds (None: none).
        Raises WarehouseError when there is no warehouse at ``path``."""
        if not Path(path).is_file():
            raise WarehouseError(f"no warehouse at {path!s}")
        snapshot = snapshot_path(path)
        self.path = str(path)
        self.source = snapshot if snapshot.is_file() else Path(path)
        self.timeout = timeout
        self.con = connect_read_only(self.source)

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
        return run_sql(self.con, sql, timeout=self.timeout)

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
        Raises OutputError when ``out_dir`` cannot be made or written.
        """
        out = Path(out_dir)
        written = []
        try:
            out.mkdir(parents=True, exist_ok=True)
            for name in self.tables():
                path = out / f"{name}.parquet"
                tmp = path.with_name(path.name + ".tmp")
                self.table(name).write_parquet(tmp)
                os.replace(tmp, path)
                written.append(path)
        except OSError as exc:
            raise OutputError(f"cannot export to {out}: {exc.strerror or exc}") from exc
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
    """Write ``frame`` to ``out`` as csv, json or parquet, atomically (temp file + rename).

    Raises QueryError for another format and OutputError when ``out`` cannot be written (its
    folder missing, a directory in its place...); nothing is left behind then.
    """
    path = Path(out)
    if fmt not in ("parquet", "json", "csv"):
        raise QueryError(f"cannot write format {fmt!r} to a file (csv, json or parquet)")
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {out!s}: folder {path.parent} does not exist")
    if path.is_dir():
        raise OutputError(f"cannot write {out!s}: it is a directory")
    tmp = path.with_name(path.name + ".tmp")
    try:
        if fmt == "parquet":
            frame.write_parquet(tmp)
        elif fmt == "json":
            tmp.write_text(to_json(frame) + "\n", encoding="utf-8")
        else:
            tmp.write_text(to_csv(frame), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {out!s}: {exc.strerror or exc}") from exc
    return path

"""The warehouse schema: versioned SQL migrations under ``rewards/migrations/``.

Each migration is a file ``NNN_name.sql``; version NNN is applied once, in order, inside one
transaction, and recorded in ``schema_migrations`` with the sha256 of its text. A recorded
migration whose text has since changed is an error: the schema a database was built with must be
the schema its code expects.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import duckdb

from proofs.errors import VeritrainError

_NAME = re.compile(r"(\d{3})_([a-z0-9_]+)\.sql")


class SchemaError(VeritrainError, RuntimeError):
    """The database's schema is newer than this code, or a recorded migration was altered."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Migration:
    """One migration file: its version, name, SQL text and the sha256 of that text."""

    version: int
    name: str
    sql: str
    checksum: str


def migrations() -> tuple[Migration, ...]:
    """Every migration shipped with the package, ordered by version (versions must be 1..n)."""
    found: list[Migration] = []
    for entry in resources.files("rewards.migrations").iterdir():
        match = _NAME.fullmatch(entry.name)
        if match is None:
            continue
        text = entry.read_text(encoding="utf-8")
        found.append(
            Migration(
                version=int(match.group(1)),
                name=match.group(2),
                sql=text,
                checksum=hashlib.sha256(text.encode()).hexdigest(),
            )
        )
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise SchemaError(f"migration versions must be 1..n, found {[m.version for m in found]}")
    return tuple(found)


LATEST_VERSION = len(migrations())


def _ensure_ledger(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name VARCHAR NOT NULL,"
        " checksum VARCHAR NOT NULL, applied_at TIMESTAMP NOT NULL)"
    )


def current_version(con: duckdb.DuckDBPyConnection) -> int:
    """The highest applied migration, 0 for an empty database (works on read-only connections)."""
    # fetchall, not fetchone: DuckDB 2 refuses new work while a result is left half-read.
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables"
        " WHERE table_name = 'schema_migrations' AND table_schema = 'main'"
    ).fetchall()
    if exists[0][0] == 0:
        return 0
    rows = con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchall()
    return int(rows[0][0])


def check_applied(con: duckdb.DuckDBPyConnection) -> None:
    """Raise SchemaError when a recorded migration differs from the shipped one, or is unknown."""
    if current_version(con) == 0:
        return
    shipped = {m.version: m for m in migrations()}
    for version, name, checksum in con.execute(
        "SELECT version, name, checksum FROM schema_migrations ORDER BY version"
    ).fetchall():
        known = shipped.get(version)
        if known is None:
            raise SchemaError(
                f"database has schema version {version} ({name}); this code knows up to "
                f"{LATEST_VERSION}: upgrade veritrain"
            )
        if known.checksum != checksum:
            raise SchemaError(f"migration {version} ({name}) was altered after it was applied")


def migrate(con: duckdb.DuckDBPyConnection) -> list[int]:
    """Apply every pending migration, each in its own transaction; returns the versions applied."""
    _ensure_ledger(con)
    check_applied(con)
    done = current_version(con)
    applied: list[int] = []
    for migration in migrations():
        if migration.version <= done:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(migration.sql)
            con.execute(
                "INSERT INTO schema_migrations VALUES ($v, $n, $c, now()::TIMESTAMP)",
                {"v": migration.version, "n": migration.name, "c": migration.checksum},
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        applied.append(migration.version)
    return applied

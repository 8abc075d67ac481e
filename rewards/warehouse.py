"""The DuckDB warehouse: opening it, transactions, read-only access, settlement write-back.

One DuckDB file is the source of truth. A read-write connection applies pending migrations when
it opens; a read-only connection refuses every write and every file system access, so an analyst's
query can never change the database or write elsewhere through it.

A missing warehouse is an error: only ``connect(path, create=True)`` (``python -m rewards init``)
makes a new file, so a mistyped ``--db`` cannot silently start an empty warehouse.

DuckDB lets one process write a file and, while it does, nobody else read it. So every writer that
goes through :func:`opened` publishes, as it closes, a copy of the warehouse at
``<db>.snapshot`` (temp file + rename, under the writer's lock), and analysts query that copy:
an ingest of minutes never blocks them, and they never block a writer (docs/warehouse.md).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeAlias

import duckdb

from proofs import codec
from proofs.errors import EncodingError, VeritrainError
from rewards import schema

log = logging.getLogger(__name__)

DEFAULT_DB = "veritrain.duckdb"
DB_ENV = "VERITRAIN_DB"
SNAPSHOT_SUFFIX = ".snapshot"
MEMORY = ":memory:"

Connection: TypeAlias = duckdb.DuckDBPyConnection
PathOrConnection: TypeAlias = "str | os.PathLike[str] | duckdb.DuckDBPyConnection"

_HEX32 = re.compile(r"0x[0-9a-f]{64}")
_PUBKEY = re.compile(r"0x[0-9a-f]{96}")
_PEER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_AMOUNT = codec.DECIMAL38_MAX
"""The largest amount a DECIMAL(38,0) column holds (about 2**126, well inside uint256)."""


class WarehouseError(VeritrainError, RuntimeError):
    """The warehouse could not be opened or a record could not be written."""


class ReadOnlyViolation(VeritrainError, PermissionError):
    """A statement tried to write through a read-only connection; nothing was changed."""


class WarehouseValueError(VeritrainError, ValueError):
    """A value given to the warehouse is malformed (bad address, hash, negative amount...)."""


def _check_exists(path: str | os.PathLike[str]) -> None:
    target = Path(path)
    if target.is_dir():
        raise WarehouseError(f"warehouse {path!s} is a directory, not a DuckDB file")
    if not target.exists():
        raise WarehouseError(
            f"warehouse {path!s} does not exist; create it with"
            f" `python -m rewards init --db {path!s}`"
        )


def connect(path: str | os.PathLike[str], *, create: bool = False) -> Connection:
    """Open the warehouse read-write and apply pending migrations.

    The file must exist unless ``create`` (``:memory:`` always may). Raises WarehouseError when it
    is missing or cannot be opened (e.g. locked by another writer) and SchemaError when its schema
    is newer than this code or was altered.
    """
    if str(path) != MEMORY and not create:
        _check_exists(path)
    try:
        con = duckdb.connect(str(path))
    except duckdb.Error as exc:
        raise WarehouseError(f"cannot open warehouse {path!s}: {exc}") from exc
    try:
        applied = schema.migrate(con)
    except BaseException:
        con.close()
        raise
    if applied:
        log.info("warehouse %s migrated to version %s", path, applied[-1])
    return con


def snapshot_path(path: str | os.PathLike[str]) -> Path:
    """Where the analysts' copy of the warehouse at ``path`` is published."""
    return Path(str(path) + SNAPSHOT_SUFFIX)


def close_and_publish(con: Connection, path: str | os.PathLike[str]) -> Path:
    """Checkpoint ``con`` (the read-write connection to ``path``), copy the file to
    :func:`snapshot_path` atomically, and close ``con``; returns the snapshot's path.

    The copy is taken while ``con`` still holds DuckDB's write lock, so no other writer can change
    the file meanwhile, and it is renamed into place before the lock is released, so snapshots
    are published in the order of the writes. DuckDB's lock is a POSIX record lock, which closing
    *any* descriptor of the file in this process drops: the source descriptor is therefore kept
    open until after ``con`` is closed. Raises WarehouseError when the copy cannot be written
    (the warehouse itself is then intact and ``con`` closed).
    """
    target = snapshot_path(path)
    try:
        with open(path, "rb") as source:
            try:
                con.execute("CHECKPOINT")  # everything into the main file, the WAL emptied
                _copy_atomically(source, target)
            finally:
                con.close()  # before `source` closes: see above
    except (OSError, duckdb.Error) as exc:
        raise WarehouseError(f"could not publish the analyst snapshot {target}: {exc}") from exc
    log.info("published analyst snapshot %s", target)
    return target


def _copy_atomically(source: Any, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, os.fstat(source.fileno()).st_mode & 0o777)  # readable by whoever reads the db
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def connect_read_only(path: str | os.PathLike[str]) -> Connection:
    """Open an existing warehouse for queries only.

    Writes to the database are refused by DuckDB's read-only mode, and file system access
    (COPY TO, ATTACH, read_csv...) is disabled and locked, so a query cannot write anywhere.
    """
    if not Path(path).is_file():
        raise WarehouseError(f"no warehouse at {path!s}")
    try:
        con = duckdb.connect(
            str(path),
            read_only=True,
            config={"enable_external_access": False, "lock_configuration": True},
        )
    except duckdb.Error as exc:
        raise WarehouseError(f"cannot open warehouse {path!s} read-only: {exc}") from exc
    try:
        schema.check_applied(con)
        if schema.current_version(con) != schema.LATEST_VERSION:
            raise schema.SchemaError(
                f"warehouse {path!s} is at schema version {schema.current_version(con)}, this"
                f" code expects {schema.LATEST_VERSION}: open it read-write once to migrate"
            )
    except BaseException:
        con.close()
        raise
    return con


@contextmanager
def opened(target: PathOrConnection, *, create: bool = False) -> Iterator[Connection]:
    """Yield a read-write connection: ``target`` itself, or a new one for a path.

    A connection opened here is closed after the block; when the block returns, the analyst
    snapshot is published as it closes (:func:`close_and_publish`). ``create`` as in connect.
    """
    if isinstance(target, duckdb.DuckDBPyConnection):
        yield target
        return
    con = connect(target, create=create)
    try:
        yield con
    except BaseException:
        con.close()
        raise
    if str(target) == MEMORY:
        con.close()
    else:
        close_and_publish(con, target)


@contextmanager
def transaction(con: Connection) -> Iterator[Connection]:
    """Run the block in one transaction: committed if it returns, rolled back if it raises."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def query(con: Connection, sql: str, params: Mapping[str, object] | None = None) -> list[Any]:
    """Run one statement and fetch every row (DuckDB 2 refuses new work on a half-read result)."""
    rows: list[Any] = con.execute(sql, dict(params) if params else None).fetchall()
    return rows


def _hex32(name: str, value: str | bytes) -> str:
    text = "0x" + value.hex() if isinstance(value, bytes) else value.lower()
    if not _HEX32.fullmatch(text):
        raise WarehouseValueError(f"{name} must be 32 bytes (0x + 64 hex digits), got {value!r}")
    return text


def normalize_address(value: str) -> str:
    """An EVM address in the warehouse's form, lowercase 0x-hex, after the one address rule
    (:func:`proofs.codec.normalize_address`: a mixed-case address must carry a correct EIP-55
    checksum); WarehouseValueError when malformed."""
    try:
        return codec.normalize_address(value).lower()
    except EncodingError as exc:
        raise WarehouseValueError(str(exc)) from None


def check_amount(name: str, value: int) -> int:
    """``value`` as a non-negative int that fits DECIMAL(38,0)
    (:func:`proofs.codec.check_decimal38`); WarehouseValueError otherwise."""
    try:
        return codec.check_decimal38(value, name)
    except EncodingError as exc:
        raise WarehouseValueError(str(exc)) from None


def record_settlement_post(
    con_or_path: PathOrConnection,
    *,
    epoch: int,
    root: str | bytes,
    cumulative_total: int,
    inputs_hash: str | bytes,
    tx_hash: str | bytes,
    block_number: int,
    gas_used: int,
    contract: str,
    chain_id: int,
) -> bool:
    """Record that the payout root of ``epoch`` was posted on chain; returns False if already known.

    Idempotent on ``tx_hash``: recording the same transaction again changes nothing. A second,
    different transaction for an epoch already posted with another root raises WarehouseError.
    """
    values = {
        "epoch": epoch,
        "root": _hex32("root", root),
        "total": check_amount("cumulative_total", cumulative_total),
        "inputs": _hex32("inputs_hash", inputs_hash),
        "tx": _hex32("tx_hash", tx_hash),
        "block": block_number,
        "gas": gas_used,
        "contract": normalize_address(contract),
        "chain": chain_id,
        "at": _now(),
    }
    with opened(con_or_path) as con, transaction(con):
        if query(con, "SELECT 1 FROM settlement_posts WHERE tx_hash = $tx", {"tx": values["tx"]}):
            return False
        clash = query(
            con,
            "SELECT root FROM settlement_posts WHERE epoch = $epoch AND root <> $root",
            {"epoch": epoch, "root": values["root"]},
        )
        if clash:
            raise WarehouseError(f"epoch {epoch} was already posted with root {clash[0][0]}")
        query(
            con,
            "INSERT INTO settlement_posts VALUES ($epoch, $root, $total, $inputs, $tx, $block,"
            " $gas, $contract, $chain, $at)",
            values,
        )
    return True


def record_claim(
    con_or_path: PathOrConnection,
    *,
    account: str,
    cumulative_amount: int,
    paid: int,
    epoch: int,
    tx_hash: str | bytes,
    block_number: int,
    gas_used: int,
    contract: str,
    chain_id: int,
) -> bool:
    """Record one account's claim; returns False if (tx_hash, account) is already recorded.

    A batch claim is one transaction for many accounts: record it once per account, with the
    transaction's total gas on each row (documented in docs/warehouse.md).
    """
    values = {
        "account": normalize_address(account),
        "cum": check_amount("cumulative_amount", cumulative_amount),
        "paid": check_amount("paid", paid),
        "epoch": epoch,
        "tx": _hex32("tx_hash", tx_hash),
        "block": block_number,
        "gas": gas_used,
        "contract": normalize_address(contract),
        "chain": chain_id,
        "at": _now(),
    }
    with opened(con_or_path) as con, transaction(con):
        if query(
            con,
            "SELECT 1 FROM claims WHERE tx_hash = $tx AND account = $account",
            {"tx": values["tx"], "account": values["account"]},
        ):
            return False
        query(
            con,
            "INSERT INTO claims VALUES ($account, $cum, $paid, $epoch, $tx, $block, $gas,"
            " $contract, $chain, $at)",
            values,
        )
    return True


def register_peer(
    con: Connection, *, peer_id: str, pubkey: str, role: str, payout_address: str | None
) -> bool:
    """Register a peer; returns False when the same registration exists already.

    Raises WarehouseValueError for a malformed or invalid key (not a point of G1's subgroup, or the
    point at infinity) or address, a trainer without a payout
    address, or a peer id or key already registered differently.
    """
    key = pubkey.lower()
    if not _PUBKEY.fullmatch(key):
        raise WarehouseValueError(f"pubkey must be 0x + 96 hex digits (48 bytes), got {pubkey!r}")
    # Imported here: py_ecc costs a second to import and raises the recursion limit, which no
    # command but this one (and ingest) needs.
    from proofs.signatures import validate_pubkey

    if not validate_pubkey(bytes.fromhex(key[2:])):
        raise WarehouseValueError(
            f"pubkey {key} is not a valid BLS12-381 public key (expected a compressed G1 point"
            " on the curve, in the prime-order subgroup and not the point at infinity)"
        )
    if role not in ("trainer", "auditor"):
        raise WarehouseValueError(f"role must be trainer or auditor, got {role!r}")
    if not _PEER_ID.fullmatch(peer_id):
        # Peer ids name runs in the warehouse ("<peer>/<run id>") and appear in every table.
        raise WarehouseValueError(
            f"peer id must be 1-64 of A-Z a-z 0-9 . _ - starting with a letter or digit, got "
            f"{peer_id!r:.80}"
        )
    address = None if payout_address is None else normalize_address(payout_address)
    if role == "trainer" and address is None:
        raise WarehouseValueError("a trainer needs a payout address")
    existing = query(
        con,
        "SELECT peer_id, role, bls_pubkey, payout_address FROM peers"
        " WHERE peer_id = $p OR bls_pubkey = $k",
        {"p": peer_id, "k": key},
    )
    if existing:
        if [tuple(r) for r in existing] == [(peer_id, role, key, address)]:
            return False
        raise WarehouseValueError(
            f"peer {peer_id!r} or key {key[:14]}... is already registered as {existing[0][:2]}"
        )
    query(
        con,
        "INSERT INTO peers VALUES ($p, $r, $k, $a, $at)",
        {"p": peer_id, "r": role, "k": key, "a": address, "at": _now()},
    )
    return True


def record_stake(con: Connection, *, peer_id: str, epoch: int, amount: int) -> None:
    """Set ``peer_id``'s stake deposit in ``epoch`` (base units). Errors on unknown peer/epoch."""
    check_amount("stake", amount)
    if not query(con, "SELECT 1 FROM peers WHERE peer_id = $p", {"p": peer_id}):
        raise WarehouseValueError(f"unknown peer {peer_id!r}")
    if not query(con, "SELECT 1 FROM epochs WHERE epoch = $e", {"e": epoch}):
        raise WarehouseValueError(f"epoch {epoch} is not open")
    check_unsettled(con, epoch)
    with transaction(con):
        query(
            con, "DELETE FROM stakes WHERE peer_id = $p AND epoch = $e", {"p": peer_id, "e": epoch}
        )
        query(
            con, "INSERT INTO stakes VALUES ($p, $e, $a)", {"p": peer_id, "e": epoch, "a": amount}
        )


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC).replace(tzinfo=None)


def check_unsettled(con: Connection, epoch: int) -> None:
    """Raise WarehouseValueError when an epoch >= ``epoch`` was posted on chain.

    A posted epoch's root and inputs hash cover every input filed at or before it, so nothing may
    be added there any more: new records go to a later epoch.
    """
    rows = query(con, "SELECT max(epoch) FROM settlement_posts")
    if rows[0][0] is not None and int(rows[0][0]) >= epoch:
        raise WarehouseValueError(
            f"epoch {rows[0][0]} is settled on chain: inputs can no longer be filed under epoch"
            f" {epoch} (use a later epoch)"
        )

"""Epoch assignments in the warehouse: stating what an epoch pays for, and reading it back.

The body is stored as canonical JSON, and its hash is recomputed on every read: an assignment
edited in the database stops matching every run header signed for it, rather than paying for work
nobody assigned.
"""

from __future__ import annotations

import datetime as _dt
import json

from proofs.codec import canonical_json, to_hex
from proofs.errors import EncodingError
from rewards.warehouse import Connection, WarehouseValueError, query
from trainer.assignment import Assignment


def assign(con: Connection, epoch: int, assignment: Assignment) -> bool:
    """Record that ``epoch`` pays for ``assignment``; False when it is recorded already. The same
    assignment may be paid by several epochs (work goes on across epochs).

    Raises WarehouseValueError when the epoch is not open or already has another assignment
    (an epoch's work is never changed after peers may have trained for it).
    """
    if not query(con, "SELECT 1 FROM epochs WHERE epoch = $e", {"e": epoch}):
        raise WarehouseValueError(f"epoch {epoch} is not open: `python -m rewards open-epoch`")
    digest = to_hex(assignment.hash())
    held = query(con, "SELECT assignment_hash FROM assignments WHERE epoch = $e", {"e": epoch})
    if held:
        if held[0][0] == digest:
            return False
        raise WarehouseValueError(
            f"epoch {epoch} already pays for assignment {held[0][0]}; an epoch's work is never "
            "changed (open another epoch)"
        )
    query(
        con,
        "INSERT INTO assignments VALUES ($e, $h, $b, $at)",
        {
            "e": epoch,
            "h": digest,
            "b": canonical_json(assignment.to_json()).decode("ascii"),
            "at": _dt.datetime.now(_dt.UTC).replace(tzinfo=None),
        },
    )
    return True


def epoch_assignment(con: Connection, epoch: int) -> Assignment | None:
    """The assignment of ``epoch``, or None when it has none. Raises WarehouseValueError when the
    stored body no longer hashes to the stored hash."""
    sql = "SELECT assignment_hash, body FROM assignments WHERE epoch = $e"
    rows = query(con, sql, {"e": epoch})
    if not rows:
        return None
    digest, body = rows[0]
    try:
        assignment = Assignment.from_json(json.loads(body))
    except (json.JSONDecodeError, EncodingError) as exc:
        raise WarehouseValueError(f"epoch {epoch}'s assignment is unreadable: {exc}") from exc
    if to_hex(assignment.hash()) != digest:
        raise WarehouseValueError(f"epoch {epoch}'s stored assignment does not hash to {digest}")
    return assignment

"""Loading a shared run and its contribution verdicts into the warehouse (``ingest-shared``).

As ``rewards.ingest`` does for solo runs, a batch is read and verified first and then written in
one transaction; a record that does not verify is not loaded but recorded in ``rejections`` with
its reason, and never stops the others; ingesting the same data again changes nothing.

What is verified (issue #16, docs/warehouse.md "Shared runs"):
- the genesis, signed by its coordinator (without it nothing of the store is loaded);
- the round records, signed by the genesis's aggregator, on the roster and chained
  (``rewards.round_commits``: the walk stops at the first record that does not check out);
- each contribution a round record names (included, or excluded with a record hash): the store's
  record must hash to what the round record says, be signed by the roster key of its peer, and
  that key must be a registered trainer of the warehouse (whose payout address is paid);
- each contribution verdict: signed by its auditor key, a registered auditor, over a contribution
  the warehouse holds (same run, genesis, round, peer key),
  one verdict per auditor and contribution (rewards/shared_verdicts.py).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from proofs.errors import EncodingError
from rewards.ingest import IngestError, Rejection, resolve_epoch
from rewards.round_commits import valid_rounds
from rewards.shared_verdicts import VerdictIntake, read_verdicts
from rewards.warehouse import Connection, check_amount, query, transaction
from trainer.contribution import SignedContribution
from trainer.roundrecord import Excluded, RoundRecord
from trainer.sharedrun import Genesis
from trainer.sharedstore import SharedStore
from trainer.store import StoreError

log = logging.getLogger(__name__)

_Kind = Literal["round", "contribution"]
_RECORD_NAME = re.compile(r"r(\d{6})\.json")


@dataclass(frozen=True, kw_only=True, slots=True)
class SharedIngestReport:
    """What one ``ingest-shared`` batch did; ``rejections`` lists every record not loaded."""

    batch_id: str
    epoch: int
    shared_run_id: str | None
    rounds_loaded: int
    contributions_loaded: int
    verdicts_loaded: int
    duplicates: int
    rejections: tuple[Rejection, ...]


@dataclass
class _Batch:
    epoch: int
    batch_id: str
    url: str
    run_row: dict[str, object] | None = None
    rounds: list[dict[str, object]] = field(default_factory=list)
    contributions: list[dict[str, object]] = field(default_factory=list)
    exclusions: list[dict[str, object]] = field(default_factory=list)
    verdicts: list[dict[str, object]] = field(default_factory=list)
    duplicates: int = 0
    rejections: list[Rejection] = field(default_factory=list)

    def reject(self, kind: _Kind, source: str, reason: str) -> None:
        self.rejections.append(Rejection(kind=kind, source=source, reason=reason))


def _hex(value: bytes) -> str:
    return "0x" + bytes(value).hex()


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC).replace(tzinfo=None)


def _trainer_of(con: Connection, pubkey: bytes) -> str | None:
    rows = query(
        con,
        "SELECT peer_id FROM peers WHERE bls_pubkey = $k AND role = 'trainer'",
        {"k": _hex(pubkey)},
    )
    return None if not rows else str(rows[0][0])


# --- the store ------------------------------------------------------------------------------------


def _read_genesis(batch: _Batch, con: Connection, store: SharedStore, pool: int | None) -> Genesis:
    """The verified genesis, its shared_runs row staged when new. Raises IngestError when the store
    cannot be used at all (nothing of it is trustworthy then)."""
    try:
        signed = store.read_genesis()
    except (StoreError, EncodingError) as exc:
        raise IngestError(f"cannot read the genesis of {batch.url}: {exc}") from exc
    genesis = signed.genesis
    if not signed.verify():
        raise IngestError(f"{batch.url}: the genesis is not signed by its coordinator key")
    rows = query(
        con,
        "SELECT genesis_hash, round_pool FROM shared_runs WHERE shared_run_id = $s",
        {"s": genesis.shared_run_id},
    )
    if rows:
        if rows[0][0] != _hex(genesis.hash()):
            raise IngestError(
                f"shared run {genesis.shared_run_id!r} is in the warehouse with genesis"
                f" {rows[0][0]}, the store's genesis is {_hex(genesis.hash())}"
            )
        if pool is not None and int(rows[0][1]) != pool:
            raise IngestError(
                f"shared run {genesis.shared_run_id!r} has round pool {int(rows[0][1])}, not {pool}"
            )
        return genesis
    if pool is None:
        raise IngestError(f"shared run {genesis.shared_run_id!r} is new: give --round-pool")
    batch.run_row = {
        "s": genesis.shared_run_id,
        "g": _hex(genesis.hash()),
        "e": batch.epoch,
        "p": pool,
        "c": _hex(genesis.coordinator),
        "a": _hex(genesis.aggregator),
        "h": genesis.inner_steps,
        "r": genesis.rounds,
        "u": batch.url,
        "b": batch.batch_id,
        "at": _now(),
    }
    return genesis


def _read_rounds(batch: _Batch, con: Connection, store: SharedStore, genesis: Genesis) -> None:
    records, error = valid_rounds(store)
    if error is not None:
        batch.reject("round", batch.url, str(error))
    held = {
        int(r): str(h)
        for r, h in query(
            con,
            "SELECT round, record_hash FROM shared_rounds WHERE shared_run_id = $s",
            {"s": genesis.shared_run_id},
        )
    }
    # Contributions of held rounds are read again unless held: one rejected earlier (its peer
    # not registered yet, say) loads once the cause is fixed.
    known = {
        str(h)
        for (h,) in query(
            con,
            "SELECT contribution_hash FROM contributions WHERE shared_run_id = $s",
            {"s": genesis.shared_run_id},
        )
    }
    for signed in records:
        record = signed.round
        digest = _hex(record.hash())
        if record.round in held:
            if held[record.round] != digest:
                source = f"{batch.url}/rounds/r{record.round:06d}.json"
                batch.reject("round", source, f"the warehouse holds record {held[record.round]}")
            else:
                batch.duplicates += 1
                _read_contributions(batch, con, store, genesis, record, known, new_round=False)
            continue
        batch.rounds.append(
            {
                "s": record.shared_run_id,
                "r": record.round,
                "h": digest,
                "prev": _hex(record.prev),
                "base": _hex(record.base_root),
                "new": _hex(record.new_root),
                "carried": record.carried_over,
                "opened": record.opened_at,
                "closed": record.closed_at,
                "ni": len(record.included),
                "nx": len(record.excluded),
                "probe": record.base_probe_loss,
                "e": batch.epoch,
                "b": batch.batch_id,
            }
        )
        _read_contributions(batch, con, store, genesis, record, known, new_round=True)


def _contribution(
    batch: _Batch,
    con: Connection,
    store: SharedStore,
    genesis: Genesis,
    where: tuple[str, int],
    expected: bytes,
) -> tuple[SignedContribution, str] | None:
    """The store's record ``contributions/<peer>/r<NNNNNN>.json`` and its warehouse peer, when it
    hashes to ``expected``, is signed by its roster key and that key is a registered trainer."""
    peer, r = where
    source = f"{batch.url}/contributions/{peer}/r{r:06d}.json"
    try:
        signed = store.read_contribution(peer, r)
    except (StoreError, EncodingError) as exc:
        batch.reject("contribution", source, f"unreadable: {exc}")
        return None
    problem = None
    if signed.contribution.hash() != expected:
        problem = f"record hash {_hex(signed.contribution.hash())} is not the round record's"
    elif not signed.verify_roster(genesis):
        problem = f"not signed by the roster key of peer {peer!r}"
    peer_id = _trainer_of(con, signed.contribution.pubkey) if problem is None else None
    if problem is None and peer_id is None:
        problem = f"roster key of {peer!r} is not a registered trainer of this warehouse"
    if problem is not None or peer_id is None:
        batch.reject("contribution", source, problem or "unknown peer")
        return None
    return signed, peer_id


def _read_contributions(
    batch: _Batch,
    con: Connection,
    store: SharedStore,
    genesis: Genesis,
    record: RoundRecord,
    known: set[str],
    *,
    new_round: bool,
) -> None:
    """Stage the contributions ``record`` names that are not ``known`` (and, for a round not held
    yet, its exclusions)."""
    r, run = record.round, record.shared_run_id

    def stage(found: tuple[SignedContribution, str], extra: Mapping[str, object]) -> None:
        signed, peer_id = found
        c = signed.contribution
        batch.contributions.append(
            {
                "s": run,
                "r": r,
                "p": peer_id,
                "name": c.peer,
                "h": _hex(c.hash()),
                "rr": c.round,
                "base": _hex(c.base_root),
                "delta": _hex(c.delta),
                "bytes": c.payload_bytes,
                "nnz": c.nnz,
                "losses": list(c.losses),
                "e": batch.epoch,
                "b": batch.batch_id,
                **extra,
            }
        )

    for inc in record.included:
        if _hex(inc.contribution) in known:
            continue
        found = _contribution(batch, con, store, genesis, (inc.peer, r), inc.contribution)
        if found is not None:
            stage(found, {"norm": inc.norm, "probe": inc.probe_loss, "inc": True, "on": None})
    for exc in record.excluded:
        if new_round:
            batch.exclusions.append(_exclusion_row(con, genesis, record, exc))
        folder, _, name = exc.file.partition("/")
        match = _RECORD_NAME.fullmatch(name)
        if exc.peer is None or exc.contribution is None or folder != exc.peer or match is None:
            continue  # no signed record to hold: the exclusion row says why
        if _hex(exc.contribution) in known:
            continue
        where = (exc.peer, int(match.group(1)))
        found = _contribution(batch, con, store, genesis, where, exc.contribution)
        if found is not None:
            extra = {"norm": exc.norm, "probe": exc.probe_loss, "inc": False, "on": exc.built_on}
            stage(found, extra)


def _exclusion_row(
    con: Connection, genesis: Genesis, record: RoundRecord, exc: Excluded
) -> dict[str, object]:
    key = None if exc.peer is None else genesis.peers.get(exc.peer)
    return {
        "s": record.shared_run_id,
        "r": record.round,
        "file": exc.file,
        "fh": _hex(exc.file_hash),
        "name": exc.peer,
        "p": None if key is None else _trainer_of(con, key),
        "h": None if exc.contribution is None else _hex(exc.contribution),
        "reason": exc.reason,
        "detail": exc.detail,
        "on": exc.built_on,
        "norm": exc.norm,
        "probe": exc.probe_loss,
    }


# --- writing --------------------------------------------------------------------------------------


def _write(batch: _Batch, con: Connection) -> None:
    if batch.run_row is not None:
        query(
            con,
            "INSERT INTO shared_runs VALUES ($s, $g, $e, $p, $c, $a, $h, $r, $u, $b, $at)",
            batch.run_row,
        )
    for row in batch.rounds:
        query(
            con,
            "INSERT INTO shared_rounds VALUES ($s, $r, $h, $prev, $base, $new, $carried, $opened,"
            " $closed, $ni, $nx, $probe, $e, $b)",
            row,
        )
    for row in batch.contributions:
        query(
            con,
            "INSERT INTO contributions VALUES ($s, $r, $p, $name, $h, $rr, $base, $delta, $bytes,"
            " $nnz, $norm, $probe, $inc, $on, $losses, $e, $b) ON CONFLICT DO NOTHING",
            row,
        )
    for row in batch.exclusions:
        query(
            con,
            "INSERT INTO exclusions VALUES ($s, $r, $file, $fh, $name, $p, $h, $reason, $detail,"
            " $on, $norm, $probe)",
            row,
        )
    for row in batch.verdicts:
        query(
            con,
            "INSERT INTO contribution_verdicts SELECT $id, $s, $r, c.peer_id, $h, a.peer_id, $e,"
            " $o, $m, $why, $passed, $n, $hsteps, $lb, $la, $held, $seed, $dev, $b"
            " FROM contributions AS c, peers AS a"
            " WHERE c.shared_run_id = $s AND c.contribution_hash = $h AND a.bls_pubkey = $auditor",
            row,
        )


def _write_rejections(batch: _Batch, con: Connection) -> None:
    for r in batch.rejections:
        query(
            con,
            "INSERT INTO rejections VALUES ($s, $k, $r, $b, $at) ON CONFLICT DO NOTHING",
            {"s": r.source, "k": r.kind, "r": r.reason, "b": batch.batch_id, "at": _now()},
        )


def ingest_shared(
    con: Connection,
    *,
    store_url: str | None,
    verdict_dirs: Sequence[str] = (),
    epoch: int | None = None,
    round_pool: int | None = None,
) -> SharedIngestReport:
    """Load the shared run at ``store_url`` (genesis, rounds, contributions, exclusions) and every
    contribution verdict below ``verdict_dirs``, filed under ``epoch`` (default: the latest open).

    ``round_pool`` (base units each closed round shares) is required the first time a shared run
    is loaded and must not change afterwards. Raises IngestError (nothing written) when no epoch
    is open, a folder or the genesis cannot be used; records that do not verify are rejections.
    """
    if round_pool is not None:
        check_amount("round pool", round_pool)
    resolved = resolve_epoch(con, epoch)
    text = "\n".join([store_url or "", *verdict_dirs, _now().isoformat()])
    batch = _Batch(
        epoch=resolved,
        batch_id="s-" + hashlib.sha256(text.encode()).hexdigest()[:16],
        url=store_url or "",
    )
    run_id = None
    if store_url is not None:
        store = SharedStore(store_url)
        genesis = _read_genesis(batch, con, store, round_pool)
        run_id = genesis.shared_run_id
        _read_rounds(batch, con, store, genesis)
    intake = VerdictIntake(
        epoch=batch.epoch,
        batch_id=batch.batch_id,
        staged={str(c["h"]): c for c in batch.contributions},
        new_genesis=None if batch.run_row is None else str(batch.run_row["g"]),
        rows=batch.verdicts,
        rejections=batch.rejections,
    )
    for folder in verdict_dirs:
        read_verdicts(con, folder, intake)
    batch.duplicates += intake.duplicates
    with transaction(con):
        _write(batch, con)
        _write_rejections(batch, con)
    report = SharedIngestReport(
        batch_id=batch.batch_id,
        epoch=batch.epoch,
        shared_run_id=run_id,
        rounds_loaded=len(batch.rounds),
        contributions_loaded=len(batch.contributions),
        verdicts_loaded=len(batch.verdicts),
        duplicates=batch.duplicates,
        rejections=tuple(batch.rejections),
    )
    log.info("ingest-shared %s: %s", batch.batch_id, report)
    return report

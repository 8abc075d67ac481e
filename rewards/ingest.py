"""Loading run stores and audit verdicts into the warehouse, verifying signatures on the way in.

A batch (one ``ingest`` call) is read and verified first, then written in one transaction: a
crash, a database error or (with ``strict``) any rejected record leaves the database exactly as it
was. A record that fails verification (bad signature, broken hash chain, unknown signer,
conflicting verdict, malformed file) is not loaded: it is rejected with its reason, counted and
recorded in ``rejections``. Ingesting the same data again changes nothing.

A run is named in the warehouse by its peer: ``runs.run_id`` is ``<peer_id>/<run id>``, the peer
being the registered owner of the header's key, so no peer can squat or take over another's run
id. A run is paid only for its epoch's work: it must match the epoch's assignment
(rewards.assignments; the header's recipe, the assignment hash and the run seed derived from the
peer's key) and no gradient root of it may be one already committed by another run (the run
ingested later is refused; the earlier one is unaffected). Refused runs are never paid and never
slashed: they are rejections with the reason.

Runs are authenticated with audit.fetch.load_run, i.e. trainer.chainwalk, the walker verify-store
uses (header signature, hash chain through every manifest and step record, the seeds, rates and
batches the header derives, last manifest signature: two BLS verifications per run), after checking
that their key is a registered trainer (no BLS work for unknown keys). Verdicts get one aggregate
BLS check for the whole batch, bisected only when it fails (a bundle file's aggregate is checked
as it is read); a verdict must then name the run's key, header hash and step manifest, a step of
the run and a registered auditor, and not contradict that auditor's earlier verdict on the step.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from proofs.errors import VeritrainError
from proofs.signatures import Domain, aggregate, aggregate_verify
from rewards.assignments import epoch_assignment
from rewards.verdict_rows import write_verdicts
from rewards.warehouse import (
    Connection,
    WarehouseValueError,
    check_unsettled,
    query,
    transaction,
)

if TYPE_CHECKING:
    from audit.fetch import VerifiedRun
    from audit.verdict import SignedVerdict
    from trainer.assignment import Assignment

log = logging.getLogger(__name__)

PLAN_KIND = "veritrain-audit-plan"  # audit/jobs.py writes these next to the verdicts


class IngestError(VeritrainError, ValueError):
    """The batch cannot run (no epoch open, missing folder) or was aborted; nothing was written."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Rejection:
    """A record that was not loaded, and why."""

    kind: Literal["run", "verdict", "shared-run", "round", "contribution", "contribution-verdict"]
    source: str
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class IngestReport:
    """What one batch did. ``rejections`` lists every record not loaded (also stored)."""

    batch_id: str
    epoch: int
    runs_loaded: int
    verdicts_loaded: int
    duplicates: int
    rejections: tuple[Rejection, ...]


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC).replace(tzinfo=None)


def _hex(value: bytes) -> str:
    return "0x" + bytes(value).hex()


def resolve_epoch(con: Connection, epoch: int | None) -> int:
    """``epoch`` if open, else the latest open epoch; IngestError when there is none."""
    if epoch is None:
        rows = query(con, "SELECT max(epoch) FROM epochs")
        if rows[0][0] is None:
            raise IngestError("no epoch is open: run `python -m rewards open-epoch N --pool P`")
        epoch = int(rows[0][0])
    elif not query(con, "SELECT 1 FROM epochs WHERE epoch = $e", {"e": epoch}):
        raise IngestError(f"epoch {epoch} is not open")
    try:
        check_unsettled(con, epoch)
    except WarehouseValueError as exc:
        raise IngestError(str(exc)) from exc
    return epoch


# --- runs ---------------------------------------------------------------------------------------


def run_urls(url: str) -> list[str]:
    """``url`` itself when it holds a run (header.json), else each sub-folder that holds one."""
    from trainer.store import RunStore

    store = RunStore(url)
    if store.has_header():
        return [url]
    try:
        children = sorted(store.fs.ls(store.root, detail=False))
    except (OSError, ValueError) as exc:
        raise IngestError(f"cannot list run store {url}: {exc}") from exc
    found = []
    for child in children:
        child_url = store.fs.unstrip_protocol(child) if "://" in url else str(child)
        if RunStore(child_url).has_header():
            found.append(child_url)
    if not found:
        raise IngestError(f"no run (header.json) at or below {url}")
    return found


def run_key(con: Connection, pubkey: bytes, run_id: str) -> str | None:
    """The warehouse name ``<peer_id>/<run id>`` of run ``run_id`` signed by ``pubkey``, or None
    when no trainer registered that key."""
    peer = query(
        con,
        "SELECT peer_id FROM peers WHERE bls_pubkey = $k AND role = 'trainer'",
        {"k": _hex(pubkey)},
    )
    return None if not peer else f"{peer[0][0]}/{run_id}"


def _already_loaded(con: Connection, url: str) -> bool | None:
    """True when the run at ``url`` is in the warehouse unchanged (read without verifying: the
    identity compared was verified when it was loaded), None when not there or unreadable."""
    from trainer.store import RunStore

    try:
        store = RunStore(url)
        header = store.read_header().header
        key = run_key(con, header.pubkey, header.run_id)
        known = query(
            con,
            "SELECT header_hash, final_manifest_hash FROM runs WHERE run_id = $r",
            {"r": key},
        )
        if not known:
            return None
        windows = store.manifest_windows()
        last = store.read_manifest(windows[-1]).manifest.hash() if windows else b""
    except (VeritrainError, OSError, IndexError):
        return None
    return bool(known[0][0] == _hex(header.hash()) and known[0][1] == _hex(last))


def _unknown_signer(con: Connection, url: str) -> str | None:
    from trainer.store import RunStore

    try:
        key = _hex(RunStore(url).read_header().header.pubkey)
    except (VeritrainError, OSError):
        return None  # load_run names the problem precisely
    if query(con, "SELECT 1 FROM peers WHERE bls_pubkey = $k AND role = 'trainer'", {"k": key}):
        return None
    return f"unknown peer: key {key[:14]}... is not a registered trainer"


def _read_runs(batch: _Batch, con: Connection, url: str) -> None:
    from audit.fetch import ArtifactInvalid, load_run
    from trainer.store import RunStore

    for run_url in run_urls(url):
        if _already_loaded(con, run_url):
            batch.duplicates += 1
            continue
        unknown = _unknown_signer(con, run_url)
        if unknown is not None:  # no BLS work for a key nobody registered
            batch.rejections.append(Rejection(kind="run", source=run_url, reason=unknown))
            continue
        try:
            batch.runs.append((run_url, load_run(RunStore(run_url), derived=True)))
        except (ArtifactInvalid, VeritrainError, OSError) as exc:
            batch.rejections.append(Rejection(kind="run", source=run_url, reason=str(exc)))


def _run_problem(con: Connection, run: VerifiedRun, key: str | None, batch: _Batch) -> str | None:
    """Why an authenticated run cannot be loaded, or None."""
    h = run.header
    if key is None:
        return f"unknown peer: key {_hex(h.pubkey)[:14]}... is not a registered trainer"
    known = query(
        con, "SELECT header_hash, final_manifest_hash FROM runs WHERE run_id = $r", {"r": key}
    )
    if known:
        return (
            f"run {key!r} was ingested with final manifest {known[0][1]}; the store now"
            f" ends at {_hex(run.final_hash)} (runs are ingested once, when finished)"
        )
    if run.total_steps == 0:
        return "run has no steps"
    if batch.assignment is None:
        return f"epoch {batch.epoch} has no assignment: `python -m rewards assign` states its work"
    problems = batch.assignment.problems(h)
    if problems:
        return f"not epoch {batch.epoch}'s assigned work: " + "; ".join(problems)
    for r in run.records:
        owner = batch.grad_roots.get(_hex(r.grad_root))
        if owner is not None and owner != key:
            return (
                f"step {r.step}'s gradient root {_hex(r.grad_root)[:18]}... was committed by run"
                f" {owner!r}, ingested earlier (two runs with the same gradients are never both"
                " paid)"
            )
    return None


def _committed_roots(con: Connection, runs: Sequence[tuple[str, VerifiedRun]]) -> dict[str, str]:
    """gradient root -> the warehouse run that holds it, for every root of ``runs`` already in
    ``steps`` (one join for the whole batch, not one scan per run)."""
    roots = sorted({_hex(r.grad_root) for _, run in runs for r in run.records})
    if not roots:
        return {}
    rows = query(
        con,
        "SELECT grad_root, min(run_id) FROM steps"
        " WHERE grad_root IN (SELECT unnest($roots)) GROUP BY grad_root",
        {"roots": roots},
    )
    return {str(root): str(owner) for root, owner in rows}


def _write_runs(batch: _Batch, con: Connection) -> int:
    loaded = 0
    batch.grad_roots = _committed_roots(con, batch.runs)
    for source, run in batch.runs:
        key = run_key(con, run.header.pubkey, run.header.run_id)
        same = query(
            con,
            "SELECT 1 FROM runs"
            " WHERE run_id = $r AND header_hash = $h AND final_manifest_hash = $f",
            {"r": key, "h": _hex(run.header_hash), "f": _hex(run.final_hash)},
        )
        if same:  # the same run reached through two URLs of one batch
            batch.duplicates += 1
            continue
        problem = _run_problem(con, run, key, batch)
        if problem is not None or key is None:
            reason = problem or "unknown peer"
            batch.rejections.append(Rejection(kind="run", source=source, reason=reason))
            continue
        h = run.header
        query(
            con,
            "INSERT INTO runs SELECT $r, peer_id, $e, $hh, $m, $o, $d, $b, $c, $tps, $n, $fh,"
            " $dev, $url, $batch FROM peers WHERE bls_pubkey = $k",
            {
                "r": key,
                "e": batch.epoch,
                "hh": _hex(run.header_hash),
                "m": h.model,
                "o": h.optimizer.name,
                "d": "" if h.dataset is None else _hex(h.dataset.root),
                "b": h.batch_size,
                "c": h.context,
                "tps": h.batch_size * h.context,
                "n": run.total_steps,
                "fh": _hex(run.final_hash),
                "dev": h.device,
                "url": source,
                "batch": batch.batch_id,
                "k": _hex(h.pubkey),
            },
        )
        rows = [
            (
                key,
                r.step,
                str(r.replay_seed),
                _hex(r.grad_root),
                r.loss,
                r.lrs[0] if r.lrs else None,
                _hex(m.hash()),
            )
            for m in run.manifests
            for r in m.records
        ]
        con.executemany("INSERT INTO steps VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        batch.grad_roots.update((_hex(r.grad_root), key) for r in run.records)
        loaded += 1
    return loaded


# --- verdicts -------------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class _Batch:
    epoch: int
    batch_id: str
    runs: list[tuple[str, VerifiedRun]] = field(default_factory=list)
    verdicts: list[tuple[str, SignedVerdict]] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    duplicates: int = 0
    assignment: Assignment | None = None
    grad_roots: dict[str, str] = field(default_factory=dict)
    """gradient root -> the run that committed it first (warehouse and this batch)."""


def verdict_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Every ``*.json`` below ``folder``, sorted; IngestError when the folder does not exist."""
    root = Path(folder)
    if not root.is_dir():
        raise IngestError(f"verdict folder {folder!s} does not exist")
    return sorted(p for p in root.rglob("*.json") if p.is_file())


def _parse_verdict_file(path: Path) -> list[SignedVerdict]:
    """The signed verdicts in one file: a single signed verdict, or a bundle's members.

    A bundle's members carry no individual signatures; its aggregate is checked here (one
    pairing check) and its members are returned as verified. An audit plan file (plan.json, the
    auditor's record of its sample) holds no verdict: it gives an empty list.
    """
    from audit.bundle import VerdictBundle, verify_bundle
    from audit.verdict import BUNDLE_KIND, MAX_BUNDLE_JSON, SignedVerdict, read_verdict_json

    data = path.read_bytes()
    try:
        obj = read_verdict_json(data, max_bytes=MAX_BUNDLE_JSON)  # size and depth limited
    except ValueError as exc:  # VerdictError: not UTF-8, not JSON, over a limit
        raise IngestError(f"not JSON: {exc}") from exc
    if isinstance(obj, dict) and obj.get("kind") == PLAN_KIND:
        return []
    if isinstance(obj, dict) and obj.get("kind") == BUNDLE_KIND:
        bundle = VerdictBundle.from_json(obj)
        if not verify_bundle(bundle):
            raise IngestError("bundle's aggregate signature does not verify")
        return [SignedVerdict(verdict=v, signature=bundle.signature) for v in bundle.verdicts]
    return [SignedVerdict.from_json(obj)]


def _bad_signatures(items: Sequence[SignedVerdict]) -> set[int]:
    """Indices of items whose signature fails: one aggregate check, bisected only on failure."""
    if not items:
        return set()
    try:
        ok = aggregate_verify(
            [s.verdict.auditor for s in items],
            [(Domain.VERDICT, s.verdict.run_id, s.verdict.canonical_bytes()) for s in items],
            aggregate([s.signature for s in items]),
        )
    except VeritrainError:
        ok = False
    if ok:
        return set()
    if len(items) == 1:
        return {0}
    half = len(items) // 2
    return _bad_signatures(items[:half]) | {half + i for i in _bad_signatures(items[half:])}


def _read_verdicts(batch: _Batch, con: Connection, folder: str) -> None:
    parsed: list[tuple[str, SignedVerdict, bool]] = []  # (source, verdict, from a bundle)
    for path in verdict_files(folder):
        try:
            signed = _parse_verdict_file(path)
        except (VeritrainError, OSError) as exc:  # VerdictError is an EncodingError
            batch.rejections.append(Rejection(kind="verdict", source=str(path), reason=str(exc)))
            continue
        parsed.extend((str(path), item, len(signed) > 1) for item in signed)
    ids = [_hex(item.verdict.digest()) for _, item, _ in parsed]
    # Only this batch's ids are looked up: the warehouse may hold millions of verdicts.
    known = {
        str(r[0])
        for r in query(
            con,
            "SELECT verdict_id FROM verdicts WHERE list_contains($ids, verdict_id)",
            {"ids": ids},
        )
    }
    pending: list[tuple[str, SignedVerdict]] = []
    for (source, item, bundled), verdict_id in zip(parsed, ids, strict=True):
        if verdict_id in known:
            batch.duplicates += 1
            continue
        known.add(verdict_id)
        if bundled:  # the bundle's aggregate signature was checked when it was parsed
            batch.verdicts.append((source, item))
        else:
            pending.append((source, item))
    bad = _bad_signatures([s for _, s in pending])
    for i, (source, item) in enumerate(pending):
        if i in bad:
            reason = "verdict signature does not verify under its auditor key"
            batch.rejections.append(Rejection(kind="verdict", source=source, reason=reason))
        else:
            batch.verdicts.append((source, item))


# --- writing --------------------------------------------------------------------------------------


def _batch_id(stores: Iterable[str], folder: str | None) -> str:
    text = "\n".join([*sorted(stores), folder or "", _now().isoformat()])
    return "b-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def ingest(
    con: Connection,
    *,
    stores: Sequence[str],
    verdicts_dir: str | None,
    epoch: int | None = None,
    strict: bool = False,
) -> IngestReport:
    """Load every run below ``stores`` and every verdict file below ``verdicts_dir``.

    New records are filed under ``epoch`` (default: the latest open epoch). Runs are written
    before verdicts, so a verdict may refer to a run of the same batch. Raises IngestError when
    no epoch is open, a folder is missing, or ``strict`` and something was rejected; in every
    error case nothing is written.
    """
    batch = _Batch(epoch=resolve_epoch(con, epoch), batch_id=_batch_id(stores, verdicts_dir))
    try:
        batch.assignment = epoch_assignment(con, batch.epoch)
    except WarehouseValueError as exc:
        raise IngestError(str(exc)) from exc
    for url in stores:
        _read_runs(batch, con, url)
    if verdicts_dir is not None:
        _read_verdicts(batch, con, verdicts_dir)
    with transaction(con):
        runs_loaded = _write_runs(batch, con)
        verdicts_loaded = _write_verdicts(batch, con)
        if strict and batch.rejections:
            first = batch.rejections[0]
            raise IngestError(
                f"strict: {len(batch.rejections)} record(s) rejected, batch aborted; first:"
                f" {first.kind} {first.source}: {first.reason}"
            )
        new_rejections = _write_rejections(batch, con)
        if runs_loaded or verdicts_loaded or new_rejections:
            query(
                con,
                "INSERT INTO ingest_batches VALUES ($b, $e, $s, $v, $r, $n, $d, $x, $at)",
                {
                    "b": batch.batch_id,
                    "e": batch.epoch,
                    "s": ",".join(stores) or None,
                    "v": verdicts_dir,
                    "r": runs_loaded,
                    "n": verdicts_loaded,
                    "d": batch.duplicates,
                    "x": len(batch.rejections),
                    "at": _now(),
                },
            )
    report = IngestReport(
        batch_id=batch.batch_id,
        epoch=batch.epoch,
        runs_loaded=runs_loaded,
        verdicts_loaded=verdicts_loaded,
        duplicates=batch.duplicates,
        rejections=tuple(batch.rejections),
    )
    log.info("ingest %s: %s", batch.batch_id, report)
    return report


def _write_rejections(batch: _Batch, con: Connection) -> int:
    added = 0
    for r in batch.rejections:
        if query(
            con,
            "SELECT 1 FROM rejections WHERE source = $s AND reason = $r",
            {"s": r.source, "r": r.reason},
        ):
            continue
        query(
            con,
            "INSERT INTO rejections VALUES ($s, $k, $r, $b, $at)",
            {"s": r.source, "k": r.kind, "r": r.reason, "b": batch.batch_id, "at": _now()},
        )
        added += 1
    return added


def _write_verdicts(batch: _Batch, con: Connection) -> int:
    loaded, rejected = write_verdicts(
        con, batch.verdicts, epoch=batch.epoch, batch_id=batch.batch_id
    )
    batch.rejections.extend(Rejection(kind="verdict", source=s, reason=r) for s, r in rejected)
    return loaded

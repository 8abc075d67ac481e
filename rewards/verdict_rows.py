"""Checking signature-verified verdicts against the warehouse and inserting them, for ingest.

A verdict is loaded only when it names a registered trainer's run of the warehouse (this batch's
runs included), a step of it with its header hash and step manifest, and a registered auditor,
and does not contradict that auditor's earlier verdict on the step. What these checks read is
fetched once per batch (a handful of queries, not five per verdict) and the rows are inserted in
one statement per table: 14,000 verdicts cost seconds, not minutes (benchmarks/ingest_bench.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from rewards.warehouse import Connection, query

if TYPE_CHECKING:
    from audit.verdict import SignedVerdict, Verdict


def _hex(value: bytes) -> str:
    return "0x" + bytes(value).hex()


@dataclass(kw_only=True, slots=True)
class Known:
    """What verdict checks read from the warehouse, fetched once per batch rather than five
    queries per verdict: trainer and auditor ids by key, the batch's runs and their step
    manifests, and the verdicts already held per (run, step, auditor id)."""

    trainers: dict[str, str]
    auditors: dict[str, str]
    runs: dict[str, tuple[str, int, str, int]]  # run -> (key, step count, header hash, epoch)
    manifests: dict[tuple[str, int], str]
    held: dict[tuple[str, int, str], str]

    @classmethod
    def fetch(cls, con: Connection, verdicts: Sequence[Verdict]) -> Known:
        keys = sorted({_hex(k) for v in verdicts for k in (v.peer, v.auditor)})
        peers = query(
            con,
            "SELECT bls_pubkey, role, peer_id FROM peers WHERE list_contains($k, bls_pubkey)",
            {"k": keys},
        )
        trainers = {k: p for k, role, p in peers if role == "trainer"}
        names = sorted(
            {f"{trainers[_hex(v.peer)]}/{v.run_id}" for v in verdicts if _hex(v.peer) in trainers}
        )
        within = "run_id IN (SELECT unnest($r))"
        runs = query(
            con,
            "SELECT r.run_id, p.bls_pubkey, r.step_count, r.header_hash, r.epoch FROM runs"
            f" AS r JOIN peers AS p USING (peer_id) WHERE r.{within}",
            {"r": names},
        )
        steps = query(
            con, f"SELECT run_id, step, manifest_hash FROM steps WHERE {within}", {"r": names}
        )
        held = query(
            con,
            f"SELECT run_id, step, auditor_id, verdict_id FROM verdicts WHERE {within}",
            {"r": names},
        )
        return cls(
            trainers=trainers,
            auditors={k: p for k, role, p in peers if role == "auditor"},
            runs={r: (k, int(n), h, int(e)) for r, k, n, h, e in runs},
            manifests={(r, int(s)): m for r, s, m in steps},
            held={(r, int(s), a): i for r, s, a, i in held},
        )


def verdict_problem(
    known: Known, v: Verdict, key: str | None, verdict_id: str, epoch: int
) -> str | None:
    """Why a (signature-checked) verdict about warehouse run ``key`` cannot be loaded, or None."""
    if key is None:
        return f"verdict names peer {_hex(v.peer)[:14]}..., which is not a registered trainer"
    run = known.runs.get(key)
    if run is None:
        return f"unknown run {key!r} (ingest its store first or in the same batch)"
    if run[3] > epoch:
        return f"filed under epoch {epoch}, before its run (epoch {run[3]})"
    if run[0] != _hex(v.peer):
        return f"verdict names peer {_hex(v.peer)[:14]}..., not the run's key"
    if v.step >= run[1]:
        return f"step {v.step} is outside the run's {run[1]} steps"
    if run[2] != _hex(v.recipe_hash) or known.manifests.get((key, v.step)) != _hex(v.manifest_hash):
        return "verdict is about another recipe or manifest than the ingested run's"
    auditor = known.auditors.get(_hex(v.auditor))
    if auditor is None:
        return f"unknown auditor {_hex(v.auditor)[:14]}... (register-peer --role auditor)"
    clash = known.held.get((key, v.step, auditor))
    if clash is not None and clash != verdict_id:
        return f"conflicts with verdict {clash} of the same auditor on step {v.step}"
    return None


def _worst(values: Sequence[float]) -> float | None:
    """The largest distance; NaN when any is NaN (a NaN gradient is the worst there is)."""
    if not values:
        return None
    return math.nan if any(math.isnan(x) for x in values) else max(values)


_VERDICT_COLUMNS = pa.schema(
    [(n, pa.string()) for n in ("verdict_id", "run_id")]
    + [("step", pa.int64())]
    + [(n, pa.string()) for n in ("auditor_id",)]
    + [("epoch", pa.int64())]
    + [(n, pa.string()) for n in ("outcome", "mode")]
    + [(n, pa.float64()) for n in ("max_rel_l2", "max_cos_dist", "loss_before", "loss_after")]
    + [
        (n, pa.string())
        for n in ("replay_seed", "recipe_hash", "manifest_hash", "device", "reason", "batch_id")
    ]
)
_TENSOR_COLUMNS = pa.schema(
    [("verdict_id", pa.string()), ("tensor", pa.string())]
    + [(n, pa.float64()) for n in ("rel_l2", "cos_dist", "max_rel_l2", "max_cos_dist")]
    + [("passed", pa.bool_())]
)


def _insert(con: Connection, table: str, schema: pa.Schema, rows: list[tuple[object, ...]]) -> None:
    """INSERT every row in one statement (through Arrow: DuckDB's executemany costs a
    statement per row)."""
    if rows:
        columns = list(zip(*rows, strict=True))
        data = pa.Table.from_arrays(
            [pa.array(c, t) for c, t in zip(columns, schema.types, strict=True)], schema=schema
        )
        con.register("_ingest_rows", data)
        try:
            con.execute(f"INSERT INTO {table} SELECT * FROM _ingest_rows").fetchall()
        finally:
            con.unregister("_ingest_rows")


def write_verdicts(
    con: Connection, verdicts: Sequence[tuple[str, SignedVerdict]], *, epoch: int, batch_id: str
) -> tuple[int, list[tuple[str, str]]]:
    """Check and insert ``verdicts`` ((source, signature-checked verdict) pairs, in order) under
    ``epoch``; returns the number inserted and (source, reason) for each one refused. Runs in
    the caller's transaction, after the batch's runs were written."""
    known = Known.fetch(con, [s.verdict for _, s in verdicts])
    rows: list[tuple[object, ...]] = []
    tensors: list[tuple[object, ...]] = []
    rejected: list[tuple[str, str]] = []
    for source, signed in verdicts:
        v = signed.verdict
        verdict_id = _hex(v.digest())
        peer = known.trainers.get(_hex(v.peer))
        key = None if peer is None else f"{peer}/{v.run_id}"
        problem = verdict_problem(known, v, key, verdict_id, epoch)
        if problem is not None or key is None:
            reason = problem or "unknown peer"
            rejected.append((source, reason))
            continue
        auditor = known.auditors[_hex(v.auditor)]
        known.held[(key, v.step, auditor)] = verdict_id  # a later verdict of the batch clashes
        useful = v.usefulness
        rows.append(
            (
                verdict_id,
                key,
                v.step,
                auditor,
                epoch,
                v.outcome.value,
                v.mode.value,
                _worst([t.rel_l2 for t in v.tensors]),
                _worst([t.cosine for t in v.tensors]),
                useful.loss_before if useful else None,
                useful.loss_after if useful else None,
                _hex(v.replay_seed),
                _hex(v.recipe_hash),
                _hex(v.manifest_hash),
                v.device,
                v.reason,
                batch_id,
            )
        )
        tensors.extend(
            (verdict_id, t.name, t.rel_l2, t.cosine, t.max_rel_l2, t.max_cosine, t.passed)
            for t in v.tensors
        )
    _insert(con, "verdicts", _VERDICT_COLUMNS, rows)
    _insert(con, "verdict_tensors", _TENSOR_COLUMNS, tensors)
    return len(rows), rejected

"""Cumulative payouts as a Merkle tree: per-epoch roots, proofs, CSV input, the inputs hash.

Each epoch's tree holds one leaf (account, cumulative amount) per account paid anything up to
that epoch, in account order, built with proofs.payout.PayoutTree (OpenZeppelin
StandardMerkleTree, leaf encoding ["address", "uint256"]). The inputs hash binds a root to the
exact off-chain data and policy it was computed from, so ``verify-root`` can recompute it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proofs.errors import VeritrainError
from proofs.hashing import Root
from proofs.payout import PayoutTree, normalize_address
from proofs.payout import check_amount as check_uint256
from rewards import policy
from rewards.warehouse import (
    Connection,
    PathOrConnection,
    WarehouseValueError,
    opened,
    query,
    transaction,
)

log = logging.getLogger(__name__)

INPUTS_HASH_VERSION = "veritrain-payout-inputs-v1"


class PayoutDataError(VeritrainError, ValueError):
    """A payout list (CSV or warehouse epoch) is malformed, empty or has duplicate accounts."""


class PayoutWriteError(VeritrainError, OSError):
    """A payout tree could not be written where asked."""


@dataclass(frozen=True, kw_only=True, slots=True)
class EpochPayout:
    """What an epoch's on-chain root commits to.

    entries: (account, cumulative amount) per account, lowercase 0x addresses, sorted by account.
    root: the PayoutTree root over ``entries``; cumulative_total: the sum of the amounts;
    inputs_hash: sha256 over the policy, its parameters and every input row of epochs <= epoch.
    """

    epoch: int
    entries: tuple[tuple[str, int], ...]
    root: Root
    cumulative_total: int
    inputs_hash: bytes

    def tree(self) -> PayoutTree:
        """The full payout tree (for proofs)."""
        return PayoutTree.build(self.entries)


# The rows an epoch's result depends on (policy.sql reads nothing else), each in a fixed order.
_INPUT_QUERIES = (
    (
        "peers",
        "SELECT peer_id, role, bls_pubkey, payout_address FROM peers WHERE peer_id IN ("
        " SELECT peer_id FROM runs WHERE epoch <= $e UNION"
        " SELECT auditor_id FROM verdicts WHERE epoch <= $e UNION"
        " SELECT peer_id FROM stakes WHERE epoch <= $e UNION"
        " SELECT peer_id FROM contributions WHERE epoch <= $e UNION"
        " SELECT auditor_id FROM contribution_verdicts WHERE epoch <= $e) ORDER BY peer_id",
    ),
    ("epochs", "SELECT epoch, pool::VARCHAR FROM epochs WHERE epoch <= $e ORDER BY epoch"),
    (
        "stakes",
        "SELECT peer_id, epoch, amount::VARCHAR FROM stakes WHERE epoch <= $e"
        " ORDER BY peer_id, epoch",
    ),
    (
        "runs",
        "SELECT run_id, peer_id, epoch, step_count, tokens_per_step, final_manifest_hash"
        " FROM runs WHERE epoch <= $e ORDER BY run_id",
    ),
    (
        "verdicts",
        "SELECT verdict_id, run_id, step, auditor_id, epoch, outcome, loss_before, loss_after"
        " FROM verdicts WHERE epoch <= $e ORDER BY verdict_id",
    ),
    # Shared runs (rewards/policy_shared.sql reads these columns).
    (
        "shared_runs",
        "SELECT shared_run_id, genesis_hash, epoch, round_pool::VARCHAR, inner_steps"
        " FROM shared_runs WHERE epoch <= $e ORDER BY shared_run_id",
    ),
    (
        "contributions",
        "SELECT shared_run_id, round, peer_id, contribution_hash, included, epoch"
        " FROM contributions WHERE epoch <= $e ORDER BY shared_run_id, contribution_hash",
    ),
    (
        "contribution_verdicts",
        "SELECT verdict_id, shared_run_id, contribution_hash, auditor_id, epoch, outcome,"
        " passed_steps, loss_before, loss_after"
        " FROM contribution_verdicts WHERE epoch <= $e ORDER BY verdict_id",
    ),
)


def inputs_hash(con: Connection, epoch: int, params: policy.PolicyParams) -> bytes:
    """sha256 of the policy text, its parameters and every input row with epoch <= ``epoch``.

    Rows are streamed as canonical JSON lines (floats by repr, so bit-exact), table by table.
    """
    h = hashlib.sha256()
    header = {
        "version": INPUTS_HASH_VERSION,
        "epoch": epoch,
        "policy_sql": policy.policy_sql_hash(),
        "params": params.to_sql_params(),
    }
    h.update(json.dumps(header, sort_keys=True).encode() + b"\n")
    for table, sql in _INPUT_QUERIES:
        h.update(f"#{table}\n".encode())
        con.execute(sql, {"e": epoch})
        while rows := con.fetchmany(10_000):
            for row in rows:
                h.update(json.dumps(list(row), default=repr).encode() + b"\n")
    return h.digest()


def epoch_entries(con: Connection, epoch: int) -> tuple[tuple[str, int], ...]:
    """(account, cumulative amount) of every account paid up to ``epoch``, by account."""
    if not query(con, "SELECT 1 FROM epochs WHERE epoch = $e", {"e": epoch}):
        raise PayoutDataError(f"epoch {epoch} does not exist")
    rows = query(
        con,
        "SELECT account, cumulative FROM payouts WHERE epoch = $e AND cumulative > 0"
        " ORDER BY account",
        {"e": epoch},
    )
    return tuple((str(a), int(c)) for a, c in rows)


def _assemble(con: Connection, epoch: int, params: policy.PolicyParams) -> EpochPayout:
    entries = epoch_entries(con, epoch)
    if not entries:
        raise PayoutDataError(f"nothing has been paid up to epoch {epoch}: no payout tree")
    tree = PayoutTree.build(entries)
    return EpochPayout(
        epoch=epoch,
        entries=entries,
        root=tree.root,
        cumulative_total=sum(amount for _, amount in entries),
        inputs_hash=inputs_hash(con, epoch, params),
    )


def epoch_payout(
    con_or_path: PathOrConnection, epoch: int, *, recompute: bool = True
) -> EpochPayout:
    """The payout entries, root, cumulative total and inputs hash of ``epoch``.

    With ``recompute`` (the default, what ``verify-root`` needs) the policy is run afresh from the
    input tables inside a transaction that is rolled back, so the stored results are neither
    trusted nor changed. Without it, the stored payouts table is read. Raises PayoutDataError
    when the epoch does not exist or nothing has been paid up to it.
    """
    with opened(con_or_path) as con:
        params = policy.stored_params(con)
        if not recompute:
            return _assemble(con, epoch, params)
        con.execute("BEGIN TRANSACTION")
        try:
            policy.run_statements(con, params)
            policy.check_invariants(con)
            return _assemble(con, epoch, params)
        finally:
            con.execute("ROLLBACK")


def record_root(con: Connection, epoch: int) -> EpochPayout:
    """Build ``epoch``'s tree from the stored payouts and cache its root in payout_roots.

    Raises PayoutDataError when a settlement post of this epoch carries another root: the
    warehouse no longer reproduces what was published.
    """
    payout = _assemble(con, epoch, policy.stored_params(con))
    root_hex = "0x" + payout.root.hex()
    posted = query(
        con,
        "SELECT root FROM settlement_posts WHERE epoch = $e AND root <> $r",
        {"e": epoch, "r": root_hex},
    )
    if posted:
        raise PayoutDataError(
            f"epoch {epoch} was posted with root {posted[0][0]}, the warehouse now gives {root_hex}"
        )
    with transaction(con):
        query(con, "DELETE FROM payout_roots WHERE epoch = $e", {"e": epoch})
        query(
            con,
            "INSERT INTO payout_roots VALUES ($e, $r, $t, $n, $h)",
            {
                "e": epoch,
                "r": root_hex,
                "t": payout.cumulative_total,
                "n": len(payout.entries),
                "h": "0x" + payout.inputs_hash.hex(),
            },
        )
    return payout


def read_csv(path: str | os.PathLike[str]) -> tuple[tuple[str, int], ...]:
    """Parse a payouts CSV with header ``account,amount`` (amount: integer base units).

    Amounts may use the whole uint256 range (the tree is not stored in the warehouse).
    Raises PayoutDataError naming the line of a malformed row, a negative or overflowing amount,
    or a duplicated account (cumulative claims are per account, so one leaf per account), and
    for a file that is not UTF-8 CSV text (a binary file) or cannot be read.
    """
    try:
        return _read_csv(path)
    except UnicodeDecodeError as exc:
        raise PayoutDataError(
            f"{path}: not a UTF-8 text CSV ({exc.reason} at byte {exc.start})"
        ) from exc
    except csv.Error as exc:  # e.g. a NUL byte: a binary file
        raise PayoutDataError(f"{path}: not a CSV file ({exc})") from exc
    except OSError as exc:
        raise PayoutDataError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _read_csv(path: str | os.PathLike[str]) -> tuple[tuple[str, int], ...]:
    entries: list[tuple[str, int]] = []
    seen: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header] != ["account", "amount"]:
            raise PayoutDataError(f"{path}: first line must be the header 'account,amount'")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 2:
                raise PayoutDataError(f"{path}:{line}: expected 2 fields, got {len(row)}")
            try:
                account = normalize_address(row[0].strip()).lower()
                text = row[1].strip()
                if not text.isdigit():
                    raise WarehouseValueError(f"amount must be a non-negative integer: {text!r}")
                amount = int(check_uint256(int(text)))
            except (ValueError, VeritrainError) as exc:
                raise PayoutDataError(f"{path}:{line}: {exc}") from exc
            if account in seen:
                raise PayoutDataError(
                    f"{path}:{line}: account {account} repeats line {seen[account]}"
                )
            seen[account] = line
            entries.append((account, amount))
    if not entries:
        raise PayoutDataError(f"{path}: no payout rows")
    return tuple(entries)


def write_tree(tree: PayoutTree, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``tree.json`` (standard-v1 dump) and ``proofs.json`` (per account) atomically.

    proofs.json maps each account (EIP-55) to {"index", "amount" (decimal string), "proof"}.
    Returns both paths; PayoutWriteError when ``out_dir`` cannot be made or written.
    """
    out = Path(out_dir)
    try:
        _write_tree(tree, out)
    except OSError as exc:
        raise PayoutWriteError(f"cannot write the tree to {out}: {exc.strerror or exc}") from exc
    return out / "tree.json", out / "proofs.json"


def _write_tree(tree: PayoutTree, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    proofs: dict[str, Any] = {
        "root": "0x" + tree.root.hex(),
        "accounts": {
            entry.account: {
                "index": i,
                "amount": str(entry.amount),
                "proof": ["0x" + h.hex() for h in tree.proof(i)],
            }
            for i, entry in enumerate(tree.entries)
        },
    }
    paths = (out / "tree.json", out / "proofs.json")
    for path, data in zip(paths, (tree.dump(), proofs), strict=True):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)

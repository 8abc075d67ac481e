"""Record a shared run's round records on chain (``python -m rewards commit-rounds``).

Each round record's hash is committed in the settlement contract's registry under
``audit.onchain.round_registry_id(shared run id, r)``; the block of that commitment is what a later
block hash, the round's audit beacon, is drawn after. Only records that check out are committed:
the genesis signed by its coordinator, every round record signed by the genesis's aggregator, on the
roster, and chained (``prev`` is the previous record's hash, or the genesis hash for round 0;
``base_root`` is the previous round's ``new_root``, or the genesis ``initial_root``). Committing is
idempotent: a round this account already committed with the same hash is skipped, so the command can
run after every round or follow the store.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from audit.onchain import round_registry_id
from proofs.errors import EncodingError, VeritrainError
from proofs.hashing import Hash32
from rewards.settlement_cli import deployment_option, keystore_option, rpc_option
from trainer.cli_errors import BadInput, Command, Failed
from trainer.roundrecord import SignedRoundRecord
from trainer.sharedstore import SharedStore
from trainer.store import StoreError

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from rewards.settlement import Settlement

logger = logging.getLogger(__name__)


class RoundChainError(VeritrainError, ValueError):
    """A shared run's genesis or round records do not check out, or the registry already holds
    another hash for one of its rounds."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundCommit:
    """One round's registry entry: ``committed`` now, or ``already`` there from an earlier call."""

    round: int
    record_hash: Hash32
    status: str
    block_number: int


def checked_rounds(store: SharedStore) -> list[SignedRoundRecord]:
    """Every round record of the store, in order, each checked against the genesis and the one
    before it. Raises RoundChainError naming the first record (or the genesis) that does not."""
    records, error = valid_rounds(store)
    if error is not None:
        raise error
    return records


def valid_rounds(store: SharedStore) -> tuple[list[SignedRoundRecord], RoundChainError | None]:
    """The records that check out, in order, up to the first that does not (and its error)."""
    signed_genesis = store.read_genesis()
    genesis = signed_genesis.genesis
    if not signed_genesis.verify():
        return [], RoundChainError(f"{store.url}: the genesis is not signed by its coordinator")
    prev, base = genesis.hash(), genesis.initial_root
    out: list[SignedRoundRecord] = []
    for expected, r in enumerate(store.rounds()):
        if r != expected:
            return out, RoundChainError(
                f"{store.url}: round {expected} has no record, round {r} has one"
            )
        try:
            signed = store.read_round(r)
        except (StoreError, EncodingError) as exc:
            return out, RoundChainError(f"{store.url}: round {r}: {exc}")
        record = signed.round
        problems = list(record.check_roster(genesis))
        if not signed.verify(genesis.aggregator):
            problems.append("not signed by the genesis's aggregator")
        if record.prev != prev:
            problems.append(f"prev 0x{record.prev.hex()} is not the previous record 0x{prev.hex()}")
        if out and record.opened_at != out[-1].round.closed_at:
            problems.append(
                f"opened_at {record.opened_at} is not round {r - 1}'s closed_at "
                f"{out[-1].round.closed_at}"
            )
        if record.base_root != base:
            problems.append(
                f"base_root 0x{record.base_root.hex()} is not the previous new_root 0x{base.hex()}"
            )
        if problems:
            return out, RoundChainError(f"{store.url}: round {r}: " + "; ".join(problems))
        out.append(signed)
        prev, base = record.hash(), record.new_root
    return out, None


def commit_rounds(
    store: SharedStore, settlement: Settlement, sender: LocalAccount
) -> list[RoundCommit]:
    """Commit every checked round record not yet in the registry under ``sender``'s address.

    Raises RoundChainError when a record does not check out (the rounds before it are committed
    first) or when ``sender`` already committed another hash for a round.
    """
    done: list[RoundCommit] = []
    records, error = valid_rounds(store)
    for signed in records:
        record = signed.round
        key = round_registry_id(record.shared_run_id, record.round)
        digest = record.hash()
        held = settlement.commitment(sender.address, key)
        if held is not None:
            if held.root != digest:
                raise RoundChainError(
                    f"round {record.round}: {sender.address} already committed 0x{held.root.hex()}"
                    f" under {key}, the record's hash is 0x{digest.hex()}"
                )
            done.append(
                RoundCommit(
                    round=record.round,
                    record_hash=digest,
                    status="already",
                    block_number=held.block_number,
                )
            )
            continue
        tx = settlement.record_commitment(sender, key, digest)
        logger.info("round %d committed in block %d", record.round, tx.block_number)
        done.append(
            RoundCommit(
                round=record.round,
                record_hash=digest,
                status="committed",
                block_number=tx.block_number,
            )
        )
    if error is not None:
        raise RoundChainError(f"{error} (committed the {len(done)} rounds before it)")
    return done


@click.command("commit-rounds", cls=Command)
@click.option(
    "--shared", "url", required=True, help="The shared run's store (folder or fsspec URL)."
)
@click.option("--follow", is_flag=True, help="Keep polling for new round records.")
@click.option(
    "--poll",
    default=2.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds between polls with --follow.",
)
@rpc_option
@deployment_option
@keystore_option
def commit_rounds_command(
    url: str, follow: bool, poll: float, rpc: str, deployment: Path, keystore: Path | None
) -> None:
    """Commit each round record's hash of the shared run at --shared in the on-chain registry
    (key ``shared/<run>/rNNNNNN``); rounds already committed by this account are skipped. With
    --follow, keeps going until the genesis's last round is committed (or Ctrl-C)."""
    from rewards.settlement_cli import _open, _signer  # the same node and key handling

    try:
        store = SharedStore(url)
        total = store.read_genesis().genesis.rounds
    except (StoreError, EncodingError) as exc:
        raise BadInput(str(exc)) from exc
    _, settlement, _ = _open(rpc, deployment)
    sender = _signer(keystore)
    seen: set[int] = set()
    while True:
        try:
            done = commit_rounds(store, settlement, sender)
        except RoundChainError as exc:
            raise Failed(str(exc)) from exc
        for c in done:
            if c.round not in seen:
                seen.add(c.round)
                click.echo(
                    f"round {c.round}: 0x{c.record_hash.hex()} {c.status} (block {c.block_number})"
                )
        if not follow or (total and len(seen) >= total):
            break
        time.sleep(poll)

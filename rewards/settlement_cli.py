"""Click commands for the chain side of rewards (chain node, deploy, fund, post, claim, verify-root,
status, run commitments). ``rewards/cli.py`` adds every command in ``COMMANDS`` to its group.

Thin: parse, call rewards.settlement / rewards.chain, print. Keys come from $VERITRAIN_ETH_KEY or
an encrypted keystore (--keystore, password from $VERITRAIN_KEYSTORE_PASSWORD or a prompt); there
is deliberately no option that takes a key.

Errors follow the convention of the three CLIs (trainer/cli_errors.py): a revert (decoded), a
missing deployment record or key, a wrong chain are bad input or setup, one ``error: ...`` line
and exit 2; ``verify-root`` exits 1 when the posted root does not match the warehouse. Each
command is a ``trainer.cli_errors.Command``, so it keeps the convention when invoked on its own.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from audit.onchain import Deployment
from rewards import chain as chainmod
from rewards.display import make_console, print_table, tokens
from rewards.settlement import ClaimRequest, Settlement, deploy_token
from trainer.cli_errors import BadInput, Command, Failed

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount
    from web3 import Web3

F = TypeVar("F", bound=Callable[..., Any])
console = make_console()  # no markup; hashes and keys stay whole on one line

RPC_ENV = "VERITRAIN_RPC"
DEPLOYMENT_ENV = "VERITRAIN_DEPLOYMENT"
KEYSTORE_ENV = "VERITRAIN_KEYSTORE"
DEFAULT_RPC = "http://127.0.0.1:8545"
DEFAULT_DEPLOYMENT = ".veritrain/deployment.json"
DEFAULT_STATE = ".veritrain/chain-state.json"
DB_ENV, DEFAULT_DB = "VERITRAIN_DB", "veritrain.duckdb"  # as rewards.warehouse


def _opt(*decls: str, **kw: Any) -> Callable[[F], F]:
    return click.option(*decls, show_default=True, **kw)


def _node_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    # chain.connect("tester") starts a chain inside this process: it starts empty (no ether for
    # the signer) and is gone when the command exits, with whatever was deployed or posted on it.
    if value == chainmod.TESTER_URL:
        raise click.BadParameter(
            "'tester' is an in-process test chain that ends with this command; give a node's"
            " http(s):// URL (start one with `python -m rewards chain`)",
            ctx=ctx,
            param=param,
        )
    return value


rpc_option = _opt(
    "--rpc",
    envvar=RPC_ENV,
    default=DEFAULT_RPC,
    callback=_node_url,
    help=f"JSON-RPC URL of a node (${RPC_ENV}).",
)
deployment_option = _opt(
    "--deployment",
    envvar=DEPLOYMENT_ENV,
    default=DEFAULT_DEPLOYMENT,
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"Deployment record (${DEPLOYMENT_ENV}).",
)
keystore_option = _opt(
    "--keystore",
    envvar=KEYSTORE_ENV,
    default=None,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=f"Encrypted key file (${KEYSTORE_ENV}); else the key in ${chainmod.KEY_ENV}.",
)
db_option = _opt(
    "--db", envvar=DB_ENV, default=DEFAULT_DB, type=click.Path(dir_okay=False), help="Warehouse."
)


def _signer(keystore: Path | None) -> LocalAccount:
    password = None
    if keystore is not None and chainmod.KEYSTORE_PASSWORD_ENV not in os.environ:
        password = click.prompt(f"Password for {keystore}", hide_input=True)
    return chainmod.load_account(keystore=keystore, password=password)


def _open(rpc: str, deployment: Path) -> tuple[Web3, Settlement, Deployment]:
    if not deployment.exists():
        raise BadInput(f"no deployment record at {deployment}: run `deploy` first")
    record = Deployment.from_json(deployment.read_text())
    w3 = chainmod.connect(rpc)
    if int(w3.eth.chain_id) != record.chain_id:
        raise BadInput(
            f"{rpc} is chain {w3.eth.chain_id}, the deployment is on chain {record.chain_id}"
        )
    return w3, Settlement(w3, record.settlement), record


@click.command("chain", cls=Command)
@_opt("--port", default=8545, type=int, help="Port on 127.0.0.1.")
@_opt("--state", default=DEFAULT_STATE, type=click.Path(dir_okay=False, path_type=Path))
@_opt("--fund", "fund", multiple=True, help="Address to give 100 ether for gas (repeatable).")
def chain_command(port: int, state: Path, fund: tuple[str, ...]) -> None:
    """Run a local Anvil node until interrupted; its state file carries the chain across runs."""
    state.parent.mkdir(parents=True, exist_ok=True)
    # SIGTERM must unwind through `finally` so that anvil is stopped and writes its state file.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    node = chainmod.AnvilNode(port=port, state_file=state).start()
    try:
        w3 = chainmod.connect(node.url)
        for address in fund:
            chainmod.fund_from_dev_account(w3, address, 100 * 10**18)
        console.print(f"anvil on {node.url} (chain {w3.eth.chain_id}, state {state})")
        node.wait()
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()


@click.command("deploy", cls=Command)
@rpc_option
@deployment_option
@keystore_option
@_opt("--token", default=None, help="Existing ERC-20 to pay in.")
@_opt("--mint", default=None, type=int, help="Deploy a test RewardToken with this supply instead.")
@_opt("--delay", default=3600, type=int, help="Activation delay of roots, seconds.")
@_opt("--poster", default=None, help="Poster role (default: the signer).")
@_opt("--guardian", default=None, help="Guardian role (default: the signer).")
def deploy_command(
    rpc: str,
    deployment: Path,
    keystore: Path | None,
    token: str | None,
    mint: int | None,
    delay: int,
    poster: str | None,
    guardian: str | None,
) -> None:
    """Deploy the settlement contract and write the deployment record."""
    if (token is None) == (mint is None):
        raise click.UsageError("give exactly one of --token ADDRESS or --mint SUPPLY")
    if deployment.exists():
        raise BadInput(f"{deployment} exists; remove it to deploy a new contract")
    sender, w3 = _signer(keystore), chainmod.connect(rpc)
    if token is None:
        token = deploy_token(w3, sender, supply=int(mint or 0), holder=sender.address)
    settlement, tx = Settlement.deploy(
        w3, sender, token=token, activation_delay=delay, poster=poster, guardian=guardian
    )
    deployment.parent.mkdir(parents=True, exist_ok=True)
    tmp = deployment.with_name(deployment.name + ".tmp")
    tmp.write_text(settlement.deployment(tx.block_number).to_json() + "\n")
    os.replace(tmp, deployment)
    console.print(
        f"settlement {settlement.address} token {settlement.token_address} ({tx.gas_used} gas)"
    )


@click.command("fund", cls=Command)
@click.argument("amount", type=int)
@rpc_option
@deployment_option
@keystore_option
def fund_command(amount: int, rpc: str, deployment: Path, keystore: Path | None) -> None:
    """Transfer AMOUNT reward tokens from the signer to the contract."""
    _, settlement, _ = _open(rpc, deployment)
    tx = settlement.fund(_signer(keystore), amount)
    held = settlement.token_balance(settlement.address)
    console.print(f"funded {amount} in {tx.tx_hash}; contract holds {held}")


@click.command("post", cls=Command)
@click.argument("epoch", type=int)
@rpc_option
@deployment_option
@keystore_option
@db_option
def post_command(epoch: int, rpc: str, deployment: Path, keystore: Path | None, db: str) -> None:
    """Post EPOCH's payout root from the warehouse (idempotent) and record the post there."""
    from rewards import payouts, warehouse

    _, settlement, record = _open(rpc, deployment)
    payout = payouts.epoch_payout(db, epoch, recompute=False)
    result = settlement.post_root(
        _signer(keystore),
        epoch=epoch,
        root=payout.root,
        cumulative_total=payout.cumulative_total,
        inputs_hash=payout.inputs_hash,
    )
    if result.tx is None:
        console.print(
            f"epoch {epoch} root 0x{payout.root.hex()} already posted (index {result.index})"
        )
        return
    warehouse.record_settlement_post(
        db,
        epoch=epoch,
        root=payout.root,
        cumulative_total=payout.cumulative_total,
        inputs_hash=payout.inputs_hash,
        tx_hash=result.tx.tx_hash,
        block_number=result.tx.block_number,
        gas_used=result.tx.gas_used,
        contract=settlement.address,
        chain_id=record.chain_id,
    )
    active_at = settlement.root_at(result.index).activated_at
    console.print(
        f"posted epoch {epoch} root 0x{payout.root.hex()} in {result.tx.tx_hash} "
        f"({result.tx.gas_used} gas); claimable from timestamp {active_at}"
    )


@click.command("claim", cls=Command)
@click.argument("accounts", nargs=-1)
@_opt("--all", "claim_all", is_flag=True, help="Claim for every account with something owed.")
@_opt("--batch-size", default=50, type=click.IntRange(1, 500))
@rpc_option
@deployment_option
@keystore_option
@db_option
def claim_command(
    accounts: tuple[str, ...],
    claim_all: bool,
    batch_size: int,
    rpc: str,
    deployment: Path,
    keystore: Path | None,
    db: str,
) -> None:
    """Claim for ACCOUNTS (or --all) against the active root; tokens go to each account."""
    from rewards import warehouse

    if bool(accounts) == claim_all:
        raise click.UsageError("name ACCOUNTS or pass --all")
    _, settlement, record = _open(rpc, deployment)
    epoch, todo = _claims_owed(settlement, db, accounts)
    sender = _signer(keystore)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        tx = (
            settlement.claim(sender, chunk[0])
            if len(chunk) == 1
            else settlement.claim_batch(sender, chunk)
        )
        events = settlement.claim_events(tx.tx_hash)  # what was paid, not what we asked
        for event in events:
            warehouse.record_claim(
                db,
                account=event.account,
                cumulative_amount=event.cumulative_amount,
                paid=event.amount,
                epoch=epoch,
                tx_hash=tx.tx_hash,
                block_number=tx.block_number,
                gas_used=tx.gas_used,
                contract=settlement.address,
                chain_id=record.chain_id,
            )
            console.print(f"{event.account} +{event.amount} (cumulative {event.cumulative_amount})")
        console.print(f"tx {tx.tx_hash}: {len(chunk)} claim(s), {tx.gas_used} gas")
        if len(events) != len(chunk):
            # The transaction succeeded, so every claim in it paid; a Claimed log we could not
            # decode (an ABI that does not match the deployed contract) would go unrecorded.
            raise Failed(
                f"tx {tx.tx_hash} paid {len(chunk)} claim(s) but {len(events)} Claimed event(s) "
                f"were decoded; the warehouse recorded only those. Check that the deployment "
                f"record's contract matches this veritrain's ABI, then record the rest from the "
                f"transaction's logs"
            )
    if not todo:
        console.print("nothing to claim")


def _claims_owed(
    settlement: Settlement, db: str, accounts: tuple[str, ...]
) -> tuple[int, list[ClaimRequest]]:
    """The active root's epoch and a claim for each of ``accounts`` (all if empty) still owed
    something, with proofs from the warehouse's tree, which must be the active root's."""
    from rewards import payouts

    active = settlement.active_root()
    if active is None:
        raise BadInput("no active root yet (none posted, revoked, or still in its delay)")
    payout = payouts.epoch_payout(db, active.epoch, recompute=False)
    if payout.root != active.root:
        raise BadInput(
            f"warehouse root of epoch {active.epoch} is 0x{payout.root.hex()}, "
            f"the active root on chain is 0x{active.root.hex()}"
        )
    tree = payout.tree()
    owed = {a.lower(): amt for a, amt in payout.entries}
    wanted = [a.lower() for a in accounts] if accounts else list(owed)
    missing = [a for a in wanted if a not in owed]
    if missing:
        raise BadInput(f"not in epoch {active.epoch}'s tree: {', '.join(missing)}")
    todo = [
        ClaimRequest(account=a, cumulative_amount=owed[a], proof=tree.proof_for(a))
        for a in wanted
        if owed[a] > settlement.claimed(a)
    ]
    return active.epoch, todo


@click.command("verify-root", cls=Command)
@click.argument("epoch", type=int)
@rpc_option
@deployment_option
@db_option
def verify_root_command(epoch: int, rpc: str, deployment: Path, db: str) -> None:
    """Recompute EPOCH's payout from the warehouse inputs and compare with the posted root."""
    from rewards import payouts

    _, settlement, _ = _open(rpc, deployment)
    recomputed = payouts.epoch_payout(db, epoch, recompute=True)
    posted = settlement.root_for_epoch(epoch)
    if posted is None:
        raise BadInput(f"epoch {epoch} has no root on chain")
    rows = [
        ("root", "0x" + recomputed.root.hex(), "0x" + posted.root.hex()),
        ("cumulative total", str(recomputed.cumulative_total), str(posted.cumulative_total)),
        ("inputs hash", "0x" + recomputed.inputs_hash.hex(), "0x" + posted.inputs_hash.hex()),
    ]

    def shown(name: str, value: str) -> str:
        return tokens(int(value)) if name == "cumulative total" else value

    print_table(
        console,
        ("field", "recomputed", "on chain", "match"),
        [
            (name, shown(name, ours), shown(name, theirs), "yes" if ours == theirs else "NO")
            for name, ours, theirs in rows
        ],
        title=f"epoch {epoch} (root index {posted.index}, revoked: {posted.revoked});"
        " totals in tokens",
    )
    if any(ours != theirs for _, ours, theirs in rows):
        raise Failed(f"epoch {epoch}: the posted root does not match the inputs")


@click.command("chain-status", cls=Command)
@click.argument("accounts", nargs=-1)
@rpc_option
@deployment_option
def status_command(accounts: tuple[str, ...], rpc: str, deployment: Path) -> None:
    """Show the contract's roots, balance and pause state, and what ACCOUNTS have claimed."""
    _, s, _ = _open(rpc, deployment)
    active = s.active_root()
    console.print(
        f"settlement {s.address} token {s.token_address} paused={s.paused()} "
        f"balance={s.token_balance(s.address)} paid={s.total_claimed()} "
        f"active={'none' if active is None else active.index}"
    )
    print_table(
        console,
        ("index", "epoch", "root", "cumulative total (tokens)", "activates at", "revoked"),
        [
            (
                str(r.index),
                str(r.epoch),
                "0x" + r.root.hex(),
                tokens(r.cumulative_total),
                str(r.activated_at),
                str(r.revoked),
            )
            for r in s.roots()
        ],
        title="payout roots",
        right=(True, True, False, True, True, False),
    )
    for a in accounts:
        console.print(f"{a}: claimed {s.claimed(a)}, balance {s.token_balance(a)}")


@click.command("commit-run", cls=Command)
@click.argument("run_id")
@click.argument("root")
@rpc_option
@deployment_option
@keystore_option
def commit_run_command(
    run_id: str, root: str, rpc: str, deployment: Path, keystore: Path | None
) -> None:
    """Record RUN_ID's commitment ROOT (0x + 64 hex) in the on-chain registry."""
    body = root[2:] if root.startswith("0x") else root
    if len(body) != 64:
        raise click.UsageError("ROOT must be 32 bytes of hex")
    _, settlement, _ = _open(rpc, deployment)
    tx = settlement.record_commitment(_signer(keystore), run_id, bytes.fromhex(body))
    console.print(f"run {run_id} committed in block {tx.block_number} ({tx.tx_hash})")


@click.command("commitment", cls=Command)
@click.argument("run_id")
@_opt("--committer", default=None, help="The run's peer address (else: earliest record by anyone).")
@rpc_option
@deployment_option
def commitment_command(run_id: str, committer: str | None, rpc: str, deployment: Path) -> None:
    """Show the registry record of RUN_ID (its block anchors the auditors' beacon)."""
    _, s, _ = _open(rpc, deployment)
    rec = s.commitment(committer, run_id) if committer else s.find_commitment(run_id)
    if rec is None:
        raise BadInput(f"run {run_id!r} has no commitment")
    console.print(
        f"run {run_id}: root 0x{rec.root.hex()} by {rec.committer} in block {rec.block_number}"
    )


COMMANDS: list[click.Command] = [
    chain_command,
    deploy_command,
    fund_command,
    post_command,
    claim_command,
    verify_root_command,
    status_command,
    commit_run_command,
    commitment_command,
]

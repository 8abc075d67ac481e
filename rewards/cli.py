"""``python -m rewards``: the reward engine's command line (thin: parse, call the library, print).

Every command takes ``--db`` (default $VERITRAIN_DB, else ./veritrain.duckdb), which must exist:
only ``init`` creates a warehouse. Writing commands publish the analysts' snapshot as they finish;
``sql`` and ``export`` read it (docs/warehouse.md). Chain commands (deploy, post, claim, chain
node...) come from rewards.settlement_cli and ``report`` (the HTML audit report per epoch) from
rewards.report; both are added to this group.

Exit status (the convention of the three CLIs, trainer/cli_errors.py): 0 when the command did all
its work; 1 when it ran and found a failure (``verify-root``: the posted root does not match);
2 on bad input, usage or setup, nothing written (``error: ...``, one line on stderr; the traceback
too with -v); 3 when ``ingest`` or ``ingest-shared`` wrote its batch but rejected some
records (listed on stderr).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.logging import RichHandler

from rewards import analyst, payouts, policy, warehouse
from rewards.display import make_console, print_frame, print_table
from rewards.report import report_command
from trainer.cli_errors import EXIT_PARTIAL, BadInput, Group

if TYPE_CHECKING:
    from rewards.ingest import Rejection

F = TypeVar("F", bound=Callable[..., Any])
console = make_console()  # no markup: peers' strings are data; hashes stay on one line
err_console = make_console(stderr=True)
DEFAULT_TIMEOUT_S = 60.0


def _db_option(func: F) -> F:
    decorated: F = click.option(
        "--db",
        "db",
        envvar=warehouse.DB_ENV,
        default=warehouse.DEFAULT_DB,
        show_default=True,
        type=click.Path(dir_okay=False),
        help=f"Warehouse file (also ${warehouse.DB_ENV}).",
    )(func)
    return decorated


@click.group(cls=Group)
@click.option("-v", "--verbose", is_flag=True, help="Log progress to stderr; tracebacks of errors.")
def main(verbose: bool) -> None:
    """veritrain rewards: warehouse, payout policy, payout trees, analyst queries."""
    # RichHandler lays records out in columns that wrap; off a terminal, one plain line each.
    handler: logging.Handler = (
        RichHandler(console=err_console, show_path=False, markup=False)
        if err_console.is_terminal
        else logging.StreamHandler(sys.stderr)
    )
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(message)s", handlers=[handler]
    )


def _exit_on_rejections(rejections: Sequence[Rejection]) -> None:
    """Print the rejection table and exit 3 (partial) when an ingest rejected records."""
    if rejections:
        print_table(
            err_console,
            ("source", "kind", "reason"),
            [(r.source, r.kind, r.reason) for r in rejections],
            title=f"{len(rejections)} record(s) rejected",
        )
        click.get_current_context().exit(EXIT_PARTIAL)


@main.command()
@_db_option
def init(db: str) -> None:
    """Create a new, empty warehouse (the only command that creates one)."""
    from rewards import schema

    if Path(db).exists():
        raise BadInput(
            f"{db} exists already; `python -m rewards migrate` upgrades an existing warehouse"
        )
    with warehouse.opened(db, create=True) as con:
        version = schema.current_version(con)
    console.print(f"{db}: created, schema version {version}")


@main.command()
@_db_option
def migrate(db: str) -> None:
    """Bring an existing warehouse's schema up to date (and publish its analyst snapshot)."""
    from rewards import schema

    with warehouse.opened(db) as con:
        version = schema.current_version(con)
    console.print(f"{db}: schema version {version}")


@main.command("open-epoch")
@_db_option
@click.argument("epoch", type=int)
@click.option("--pool", required=True, type=int, help="Reward pool in base units (wei scale).")
def open_epoch(db: str, epoch: int, pool: int) -> None:
    """Open EPOCH with its reward pool (new runs and verdicts are ingested into the latest)."""
    with warehouse.opened(db) as con:
        policy.open_epoch(con, epoch, pool)
    console.print(f"epoch {epoch} open, pool {pool}")


@main.command()
@_db_option
@click.option("--epoch", required=True, type=int, help="The open epoch that pays for this work.")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the assignment file here.")
@click.option("--steps", type=int, default=200, show_default=True, help="Schedule length.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--n-layer", type=int, default=2, show_default=True)
@click.option("--n-head", type=int, default=4, show_default=True)
@click.option("--d-model", type=int, default=128, show_default=True)
@click.option("--context", type=int, default=64, show_default=True)
@click.option("--dropout", type=float, default=0.1, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True, help="Peak learning rate.")
@click.option("--warmup-steps", type=int, default=10, show_default=True)
@click.option("--weight-decay", type=float, default=0.1, show_default=True)
@click.option("--grad-clip", type=float, default=1.0, show_default=True, help="0 disables.")
@click.option("--checkpoint-min", type=int, default=1, show_default=True)
@click.option("--checkpoint-max", type=int, default=1000, show_default=True)
@click.option("--corpus", multiple=True, help="Corpus file/folder (repeatable; default stdlib).")
def assign(
    db: str,
    epoch: int,
    out: str | None,
    corpus: tuple[str, ...],
    checkpoint_min: int,
    checkpoint_max: int,
    **recipe: Any,
) -> None:
    """State the work EPOCH pays for: the reference GPT recipe, its data and schedule.

    Peers train it with `python -m trainer run --assignment FILE`; ingest refuses any run whose
    signed header differs from it. An epoch's assignment is never changed once stated.
    """
    from rewards.assignments import assign as record
    from trainer.assignment import assignment_text
    from trainer.data import Corpus
    from trainer.loop import TrainConfig, reference_assignment

    model_keys = ("n_layer", "n_head", "d_model", "context", "dropout")
    try:
        config = TrainConfig(
            run_id="assignment",
            steps=recipe["steps"],
            batch_size=recipe["batch_size"],
            model_config={k: recipe[k] for k in model_keys},
            lr=recipe["lr"],
            warmup_steps=recipe["warmup_steps"],
            weight_decay=recipe["weight_decay"],
            grad_clip=recipe["grad_clip"] or None,
        )
        data = Corpus.from_paths(corpus) if corpus else Corpus.stdlib()
    except ValueError as exc:  # a plain one from a config check; OSError reaches the Group
        raise BadInput(str(exc)) from exc
    assignment = reference_assignment(
        config, data.commitment(), checkpoint_every=(checkpoint_min, checkpoint_max)
    )
    target = None if out is None else Path(out)
    if target is not None and not target.parent.is_dir():
        raise BadInput(f"--out: folder {target.parent} does not exist")
    with warehouse.opened(db) as con:
        added = record(con, epoch, assignment)  # idempotent: a rerun rewrites a lost file
    if target is not None:
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(assignment_text(assignment))
        os.replace(tmp, target)  # peers never read half a file
    digest = "0x" + assignment.hash().hex()
    state = "recorded" if added else "already recorded"
    console.print(f"epoch {epoch} pays for assignment {digest} ({state})")
    if out is not None:
        console.print(f"assignment file {out}")


@main.command()
@_db_option
@click.option("--cheat-fraction", type=float, help="Fraction of steps a cheater fakes.")
@click.option("--confidence", type=float, help="Detection probability a run's audit must reach.")
@click.option("--slash-bps", type=int, help="Stake share slashed per failing epoch (1/10000).")
@click.option("--usefulness-ppm", type=int, help="Weight of usefulness in scores (millionths).")
def params(db: str, **given: Any) -> None:
    """Show the policy parameters, or set those given."""
    with warehouse.opened(db) as con:
        current = policy.stored_params(con)
        changes = {k: v for k, v in given.items() if v is not None}
        if changes:
            current = policy.PolicyParams(**{**current.to_sql_params(), **changes})
            policy.set_params(con, current)
    for key, value in current.to_sql_params().items():
        console.print(f"{key} = {value}")


@main.command("register-peer")
@_db_option
@click.argument("peer_id")
@click.option("--pubkey", required=True, help="BLS public key, 0x + 96 hex digits.")
@click.option("--role", type=click.Choice(["trainer", "auditor"]), default="trainer")
@click.option("--address", help="Payout address (required for trainers).")
def register_peer(db: str, peer_id: str, pubkey: str, role: str, address: str | None) -> None:
    """Register a trainer or auditor by its BLS public key."""
    with warehouse.opened(db) as con:
        added = warehouse.register_peer(
            con, peer_id=peer_id, pubkey=pubkey, role=role, payout_address=address
        )
    console.print(f"{peer_id}: {'registered' if added else 'already registered'}")


@main.command()
@_db_option
@click.argument("peer_id")
@click.option("--epoch", required=True, type=int)
@click.option("--amount", required=True, type=int, help="Stake deposited, base units.")
def stake(db: str, peer_id: str, epoch: int, amount: int) -> None:
    """Record PEER_ID's stake deposit in EPOCH."""
    with warehouse.opened(db) as con:
        warehouse.record_stake(con, peer_id=peer_id, epoch=epoch, amount=amount)
    console.print(f"{peer_id}: stake {amount} in epoch {epoch}")


@main.command("ingest")
@_db_option
@click.option("--store", "stores", multiple=True, help="Run store URL (a run or a folder of runs).")
@click.option("--verdicts", "verdicts", type=click.Path(file_okay=False), help="Verdict folder.")
@click.option("--epoch", type=int, help="Epoch to file new records under (default: latest).")
@click.option("--strict", is_flag=True, help="Abort the whole batch on any rejected record.")
def ingest_cmd(
    db: str, stores: tuple[str, ...], verdicts: str | None, epoch: int | None, strict: bool
) -> None:
    """Load run stores and verdict files, verifying signatures; one transaction per batch.

    Exit status 0 when every record read was loaded or was already there; 3 when the batch was
    written but some records were rejected (a table of them goes to stderr, and they are kept in
    the rejections table); 2 when nothing was written (bad input, or --strict with a rejection).
    """
    from rewards import ingest

    if not stores and verdicts is None:
        raise click.UsageError("give --store and/or --verdicts")
    with warehouse.opened(db) as con:
        report = ingest.ingest(
            con, stores=list(stores), verdicts_dir=verdicts, epoch=epoch, strict=strict
        )
    console.print(
        f"epoch {report.epoch}: {report.runs_loaded} runs, {report.verdicts_loaded} verdicts"
        f" loaded; {report.duplicates} duplicates; {len(report.rejections)} rejected"
    )
    _exit_on_rejections(report.rejections)


@main.command("ingest-shared")
@_db_option
@click.option("--shared", "store", help="Shared run store (folder or fsspec URL).")
@click.option(
    "--verdicts",
    "verdicts",
    multiple=True,
    type=click.Path(file_okay=False),
    help="Folder of contribution verdicts (`audit shared --out`); repeatable.",
)
@click.option("--epoch", type=int, help="Epoch to file new records under (default: latest).")
@click.option(
    "--round-pool",
    "round_pool",
    type=click.IntRange(min=0),
    help="Base units each closed round shares (required when the run is new).",
)
def ingest_shared_cmd(
    db: str,
    store: str | None,
    verdicts: tuple[str, ...],
    epoch: int | None,
    round_pool: int | None,
) -> None:
    """Load a shared run (genesis, round records, contributions, exclusions) and contribution
    verdicts, verifying every signature; one transaction per batch, idempotent.

    Exit status 0 when every record read was loaded or was already there; 3 when the batch was
    written but some records were rejected (listed on stderr, kept in the rejections table);
    2 when nothing was written (bad input).
    """
    from rewards import shared_ingest

    if store is None and not verdicts:
        raise click.UsageError("give --shared and/or --verdicts")
    with warehouse.opened(db) as con:
        report = shared_ingest.ingest_shared(
            con, store_url=store, verdict_dirs=verdicts, epoch=epoch, round_pool=round_pool
        )
    console.print(
        f"epoch {report.epoch}: {report.rounds_loaded} rounds, {report.contributions_loaded}"
        f" contributions, {report.verdicts_loaded} contribution verdicts loaded;"
        f" {report.duplicates} duplicates; {len(report.rejections)} rejected"
    )
    _exit_on_rejections(report.rejections)


@main.command()
@_db_option
def compute(db: str) -> None:
    """Run the payout policy over every epoch and print the epoch summaries."""
    with warehouse.opened(db) as con:
        used = policy.compute(con)
        frame = con.sql("SELECT * FROM epoch_summaries ORDER BY epoch").pl()
    print_frame(console, frame, title=f"payouts ({used})")


@main.command()
@_db_option
@click.argument("epoch", type=int)
@click.option("--out", type=click.Path(file_okay=False), help="Also write tree.json + proofs.json.")
def root(db: str, epoch: int, out: str | None) -> None:
    """Build EPOCH's payout tree from the computed payouts and record its root."""
    with warehouse.opened(db) as con:
        payout = payouts.record_root(con, epoch)
    console.print(f"epoch {epoch} root 0x{payout.root.hex()} total {payout.cumulative_total}")
    console.print(f"inputs hash 0x{payout.inputs_hash.hex()} ({len(payout.entries)} accounts)")
    if out:
        paths = payouts.write_tree(payout.tree(), out)
        console.print(f"wrote {paths[0]} and {paths[1]}")


@main.command()
@click.option("--csv", "csv_path", required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default: CSV name).")
def tree(csv_path: str, out: str | None) -> None:
    """Print the payout root of a CSV (account,amount) and write every account's proof.

    Writes OUT/tree.json (the @openzeppelin/merkle-tree standard-v1 dump, loadable by
    StandardMerkleTree.load) and OUT/proofs.json (account -> index, amount, proof).
    """
    from proofs.payout import PayoutTree

    built = PayoutTree.build(payouts.read_csv(csv_path))
    target = out if out is not None else str(Path(csv_path).with_suffix("")) + "-tree"
    paths = payouts.write_tree(built, target)
    click.echo("0x" + built.root.hex())
    err_console.print(f"{len(built)} accounts; wrote {paths[0]} and {paths[1]}")


@main.command()
@_db_option
@click.argument("query", required=False)
@click.option("--file", "file", type=click.Path(dir_okay=False, exists=True), help="SQL file.")
@click.option("--format", "fmt", type=click.Choice(analyst.FORMATS), default="table")
@click.option("--out", type=click.Path(dir_okay=False), help="Write here instead of stdout.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    help="Stop a statement that runs longer than this many seconds.",
)
def sql(
    db: str, query: str | None, file: str | None, fmt: str, out: str | None, timeout: float
) -> None:
    """Run QUERY (or --file) on the warehouse's read-only analyst snapshot.

    Writes, setting changes and file access are refused. The snapshot is what the last writing
    command (ingest, compute, ...) left; a running ingest never blocks it. The table format shows
    money in tokens (18 decimals); csv, json and parquet keep exact base units.
    """
    if (query is None) == (file is None):
        raise click.UsageError("give either QUERY or --file")
    try:
        text = query if query is not None else Path(file or "").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read SQL file {file}: {exc}") from exc
    if fmt == "parquet" and out is None:
        raise click.UsageError("--format parquet needs --out")
    if fmt == "table" and out is not None:
        raise click.UsageError("--format table prints; with --out use csv, json or parquet")
    try:
        with analyst.Analyst(db, timeout=timeout) as a:
            frame = a.sql(text)
    except analyst.QueryTimeout as exc:
        raise BadInput(f"{exc} (raise the limit with --timeout SECONDS)") from exc
    if out is not None:
        analyst.write_output(frame, fmt, out)  # type: ignore[arg-type]
        err_console.print(f"{frame.height} rows written to {out}")
    elif fmt == "csv":
        sys.stdout.write(analyst.to_csv(frame))
    elif fmt == "json":
        sys.stdout.write(analyst.to_json(frame) + "\n")
    else:
        print_frame(console, frame)


@main.command()
@_db_option
@click.option("--out", required=True, type=click.Path(file_okay=False))
def export(db: str, out: str) -> None:
    """Export every table and view as Parquet (one file per table) for other engines."""
    with analyst.Analyst(db) as a:
        paths = a.export_parquet(out)
    console.print(f"{len(paths)} tables exported to {out}")


def _add_settlement_commands() -> None:
    from rewards.settlement_cli import COMMANDS

    for command in COMMANDS:
        main.add_command(command)
    from rewards.round_commits import commit_rounds_command

    main.add_command(commit_rounds_command)


_add_settlement_commands()
main.add_command(report_command, name="report")

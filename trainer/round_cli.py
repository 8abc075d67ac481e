"""Round commands of ``python -m trainer``: aggregate (the aggregator), verify-round and rounds.

Thin: parse options, call trainer.aggregator, print. Exit codes follow trainer/cli_errors.py (0
done, 1 a round that does not verify, 2 bad input). Peer names, reasons and details come from
peers: the round table is plain text written with ``click.echo``, never rich markup.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import click
from rich.progress import BarColumn, TextColumn

from trainer.aggregator import aggregate_loop, close_round, verify_round
from trainer.cli_errors import BadInput, Command, Failed, one_line
from trainer.loop import configure_determinism
from trainer.roundrecord import SignedRoundRecord
from trainer.shared_cli import SHARED, corpus_of, load_key, open_shared, progress_bar
from trainer.sharedstore import SharedStore

CORPUS_PROBE = click.option(
    "--corpus",
    multiple=True,
    help="The genesis corpus, for the probe (repeatable; default: the genesis dataset's source).",
)


@click.command(cls=Command)
@SHARED
@click.option(
    "--key",
    "key_file",
    type=click.Path(path_type=Path),
    required=True,
    help="The aggregator's BLS key file (the genesis names its public key).",
)
@click.option("--rounds", type=int, default=None, help="Stop after closing this many rounds.")
@click.option("--once", is_flag=True, help="Close the open round once it is due, then exit.")
@click.option(
    "--poll", type=float, default=2.0, show_default=True, help="Seconds between looks at the store."
)
@CORPUS_PROBE
def aggregate(
    shared_url: str,
    key_file: Path,
    rounds: int | None,
    once: bool,
    poll: float,
    corpus: tuple[str, ...],
) -> None:
    """Close rounds of the shared run in STORE: screen, aggregate, sign the round record.

    A round closes at its deadline or as soon as max_contributions records are in. Prints a
    table per round (included and excluded contributions, reasons, norms, losses)."""
    keypair = load_key(key_file, "aggregator")
    store, g = open_shared(shared_url)
    if bytes(keypair.public) != bytes(g.aggregator):
        raise BadInput(f"{key_file} is not the aggregator key named by the genesis")
    configure_determinism(None)
    data = corpus_of(corpus) if corpus else None
    with progress_bar(TextColumn("screening {task.completed}/{task.total}"), BarColumn()) as bar:
        task = bar.add_task("screen", total=None)

        def on_progress(stage: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        def show(signed: SignedRoundRecord) -> None:
            bar.update(task, completed=0, total=None)
            _print_round(store, signed)

        if once:
            signed = close_round(
                store, keypair, wait=True, poll_s=poll, corpus=data, progress=on_progress
            )
            if signed is None:
                click.echo(f"all {g.rounds} rounds of {g.shared_run_id} are closed")
            else:
                show(signed)
            return
        closed = aggregate_loop(
            store, keypair, rounds=rounds, poll_s=poll, corpus=data, progress=on_progress,
            on_round=show,
        )  # fmt: skip
    click.echo(f"{closed} rounds closed")


def _print_round(store: SharedStore, signed: SignedRoundRecord) -> None:
    rec = signed.record
    head = (f"round {rec.round}: {len(rec.included)} included, {len(rec.excluded)} excluded; "
            f"{'carried over' if rec.carried_over else 'applied'}; "
            f"theta_{rec.round + 1} 0x{rec.new_root.hex()}")  # fmt: skip
    if rec.base_probe_loss is not None:
        head += f"; base probe loss {rec.base_probe_loss:.4f}"
    click.echo(head)
    rows = [("peer", "status", "norm", "probe", "losses", "detail")]
    for inc in rec.included:
        rows.append((inc.peer, "included", _num(inc.norm), _num(inc.probe_loss),
                     _losses(store, inc.peer, rec.round), ""))  # fmt: skip
    for exc in rec.excluded:
        detail = (
            exc.detail if exc.built_on is None else f"built on round {exc.built_on}; {exc.detail}"
        )
        rows.append((exc.peer or "?", exc.reason, _num(exc.norm), _num(exc.probe_loss), "",
                     f"{exc.file}: {detail}"))  # fmt: skip
    _table(rows)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _losses(store: SharedStore, peer: str, r: int) -> str:
    """First and last inner loss of ``peer``'s record for round ``r`` ("" if unreadable)."""
    try:
        c = store.read_contribution(peer, r).record
    except Exception:  # a display column: an unreadable record was screened, not shown here
        return ""
    return f"{c.losses[0]:.4f}..{c.losses[-1]:.4f}" if c.losses else ""


def _table(rows: Sequence[Sequence[str]]) -> None:
    cells = [[one_line(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for row in cells:
        click.echo("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@click.command("verify-round", cls=Command)
@SHARED
@click.option("--round", "round_", type=int, default=None, help="The round to check.")
@click.option("--all", "all_rounds", is_flag=True, help="Check every closed round.")
@CORPUS_PROBE
def verify_round_cmd(
    shared_url: str, round_: int | None, all_rounds: bool, corpus: tuple[str, ...]
) -> None:
    """Recompute theta_{r+1} bit for bit from theta_r and the listed contributions, re-run the
    screening and check the round record's chain and signature. Exit 1 on any problem."""
    if (round_ is None) == (not all_rounds):
        raise click.UsageError("give exactly one of --round R and --all")
    store, _ = open_shared(shared_url)
    data = corpus_of(corpus) if corpus else None
    closed = store.rounds()
    todo = closed if round_ is None else [round_]
    if not todo:
        raise BadInput(f"no round of {shared_url} is closed yet")
    if round_ is not None and round_ not in closed:
        span = f"rounds {closed[0]}..{closed[-1]} are" if closed else "no round is"
        raise BadInput(f"round {round_} of {shared_url} has no round record ({span} closed)")
    failures: list[str] = []
    for r in todo:
        problems = verify_round(store, r, corpus=data)
        if problems:
            failures.extend(f"round {r}: {p}" for p in problems)
            continue
        rec = store.read_round(r).record
        click.echo(f"OK round {r}: theta_{r + 1} 0x{rec.new_root.hex()} recomputed bit for bit, "
                   f"{len(rec.included)} included, {len(rec.excluded)} excluded")  # fmt: skip
    if failures:
        for line in failures[:-1]:
            click.echo(f"FAIL {one_line(line)}")
        raise Failed(failures[-1])


@click.command("rounds", cls=Command)
@SHARED
def rounds_cmd(shared_url: str) -> None:
    """The rounds of the shared run in STORE so far, one row each."""
    store, g = open_shared(shared_url)
    click.echo(f"shared run {g.shared_run_id} (genesis 0x{g.hash().hex()[:16]}...), "
               f"theta_0 0x{g.initial_root.hex()[:16]}...")  # fmt: skip
    rows = [("round", "included", "excluded", "result", "new root", "closed at")]
    for r in store.rounds():
        rec = store.read_round(r).record
        closed = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(rec.closed_at))
        rows.append((str(r), str(len(rec.included)), str(len(rec.excluded)),
                     "carried over" if rec.carried_over else "applied",
                     f"0x{rec.new_root.hex()[:16]}...", closed))  # fmt: skip
    _table(rows)
    if len(rows) == 1:
        click.echo("no round closed yet")


COMMANDS: tuple[click.Command, ...] = (aggregate, verify_round_cmd, rounds_cmd)

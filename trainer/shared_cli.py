"""Shared-run commands of ``python -m trainer``: genesis, join, aggregate, verify-round, rounds.

Thin: parse options, call trainer.peer / trainer.aggregator / trainer.sharedstore, print.
Exit codes follow trainer/cli_errors.py (0 done, 1 a round that does not verify, 2 bad input).
Peer names, reasons and details come from peers: they are printed as plain text with
``click.echo`` (tables included), never as rich markup. docs/shared-runs.md walks through both
sides.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from proofs.hashing import Hash32
from proofs.signatures import PUBKEY_SIZE, KeyPair, load_keypair
from trainer.aggregator import aggregate_loop, close_round, verify_round
from trainer.cli_errors import BadInput, Command, Failed, one_line
from trainer.data import Corpus
from trainer.globalstate import initial_model, theta_artifact
from trainer.hook import DEFAULT_CHUNK_SIZE
from trainer.loop import configure_determinism
from trainer.models import GPT_NAME
from trainer.peer import PeerProgress, RoundResult, check_corpus, check_peer, join
from trainer.roundrecord import SignedRoundRecord
from trainer.sharedrun import (
    SHARED_VERSION,
    Genesis,
    OuterRule,
    Screening,
    SignedGenesis,
)
from trainer.sharedstore import SharedStore

console = Console(stderr=True)

_SHARED = click.option(
    "--shared", "shared_url", required=True, help="Shared store: folder or fsspec URL."
)
_CORPUS_PROBE = click.option(
    "--corpus",
    multiple=True,
    help="The genesis corpus, for the probe (repeatable; default: the genesis dataset's source).",
)


def _load_key(path: Path, what: str) -> KeyPair:
    if not path.is_file():
        raise BadInput(f"{what} key file {path} not found (create one with `trainer keygen`)")
    return load_keypair(path)


def _pubkey(value: str, what: str) -> bytes:
    """A 0x-hex BLS public key, or the public key of a key file."""
    if value.startswith("0x"):
        try:
            key = bytes.fromhex(value[2:])
        except ValueError as exc:
            raise BadInput(f"{what}: {value[:20]!r} is not hex: {exc}") from exc
        if len(key) != PUBKEY_SIZE:
            raise BadInput(f"{what}: a public key is {PUBKEY_SIZE} bytes, got {len(key)}")
        return key
    return bytes(_load_key(Path(value), what).public)


def _roster(peers: Sequence[str]) -> dict[str, bytes]:
    roster: dict[str, bytes] = {}
    for item in peers:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise BadInput(f"--peer {item!r}: expected NAME=KEYFILE or NAME=0xPUBKEY")
        if name in roster:
            raise BadInput(f"--peer {name!r} is given twice")
        roster[name] = _pubkey(value, f"--peer {name}")
    if not roster:
        raise BadInput("a shared run needs at least one --peer NAME=KEY")
    return roster


def _open(url: str) -> tuple[SharedStore, Genesis]:
    """The store and its genesis, whose signature is checked against its coordinator key."""
    store = SharedStore(url)
    signed = store.read_genesis()
    genesis = signed.record
    if not signed.verify(genesis.coordinator):
        raise BadInput(f"{url}: genesis.json is not signed by its coordinator key")
    return store, genesis


def _corpus(paths: Sequence[str]) -> Corpus:
    return Corpus.from_paths(paths) if paths else Corpus.stdlib()


def _progress(*columns: TextColumn | BarColumn | TimeElapsedColumn) -> Progress:
    # Off when stderr is not a terminal: a log or a pipe gets the result lines, not bar frames.
    return Progress(*columns, console=console, disable=not console.is_terminal)


# ---- genesis ------------------------------------------------------------------------------------


@click.command(cls=Command)
@_SHARED
@click.option(
    "--key",
    "key_file",
    type=click.Path(path_type=Path),
    required=True,
    help="The coordinator's BLS key file (signs the genesis).",
)
@click.option("--run-id", required=True, help="Shared run id (1-56 of A-Z a-z 0-9 . _ -).")
@click.option(
    "--peer",
    "peers",
    multiple=True,
    help="Roster entry NAME=KEYFILE or NAME=0xPUBKEY (repeatable).",
)
@click.option("--aggregator-key", required=True, help="Aggregator: key file or 0x public key.")
@click.option("--rounds", type=int, default=0, show_default=True, help="0: until stopped.")
@click.option("--inner-steps", type=int, default=20, show_default=True, help="H per round.")
@click.option("--inner-lr", type=float, default=3e-3, show_default=True)
@click.option("--optimizer", default="AdamW", show_default=True, help="A torch.optim class.")
@click.option(
    "--hyperparameters",
    default='{"betas": [0.9, 0.95], "weight_decay": 0.1}',
    show_default=True,
    help="JSON object of the optimizer's arguments (no lr).",
)
@click.option("--grad-clip", type=float, default=1.0, show_default=True, help="0 disables.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--n-layer", type=int, default=2, show_default=True)
@click.option("--n-head", type=int, default=4, show_default=True)
@click.option("--d-model", type=int, default=128, show_default=True)
@click.option("--context", type=int, default=64, show_default=True)
@click.option("--dropout", type=float, default=0.1, show_default=True)
@click.option("--init-seed", type=int, default=0, show_default=True)
@click.option("--checkpoint-every", type=int, default=None, help="[default: --inner-steps]")
@click.option(
    "--chunk-size",
    type=int,
    default=DEFAULT_CHUNK_SIZE,
    show_default=True,
    help="Artifact leaf size (bytes).",
)
@click.option("--beta", type=float, default=0.95, show_default=True, help="Error-feedback decay.")
@click.option("--chunk", type=int, default=4096, show_default=True, help="Top-k chunk length.")
@click.option("--topk", type=int, default=64, show_default=True, help="Entries kept per chunk.")
@click.option(
    "--quantization", type=click.Choice(["int8", "float32"]), default="int8", show_default=True
)
@click.option("--alpha", type=float, default=1.0, show_default=True, help="Outer learning rate.")
@click.option(
    "--norm-factor",
    type=float,
    default=3.0,
    show_default=True,
    help="Exclude norms above this times the round's median.",
)
@click.option("--probe/--no-probe", default=True, show_default=True)
@click.option("--probe-batch", type=int, default=8, show_default=True)
@click.option(
    "--probe-margin",
    type=float,
    default=0.05,
    show_default=True,
    help="Relative loss increase on the probe batch that excludes a contribution.",
)
@click.option("--min-contributions", type=int, default=1, show_default=True)
@click.option("--max-contributions", type=int, default=None, help="[default: roster size]")
@click.option(
    "--deadline", type=float, default=600.0, show_default=True, help="Seconds a round stays open."
)
@click.option("--corpus", multiple=True, help="Corpus file/folder (repeatable; default stdlib).")
def genesis(
    shared_url: str, key_file: Path, run_id: str, peers: tuple[str, ...], aggregator_key: str,
    rounds: int, inner_steps: int, inner_lr: float, optimizer: str, hyperparameters: str,
    grad_clip: float, batch_size: int, n_layer: int, n_head: int, d_model: int, context: int,
    dropout: float, init_seed: int, checkpoint_every: int | None, chunk_size: int, beta: float,
    chunk: int, topk: int, quantization: str, alpha: float, norm_factor: float, probe: bool,
    probe_batch: int, probe_margin: float, min_contributions: int,
    max_contributions: int | None, deadline: float, corpus: tuple[str, ...],
) -> None:  # fmt: skip
    """Start a shared run: write the coordinator-signed genesis and theta_0 into STORE."""
    keypair = _load_key(key_file, "coordinator")
    roster = _roster(peers)
    try:
        hyper = json.loads(hyperparameters)
    except ValueError as exc:
        raise BadInput(f"--hyperparameters is not JSON: {exc}") from exc
    if not isinstance(hyper, dict):
        raise BadInput("--hyperparameters must be a JSON object")
    data = _corpus(corpus)
    try:
        record = Genesis(
            version=SHARED_VERSION,
            shared_run_id=run_id,
            model=GPT_NAME,
            model_config={"n_layer": n_layer, "n_head": n_head, "d_model": d_model,
                          "context": context, "dropout": dropout, "vocab_size": 256},
            init_seed=init_seed,
            initial_root=Hash32(bytes(32)),  # filled in by create_genesis from the built model
            optimizer=optimizer,
            hyperparameters=hyper,
            inner_lr=inner_lr,
            grad_clip=grad_clip or None,
            inner_steps=inner_steps,
            batch_size=batch_size,
            context=context,
            dataset=data.commitment(),
            checkpoint_every=checkpoint_every or inner_steps,
            chunk_size=chunk_size,
            outer=OuterRule(beta=beta, chunk=chunk, topk=topk, quantization=quantization,
                            alpha=alpha),
            screening=Screening(
                norm_factor=norm_factor, probe=probe, probe_batch=probe_batch,
                probe_margin=probe_margin, min_contributions=min_contributions,
                max_contributions=max_contributions or len(roster), deadline_s=deadline,
            ),
            rounds=rounds,
            coordinator=bytes(keypair.public),
            aggregator=_pubkey(aggregator_key, "--aggregator-key"),
            peers=roster,
        )  # fmt: skip
        signed = _write_genesis(SharedStore(shared_url), record, keypair)
    except (ValueError, TypeError) as exc:
        raise BadInput(str(exc)) from exc
    g = signed.record
    click.echo(f"shared run {g.shared_run_id}: genesis 0x{g.hash().hex()}")
    click.echo(f"theta_0 root 0x{g.initial_root.hex()}; {len(g.peers)} peers; "
               f"H={g.inner_steps}; rounds {g.rounds or 'until stopped'}")  # fmt: skip


def _write_genesis(store: SharedStore, record: Genesis, keypair: KeyPair) -> SignedGenesis:
    """Build theta_0 from the genesis model and init seed, store it, then the signed genesis
    naming its root (object first: a genesis never names a missing theta_0)."""
    theta0 = theta_artifact(initial_model(record), record.chunk_size)
    signed = SignedGenesis.sign(
        keypair, dataclasses.replace(record, initial_root=Hash32(theta0.root))
    )
    if store.has_genesis():  # refused before anything is written; the same genesis is a no-op
        held = store.read_genesis()
        if held.to_json() != signed.to_json():
            raise BadInput(
                f"{store.url} already holds the genesis of {held.record.shared_run_id} "
                f"(0x{held.record.hash().hex()}); a shared store holds one run"
            )
    store.put_object(theta0.root, theta0.parts)
    store.put_genesis(signed)  # write-once: a genesis written meanwhile is a StoreError
    return signed


# ---- join ---------------------------------------------------------------------------------------


class _Signals:
    """SIGTERM/SIGINT: abandon the round at the next inner step (it stays resumable)."""

    def __init__(self) -> None:
        self.stopped = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.stopped = True


@click.command("join", cls=Command)
@_SHARED
@click.option(
    "--key",
    "key_file",
    type=click.Path(path_type=Path),
    required=True,
    help="This peer's BLS key file (its key must be in the genesis roster).",
)
@click.option("--name", "peer_name", required=True, help="This peer's roster name.")
@click.option("--rounds", type=int, default=None, help="Leave after this many rounds.")
@click.option("--corpus", multiple=True, help="The genesis corpus (repeatable; default stdlib).")
@click.option(
    "--poll",
    type=float,
    default=2.0,
    show_default=True,
    help="Seconds between looks for the next round.",
)
@click.option(
    "--stop-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Leave at the next round boundary once this file exists.",
)
@click.option("--skip-late", is_flag=True, help="Do not publish a round that closed meanwhile.")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: cores - 1).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
def join_cmd(
    shared_url: str, key_file: Path, peer_name: str, rounds: int | None, corpus: tuple[str, ...],
    poll: float, stop_file: Path | None, skip_late: bool, threads: int | None, device: str,
) -> None:  # fmt: skip
    """Train rounds of the shared run in STORE as NAME until the run, --rounds or a stop ends.

    SIGTERM or Ctrl-C abandons the current round at its next inner step (a later join resumes it
    if the round is still open); --stop-file leaves after the current round."""
    keypair = _load_key(key_file, "peer")
    store, g = _open(shared_url)
    data = _corpus(corpus)
    check_peer(g, keypair, peer_name)  # before any output: a wrong key or corpus is one line
    check_corpus(data, g)
    flags = _Signals()
    signal.signal(signal.SIGTERM, flags)
    signal.signal(signal.SIGINT, flags)
    hello = f"peer {one_line(peer_name)} joins {g.shared_run_id} (genesis 0x{g.hash().hex()})"
    console.print(hello, soft_wrap=True, markup=False)
    columns = (
        TextColumn("round {task.fields[round]}"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
    )
    with _progress(*columns) as progress:
        task = progress.add_task("round", total=g.inner_steps, round="-", loss=math.nan)

        def on_event(event: PeerProgress) -> None:
            if event.phase == "training":
                progress.update(task, completed=event.step, round=event.round, loss=event.loss)
            elif event.phase == "waiting":
                progress.update(task, completed=0, round=f"{event.round} (waiting)")
            else:
                progress.update(task, completed=event.step, round=event.round)

        results = join(
            store, g, keypair, peer_name, corpus=data, rounds=rounds, poll_s=poll,
            leave=lambda: stop_file is not None and stop_file.exists(),
            abandon=lambda: flags.stopped, progress=on_event, skip_late=skip_late,
            device=device, threads=threads,
        )  # fmt: skip
        for result in results:
            progress.console.print(_result_line(result), markup=False, soft_wrap=True)
    if flags.stopped:
        click.echo(f"peer {one_line(peer_name)}: stopped by signal")
    count = len(results)
    click.echo(f"peer {one_line(peer_name)}: {count} round{'' if count == 1 else 's'}")


def _result_line(result: RoundResult) -> str:
    line = f"round {result.round}: {result.status.value}"
    signed = result.contribution
    if signed is not None:
        c = signed.record
        first, last = (c.losses[0], c.losses[-1]) if c.losses else (math.nan, math.nan)
        line += (f"; contribution 0x{c.hash().hex()[:16]}..., {c.nnz} entries, "
                 f"{c.payload_bytes} bytes; loss {first:.4f} -> {last:.4f}")  # fmt: skip
    if result.resumed_at:
        line += f" (resumed at inner step {result.resumed_at})"
    return line


# ---- aggregate, verify-round, rounds ------------------------------------------------------------


@click.command(cls=Command)
@_SHARED
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
@_CORPUS_PROBE
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
    keypair = _load_key(key_file, "aggregator")
    store, g = _open(shared_url)
    if bytes(keypair.public) != bytes(g.aggregator):
        raise BadInput(f"{key_file} is not the aggregator key named by the genesis")
    configure_determinism(None)
    data = _corpus(corpus) if corpus else None
    with _progress(TextColumn("screening {task.completed}/{task.total}"), BarColumn()) as bar:
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
@_SHARED
@click.option("--round", "round_", type=int, default=None, help="The round to check.")
@click.option("--all", "all_rounds", is_flag=True, help="Check every closed round.")
@_CORPUS_PROBE
def verify_round_cmd(
    shared_url: str, round_: int | None, all_rounds: bool, corpus: tuple[str, ...]
) -> None:
    """Recompute theta_{r+1} bit for bit from theta_r and the listed contributions, re-run the
    screening and check the round record's chain and signature. Exit 1 on any problem."""
    if (round_ is None) == (not all_rounds):
        raise click.UsageError("give exactly one of --round R and --all")
    store, _ = _open(shared_url)
    data = _corpus(corpus) if corpus else None
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
@_SHARED
def rounds_cmd(shared_url: str) -> None:
    """The rounds of the shared run in STORE so far, one row each."""
    store, g = _open(shared_url)
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


COMMANDS: tuple[click.Command, ...] = (genesis, join_cmd, aggregate, verify_round_cmd, rounds_cmd)

"""Shared-run commands of ``python -m trainer``: genesis (the coordinator) and join (a peer).

Thin: parse options, call trainer.peer / trainer.sharedstore, print. The aggregator's and
verifier's commands are in trainer/round_cli.py and share the helpers here.
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
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from proofs.hashing import Hash32
from proofs.signatures import PUBKEY_SIZE, KeyPair, load_keypair
from trainer.adversaries import parse_behaviour
from trainer.cli_errors import BadInput, Command, one_line
from trainer.data import Corpus
from trainer.globalstate import initial_model, theta_artifact
from trainer.hook import DEFAULT_CHUNK_SIZE
from trainer.models import GPT_NAME, VOCAB_SIZE
from trainer.peer import PeerProgress, RoundResult, check_corpus, check_peer, join
from trainer.sharedrun import (
    SHARED_VERSION,
    Genesis,
    OuterRule,
    Screening,
    SignedGenesis,
)
from trainer.sharedstore import SharedStore

console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

SHARED = click.option(
    "--shared", "shared_url", required=True, help="Shared store: folder or fsspec URL."
)


def load_key(path: Path, what: str) -> KeyPair:
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
    return bytes(load_key(Path(value), what).public)


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


def open_shared(url: str) -> tuple[SharedStore, Genesis]:
    """The store and its genesis, whose signature is checked against its coordinator key."""
    store = SharedStore(url)
    signed = store.read_genesis()
    genesis = signed.record
    if not signed.verify(genesis.coordinator):
        raise BadInput(f"{url}: genesis.json is not signed by its coordinator key")
    return store, genesis


def corpus_of(paths: Sequence[str]) -> Corpus:
    return Corpus.from_paths(paths) if paths else Corpus.stdlib()


def progress_bar(*columns: TextColumn | BarColumn | TimeElapsedColumn) -> Progress:
    # Off when stderr is not a terminal: a log or a pipe gets the result lines, not bar frames.
    return Progress(*columns, console=console, disable=not console.is_terminal)


# ---- genesis ------------------------------------------------------------------------------------


_GENESIS_OPTIONS: tuple[tuple[str, Any, Any, str], ...] = (
    # (flag, type, default, help): every genesis field, defaults for the reference GPT.
    ("--rounds", int, 0, "Rounds in the run; 0: until stopped."),
    ("--inner-steps", int, 20, "H inner steps per round."),
    ("--inner-lr", float, 3e-3, "Constant inner learning rate."),
    ("--optimizer", str, "AdamW", "The inner optimizer (a torch.optim class)."),
    ("--hyperparameters", str, '{"betas": [0.9, 0.95], "weight_decay": 0.1}',
     "JSON object of the optimizer's arguments (no lr)."),
    ("--grad-clip", float, 1.0, "Inner gradient clipping norm; 0 disables."),
    ("--batch-size", int, 8, ""),
    ("--n-layer", int, 2, "Reference GPT layers."),
    ("--n-head", int, 4, ""),
    ("--d-model", int, 128, ""),
    ("--context", int, 64, ""),
    ("--dropout", float, 0.1, ""),
    ("--init-seed", int, 0, "Seed of theta_0."),
    ("--checkpoint-every", int, None, "Inner state checkpoint interval [default: --inner-steps]."),
    ("--chunk-size", int, DEFAULT_CHUNK_SIZE, "Artifact leaf size (bytes)."),
    ("--beta", float, 0.95, "Error-feedback decay."),
    ("--chunk", int, 4096, "Top-k chunk length."),
    ("--topk", int, 64, "Entries kept per chunk."),
    ("--quantization", click.Choice(["int8", "float32"]), "int8", "Value quantization."),
    ("--alpha", float, 1.0, "Outer learning rate."),
    ("--norm-factor", float, 3.0, "Exclude norms above this times the round's median."),
    ("--probe-batch", int, 8, "Samples in the probe batch."),
    ("--probe-margin", float, 0.05, "Relative probe-loss increase that excludes a contribution."),
    ("--probe-gain", float, 0.25, "Exclude a probe gain below this share of the median (0: off)."),
    ("--min-contributions", int, 1, "Fewer included: theta carried over."),
    ("--max-contributions", int, None, "Close early once this many are in [default: roster size]."),
    ("--deadline", float, 600.0, "Seconds a round stays open."),
)  # fmt: skip


def _genesis_options(command: F) -> F:
    for flag, kind, default, text in reversed(_GENESIS_OPTIONS):
        command = click.option(
            flag, type=kind, default=default, show_default=default is not None, help=text
        )(command)
    return command


@click.command(cls=Command)
@SHARED
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
    "--peers",
    "peers",
    multiple=True,
    help="Roster entry NAME=KEYFILE or NAME=0xPUBKEY (repeatable).",
)
@click.option("--aggregator-key", required=True, help="Aggregator: key file or 0x public key.")
@_genesis_options
@click.option(
    "--probe/--no-probe",
    default=True,
    show_default=True,
    help="Screen each contribution on a probe batch.",
)
@click.option("--corpus", multiple=True, help="Corpus file/folder (repeatable; default stdlib).")
@click.option(
    "--heldout",
    multiple=True,
    help="Held-out corpus file/folder where auditors measure usefulness (repeatable; disjoint "
    "from --corpus; default: none, usefulness is measured on the training corpus).",
)
def genesis(
    shared_url: str, key_file: Path, run_id: str, peers: tuple[str, ...], aggregator_key: str,
    probe: bool, corpus: tuple[str, ...], heldout: tuple[str, ...], **opts: Any,
) -> None:  # fmt: skip
    """Start a shared run: write the coordinator-signed genesis and theta_0 into STORE."""
    keypair = load_key(key_file, "coordinator")
    roster = _roster(peers)
    try:
        hyper = json.loads(opts["hyperparameters"])
    except ValueError as exc:
        raise BadInput(f"--hyperparameters is not JSON: {exc}") from exc
    if not isinstance(hyper, dict):
        raise BadInput("--hyperparameters must be a JSON object")
    data = corpus_of(corpus)
    held = corpus_of(heldout).commitment() if heldout else None
    o = opts
    try:
        record = Genesis(
            version=SHARED_VERSION, shared_run_id=run_id, model=GPT_NAME,
            model_config={k: o[k] for k in ("n_layer", "n_head", "d_model", "context", "dropout")}
            | {"vocab_size": VOCAB_SIZE},
            init_seed=o["init_seed"], initial_root=Hash32(bytes(32)),  # set by _write_genesis
            optimizer=o["optimizer"], hyperparameters=hyper, inner_lr=o["inner_lr"],
            grad_clip=o["grad_clip"] or None, inner_steps=o["inner_steps"],
            batch_size=o["batch_size"], context=o["context"], dataset=data.commitment(),
            heldout=held, checkpoint_every=o["checkpoint_every"] or o["inner_steps"],
            chunk_size=o["chunk_size"],
            outer=OuterRule(beta=o["beta"], chunk=o["chunk"], topk=o["topk"],
                            quantization=o["quantization"], alpha=o["alpha"]),
            screening=Screening(
                norm_factor=o["norm_factor"], probe=probe, probe_batch=o["probe_batch"],
                probe_margin=o["probe_margin"], probe_gain=o["probe_gain"],
                min_contributions=o["min_contributions"],
                max_contributions=o["max_contributions"] or len(roster),
                deadline_s=o["deadline"],
            ),
            rounds=o["rounds"], coordinator=bytes(keypair.public),
            aggregator=_pubkey(aggregator_key, "--aggregator-key"), peers=roster,
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
    """The first SIGTERM/SIGINT abandons the round at the next inner step (it stays resumable);
    a second one acts as usual (SIGINT raises KeyboardInterrupt, SIGTERM ends the process)."""

    def __init__(self) -> None:
        self.stopped = False
        signal.signal(signal.SIGTERM, self)
        signal.signal(signal.SIGINT, self)

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.stopped = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)


@click.command("join", cls=Command)
@SHARED
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
@click.option(
    "--behaviour",
    default="honest",
    hidden=True,  # a testing aid for the demo's dishonest peers (trainer/adversaries.py)
    help="honest, fabricate, stale or copy:NAME.",
)
def join_cmd(
    shared_url: str, key_file: Path, peer_name: str, rounds: int | None, corpus: tuple[str, ...],
    poll: float, stop_file: Path | None, skip_late: bool, threads: int | None, device: str,
    behaviour: str,
) -> None:  # fmt: skip
    """Train rounds of the shared run in STORE as NAME until the run, --rounds or a stop ends.

    SIGTERM or Ctrl-C abandons the current round at its next inner step (a later join resumes it
    if the round is still open); --stop-file leaves after the current round."""
    keypair = load_key(key_file, "peer")
    store, g = open_shared(shared_url)
    data = corpus_of(corpus)
    check_peer(g, keypair, peer_name)  # before any output: a wrong key or corpus is one line
    check_corpus(data, g)
    acting = parse_behaviour(behaviour, store, frozenset(g.peers))
    flags = _Signals()
    hello = f"peer {one_line(peer_name)} joins {g.shared_run_id} (genesis 0x{g.hash().hex()})"
    console.print(hello, soft_wrap=True, markup=False)
    columns = (
        TextColumn("round {task.fields[round]}"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
    )
    with progress_bar(*columns) as progress:
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
            device=device, threads=threads, behaviour=acting,
            on_round=lambda result: click.echo(_result_line(result)),  # stdout, as it happens
        )  # fmt: skip
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


COMMANDS: tuple[click.Command, ...] = (genesis, join_cmd)

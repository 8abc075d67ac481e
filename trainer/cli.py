"""``python -m trainer`` / ``veritrain-train``: run the reference trainer, verify a run store, and
take part in shared runs (genesis, join: trainer/shared_cli.py; aggregate, verify-round, rounds:
trainer/round_cli.py).

Thin: parse options, call trainer.loop / trainer.verify, print. Secrets are never printed; a new
key file is created with 0600 permissions by proofs.signatures.save_keypair, which never replaces
an existing one (``keygen --force`` does). Exit codes (trainer/cli_errors.py): 0 done, 1 a store
that does not verify (``FAIL ...`` on stdout), 2 bad input (``error: ...``, one line on stderr; the
traceback too with -v). Run ids, paths and reasons come from peers: they are printed
as text, never as rich markup, and keys and hashes are never wrapped across lines.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import fsspec
from fsspec.implementations.local import LocalFileSystem
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from proofs.errors import KeyFileExistsError
from proofs.signatures import KeyPair, generate_keypair, load_keypair, save_keypair
from trainer.assignment import read_assignment
from trainer.cli_errors import BadInput, Failed, Group
from trainer.loop import TrainConfig, train
from trainer.pipeline import Stats
from trainer.verify import check_store

console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def _keypair(path: Path, create: bool) -> KeyPair:
    if path.exists():
        return load_keypair(path)
    if not create:
        raise BadInput(f"key file {path} not found (pass --new-key to create it)")
    keypair = generate_keypair()
    save_keypair(path, keypair)
    console.print(f"created key file {escape(str(path))} (mode 0600)", soft_wrap=True)
    return keypair


def _store_fs(url: str) -> tuple[Any, str]:
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as exc:  # an unknown protocol, a missing fsspec backend
        raise BadInput(f"run store {url}: {exc}") from exc
    return fs, str(path)


def _check_store_url(url: str) -> None:
    """Refuse a local store path that is (or lies under) a file before anything is created."""
    fs, path = _store_fs(url)
    if not isinstance(fs, LocalFileSystem):
        return
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):  # the store and its missing parents are created later
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = (
            "is a file" if existing == os.path.abspath(path) else f"lies under the file {existing}"
        )
        raise BadInput(f"run store {url} {what}; a run store is a folder")


def _progress(*columns: TextColumn | BarColumn | TimeElapsedColumn) -> Progress:
    # Off when stderr is not a terminal: a log or a pipe gets the result lines, not bar frames.
    return Progress(*columns, console=console, disable=not console.is_terminal)


@click.group(cls=Group)
@click.option("-v", "--verbose", is_flag=True, help="Log progress details; tracebacks of errors.")
def main(verbose: bool) -> None:
    """veritrain trainer: committed, signed, resumable training runs."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )


_RECIPE_DEFAULTS = {
    "batch_size": 8,
    "n_layer": 2,
    "n_head": 4,
    "d_model": 128,
    "context": 64,
    "dropout": 0.1,
    "lr": 3e-3,
    "grad_clip": 1.0,
}


def _recipe_option(name: str, kind: type, help_text: str = "") -> Callable[[F], F]:
    default = _RECIPE_DEFAULTS[name.lstrip("-").replace("-", "_")]
    return click.option(
        name, type=kind, default=None, help=f"{help_text} [default: {default}; no --assignment]"
    )


@main.command()
@click.option("--store", "store_url", required=True, help="Run store: folder or fsspec URL.")
@click.option("--key-file", type=click.Path(path_type=Path), required=True, help="BLS key file.")
@click.option("--new-key", is_flag=True, help="Create the key file if it does not exist.")
@click.option("--run-id", default=None, help="Run name (default: the store's folder name).")
@click.option(
    "--assignment",
    "assignment_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The epoch's assignment (JSON from `rewards assign`): it fixes the whole recipe. "
    "Without it the run is unassigned work, which no epoch pays.",
)
@click.option("--steps", type=int, default=None, help="[default: the assignment's, else 200]")
@_recipe_option("--batch-size", int)
@_recipe_option("--n-layer", int)
@_recipe_option("--n-head", int)
@_recipe_option("--d-model", int)
@_recipe_option("--context", int)
@_recipe_option("--dropout", float)
@_recipe_option("--lr", float)
@_recipe_option("--grad-clip", float, "0 disables.")
@click.option("--checkpoint-every", type=int, default=None, help="[default: 100]")
@click.option("--corpus", multiple=True, help="Corpus file/folder (repeatable; default stdlib).")
@click.option(
    "--threads", type=int, default=None, help="torch CPU threads (default: cores - 1; recorded)."
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
def run(
    store_url: str,
    key_file: Path,
    new_key: bool,
    run_id: str | None,
    assignment_file: Path | None,
    steps: int | None,
    checkpoint_every: int | None,
    corpus: tuple[str, ...],
    threads: int | None,
    device: str,
    **recipe: Any,
) -> None:
    """Train the reference GPT into STORE, resuming if it already holds this run."""
    _check_store_url(store_url)
    try:
        keypair = _keypair(key_file, new_key)
        name = run_id or os.path.basename(store_url.rstrip("/")) or "run"
        given = sorted(k for k, v in recipe.items() if v is not None)
        if assignment_file is not None:
            if given:
                flags = ", ".join("--" + k.replace("_", "-") for k in given)
                raise click.UsageError(f"{flags}: the assignment fixes the recipe")
            config = TrainConfig.from_assignment(
                read_assignment(assignment_file),
                run_id=name,
                steps=steps,
                checkpoint_every=checkpoint_every,
                corpus=corpus,
                threads=threads,
                device=device,
            )
        else:
            r: dict[str, Any] = {
                k: _RECIPE_DEFAULTS[k] if v is None else v for k, v in recipe.items()
            }
            config = TrainConfig(
                run_id=name,
                steps=200 if steps is None else steps,
                batch_size=r["batch_size"],
                model_config={
                    k: r[k] for k in ("n_layer", "n_head", "d_model", "context", "dropout")
                },
                lr=r["lr"],
                grad_clip=r["grad_clip"] or None,
                checkpoint_every=checkpoint_every or 100,
                corpus=corpus,
                threads=threads,
                device=device,
            )
    except ValueError as exc:  # a plain one from a config check; ours and OSError reach the Group
        raise BadInput(str(exc)) from exc
    steps = config.steps
    console.print(
        f"run {escape(config.run_id)} -> {escape(store_url)}; "
        f"public key 0x{bytes(keypair.public).hex()}",
        soft_wrap=True,
    )
    columns = (
        TextColumn("step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[rate]:.1f} steps/s"),
        TextColumn("{task.fields[mb]:.1f} MB committed"),
        TimeElapsedColumn(),
    )
    with _progress(*columns) as progress:
        task = progress.add_task("train", total=steps, loss=float("nan"), rate=0.0, mb=0.0)

        first: list[tuple[int, float]] = []  # (step, time) of the first step of this process

        def on_step(step: int, stats: Stats) -> None:
            now = time.monotonic()
            if not first:
                first.append((step, now))
            done, since = step - first[0][0], now - first[0][1]
            progress.update(
                task,
                completed=step + 1,
                loss=stats.last_loss,  # from the committer: may trail the step by a few
                rate=done / since if since > 0 else 0.0,
                mb=stats.bytes_written / 1e6,
            )

        try:
            result = train(config, store_url, keypair, on_step=on_step)
        except ValueError as exc:
            raise BadInput(str(exc)) from exc
        progress.update(task, loss=result.last_loss, mb=result.bytes_written / 1e6)
    console.print(
        f"steps {result.start_step}..{result.end_step} committed; last loss "
        f"{result.last_loss:.4f}; {result.bytes_written / 1e6:.1f} MB written"
    )


@main.command("verify-store")
@click.argument("store_url")
@click.option("--pubkey", default=None, help="0x-hex BLS public key the run must be signed by.")
@click.option("--no-chain", is_flag=True, help="Skip replaying gradients through the optimizer.")
def verify_store_cmd(store_url: str, pubkey: str | None, no_chain: bool) -> None:
    """Re-check every signature, hash link, root and the gradient-to-state chain of a run.

    Exit 1 (``FAIL ...``) when a folder's records do not verify; exit 2 when STORE_URL names no
    folder at all (a typo, not a verdict on a run)."""
    fs, path = _store_fs(store_url)
    if isinstance(fs, LocalFileSystem) and not os.path.isdir(path):
        raise BadInput(f"no run store at {store_url}")
    expected = None
    if pubkey is not None:
        try:
            expected = bytes.fromhex(pubkey.removeprefix("0x"))
        except ValueError as exc:
            raise BadInput(f"--pubkey is not hex: {exc}") from exc
    with _progress(TextColumn("window {task.completed}/{task.total}"), BarColumn()) as progress:
        task = progress.add_task("verify", total=None)

        def on_window(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        report = check_store(store_url, pubkey=expected, chain=not no_chain, progress=on_window)
    # click.echo writes plain text: the store's reasons and run id are never read as markup.
    if report.broken is not None:
        raise Failed(report.broken.describe())
    click.echo(f"OK run {report.run_id}: {report.windows} windows, {report.steps} steps verified")
    if report.final_hash is not None:
        # The value a peer records on chain (`python -m rewards commit-run RUN_ID ROOT`).
        click.echo(f"commitment root (final manifest hash) 0x{report.final_hash.hex()}")


@main.command()
@click.argument("key_file", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace an existing key file (its identity is lost).")
def keygen(key_file: Path, force: bool) -> None:
    """Create a new BLS key file (0600) and print its public key.

    Refuses to replace an existing KEY_FILE unless --force is given.
    """
    try:
        keypair = generate_keypair()
        save_keypair(key_file, keypair, overwrite=force)
    except KeyFileExistsError as exc:
        raise BadInput(f"{exc} (pass --force to replace it and lose that key)") from exc
    click.echo(f"0x{bytes(keypair.public).hex()}")


# Shared runs (issue #15): genesis and join (trainer/shared_cli.py), aggregate, verify-round and
# rounds (trainer/round_cli.py). Imported last; neither imports this module, so there is no cycle.
from trainer.round_cli import COMMANDS as _ROUND_COMMANDS  # noqa: E402
from trainer.shared_cli import COMMANDS as _SHARED_COMMANDS  # noqa: E402

for _command in (*_SHARED_COMMANDS, *_ROUND_COMMANDS):
    main.add_command(_command)

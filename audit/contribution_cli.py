"""``python -m audit shared``: audit the contributions of a shared run's closed rounds.

Thin layer over :func:`audit.shared_batch.audit_shared`: parse, call, print (progress on stderr,
one line per contribution, a table at the end). Exit codes follow trainer/cli_errors.py: 0 every
judged contribution passes, 1 one fails, is invalid or could not be judged, 2 bad input.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from audit.beacon import parse_beacon_hex
from audit.cli_output import Count, Part, err, line, print_table, say
from audit.contribution import DEFAULT_STEPS, MODES
from audit.onchain import Deployment
from audit.registry import RegistryBeaconFor
from audit.shared_batch import Judgement, SharedJob, audit_shared
from audit.verdict import Outcome
from proofs.signatures import load_keypair
from trainer.cli_errors import EXIT_FAILED, EXIT_OK, BadInput, Command


def _beacon(
    beacon: str | None, rpc: str | None, deployment: Path | None
) -> bytes | RegistryBeaconFor:
    if beacon is not None:
        if rpc is not None:
            raise BadInput("give --beacon HEX or --rpc URL --deployment FILE, not both")
        return parse_beacon_hex(beacon)
    if rpc is None:
        raise BadInput("give --beacon HEX, or --rpc URL with --deployment FILE")
    if deployment is None or not deployment.is_file():
        raise BadInput(
            "--rpc needs --deployment FILE (as `python -m rewards deploy` writes it), "
            f"got {deployment}"
        )
    return RegistryBeaconFor.from_deployment(rpc, Deployment.from_json(deployment.read_text()))


@click.command(name="shared", cls=Command)
@click.option("--shared", "store_url", required=True, help="shared run store (folder or URL)")
@click.option("--key", "key_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--round",
    "rounds",
    type=int,
    multiple=True,
    help="round to audit (repeatable; default: every closed round)",
)
@click.option("--beacon", help="beacon value (0x-hex, >= 16 bytes), the same for every round")
@click.option("--rpc", help="JSON-RPC URL: each round's beacon follows its record's commitment")
@click.option(
    "--deployment",
    type=click.Path(dir_okay=False, path_type=Path),
    help="settlement deployment record (with --rpc)",
)
@click.option("--contributions", type=int, help="contributions judged per round (default: all)")
@click.option(
    "--steps",
    type=int,
    default=DEFAULT_STEPS,
    show_default=True,
    help="inner steps re-executed per contribution",
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="auto",
    show_default=True,
    help="auto: exact where the recorded settings reproduce here",
)
@click.option(
    "--corpus", multiple=True, help="the genesis dataset's files/folders (default: stdlib)"
)
@click.option("--heldout", multiple=True, help="the genesis held-out corpus's files/folders")
@click.option(
    "--workers", type=int, default=1, show_default=True, help="processes, one contribution each"
)
@click.option("--device", help="cpu or cuda (default: cuda when present)")
def shared_cmd(
    store_url: str, key_path: str, out: Path, rounds: tuple[int, ...], beacon: str | None,
    rpc: str | None, deployment: Path | None, contributions: int | None, steps: int, mode: str,
    corpus: tuple[str, ...], heldout: tuple[str, ...], workers: int, device: str | None,
) -> None:  # fmt: skip
    """Audit shared-run contributions: OUT/rNNNNNN/<peer>.json, one signed verdict each.

    Resumable: verdicts already in OUT are kept, never redone. One job at a time per OUT."""
    try:
        job = SharedJob(
            store_url=store_url, out=out, keypair=load_keypair(key_path),
            rounds=rounds or None, beacon=_beacon(beacon, rpc, deployment),
            contributions=contributions, steps=steps, mode=mode, corpus_paths=corpus,
            heldout_paths=heldout, workers=workers, device=device,
        )  # fmt: skip
    except ValueError as exc:  # a plain one (hex); ours and OSError reach the Command
        raise BadInput(str(exc)) from exc
    columns = (TextColumn("{task.description}"), BarColumn(), Count(), TimeElapsedColumn())
    with Progress(*columns, console=err, auto_refresh=False) as progress:
        task = progress.add_task("contributions judged", total=None)

        def planned(total: int) -> None:
            progress.update(task, total=total, refresh=True)

        def judged(j: Judgement) -> None:
            progress.console.log(line(f"round {j.round} {j.peer}: ", *_status(j)))
            if j.peer != "*":
                progress.update(task, advance=1, refresh=True)

        results = audit_shared(job, on_plan=planned, on_result=judged)
    print_table(_table(results))
    judged_n = sum(1 for r in results if r.error is None)
    say(f"{judged_n} contributions judged ({sum(r.skipped for r in results)} resumed), "
        f"{sum(not r.ok for r in results)} not passing")  # fmt: skip
    sys.exit(EXIT_OK if all(r.ok for r in results) else EXIT_FAILED)


def _word(j: Judgement) -> tuple[str, str]:
    if j.error is not None or j.outcome is None:
        return ("error", "yellow")
    return (j.outcome.value, "green" if j.outcome is Outcome.PASS else "red")


def _status(j: Judgement) -> tuple[Part, ...]:
    detail = j.error if j.error is not None else j.reason
    resumed = " (resumed)" if j.skipped else ""
    return (_word(j), resumed, f" {detail}" if detail else "")


def _table(results: list[Judgement]) -> Table:
    table = Table(
        title="shared-run contributions",
        caption="usefulness: held-out loss before minus after applying the contribution alone",
    )
    for col in ("round", "peer", "outcome", "reason", "usefulness"):
        table.add_column(col, overflow="fold")
    for j in sorted(results, key=lambda x: (x.round, x.peer)):
        known = j.usefulness is not None and math.isfinite(j.usefulness)
        useful = f"{j.usefulness:+.6f}" if known else "-"
        reason = j.error if j.error is not None else j.reason
        table.add_row(str(j.round), Text(j.peer), line(_word(j)), Text(reason[:200]), useful)
    return table

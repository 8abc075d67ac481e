"""What the audit CLI prints: peer-supplied strings as plain text, whole lines in pipes.

Run ids, store paths and reasons come from peers. They are printed as ``rich.text.Text`` (literal
text with a style), never as console markup: ``[/x]`` in a run id would raise ``MarkupError`` and
stop a batch, ``[conceal]`` would hide what follows, ``:name:`` would become an emoji. When stdout
is not a terminal, lines are not wrapped and tables take their natural width, so hashes and keys
stay whole for copy and paste and for scripts. Errors and exit codes follow the one convention
of the three CLIs, in trainer/cli_errors.py.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from audit.jobs import JobSpec, RunOutcome, run_job
from audit.verdict import Outcome

console = Console()
err = Console(stderr=True)
Part = str | tuple[str, str]  # literal text, or (literal text, style): never markup


def line(*parts: Part) -> Text:
    return Text.assemble(*parts)


def say(*parts: Part) -> None:
    console.print(line(*parts))


def print_table(table: Table) -> None:
    """Tables at their natural width when stdout is not a terminal (no hash split in a pipe)."""
    if console.is_terminal:
        console.print(table)
        return
    natural = console.measure(table, options=console.options.update_width(1 << 20)).maximum
    wide = Console(
        file=console.file,
        width=max(console.width, natural),  # print(width=) cannot exceed the console's width
        color_system=console.color_system,  # type: ignore[arg-type]  # the same names
        no_color=console.no_color,
    )
    wide.print(table)


class Count(ProgressColumn):
    """done/total, or the count alone while no total is known yet (never "16/?")."""

    def render(self, task: Task) -> Text:
        done = int(task.completed)
        text = str(done) if task.total is None else f"{done}/{int(task.total)}"
        return Text(text, style="progress.download")


def run_with_progress(job: JobSpec) -> list[RunOutcome]:
    columns = (TextColumn("{task.description}"), BarColumn(), Count(), TimeElapsedColumn())
    # Refreshed by hand, not by rich's thread: workers are forked, and a thread holding the
    # console's lock at that moment would leave it locked in the worker forever.
    with Progress(*columns, console=err, auto_refresh=False) as progress:
        runs = progress.add_task("runs audited", total=len(job.urls))
        steps = progress.add_task("steps judged", total=None)

        def planned(run_id: str, count: int) -> None:
            known = progress.tasks[steps].total or 0
            progress.update(steps, total=known + count, refresh=True)

        def judged(run_id: str, step: int, outcome: Outcome) -> None:
            progress.update(steps, advance=1, refresh=True)

        def done(outcome: RunOutcome) -> None:
            progress.console.log(line(f"{run_name(outcome)}: ", *_status(outcome)))
            progress.update(runs, advance=1, refresh=True)

        return run_job(job, on_run=done, on_verdict=judged, on_plan=planned)


def run_name(r: RunOutcome) -> str:
    return r.run_id if r.run_id != "?" else r.url


def _word(r: RunOutcome) -> tuple[str, str]:
    if r.error is not None:
        return ("error", "yellow")
    return ("pass", "green") if r.ok else ("FAIL", "red")


def _status(r: RunOutcome) -> tuple[Part, ...]:
    if r.error is not None:
        return (_word(r), f" {r.error}")
    counts = f"{r.passed} pass, {r.failed} fail, {r.invalid} invalid, {r.skipped} resumed"
    return (_word(r), f" ({counts})")


def summary(results: list[RunOutcome], cheat_fraction: float) -> Table:
    caption = (
        f"detection: exact probability that the sample hits a cheated step "
        f"if {cheat_fraction:.1%} of a run's steps are cheated"
    )
    table = Table(title="audit summary", caption=caption)
    table.add_column("run", overflow="fold")  # never cut: an id must be read whole
    for col in ("steps", "pass", "fail", "invalid", "resumed", "detection", "status"):
        table.add_column(col)
    for r in results:
        table.add_row(
            Text(run_name(r)),
            str(len(r.steps)),
            str(r.passed),
            str(r.failed),
            str(r.invalid),
            str(r.skipped),
            "-" if r.detection is None else f"{r.detection:.4f}",
            line(_word(r)),
        )
    return table

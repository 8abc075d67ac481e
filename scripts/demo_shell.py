"""The demo's shell: runs the public commands as subprocesses, logs them, shows progress.

Every command the demo runs is appended to ``demo-out/commands.sh`` as a user would type it (keys
appear only as ``VERITRAIN_ETH_KEY=$(cat FILE)``, never their value), and its output goes to
``demo-out/logs/NN-name.log``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# Wide enough for the summary table even when the output is piped (rich assumes 80 columns).
console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


class DemoError(RuntimeError):
    """A command the demo depends on failed; the message carries its log's tail."""


@dataclass
class Job:
    """One running command and what it writes its output to."""

    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes]
    ok_codes: tuple[int, ...]

    def result(self) -> int:
        code = self.proc.wait()
        if code not in self.ok_codes:
            tail = self.log.read_text(errors="replace")[-2500:]
            raise DemoError(f"`{self.name}` exited {code}; log {self.log}:\n{tail}")
        return code

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Shell:
    """Runs ``python -m ...`` commands in the repository root with the demo's environment."""

    out: Path
    env: dict[str, str] = field(default_factory=dict)
    _count: int = 0

    def __post_init__(self) -> None:
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.script = self.out / "commands.sh"
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env.items())
        self.script.write_text(
            "#!/bin/sh\n# Every command `make demo` ran, in order (python = .venv/bin/python).\n"
            + exports
        )

    def note(self, text: str) -> None:
        """Record a step that is not a command (as a comment in commands.sh)."""
        with self.script.open("a") as f:
            f.write(f"# {text}\n")

    def start(
        self,
        name: str,
        args: Sequence[str],
        *,
        key_file: Path | None = None,
        ok_codes: tuple[int, ...] = (0,),
    ) -> Job:
        """Start ``python ARGS`` (``-m module ...`` or a script) in the background."""
        self._count += 1
        log = self.out / "logs" / f"{self._count:02d}-{name.replace(' ', '-')}.log"
        argv = [PY, *args]
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1", "COLUMNS": "110"}
        shown = "python " + shlex.join(args)
        if key_file is not None:
            # The key travels in the environment, never on a command line (ps would show it).
            env["VERITRAIN_ETH_KEY"] = key_file.read_text().strip()
            shown = f"VERITRAIN_ETH_KEY=$(cat {shlex.quote(str(key_file))}) {shown}"
        with self.script.open("a") as f:
            f.write(shown + (" &\n" if name == "chain" else "\n"))
        handle = log.open("wb")
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
        handle.close()
        return Job(name=name, argv=argv, log=log, proc=proc, ok_codes=ok_codes)

    def run(
        self,
        name: str,
        args: Sequence[str],
        *,
        key_file: Path | None = None,
        ok_codes: tuple[int, ...] = (0,),
    ) -> str:
        """Run a command to completion and return its output (raises DemoError on failure)."""
        job = self.start(name, args, key_file=key_file, ok_codes=ok_codes)
        job.result()
        return job.output()


def progress() -> Progress:
    return Progress(
        TextColumn("  {task.description:<28}"),
        BarColumn(bar_width=36),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=console,
    )


def run_parallel(
    title: str,
    jobs: Sequence[tuple[str, int, Callable[[], Job], Callable[[], int]]],
    *,
    width: int = 2,
) -> dict[str, Job]:
    """Run jobs ``(label, total, start, count_done)`` at most ``width`` at a time, with one bar
    each; ``count_done`` reads progress off what the job has written so far."""
    pending = list(jobs)
    running: dict[str, tuple[Job, Callable[[], int], int]] = {}
    finished: dict[str, Job] = {}
    with progress() as bars:
        tasks = {label: bars.add_task(f"{title} {label}", total=total, note="waiting", start=False)
                 for label, total, _, _ in jobs}  # fmt: skip
        while pending or running:
            while pending and len(running) < width:
                label, _, start, count = pending.pop(0)
                running[label] = (start(), count, tasks[label])
                bars.start_task(tasks[label])  # elapsed time counts from the job's start
                bars.update(tasks[label], note="running")
            for label, (job, count, task) in list(running.items()):
                bars.update(task, completed=count())
                if job.proc.poll() is not None:
                    code = job.result()
                    bars.update(task, completed=count(), note=f"exit {code}")
                    finished[label] = job
                    del running[label]
            time.sleep(0.25)
    return finished


def wait_with_bar(label: str, seconds: float) -> None:
    """Let wall-clock time pass (a root's activation delay) with a visible countdown."""
    with progress() as bars:
        task = bars.add_task(label, total=int(seconds * 10), note="")
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            bars.update(task, completed=int((seconds - left) * 10), note=f"{left:4.1f} s left")
            time.sleep(0.1)
        bars.update(task, completed=int(seconds * 10), note="done")


def run_steps(
    shell: Shell, title: str, steps: Sequence[tuple[str, Sequence[str], Path | None]]
) -> dict[str, str]:
    """Run ``(name, args, key_file)`` commands one after the other under one progress bar;
    return each command's output by name."""
    outputs: dict[str, str] = {}
    with progress() as bars:
        task = bars.add_task(title, total=len(steps), note="")
        for name, args, key_file in steps:
            bars.update(task, note=name)
            outputs[name] = shell.run(name, args, key_file=key_file)
            bars.advance(task)
        bars.update(task, note="done")
    return outputs

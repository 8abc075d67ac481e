"""Worker processes for batch jobs: one process per task, owned by the job that started it.

Why not ``concurrent.futures.ProcessPoolExecutor``: when one of its workers dies (a hostile store
that crashes the interpreter, the OOM killer, a stray signal), the executor marks the whole pool
broken, every pending task fails with it, and nothing says which task killed it. With one process
per task, a dead process names its own task, which is recorded as errored; the others go on.

A worker dies with its job. On Linux it asks the kernel for SIGKILL when its parent dies
(``prctl(PR_SET_PDEATHSIG)``), so even a SIGKILLed job leaves no worker behind; and because the
parent may die before ``prctl`` runs, or on a platform without it, :func:`exit_if_orphaned` (called
before every file a worker commits) stops a worker whose parent is no longer the job.

Workers are forked from the calling thread; callers should not run other threads that hold locks
the workers need (the audit CLI refreshes its progress display by hand for this reason). The
kernel's parent-death signal follows the thread that forked, so call :func:`run_each` from a thread
that lives as long as the job (the main thread).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

Send = Callable[[object], None]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_ORPHANED_EXIT = 70  # a worker that finds its job gone exits with this code, writing nothing

_parent: int | None = None  # in a worker process: the pid of the job that owns it


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerDied:
    """A task whose worker process ended without a result (``reason`` says how)."""

    reason: str


class OrphanedWorker(SystemExit):
    """Raised in a worker whose job has died: it unwinds (``finally`` blocks remove temporary
    files) and the worker exits without writing anything more."""


def _orphaned() -> bool:
    return _parent is not None and os.getppid() != _parent


def exit_if_orphaned() -> None:
    """In a worker whose job has died, raise OrphanedWorker; elsewhere a no-op."""
    if _orphaned():
        raise OrphanedWorker(_ORPHANED_EXIT)


def _die_with_parent(parent: int) -> None:
    global _parent
    _parent = parent
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if _orphaned():  # the job died before prctl took effect
        os._exit(_ORPHANED_EXIT)


def _child(parent: int, work: Callable[[T, Send], R], task: T, conn: Connection) -> None:
    _die_with_parent(parent)
    try:
        result: object = ("done", work(task, lambda message: conn.send(("message", message))))
    except BaseException as exc:  # reported as this task's death, with its reason
        result = ("died", f"{type(exc).__name__}: {exc}")
    if _orphaned():
        os._exit(_ORPHANED_EXIT)
    conn.send(result)
    conn.close()


def _exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code} before reporting a result"


@dataclass(kw_only=True, slots=True)
class _Slot(Generic[T]):
    index: int
    task: T
    process: BaseProcess
    conn: Connection
    open: bool = True  # False once the pipe reached EOF: wait only for the exit then
    done: bool = False
    result: object = None
    died: str | None = None


def run_each(
    tasks: Sequence[T],
    work: Callable[[T, Send], R],
    *,
    workers: int,
    on_message: Callable[[T, object], None] | None = None,
    on_result: Callable[[T, R | WorkerDied], None] | None = None,
) -> list[R | WorkerDied]:
    """Run ``work(task, send)`` for every task, each in its own forked process, ``workers`` at a
    time; return the results in the order of ``tasks``.

    ``work`` and its result must be picklable; ``send(message)`` in a worker calls
    ``on_message(task, message)`` in the parent. A task whose process dies, or whose ``work``
    raises, gets a :class:`WorkerDied`; the other tasks go on. ``on_result(task, result)`` is
    called as each task ends. Worker processes left when this returns or raises are killed.
    """
    ctx = multiprocessing.get_context("fork")  # the job's modules (torch) are already imported
    parent = os.getpid()
    pending = deque(enumerate(tasks))
    running: list[_Slot[T]] = []
    results: dict[int, R | WorkerDied] = {}
    try:
        while pending or running:
            while pending and len(running) < max(1, workers):
                index, task = pending.popleft()
                recv, send = ctx.Pipe(duplex=False)
                process = ctx.Process(target=_child, args=(parent, work, task, send))
                process.start()
                send.close()  # the parent keeps only the reading end: EOF once the worker ends
                running.append(_Slot(index=index, task=task, process=process, conn=recv))
            waited = [s.conn for s in running if s.open] + [s.process.sentinel for s in running]
            ready = set(wait(waited))
            for slot in list(running):
                if slot.conn in ready:
                    _drain(slot, on_message)
                if slot.process.sentinel not in ready:
                    continue
                _drain(slot, on_message)  # what it sent before exiting is still in the pipe
                slot.process.join()
                slot.conn.close()
                running.remove(slot)
                outcome: R | WorkerDied
                if slot.done:
                    outcome = slot.result  # type: ignore[assignment]  # work's R, unpickled
                elif slot.died is not None:
                    outcome = WorkerDied(reason=f"worker raised {slot.died}")
                else:
                    outcome = WorkerDied(reason=f"worker process {_exit(slot.process.exitcode)}")
                results[slot.index] = outcome
                if on_result is not None:
                    on_result(slot.task, outcome)
    finally:
        for slot in running:
            slot.process.kill()
            slot.process.join()
            slot.conn.close()
    return [results[i] for i in range(len(tasks))]


def _drain(slot: _Slot[T], on_message: Callable[[T, object], None] | None) -> None:
    """Read what the worker sent so far (waits at most for the rest of a message being written)."""
    try:
        while slot.open and slot.conn.poll():
            kind, payload = slot.conn.recv()
            if kind == "message":
                if on_message is not None:
                    on_message(slot.task, payload)
            elif kind == "done":
                slot.done, slot.result = True, payload
            else:
                slot.died = str(payload)
    except (EOFError, OSError):
        slot.open = False  # the worker has gone; its exit status says how

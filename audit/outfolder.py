"""The output folder of an audit job: its layout, atomic writes, resume, and its lock.

Layout::

    OUT/.audit-job.lock               held (flock) by the job writing OUT; holds its pid
    OUT/<run id>/plan.json            the sample (beacon, seed, steps, detection probability)
    OUT/<run id>/step-<t>.json        one signed verdict per sampled step
    OUT/<run id>/run-invalid.json     when the run's header or manifests fail (no step re-executed)

Every file is written to a temporary name in the same folder, fsynced, then hard-linked into place
(``os.link`` refuses an existing name), so a job killed at any point leaves either no file or a
complete one, and a restarted job skips every verdict already on disk.

One job per folder. Two jobs on one folder would both do all the work and sign different verdicts
for the same steps (their ``recomputed_root`` can differ), which the warehouse then rejects as
conflicting verdicts of one auditor. The lock is a kernel ``flock``: released when its holder
dies, however it dies, so a lock file left by a dead job never blocks the next one. The file holds
the pid of the last holder, for the refusal message, and is never deleted (deleting a lock file
lets two processes lock two different files of the same name). Worker processes forked by the job
inherit the open file, so the folder stays locked while any of them still runs.
"""

from __future__ import annotations

import fcntl
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from audit.verdict import SignedVerdict, VerdictError, load_signed_verdict
from audit.workers import exit_if_orphaned
from proofs.errors import VeritrainError
from proofs.hashing import sha256

LOCK_NAME = ".audit-job.lock"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_TMP_PREFIX = ".tmp-"


class OutputLocked(VeritrainError, RuntimeError):
    """Another live job holds the output folder."""


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the lock of output folder ``out`` (created if missing) for the ``with`` block.

    Raises OutputLocked, naming the holder's pid, when another process holds it; OSError when
    the folder or its lock file cannot be created.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLocked(
                f"{out} is in use by another audit job (pid {_holder(fd)}, lock {path}); "
                "wait for it to finish or give another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    """The pid recorded by the holder ("unknown" while it has not written it yet)."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return text if text.isdigit() else "unknown"


class VerdictSlotTaken(VeritrainError, FileExistsError):
    """A verdict file is already there but is not a verdict of this auditor: never redone."""


def write_atomic(path: Path, data: bytes) -> bool:
    """Write ``data`` at ``path`` unless it exists; False (writing nothing) when it does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return False
    tmp = path.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        exit_if_orphaned()  # a worker whose job died commits nothing more
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def run_folder(out: Path, run_id: str) -> Path:
    """The run's output folder; a run id that is not a plain name is hashed (no path traversal)."""
    name = (
        run_id
        if _SAFE_NAME.match(run_id) and run_id not in (".", "..")
        else ("run-" + sha256(run_id.encode()).hex()[:32])
    )
    return out / name


def verdict_path(out: Path, run_id: str, step: int) -> Path:
    return run_folder(out, run_id) / f"step-{step:08d}.json"


def verified_existing(path: Path, auditor: bytes) -> SignedVerdict | None:
    """A finished verdict by this auditor at ``path`` (parsed, not re-verified), or None when
    there is no file. Raises VerdictSlotTaken when the file is something else (another auditor's
    verdict, damaged): it is neither redone nor replaced, and the run reports why."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        signed = load_signed_verdict(data)
    except VerdictError as exc:
        raise VerdictSlotTaken(f"{path} exists but is not a verdict: {exc}") from exc
    if signed.verdict.auditor != auditor:
        raise VerdictSlotTaken(
            f"{path} is a verdict of auditor 0x{signed.verdict.auditor.hex()[:16]}..., not of "
            "this key: give each auditor its own --out"
        )
    return signed


def sweep_temporaries(out: Path) -> None:
    """Remove temporary files a killed job left (only ever run under the folder's lock)."""
    for tmp in out.glob(f"*/{_TMP_PREFIX}*"):
        tmp.unlink(missing_ok=True)

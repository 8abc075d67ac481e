"""BLS signing in a child process, so pure-Python pairing math never holds the trainer's GIL.

py_ecc signs in ~0.13-0.18 s of pure Python. On the committer thread that time holds the GIL in
5 ms slices and stalls the training thread's op dispatch; in a child process it runs on another
core with no contention. The child is forked (as torch's DataLoader workers are), so it inherits
the already-imported py_ecc and the key pair in memory: no start-up import, and the secret never
crosses a pipe, argv or the environment. It answers (domain, context, payload) requests over a
pipe and exits when the pipe closes, including when the parent is killed.
"""

from __future__ import annotations

import multiprocessing
import threading
from multiprocessing.connection import Connection

from proofs.errors import SignatureError
from proofs.signatures import Domain, KeyPair, sign


def _serve(conn: Connection, parent_end: Connection, keypair: KeyPair) -> None:
    parent_end.close()  # so that EOF arrives once the parent's end is gone
    while True:
        try:
            domain, context, payload = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(("ok", bytes(sign(keypair, Domain(domain), context, payload))))
        except Exception as exc:  # reported to the parent, which raises SignatureError
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class SignerProcess:
    """A forked child holding ``keypair``; ``sign`` mirrors ``proofs.signatures.sign``."""

    def __init__(self, keypair: KeyPair) -> None:
        ctx = multiprocessing.get_context("fork")
        self._conn, child_end = ctx.Pipe()
        self._proc = ctx.Process(
            target=_serve, args=(child_end, self._conn, keypair), name="veritrain-signer"
        )
        self._proc.daemon = True
        self._proc.start()
        child_end.close()
        self._lock = threading.Lock()

    def sign(self, domain: Domain, context: str, payload: bytes) -> bytes:
        """Sign in the child; SignatureError if it fails or has died."""
        with self._lock:
            try:
                self._conn.send((domain.value, context, bytes(payload)))
                status, value = self._conn.recv()
            except (EOFError, OSError) as exc:
                raise SignatureError(
                    f"signer process is gone (exit {self._proc.exitcode})"
                ) from exc
        if status != "ok":
            raise SignatureError(f"signer process: {value}")
        return bytes(value)

    def close(self) -> None:
        """Close the pipe (the child exits on EOF) and reap the child."""
        self._conn.close()
        self._proc.join(timeout=10)
        if self._proc.is_alive():  # pragma: no cover - the child exits on EOF
            self._proc.kill()
            self._proc.join()

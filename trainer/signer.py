"""BLS signing in a child process, so pure-Python pairing math never holds the trainer's GIL.

py_ecc signs in ~0.18 s of pure Python. On the committer thread that time holds the GIL in 5 ms
slices and stalls the training thread's op dispatch; in a child process it runs on another core
with no contention. The child is ``python -m trainer.signer`` (imports proofs/ only, no torch),
talking line-delimited JSON over its stdin/stdout: the key pair first, then one request per line.
The secret travels over the pipe only (never argv or the environment). When the parent dies the
child reads EOF and exits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from proofs.errors import SignatureError
from proofs.signatures import Domain, KeyPair, keypair_from_json, keypair_to_json, sign


class SignerProcess:
    """A child process holding ``keypair``; ``sign`` has the signature of proofs.signatures.sign."""

    def __init__(self, keypair: KeyPair) -> None:
        root = str(Path(__file__).resolve().parents[1])
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": root if not path else root + os.pathsep + path}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "trainer.signer"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        self._lock = threading.Lock()
        self.public = keypair.public
        self._send({"keypair": keypair_to_json(keypair)})

    def _send(self, obj: dict[str, object]) -> None:
        stdin = self._proc.stdin
        if stdin is None:  # pragma: no cover - always a pipe
            raise SignatureError("signer process has no stdin")
        try:
            stdin.write(json.dumps(obj) + "\n")
            stdin.flush()
        except OSError as exc:
            raise SignatureError(f"signer process is gone: {exc}") from exc

    def sign(self, domain: Domain, context: str, payload: bytes) -> bytes:
        """Sign in the child; SignatureError if it fails or has died."""
        with self._lock:
            self._send({"domain": domain.value, "context": context, "payload": payload.hex()})
            line = self._proc.stdout.readline() if self._proc.stdout else ""
        if not line:
            raise SignatureError(f"signer process exited (code {self._proc.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise SignatureError(f"signer process: {reply['error']}")
        return bytes.fromhex(reply["signature"])

    def close(self) -> None:
        """End the child (it exits on EOF) and reap it."""
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - the child exits on EOF
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()


def serve(stdin: IO[str], stdout: IO[str]) -> None:
    """The child's loop: read the key pair, then answer sign requests until EOF."""
    first = stdin.readline()
    if not first:
        return
    keypair = keypair_from_json(json.loads(first)["keypair"])
    for line in stdin:
        try:
            req = json.loads(line)
            sig = sign(
                keypair, Domain(req["domain"]), req["context"], bytes.fromhex(req["payload"])
            )
            reply: dict[str, str] = {"signature": bytes(sig).hex()}
        except Exception as exc:  # reported to the parent, which raises SignatureError
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        stdout.write(json.dumps(reply) + "\n")
        stdout.flush()


if __name__ == "__main__":
    serve(sys.stdin, sys.stdout)

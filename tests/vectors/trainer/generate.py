"""Regenerate the trainer vectors WITHOUT importing trainer/: hashlib, json and proofs.signatures
only, so the vectors are an independent statement of the formats in docs/run-store.md.

    .venv/bin/python tests/vectors/trainer/generate.py
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from proofs.signatures import Domain, keypair_from_seed, sign

HERE = Path(__file__).parent
KEY = keypair_from_seed(b"veritrain-trainer-vector-key-0001")


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("ascii")


def replay_seed(run_seed: int, step: int) -> int:
    msg = (
        b"veritrain/seed/v1\x00"
        + struct.pack(">I", 6)
        + b"replay"
        + struct.pack(">QQ", run_seed, step)
    )
    return int.from_bytes(hashlib.sha256(msg).digest()[:8], "big") >> 1


def offsets(run_seed: int, step: int, batch: int, context: int, size: int) -> list[int]:
    prefix = b"veritrain/batch/v1\x00" + struct.pack(">QQ", run_seed, step)
    return [
        int.from_bytes(hashlib.sha256(prefix + struct.pack(">I", i)).digest(), "big")
        % (size - context)
        for i in range(batch)
    ]


def main() -> None:
    seeds = [
        {"run_seed": r, "step": t, "replay_seed": replay_seed(r, t)}
        for r, t in [(0, 0), (0, 1), (1, 0), (1234, 99), (2**64 - 1, 2**40)]
    ]
    batches = [
        {"run_seed": r, "step": t, "batch_size": b, "context": c, "corpus_size": n,
         "offsets": offsets(r, t, b, c, n)}
        for r, t, b, c, n in [(0, 0, 4, 16, 1000), (7, 12345, 8, 64, 31525224)]
    ]  # fmt: skip
    header_hash = hashlib.sha256(b"stand-in header hash for the vector").digest()
    records = []
    prev = header_hash
    for step in range(2):
        rec = {
            "step": step,
            "replay_seed": replay_seed(3, step),
            "batch": offsets(3, step, 2, 16, 5000),
            "loss": 5.5 - step / 4,
            "lrs": [0.001, 0.0005],
            "grad_root": "0x" + hashlib.sha256(b"grad %d" % step).hexdigest(),
            "grad_leaves": 12,
            "grad_bytes": 40000,
            "prev": "0x" + prev.hex(),
        }
        records.append(rec)
        prev = hashlib.sha256(canonical(rec)).digest()
    manifest = {
        "version": 1,
        "run_id": "vector-run",
        "window": 0,
        "first_step": 0,
        "records": records,
        "state": {
            "step": 2,
            "root": "0x" + hashlib.sha256(b"state 2").hexdigest(),
            "leaf_count": 30,
            "nbytes": 123456,
        },
        "prev": "0x" + header_hash.hex(),
    }
    manifest_hash = hashlib.sha256(canonical(manifest)).digest()
    signature = sign(KEY, Domain.STEP_MANIFEST, "vector-run", manifest_hash)
    out = {
        "seeds": seeds,
        "batches": batches,
        "records": [
            {
                "record": r,
                "canonical": canonical(r).decode(),
                "hash": "0x" + hashlib.sha256(canonical(r)).hexdigest(),
            }
            for r in records
        ],
        "signed_manifest": {
            "json": {"manifest": manifest, "signature": "0x" + bytes(signature).hex()},
            "hash": "0x" + manifest_hash.hex(),
            "pubkey": "0x" + bytes(KEY.public).hex(),
            "last_record_hash": "0x" + prev.hex(),
        },
    }
    (HERE / "trainer.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

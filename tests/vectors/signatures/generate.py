"""Regenerate the signature vectors in this folder.

Run from the repository root: ``.venv/bin/python tests/vectors/signatures/generate.py``.

It deliberately does not import veritrain: message bytes are assembled here from the layout in
docs/signatures.md, and keys and signatures come straight from py_ecc's G2ProofOfPossession, so
the vectors check veritrain's code rather than repeat it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from py_ecc.bls import G2ProofOfPossession as Bls

HERE = Path(__file__).resolve().parent
MAGIC = b"veritrain/bls-msg/v1\x00"


def message(tag: str, context: str, payload: bytes) -> bytes:
    """docs/signatures.md: MAGIC | u8 tag length | tag | u16be context length | context (UTF-8)
    | u64be payload length | payload."""
    t, c = tag.encode("ascii"), context.encode("utf-8")
    return (
        MAGIC
        + len(t).to_bytes(1, "big")
        + t
        + len(c).to_bytes(2, "big")
        + c
        + len(payload).to_bytes(8, "big")
        + payload
    )


def hx(data: bytes) -> str:
    return "0x" + data.hex()


def main() -> None:
    seeds = [
        bytes(32),
        bytes(range(32)),
        hashlib.sha256(b"veritrain signature vector seed 3").digest()
        + hashlib.sha256(b"more").digest()[:16],
    ]
    keys = []
    for seed in seeds:
        secret = Bls.KeyGen(seed)
        keys.append(
            {
                "seed": hx(seed),
                "secret": hx(secret.to_bytes(32, "big")),
                "pubkey": hx(Bls.SkToPk(secret)),
            }
        )

    root = hashlib.sha256(b"payout root").digest()
    message_cases = [
        ("run-header", "run-2026-11-25", hashlib.sha256(b"header").digest()),
        ("step-manifest", "run-2026-11-25", hashlib.sha256(b"step 42").digest()),
        ("verdict", "epoch-7", b"verdict body"),
        ("payout-root", "epoch-7", root),
        ("payout-root", "epoch-8", root),
        ("verdict", "\u00e9poque-\u4e03", b""),
        ("step-manifest", "x" * 1024, bytes(range(256))),
    ]
    messages = [
        {"domain": d, "context": c, "payload": hx(p), "message": hx(message(d, c, p))}
        for d, c, p in message_cases
    ]
    invalid_contexts = ["", "x" * 1025, "\u00e9" * 513]

    signed = []
    for key_index, case_index in [(0, 1), (1, 2), (2, 3)]:
        d, c, p = message_cases[case_index]
        secret = int(keys[key_index]["secret"][2:], 16)
        sig = Bls.Sign(secret, message(d, c, p))
        signed.append(
            {"key": key_index, "domain": d, "context": c, "payload": hx(p), "signature": hx(sig)}
        )
    aggregate = Bls.Aggregate([bytes.fromhex(s["signature"][2:]) for s in signed])

    out = {
        "version": 1,
        "suite": "BLS_SIG_BLS12381G2_XMD:SHA-256_SSWU_RO_POP_ (py_ecc G2ProofOfPossession)",
        "magic": hx(MAGIC),
        "keys": keys,
        "messages": messages,
        "invalidContexts": invalid_contexts,
        "signatures": signed,
        "aggregate": {"of": [0, 1, 2], "signature": hx(aggregate)},
    }
    (HERE / "vectors.json").write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()

"""Regenerate the shared-run record vectors WITHOUT importing trainer/: hashlib, json and
proofs.signatures only, so the vectors state the record formats of docs/protocol.md ("Shared
runs") independently of trainer/sharedrun.py and trainer/roundrecord.py.

    .venv/bin/python tests/vectors/shared/generate.py
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from proofs.signatures import Domain, keypair_from_seed, sign

HERE = Path(__file__).parent
COORDINATOR = keypair_from_seed(b"veritrain-shared-vector-coordinator")
AGGREGATOR = keypair_from_seed(b"veritrain-shared-vector-aggregator-")
ALICE = keypair_from_seed(b"veritrain-shared-vector-peer-alice-")
BOB = keypair_from_seed(b"veritrain-shared-vector-peer-bob---")
RUN = "demo-shared-1"


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("ascii")


def hx(data: bytes) -> str:
    return "0x" + data.hex()


def h(label: str) -> str:
    """A stand-in 32-byte hash (a root or record hash the vector does not derive)."""
    return hx(hashlib.sha256(label.encode()).digest())


def signed(key_name: str, key: Any, domain: Domain, record: dict[str, Any]) -> dict[str, Any]:
    """The record, its canonical bytes, sha256 hash and the signature over
    (domain, shared run id, hash)."""
    data = canonical(record)
    digest = hashlib.sha256(data).digest()
    return {
        "signer": key_name,
        "record": record,
        "canonical": data.decode("ascii"),
        "hash": hx(digest),
        "signature": hx(bytes(sign(key, domain, RUN, digest))),
    }


def main() -> None:
    genesis = {
        "version": 1,
        "shared_run_id": RUN,
        "model": "gpt-bytes",
        "model_config": {
            "n_layer": 1,
            "n_head": 2,
            "d_model": 16,
            "context": 32,
            "dropout": 0.0,
            "vocab_size": 256,
        },
        "init_seed": 1234,
        "initial_root": h("theta-0"),
        "optimizer": "AdamW",
        "hyperparameters": {"betas": [0.9, 0.95], "weight_decay": 0.1},
        "inner_lr": 0.001,
        "grad_clip": 1.0,
        "inner_steps": 3,
        "batch_size": 4,
        "context": 32,
        "dataset": {
            "root": h("corpus"),
            "nbytes": 100000,
            "file_count": 7,
            "chunk_size": 1048576,
            "source": "stdlib",
        },
        "heldout": {
            "root": h("heldout-corpus"),
            "nbytes": 20000,
            "file_count": 2,
            "chunk_size": 1048576,
            "source": "heldout",
        },
        "checkpoint_every": 3,
        "chunk_size": 65536,
        "outer": {"beta": 0.9, "chunk": 4096, "topk": 64, "quantization": "int8", "alpha": 0.7},
        "screening": {
            "norm_factor": 3.0,
            "probe": True,
            "probe_batch": 8,
            "probe_margin": 0.05,
            "min_contributions": 1,
            "max_contributions": 16,
            "deadline_s": 600.0,
            "probe_gain": 0.5,
        },
        "rounds": 10,
        "coordinator": hx(COORDINATOR.public),
        "aggregator": hx(AGGREGATOR.public),
        "peers": {"alice": hx(ALICE.public), "bob": hx(BOB.public)},
    }
    g = signed("coordinator", COORDINATOR, Domain.SHARED_GENESIS, genesis)
    contribution = {
        "version": 1,
        "shared_run_id": RUN,
        "genesis": g["hash"],
        "round": 0,
        "peer": "alice",
        "pubkey": hx(ALICE.public),
        "base_root": genesis["initial_root"],
        "prev_contribution": hx(bytes(32)),
        "prev_local_state": hx(bytes(32)),
        "inner_header": h("alice-inner-header"),
        "inner_manifest": h("alice-inner-manifest"),
        "final_state": h("alice-theta-H"),
        "delta": h("alice-payload"),
        "payload_bytes": 4500,
        "nnz": 512,
        "local_state": h("alice-local-state"),
        "losses": [5.5, 5.25, 5.125],
    }
    c = signed("alice", ALICE, Domain.CONTRIBUTION, contribution)
    round_record = {
        "version": 1,
        "shared_run_id": RUN,
        "genesis": g["hash"],
        "round": 0,
        "prev": g["hash"],
        "base_root": genesis["initial_root"],
        "opened_at": 1796572800,
        "closed_at": 1796573400,
        "included": [
            {
                "peer": "alice",
                "contribution": c["hash"],
                "delta": contribution["delta"],
                "norm": 0.5,
                "probe_loss": 5.0,
            }
        ],
        "excluded": [
            {
                "file": "bob/r000000.json",
                "file_hash": h("bob-file"),
                "peer": "bob",
                "contribution": h("bob-record"),
                "reason": "probe",
                "detail": "loss rose 80%",
                "built_on": None,
                "norm": 0.75,
                "probe_loss": "NaN",
            },
            {
                "file": "mallory/notes.txt",
                "file_hash": h("mallory-file"),
                "peer": None,
                "contribution": None,
                "reason": "unreadable",
                "detail": "not a JSON record",
                "built_on": None,
                "norm": None,
                "probe_loss": None,
            },
        ],
        "base_probe_loss": 5.0625,
        "aggregate": h("aggregate-u"),
        "new_root": h("theta-1"),
        "carried_over": False,
    }
    r = signed("aggregator", AGGREGATOR, Domain.ROUND, round_record)
    out = {
        "keys": {
            name: {"secret": hx(k.secret.to_bytes(32, "big")), "pubkey": hx(k.public)}
            for name, k in (
                ("coordinator", COORDINATOR),
                ("aggregator", AGGREGATOR),
                ("alice", ALICE),
                ("bob", BOB),
            )
        },
        "genesis": g,
        "contribution": c,
        "round": r,
    }
    (HERE / "records.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Regenerate the trainer vectors WITHOUT importing trainer/: hashlib, json, math, struct and
proofs.signatures only, so the vectors are an independent statement of the formats in
docs/run-store.md (seeds, batches, the version-2 run header, step records, manifests) and of the
learning-rate schedules of trainer/schedule.py.

    .venv/bin/python tests/vectors/trainer/generate.py
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any

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


def run_seed_for(pubkey: bytes, assignment: bytes, run_id: str) -> int:
    """trainer.seeds.run_seed_for as its docstring states it: sha256 of RUN_SEED_MAGIC || pubkey
    (48) || assignment (32) || u32be(len(run_id)) || run_id (UTF-8), first 8 bytes big-endian."""
    assert len(pubkey) == 48 and len(assignment) == 32
    name = run_id.encode("utf-8")
    msg = b"veritrain/run-seed/v1\x00" + pubkey + assignment + struct.pack(">I", len(name)) + name
    return int.from_bytes(hashlib.sha256(msg).digest()[:8], "big")


def schedule(kind: str, lr: float, **fields: Any) -> dict[str, Any]:
    """A schedule's JSON form (Schedule.to_json): every field, defaults included."""
    out: dict[str, Any] = {
        "kind": kind, "lr": lr, "warmup_steps": 0, "total_steps": 0, "final_fraction": 0.1,
        "step_size": 0, "gamma": 1.0, "group_scales": [],
    }  # fmt: skip
    out.update(fields)
    return out


def lr_at(s: dict[str, Any], step: int, group: int) -> float:
    """The documented rate of ``s`` at ``step`` for param group ``group``."""
    lr, scales = float(s["lr"]), list(s["group_scales"])
    scale = float(scales[group]) if scales else 1.0
    if s["kind"] == "constant":
        base = lr
    elif s["kind"] == "step":
        base = lr * float(s["gamma"]) ** (step // int(s["step_size"]))
    else:  # warmup_cosine: linear warmup, then cosine from lr down to final_fraction * lr
        warmup, total = int(s["warmup_steps"]), int(s["total_steps"])
        floor = float(s["final_fraction"])
        if step < warmup:
            base = lr * (step + 1) / warmup
        else:
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            base = lr * (floor + (1.0 - floor) / 2 * (1.0 + math.cos(math.pi * progress)))
    return base * scale


SCHEDULES = [
    (schedule("constant", 0.001, group_scales=[1.0, 0.25]), [0, 7, 1000]),
    (
        schedule("warmup_cosine", 0.003, warmup_steps=10, total_steps=100),
        [0, 4, 9, 10, 11, 55, 99, 100, 500],
    ),
    (
        schedule("warmup_cosine", 0.5, total_steps=50, final_fraction=0.0, group_scales=[1.0, 0.1]),
        [0, 1, 25, 49, 50, 80],
    ),
    (schedule("step", 0.1, step_size=3, gamma=0.5, group_scales=[2.0]), [0, 2, 3, 8, 9, 30]),
]


def header_v2(pubkey: bytes, assignment: bytes) -> dict[str, Any]:
    """A version-2 run header: the seed derived from key, assignment and run id, the schedule, and
    a second param group (biases) whose override drops weight decay; no lr in the defaults."""
    run_id = "vector-run"
    return {
        "version": 2,
        "run_id": run_id,
        "run_seed": run_seed_for(pubkey, assignment, run_id),
        "assignment": "0x" + assignment.hex(),
        "model": "gpt-bytes",
        "model_config": {"context": 16, "d_model": 32, "dropout": 0.1, "n_head": 2, "n_layer": 1,
                         "vocab_size": 256},
        "optimizer": {
            "name": "AdamW",
            "defaults": {"amsgrad": False, "betas": [0.9, 0.95], "eps": 1e-08,
                         "foreach": None, "maximize": False, "weight_decay": 0.1},
            "groups": [["tok_emb.weight", "head.weight"], ["ln_f.bias"]],
            "overrides": [{}, {"weight_decay": 0.0}],
        },
        "grad_clip": 1.0,
        "schedule": schedule("warmup_cosine", 0.003, warmup_steps=10, total_steps=200,
                             group_scales=[1.0, 0.5]),
        "dataset": {"root": "0x" + hashlib.sha256(b"corpus").hexdigest(), "nbytes": 5000,
                    "file_count": 2, "chunk_size": 1048576, "source": "vector corpus"},
        "batch_size": 2,
        "context": 16,
        "dtype": "float32",
        "device": "cpu",
        "torch_version": "2.0.0",
        "determinism": {"cudnn_benchmark": False, "cudnn_deterministic": True,
                        "deterministic_algorithms": True, "num_threads": 1},
        "checkpoint_every": 2,
        "chunk_size": 65536,
        "initial_state": {"step": 0, "root": "0x" + hashlib.sha256(b"state 0").hexdigest(),
                          "leaf_count": 30, "nbytes": 123456},
        "pubkey": "0x" + pubkey.hex(),
        "aliases": {},
    }  # fmt: skip


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
    pubkey = bytes(KEY.public)
    run_seeds = [
        {"pubkey": "0x" + k.hex(), "assignment": "0x" + a.hex(), "run_id": r,
         "run_seed": run_seed_for(k, a, r)}
        for k, a, r in [
            (pubkey, bytes(32), "vector-run"),
            (pubkey, hashlib.sha256(b"vector assignment").digest(), "vector-run"),
            (pubkey, bytes(32), "vector-run2"),
            (bytes(range(48)), bytes(32), "vector-run"),
            (bytes(range(48)), b"\xff" * 32, "a"),
            (b"\x80" + bytes(47), bytes(range(32)), "Run.2026_12-06." + "x" * 49),
        ]
    ]  # fmt: skip
    schedules = [
        {"schedule": s, "lrs": [{"step": t, "group": g, "lr": lr_at(s, t, g)}
                                for t in steps for g in range(max(1, len(s["group_scales"])))]}
        for s, steps in SCHEDULES
    ]  # fmt: skip
    header = header_v2(pubkey, hashlib.sha256(b"vector assignment").digest())
    run_header_hash = hashlib.sha256(canonical(header)).digest()
    header_signature = sign(KEY, Domain.RUN_HEADER, "vector-run", run_header_hash)
    # The records below chain from a stand-in, not from this header: their bytes predate version 2
    # (step records and manifests did not change) and stay as they were.
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
        "run_seeds": run_seeds,
        "schedules": schedules,
        "signed_header": {
            "json": {"header": header, "signature": "0x" + bytes(header_signature).hex()},
            "canonical": canonical(header).decode(),
            "hash": "0x" + run_header_hash.hex(),
            "pubkey": "0x" + pubkey.hex(),
        },
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

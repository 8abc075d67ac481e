"""Regenerate the Merkle JSON vectors from the independent oracle in tests/test_merkle.py.

Expected roots and proof hashes come from the oracle functions (RFC 6962 written with hashlib),
never from proofs.merkle. Run: .venv/bin/python tests/vectors/merkle/generate.py
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("merkle_oracle", HERE.parents[1] / "test_merkle.py")
assert _spec is not None and _spec.loader is not None
oracle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oracle)


def hx(b: bytes) -> str:
    return "0x" + b.hex()


def case(name: str, leaves: list[bytes], rng: random.Random) -> dict[str, object]:
    n = len(leaves)
    out: dict[str, object] = {
        "name": name,
        "leaves": [hx(x) for x in leaves],
        "root": hx(oracle.mth(leaves)),
    }
    if n:
        out["legacy_root"] = hx(oracle.oracle_legacy_root(leaves))
    picks = list(range(n)) if n <= 9 else sorted([*rng.sample(range(n), 6), 0, n - 1])
    out["proofs"] = [
        {
            "version": 1,
            "kind": "inclusion",
            "index": m,
            "leaf_count": n,
            "siblings": [hx(h) for h in oracle.audit_path(m, leaves)],
        }
        for m in sorted(set(picks))
    ]
    multis = []
    for size in (1, 2, 3, 5):
        if n and size <= n:
            idx = sorted(rng.sample(range(n), size))
            multis.append(
                {
                    "version": 1,
                    "kind": "multiproof",
                    "indices": idx,
                    "leaf_count": n,
                    "hashes": [hx(h) for h in oracle.multiproof_hashes(idx, leaves)],
                }
            )
    if n:
        multis.append(
            {
                "version": 1,
                "kind": "multiproof",
                "indices": list(range(n)),
                "leaf_count": n,
                "hashes": [],
            }
        )
    out["multiproofs"] = multis
    return out


def main() -> None:
    rng = random.Random(20261125)
    cases = []
    for n in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 33, 100):
        leaves = [rng.randbytes(rng.randrange(0, 40)) for _ in range(n)]
        cases.append(case(f"random-{n}", leaves, rng))
    cases.append(case("ascii-abc", [b"a", b"b", b"c"], rng))
    cases.append(case("empty-leaves-4", [b""] * 4, rng))
    cases.append(case("hash-sized-leaves-5", [bytes([i]) * 32 for i in range(5)], rng))
    doc = {
        "description": "RFC 6962 sha256 Merkle trees: leaves -> root, inclusion proofs, "
        "multiproofs; "
        "legacy_root = merkletools sha256 root with add_leaf(hex, do_hash=True)",
        "cases": cases,
    }
    (HERE / "rfc6962.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Regenerate the encoding JSON vectors, independently of proofs.encoding.

Header bytes are assembled here from the byte-by-byte format in README.md with struct; roots come
from the RFC 6962 oracle in tests/test_merkle.py.
Run: .venv/bin/python tests/vectors/encoding/generate.py
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import struct
from pathlib import Path

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("merkle_oracle", HERE.parents[1] / "test_merkle.py")
assert _spec is not None and _spec.loader is not None
oracle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oracle)

SIZES = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
    "complex64": 8,
    "float8_e4m3fn": 1,
}


def header(name: str, dtype: str, shape: tuple[int, ...], chunk: int) -> bytes:
    nb, db = name.encode(), dtype.encode()
    nbytes = math.prod(shape) * SIZES[dtype]
    return (
        b"VTTH"
        + bytes([1])
        + struct.pack(">H", len(nb))
        + nb
        + bytes([len(db)])
        + db
        + bytes([len(shape)])
        + b"".join(struct.pack(">Q", d) for d in shape)
        + struct.pack(">QQ", nbytes, chunk)
    )


def case(
    title: str,
    tensors: list[tuple[str, str, tuple[int, ...]]],
    chunk: int,
    rng: random.Random,
    data: dict[str, bytes] | None = None,
) -> dict[str, object]:
    data = dict(data or {})
    for name, dtype, shape in tensors:
        data.setdefault(name, rng.randbytes(math.prod(shape) * SIZES[dtype]))
    leaves: list[bytes] = []
    layout = []
    for name, dtype, shape in sorted(tensors):
        leaves.append(header(name, dtype, shape, chunk))
        layout.append(
            {
                "index": len(layout),
                "tensor": name,
                "kind": "header",
                "offset": 0,
                "length": len(leaves[-1]),
            }
        )
        blob = data[name]
        for off in range(0, len(blob), chunk):
            leaves.append(blob[off : off + chunk])
            layout.append(
                {
                    "index": len(layout),
                    "tensor": name,
                    "kind": "data",
                    "offset": off,
                    "length": len(leaves[-1]),
                }
            )
    return {
        "name": title,
        "chunk_size": chunk,
        "tensors": [
            {"name": n, "dtype": d, "shape": list(s), "data": "0x" + data[n].hex()}
            for n, d, s in tensors
        ],  # deliberately unsorted: encoding sorts
        "leaves": ["0x" + x.hex() for x in leaves],
        "layout": layout,
        "root": "0x" + oracle.mth(leaves).hex(),
    }


def main() -> None:
    rng = random.Random(1125)
    shared = rng.randbytes(48)
    cases = [
        case(
            "two-tensors",
            [("layer.weight", "float32", (2, 3)), ("layer.bias", "int64", (4,))],
            16,
            rng,
        ),
        case(
            "dtypes-scalar-empty-unicode",
            [
                ("flag", "bool", ()),
                ("é.w", "bfloat16", (3,)),
                ("empty", "float16", (0, 5)),
                ("z", "complex64", (2,)),
                ("q", "float8_e4m3fn", (7,)),
                ("a", "float64", (1, 1, 2)),
            ],
            8,
            rng,
        ),
        case("default-chunk-size", [("w", "uint8", (300,)), ("b", "int8", (5,))], 1 << 20, rng),
        case("chunk-boundary-exact", [("w", "float32", (8,)), ("v", "float32", (9,))], 32, rng),
        case("same-bytes-shape-12x1", [("w", "float32", (12,))], 64, rng, {"w": shared}),
        case("same-bytes-shape-3x4", [("w", "float32", (3, 4))], 64, rng, {"w": shared}),
        case("same-bytes-int64", [("w", "int64", (6,))], 64, rng, {"w": shared}),
    ]
    doc = {
        "description": "canonical tensor encoding v1: tensors -> leaves (header + chunks) -> "
        "RFC 6962 root",
        "cases": cases,
    }
    (HERE / "tensors.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()

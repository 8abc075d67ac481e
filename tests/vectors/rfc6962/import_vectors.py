"""Convert transparency-dev/merkle's consistency and inclusion probes into our vector files.

The probes are one JSON file each under ``testdata/consistency/`` and ``testdata/inclusion/`` of a
checkout of https://github.com/transparency-dev/merkle (bytes as base64). We keep every field
and value as it is, only re-encoding bytes as 0x-hex and adding the file each probe came from.
Run: .venv/bin/python tests/vectors/rfc6962/import_vectors.py /path/to/merkle COMMIT
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
# testonly/constants.go LeafInputs() of the same commit: the 8 leaves the probes' trees hold.
LEAF_INPUTS = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
]


def hx(b64: str) -> str:
    return "0x" + base64.b64decode(b64, validate=True).hex()


def convert(probe: dict[str, object], rel: str) -> dict[str, object]:
    out: dict[str, object] = {"file": rel}
    for key, value in probe.items():
        if key == "proof":
            out[key] = None if value is None else [hx(v) for v in value]  # type: ignore[attr-defined]
        elif key in ("root", "root1", "root2", "leafHash"):
            out[key] = hx(str(value))
        else:
            out[key] = value
    return out


def main(checkout: Path, commit: str) -> None:
    for kind in ("consistency", "inclusion"):
        base = checkout / "testdata" / kind
        cases = [
            convert(json.loads(p.read_text()), p.relative_to(base).as_posix())
            for p in sorted(base.rglob("*.json"))
        ]
        doc = {
            "source": {
                "repository": "https://github.com/transparency-dev/merkle",
                "commit": commit,
                "path": f"testdata/{kind}",
                "license": "Apache-2.0",
            },
            "leaf_inputs": ["0x" + x for x in LEAF_INPUTS],
            "cases": cases,
        }
        text = json.dumps(doc, indent=1) + "\n"
        (HERE / f"{kind}.json").write_text(text)
        print(f"{kind}: {len(cases)} cases")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])

"""RunStore and the artifact format: atomic, exclusive writes; checked range reads."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest

from proofs.merkle import merkle_root
from trainer.artifact import encode_artifact, first_bad_leaf, parse_artifact
from trainer.store import RunStore, StoreError, object_name

LEAVES = [b"header-ish", b"x" * 1000, b"", b"tail" * 7]


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_artifact_round_trip_and_exclusive_writes(tmp_path: Path, scheme: str) -> None:
    url = str(tmp_path / "s") if scheme == "local" else f"memory://store-test-{os.getpid()}"
    store = RunStore(url)
    encoded = encode_artifact(LEAVES)
    assert encoded.root == merkle_root(LEAVES)
    assert store.put_object(encoded.root, encoded.parts)
    assert not store.put_object(encoded.root, encoded.parts)  # already there: nothing rewritten
    index = store.read_index(encoded.root)
    assert index.lengths == tuple(len(x) for x in LEAVES)
    assert index.hashes == tuple(hashlib.sha256(b"\x00" + x).digest() for x in LEAVES)
    assert store.read_leaves(encoded.root, [3, 1], index=index) == {1: LEAVES[1], 3: LEAVES[3]}
    table, leaves = store.read_artifact(encoded.root)
    assert leaves == LEAVES and first_bad_leaf(table, leaves, encoded.root) is None
    assert store.put_bytes("manifests/w000000.json", b"{}")
    assert not store.put_bytes("manifests/w000000.json", b"{ }")
    assert store.read_bytes("manifests/w000000.json") == b"{}"
    with pytest.raises(StoreError):
        store.read_index(b"\x00" * 32)


def test_local_writes_leave_no_temp_files_and_repair_torn_uncommitted(tmp_path: Path) -> None:
    store = RunStore(str(tmp_path))
    encoded = encode_artifact(LEAVES)
    path = tmp_path / object_name(encoded.root)
    path.parent.mkdir(parents=True)
    path.write_bytes(encoded.payload[:20])  # what a power cut before the window's fsync leaves
    assert store.put_object(encoded.root, encoded.parts)
    store.sync()
    assert path.read_bytes() == encoded.payload
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_artifact_layout_is_as_documented() -> None:
    payload = encode_artifact(LEAVES).payload
    assert payload[:8] == b"VTAR\x01\x00\x00\x00"
    assert struct.unpack_from(">Q", payload, 8)[0] == len(LEAVES)
    assert struct.unpack_from(">4Q", payload, 16) == tuple(len(x) for x in LEAVES)
    assert payload.endswith(b"".join(LEAVES))
    index, leaves = parse_artifact(payload)
    assert leaves == LEAVES
    bad = bytearray(payload)
    bad[-1] ^= 1
    index, leaves = parse_artifact(bytes(bad))
    assert first_bad_leaf(index, leaves, encode_artifact(LEAVES).root) == 3

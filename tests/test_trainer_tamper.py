"""verify-store catches each kind of tampering and names the first broken link precisely."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from forgery import rechain
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proofs.codec import canonical_json, record_hash
from proofs.signatures import Domain, keypair_from_seed, sign
from trainer.data import Corpus
from trainer.loop import TrainConfig, train
from trainer.manifest import sign_manifest
from trainer.recipe import sign_header
from trainer.seeds import run_seed_for
from trainer.store import RunStore, manifest_name, object_name
from trainer.verify import check_store

KEY = keypair_from_seed(b"trainer-tamper-peer-key-seed-0001")
OTHER = keypair_from_seed(b"trainer-tamper-other-key-seed-002")
CONFIG = TrainConfig(
    run_id="run",
    steps=6,
    batch_size=4,
    model_config={"n_layer": 1, "n_head": 2, "d_model": 32, "context": 16},
    checkpoint_every=3,
    chunk_size=4096,
    threads=1,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "run"
    train(CONFIG, str(path), KEY, corpus=Corpus.from_paths([Path(json.__file__).parent]))
    return path


@pytest.fixture()
def run(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(pristine, copy)
    return copy


def leaf_offsets(path: Path) -> list[tuple[int, int]]:
    """(start, length) of each leaf, parsed straight from the documented artifact layout."""
    raw = path.read_bytes()
    assert raw[:4] == b"VTAR"
    (count,) = struct.unpack_from(">Q", raw, 8)
    lengths = struct.unpack_from(f">{count}Q", raw, 16)
    pos = 16 + 40 * count
    out = []
    for n in lengths:
        out.append((pos, n))
        pos += n
    return out


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.chmod(0o644)
    path.write_bytes(bytes(data))


def test_pristine_store_verifies(pristine: Path) -> None:
    report = check_store(str(pristine), pubkey=bytes(KEY.public))
    assert report.ok and report.steps == 6


def test_flipped_gradient_byte_names_step_and_leaf(run: Path) -> None:
    record = RunStore(str(run)).read_manifest(1).manifest.records[1]
    path = run / object_name(record.grad_root)
    offsets = leaf_offsets(path)
    start, _ = offsets[5]
    flip(path, start + 17)
    broken = check_store(str(run)).broken
    assert broken is not None
    assert (broken.check, broken.window, broken.step, broken.leaf) == ("gradient", 1, 4, 5)
    assert broken.artifact == object_name(record.grad_root)


def test_flipped_state_byte_names_window_and_leaf(run: Path) -> None:
    state = RunStore(str(run)).read_manifest(0).manifest.state
    path = run / object_name(state.root)
    start, length = leaf_offsets(path)[-1]
    flip(path, start + length - 1)
    broken = check_store(str(run)).broken
    assert broken is not None
    assert (broken.check, broken.window, broken.step) == ("state", 0, 3)
    assert broken.leaf == state.leaf_count - 1


def test_flipped_leaf_table_entry_is_caught(run: Path) -> None:
    record = RunStore(str(run)).read_manifest(0).manifest.records[0]
    path = run / object_name(record.grad_root)
    count = len(leaf_offsets(path))
    flip(path, 16 + 8 * count + 32 * 2 + 3)  # a byte of leaf 2's hash in the table
    broken = check_store(str(run)).broken
    assert broken is not None and (broken.check, broken.step, broken.leaf) == ("gradient", 0, 2)


def test_edited_manifest_value_breaks_its_signature(run: Path) -> None:
    path = run / manifest_name(1)
    obj = json.loads(path.read_bytes())
    obj["manifest"]["records"][2]["loss"] = 0.5
    path.write_bytes(canonical_json(obj))
    broken = check_store(str(run)).broken
    assert broken is not None and (broken.check, broken.window) == ("signature", 1)


def test_reordered_manifests_break_the_chain(run: Path) -> None:
    a, b = run / manifest_name(0), run / manifest_name(1)
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    broken = check_store(str(run)).broken
    assert broken is not None
    assert (broken.check, broken.window, broken.artifact) == ("hash chain", 0, manifest_name(0))


def test_dropped_manifest_breaks_the_chain(run: Path) -> None:
    (run / manifest_name(0)).unlink()
    broken = check_store(str(run)).broken
    assert broken is not None and (broken.check, broken.window) == ("hash chain", 0)


def test_manifest_resigned_with_another_key_is_caught(run: Path) -> None:
    store = RunStore(str(run))
    forged = sign_manifest(OTHER, store.read_manifest(1).manifest)
    (run / manifest_name(1)).write_bytes(canonical_json(forged.to_json()))
    broken = check_store(str(run)).broken
    assert broken is not None and (broken.check, broken.window) == ("signature", 1)


def test_run_resigned_with_another_key_keeping_the_seed_is_refused(run: Path) -> None:
    # A copier signs the victim's header, seed unchanged, with its own key: the seed is not the
    # one its key derives, so the header itself is refused, whatever key is expected.
    obj = json.loads((run / "header.json").read_bytes())["header"]
    obj["pubkey"] = "0x" + bytes(OTHER.public).hex()
    signature = sign(OTHER, Domain.RUN_HEADER, obj["run_id"], record_hash(obj))
    signed = {"header": obj, "signature": "0x" + bytes(signature).hex()}
    (run / "header.json").write_bytes(canonical_json(signed))
    broken = check_store(str(run), chain=False).broken
    assert broken is not None and broken.artifact == "header.json"
    assert "run seed" in broken.reason and "not derived from the peer's key" in broken.reason


def test_whole_run_resigned_with_another_key_fails_its_records(run: Path) -> None:
    # The copier re-derives the seed for its key and rebuilds the chain consistently: the stored
    # steps then carry replay seeds and batches of another seed, which the records check catches
    # (and re-executing them, which an auditor does, would need the copier's own training).
    store = RunStore(str(run))
    original = store.read_header().header
    header = dataclasses.replace(
        original,
        pubkey=bytes(OTHER.public),
        run_seed=run_seed_for(bytes(OTHER.public), original.assignment, original.run_id),
    )
    (run / "header.json").write_bytes(canonical_json(sign_header(OTHER, header).to_json()))
    rechain(store, OTHER, header.hash())  # the forger rebuilds the whole chain consistently
    broken = check_store(str(run), chain=False).broken
    assert broken is not None and (broken.check, broken.step) == ("record", 0)
    assert "replay seed is not the one derived" in broken.reason
    broken = check_store(str(run), pubkey=bytes(KEY.public), chain=False).broken
    assert broken is not None and (broken.check, broken.artifact) == ("key", "header.json")


def test_header_edit_breaks_its_signature(run: Path) -> None:
    path = run / "header.json"
    obj = json.loads(path.read_bytes())
    obj["header"]["grad_clip"] = 2.0
    path.write_bytes(canonical_json(obj))
    broken = check_store(str(run)).broken
    assert broken is not None and (broken.check, broken.artifact) == ("signature", "header.json")


def test_missing_gradient_artifact_is_named(run: Path) -> None:
    record = RunStore(str(run)).read_manifest(0).manifest.records[2]
    (run / object_name(record.grad_root)).unlink()
    broken = check_store(str(run)).broken
    assert broken is not None and (broken.check, broken.step) == ("gradient", 2)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_flipped_byte_anywhere_is_caught(pristine: Path, data: st.DataObject) -> None:
    files = sorted(p.relative_to(pristine) for p in pristine.rglob("*") if p.is_file())
    rel = data.draw(st.sampled_from(files), label="file")
    size = (pristine / rel).stat().st_size
    offset = data.draw(st.integers(0, size - 1), label="offset")
    mask = data.draw(st.integers(1, 255), label="xor")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(pristine, run)
        raw = bytearray((run / rel).read_bytes())
        raw[offset] ^= mask
        (run / rel).write_bytes(bytes(raw))
        report = check_store(str(run))  # must report, never raise
    assert not report.ok
    assert report.broken is not None

"""The auditor's loader (audit.fetch.load_run) and verify-store walk a run's chain with the same
walker (trainer.chainwalk): on each broken store both refuse and name the same file."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from forgery import rechain

from audit.fetch import ArtifactInvalid, load_run
from proofs.codec import canonical_json
from proofs.signatures import keypair_from_seed
from trainer.data import Corpus
from trainer.loop import TrainConfig, train
from trainer.manifest import WindowManifest, sign_manifest
from trainer.store import RunStore, manifest_name
from trainer.verify import check_store

KEY = keypair_from_seed(b"trainer-chainwalk-peer-key-seed01")
OTHER = keypair_from_seed(b"trainer-chainwalk-other-key-seed1")
CONFIG = TrainConfig(
    run_id="run",
    steps=6,
    batch_size=2,
    model_config={"n_layer": 1, "n_head": 2, "d_model": 16, "context": 8},
    checkpoint_every=3,
    chunk_size=4096,
    threads=1,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "run"
    train(CONFIG, str(path), KEY, corpus=Corpus.from_paths([Path(json.__file__).parent]))
    return path


def _write(path: Path, data: bytes) -> None:
    path.chmod(0o644)
    path.write_bytes(data)


def _edit(run: Path, w: int, change: Callable[[WindowManifest], WindowManifest]) -> None:
    """Window ``w`` changed, then the whole chain re-linked and re-signed by the run's key, so
    that only the change itself is wrong."""
    store = RunStore(str(run))
    m = change(store.read_manifest(w).manifest)
    _write(run / manifest_name(w), canonical_json(sign_manifest(KEY, m).to_json()))
    rechain(store, KEY, store.read_header().header.hash())


def _sign_only(run: Path, w: int, change: Callable[[WindowManifest], WindowManifest]) -> None:
    """Window ``w`` changed and re-signed by the run's key, nothing else re-linked."""
    m = change(RunStore(str(run)).read_manifest(w).manifest)
    _write(run / manifest_name(w), canonical_json(sign_manifest(KEY, m).to_json()))


def _header_edit(run: Path) -> None:
    obj = json.loads((run / "header.json").read_bytes())
    obj["header"]["grad_clip"] = 2.0
    _write(run / "header.json", canonical_json(obj))


def _swap(run: Path) -> None:
    a, b = run / manifest_name(0), run / manifest_name(1)
    data_a, data_b = a.read_bytes(), b.read_bytes()
    _write(a, data_b)
    _write(b, data_a)


def _record(m: WindowManifest, i: int, **changes: object) -> WindowManifest:
    records = list(m.records)
    records[i] = dataclasses.replace(records[i], **changes)  # type: ignore[arg-type]
    return dataclasses.replace(m, records=tuple(records))


H, W0, W1 = "header.json", manifest_name(0), manifest_name(1)
BREAKS: dict[str, tuple[Callable[[Path], None], str]] = {
    "header edited": (_header_edit, H),
    "header not canonical": (lambda r: _write(r / H, (r / H).read_bytes() + b" "), H),
    "header unreadable": (lambda r: _write(r / H, b"{"), H),
    "manifest dropped": (lambda r: (r / W0).unlink(), W0),
    "manifests swapped": (_swap, W0),
    "manifest unreadable": (lambda r: _write(r / W1, (r / W1).read_bytes()[:-9]), W1),
    "manifest not canonical": (lambda r: _write(r / W0, b" " + (r / W0).read_bytes()), W0),
    "last manifest edited": (
        lambda r: _write(r / W1, (r / W1).read_bytes().replace(b'"loss":', b'"loss":1')),
        W1,
    ),
    "last manifest signed by another key": (
        lambda r: _write(
            r / W1,
            canonical_json(
                sign_manifest(OTHER, RunStore(str(r)).read_manifest(1).manifest).to_json()
            ),
        ),
        W1,
    ),
    "other run id": (lambda r: _edit(r, 1, lambda m: dataclasses.replace(m, run_id="x")), W1),
    "first step moved": (
        lambda r: _edit(r, 1, lambda m: dataclasses.replace(m, first_step=4)),
        W1,
    ),
    "state step moved": (
        lambda r: _edit(
            r, 0, lambda m: dataclasses.replace(m, state=dataclasses.replace(m.state, step=2))
        ),
        W0,
    ),
    "manifest prev": (
        lambda r: _sign_only(r, 1, lambda m: dataclasses.replace(m, prev=m.hash())),
        W1,
    ),
    "record prev": (lambda r: _sign_only(r, 1, lambda m: _record(m, 1, prev=m.hash())), W1),
    "replay seed not derived": (
        lambda r: _edit(r, 0, lambda m: _record(m, 1, replay_seed=m.records[1].replay_seed ^ 1)),
        W0,
    ),
}


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_loader_and_verify_store_refuse_the_same_file(
    name: str, pristine: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    brk, artifact = BREAKS[name]
    brk(run)
    broken = check_store(str(run), chain=False).broken
    assert broken is not None and broken.artifact == artifact, broken
    with pytest.raises(ArtifactInvalid) as info:
        load_run(RunStore(str(run)), derived=True)
    assert info.value.artifact == artifact, str(info.value)


def test_both_refuse_another_key_at_the_header(pristine: Path) -> None:
    broken = check_store(str(pristine), pubkey=bytes(OTHER.public), chain=False).broken
    assert broken is not None and (broken.check, broken.artifact) == ("key", "header.json")
    with pytest.raises(ArtifactInvalid, match=r"^header\.json: header names another public key"):
        load_run(RunStore(str(pristine)), expected_peer=bytes(OTHER.public))


def test_pristine_run_agrees(pristine: Path) -> None:
    report = check_store(str(pristine), pubkey=bytes(KEY.public), chain=False)
    run = load_run(RunStore(str(pristine)), expected_peer=bytes(KEY.public), derived=True)
    assert report.ok and report.final_hash == run.final_hash
    assert (report.windows, report.steps) == (len(run.manifests), run.total_steps) == (2, 6)


def test_only_verify_store_pays_for_an_earlier_manifests_signature(
    pristine: Path, tmp_path: Path
) -> None:
    # The loader verifies the last manifest's signature only (two BLS verifications per run):
    # window 0's content is bound by the hash chain under it, so a bad signature on window 0
    # alone, its content untouched, changes nothing the auditor relies on. verify-store checks
    # every signature and names it.
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    forged = sign_manifest(OTHER, RunStore(str(run)).read_manifest(0).manifest)
    _write(run / W0, canonical_json(forged.to_json()))
    broken = check_store(str(run), chain=False).broken
    assert broken is not None and (broken.check, broken.artifact) == ("signature", W0)
    assert load_run(RunStore(str(run))).final_hash == load_run(RunStore(str(pristine))).final_hash

"""trainer/ against the independently generated vectors in tests/vectors/trainer/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proofs.errors import EncodingError
from trainer.data import batch_offsets
from trainer.jsonform import canonical_json
from trainer.manifest import SignedWindowManifest, StepRecord
from trainer.seeds import replay_seed

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "trainer" / "trainer.json").read_text()
)


@pytest.mark.parametrize("case", VECTORS["seeds"])
def test_replay_seed_vectors(case: dict[str, int]) -> None:
    assert replay_seed(case["run_seed"], case["step"]) == case["replay_seed"]


@pytest.mark.parametrize("case", VECTORS["batches"])
def test_batch_offset_vectors(case: dict[str, Any]) -> None:
    got = batch_offsets(
        case["run_seed"],
        case["step"],
        batch_size=case["batch_size"],
        context=case["context"],
        corpus_size=case["corpus_size"],
    )
    assert list(got) == case["offsets"]


@pytest.mark.parametrize("case", VECTORS["records"])
def test_step_record_vectors(case: dict[str, Any]) -> None:
    record = StepRecord.from_json(case["record"])
    assert canonical_json(record.to_json()).decode() == case["canonical"]
    assert "0x" + record.hash().hex() == case["hash"]


def test_signed_manifest_vector() -> None:
    case = VECTORS["signed_manifest"]
    signed = SignedWindowManifest.from_json(case["json"])
    pubkey = bytes.fromhex(case["pubkey"][2:])
    assert "0x" + signed.manifest.hash().hex() == case["hash"]
    assert signed.manifest.records[-1].hash().hex() == case["last_record_hash"][2:]
    assert signed.verify(pubkey)
    assert not signed.verify(bytes(48))
    assert signed.manifest.end_step == 2


def test_manifest_parsing_is_strict() -> None:
    obj = json.loads(json.dumps(VECTORS["signed_manifest"]["json"]))
    obj["manifest"]["records"][0]["extra"] = 1
    with pytest.raises(EncodingError):
        SignedWindowManifest.from_json(obj)
    obj = json.loads(json.dumps(VECTORS["signed_manifest"]["json"]))
    obj["manifest"]["records"][0]["grad_root"] = "0x1234"
    with pytest.raises(EncodingError):
        SignedWindowManifest.from_json(obj)
    obj = json.loads(json.dumps(VECTORS["signed_manifest"]["json"]))
    obj["manifest"]["version"] = 2
    with pytest.raises(EncodingError):
        SignedWindowManifest.from_json(obj)

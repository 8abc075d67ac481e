"""trainer/ against the independently generated vectors in tests/vectors/trainer/."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from proofs.codec import canonical_json
from proofs.errors import EncodingError
from trainer.data import batch_offsets
from trainer.manifest import SignedWindowManifest, StepRecord
from trainer.recipe import SignedRunHeader
from trainer.schedule import Schedule
from trainer.seeds import replay_seed, run_seed_for

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


@pytest.mark.parametrize("case", VECTORS["run_seeds"])
def test_run_seed_vectors(case: dict[str, Any]) -> None:
    pubkey, assignment = bytes.fromhex(case["pubkey"][2:]), bytes.fromhex(case["assignment"][2:])
    assert run_seed_for(pubkey, assignment, case["run_id"]) == case["run_seed"]


@pytest.mark.parametrize("case", VECTORS["schedules"], ids=lambda c: c["schedule"]["kind"])
def test_schedule_vectors(case: dict[str, Any]) -> None:
    schedule = Schedule.from_json(case["schedule"])
    assert schedule.to_json() == case["schedule"]
    for point in case["lrs"]:
        got = schedule.lr_at(point["step"], point["group"])
        # The generator restates the formula on its own; math.cos may differ in its last bit.
        assert math.isclose(got, point["lr"], rel_tol=1e-12, abs_tol=0.0), point
        assert schedule.matches(point["step"], point["group"], point["lr"])


def test_signed_header_vector() -> None:
    case = VECTORS["signed_header"]
    signed = SignedRunHeader.from_json(case["json"])
    header = signed.header
    assert canonical_json(header.to_json()).decode() == case["canonical"]
    assert "0x" + header.hash().hex() == case["hash"]
    assert header.version == 2
    assert header.run_seed == run_seed_for(header.pubkey, header.assignment, header.run_id)
    assert header.optimizer.group_hyperparameters(1)["weight_decay"] == 0.0
    assert header.schedule.lr_at(10, 1) == pytest.approx(0.0015, rel=1e-12)
    assert signed.verify(bytes.fromhex(case["pubkey"][2:]))
    assert not signed.verify(bytes(48))


_DELETE = object()
_SEED = VECTORS["signed_header"]["json"]["header"]["run_seed"]


def _header_variant(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(json.dumps(VECTORS["signed_header"]["json"]))
    target = obj["header"]
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return obj


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("version",), 1, "version"),
        (("run_seed",), _SEED ^ 1, "not derived"),
        (("assignment",), "0x" + "00" * 32, "not derived"),
        (("run_id",), "vector-run2", "not derived"),
        (("run_id",), "bad/id", "run id"),
        (("optimizer", "defaults", "lr"), 0.003, "lr"),
        (("optimizer", "overrides"), [{}], "overrides"),
        (("schedule", "kind"), "linear", "kind"),
        (("schedule",), _DELETE, "schedule"),
        (("assignment",), _DELETE, "assignment"),
    ],
)
def test_header_parsing_is_strict(path: tuple[str, ...], value: Any, message: str) -> None:
    with pytest.raises(EncodingError, match=message):
        SignedRunHeader.from_json(_header_variant(path, value))


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

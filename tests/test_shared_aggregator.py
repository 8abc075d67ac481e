"""The aggregator: screening rules one hostile contribution each, the deterministic sum,
carry-over, late peers, verify-round, SIGKILL resume, and bitwise determinism across SIMD paths
and thread counts (issue #15)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_fixtures import (
    Run,
    contribution,
    inner_run,
    key,
    make_run,
    publish,
    random_delta,
    record_bytes,
    theta,
    write_raw,
)

from proofs.codec import canonical_json
from proofs.hashing import Hash32, sha256
from trainer.aggregation import RoundResult, apply_sum, outer_scale, probe_seed
from trainer.aggregator import (
    AggregatorError,
    check_round,
    close_round,
    compare_decisions,
    verify_round,
)
from trainer.compression import compress, decode_payload, encode_payload, total_entries
from trainer.roundinputs import load_run
from trainer.roundrecord import MAX_EXCLUDED, Excluded, RoundRecord, SignedRoundRecord
from trainer.sharedstore import SharedStore

NOW = 1_900_000_000.0
ROOT = Path(__file__).resolve().parent.parent


# ---- a template run, copied per test (inner runs and BLS signing are the slow part) ----------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Run:
    run = make_run(tmp_path_factory.mktemp("template"), peers=4)
    for peer in ("p0", "p1", "p2"):
        publish(run, peer, 0)
    inner_run(run, "p3", 0)  # the hostile peer's real inner run, for its hostile records
    return run


def copy_run(template: Run, dest: Path) -> Run:
    shutil.copytree(template.path, dest)
    return dataclasses.replace(
        template, path=dest, store=SharedStore(dest / "store"), headers=dict(template.headers)
    )


@pytest.fixture()
def run(template: Run, tmp_path: Path) -> Run:
    return copy_run(template, tmp_path / "run")


def close(run: Run, now: float = NOW) -> RoundRecord:
    signed = close_round(run.store, run.aggregator, now=now, corpus=run.corpus)
    assert signed is not None
    assert signed.verify(run.genesis.aggregator)
    return signed.round


def reasons(record: RoundRecord) -> dict[str, str]:
    return {e.file: e.reason for e in record.excluded}


def excluded(record: RoundRecord, file: str) -> tuple[str, str]:
    entry = next(e for e in record.excluded if e.file == file)
    return entry.reason, entry.detail


# ---- the honest round ----------------------------------------------------------------------


def test_honest_round_is_the_specified_float32_sum(run: Run) -> None:
    record = close(run)
    assert not record.excluded and not record.carried_over
    assert [i.peer for i in record.included] == sorted(
        ("p0", "p1", "p2"), key=lambda p: run.peers[p].public
    )
    # Independent oracle: numpy, the sum in key order, one float32 multiply, one subtraction.
    o = run.genesis.outer
    acc = np.zeros(run.size, dtype=np.float32)
    for inc in record.included:
        payload = run.store.read_contribution_file(inc.peer, "r000000.delta", 1 << 20)
        assert sha256(payload) == inc.delta
        d = decode_payload(
            payload, size=run.size, chunk=o.chunk, topk=o.topk, quantization=o.quantization
        )
        acc[d.offsets.numpy()] = acc[d.offsets.numpy()] + d.values.numpy()
    u = acc * np.float32(o.alpha / 3)
    expected = theta(run, 0).numpy() - u
    assert sha256(u.astype("<f4").tobytes()) == record.aggregate
    assert np.array_equal(theta(run, 1).numpy(), expected)
    assert verify_round(run.store, 0, corpus=run.corpus) == []


def test_round_closes_only_when_due(run: Run) -> None:
    g = run.genesis
    opened = load_run(run.store).opened_at(0)
    # 3 of max 4 contributions, before the deadline: not due.
    assert close_round(run.store, run.aggregator, now=opened + 1) is None
    assert run.store.rounds() == []
    assert close_round(run.store, run.aggregator, now=opened + g.screening.deadline_s) is not None
    with pytest.raises(AggregatorError, match="aggregator key"):
        close_round(run.store, key("not-the-aggregator"), now=NOW)


def test_max_contributions_close_the_round_early(run: Run) -> None:
    publish(run, "p3", 0)
    opened = load_run(run.store).opened_at(0)
    signed = close_round(run.store, run.aggregator, now=opened + 1)
    assert signed is not None and len(signed.round.included) == 4


# ---- each screening rule, its own hostile contribution --------------------------------------


def _payload(run: Run, scale: float = 1e-3, seed: int = 3) -> bytearray:
    return bytearray(encode_payload(random_delta(run, scale=scale, seed=seed)))


def _offsets_at(run: Run) -> int:
    return 24  # after the header: u16 within-chunk offsets


def _steps_at(run: Run) -> int:
    o = run.genesis.outer
    return 24 + 2 * total_entries(run.size, o.chunk, o.topk)


def _swap_first_offsets(run: Run, data: bytearray) -> bytes:
    at = _offsets_at(run)
    data[at : at + 4] = data[at + 2 : at + 4] + data[at : at + 2]
    return bytes(data)


def _repeat_first_offset(run: Run, data: bytearray) -> bytes:
    at = _offsets_at(run)
    data[at + 2 : at + 4] = data[at : at + 2]
    return bytes(data)


def _offset_out_of_range(run: Run, data: bytearray) -> bytes:
    at = _offsets_at(run)
    data[at : at + 2] = struct.pack("<H", run.genesis.outer.chunk)
    return bytes(data)


def _infinite_step(run: Run, data: bytearray) -> bytes:
    at = _steps_at(run)
    data[at : at + 4] = struct.pack("<f", float("inf"))
    return bytes(data)


def _overflowing_step(run: Run, data: bytearray) -> bytes:
    at = _steps_at(run)
    data[at : at + 4] = struct.pack("<f", 3e38)  # finite, but 127 * 3e38 is not a float32
    return bytes(data)


PAYLOAD_CASES: dict[str, tuple[Callable[[Run, bytearray], bytes], str]] = {
    "truncated": (lambda run, d: bytes(d[:-10]), "size"),
    "oversized": (lambda run, d: bytes(d) + b"\0" * 10, "size"),
    "not-k-per-chunk": (lambda run, d: bytes(d) + b"\0" * 3, "count"),
    "unsorted": (_swap_first_offsets, "unsorted"),
    "repeated": (_repeat_first_offset, "repeated"),
    "out-of-range": (_offset_out_of_range, "out-of-range"),
    "non-finite": (_infinite_step, "non-finite"),
    "overflowing-step": (_overflowing_step, "non-finite"),
    "other-k": (lambda run, d: _other_k_payload(run), "header"),
}


def _other_k_payload(run: Run) -> bytes:
    """A well-formed payload with k - 1 entries per chunk (the header says so)."""
    e = torch.randn(run.size, generator=torch.Generator().manual_seed(5)) * 1e-3
    o = run.genesis.outer
    return encode_payload(compress(e, chunk=o.chunk, topk=o.topk - 1, quantization=o.quantization))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, on decode
@pytest.mark.parametrize("case", sorted(PAYLOAD_CASES))
def test_malformed_payload_is_excluded_with_its_reason(run: Run, case: str) -> None:
    mutate, reason = PAYLOAD_CASES[case]
    publish(run, "p3", 0, payload=mutate(run, _payload(run)))
    record = close(run)
    got, detail = excluded(record, "p3/r000000.json")
    assert got == "malformed-payload"
    assert detail.startswith(reason), detail
    assert len(record.included) == 3
    assert verify_round(run.store, 0, corpus=run.corpus) == []


def test_payload_other_than_the_records_delta(run: Run) -> None:
    good = encode_payload(random_delta(run))
    signed = contribution(run, "p3", 0, good)
    run.store.put_contribution(signed, encode_payload(random_delta(run, seed=9)))
    assert excluded(close(run), "p3/r000000.json")[0] == "malformed-payload"


def test_missing_payload(run: Run) -> None:
    signed = contribution(run, "p3", 0, encode_payload(random_delta(run)))
    write_raw(run, "p3", "r000000.json", record_bytes(signed))
    assert excluded(close(run), "p3/r000000.json")[0] == "missing-payload"


def test_bad_signature(run: Run) -> None:
    # p3's key in the record, signed by someone else.
    publish(
        run, "p3", 0, d=random_delta(run), keypair=key("mallory"), pubkey=run.peers["p3"].public
    )
    reason, detail = excluded(close(run), "p3/r000000.json")
    assert reason == "signature", detail


def test_unregistered_key(run: Run) -> None:
    mallory = key("mallory")
    publish(run, "p3", 0, d=random_delta(run), keypair=mallory)  # p3's name, mallory's key
    inner_run(run, "mallory", 0, keypair=mallory)
    publish(run, "mallory", 0, d=random_delta(run), keypair=mallory)
    record = close(run)
    assert excluded(record, "p3/r000000.json")[0] == "unregistered"
    assert excluded(record, "mallory/r000000.json")[0] == "unregistered"
    assert len(record.included) == 3


@pytest.mark.parametrize(
    "field,value", [("shared_run_id", "other-run"), ("genesis", Hash32(b"\x01" * 32))]
)
def test_wrong_run(run: Run, field: str, value: object) -> None:
    publish(run, "p3", 0, d=random_delta(run), **{field: value})
    assert excluded(close(run), "p3/r000000.json")[0] == "wrong-run"


def test_round_that_does_not_exist(run: Run) -> None:
    publish(run, "p3", 0, d=random_delta(run), round=5)
    reason, detail = excluded(close(run), "p3/r000005.json")
    assert reason == "wrong-round" and "open round is 0" in detail


def test_misnamed_files(run: Run) -> None:
    signed = contribution(run, "p3", 0, encode_payload(random_delta(run)))
    write_raw(run, "p3", "r000001.json", record_bytes(signed))  # another round's name
    write_raw(run, "p1", "..r000000.json", record_bytes(signed))  # another peer's folder
    write_raw(run, "p 3", "r000000.json", record_bytes(signed))  # unsafe: never read
    record = close(run)
    assert reasons(record) == {
        "p3/r000001.json": "misnamed",
        "p1/..r000000.json": "misnamed",
        "p 3/r000000.json": "misnamed",
    }
    unsafe = next(e for e in record.excluded if e.file == "p 3/r000000.json")
    assert unsafe.file_hash == bytes(32) and unsafe.peer is None


def test_unreadable_records_and_symlinks(run: Run) -> None:
    write_raw(run, "p3", "r000000.json", b"{not json")
    write_raw(run, "p3", "r000001.json", b" " * (65 << 10))
    secret = run.path / "secret.json"
    secret.write_bytes(record_bytes(contribution(run, "p3", 0, b"x")))
    os.symlink(secret, run.path / "store" / "contributions" / "p3" / "r000002.json")
    record = close(run)
    assert {f: r for f, r in reasons(record).items()} == {
        "p3/r000000.json": "unreadable",
        "p3/r000001.json": "unreadable",
        "p3/r000002.json": "unreadable",
    }
    assert len(record.included) == 3


def test_a_flood_of_junk_files_neither_blocks_the_round_nor_crowds_out_peers(run: Run) -> None:
    folder = run.path / "store" / "contributions" / "p3"
    folder.mkdir(parents=True)
    for i in range(MAX_EXCLUDED + 10):
        (folder / f"a{i:05d}.json").write_bytes(b"x" * 300)  # sorts before every peer's file
    first = close(run)
    assert len(first.excluded) == MAX_EXCLUDED - 3 and len(first.included) == 3
    assert all(len(e.detail) <= 512 for e in first.excluded)
    second = close(run, NOW + run.genesis.screening.deadline_s)
    assert len(second.excluded) == 13 and second.carried_over


def test_missing_or_foreign_inner_run(run: Run) -> None:
    publish(run, "p3", 0, d=random_delta(run), inner_header=Hash32(b"\x02" * 32))
    record = close(run)
    assert excluded(record, "p3/r000000.json")[0] == "missing-inner-run"
    # A peer that never ran its inner steps (no header in its inner store).
    run2 = copy_run(run, run.path.parent / "run2")
    shutil.rmtree(run2.path / "store" / "rounds")
    shutil.rmtree(run2.path / "store" / "contributions" / "p3")
    shutil.rmtree(run2.path / "store" / "peers" / "p3")
    run2.headers[("p3", 0)] = run.headers[("p3", 0)]
    publish(run2, "p3", 0, d=random_delta(run2))
    assert excluded(close(run2), "p3/r000000.json")[0] == "missing-inner-run"


def test_identical_payloads_stay_included_and_are_summed_once(run: Run) -> None:
    # Excluding every copy would let any roster peer knock an honest one out of a round by
    # copying its payload; instead both stay (the audit judges each) and the sum applies it once.
    twin = copy_run(run, run.path.parent / "twin")
    copied = run.store.read_contribution_file("p0", "r000000.delta", 1 << 20)
    publish(run, "p3", 0, payload=copied)
    record = close(run)
    assert sorted(i.peer for i in record.included) == ["p0", "p1", "p2", "p3"]
    assert reasons(record) == {}
    alone = close(twin)
    assert sorted(i.peer for i in alone.included) == ["p0", "p1", "p2"]
    # The same three payloads summed (the copy at its own key's place in the order, so the float32
    # rounding may differ in the last bits), not four: counted twice, p0 would move theta by more.
    step, step_alone = theta(run, 0) - theta(run, 1), theta(twin, 0) - theta(twin, 1)
    assert torch.allclose(step, step_alone, rtol=1e-5, atol=1e-9)
    assert not torch.allclose(step, step_alone * 4 / 3, rtol=1e-2, atol=0)
    assert verify_round(run.store, 0, corpus=run.corpus) == []


def test_norm_above_factor_times_median(run: Run) -> None:
    publish(run, "p3", 0, d=random_delta(run, scale=1.0))
    record = close(run)
    entry = next(e for e in record.excluded if e.file == "p3/r000000.json")
    median = sorted(i.norm for i in record.included)[1]
    assert entry.reason == "norm" and entry.norm is not None
    assert entry.norm > run.genesis.screening.norm_factor * median
    assert verify_round(run.store, 0, corpus=run.corpus) == []


def test_probe_excludes_a_harmful_contribution(template: Run, tmp_path: Path) -> None:
    run = make_run(tmp_path / "probe", peers=4, screening={"probe": True, "probe_margin": 0.01})
    for peer in ("p0", "p1", "p2"):
        publish(run, peer, 0)
    # Plausible norm, harmful direction: an honest update reversed and doubled.
    honest = decode_payload(
        run.store.read_contribution_file("p0", "r000000.delta", 1 << 20),
        size=run.size,
        chunk=run.genesis.outer.chunk,
        topk=run.genesis.outer.topk,
        quantization=run.genesis.outer.quantization,
    )
    harmful = dataclasses.replace(
        honest,
        codes=None if honest.codes is None else -honest.codes,
        values=-2 * honest.values,  # exact: int8 values are codes * steps
        steps=None if honest.steps is None else 2 * honest.steps,
    )
    publish(run, "p3", 0, d=harmful)
    record = close(run)
    entry = next(e for e in record.excluded if e.file == "p3/r000000.json")
    assert entry.reason == "probe", record
    assert record.base_probe_loss is not None and entry.probe_loss is not None
    assert entry.probe_loss > record.base_probe_loss * 1.01
    assert all(i.probe_loss is not None for i in record.included)
    assert check_round(run.store, 0, corpus=run.corpus).problems == ()
    # The probe batch is the one the record determines.
    hashes = [i.contribution for i in record.included] + [entry.contribution]
    assert probe_seed(run.genesis.hash(), 0, list(reversed(hashes))) == probe_seed(
        run.genesis.hash(), 0, hashes
    )


# ---- rounds over time ------------------------------------------------------------------------


def test_below_min_contributions_carries_theta_over(template: Run, tmp_path: Path) -> None:
    run = make_run(tmp_path / "few", peers=3, screening={"min_contributions": 3})
    publish(run, "p0", 0)
    publish(run, "p1", 0)
    record = close(run)
    assert record.carried_over and record.aggregate == bytes(32)
    assert record.new_root == record.base_root == run.genesis.initial_root
    assert len(record.included) == 2
    assert verify_round(run.store, 0, corpus=run.corpus) == []


def test_late_contribution_is_stale_next_round_and_files_are_screened_once(run: Run) -> None:
    write_raw(run, "p3", "junk.txt", b"junk")
    first = close(run)
    assert reasons(first) == {"p3/junk.txt": "unreadable"}
    publish(run, "p3", 0, d=random_delta(run))  # late: round 0 is closed
    for peer in ("p0", "p1"):
        publish(run, peer, 1)
    publish(run, "p2", 1, d=random_delta(run), base_root=run.genesis.initial_root)
    second = close(run, NOW + run.genesis.screening.deadline_s)
    assert second.opened_at == first.closed_at and second.prev == first.hash()
    entry = next(e for e in second.excluded if e.file == "p3/r000000.json")
    assert (entry.reason, entry.built_on) == ("stale", 0)
    entry = next(e for e in second.excluded if e.file == "p2/r000001.json")
    assert (entry.reason, entry.built_on) == ("stale", 0)
    assert "p3/junk.txt" not in reasons(second)  # screened once, by round 0
    assert sorted(i.peer for i in second.included) == ["p0", "p1"]
    assert verify_round(run.store, 1, corpus=run.corpus) == []
    # The aggregator signs a wrong built_on (an analyst's staleness query reads it): caught.
    wrong = tuple(
        dataclasses.replace(e, built_on=None) if e.file == "p2/r000001.json" else e
        for e in second.excluded
    )
    signed = SignedRoundRecord.sign(run.aggregator, dataclasses.replace(second, excluded=wrong))
    (run.path / "store" / "rounds" / "r000001.json").write_bytes(canonical_json(signed.to_json()))
    problems = verify_round(run.store, 1, corpus=run.corpus)
    assert any("p2/r000001.json: built_on None, recomputed 0" in p for p in problems), problems


def test_stale_on_an_unknown_root(run: Run) -> None:
    publish(run, "p3", 0, d=random_delta(run), base_root=Hash32(b"\x03" * 32))
    entry = next(e for e in close(run).excluded if e.file == "p3/r000000.json")
    assert (entry.reason, entry.built_on) == ("stale", None)


# ---- verify-round -----------------------------------------------------------------------------


def _resign(run: Run, record: RoundRecord) -> None:
    signed = SignedRoundRecord.sign(run.aggregator, record)
    (run.path / "store" / "rounds" / "r000000.json").write_bytes(canonical_json(signed.to_json()))


def test_verify_round_detects_tampering(run: Run) -> None:
    record = close(run)
    assert verify_round(run.store, 0, corpus=run.corpus) == []
    rounds = run.path / "store" / "rounds" / "r000000.json"
    original = rounds.read_bytes()
    # Unsigned edit.
    obj = json.loads(original)
    obj["round"]["closed_at"] += 1
    rounds.write_bytes(canonical_json(obj))
    assert any("not signed" in p for p in verify_round(run.store, 0))
    # Signed by the aggregator but wrong: another root, a contribution dropped.
    _resign(run, dataclasses.replace(record, new_root=Hash32(b"\x04" * 32)))
    assert any("new_root" in p for p in verify_round(run.store, 0, corpus=run.corpus))
    dropped = record.included[2]
    false_reason = Excluded(
        file=f"{dropped.peer}/r000000.json",
        file_hash=sha256(run.store.read_contribution_file(dropped.peer, "r000000.json", 1 << 16)),
        peer=dropped.peer,
        contribution=dropped.contribution,
        reason="norm",
        detail="made up",
        built_on=None,
        norm=dropped.norm,
        probe_loss=None,
    )
    _resign(
        run, dataclasses.replace(record, included=record.included[:2], excluded=(false_reason,))
    )
    problems = verify_round(run.store, 0, corpus=run.corpus)
    assert any("recorded norm, recomputed included" in p for p in problems), problems
    # The theta object itself tampered with.
    rounds.write_bytes(original)
    obj_path = run.path / "store" / "objects" / f"{record.new_root.hex()}.vtar"
    data = bytearray(obj_path.read_bytes())
    data[-1] ^= 1
    obj_path.write_bytes(bytes(data))
    assert any("theta_1" in p for p in verify_round(run.store, 0, corpus=run.corpus))


def test_verify_round_checks_that_a_round_opens_when_the_last_closed(run: Run) -> None:
    first = close(run)
    second = close(run, NOW + run.genesis.screening.deadline_s)
    assert second.opened_at == first.closed_at < second.closed_at
    assert verify_round(run.store, 1, corpus=run.corpus) == []
    late = dataclasses.replace(second, opened_at=second.opened_at + 1)  # a shorter round claimed
    signed = SignedRoundRecord.sign(run.aggregator, late)
    (run.path / "store" / "rounds" / "r000001.json").write_bytes(canonical_json(signed.to_json()))
    problems = verify_round(run.store, 1, corpus=run.corpus)
    assert any("opened_at" in p for p in problems), problems


def test_probe_calls_at_the_margin_are_close_not_failures(run: Run) -> None:
    record = close(run)
    margin = run.genesis.screening.probe_margin
    base = 5.0
    threshold = base + margin * base

    def with_loss(loss: float) -> tuple[list[str], list[str]]:
        first = dataclasses.replace(record.included[0], probe_loss=loss)
        others = tuple(dataclasses.replace(i, probe_loss=base) for i in record.included[1:])
        recomputed = RoundResult(
            included=(first, *others),
            excluded=(),
            base_probe_loss=base,
            aggregate=record.aggregate,
            theta_next=torch.zeros(1),
            carried_over=False,
        )
        recorded = dataclasses.replace(
            record,
            base_probe_loss=base,
            included=others,
            excluded=(
                Excluded(
                    file=f"{first.peer}/r000000.json",
                    file_hash=Hash32(bytes(32)),
                    peer=first.peer,
                    contribution=first.contribution,
                    reason="probe",
                    detail="at the margin",
                    built_on=None,
                    norm=first.norm,
                    probe_loss=loss,
                ),
            ),
        )
        return compare_decisions(recorded, recomputed, run.genesis)

    problems, calls = with_loss(threshold * (1 - 1e-6))  # recomputed: just inside the margin
    assert problems == [] and len(calls) == 1 and "margin" in calls[0]
    problems, calls = with_loss(base)  # clearly fine: recording it as a probe failure is wrong
    assert calls == [] and problems == [
        f"{record.included[0].peer}/r000000.json: recorded probe, recomputed included"
    ]


# ---- SIGKILL and determinism (subprocesses) --------------------------------------------------

CLOSE_SCRIPT = """
import sys
from pathlib import Path
from proofs.signatures import keypair_from_seed
from proofs.hashing import sha256
from trainer.aggregator import close_round
from trainer.sharedstore import SharedStore
from trainer.data import Corpus
store = SharedStore(sys.argv[1])
corpus = Corpus.from_paths([sys.argv[2]])
aggregator = keypair_from_seed(sha256(b"aggregator"))
signed = close_round(store, aggregator, now=float(sys.argv[3]), corpus=corpus)
print(signed.round.new_root.hex())
"""


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    env.update(extra)
    return env


def _close_in_subprocess(run: Run, **env: str) -> subprocess.CompletedProcess[str]:
    args = [
        sys.executable,
        "-c",
        CLOSE_SCRIPT,
        str(run.path / "store"),
        str(run.path / "corpus.py"),
        str(NOW),
    ]
    return subprocess.run(
        args, env=_env(**env), capture_output=True, text=True, timeout=300, check=True
    )


@pytest.mark.parametrize("point", ["screened", "theta-written", "timer"])
def test_sigkill_then_rerun_writes_the_uninterrupted_record(
    run: Run, tmp_path: Path, point: str
) -> None:
    reference = copy_run(run, tmp_path / "reference")
    _close_in_subprocess(reference)
    expected = (reference.path / "store" / "rounds" / "r000000.json").read_bytes()

    marker = tmp_path / "paused"
    env = _env(VERITRAIN_AGGREGATOR_PAUSE=f"{point}:{marker}")
    args = [
        sys.executable,
        "-c",
        CLOSE_SCRIPT,
        str(run.path / "store"),
        str(run.path / "corpus.py"),
        str(NOW),
    ]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        if point == "timer":
            time.sleep(1.5)  # somewhere in startup, screening or the writes
        else:
            while not marker.exists():
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    path = run.path / "store" / "rounds" / "r000000.json"
    if point != "timer":
        assert not path.exists()  # killed before the commit: nothing applied yet
    if point == "theta-written":
        assert (run.path / "store" / "objects").is_dir()
    if not path.exists():
        _close_in_subprocess(run)
    assert path.read_bytes() == expected
    record = run.store.read_round(0).round
    assert sorted(i.peer for i in record.included) == ["p0", "p1", "p2"]  # each exactly once
    # Nothing left to apply: the next round is not due, and round 0 is not closed twice.
    assert close_round(run.store, run.aggregator, now=NOW) is None
    assert run.store.rounds() == [0]


DETERMINISM_SCRIPT = """
import hashlib, sys, torch
import numpy as np
from trainer.aggregation import apply_sum, aggregate_hash
from trainer.compression import compress
from trainer.roundinputs import decide, load_run, unscreened
from trainer.globalstate import load_flat, theta_artifact
from trainer.sharedstore import SharedStore
torch.set_num_threads(int(sys.argv[2]))
store = SharedStore(sys.argv[1])
state = load_run(store)
result, model = decide(store, state, 0, unscreened(store, state))
load_flat(model, result.theta_next)
print(theta_artifact(model, state.genesis.chunk_size).root.hex())
# A larger synthetic sum: index_add_ and the elementwise ops split across threads above ~32k.
# Inputs from numpy's generator: torch's randn itself rounds differently per SIMD path.
rng = np.random.default_rng(1)
def vec():
    return torch.from_numpy(rng.standard_normal(1 << 20, dtype=np.float32))
theta = vec()
ds = [compress(vec(), chunk=4096, topk=64, quantization=q)
      for q in ("int8", "float32") for _ in range(10)]
nxt, u = apply_sum(theta, ds, 0.7)
print(aggregate_hash(u).hex(), hashlib.sha256(nxt.numpy().tobytes()).hexdigest())
"""


def test_aggregation_is_bitwise_identical_across_simd_paths_and_threads(run: Run) -> None:
    outputs = set()
    for capability, threads in (("default", "1"), ("default", "2"), ("", "2"), ("", "1")):
        extra = {"ATEN_CPU_CAPABILITY": capability} if capability else {}
        env = _env(**extra)
        if not capability:
            env.pop("ATEN_CPU_CAPABILITY", None)
        args = [sys.executable, "-c", DETERMINISM_SCRIPT, str(run.path / "store"), threads]
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.add(done.stdout)
    assert len(outputs) == 1, outputs


def test_outer_scale_is_rounded_to_float32_once() -> None:
    assert outer_scale(1.0, 3) == float(np.float32(1 / 3))
    theta0 = torch.zeros(8)
    with pytest.raises(ValueError):
        apply_sum(theta0, [], 1.0)


def test_probe_threshold() -> None:
    from trainer.aggregation import probe_threshold

    assert probe_threshold(1.0, [0.5, 0.6], 0.1, 0.0) == 1.1  # margin only
    # Gains 1, 0.9, 0.8, 0.01: median 0.85, so a loss above 5 - 0.5 * 0.85 does too little.
    assert probe_threshold(5.0, [4.0, 4.1, 4.2, 4.99], 0.1, 0.5) == 5.0 - 0.5 * 0.85
    # A median gain <= 0 (or NaN losses, counted as no gain) leaves the margin rule alone.
    assert probe_threshold(5.0, [5.1, 5.2, 4.9], 0.1, 0.5) == 5.5
    assert probe_threshold(5.0, [float("nan"), float("nan"), 4.0], 0.1, 0.5) == 5.5
    limit = probe_threshold(1.0, [float("nan")], 0.1, 0.0)
    assert not float("nan") <= limit  # a NaN loss is never kept


def test_probe_gain_excludes_a_plausible_update_that_does_nothing(
    template: Run, tmp_path: Path
) -> None:
    run = make_run(
        tmp_path / "gain",
        peers=4,
        screening={"probe": True, "probe_margin": 0.05, "probe_gain": 0.5},
    )
    for peer in ("p0", "p1", "p2"):
        publish(run, peer, 0)
    honest = decode_payload(
        run.store.read_contribution_file("p0", "r000000.delta", 1 << 20),
        size=run.size,
        chunk=run.genesis.outer.chunk,
        topk=run.genesis.outer.topk,
        quantization=run.genesis.outer.quantization,
    )
    # The honest values shuffled inside each chunk (same steps, so exactly the honest norm) onto
    # the wrong coordinates: within the norm rule, and its loss stays near theta_r's (inside the
    # 5 % margin) while honest updates lower it.
    assert honest.codes is not None and honest.steps is not None
    chunk_of = honest.offsets // run.genesis.outer.chunk
    shuffle = torch.rand(chunk_of.shape, generator=torch.Generator().manual_seed(3))
    order = torch.argsort(chunk_of.to(torch.float64) * 2 + shuffle.to(torch.float64))
    codes = honest.codes[order]
    random_d = dataclasses.replace(
        honest, codes=codes, values=codes.to(torch.float32) * honest.steps[chunk_of]
    )
    publish(run, "p3", 0, d=random_d)
    record = close(run)
    reason, detail = excluded(record, "p3/r000000.json")
    assert reason == "probe" and "gain 0.5 x median" in detail, record
    entry = next(e for e in record.excluded if e.file == "p3/r000000.json")
    assert record.base_probe_loss is not None and entry.probe_loss is not None
    assert entry.probe_loss <= record.base_probe_loss * 1.05  # the margin alone keeps it
    assert sorted(i.peer for i in record.included) == ["p0", "p1", "p2"]
    assert check_round(run.store, 0, corpus=run.corpus).problems == ()

"""Batch jobs and the CLI: resumable after SIGKILL, no duplicates, hostile stores isolated,
verdicts re-checkable offline, several auditors aggregated into one signature."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from audit_runs import AUDITOR, AUDITOR2, copy_run, make_run, threads
from click.testing import CliRunner

from audit.cli import main
from audit.evidence import check_verdict
from audit.jobs import run_folder
from audit.verdict import Outcome, SignedVerdict, load_signed_verdict
from proofs.signatures import save_keypair

BEACON = "0x" + "5a" * 32
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with threads(1):
        yield


def _corpus_dir() -> str:
    from audit_runs import corpus

    return corpus().files[0].rsplit("/", 1)[0]


def _key(tmp_path: Path, keypair=AUDITOR, name: str = "auditor.key") -> str:  # type: ignore[no-untyped-def]
    path = tmp_path / name
    save_keypair(path, keypair)
    return str(path)


def _run_args(key: str, out: Path, *stores: str, count: int = 2, mode: str = "exact") -> list[str]:
    args = ["run", "--out", str(out), "--key", key, "--beacon", BEACON, "--count", str(count)]
    args += ["--mode", mode, "--corpus", _corpus_dir()]
    for s in stores:
        args += ["--store", s]
    return args


def _steps(out: Path, run_id: str) -> list[Path]:
    return sorted((out / run_id).glob("step-*.json"))


def test_cli_batch_isolates_a_broken_store_and_exits_nonzero(tmp_path: Path) -> None:
    honest = make_run("honest")
    broken = tmp_path / "broken-run"
    broken.mkdir()
    (broken / "header.json").write_text('{"header": {"run_id": "../../evil"}, "signature": 1}')
    out = tmp_path / "out"
    result = CliRunner().invoke(main, _run_args(_key(tmp_path), out, honest, str(broken)))
    assert result.exit_code == 1, result.output
    assert "audit summary" in result.output
    files = _steps(out, "honest")
    assert len(files) == 2
    assert all(load_signed_verdict(f.read_bytes()).verdict.outcome is Outcome.PASS for f in files)
    assert not (tmp_path / "evil").exists()
    # The offline checker accepts a verdict, alone and against the store.
    check = CliRunner().invoke(main, ["verify-verdict", str(files[0]), "--store", honest])
    assert check.exit_code == 0, check.output


def test_run_folder_never_escapes_out(tmp_path: Path) -> None:
    for run_id in ("../x", "a/b", "..", "ok-name_1.2"):
        folder = run_folder(tmp_path, run_id).resolve()
        assert folder.parent == tmp_path.resolve()


@pytest.mark.slow
def test_sigkill_mid_job_then_resume_redoes_nothing(tmp_path: Path) -> None:
    url = make_run("honest")
    key = _key(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "audit", *_run_args(key, out, url, count=6)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not _steps(out, "honest") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in _steps(out, "honest")}
    assert 1 <= len(before) < 6, "the job was not killed mid-way"
    result = CliRunner().invoke(main, _run_args(key, out, url, count=6))
    assert result.exit_code == 0, result.output
    after = _steps(out, "honest")
    assert [p.name for p in after] == [f"step-{s:08d}.json" for s in range(6)]
    for p in after:  # verdicts written before the kill were kept as they were
        if p.name in before:
            assert (p.stat().st_ino, p.read_bytes()) == before[p.name]
        assert load_signed_verdict(p.read_bytes()).verdict.outcome is Outcome.PASS
    assert f"{len(before)} resumed" in result.output


def test_fail_verdict_evidence_checks_against_store_and_forgery_is_caught(tmp_path: Path) -> None:
    from audit_runs import _RUNS  # the scaled run is shared with the other test modules

    url = _RUNS.get("scaled-half") or make_run("scaled-half", tamper=_halve({1, 4}))
    out = tmp_path / "out"
    args = _run_args(_key(tmp_path), out, url, count=6)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    verdicts = {
        int(p.stem.split("-")[1]): load_signed_verdict(p.read_bytes())
        for p in _steps(out, "scaled-half")
    }
    assert {s for s, v in verdicts.items() if v.verdict.outcome is Outcome.FAIL} == {1, 4}
    fail = verdicts[4]
    assert fail.verdict.evidence and check_verdict(fail, store_url=url) == []
    # The same verdict against another run's store names the mismatch.
    assert check_verdict(fail, store_url=make_run("honest"))


def _halve(steps: set[int]):  # type: ignore[no-untyped-def]
    def tamper(step: int, model) -> None:  # type: ignore[no-untyped-def]
        if step in steps:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(0.5)

    return tamper


def test_two_auditors_aggregate_into_one_signature(tmp_path: Path) -> None:
    url = make_run("honest")
    files = []
    for i, keypair in enumerate((AUDITOR, AUDITOR2)):
        out = tmp_path / f"out{i}"
        key = _key(tmp_path, keypair, f"a{i}.key")
        result = CliRunner().invoke(main, [*_run_args(key, out, url, count=1), "--no-usefulness"])
        assert result.exit_code == 0, result.output
        files += _steps(out, "honest")
    bundle = tmp_path / "bundle.json"
    agg = CliRunner().invoke(main, ["aggregate", *map(str, files), "--out", str(bundle)])
    assert agg.exit_code == 0, agg.output
    ok = CliRunner().invoke(main, ["verify-bundle", str(bundle)])
    assert ok.exit_code == 0 and "valid" in ok.output
    doc = json.loads(bundle.read_text())
    doc["verdicts"][0]["reason"] = "forged"
    bundle.write_text(json.dumps(doc))
    bad = CliRunner().invoke(main, ["verify-bundle", str(bundle)])
    assert bad.exit_code == 1


def test_sample_command_prints_detection_probability(tmp_path: Path) -> None:
    url = make_run("honest")
    args = ["sample", "--store", url, "--key", _key(tmp_path), "--beacon", BEACON]
    result = CliRunner().invoke(main, [*args, "--cheat-fraction", "0.5", "--confidence", "0.9"])
    assert result.exit_code == 0, result.output
    # 6 steps, 3 cheated: 2 samples give 1 - C(3,2)/C(6,2) = 0.8 < 0.9, 3 give 1 - 1/20 = 0.95.
    text = " ".join(result.output.split())  # rich wraps long lines
    assert "detection probability" in text and "0.9500 (exact)" in text
    steps_line = next(line for line in result.output.splitlines() if line.startswith("steps:"))
    assert len(steps_line.split()) == 1 + 3
    bad = CliRunner().invoke(main, [*args[:-2], "--beacon", "0x12", "--count", "2"])
    assert bad.exit_code == 2


def test_corrupted_copy_gives_invalid_verdict_file(tmp_path: Path) -> None:
    url = copy_run(make_run("honest"), "jobs-corrupt")
    shutil.rmtree(Path(url) / "objects")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, _run_args(_key(tmp_path), out, url, count=1))
    assert result.exit_code == 1
    (path,) = _steps(out, "honest")
    signed: SignedVerdict = load_signed_verdict(path.read_bytes())
    assert signed.verdict.outcome is Outcome.INVALID and "objects/" in signed.verdict.reason


def test_parallel_workers_audit_each_run(tmp_path: Path) -> None:
    from audit_runs import OTHER_PEER

    runs = [make_run("honest"), make_run("other-peer", keypair=OTHER_PEER)]
    out = tmp_path / "out"
    args = [*_run_args(_key(tmp_path), out, *runs, count=1), "--workers", "2", "--no-usefulness"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert len(_steps(out, "honest")) == 1 and len(_steps(out, "other-peer")) == 1


def test_invalid_verdict_evidence_rechecks_against_the_damaged_store(tmp_path: Path) -> None:
    from audit.fetch import load_run
    from trainer.store import RunStore, object_name

    url = copy_run(make_run("honest"), "jobs-flipped")
    store = RunStore(url)
    root = load_run(store, check_signatures=False).record(5).grad_root
    start, _ = store.read_index(root).leaf_range(2)
    path = Path(url) / object_name(root)
    data = bytearray(path.read_bytes())
    data[start] ^= 0xFF
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, _run_args(_key(tmp_path), out, url, count=6))
    assert result.exit_code == 1
    verdicts = [load_signed_verdict(p.read_bytes()) for p in _steps(out, "honest")]
    # Step 5 and the steps whose chain check replays it (window 3..5) are invalid, not the rest.
    invalid = {v.verdict.step for v in verdicts if v.verdict.outcome is Outcome.INVALID}
    assert invalid == {3, 4, 5}
    signed = next(v for v in verdicts if v.verdict.step == 5)
    assert "leaf 2" in signed.verdict.reason
    assert check_verdict(signed, store_url=url) == []
    # Once the store is repaired, the cited corrupt bytes are gone: the evidence no longer holds.
    data[start] ^= 0xFF
    path.write_bytes(bytes(data))
    assert check_verdict(signed, store_url=url)

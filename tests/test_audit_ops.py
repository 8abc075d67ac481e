"""Operating `audit run` safely: a job owns its workers (SIGKILL the job, none survives or writes),
one job per output folder, a dying worker loses only its own run, peer strings are never console
markup, keygen never overwrites a key, bad input is one line with exit 2, piped output keeps
hashes whole."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from audit_runs import AUDITOR, AUDITOR2, OTHER_PEER, copy_run, make_run, threads
from click.testing import CliRunner
from test_audit_jobs import BEACON, ROOT, _corpus_dir, _key, _run_args, _steps

from audit.beacon import StaticBeaconFor, parse_beacon_hex
from audit.cli import main
from audit.fetch import load_run
from audit.jobs import JobSpec, SampleSpec, run_job
from audit.outfolder import LOCK_NAME, output_lock, write_atomic
from audit.reexec import ReexecConfig
from audit.tolerance import Mode
from proofs.signatures import load_keypair
from trainer.store import RunStore


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with threads(1):
        yield


def _children(pid: int) -> dict[int, str]:
    """Live children of ``pid``: child pid -> its start time (to tell a reused pid apart)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[1] == str(pid) and fields[0] not in "ZX":
                found[int(entry.name)] = fields[19]
    return found


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (state first), or None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _alive(pid: int, started: str) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in "ZX" and fields[19] == started


def _snapshot(out: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in out.rglob("*")
        if p.is_file()
    }


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_the_job_ends_its_workers_and_a_second_job_was_refused(tmp_path: Path) -> None:
    runs = [make_run("honest"), make_run("other-peer", keypair=OTHER_PEER)]
    key = _key(tmp_path)
    out = tmp_path / "out"
    args = [*_run_args(key, out, *runs, count=6), "--workers", "2", "--no-usefulness"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(
        [sys.executable, "-m", "audit", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*/step-*.json")) and job.poll() is None:
            assert time.monotonic() < deadline, "the job wrote no verdict"
            time.sleep(0.01)
        workers = _children(job.pid)
        # Mid-batch: a second job on the same folder is refused, naming the holder.
        second = CliRunner().invoke(main, args)
        assert second.exit_code == 2, second.output
        assert f"pid {job.pid}" in second.output and "Traceback" not in second.output
        job.send_signal(signal.SIGKILL)
        job.wait()
    finally:
        job.kill()
        job.wait()
    assert workers, "the job had no worker processes when it was killed"
    deadline = time.monotonic() + 5
    while any(_alive(pid, started) for pid, started in workers.items()):
        assert time.monotonic() < deadline, f"workers outlived their job: {workers}"
        time.sleep(0.02)
    written = len(list(out.glob("*/step-*.json")))
    assert 1 <= written < 12, "the job was not killed mid-batch"
    before = _snapshot(out)
    time.sleep(1.0)
    assert _snapshot(out) == before, "something was written after the job was killed"
    # The dead job's lock file is still there, with its pid, and blocks nobody.
    assert (out / LOCK_NAME).read_text().strip() == str(job.pid)
    with output_lock(out):
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())


def _job(out: Path, urls: list[str], *, count: int, workers: int = 2) -> JobSpec:
    return JobSpec(
        urls=tuple(urls),
        out=out,
        keypair=AUDITOR,
        beacon_for=StaticBeaconFor(value=parse_beacon_hex(BEACON)),
        spec=SampleSpec(count=count),
        config=ReexecConfig(mode=Mode.EXACT, usefulness=False),
        corpus_paths=(_corpus_dir(),),
        workers=workers,
    )


def test_workers_killed_mid_batch_error_their_runs_and_the_batch_goes_on(tmp_path: Path) -> None:
    urls = [
        make_run("honest"),
        make_run("other-peer", keypair=OTHER_PEER),
        make_run("ops-third", steps=3),
    ]
    out = tmp_path / "out"
    killed: list[int] = []

    def kill_the_workers(run_id: str, count: int) -> None:
        if not killed:  # the first two runs are being audited, the third waits
            for process in multiprocessing.active_children():
                assert process.pid is not None
                os.kill(process.pid, signal.SIGKILL)
                killed.append(process.pid)

    results = run_job(_job(out, urls, count=2), on_plan=kill_the_workers)
    assert len(killed) == 2
    for dead in results[:2]:
        assert dead.error == "worker process killed by SIGKILL", dead
    third = results[2]
    assert third.ok and third.run_id == "ops-third" and third.passed == 2, third
    assert len(_steps(out, "ops-third")) == 2


def test_a_store_whose_header_kills_the_parser_is_one_errored_run(tmp_path: Path) -> None:
    hostile = Path(copy_run(make_run("honest"), "ops-nested-header"))
    (hostile / "header.json").write_text("[" * 200_000)
    out = tmp_path / "out"
    args = [*_run_args(_key(tmp_path), out, str(hostile), make_run("other-peer",
            keypair=OTHER_PEER), count=2), "--workers", "2", "--no-usefulness"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert len(_steps(out, "other-peer")) == 2
    row = next(line for line in result.output.splitlines() if str(hostile) in line)
    assert "error" in row or "invalid" in row
    assert "Traceback" not in result.output
    # The step count is known once the runs are planned: judged/total, not "0/?".
    steps = next(line for line in result.output.splitlines() if "steps judged" in line)
    assert steps.split()[-2] == "2/2", steps


def test_markup_in_peer_strings_is_printed_as_text(tmp_path: Path) -> None:
    """A store path (and so a run name, reason, file path) with rich markup in it: the batch is
    not aborted after it, and nothing is hidden."""
    hostile = tmp_path / "[" / "x] [conceal]hidden"  # a path "...[/x] [conceal]hidden"
    hostile.mkdir(parents=True)
    (hostile / "header.json").write_text('{"header": {"run_id": "[/x]"}, "signature": 1}')
    honest = make_run("honest")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, _run_args(_key(tmp_path), out, str(hostile), honest, count=1))
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no MarkupError
    assert "audit summary" in result.output
    assert len(_steps(out, "honest")) == 1  # the run after it was audited
    assert str(hostile) in result.output  # whole: not hidden, not cut, not folded
    # verify-verdict prints a path that is markup as it is.
    verdict = _steps(out, "honest")[0]
    moved = tmp_path / "[" / "x] [conceal]v" / verdict.name
    moved.parent.mkdir()
    moved.write_bytes(verdict.read_bytes())
    check = CliRunner().invoke(main, ["verify-verdict", str(moved)])
    assert check.exit_code == 0, check.output
    assert str(moved) in check.output
    # And an error naming it is one plain line.
    missing = CliRunner().invoke(main, ["verify-verdict", str(tmp_path / "[/x]" / "v.json")])
    assert missing.exit_code == 2 and "[/x]" in missing.output


def test_a_verdict_file_not_of_this_auditor_is_never_redone_or_replaced(tmp_path: Path) -> None:
    url = make_run("honest")
    out = tmp_path / "out"
    folder = out / "honest"
    folder.mkdir(parents=True)
    for step in range(6):  # whatever the sample, its slots are taken
        (folder / f"step-{step:08d}.json").write_text("{}")
    result = CliRunner().invoke(main, _run_args(_key(tmp_path), out, url, count=2))
    assert result.exit_code == 1, result.output
    assert "is not a verdict" in result.output
    assert all(p.read_text() == "{}" for p in _steps(out, "honest"))


def test_keygen_never_overwrites_a_key_unless_forced(tmp_path: Path) -> None:
    path = tmp_path / "auditor.key"
    first = CliRunner().invoke(main, ["keygen", str(path)])
    assert first.exit_code == 0, first.output
    original = path.read_bytes()
    again = CliRunner().invoke(main, ["keygen", str(path)])
    assert again.exit_code == 2 and "--force" in again.output
    assert path.read_bytes() == original
    forced = CliRunner().invoke(main, ["keygen", str(path), "--force"])
    assert forced.exit_code == 0, forced.output
    assert path.read_bytes() != original
    assert f"0x{bytes(load_keypair(path).public).hex()}" in forced.output.splitlines()[-1]
    nowhere = CliRunner().invoke(main, ["keygen", str(tmp_path / "missing" / "a.key")])
    assert nowhere.exit_code == 2 and "Traceback" not in nowhere.output
    assert len(nowhere.output.strip().splitlines()) == 1, nowhere.output
    assert not (tmp_path / "missing").exists()


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    key = _key(tmp_path)
    loose = tmp_path / "loose.key"
    loose.write_bytes(Path(key).read_bytes())
    loose.chmod(0o644)
    cases = {
        "missing store": _run_args(key, tmp_path / "o1", str(tmp_path / "no-such-run")),
        "missing folder": [*_run_args(key, tmp_path / "o2"), "--stores-under", "/nonexistent"],
        "bad beacon": [*_run_args(key, tmp_path / "o3", make_run("honest")), "--beacon", "0x1"],
        "key readable by others": _run_args(str(loose), tmp_path / "o4", make_run("honest")),
    }
    for what, args in cases.items():
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (what, result.output)
        assert "Traceback" not in result.output, what
        assert len(result.output.strip().splitlines()) == 1, (what, result.output)
        assert result.output.startswith("error: "), (what, result.output)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_piped_output_keeps_hashes_on_one_line(tmp_path: Path) -> None:
    url = make_run("honest")
    root = load_run(RunStore(url)).final_hash.hex()
    args = ["sample", "--store", url, "--key", _key(tmp_path, AUDITOR2), "--beacon", BEACON]
    result = CliRunner().invoke(main, [*args, "--count", "2"])  # CliRunner's stdout is no tty
    assert result.exit_code == 0, result.output
    assert f"commitment root (final manifest hash) 0x{root}" in result.output.splitlines()
    seed = next(line for line in result.output.splitlines() if line.startswith("sample seed"))
    assert len(seed) == len("sample seed 0x") + 64


def test_a_worker_whose_job_is_gone_commits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check behind PR_SET_PDEATHSIG, for a job that died before prctl ran: a worker whose
    recorded job is not its parent writes no verdict and leaves no temporary file."""
    import audit.workers

    monkeypatch.setattr(audit.workers, "_parent", os.getppid() + 1)
    path = tmp_path / "run" / "step-00000000.json"
    with pytest.raises(audit.workers.OrphanedWorker):
        write_atomic(path, b"{}")
    assert list(path.parent.iterdir()) == []
    monkeypatch.setattr(audit.workers, "_parent", os.getppid())
    assert write_atomic(path, b"{}") and path.read_bytes() == b"{}"

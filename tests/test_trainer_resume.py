"""Kill-and-resume: SIGKILL `python -m trainer run` mid-run, rerun, compare with an unbroken run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from proofs.signatures import keypair_from_seed, save_keypair
from trainer.cli import main
from trainer.store import RunStore

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 60, 5


def cli_args(store: Path, key: Path) -> list[str]:
    return [
        "run", "--store", str(store), "--key-file", str(key),
        "--steps", str(STEPS), "--checkpoint-every", str(EVERY), "--batch-size", "4",
        "--n-layer", "1", "--n-head", "2", "--d-model", "32", "--context", "16",
        "--threads", "1", "--corpus", str(Path(json.__file__).parent),
    ]  # fmt: skip


def snapshot(store: Path) -> dict[str, tuple[int, int, str]]:
    """inode, mtime and sha256 of every committed file (temp files excluded)."""
    out = {}
    for path in store.rglob("*"):
        if path.is_file() and not path.name.startswith(".tmp-"):
            st = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(store))] = (st.st_ino, st.st_mtime_ns, digest)
    return out


def chain_roots(store: Path) -> tuple[list[bytes], list[bytes]]:
    manifests = [m.manifest for m in RunStore(str(store)).read_manifests()]
    return [r.grad_root for m in manifests for r in m.records], [m.state.root for m in manifests]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    key = tmp_path / "peer.key"
    save_keypair(key, keypair_from_seed(b"trainer-resume-peer-key-seed-0001"))
    store = tmp_path / "killed" / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer", *cli_args(store, key)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while len(RunStore(str(store)).manifest_windows()) < 2:
        assert proc.poll() is None, "trainer exited before it could be killed"
        assert time.monotonic() < deadline, "no manifests written"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(RunStore(str(store)).manifest_windows())
    assert 2 <= committed < STEPS // EVERY, "the kill must land mid-run"
    before = snapshot(store)

    rerun = subprocess.run(
        [sys.executable, "-m", "trainer", *cli_args(store, key)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    match = re.search(r"steps (\d+)\.\.(\d+) committed", rerun.stderr)
    assert match is not None, rerun.stderr
    assert (int(match.group(1)), int(match.group(2))) == (committed * EVERY, STEPS)

    after = snapshot(store)
    assert all(after.get(name) == meta for name, meta in before.items()), "a file was rewritten"

    runner = CliRunner()
    verify = runner.invoke(main, ["verify-store", str(store)])
    assert verify.exit_code == 0, verify.output
    assert f"{STEPS // EVERY} windows, {STEPS} steps verified" in verify.output

    clean = tmp_path / "clean" / "run"
    result = runner.invoke(main, cli_args(clean, key))
    assert result.exit_code == 0, result.output
    assert chain_roots(store) == chain_roots(clean)
    assert RunStore(str(store)).read_header().header == RunStore(str(clean)).read_header().header

"""Shared runs, the peer side: a 3-peer run through the CLI, dropouts, joins, late and killed peers,
and identity-bound data (issue #15).

The model is a tiny GPT (1 layer, d_model 16, context 16) trained H=2 inner steps per round on
the ``json`` package's sources, so a round takes well under a second; the CLI tests pay mostly
for interpreter start-up.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from proofs.signatures import KeyPair, keypair_from_seed, save_keypair
from trainer.aggregator import close_round, verify_round
from trainer.checkpoint import decode_checkpoint
from trainer.cli import main
from trainer.compression import decode_payload, encode_payload, error_feedback_step
from trainer.data import Corpus
from trainer.globalstate import initial_model
from trainer.peer import (
    EF_KEY,
    ZERO32,
    Behaviour,
    PeerError,
    Status,
    join,
    run_round,
)
from trainer.sharedrun import Genesis
from trainer.sharedstore import SharedStore
from trainer.verify import check_store

REPO = Path(__file__).resolve().parents[1]
CORPUS = str(Path(json.__file__).parent)
NAMES = ("coordinator", "aggregator", "alice", "bob", "carol", "dave", "erin")
TINY = [
    "--inner-steps", "2", "--checkpoint-every", "1", "--batch-size", "4", "--n-layer", "1",
    "--n-head", "2", "--d-model", "16", "--context", "16", "--dropout", "0.0", "--chunk", "64",
    "--topk", "8", "--corpus", CORPUS,
]  # fmt: skip


def keys(folder: Path) -> dict[str, KeyPair]:
    out = {}
    for name in NAMES:
        keypair = keypair_from_seed(f"test-shared-peer-{name}-key-seed-0000".encode())
        path = folder / f"{name}.key"
        if not path.exists():
            save_keypair(path, keypair)
        out[name] = keypair
    return out


def genesis_args(folder: Path, store: Path, peers: tuple[str, ...], *extra: str) -> list[str]:
    roster = [a for p in peers for a in ("--peer", f"{p}={folder / (p + '.key')}")]
    return [
        "genesis", "--shared", str(store), "--key", str(folder / "coordinator.key"),
        "--run-id", "test-shared", "--aggregator-key", str(folder / "aggregator.key"),
        *roster, *TINY, *extra,
    ]  # fmt: skip


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def wait_for(paths: list[Path], procs: list[subprocess.Popen[str]], limit: float = 90) -> None:
    deadline = time.monotonic() + limit
    while not all(p.exists() for p in paths):
        for proc in procs:
            if proc.poll() is not None and proc.returncode != 0:
                raise AssertionError(f"a peer exited {proc.returncode}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"timed out waiting for {paths}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus.from_paths([CORPUS])


def test_three_peers_three_rounds_through_the_cli(tmp_path: Path) -> None:
    k = keys(tmp_path)
    store = tmp_path / "shared"
    peers = ("alice", "bob", "carol")
    made = cli(*genesis_args(tmp_path, store, peers, "--rounds", "3"))
    assert made.returncode == 0, made.stderr
    assert "genesis 0x" in made.stdout
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "trainer", "join", "--shared", str(store),
             "--key", str(tmp_path / f"{p}.key"), "--name", p, "--corpus", CORPUS,
             "--poll", "0.1", "--threads", "1", "--device", "cpu"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for p in peers
    ]
    try:
        for r in range(3):
            wait_for([store / "contributions" / p / f"r{r:06d}.json" for p in peers], procs)
            closed = cli("aggregate", "--shared", str(store), "--key",
                         str(tmp_path / "aggregator.key"), "--once", "--corpus", CORPUS)  # fmt: skip
            assert closed.returncode == 0, closed.stderr
            assert f"round {r}: 3 included, 0 excluded; applied" in closed.stdout
            for p in peers:  # one table row per peer: name, status, norm, probe loss, losses
                assert any(line.split()[:2] == [p, "included"] for line in
                           closed.stdout.splitlines()), closed.stdout  # fmt: skip
        outputs = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert "3 rounds" in out
    checked = cli("verify-round", "--shared", str(store), "--all", "--corpus", CORPUS)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert [line.split(":")[0] for line in checked.stdout.splitlines()] == [
        "OK round 0", "OK round 1", "OK round 2"
    ]
    table = CliRunner().invoke(main, ["rounds", "--shared", str(store)])
    assert table.exit_code == 0 and table.output.count("applied") == 3, table.output
    # Identity-bound data: each peer's inner run has its own seed, so its own batches.
    shared = SharedStore(str(store))
    batches = {
        p: [rec.batch for m in shared.inner_store(p, 1).read_manifests() for rec in m.manifest.records]
        for p in peers
    }  # fmt: skip
    assert len({tuple(map(tuple, b)) for b in batches.values()}) == 3
    assert k["alice"] != k["bob"]

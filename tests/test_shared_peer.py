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
from subprocess import PIPE
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from proofs.signatures import KeyPair, keypair_from_seed, save_keypair
from trainer.aggregator import close_round, verify_round
from trainer.checkpoint import decode_checkpoint
from trainer.cli import main
from trainer.compression import encode_payload, error_feedback_step
from trainer.data import Corpus
from trainer.globalstate import initial_model
from trainer.peer import (
    EF_KEY,
    ZERO32,
    Behaviour,
    PeerError,
    PeerProgress,
    RoundResult,
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
    keys(tmp_path)
    store = tmp_path / "shared"
    peers = ("alice", "bob", "carol")
    made = CliRunner().invoke(main, genesis_args(tmp_path, store, peers, "--rounds", "3"))
    assert made.exit_code == 0, made.output
    assert "genesis 0x" in made.output
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = []
    for p in peers:
        key = str(tmp_path / f"{p}.key")
        args = ["join", "--shared", str(store), "--key", key, "--name", p, "--corpus", CORPUS]
        options = ["--poll", "0.1", "--threads", "1", "--device", "cpu"]
        command = [sys.executable, "-m", "trainer", *args, *options]
        procs.append(
            subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=PIPE, stderr=PIPE)
        )
    aggregate = ["aggregate", "--shared", str(store), "--key", str(tmp_path / "aggregator.key")]
    try:
        for r in range(3):
            wait_for([store / "contributions" / p / f"r{r:06d}.json" for p in peers], procs)
            # The aggregator runs in this process (the peers are the concurrent processes):
            # one interpreter start-up less per round.
            closed = CliRunner().invoke(main, [*aggregate, "--once", "--corpus", CORPUS])
            assert closed.exit_code == 0, closed.output
            assert f"round {r}: 3 included, 0 excluded; applied" in closed.output
            rows = [line.split()[:2] for line in closed.output.splitlines()]
            for p in peers:  # one table row per peer: name, status, norm, probe loss, losses
                assert [p, "included"] in rows, closed.output
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
        "OK round 0",
        "OK round 1",
        "OK round 2",
    ]
    table = CliRunner().invoke(main, ["rounds", "--shared", str(store)])
    assert table.exit_code == 0 and table.output.count("applied") == 3, table.output
    # Identity-bound data: each peer's inner run has its own seed, so its own batches.
    shared = SharedStore(str(store))
    batches = {p: inner_batches(shared, p, 1) for p in peers}
    assert len(set(batches.values())) == 3, batches


def inner_batches(store: SharedStore, peer: str, r: int) -> tuple[tuple[int, ...], ...]:
    manifests = store.inner_store(peer, r).read_manifests()
    return tuple(rec.batch for m in manifests for rec in m.manifest.records)


def shared_run(
    tmp_path: Path, peers: tuple[str, ...]
) -> tuple[SharedStore, Genesis, dict[str, KeyPair]]:
    """A genesis whose rounds are due as soon as anyone closes them (deadline 1 ms)."""
    k = keys(tmp_path)
    store = tmp_path / "shared"
    made = CliRunner().invoke(main, genesis_args(tmp_path, store, peers, "--deadline", "0.001"))
    assert made.exit_code == 0, made.output
    shared = SharedStore(str(store))
    return shared, shared.read_genesis().record, k


def local_state(store: SharedStore, root: bytes) -> dict[str, torch.Tensor]:
    return decode_checkpoint(store.read_verified_leaves(root))


def test_dropouts_joins_late_and_copied_contributions(tmp_path: Path, corpus: Corpus) -> None:
    store, g, k = shared_run(tmp_path, ("alice", "bob", "carol", "dave"))
    agg = k["aggregator"]

    def peer_round(name: str, r: int, **kw: object) -> Status:
        result = run_round(store, g, k[name], name, r, corpus=corpus, threads=1, **kw)  # type: ignore[arg-type]
        return result.status

    # Round 0: alice and bob in time; round 0 closes while carol trains (she still publishes,
    # late); dave, finishing after the close too, skips publishing.
    assert peer_round("alice", 0) is Status.PUBLISHED
    assert peer_round("bob", 0) is Status.PUBLISHED
    closed: list[object] = []

    def close_mid_round(event: PeerProgress) -> None:
        if event.phase == "training" and event.step == 1 and not closed:
            closed.append(close_round(store, agg))

    assert peer_round("carol", 0, progress=close_mid_round) is Status.LATE
    r0 = store.read_round(0).record
    assert sorted(i.peer for i in r0.included) == ["alice", "bob"] and not r0.excluded
    assert peer_round("dave", 0, skip_late=True) is Status.SKIPPED_LATE
    assert not (Path(store.url) / "contributions" / "dave").exists()
    assert peer_round("alice", 0) is Status.ALREADY  # idempotent: nothing trained or written

    # Round 1: bob drops out; carol trains on alice's batches (a copier); her late round-0
    # record is screened here as stale, built on round 0.
    assert peer_round("alice", 1) is Status.PUBLISHED
    copier = Behaviour(train_on=bytes(k["alice"].public))
    assert peer_round("carol", 1, behaviour=copier) is Status.PUBLISHED
    r1 = close_round(store, agg)
    assert r1 is not None
    assert sorted(i.peer for i in r1.record.included) == ["alice", "carol"]
    [stale] = r1.record.excluded
    assert (stale.peer, stale.reason, stale.built_on) == ("carol", "stale", 0)
    # The copy is detectable from the committed inner run alone: its recorded batches are not
    # the ones its own key's run seed derives; alice's honest run verifies.
    copied = check_store(store.inner_store("carol", 1), pubkey=bytes(k["carol"].public))
    assert copied.broken is not None and "batch offsets" in copied.broken.describe()
    assert check_store(store.inner_store("alice", 1), pubkey=bytes(k["alice"].public)).ok
    assert inner_batches(store, "carol", 1) == inner_batches(store, "alice", 1)

    # Round 2: bob rejoins with the local state of his round-0 contribution; dave joins fresh.
    assert peer_round("bob", 2) is Status.PUBLISHED
    [joined] = join(store, g, k["dave"], "dave", corpus=corpus, rounds=1, poll_s=0.05, threads=1)
    assert (joined.round, joined.status) == (2, Status.PUBLISHED)
    dave = joined.contribution
    assert dave is not None
    assert dave.record.prev_contribution == ZERO32 and dave.record.prev_local_state == ZERO32
    assert dave.record.base_root == r1.record.new_root
    bob0 = store.read_contribution("bob", 0).record
    bob2 = store.read_contribution("bob", 2).record
    assert bob2.prev_contribution == bob0.hash() and bob2.prev_local_state == bob0.local_state
    # e carried over: bob's round-2 payload and new e are error feedback on his round-0 e.
    e_old = local_state(store, bob0.local_state)[EF_KEY]
    assert bool(e_old.abs().sum() > 0)
    model = initial_model(g)
    theta_2 = store.read_theta(bob2.base_root, model)
    theta_h = store.read_theta(bob2.final_state, model)
    rule = g.outer
    d, e_new = error_feedback_step(
        e_old, theta_2 - theta_h, beta=rule.beta, chunk=rule.chunk, topk=rule.topk,
        quantization=rule.quantization,
    )  # fmt: skip
    payload = (Path(store.url) / "contributions" / "bob" / "r000002.delta").read_bytes()
    assert encode_payload(d) == payload
    assert torch.equal(e_new, local_state(store, bob2.local_state)[EF_KEY])
    assert peer_round("alice", 2) is Status.PUBLISHED
    r2 = close_round(store, agg)
    assert r2 is not None and sorted(i.peer for i in r2.record.included) == ["alice", "bob", "dave"]
    for r in range(3):
        assert verify_round(store, r, corpus=corpus) == [], r
    # A payload changed after the round: verify-round names the round and exits 1.
    (Path(store.url) / "contributions" / "bob" / "r000002.delta").write_bytes(b"VTSD")
    checked = CliRunner().invoke(main, ["verify-round", "--shared", store.url, "--round", "2"])
    assert checked.exit_code == 1 and checked.output.startswith("FAIL round 2: "), checked.output


def test_wrong_key_or_corpus_is_refused_before_anything_is_written(
    tmp_path: Path, corpus: Corpus
) -> None:
    store, g, k = shared_run(tmp_path, ("alice",))
    with pytest.raises(PeerError, match="not in the roster"):
        run_round(store, g, k["bob"], "bob", 0, corpus=corpus)
    with pytest.raises(PeerError, match="registered with key"):
        run_round(store, g, k["bob"], "alice", 0, corpus=corpus)
    other = Corpus.from_paths([str(Path(json.__file__))])
    with pytest.raises(PeerError, match="not the genesis dataset"):
        join(store, g, k["alice"], "alice", corpus=other)
    bob = ["--key", str(tmp_path / "bob.key"), "--name", "bob", "--corpus", CORPUS]
    refused = CliRunner().invoke(main, ["join", "--shared", store.url, *bob])
    assert refused.exit_code == 2
    assert refused.output.startswith("error: peer 'bob' is not in the roster")
    assert not (Path(store.url) / "peers").exists()
    assert not (Path(store.url) / "contributions").exists()
    # One store, one genesis: another is refused before anything is written.
    objects = sorted((Path(store.url) / "objects").iterdir())
    again = CliRunner().invoke(main, genesis_args(tmp_path, Path(store.url), ("alice", "bob")))
    assert again.exit_code == 2 and "already holds the genesis of test-shared" in again.output
    assert sorted((Path(store.url) / "objects").iterdir()) == objects
    empty = CliRunner().invoke(main, ["rounds", "--shared", str(tmp_path / "nothing")])
    assert empty.exit_code == 2 and empty.output.startswith("error: "), empty.output


KILL_AFTER_FIRST_WINDOW = """
import os, signal, sys, time
from proofs.signatures import load_keypair
from trainer.data import Corpus
from trainer.peer import run_round
from trainer.sharedstore import SharedStore

store = SharedStore(sys.argv[1])
inner = store.inner_store("erin", 0)

def kill(event):
    if event.phase == "training" and event.step == 1:
        while not inner.manifest_windows():  # window 0 (step 0) committed by the hook
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)

run_round(store, store.read_genesis().record, load_keypair(sys.argv[2]), "erin", 0,
          corpus=Corpus.from_paths([sys.argv[3]]), threads=1, progress=kill)
"""


def test_peer_killed_mid_round_resumes_to_the_same_contribution(
    tmp_path: Path, corpus: Corpus
) -> None:
    store, g, k = shared_run(tmp_path, ("erin",))
    twin = SharedStore(str(shutil.copytree(store.url, tmp_path / "twin")))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_FIRST_WINDOW, store.url, str(tmp_path / "erin.key"),
         CORPUS],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert store.inner_store("erin", 0).manifest_windows() == [0]
    assert store.list_contribution_files() == []
    resumed = run_round(store, g, k["erin"], "erin", 0, corpus=corpus, threads=1)
    assert (resumed.status, resumed.resumed_at) == (Status.PUBLISHED, 1)
    whole = run_round(twin, g, k["erin"], "erin", 0, corpus=corpus, threads=1)
    assert (whole.status, whole.resumed_at) == (Status.PUBLISHED, 0)
    assert resumed.contribution is not None and whole.contribution is not None
    # Bit for bit the same round: theta_H, payload, local state, losses, inner manifests.
    assert resumed.contribution.record == whole.contribution.record
    # The losses of the steps before the kill are there too (read back from the inner run).
    assert len(resumed.contribution.record.losses) == g.inner_steps == 2


def test_join_abandons_mid_round_and_leaves_at_a_round_boundary(
    tmp_path: Path, corpus: Corpus
) -> None:
    store, g, k = shared_run(tmp_path, ("alice",))
    stop: list[int] = []

    def after_first_step(event: PeerProgress) -> None:
        if event.phase == "training" and event.step == 1:
            stop.append(1)

    def once(**kw: Any) -> list[RoundResult]:
        return join(store, g, k["alice"], "alice", corpus=corpus, threads=1, poll_s=0.05, **kw)

    assert once(abandon=lambda: bool(stop), progress=after_first_step) == []
    assert store.inner_store("alice", 0).manifest_windows() == [0]  # step 0 kept, resumable
    assert store.list_contribution_files() == []
    # The next join resumes round 0 at step 1, publishes, and leaves once told to.
    [result] = once(leave=lambda: bool(store.list_contribution_files()))
    assert (result.round, result.status, result.resumed_at) == (0, Status.PUBLISHED, 1)


def test_join_leaves_on_sigterm(tmp_path: Path) -> None:
    store, _, _ = shared_run(tmp_path, ("alice",))
    args = ["join", "--shared", store.url, "--key", str(tmp_path / "alice.key"), "--name",
            "alice", "--corpus", CORPUS, "--poll", "0.1", "--threads", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=REPO, env=env,
                            text=True, stdout=PIPE, stderr=PIPE)  # fmt: skip
    try:
        wait_for([Path(store.url) / "contributions" / "alice" / "r000000.json"], [proc])
        proc.send_signal(signal.SIGTERM)  # while it waits for round 0 to close
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert out.splitlines()[0].startswith("round 0: published; contribution 0x"), out
    assert out.splitlines()[1:] == ["peer alice: stopped by signal", "peer alice: 1 round"], out

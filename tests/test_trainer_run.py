"""The reference trainer end to end: determinism, verify-store, leaf-level reads, resume."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from audit.fetch import load_run
from audit.reexec import ReexecConfig, StepAuditor
from audit.tolerance import Mode
from proofs.merkle import verify_multiproof
from proofs.signatures import keypair_from_seed
from trainer.checkpoint import PARAM, decode_checkpoint, encode_checkpoint
from trainer.data import Corpus
from trainer.loop import TrainConfig, train
from trainer.store import RunStore
from trainer.verify import check_store

SMALL = {"n_layer": 1, "n_head": 2, "d_model": 32, "context": 16, "dropout": 0.1}
KEY = keypair_from_seed(b"trainer-test-peer-key-seed-000001")


def small_config(run_id: str = "run", *, steps: int = 6, every: int = 3) -> TrainConfig:
    return TrainConfig(
        run_id=run_id,
        steps=steps,
        batch_size=4,
        model_config=SMALL,
        checkpoint_every=every,
        chunk_size=4096,
        threads=1,
        warmup_steps=2,
    )


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus.from_paths([Path(json.__file__).parent])


def roots(url: str) -> tuple[list[bytes], list[bytes]]:
    """(gradient roots per step, state roots per window end) of a stored run."""
    store = RunStore(url)
    manifests = [m.manifest for m in store.read_manifests()]
    grads = [r.grad_root for m in manifests for r in m.records]
    states = [store.read_header().header.initial_state.root] + [m.state.root for m in manifests]
    return grads, states


def test_same_run_gives_identical_roots_other_run_id_differs(
    tmp_path: Path, corpus: Corpus
) -> None:
    # The seed derives from (key, assignment, run id): the same three train the same run, another
    # run id of the same peer trains other batches and other dropout masks.
    for name, run_id in (("a", "run"), ("b", "run"), ("c", "other")):
        train(small_config(run_id), str(tmp_path / name / "run"), KEY, corpus=corpus)
    grads_a, states_a = roots(str(tmp_path / "a" / "run"))
    grads_b, states_b = roots(str(tmp_path / "b" / "run"))
    grads_c, states_c = roots(str(tmp_path / "c" / "run"))
    assert len(grads_a) == 6 and len(states_a) == 3
    assert grads_a == grads_b and states_a == states_b
    assert all(x != y for x, y in zip(grads_a, grads_c, strict=True))
    assert all(x != y for x, y in zip(states_a, states_c, strict=True))
    # bitwise, tensor by tensor (nanochat-style): the final parameters of a and b are equal
    final = [
        decode_checkpoint(RunStore(str(tmp_path / n / "run")).read_artifact(s[-1])[1])
        for n, s in (("a", states_a), ("b", states_b))
    ]
    params = [k for k in final[0] if k.startswith(PARAM)]
    assert params and all(torch.equal(final[0][k], final[1][k]) for k in params)
    report = check_store(str(tmp_path / "a" / "run"), pubkey=bytes(KEY.public))
    assert report.ok, report.broken
    assert (report.windows, report.steps) == (2, 6)


def test_memory_store_and_leaf_level_reads(corpus: Corpus) -> None:
    url = "memory://trainer-test/run"
    train(small_config(), url, KEY, corpus=corpus)
    store = RunStore(url)
    record = store.read_manifest(1).manifest.records[0]
    assert record.step == 3
    index = store.read_index(record.grad_root)
    assert index.leaf_count == record.grad_leaves > 4
    wanted = [1, 3, index.leaf_count - 1]
    leaves = store.read_leaves(record.grad_root, wanted, index=index)
    proof = index.tree().multiproof(wanted)
    assert verify_multiproof(record.grad_root, leaves, proof)
    leaves[3] = leaves[3][:-1] + bytes([leaves[3][-1] ^ 1])
    assert not verify_multiproof(record.grad_root, leaves, proof)
    # the committed gradients decode and re-encode to the committed root
    grads = decode_checkpoint(store.read_artifact(record.grad_root)[1])
    assert encode_checkpoint(grads, chunk_size=4096).root == record.grad_root
    assert check_store(url).ok


def test_resume_in_process_gives_uninterrupted_roots(tmp_path: Path, corpus: Corpus) -> None:
    config = small_config(steps=7)
    train(config, str(tmp_path / "full" / "run"), KEY, corpus=corpus)
    url = str(tmp_path / "cut" / "run")
    first = train(config, url, KEY, corpus=corpus, stop_after=4)
    store_files = {p: p.stat().st_mtime_ns for p in Path(url).rglob("*") if p.is_file()}
    train(config, url, KEY, corpus=corpus, stop_after=0)  # resume and stop at once: no empty window
    second = train(config, url, KEY, corpus=corpus)
    assert (first.start_step, first.end_step, second.start_step, second.end_step) == (0, 4, 4, 7)
    assert all(p.stat().st_mtime_ns == m for p, m in store_files.items())
    grads_full, states_full = roots(str(tmp_path / "full" / "run"))
    grads_cut, states_cut = roots(url)
    assert grads_cut == grads_full
    # stopping early adds a window boundary at step 4; shared boundaries (0, 3, 6, 7) agree
    assert [states_cut[i] for i in (0, 1, 3, 4)] == states_full
    assert check_store(url).ok


def test_resume_refuses_a_different_recipe(tmp_path: Path, corpus: Corpus) -> None:
    url = str(tmp_path / "run")
    train(small_config(steps=3), url, KEY, corpus=corpus)
    before = sorted(os.listdir(url))
    other = dataclasses.replace(small_config(steps=3), lr=1e-3)
    with pytest.raises(OSError, match="different run"):
        train(other, url, KEY, corpus=corpus)
    assert sorted(os.listdir(url)) == before


def test_a_step_reexecutes_to_the_committed_gradient(tmp_path: Path, corpus: Corpus) -> None:
    # Re-execution goes through the one public re-executor, the auditor, on its strictest mode:
    # the recomputed gradient must equal the committed one bit for bit on the same machine.
    url = str(tmp_path / "run")
    train(small_config(), url, KEY, corpus=corpus)
    store = RunStore(url)
    run = load_run(store)
    assert run.total_steps == 6
    auditor = StepAuditor(store, run, corpus, ReexecConfig(mode=Mode.EXACT, usefulness=False))
    for step in (0, 4):  # a window start, and a step reached by replaying committed gradients
        result = auditor.audit(step)
        assert result.passed, (step, result.reason)
    with pytest.raises(IndexError):
        run.record(6)

"""The attack suite of issue 4, in tolerant mode: each dishonest peer is caught whenever a cheated
step is audited, and the honest step next to it passes.

Every dishonest run is made by the real reference trainer with one deliberate change before the
commit (see audit_runs.py), so the peer commits, signs and applies exactly what it cheated with.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from audit_runs import (
    BATCH,
    OTHER_PEER,
    copy_run,
    corpus,
    make_run,
    set_grads,
    stored_gradient,
    threads,
)
from torch import nn

from audit.fetch import ArtifactInvalid, load_run
from audit.reexec import ReexecConfig, StepAuditor, StepResult
from audit.tolerance import Mode
from trainer.store import RunStore, object_name

TOLERANT = ReexecConfig(mode=Mode.TOLERANT)
CHEAT = 4  # the cheated step (window 1 of a 6-step run checkpointed every 3 steps)
RUN_SEED = 7


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with threads(1):
        yield


def _audit(url: str, steps: tuple[int, ...]) -> dict[int, StepResult]:
    store = RunStore(url)
    # Signatures are checked in test_audit_reexec/test_audit_jobs; here only re-execution counts.
    auditor = StepAuditor(store, load_run(store, check_signatures=False), corpus(), TOLERANT)
    return {s: auditor.audit(s) for s in steps}


def _assert_caught(url: str, honest: int = 3) -> StepResult:
    results = _audit(url, (honest, CHEAT))
    assert results[honest].passed, results[honest].reason
    cheated = results[CHEAT]
    assert not cheated.passed, cheated.reason
    return cheated


def _recompute(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    for p in model.parameters():
        p.grad = None
    _, loss = model(inputs, targets)
    loss.backward()


def test_1_fabricated_random_gradient() -> None:
    def tamper(step: int, model: nn.Module) -> None:
        if step == CHEAT:
            gen = torch.Generator().manual_seed(1)
            for p in model.parameters():
                g = p.grad
                if g is not None:
                    noise = torch.randn(g.shape, generator=gen)
                    p.grad = noise * (g.norm() / noise.norm().clamp_min(1e-12))

    cheated = _assert_caught(make_run("fabricated", tamper=tamper))
    assert max(t.cosine for t in cheated.tensors) > 0.5  # unrelated direction


def test_2_gradient_scaled_by_half() -> None:
    def tamper(step: int, model: nn.Module) -> None:
        if step in (1, CHEAT):
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(0.5)

    cheated = _assert_caught(make_run("scaled-half", tamper=tamper))
    assert max(t.rel_l2 for t in cheated.tensors) == pytest.approx(0.5, rel=1e-3)


def test_3_gradient_on_other_data() -> None:
    def tamper(step: int, model: nn.Module) -> None:
        if step == CHEAT:
            other = corpus().batch_for_step(RUN_SEED, 1000, batch_size=BATCH, context=16)
            _recompute(model, other.inputs, other.targets)

    _assert_caught(make_run("other-data", tamper=tamper))


def test_4_skipped_step_recommits_earlier_gradient() -> None:
    saved: dict[str, torch.Tensor] = {}

    def tamper(step: int, model: nn.Module) -> None:
        if step == CHEAT - 1:
            saved.update(
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            )
        if step == CHEAT:
            set_grads(model, saved)

    _assert_caught(make_run("skipped", tamper=tamper))


def test_5_gradient_plus_one_percent_noise() -> None:
    def tamper(step: int, model: nn.Module) -> None:
        if step == CHEAT:
            gen = torch.Generator().manual_seed(5)
            for p in model.parameters():
                g = p.grad
                if g is not None:
                    noise = torch.randn(g.shape, generator=gen)
                    g.add_(noise * (0.01 * g.norm() / noise.norm().clamp_min(1e-12)))

    cheated = _assert_caught(make_run("noise-1pct", tamper=tamper))
    assert max(t.rel_l2 for t in cheated.tensors) == pytest.approx(0.01, rel=0.05)


def test_6_gradient_copied_from_another_peers_run() -> None:
    other = make_run("other-peer", keypair=OTHER_PEER)

    def tamper(step: int, model: nn.Module) -> None:
        if step == CHEAT:
            set_grads(model, stored_gradient(other, step))

    _assert_caught(make_run("copied", tamper=tamper))


def test_7_state_checkpoint_not_following_from_gradients() -> None:
    def tamper_state(next_step: int, model: nn.Module) -> None:
        if next_step == 3:  # the state checkpoint at step 3 gets weights no gradient produced
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1e-3)

    url = make_run("bad-state", tamper_state=tamper_state)
    results = _audit(url, (1, 4))
    assert not results[1].passed and "does not follow" in results[1].reason
    # Steps after the forged checkpoint re-execute consistently from it.
    assert results[4].passed, results[4].reason


def test_8_gradient_from_half_the_batch() -> None:
    def tamper(step: int, model: nn.Module) -> None:
        if step == CHEAT:
            batch = corpus().batch_for_step(RUN_SEED, step, batch_size=BATCH, context=16)
            _recompute(model, batch.inputs[: BATCH // 2], batch.targets[: BATCH // 2])

    _assert_caught(make_run("half-batch", tamper=tamper))


def test_9_stored_bytes_changed_after_commit() -> None:
    url = copy_run(make_run("honest"), "attack-9")
    store = RunStore(url)
    root = load_run(store, check_signatures=False).record(CHEAT).grad_root
    path = Path(url) / object_name(root)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x80  # last byte of the last leaf
    path.write_bytes(bytes(data))
    results = _audit(url, (1, CHEAT))
    assert results[1].passed
    cheated = results[CHEAT]
    assert cheated.invalid and object_name(root) in cheated.reason
    index = store.read_index(root)
    assert f"leaf {index.leaf_count - 1}" in cheated.reason


def test_10_manifests_replayed_from_another_run() -> None:
    url = copy_run(make_run("honest"), "attack-10")
    other = make_run("other-peer", keypair=OTHER_PEER)
    shutil.rmtree(Path(url) / "manifests")
    shutil.copytree(Path(other) / "manifests", Path(url) / "manifests")
    with pytest.raises(ArtifactInvalid, match=r"manifests/w000000\.json"):
        load_run(RunStore(url), check_signatures=False)

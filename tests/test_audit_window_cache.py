"""One StepAuditor shares a window's verified artifacts and replayed states between the steps it
audits: the results must be those of a fresh auditor per step, in any order, honest or not, and
each artifact is fetched once."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch
from audit_runs import corpus, make_run, threads
from torch import nn

from audit.fetch import VerifiedRun, load_run
from audit.reexec import ReexecConfig, StepAuditor, StepResult
from audit.tolerance import Mode
from trainer.store import RunStore

EXACT = ReexecConfig(mode=Mode.EXACT)  # chain check and usefulness on
STEPS = 9  # three windows of three steps


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with threads(1):
        yield


def _forged_state(next_step: int, model: nn.Module) -> None:
    if next_step == 6:  # the checkpoint that opens window 2 follows from no gradient
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3)


def _scaled(step: int, model: nn.Module) -> None:
    if step == 4:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(0.5)


RUNS = {
    "cache-honest": {},
    "cache-forged-state": {"tamper_state": _forged_state},
    "cache-scaled": {"tamper": _scaled},
}


def _setup(name: str) -> tuple[RunStore, VerifiedRun]:
    url = make_run(name, steps=STEPS, every=3, **RUNS[name])  # type: ignore[arg-type]
    store = RunStore(url)
    return store, load_run(store, check_signatures=False)


def _key(r: StepResult) -> tuple[object, ...]:
    return (r.passed, r.invalid, r.reason, r.recomputed_root, r.tensors, r.loss_before,
            r.loss_after)  # fmt: skip


@pytest.mark.parametrize("name", sorted(RUNS))
def test_shared_window_gives_the_results_of_a_fresh_auditor_per_step(name: str) -> None:
    store, run = _setup(name)
    alone = {s: _key(StepAuditor(store, run, corpus(), EXACT).audit(s)) for s in range(STEPS)}
    shuffled = list(range(STEPS))
    random.Random(3).shuffle(shuffled)
    for order in (list(range(STEPS)), shuffled, [8, 2, 5, 1, 7], [0, 2, 4, 5, 8]):
        for hint in (False, True):  # jobs tell the auditor their sample (StepAuditor.expect)
            with StepAuditor(store, run, corpus(), EXACT) as auditor:
                if hint:
                    auditor.expect(order)
                shared = {s: _key(auditor.audit(s)) for s in order}
            assert shared == {s: alone[s] for s in order}, (order, hint)
    # Without the chain job the held-out losses are measured on this thread, not the loss
    # thread: the same figures, bit for bit.
    here = ReexecConfig(mode=Mode.EXACT, check_chain=False)
    for s in range(STEPS):
        r = StepAuditor(store, run, corpus(), here).audit(s)
        if r.passed:
            assert (r.loss_before, r.loss_after) == alone[s][5:], s
            assert r.loss_before is not None and r.loss_after is not None
    passed = {s for s, k in alone.items() if k[0]}
    expected = {
        "cache-honest": set(range(STEPS)),
        "cache-forged-state": set(range(STEPS)) - {3, 4, 5},  # window 1 ends in the forgery
        "cache-scaled": set(range(STEPS)) - {4},
    }
    assert passed == expected[name]


def test_every_artifact_is_fetched_once_when_steps_ascend() -> None:
    store, run = _setup("cache-honest")
    with StepAuditor(store, run, corpus(), EXACT) as auditor:
        auditor.expect(range(STEPS))
        fetched = [auditor.audit(s).bytes_fetched for s in range(STEPS)]
    grads = sum(r.grad_bytes for r in run.records)
    initial = store.read_index(run.header.initial_state.root)
    # The initial state and each gradient once; later checkpoints are proven by the chain check
    # (their replayed root equals the committed one), so they are never read.
    assert sum(fetched) == sum(initial.lengths) + grads
    assert fetched[1] == fetched[2] == 0  # window 0 was fetched whole by step 0's chain check


def test_replay_leaves_its_inputs_unchanged_and_splits_exactly() -> None:
    # The cache hands the same verified gradients and states to several replays: clipping must
    # not scale them in place, and replaying 0..2 in one go or in two parts must agree bit for bit.
    from audit.fetch import decode_checked
    from trainer.replay import apply_gradients

    store, run = _setup("cache-honest")
    assert run.header.grad_clip is not None
    _, leaves = store.read_artifact(run.header.initial_state.root)
    state = decode_checked("initial", leaves)
    steps = []
    for s in (0, 1):
        _, g = store.read_artifact(run.records[s].grad_root)
        steps.append((run.records[s], decode_checked("grad", g)))
    before = ({k: v.clone() for k, v in state.items()},
              [{k: v.clone() for k, v in g.items()} for _, g in steps])  # fmt: skip
    whole = apply_gradients(run.header, state, steps)
    parts = apply_gradients(run.header, apply_gradients(run.header, state, steps[:1]), steps[1:])
    assert all(torch.equal(state[k], before[0][k]) for k in state)
    for (_, g), saved in zip(steps, before[1], strict=True):
        assert all(torch.equal(g[k], saved[k]) for k in g)
    assert whole.keys() == parts.keys()
    assert all(torch.equal(whole[k], parts[k]) for k in whole)


@pytest.mark.parametrize("order", [list(range(STEPS)), [1, 2, 4, 7, 8]])
def test_with_the_sample_known_each_update_is_replayed_once(
    order: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainer.replay

    store, run = _setup("cache-honest")
    applied: list[int] = []
    original = trainer.replay._apply_one

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        applied.append(args[4].step)  # the StepRecord
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer.replay, "_apply_one", counting)
    with StepAuditor(store, run, corpus(), EXACT) as auditor:
        auditor.expect(order)
        assert all(auditor.audit(s).passed for s in order)
    # Every window with a sampled step is replayed once to its next checkpoint, no more.
    windows = {s // 3 for s in order}
    assert sorted(applied) == [s for w in sorted(windows) for s in range(3 * w, 3 * w + 3)]


def test_a_bad_gradient_met_by_the_worker_thread_makes_the_step_invalid_and_nothing_else() -> None:
    # Step 0 passes on its own; the chain replay on the worker thread meets step 2's damaged
    # gradient: step 0 is invalid naming that artifact, as it would be without the worker, and
    # the next window still audits from its own checkpoint.
    from pathlib import Path

    from audit_runs import copy_run

    from trainer.store import object_name

    url = copy_run(make_run("cache-honest", steps=STEPS, every=3), "cache-honest-damaged")
    store = RunStore(url)
    run = load_run(store, check_signatures=False)
    name = object_name(run.record(2).grad_root)
    path = Path(url) / name
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01
    path.write_bytes(bytes(data))
    with StepAuditor(store, run, corpus(), EXACT) as auditor:
        auditor.expect([0, 1, 4])
        r0, r1, r4 = auditor.audit(0), auditor.audit(1), auditor.audit(4)
    assert r0.invalid and name in r0.reason, r0.reason
    assert r1.invalid and name in r1.reason, r1.reason
    assert r4.passed, r4.reason
    fresh = StepAuditor(store, run, corpus(), EXACT).audit(0)
    assert _key(fresh) == _key(r0)

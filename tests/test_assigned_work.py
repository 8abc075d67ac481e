"""Pay only for assigned work: each finding of issue 12 (1-3 and 7) played as a dishonest peer with
the public hook, its own key and a text editor, end to end through verify-store, the auditor and
ingest.

- copies of another peer's finished store, re-signed under a new run id and under the victim's
  run id, ingested before the victim's own run: refused, and the victim is paid;
- a re-run of another peer's seed with the copier's own key: refused by every reader;
- two runs sharing gradient roots: the later one refused, the earlier one unaffected;
- learning rates off the schedule, recorded (3x on some steps, 30x on all) or hidden (3x applied
  while the schedule's rate is recorded): the audited steps fail;
- a context, a corpus, a dropout or a learning rate outside the assignment: the trainer refuses to
  start, and a patched trainer's run is refused at ingest (never paid, never slashed);
- a header that records an optimizer default no replay uses, and a param group trained with other
  hyperparameters than the header records: refused.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from audit_runs import PEER, corpus, make_run, threads
from click.testing import CliRunner
from forgery import rechain
from test_rewards_ingest import (
    CORPUS,
    PARAMS,
    POOLS,
    STEPS,
    TINY,
    RealWorld,
    _train,
    address,
    assignment,
    key,
    real_world_once,
    register_all,
)

from audit.fetch import load_run
from audit.reexec import ReexecConfig, StepAuditor, StepResult
from audit.tolerance import Mode
from proofs.codec import canonical_json, record_hash
from proofs.errors import EncodingError
from proofs.signatures import Domain, KeyPair, sign
from rewards import ingest, policy, warehouse
from trainer import assignment as assignment_module
from trainer import hook as hook_module
from trainer import loop as loop_module
from trainer import recipe as recipe_module
from trainer.assignment import AssignmentError, assignment_text
from trainer.checkpoint import decode_checkpoint
from trainer.cli import main as trainer_main
from trainer.data import Corpus
from trainer.hook import AuditHook
from trainer.loop import TrainConfig, train
from trainer.replay import build_optimizer
from trainer.schedule import Schedule
from trainer.seeds import run_seed_for
from trainer.store import RunStore
from trainer.verify import check_store

MALLORY = key("mallory")


@pytest.fixture(scope="module")
def real_world(tmp_path_factory: pytest.TempPathFactory) -> RealWorld:
    return real_world_once(tmp_path_factory)


def _register_mallory(con: warehouse.Connection) -> None:
    warehouse.register_peer(
        con,
        peer_id="mallory",
        pubkey="0x" + MALLORY.public.hex(),
        role="trainer",
        payout_address="0x" + "ee" * 20,
    )


def _forge(src: Path, dst: Path, signer: KeyPair, run_id: str, *, rederive: bool) -> Path:
    """``src`` re-signed by ``signer`` as run ``run_id``, chain rebuilt: the header written as
    JSON by hand (the library refuses to build a header whose seed is not the signer's), the
    seed kept or re-derived for the signer's key."""
    shutil.copytree(src, dst)
    obj = json.loads((dst / "header.json").read_text())["header"]
    obj["pubkey"] = "0x" + signer.public.hex()
    obj["run_id"] = run_id
    if rederive:
        obj["run_seed"] = run_seed_for(signer.public, bytes.fromhex(obj["assignment"][2:]), run_id)
    head = record_hash(obj)
    signature = sign(signer, Domain.RUN_HEADER, run_id, head)
    (dst / "header.json").chmod(0o644)
    signed = {"header": obj, "signature": "0x" + bytes(signature).hex()}
    (dst / "header.json").write_bytes(canonical_json(signed))
    rechain(RunStore(str(dst)), signer, head, run_id=run_id)
    return dst


def _world(tmp_path: Path) -> warehouse.Connection:
    con = warehouse.connect(tmp_path / "w.duckdb", create=True)
    register_all(con)
    _register_mallory(con)
    return con


# --- finding 1: copies, re-runs and shared gradients -------------------------------------------


def test_copies_are_refused_and_the_victim_is_paid(real_world: RealWorld, tmp_path: Path) -> None:
    victim = real_world.stores / "alice-r1"
    copies = tmp_path / "copies"
    _forge(victim, copies / "new-id", MALLORY, "mallory-r1", rederive=False)
    _forge(victim, copies / "victim-id", MALLORY, "alice-r1", rederive=False)
    _forge(victim, copies / "rederived", MALLORY, "alice-r1", rederive=True)
    for name in ("new-id", "victim-id", "rederived"):
        assert not check_store(str(copies / name), chain=False).ok
    con = _world(tmp_path)
    first = ingest.ingest(con, stores=[str(copies)], verdicts_dir=None, epoch=0)  # copies first
    assert first.runs_loaded == 0
    reasons = {Path(r.source).name: r.reason for r in first.rejections}
    for name in ("new-id", "victim-id"):
        assert "not derived from the peer's key" in reasons[name], reasons[name]
    assert "replay seed is not the one derived" in reasons["rederived"], reasons["rederived"]
    then = ingest.ingest(
        con, stores=[str(victim)], verdicts_dir=str(real_world.verdicts0 / "alice-r1"), epoch=0
    )
    assert (then.runs_loaded, then.verdicts_loaded, then.rejections) == (1, STEPS, ())
    policy.compute(con, PARAMS)
    assert con.execute("SELECT run_id, peer_id FROM runs").fetchall() == [
        ("alice/alice-r1", "alice")
    ]
    rewards = con.execute("SELECT epoch, account, amount FROM rewards").fetchall()
    assert rewards == [(0, address("alice"), POOLS[0])]
    con.close()


def test_a_rerun_of_another_peers_seed_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Mallory edits her copy of the hook to use Alice's seed for Alice's run id.
    alice_seed = run_seed_for(key("alice").public, assignment().hash(), "alice-r1")
    with monkeypatch.context() as patch:
        for module in (hook_module, recipe_module, assignment_module, loop_module):
            patch.setattr(module, "run_seed_for", lambda *args: alice_seed)
        store = _train(tmp_path / "stores", "mallory", "r1")
    broken = check_store(str(store), chain=False).broken
    assert broken is not None and "not derived from the peer's key" in broken.reason
    con = _world(tmp_path)
    report = ingest.ingest(con, stores=[str(store)], verdicts_dir=None, epoch=0)
    assert report.runs_loaded == 0
    assert "not derived from the peer's key" in report.rejections[0].reason
    con.close()


def test_the_later_of_two_runs_with_one_gradient_root_is_refused(
    real_world: RealWorld, tmp_path: Path
) -> None:
    victim = real_world.stores / "alice-r1"
    root = "0x" + RunStore(str(victim)).read_manifest(0).manifest.records[0].grad_root.hex()
    con = _world(tmp_path)
    # A run bob got ingested earlier holds one of alice's gradient roots.
    con.execute(
        "INSERT INTO runs VALUES ('bob/old', 'bob', 0, $h, 'gpt', 'AdamW', $h, 2, 16, 32, 1, $h,"
        " 'cpu', 'x', 'b-0')",
        {"h": "0x" + "11" * 32},
    )
    con.execute(
        "INSERT INTO steps VALUES ('bob/old', 0, '1', $r, 1.0, 0.1, $h)",
        {"r": root, "h": "0x" + "11" * 32},
    )
    before = con.execute("SELECT * FROM runs").fetchall()
    report = ingest.ingest(con, stores=[str(victim)], verdicts_dir=None, epoch=0)
    assert report.runs_loaded == 0
    assert "was committed by run 'bob/old', ingested earlier" in report.rejections[0].reason
    assert con.execute("SELECT * FROM runs").fetchall() == before  # the earlier run unaffected
    con.close()


# --- finding 2: learning rates off the schedule ---------------------------------------------


@pytest.fixture
def _one_thread() -> Iterator[None]:
    with threads(1):
        yield


def _lr_run(
    name: str, monkeypatch: pytest.MonkeyPatch, factor: float, steps: set[int], *, record: bool
) -> str:
    """A run whose optimizer used ``factor`` times the schedule's rate on ``steps``: recorded as
    such (``record``), or with the schedule's rate in the record and the larger one applied."""
    with monkeypatch.context() as patch:
        patch.setattr(Schedule, "matches", lambda self, step, group, lr: True)  # her hook
        begin, commit = AuditHook.begin_step, AuditHook.commit

        def scale(hook: AuditHook) -> None:
            if hook.next_step in steps:
                for group in hook.optimizer.param_groups:
                    group["lr"] *= factor

        def begin_step(hook: AuditHook, step: int) -> int:
            seed = begin(hook, step)
            if record:
                scale(hook)
            return seed

        def commit_then_scale(hook: AuditHook, loss: Any, *, batch: Any = ()) -> None:
            commit(hook, loss, batch=batch)
            if not record:
                scale(hook)

        patch.setattr(AuditHook, "begin_step", begin_step)
        patch.setattr(AuditHook, "commit", commit_then_scale)
        return make_run(name)


def _audit_all(url: str, mode: Mode) -> dict[int, StepResult]:
    store = RunStore(url)
    auditor = StepAuditor(store, load_run(store), corpus(), ReexecConfig(mode=mode))
    try:
        return {s: auditor.audit(s) for s in range(6)}
    finally:
        auditor.close()


@pytest.mark.usefixtures("_one_thread")
@pytest.mark.parametrize("mode", [Mode.TOLERANT, Mode.EXACT])
def test_recorded_learning_rates_off_the_schedule_fail(
    monkeypatch: pytest.MonkeyPatch, mode: Mode
) -> None:
    some = _lr_run("lr-3x-some", monkeypatch, 3.0, {1, 4}, record=True)
    every = _lr_run("lr-30x-all", monkeypatch, 30.0, set(range(6)), record=True)
    broken = check_store(some).broken
    assert broken is not None and (broken.check, broken.step) == ("record", 1)
    assert "records lr" in broken.reason
    results = _audit_all(some, mode)
    for step in (1, 4):
        assert not results[step].passed
        assert results[step].reason.startswith("step record: param group 0 records lr")
    results = _audit_all(every, mode)
    assert not any(r.passed for r in results.values())
    assert all("records lr" in r.reason for r in results.values())


@pytest.mark.usefixtures("_one_thread")
def test_a_larger_rate_applied_behind_a_scheduled_record_breaks_the_chain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = _lr_run("lr-3x-hidden", monkeypatch, 3.0, {4}, record=False)
    broken = check_store(url).broken
    assert broken is not None and (broken.check, broken.window) == ("gradient-to-state chain", 1)
    results = _audit_all(url, Mode.TOLERANT)
    assert results[0].passed and results[2].passed, (results[0].reason, results[2].reason)
    assert not results[4].passed  # the step itself re-executes; its window's chain does not hold


# --- finding 3: a recipe outside the assignment ----------------------------------------------


def _off_recipe(name: str) -> dict[str, Any]:
    other = Path(CORPUS[0]).parent / "merkle.py"
    return {
        "context": {"model_config": {**TINY, "context": 8}},
        "dropout": {"model_config": {**TINY, "dropout": 0.0}},
        "corpus": {"corpus": (str(other),)},
        "lr": {"lr": 0.03},
    }[name]


@pytest.mark.parametrize("change", ["context", "dropout", "corpus", "lr"])
def test_a_recipe_outside_the_assignment_is_never_paid(
    change: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = TrainConfig.from_assignment(assignment(), run_id=f"mallory-{change}", threads=1)
    changes = _off_recipe(change)
    data = Corpus.from_paths(changes.pop("corpus", CORPUS))
    config = dataclasses.replace(base, **changes)
    if change == "lr":  # the rate comes from the schedule: a peer who wants another edits that
        schedule = dataclasses.replace(assignment().schedule, lr=0.03)
        monkeypatch.setattr(TrainConfig, "schedule", property(lambda self: schedule))
    store = tmp_path / "stores" / f"mallory-{change}"
    # The trainer checks the recipe against the assignment before it writes anything.
    if change != "corpus":  # the corpus is only known to train(): checked there too
        with pytest.raises(AssignmentError, match="run is not the assigned work"):
            train(config, str(store), MALLORY, corpus=data)
        assert not store.exists()
    # A peer who removes that check trains, signs, and is refused at ingest with the difference.
    monkeypatch.setattr("trainer.assignment.Assignment.check", lambda self, header: None)
    train(config, str(store), MALLORY, corpus=data)
    assert check_store(str(store)).ok  # signed and consistent: only the assignment refuses it
    con = _world(tmp_path)
    report = ingest.ingest(con, stores=[str(store)], verdicts_dir=None, epoch=0)
    assert report.runs_loaded == 0
    reason = report.rejections[0].reason
    assert reason.startswith("not epoch 0's assigned work"), reason
    expected = {
        "context": "model context 8, assigned 16",
        "dropout": "model dropout 0.0, assigned 0.1",
        "corpus": "dataset 0x",
        "lr": "schedule {",
    }[change]
    assert expected in reason, reason
    assert con.execute("SELECT count(*) FROM runs").fetchall() == [(0,)]
    con.close()


def test_trainer_cli_refuses_recipe_flags_with_an_assignment(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(assignment_text(assignment()))
    args = ["run", "--store", str(tmp_path / "s"), "--key-file", str(tmp_path / "k"), "--new-key"]
    result = CliRunner().invoke(trainer_main, [*args, "--assignment", str(path), "--lr", "0.03"])
    assert result.exit_code == 2, result.output
    assert "--lr: the assignment fixes the recipe" in result.output
    assert not (tmp_path / "s").exists()


# --- finding 7: signed fields nobody checked ------------------------------------------------------


def test_an_optimizer_default_lr_in_the_header_is_refused(tmp_path: Path) -> None:
    url = Path(make_run("honest-lr-field"))
    store = tmp_path / "run"
    shutil.copytree(url, store)
    obj = json.loads((store / "header.json").read_text())["header"]
    obj["optimizer"]["defaults"]["lr"] = 0.5
    signature = sign(PEER, Domain.RUN_HEADER, obj["run_id"], record_hash(obj))
    (store / "header.json").chmod(0o644)
    signed = {"header": obj, "signature": "0x" + bytes(signature).hex()}
    (store / "header.json").write_bytes(canonical_json(signed))
    broken = check_store(str(store), chain=False).broken
    assert broken is not None and "optimizer defaults record no lr" in broken.reason


@pytest.mark.usefixtures("_one_thread")
def test_a_param_group_trained_with_other_hyperparameters_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    start = AuditHook.start

    def start_then_drop_weight_decay(hook: AuditHook) -> int:
        step = start(hook)  # the header records weight_decay 0.1...
        for group in hook.optimizer.param_groups:
            group["weight_decay"] = 0.0  # ...and the peer trains without it
        return step

    with monkeypatch.context() as patch:
        patch.setattr(AuditHook, "start", start_then_drop_weight_decay)
        url = make_run("no-weight-decay")
    broken = check_store(url).broken
    assert broken is not None and (broken.check, broken.window) == ("gradient-to-state chain", 0)
    # A replay never starts from a state whose param groups differ from the header's.
    store = RunStore(url)
    header = store.read_header().header
    state = decode_checkpoint(store.read_artifact(store.read_manifest(0).manifest.state.root)[1])
    with pytest.raises(EncodingError, match=r"weight_decay 0\.0 in the state checkpoint"):
        build_optimizer(header, state)


@pytest.mark.usefixtures("_one_thread")
def test_a_made_up_training_loss_fails_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    commit = AuditHook.commit

    def halve_loss(hook: AuditHook, loss: Any, *, batch: Any = ()) -> None:
        commit(hook, loss * 0.5 if hook.next_step == 4 else loss, batch=batch)

    with monkeypatch.context() as patch:
        patch.setattr(AuditHook, "commit", halve_loss)
        url = make_run("half-loss")
    assert check_store(url).ok  # signed and consistent
    results = _audit_all(url, Mode.TOLERANT)
    assert results[3].passed, results[3].reason
    assert not results[4].passed and results[4].reason.startswith("step record: loss")


def test_a_window_never_crosses_a_checkpoint_multiple() -> None:
    m = RunStore(make_run("honest-lr-field")).read_manifest(1).manifest  # steps 3..5, every 3
    assert not m.spans_checkpoint(3)
    assert m.spans_checkpoint(2)  # 3..5 crosses 4
    assert dataclasses.replace(m, first_step=2).spans_checkpoint(3)  # 2..4 crosses 3
    assert dataclasses.replace(m, records=()).spans_checkpoint(3)  # empty

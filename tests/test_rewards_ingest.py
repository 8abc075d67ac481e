"""Ingest from real runs (the reference trainer, tiny model) and real verdicts (audit batch jobs).

The world, built once per session (~40 s on 2 cores, mostly BLS in pure Python):
  alice, bob: honest runs; carol: honest training, then a byte of a committed gradient is changed
  in her store (the auditor calls it invalid); dave: a run by an unregistered key; eve: a run whose
  last manifest carries a signature over another message. aud1 audits every step of alice, bob and
  carol; aud2 audits two steps of alice and one of alice's second run (which stays pending).
  aud3 is not registered.
  Epoch 0 ingests every store and aud1's verdicts on alice and carol, but only one of bob's.
  Epoch 1 ingests bob's other verdicts, aud2's (those on alice's first run as one bundle under an
  aggregate signature), one verdict whose text was changed after signing,
  and one signed by aud3.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit.beacon import Beacon
from proofs.errors import VeritrainError
from proofs.signatures import KeyPair, keypair_from_seed
from rewards import ingest, payouts, policy, warehouse
from rewards.assignments import assign
from rewards.cli import main
from rewards.ingest import IngestError
from trainer.assignment import Assignment, read_assignment

CORPUS = (str(Path(__file__).resolve().parents[1] / "proofs" / "hashing.py"),)
TINY = {"n_layer": 1, "n_head": 2, "d_model": 16, "context": 16}
STEPS = 4
PARAMS = policy.PolicyParams(cheat_fraction=0.25, confidence=0.7, slash_bps=1_000)
POOLS = (10**21, 3 * 10**20)
NAMES = ("alice", "bob", "carol", "dave", "eve", "aud1", "aud2", "aud3")


def key(name: str) -> KeyPair:
    return keypair_from_seed(name.encode().ljust(32, b"."))


def address(name: str) -> str:
    return "0x" + f"{NAMES.index(name) + 1:040x}"


@dataclass(frozen=True)
class RealWorld:
    root: Path
    stores: Path
    verdicts0: Path
    verdicts1: Path
    db: Path  # the warehouse after both batches and compute()
    reports: tuple[ingest.IngestReport, ingest.IngestReport]


@functools.cache
def assignment() -> Assignment:
    """The work both epochs pay for: the tiny GPT on CORPUS."""
    from trainer.data import Corpus
    from trainer.loop import TrainConfig, reference_assignment

    recipe = TrainConfig(
        run_id="recipe", steps=STEPS, batch_size=2, model_config=TINY, warmup_steps=1
    )
    return reference_assignment(
        recipe, Corpus.from_paths(CORPUS).commitment(), checkpoint_every=(1, 10)
    )


def _train(stores: Path, name: str, run: str = "r1", **changes: Any) -> Path:
    from trainer.data import Corpus
    from trainer.loop import TrainConfig, train

    config = TrainConfig.from_assignment(
        assignment(), run_id=f"{name}-{run}", checkpoint_every=2, threads=1
    )
    config = dataclasses.replace(config, **changes)
    store = stores / f"{name}-{run}"
    train(config, str(store), key(name), corpus=Corpus.from_paths(CORPUS))
    return store


def _audit(stores: Path, runs: list[str], out: Path, auditor: str, count: int) -> None:
    from audit.jobs import JobSpec, SampleSpec, run_job
    from audit.reexec import ReexecConfig

    job = JobSpec(
        urls=tuple(str(stores / r) for r in runs),
        out=out,
        keypair=key(auditor),
        beacon_for=_beacon,
        spec=SampleSpec(count=count),
        config=ReexecConfig(),
        corpus_paths=CORPUS,
    )
    run_job(job)


def _beacon(url: str) -> Beacon:
    return Beacon(value=b"veritrain-test-beacon-0123456789", source="cli")


def _corrupt_gradient(store: Path, step: int) -> None:
    from trainer.store import RunStore

    windows = RunStore(str(store)).read_manifests()
    record = next(r for w in windows for r in w.manifest.records if r.step == step)
    artifact = store / "objects" / f"{record.grad_root.hex()}.vtar"
    data = bytearray(artifact.read_bytes())
    data[-1] ^= 0x01
    artifact.chmod(0o644)
    artifact.write_bytes(bytes(data))


def _forge_last_manifest(store: Path) -> None:
    header = json.loads((store / "header.json").read_text())
    last = sorted((store / "manifests").iterdir())[-1]
    signed = json.loads(last.read_text())
    signed["signature"] = header["signature"]  # a valid signature, over another message
    last.chmod(0o644)
    last.write_text(json.dumps(signed))


def _tamper_verdict(src: Path, dst: Path) -> None:
    signed = json.loads(src.read_text())
    signed["verdict"]["reason"] = signed["verdict"]["reason"] + " (edited)"
    dst.write_text(json.dumps(signed))


def _resign(src: Path, dst: Path, signer: str, **changes: object) -> None:
    from audit.verdict import SignedVerdict, sign_verdict

    verdict = SignedVerdict.from_json(json.loads(src.read_text())).verdict
    verdict = dataclasses.replace(verdict, **changes)  # type: ignore[arg-type]
    dst.write_text(json.dumps(sign_verdict(key(signer), verdict).to_json()))


def _bundle(files: list[Path], dst: Path) -> None:
    from audit.bundle import aggregate_verdicts
    from audit.verdict import SignedVerdict

    signed = [SignedVerdict.from_json(json.loads(f.read_text())) for f in files]
    dst.write_text(json.dumps(aggregate_verdicts(signed).to_json()))


def register_all(con: warehouse.Connection) -> None:
    for epoch, pool in enumerate(POOLS):
        policy.open_epoch(con, epoch, pool)
        assign(con, epoch, assignment())
    for name in ("alice", "bob", "carol", "eve"):
        warehouse.register_peer(
            con,
            peer_id=name,
            pubkey="0x" + key(name).public.hex(),
            role="trainer",
            payout_address=address(name),
        )
    for name in ("aud1", "aud2"):
        warehouse.register_peer(
            con,
            peer_id=name,
            pubkey="0x" + key(name).public.hex(),
            role="auditor",
            payout_address=None,
        )
    warehouse.record_stake(con, peer_id="carol", epoch=0, amount=5_000)
    warehouse.record_stake(con, peer_id="alice", epoch=0, amount=5_000)


def _build(root: Path) -> RealWorld:
    stores, audits = root / "stores", root / "audits"
    for name in ("alice", "bob", "carol", "dave", "eve"):
        _train(stores, name)
    _train(stores, "alice", "r2")
    _corrupt_gradient(stores / "carol-r1", STEPS - 1)
    _forge_last_manifest(stores / "eve-r1")
    _audit(stores, ["alice-r1", "bob-r1", "carol-r1"], audits / "aud1", "aud1", STEPS)
    _audit(stores, ["alice-r1"], audits / "aud2", "aud2", 2)
    _audit(stores, ["alice-r2"], audits / "aud2", "aud2", 1)
    v0, v1 = root / "verdicts0", root / "verdicts1"
    shutil.copytree(audits / "aud1" / "alice-r1", v0 / "alice-r1")
    shutil.copytree(audits / "aud1" / "carol-r1", v0 / "carol-r1")
    bob = sorted((audits / "aud1" / "bob-r1").glob("step-*.json"))
    (v0 / "bob-r1").mkdir()
    shutil.copy(bob[0], v0 / "bob-r1" / bob[0].name)
    (v1 / "bob-r1").mkdir(parents=True)
    for path in bob[1:]:
        shutil.copy(path, v1 / "bob-r1" / path.name)
    shutil.copytree(audits / "aud2" / "alice-r2", v1 / "aud2" / "alice-r2")
    aud2_files = sorted((audits / "aud2" / "alice-r1").glob("step-*.json"))
    _bundle(aud2_files, v1 / "aud2" / "alice-r1-bundle.json")
    _tamper_verdict(aud2_files[0], v1 / "tampered.json")
    _resign(bob[0], v1 / "aud3.json", "aud3", auditor=key("aud3").public)

    db = root / "world.duckdb"
    con = warehouse.connect(db, create=True)
    register_all(con)
    r0 = ingest.ingest(con, stores=[str(stores)], verdicts_dir=str(v0), epoch=0)
    r1 = ingest.ingest(con, stores=[], verdicts_dir=str(v1), epoch=1)
    policy.compute(con, PARAMS)
    con.close()
    return RealWorld(root=root, stores=stores, verdicts0=v0, verdicts1=v1, db=db, reports=(r0, r1))


_CACHE: dict[str, RealWorld] = {}


def real_world_once(factory: pytest.TempPathFactory) -> RealWorld:
    """The session's real world, built on first use (shared with tests/test_rewards_queries.py)."""
    if "world" not in _CACHE:
        _CACHE["world"] = _build(factory.mktemp("real-world"))
    return _CACHE["world"]


@pytest.fixture(scope="session")
def real_world(tmp_path_factory: pytest.TempPathFactory) -> RealWorld:
    return real_world_once(tmp_path_factory)


@pytest.fixture
def fresh(tmp_path: Path) -> warehouse.Connection:
    con = warehouse.connect(tmp_path / "fresh.duckdb", create=True)
    register_all(con)
    return con


def snapshot(con: warehouse.Connection) -> dict[str, list[tuple[object, ...]]]:
    tables = [
        r[0]
        for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
            " AND table_type = 'BASE TABLE' ORDER BY 1"
        ).fetchall()
    ]
    return {t: sorted(con.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}


def test_batches_load_what_verifies_and_reject_the_rest(real_world: RealWorld) -> None:
    r0, r1 = real_world.reports
    assert (r0.runs_loaded, r0.verdicts_loaded, r0.duplicates) == (4, 9, 0)
    reasons = {Path(r.source).name: r.reason for r in r0.rejections}
    assert set(reasons) == {"dave-r1", "eve-r1"}
    assert reasons["dave-r1"].startswith("unknown peer")
    assert "signature does not verify" in reasons["eve-r1"]
    assert (r1.runs_loaded, r1.verdicts_loaded) == (0, 6)
    reasons = {Path(r.source).name: r.reason for r in r1.rejections}
    assert set(reasons) == {"tampered.json", "aud3.json"}
    assert "signature does not verify" in reasons["tampered.json"]
    assert reasons["aud3.json"].startswith("unknown auditor")
    con = warehouse.connect_read_only(real_world.db)
    assert con.execute("SELECT count(*) FROM rejections").fetchall() == [(4,)]
    assert con.execute("SELECT count(*) FROM steps").fetchall() == [(4 * STEPS,)]
    # The bundle's two verdicts (one aggregate signature) were loaded like single ones.
    by_aud2 = (
        "SELECT run_id, count(*) FROM verdicts WHERE auditor_id = 'aud2' GROUP BY 1 ORDER BY 1"
    )
    assert con.execute(by_aud2).fetchall() == [("alice/alice-r1", 2), ("alice/alice-r2", 1)]
    con.close()


def test_policy_on_the_real_runs(real_world: RealWorld) -> None:
    con = warehouse.connect_read_only(real_world.db)
    states = dict(
        con.execute(
            "SELECT run_id, state || ':' || coalesce(decided_epoch::VARCHAR, '-') FROM run_outcomes"
        ).fetchall()
    )
    assert states == {
        "alice/alice-r1": "verified:0",
        "alice/alice-r2": "pending:-",
        "bob/bob-r1": "verified:1",
        "carol/carol-r1": "failed:0",
    }
    # The changed gradient is step 3's; steps 2 and 3 share its window (checkpoint_every=2), and
    # auditing either one reads it, so both are invalid, and steps 0-1 pass.
    outcomes = con.execute(
        "SELECT step, outcome FROM verdicts WHERE run_id = 'carol/carol-r1' ORDER BY step"
    ).fetchall()
    assert outcomes == [(0, "pass"), (1, "pass"), (2, "invalid"), (3, "invalid")]
    rewards = con.execute("SELECT epoch, account, amount FROM rewards ORDER BY epoch").fetchall()
    assert rewards == [(0, address("alice"), POOLS[0]), (1, address("bob"), POOLS[1])]
    assert con.execute("SELECT peer_id, stake_before, amount FROM slashes").fetchall() == [
        ("carol", 5_000, 500)
    ]
    pending = con.execute("SELECT pending_runs FROM epoch_summaries ORDER BY epoch").fetchall()
    assert pending == [(2,), (1,)]
    con.close()
    payout = payouts.epoch_payout(real_world.db, 1)
    assert payout.entries == ((address("alice"), POOLS[0]), (address("bob"), POOLS[1]))


def test_ingesting_again_changes_nothing(real_world: RealWorld, tmp_path: Path) -> None:
    db = tmp_path / "again.duckdb"
    shutil.copy(real_world.db, db)
    con = warehouse.connect(db)
    before = snapshot(con)
    again = ingest.ingest(
        con, stores=[str(real_world.stores)], verdicts_dir=str(real_world.verdicts0)
    )
    assert (again.runs_loaded, again.verdicts_loaded) == (0, 0)
    assert again.duplicates == 4 + 9
    assert snapshot(con) == before
    con.close()


def test_cli_ingest_and_rejections_are_reported(real_world: RealWorld, tmp_path: Path) -> None:
    db = tmp_path / "cli.duckdb"
    shutil.copy(real_world.db, db)
    res = CliRunner().invoke(
        main, ["ingest", "--db", str(db), "--verdicts", str(real_world.verdicts1), "--epoch", "1"]
    )
    assert res.exit_code == 3, res.output  # some records rejected
    assert "0 runs, 0 verdicts loaded; 6 duplicates; 2 rejected" in res.stdout


def test_strict_batch_with_a_bad_record_changes_nothing(
    real_world: RealWorld, fresh: warehouse.Connection, tmp_path: Path
) -> None:
    before = snapshot(fresh)
    folder = tmp_path / "v"
    folder.mkdir()
    shutil.copy(real_world.verdicts1 / "tampered.json", folder / "tampered.json")
    with pytest.raises(IngestError, match="strict: 1 record"):
        ingest.ingest(
            fresh,
            stores=[str(real_world.stores / "alice-r1")],
            verdicts_dir=str(folder),
            strict=True,
        )
    assert snapshot(fresh) == before


def test_a_crash_mid_batch_changes_nothing(
    real_world: RealWorld, fresh: warehouse.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(fresh)

    def crash(batch: object, con: object) -> int:
        raise KeyboardInterrupt("simulated crash after the runs were written")

    monkeypatch.setattr(ingest, "_write_verdicts", crash)
    with pytest.raises(KeyboardInterrupt):
        ingest.ingest(
            fresh,
            stores=[str(real_world.stores / "alice-r1")],
            verdicts_dir=str(real_world.verdicts0 / "alice-r1"),
        )
    assert snapshot(fresh) == before
    monkeypatch.undo()
    report = ingest.ingest(
        fresh,
        stores=[str(real_world.stores / "alice-r1")],
        verdicts_dir=str(real_world.verdicts0 / "alice-r1"),
    )
    assert (report.runs_loaded, report.verdicts_loaded) == (1, STEPS)


def test_conflicting_unknown_run_and_malformed_verdicts(
    real_world: RealWorld, tmp_path: Path
) -> None:
    db = tmp_path / "c.duckdb"
    shutil.copy(real_world.db, db)
    con = warehouse.connect(db)
    folder = tmp_path / "v"
    folder.mkdir()
    alice0 = sorted((real_world.verdicts0 / "alice-r1").glob("step-*.json"))[0]
    _resign(alice0, folder / "conflict.json", "aud1", reason="a different finding")
    _resign(alice0, folder / "norun.json", "aud1", run_id="nobody-r9")
    _resign(alice0, folder / "recipe.json", "aud1", step=1, recipe_hash=b"\x07" * 32)
    (folder / "truncated.json").write_text(alice0.read_text()[:200])
    (folder / "not-a-verdict.json").write_text('{"hello": 1}')
    before = snapshot(con)
    report = ingest.ingest(con, stores=[], verdicts_dir=str(folder))
    reasons = {Path(r.source).name: r.reason for r in report.rejections}
    assert reasons["conflict.json"].startswith("conflicts with verdict 0x")
    assert reasons["norun.json"].startswith("unknown run 'alice/nobody-r9'")
    assert reasons["recipe.json"].startswith("verdict is about another recipe")
    assert reasons["truncated.json"].startswith("not JSON")
    assert "not-a-verdict.json" in reasons
    assert report.verdicts_loaded == 0
    after = snapshot(con)
    assert {t: rows for t, rows in after.items() if t not in ("rejections", "ingest_batches")} == {
        t: rows for t, rows in before.items() if t not in ("rejections", "ingest_batches")
    }
    assert len(after["rejections"]) == len(before["rejections"]) + 5
    con.close()


def test_no_epoch_and_missing_folders(tmp_path: Path) -> None:
    con = warehouse.connect(tmp_path / "e.duckdb", create=True)
    with pytest.raises(IngestError, match="no epoch is open"):
        ingest.ingest(con, stores=[], verdicts_dir=str(tmp_path))
    policy.open_epoch(con, 0, 1)
    with pytest.raises(IngestError, match="epoch 3 is not open"):
        ingest.ingest(con, stores=[], verdicts_dir=str(tmp_path), epoch=3)
    with pytest.raises(IngestError, match="does not exist"):
        ingest.ingest(con, stores=[], verdicts_dir=str(tmp_path / "nope"))
    with pytest.raises(IngestError, match="no run"):
        ingest.ingest(con, stores=[str(tmp_path)], verdicts_dir=None)


def test_registration_errors(fresh: warehouse.Connection) -> None:
    good = "0x" + key("zed").public.hex()
    register: Callable[..., bool] = warehouse.register_peer
    assert (
        register(
            fresh,
            peer_id="alice",
            pubkey="0x" + key("alice").public.hex(),
            role="trainer",
            payout_address=address("alice"),
        )
        is False
    )
    with pytest.raises(warehouse.WarehouseValueError, match="already registered"):
        register(fresh, peer_id="alice", pubkey=good, role="trainer", payout_address=address("bob"))
    with pytest.raises(warehouse.WarehouseValueError, match="payout address"):
        register(fresh, peer_id="zed", pubkey=good, role="trainer", payout_address=None)
    with pytest.raises(warehouse.WarehouseValueError, match="96 hex"):
        register(
            fresh, peer_id="zed", pubkey="0x1234", role="trainer", payout_address=address("bob")
        )
    with pytest.raises(warehouse.WarehouseValueError, match="EVM address"):
        register(fresh, peer_id="zed", pubkey=good, role="trainer", payout_address="0x12")
    # The EIP-55 specification's example with its last letter's case flipped: one address rule
    # everywhere, so the warehouse refuses what the payout tree would refuse.
    spec = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
    with pytest.raises(warehouse.WarehouseValueError, match="invalid EIP-55 checksum"):
        register(fresh, peer_id="zed", pubkey=good, role="trainer", payout_address=spec[:-1] + "D")
    for form in (spec, spec.lower(), "0x" + spec[2:].upper()):  # checksummed, or no case at all
        assert warehouse.normalize_address(form) == spec.lower()  # the DB keeps lowercase
    with pytest.raises(warehouse.WarehouseValueError, match="unknown peer"):
        warehouse.record_stake(fresh, peer_id="zed", epoch=0, amount=1)
    with pytest.raises(warehouse.WarehouseValueError, match="negative"):
        warehouse.record_stake(fresh, peer_id="alice", epoch=0, amount=-1)


def test_cli_end_to_end(real_world: RealWorld, tmp_path: Path) -> None:
    db = str(tmp_path / "cli.duckdb")
    run = CliRunner().invoke

    def ok(*args: str) -> str:
        result = run(main, [*args, "--db", db])
        assert result.exit_code == 0, result.output
        return result.stdout

    ok("init")
    ok("open-epoch", "0", "--pool", "1000")
    recipe = ["--steps", str(STEPS), "--batch-size", "2", "--n-layer", "1", "--n-head", "2"]
    recipe += ["--d-model", "16", "--context", "16", "--warmup-steps", "1", "--corpus", *CORPUS]
    out = ok(
        "assign",
        "--epoch",
        "0",
        *recipe,
        "--checkpoint-max",
        "10",
        "--out",
        str(tmp_path / "a.json"),
    )
    # The command states the same work as the library's assignment the runs were trained for.
    assert f"epoch 0 pays for assignment 0x{assignment().hash().hex()} (recorded)" in out
    assert read_assignment(tmp_path / "a.json") == assignment()
    ok("params", "--cheat-fraction", "0.25", "--confidence", "0.7")
    ok(
        "register-peer",
        "alice",
        "--pubkey",
        "0x" + key("alice").public.hex(),
        "--address",
        address("alice"),
    )
    ok("register-peer", "aud1", "--pubkey", "0x" + key("aud1").public.hex(), "--role", "auditor")
    ok("stake", "alice", "--epoch", "0", "--amount", "10")
    out = ok(
        "ingest",
        "--store",
        str(real_world.stores / "alice-r1"),
        "--verdicts",
        str(real_world.verdicts0 / "alice-r1"),
    )
    assert f"1 runs, {STEPS} verdicts loaded" in out
    ok("compute")
    out = ok("root", "0", "--out", str(tmp_path / "tree"))
    payout = payouts.epoch_payout(db, 0)
    assert f"root 0x{payout.root.hex()} total 1000" in out
    assert json.loads((tmp_path / "tree" / "proofs.json").read_text())["root"] == (
        "0x" + payout.root.hex()
    )
    bad = run(main, ["open-epoch", "1", "--pool", "0", "--db", db])
    assert bad.exit_code == 2 and "pool must be positive" in bad.output


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(
                st.sampled_from(["verdict", "signature", "kind", "version", "run_id", "x"]),
                inner,
                max_size=4,
            )
        ),
        max_leaves=8,
    )
)
def test_hostile_verdict_files_are_rejected_not_crashing(tmp_path: Path, doc: object) -> None:
    path = tmp_path / "v.json"
    path.write_text(json.dumps(doc))
    with contextlib.suppress(VeritrainError, OSError):
        assert ingest._parse_verdict_file(path) == []  # only a plan file parses to nothing


def test_settled_epochs_are_frozen_and_verdicts_cannot_predate_runs(
    real_world: RealWorld, fresh: warehouse.Connection, tmp_path: Path
) -> None:
    con = fresh
    loaded = ingest.ingest(
        con, stores=[str(real_world.stores / "alice-r1")], verdicts_dir=None, epoch=1
    )
    assert loaded.runs_loaded == 1
    folder = real_world.verdicts0 / "alice-r1"
    report = ingest.ingest(con, stores=[], verdicts_dir=str(folder), epoch=0)
    assert {r.reason for r in report.rejections} == {
        "filed under epoch 0, before its run (epoch 1)"
    }
    assert report.verdicts_loaded == 0
    warehouse.record_settlement_post(
        con, epoch=1, root=b"\x01" * 32, cumulative_total=1, inputs_hash=b"\x02" * 32,
        tx_hash=b"\x03" * 32, block_number=1, gas_used=1, contract=address("alice"), chain_id=1,
    )  # fmt: skip
    before = snapshot(con)
    with pytest.raises(IngestError, match="epoch 1 is settled on chain"):
        ingest.ingest(con, stores=[], verdicts_dir=str(folder))
    with pytest.raises(warehouse.WarehouseValueError, match="settled on chain"):
        warehouse.record_stake(con, peer_id="bob", epoch=1, amount=5)
    policy.open_epoch(con, 1, POOLS[1])  # already open with this pool: a no-op
    assert snapshot(con) == before
    policy.open_epoch(con, 2, 7)  # a later epoch is fine


def test_two_findings_of_one_auditor_on_a_step_in_one_batch(
    real_world: RealWorld, fresh: warehouse.Connection, tmp_path: Path
) -> None:
    """Verdicts are checked against each other too, not only against the warehouse: the
    second finding of aud1 on alice's step 0 in the same batch is a conflict, not a crash."""
    folder = tmp_path / "v"
    folder.mkdir()
    alice0 = sorted((real_world.verdicts0 / "alice-r1").glob("step-*.json"))[0]
    shutil.copy(alice0, folder / "a-first.json")
    _resign(alice0, folder / "b-second.json", "aud1", reason="a different finding")
    report = ingest.ingest(
        fresh, stores=[str(real_world.stores / "alice-r1")], verdicts_dir=str(folder)
    )
    assert report.verdicts_loaded == 1
    assert [Path(r.source).name for r in report.rejections] == ["b-second.json"]
    assert report.rejections[0].reason.startswith("conflicts with verdict 0x")

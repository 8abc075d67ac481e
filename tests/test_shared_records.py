"""Shared-run records, the flat global state and the shared store (issue #15)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from proofs.codec import canonical_json
from proofs.errors import EncodingError
from proofs.hashing import Hash32, Root
from proofs.signatures import KeyPair, keypair_from_seed
from trainer.contribution import Contribution, SignedContribution
from trainer.data import CorpusCommitment
from trainer.globalstate import (
    flatten,
    initial_model,
    load_flat,
    param_names,
    theta_artifact,
    theta_from_artifact,
)
from trainer.hook import AuditHook, HookConfig
from trainer.innerrun import build_inner_optimizer, genesis_header_check
from trainer.roundrecord import (
    MAX_FILE,
    Excluded,
    Included,
    RoundRecord,
    SignedRoundRecord,
    file_label,
)
from trainer.schedule import Schedule
from trainer.sharedrun import ZERO32, Genesis, OuterRule, Screening, SignedGenesis, inner_run_id
from trainer.sharedstore import SharedStore, is_safe_name
from trainer.store import StoreError

VECTORS = json.loads((Path(__file__).parent / "vectors" / "shared" / "records.json").read_text())
KEYS = {
    name: keypair_from_seed(f"shared-records-test-key-{name}".encode().ljust(32, b"-"))
    for name in "CAPQX"
}
COORD, AGG, ALICE, BOB, OUTSIDER = (KEYS[n] for n in "CAPQX")
CONFIG = {"n_layer": 1, "n_head": 2, "d_model": 8, "context": 16, "dropout": 0.0}


def h(label: str) -> Hash32:
    return Hash32(hashlib.sha256(label.encode()).digest())


def make_genesis(**changes: Any) -> Genesis:
    fields: dict[str, Any] = dict(
        version=1,
        shared_run_id="shared-test",
        model="gpt-bytes",
        model_config=CONFIG,
        init_seed=99,
        initial_root=h("theta0"),
        optimizer="AdamW",
        hyperparameters={"betas": [0.9, 0.95], "weight_decay": 0.1},
        inner_lr=1e-3,
        grad_clip=1.0,
        inner_steps=4,
        batch_size=2,
        context=16,
        dataset=CorpusCommitment(
            root=Root(h("corpus")), nbytes=5000, file_count=2, chunk_size=1 << 20, source="here"
        ),
        checkpoint_every=4,
        chunk_size=4096,
        outer=OuterRule(beta=0.9, chunk=1024, topk=16, quantization="int8", alpha=1.0),
        screening=Screening(
            norm_factor=3.0,
            probe=True,
            probe_batch=4,
            probe_margin=0.05,
            min_contributions=1,
            max_contributions=8,
            deadline_s=60.0,
        ),
        rounds=3,
        coordinator=COORD.public,
        aggregator=AGG.public,
        peers={"alice": ALICE.public, "bob": BOB.public},
    )
    fields.update(changes)
    return Genesis(**fields)


GENESIS = make_genesis()


def make_contribution(key: KeyPair = ALICE, peer: str = "alice", **changes: Any) -> Contribution:
    fields: dict[str, Any] = dict(
        version=1,
        shared_run_id="shared-test",
        genesis=GENESIS.hash(),
        round=0,
        peer=peer,
        pubkey=key.public,
        base_root=h("theta0"),
        prev_contribution=ZERO32,
        prev_local_state=ZERO32,
        inner_header=h("header"),
        inner_manifest=h("manifest"),
        final_state=h("thetaH"),
        delta=h("payload"),
        payload_bytes=3,
        nnz=1,
        local_state=h("local"),
        losses=(5.5, 5.4, 5.3, 5.2),
    )
    fields.update(changes)
    return Contribution(**fields)


def make_round(**changes: Any) -> RoundRecord:
    fields: dict[str, Any] = dict(
        version=1,
        shared_run_id="shared-test",
        genesis=GENESIS.hash(),
        round=0,
        prev=GENESIS.hash(),
        base_root=h("theta0"),
        opened_at=100,
        closed_at=200,
        included=(
            Included(peer="alice", contribution=h("c"), delta=h("d"), norm=1.5, probe_loss=5.0),
        ),
        excluded=(
            Excluded(
                file="bob/r000000.json",
                file_hash=h("f"),
                peer="bob",
                contribution=h("cb"),
                reason="norm",
                detail="norm 40 > 3 x median 1.5",
                built_on=None,
                norm=40.0,
                probe_loss=float("inf"),
            ),
        ),
        base_probe_loss=5.1,
        aggregate=h("u"),
        new_root=h("theta1"),
        carried_over=False,
    )
    fields.update(changes)
    return RoundRecord(**fields)


# ---- round trips and signatures -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("signed_cls", "record", "key"),
    [
        (SignedGenesis, GENESIS, COORD),
        (SignedContribution, make_contribution(), ALICE),
        (SignedRoundRecord, make_round(), AGG),
    ],
)
def test_signed_round_trip(signed_cls: Any, record: Any, key: KeyPair) -> None:
    signed = signed_cls.sign(key, record)
    raw = canonical_json(signed.to_json())
    back = signed_cls.from_json(json.loads(raw))
    assert canonical_json(back.to_json()) == raw
    assert back.record.hash() == record.hash()
    assert back.verify(key.public)
    assert not back.verify(OUTSIDER.public)
    forged = dataclasses.replace(back, signature=bytes(signed_cls.sign(OUTSIDER, record).signature))
    assert not forged.verify(key.public)


def test_signature_binds_domain_and_record() -> None:
    """A genesis signature is not a round signature, and a changed record fails."""
    contribution = make_contribution()
    signed = SignedContribution.sign(ALICE, contribution)
    assert signed.verify()
    changed = dataclasses.replace(contribution, nnz=2)
    assert not SignedContribution(contribution=changed, signature=signed.signature).verify()
    genesis_sig = SignedGenesis.sign(COORD, GENESIS)
    assert genesis_sig.verify()
    assert not SignedGenesis(genesis=GENESIS, signature=signed.signature).verify()


def test_contribution_roster_check() -> None:
    own = SignedContribution.sign(ALICE, make_contribution())
    assert own.verify_roster(GENESIS)
    # Signed by a key that is not on the roster, under a roster name: self-consistent, refused.
    outsider = SignedContribution.sign(OUTSIDER, make_contribution(key=OUTSIDER))
    assert outsider.verify() and not outsider.verify_roster(GENESIS)
    # Bob's key under alice's name.
    swapped = SignedContribution.sign(BOB, make_contribution(key=BOB))
    assert swapped.verify() and not swapped.verify_roster(GENESIS)
    # Alice's roster key signed it, but the record names another key: what would a reader of
    # the record alone believe?
    misnamed = SignedContribution.sign(ALICE, make_contribution(key=BOB))
    assert misnamed.verify(ALICE.public) and not misnamed.verify_roster(GENESIS)
    unknown = SignedContribution.sign(OUTSIDER, make_contribution(key=OUTSIDER, peer="mallory"))
    assert not unknown.verify_roster(GENESIS)


def test_inner_run_id() -> None:
    assert inner_run_id("shared-test", 7) == "shared-test.r000007"
    assert len(inner_run_id("a" * 56, 999_999)) == 64
    with pytest.raises(EncodingError):
        inner_run_id("a" * 57, 0)
    with pytest.raises(EncodingError):
        inner_run_id("shared-test", 1_000_000)


# ---- strict readers -----------------------------------------------------------------------------


def _edit(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    *parents, last = path.split(".")
    target: Any = out
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return out


_DELETE = object()
BAD_GENESIS = [
    ("surprise", 1),
    ("outer.surprise", 1),
    ("version", 2),
    ("version", True),
    ("shared_run_id", "a" * 57),
    ("shared_run_id", "../x"),
    ("coordinator", "0x" + "ab" * 47),
    ("initial_root", "0x" + "00" * 31),
    ("peers.alice", "0x" + "ab" * 49),
    ("peers.bob", "0x" + ALICE.public.hex()),  # two peers, one key
    ("peers.a/b", "0x" + OUTSIDER.public.hex()),  # a name that is no run id
    ("hyperparameters.lr", 0.1),
    ("hyperparameters.betas", "fast"),
    ("hyperparameters.momentum_of_doom", 1),
    ("optimizer", "os.system"),
    ("inner_lr", 0),
    ("inner_lr", "NaN"),
    ("grad_clip", -1.0),
    ("inner_steps", 0),
    ("inner_steps", 5000),
    ("rounds", 1_000_000),
    ("outer.beta", 1.5),
    ("outer.topk", 2000),
    ("outer.chunk", 70000),
    ("outer.quantization", "int4"),
    ("outer.alpha", 0.0),
    ("screening.norm_factor", 1.0),
    ("screening.probe_margin", -0.1),
    ("screening.min_contributions", 0),
    ("screening.min_contributions", 3),  # more than the roster
    ("screening.max_contributions", 0),
    ("screening.deadline_s", 0.0),
    ("screening.probe_gain", 1.0),
    ("screening.probe_gain", -0.1),
    ("screening.probe", 1),
    ("dataset.root", "0x00"),
    ("heldout", GENESIS.dataset.to_json()),  # the training corpus is not held out
    ("heldout", "stdlib"),
    ("model_config", []),
]


def test_genesis_heldout_corpus_round_trips() -> None:
    held = CorpusCommitment(root=h("held"), nbytes=10, file_count=1, chunk_size=1 << 20, source="x")
    genesis = make_genesis(heldout=held)
    back = SignedGenesis.from_json(SignedGenesis.sign(COORD, genesis).to_json()).genesis
    assert back.heldout == held and back.hash() == genesis.hash() != GENESIS.hash()
    assert GENESIS.to_json()["heldout"] is None


@pytest.mark.parametrize(("path", "value"), BAD_GENESIS)
def test_genesis_reader_refuses(path: str, value: Any) -> None:
    good = SignedGenesis.sign(COORD, GENESIS).to_json()
    SignedGenesis.from_json(good)
    with pytest.raises(EncodingError):
        SignedGenesis.from_json(_edit(good, f"genesis.{path}", value))


def test_genesis_reader_refuses_missing_key_and_short_signature() -> None:
    good = SignedGenesis.sign(COORD, GENESIS).to_json()
    with pytest.raises(EncodingError):
        SignedGenesis.from_json(_edit(good, "genesis.rounds", _DELETE))
    with pytest.raises(EncodingError):
        SignedGenesis.from_json(_edit(good, "signature", "0x" + "00" * 95))
    with pytest.raises(EncodingError):
        SignedGenesis.from_json(_edit(good, "extra", 1))


BAD_CONTRIBUTION = [
    ("surprise", 1),
    ("version", 0),
    ("round", -1),
    ("round", 1_000_000),
    ("peer", "../bob"),
    ("pubkey", "0x" + "ab" * 32),
    ("delta", "0x" + "00" * 33),
    ("base_root", "00" * 32),
    ("nnz", -1),
    ("losses", []),
    ("losses", ["NaN"]),
    ("losses", [1.0, "Infinity"]),
    ("losses", [1.0] * 2049),
    ("losses", ["1.0"]),
]


@pytest.mark.parametrize(("path", "value"), BAD_CONTRIBUTION)
def test_contribution_reader_refuses(path: str, value: Any) -> None:
    good = SignedContribution.sign(ALICE, make_contribution()).to_json()
    SignedContribution.from_json(good)
    with pytest.raises(EncodingError):
        SignedContribution.from_json(_edit(good, f"contribution.{path}", value))


BAD_ROUND = [
    ("surprise", 1),
    ("included.0.surprise", 1),
    ("excluded.0.surprise", 1),
    ("round", 1_000_000),
    ("prev", "0x" + "11" * 32),  # round 0 must chain to the genesis
    ("opened_at", 300),  # after closed_at
    ("included.0.norm", "NaN"),
    ("included.0.norm", -1.0),
    ("included.0.probe_loss", "Infinity"),
    ("included.0.peer", "a b"),
    ("excluded.0.reason", "disliked"),
    ("excluded.0.detail", "x" * 513),
    ("excluded.0.file", "f" * (MAX_FILE + 1)),
    ("excluded.0.file", ""),
    ("excluded.0.built_on", -1),
    ("excluded.0.file_hash", None),
    ("base_probe_loss", "NaN"),
    ("carried_over", True),  # with an aggregate and a new root
    ("carried_over", 0),
    ("aggregate", "0x" + "00" * 32),  # applied without an aggregate
]


@pytest.mark.parametrize(("path", "value"), BAD_ROUND)
def test_round_reader_refuses(path: str, value: Any) -> None:
    good = SignedRoundRecord.sign(AGG, make_round()).to_json()
    SignedRoundRecord.from_json(good)
    with pytest.raises(EncodingError):
        SignedRoundRecord.from_json(_edit(good, f"round.{path}", value))


def test_round_record_lists() -> None:
    inc = make_round().included[0]
    with pytest.raises(EncodingError, match="included twice"):
        make_round(included=(inc, inc))
    exc = make_round().excluded[0]
    later = dataclasses.replace(exc, file="zed/r000000.json")
    make_round(excluded=(exc, later))
    with pytest.raises(EncodingError, match="ascending"):
        make_round(excluded=(later, exc))
    with pytest.raises(EncodingError, match="ascending"):
        make_round(excluded=(exc, exc))
    carried = make_round(carried_over=True, aggregate=ZERO32, new_root=h("theta0"))
    assert carried.carried_over
    with pytest.raises(EncodingError):
        make_round(included=())  # applied, yet nothing included


def test_round_record_roster_order() -> None:
    first, second = sorted(["alice", "bob"], key=lambda n: GENESIS.peers[n])
    inc = [
        Included(peer=p, contribution=h(p), delta=h(p + "d"), norm=1.0, probe_loss=None)
        for p in (first, second)
    ]
    assert make_round(included=tuple(inc)).check_roster(GENESIS) == []
    problems = make_round(included=(inc[1], inc[0])).check_roster(GENESIS)
    assert problems == ["included contributions are not in public-key order"]
    stranger = Included(peer="mallory", contribution=h("m"), delta=h("n"), norm=1, probe_loss=None)
    assert "not on the roster" in make_round(included=(stranger,)).check_roster(GENESIS)[0]
    other = make_genesis(rounds=4)
    assert make_round(included=tuple(inc)).check_roster(other) == [
        "genesis hash differs from the genesis's"
    ]


def test_file_label_is_bounded_and_distinct() -> None:
    assert file_label("alice", "r000001.json") == "alice/r000001.json"
    a, b = file_label("p" * 200, "x" * 100), file_label("p" * 200, "x" * 101)
    assert len(a) <= MAX_FILE and len(b) <= MAX_FILE and a != b
    Excluded(
        file=a,
        file_hash=ZERO32,
        peer=None,
        contribution=None,
        reason="misnamed",
        detail="",
        built_on=None,
        norm=None,
        probe_loss=None,
    )


# ---- vectors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "signed_cls"),
    [
        ("genesis", SignedGenesis),
        ("contribution", SignedContribution),
        ("round", SignedRoundRecord),
    ],
)
def test_vectors(kind: str, signed_cls: Any) -> None:
    case = VECTORS[kind]
    expected = case["canonical"].encode("ascii")
    signed = signed_cls.from_json({kind: case["record"], "signature": case["signature"]})
    assert canonical_json(signed.record.to_json()) == expected
    digest = hashlib.sha256(expected).digest()  # the oracle: hashlib over the pinned bytes
    assert "0x" + digest.hex() == case["hash"]
    assert signed.record.hash() == digest
    key = VECTORS["keys"][case["signer"]]
    secret = int(key["secret"], 16)
    pair = KeyPair(secret=secret, public=bytes.fromhex(key["pubkey"][2:]))
    assert "0x" + signed_cls.sign(pair, signed.record).signature.hex() == case["signature"]
    assert signed.verify(pair.public)


def test_vector_records_chain() -> None:
    genesis = SignedGenesis.from_json(
        {"genesis": VECTORS["genesis"]["record"], "signature": VECTORS["genesis"]["signature"]}
    ).genesis
    record = RoundRecord.from_json(VECTORS["round"]["record"])
    assert record.check_roster(genesis) == []
    assert record.prev == genesis.hash()
    assert Contribution.from_json(VECTORS["contribution"]["record"]).genesis == genesis.hash()


# ---- global state -------------------------------------------------------------------------------


def test_flatten_load_round_trip() -> None:
    model = initial_model(GENESIS)
    flat = flatten(model)
    assert flat.dtype == torch.float32 and flat.dim() == 1
    assert flat.numel() == sum(p.numel() for p in model.parameters())
    names = param_names(model)
    assert names == tuple(n for n, _ in model.named_parameters())
    other = initial_model(make_genesis(init_seed=100))
    assert not torch.equal(flatten(other), flat)
    load_flat(other, flat)
    assert torch.equal(flatten(other), flat)
    flat[0] += 1  # flatten returns a copy
    assert not torch.equal(flatten(other), flat)
    with pytest.raises(EncodingError):
        load_flat(other, flat[:-1])
    with pytest.raises(EncodingError):
        load_flat(other, flat.double())


def test_theta_root_is_stable_and_decodes() -> None:
    first = theta_artifact(initial_model(GENESIS), GENESIS.chunk_size)
    torch.manual_seed(12345)  # whatever ran before, the genesis seed decides the weights
    model = initial_model(GENESIS)
    second = theta_artifact(model, GENESIS.chunk_size)
    assert first.root == second.root
    assert theta_artifact(initial_model(make_genesis(init_seed=1)), 4096).root != first.root
    from trainer.artifact import parse_artifact

    _, leaves = parse_artifact(second.payload)
    assert torch.equal(theta_from_artifact(leaves, model), flatten(model))
    bigger = initial_model(make_genesis(model_config={**CONFIG, "d_model": 16}))
    with pytest.raises(EncodingError):
        theta_from_artifact(leaves, bigger)


def test_build_inner_optimizer_and_header_check(tmp_path: Path) -> None:
    model = initial_model(GENESIS)
    optimizer = build_inner_optimizer(GENESIS, model)
    assert type(optimizer).__name__ == "AdamW"
    assert optimizer.defaults["lr"] == GENESIS.inner_lr
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    config = HookConfig(
        run_id=inner_run_id(GENESIS.shared_run_id, 2),
        assignment=GENESIS.hash(),
        schedule=Schedule.constant(GENESIS.inner_lr),
        checkpoint_every=GENESIS.checkpoint_every,
        chunk_size=GENESIS.chunk_size,
        grad_clip=GENESIS.grad_clip,
        model_name=GENESIS.model,
        model_config=GENESIS.model_config,
        dataset=dataclasses.replace(GENESIS.dataset, source="elsewhere"),
        batch_size=GENESIS.batch_size,
        context=GENESIS.context,
    )
    hook = AuditHook(model, optimizer, store=str(tmp_path / "run"), keypair=ALICE, config=config)
    header = hook.planned_header()
    assert genesis_header_check(GENESIS, header, ALICE.public, round=2) == []
    assert genesis_header_check(GENESIS, header, ALICE.public) == []
    assert genesis_header_check(GENESIS, header, ALICE.public, round=3)[0].startswith("run id")
    assert genesis_header_check(GENESIS, header, BOB.public)[0].startswith("pubkey")
    # Another weight decay: the optimizer defaults differ from the genesis's.
    other = make_genesis(hyperparameters={"betas": [0.9, 0.95], "weight_decay": 0.0})
    problems = genesis_header_check(other, header, ALICE.public)
    assert any(p.startswith("optimizer defaults") for p in problems)
    assert any(p.startswith("assignment") for p in problems)
    wrong_batch = dataclasses.replace(header, batch_size=3)
    assert genesis_header_check(GENESIS, wrong_batch, ALICE.public) == [
        "batch_size: header has 3, the genesis assigns 2"
    ]


# ---- shared store -------------------------------------------------------------------------------


def test_store_records_write_once(tmp_path: Path) -> None:
    store = SharedStore(tmp_path)
    signed = SignedGenesis.sign(COORD, GENESIS)
    store.put_genesis(signed)
    store.put_genesis(signed)  # same bytes: a no-op
    assert store.read_genesis() == signed
    with pytest.raises(StoreError):
        store.put_genesis(SignedGenesis.sign(COORD, make_genesis(rounds=9)))
    assert store.rounds() == [] and store.latest_round() is None
    record = SignedRoundRecord.sign(AGG, make_round())
    store.put_round(record)
    store.put_round(record)
    with pytest.raises(StoreError, match="different content"):
        store.put_round(SignedRoundRecord.sign(AGG, make_round(closed_at=201)))
    assert store.read_round(0) == record
    assert store.rounds() == [0] and store.latest_round() == 0
    # A record stored under another round's name is refused.
    (tmp_path / "rounds" / "r000001.json").write_bytes(
        (tmp_path / "rounds" / "r000000.json").read_bytes()
    )
    with pytest.raises(StoreError, match="round 0"):
        store.read_round(1)
    (tmp_path / "rounds" / "r000002.json").write_bytes(b"[" * 100 + b"]" * 100)
    with pytest.raises(StoreError):
        store.read_round(2)


def test_store_contributions_and_theta(tmp_path: Path) -> None:
    store = SharedStore(tmp_path)
    signed = SignedContribution.sign(ALICE, make_contribution())
    store.put_contribution(signed, b"payload")
    store.put_contribution(signed, b"payload")
    with pytest.raises(StoreError):
        store.put_contribution(signed, b"another payload")
    assert store.read_contribution("alice", 0) == signed
    assert store.read_contribution_file("alice", "r000000.delta", 7) == b"payload"
    with pytest.raises(StoreError, match="limit"):
        store.read_contribution_file("alice", "r000000.delta", 6)
    assert store.inner_store("alice", 3).url == f"{tmp_path}/peers/alice/r000003"

    model = initial_model(GENESIS)
    artifact = theta_artifact(model, GENESIS.chunk_size)
    assert store.put_object(artifact.root, artifact.parts)
    assert torch.equal(store.read_theta(artifact.root, model), flatten(model))
    path = tmp_path / "objects" / f"{artifact.root.hex()}.vtar"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="does not match the root"):
        store.read_theta(artifact.root, model)


def test_store_listing_never_trusts_names(tmp_path: Path) -> None:
    store = SharedStore(tmp_path)
    store.put_contribution(SignedContribution.sign(ALICE, make_contribution()), b"p")
    (tmp_path / "secret.txt").write_text("coordinator notes")
    weird = tmp_path / "contributions" / "bob"
    weird.mkdir()
    (weird / "..evil name").write_text("x")
    (weird / "r000000.json").symlink_to(tmp_path / "secret.txt")
    (weird / ".tmp-0123").write_text("in flight")
    (tmp_path / "contributions" / "link").symlink_to(tmp_path)
    (tmp_path / "contributions" / "stray-file").write_text("x")
    listed = store.list_contribution_files()
    assert ("bob", "..evil name") in listed
    assert ("bob", "r000000.json") in listed
    assert ("alice", "r000000.json") in listed
    assert not any(name.startswith(".tmp-") for _, name in listed)
    assert not any(peer == "stray-file" for peer, _ in listed)
    for peer, name in [("bob", "..evil name"), ("..", "secret.txt"), ("alice", ".."), ("", "x")]:
        with pytest.raises(StoreError, match="unsafe"):
            store.read_contribution_file(peer, name, 1000)
    with pytest.raises(StoreError):
        store.read_contribution_file("bob", "r000000.json", 1000)  # a symlink out of the store
    with pytest.raises(StoreError, match="symlink"):
        store.read_contribution_file("link", "secret.txt", 1000)
    assert not is_safe_name("a/b") and not is_safe_name("...") and is_safe_name("r000001.json")
    assert os.path.exists(tmp_path / "secret.txt")


@pytest.mark.parametrize("key", ["lr", "initial_lr", "params"])
def test_hyperparameters_never_set_the_rate_or_params(key: str) -> None:
    with pytest.raises(EncodingError, match=f"must not set '{key}'"):
        make_genesis(hyperparameters={key: 0.1})

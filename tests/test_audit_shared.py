"""Auditing shared-run contributions (issue #16, part A): verdict format, checks, attacks, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from audit.contribution_verdict import (
    CHECK_NAMES,
    ContributionVerdictError,
    SignedContributionVerdict,
    load_contribution_verdict,
    sign_contribution_verdict,
)
from audit.verdict import Outcome
from proofs.codec import canonical_json
from proofs.signatures import keypair_from_seed

VECTOR = json.loads(
    (Path(__file__).parent / "vectors" / "shared" / "contribution_verdict.json").read_text()
)


# ---- the verdict format ---------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(VECTOR["verdicts"])))
def test_contribution_verdict_vector(index: int) -> None:
    entry = VECTOR["verdicts"][index]
    data = json.dumps(entry["signed"]).encode()
    signed = load_contribution_verdict(data)
    verdict = signed.verdict
    # Written back, the record gives exactly the independent generator's bytes and hash.
    assert canonical_json(verdict.to_json()).decode("ascii") == entry["canonical"]
    assert verdict.hash() == hashlib.sha256(entry["canonical"].encode()).digest()
    assert "0x" + verdict.hash().hex() == entry["hash"]
    assert signed.verify()
    auditor = keypair_from_seed(bytes.fromhex(VECTOR["auditor_seed"][2:]))
    resigned = sign_contribution_verdict(auditor, verdict)
    assert resigned.to_json() == entry["signed"]
    assert [c.name for c in verdict.checks] == list(CHECK_NAMES)


def test_contribution_verdict_reader_is_strict() -> None:
    good = VECTOR["verdicts"][0]["signed"]

    def refused(mutate: object) -> None:
        doc = json.loads(json.dumps(good))
        mutate(doc)  # type: ignore[operator]
        with pytest.raises(ContributionVerdictError):
            load_contribution_verdict(json.dumps(doc).encode())

    refused(lambda d: d["verdict"].update(extra=1))
    refused(lambda d: d["verdict"].pop("heldout"))
    refused(lambda d: d["verdict"].update(kind="veritrain-verdict"))
    refused(lambda d: d["verdict"].update(version=2))
    refused(lambda d: d["verdict"].update(outcome="maybe"))
    refused(lambda d: d["verdict"].update(pubkey="0x00"))
    refused(lambda d: d["verdict"]["checks"].reverse())
    refused(lambda d: d["verdict"]["checks"].pop())
    refused(lambda d: d["verdict"]["checks"][0].update(passed=1))
    refused(lambda d: d["verdict"]["checks"][1].update(passed=False))  # a pass with a failed check
    refused(lambda d: d["verdict"].update(reason="x"))  # a pass with a reason
    refused(lambda d: d["verdict"]["steps"][0].update(outcome="ok"))
    with pytest.raises(ContributionVerdictError):
        load_contribution_verdict(b"[1,")
    with pytest.raises(ContributionVerdictError):
        load_contribution_verdict(b" " * (2 << 20))


def test_contribution_verdict_signature_binds_domain_and_body() -> None:
    signed = load_contribution_verdict(json.dumps(VECTOR["verdicts"][0]["signed"]).encode())
    other = keypair_from_seed(b"someone-else-entirely-0123456789")
    assert not signed.verify(other.public)

    changed = dataclasses.replace(signed.verdict, loss_after=5.0)
    forged = SignedContributionVerdict(signature=signed.signature, verdict=changed)
    assert not forged.verify()
    assert signed.verdict.outcome is Outcome.PASS


# ---- a tiny shared run: peers p0, p1, p2 and x, H=4, two windows per inner run ----------------

import shutil
import time

from audit.contribution import audit_contribution
from proofs.signatures import KeyPair
from shared_fixtures import build_genesis, key, write_corpus
from trainer.aggregator import close_round
from trainer.data import Corpus
from trainer.globalstate import initial_model, theta_artifact
from trainer.peer import Behaviour, run_round
from trainer.sharedrun import Genesis, SignedGenesis
from trainer.sharedstore import SharedStore

PEERS = ("p0", "p1", "p2", "x")
AUDITOR = keypair_from_seed(b"veritrain-test-shared-auditor-key!")
SEED = hashlib.sha256(b"test sample seed").digest()


class Shared:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.corpus = write_corpus(path)
        self.keys: dict[str, KeyPair] = {p: key(f"audit-shared-{p}") for p in PEERS}
        self.aggregator = key("audit-shared-aggregator")
        coordinator = key("audit-shared-coordinator")
        g = build_genesis(
            self.corpus, self.keys, coordinator=coordinator, aggregator=self.aggregator,
            inner_steps=4,
        )  # fmt: skip
        self.genesis: Genesis = dataclasses.replace(g, checkpoint_every=2)
        self.store = SharedStore(path / "store")
        self.store.put_genesis(SignedGenesis.sign(coordinator, self.genesis))
        theta0 = theta_artifact(initial_model(self.genesis), self.genesis.chunk_size)
        self.store.put_object(theta0.root, theta0.parts)

    def train(self, peer: str, r: int, store: SharedStore | None = None, **kw: object) -> None:
        run_round(store or self.store, self.genesis, self.keys[peer], peer, r,
                  corpus=self.corpus, threads=1, **kw)  # type: ignore[arg-type]  # fmt: skip

    def close(self, store: SharedStore | None = None) -> None:
        close_round(store or self.store, self.aggregator, now=time.time() + 1e7)

    def copy(self, dest: Path) -> Shared:
        twin = object.__new__(Shared)
        shutil.copytree(self.path, dest)
        twin.__dict__.update(self.__dict__)
        twin.path, twin.store = dest, SharedStore(dest / "store")
        twin.corpus = Corpus.from_paths([dest / "corpus.py"])
        return twin

    def audit(self, r: int, peer: str, **kw: object):  # type: ignore[no-untyped-def]
        args: dict[str, object] = {"keypair": AUDITOR, "sample_seed": SEED, "corpus": self.corpus}
        args.update(kw)
        return audit_contribution(self.store, self.genesis, r, peer, **args)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Shared:
    run = Shared(tmp_path_factory.mktemp("shared"))
    for r in (0, 1):
        for peer in PEERS:
            run.train(peer, r)
        run.close()
    return run


def test_honest_contribution_passes_exact(shared: Shared) -> None:
    signed = shared.audit(1, "p1", mode="exact", steps=4)
    v = signed.verdict
    assert v.outcome is Outcome.PASS, v.reason + str(v.checks)
    assert v.mode.value == "exact"
    assert [s.step for s in v.steps] == [0, 1, 2, 3]
    assert signed.verify()

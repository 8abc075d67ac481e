"""The demo's dishonest peers (trainer/adversaries.py) through the real peer, aggregator and
contribution audit: what catches each today (issue #16). A stale peer is screened ``stale``
(built on round r-1); a copier is included beside its victim (identical payloads both stay and
are summed once) and the audit fails it on ``final-state`` while the victim passes; a fabricator
of plausible norm gets past screening without the probe and the audit fails it on
``error-feedback`` (with the probe on, the demo shows it excluded as ``probe``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from shared_fixtures import Run, make_run

from audit.contribution import audit_contribution
from audit.contribution_verdict import SignedContributionVerdict
from audit.verdict import Outcome
from proofs.hashing import sha256
from proofs.signatures import save_keypair
from trainer.adversaries import copier, fabricator, parse_behaviour, stale
from trainer.aggregator import close_round
from trainer.cli import main
from trainer.peer import Behaviour, PeerError, Status, run_round
from trainer.roundrecord import RoundRecord

NOW = 1_900_000_000.0


def peer_round(run: Run, peer: str, r: int, behaviour: Behaviour | None = None) -> Status:
    result = run_round(
        run.store, run.genesis, run.peers[peer], peer, r, corpus=run.corpus,
        behaviour=behaviour, threads=1,
    )  # fmt: skip
    return result.status


def close(run: Run) -> RoundRecord:
    signed = close_round(run.store, run.aggregator, now=NOW, corpus=run.corpus)
    assert signed is not None
    return signed.record


@pytest.fixture(scope="module")
def rounds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, RoundRecord, RoundRecord]:
    """Round 0 all honest; round 1: p0 honest, p1 honest (the victim), p2 stale, p3 copies p1,
    p4 fabricates."""
    run = make_run(tmp_path_factory.mktemp("adversaries"), peers=5)
    for peer in run.peers:
        assert peer_round(run, peer, 0) is Status.PUBLISHED
    r0 = close(run)
    assert peer_round(run, "p0", 1) is Status.PUBLISHED
    assert peer_round(run, "p1", 1) is Status.PUBLISHED
    assert peer_round(run, "p2", 1, stale()) is Status.PUBLISHED
    assert peer_round(run, "p3", 1, copier(run.store, "p1", wait_s=5)) is Status.PUBLISHED
    assert peer_round(run, "p4", 1, fabricator(seed=3)) is Status.PUBLISHED
    return run, r0, close(run)


def audit(run: Run, r: int, peer: str) -> SignedContributionVerdict:
    return audit_contribution(
        run.store, run.genesis, r, peer, keypair=run.coordinator, sample_seed=sha256(b"beacon"),
        steps=2, mode="exact", corpus=run.corpus,
    )  # fmt: skip


def excluded(record: RoundRecord) -> dict[str, tuple[str, int | None, str]]:
    return {e.peer or "?": (e.reason, e.built_on, e.detail) for e in record.excluded}


def test_stale_peer_is_screened_stale_built_on_the_previous_round(
    rounds: tuple[Run, RoundRecord, RoundRecord],
) -> None:
    run, r0, r1 = rounds
    p2 = run.store.read_contribution("p2", 1).contribution
    assert p2.base_root == r0.base_root == run.genesis.initial_root  # theta_0, not theta_1
    reason, built_on, _ = excluded(r1)["p2"]
    assert (reason, built_on) == ("stale", 0)


def test_copier_is_included_beside_its_victim_and_fails_the_audit(
    rounds: tuple[Run, RoundRecord, RoundRecord],
) -> None:
    run, _, r1 = rounds
    victim = run.store.read_contribution("p1", 1).contribution
    copy = run.store.read_contribution("p3", 1).contribution
    # the victim's payload and result under the copier's own name, key and inner run
    assert (copy.delta, copy.final_state, copy.local_state) == (
        victim.delta, victim.final_state, victim.local_state,
    )  # fmt: skip
    assert copy.peer == "p3" and copy.pubkey == bytes(run.peers["p3"].public)
    assert copy.inner_header != victim.inner_header
    # The aggregator cannot tell the original from the copy: both stay (summed once).
    assert {"p1", "p3"} <= {i.peer for i in r1.included}
    # The copier's own inner run does not reach the copied final state: caught when sampled.
    caught = audit(run, 1, "p3").verdict
    assert caught.outcome is Outcome.FAIL and caught.reason.startswith("final-state"), caught
    assert audit(run, 1, "p1").verdict.outcome is Outcome.PASS


def test_fabricator_of_plausible_norm_passes_screening_and_fails_the_audit(
    rounds: tuple[Run, RoundRecord, RoundRecord],
) -> None:
    run, r0, r1 = rounds
    included = {i.peer: i for i in r1.included}
    assert sorted(included) == ["p0", "p1", "p3", "p4"]  # the fabricator gets in (no probe)
    honest = {i.peer: i.norm for i in r0.included}
    assert included["p4"].norm is not None
    assert 0.2 * min(honest.values()) < included["p4"].norm < 3 * max(honest.values())
    caught = audit(run, 1, "p4").verdict
    assert caught.outcome is Outcome.FAIL and caught.reason.startswith("error-feedback"), caught


def test_copier_without_a_victim_contribution_sends_its_own(tmp_path: Path) -> None:
    run = make_run(tmp_path, peers=2)
    assert peer_round(run, "p1", 0, copier(run.store, "p0", wait_s=0.3)) is Status.PUBLISHED
    close(run)
    assert [i.peer for i in run.store.read_round(0).record.included] == ["p1"]


def test_parse_behaviour_and_the_join_option(tmp_path: Path) -> None:
    run = make_run(tmp_path, peers=2)
    roster = frozenset(run.peers)
    assert parse_behaviour("honest", run.store, roster) is None
    assert parse_behaviour("stale", run.store, roster) == Behaviour(stale_by=1)
    assert parse_behaviour("copy:p0", run.store, roster).rewrite is not None  # type: ignore[union-attr]
    for bad in ("copy:nobody", "lazy", "copy:"):
        with pytest.raises(PeerError, match="expected one of"):
            parse_behaviour(bad, run.store, roster)
    # The CLI: a bad value is one error line before anything is written; hidden from --help.
    key = tmp_path / "p0.key"
    save_keypair(key, run.peers["p0"])
    args = ["join", "--shared", str(run.store.url), "--key", str(key), "--name", "p0"]
    res = CliRunner().invoke(main, [*args, "--corpus", str(tmp_path / "corpus.py"),
                                    "--behaviour", "lazy"])  # fmt: skip
    assert res.exit_code == 2 and "expected one of" in res.output
    assert "--behaviour" not in CliRunner().invoke(main, ["join", "--help"]).output
    assert not (tmp_path / "store" / "contributions").exists()

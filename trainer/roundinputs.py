"""What closing or checking a round reads from the shared store (trainer.aggregator's inputs).

The run's state (genesis and closed rounds, signatures checked), the contribution files no round
has screened yet, theta_r loaded and verified, the probe's corpus and model, and
:func:`decide`: screening and aggregation of a round over the store (trainer.aggregation).
Nothing here writes. theta_0 is read from the store, where the genesis command publishes it; a
store without it gets theta_0 rebuilt from the genesis and checked against its root (which only
works on a CPU path that rounds the initialisation like the coordinator's did: torch's
``normal_`` differs under ATEN_CPU_CAPABILITY=default).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import torch
from torch import nn

from proofs.errors import VeritrainError
from proofs.hashing import Hash32
from proofs.jsonlimits import loads_untrusted
from trainer.aggregation import Prober, RoundResult, make_prober, probe_offsets
from trainer.aggregation import close_round as decide_round
from trainer.contribution import SignedContribution
from trainer.data import Corpus
from trainer.globalstate import flatten, initial_model, theta_artifact
from trainer.recipe import SignedRunHeader
from trainer.roundrecord import SignedRoundRecord
from trainer.screening import (
    MAX_RECORD_BYTES,
    CandidateFile,
    RoundContext,
    SourceError,
    record_name,
)
from trainer.sharedrun import Genesis
from trainer.sharedstore import GENESIS_PATH, SharedStore, is_safe_name, payload_name
from trainer.store import StoreError

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: stage is "screen"."""


class AggregatorError(VeritrainError, RuntimeError):
    """A round cannot be closed or checked: wrong key, a genesis or theta that does not verify."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RunState:
    """A shared run as the store holds it: its verified genesis and the closed rounds."""

    genesis: Genesis
    records: tuple[SignedRoundRecord, ...]
    genesis_time: int

    @property
    def next_round(self) -> int:
        return len(self.records)

    def theta_roots(self, upto: int) -> tuple[Hash32, ...]:
        """Roots of theta_0 .. theta_upto."""
        roots = (self.genesis.initial_root, *(s.round.new_root for s in self.records))
        return tuple(roots[: upto + 1])

    def opened_at(self, r: int) -> int:
        return self.genesis_time if r == 0 else self.records[r - 1].round.closed_at

    def prev_hash(self, r: int) -> Hash32:
        return self.genesis.hash() if r == 0 else self.records[r - 1].round.hash()


def load_run(store: SharedStore, *, upto: int | None = None) -> RunState:
    """The genesis (coordinator signature checked) and the round records 0, 1, ... in order
    (aggregator signatures checked), stopping at the first missing one or at ``upto``.
    AggregatorError when a signature fails."""
    signed = store.read_genesis()
    genesis = signed.genesis
    if not signed.verify():
        raise AggregatorError(f"{store.url}: the genesis is not signed by its coordinator")
    records: list[SignedRoundRecord] = []
    for r in store.rounds():
        if r != len(records) or (upto is not None and r >= upto):
            break
        rec = store.read_round(r)
        if not rec.verify(genesis.aggregator):
            raise AggregatorError(f"{store.url}: round {r}'s record is not the aggregator's")
        records.append(rec)
    return RunState(genesis=genesis, records=tuple(records), genesis_time=_genesis_time(store))


def _genesis_time(store: SharedStore) -> int:
    try:
        info = store.store.fs.info(f"{store.store.root}/{GENESIS_PATH}")
    except (OSError, ValueError):
        return int(time.time())
    for key in ("mtime", "created", "LastModified", "last_modified"):
        value = info.get(key)
        if isinstance(value, datetime):
            return int(value.timestamp())
        if isinstance(value, int | float) and not isinstance(value, bool):
            return int(value)
    return int(time.time())


class StoreSource:
    """Screening's view of the shared store (trainer.aggregation.ContributionSource)."""

    def __init__(self, store: SharedStore) -> None:
        self.store = store

    def payload(self, peer: str, round_: int, max_bytes: int) -> bytes | None:
        if not self.store.store.exists(payload_name(peer, round_)):
            return None
        try:
            return self.store.read_contribution_file(peer, f"r{round_:06d}.delta", max_bytes)
        except StoreError as exc:
            raise SourceError(str(exc)) from None

    def inner_header(self, peer: str, round_: int) -> SignedRunHeader | None:
        inner = self.store.inner_store(peer, round_)
        try:
            return inner.read_header() if inner.has_header() else None
        except StoreError:
            return None


def read_candidate(store: SharedStore, folder: str, name: str) -> CandidateFile:
    """One listed file, read (bounded) only when both names are safe path components."""
    if not (is_safe_name(folder) and is_safe_name(name)):
        return CandidateFile(folder=folder, name=name, raw=None, error="unsafe name")
    try:
        raw = store.read_contribution_file(folder, name, MAX_RECORD_BYTES)
    except StoreError as exc:
        return CandidateFile(folder=folder, name=name, raw=None, error=str(exc))
    return CandidateFile(folder=folder, name=name, raw=raw)


def contribution_hash(raw: bytes | None) -> bytes | None:
    if raw is None:
        return None
    try:
        obj = loads_untrusted(raw, max_bytes=MAX_RECORD_BYTES, what="record")
        return bytes(SignedContribution.from_json(obj).contribution.hash())
    except (VeritrainError, ValueError):
        return None


def unscreened(store: SharedStore, state: RunState) -> list[CandidateFile]:
    """Every contribution record file no round record of ``state`` screened, by file name."""
    excluded = {(e.file, bytes(e.file_hash)) for s in state.records for e in s.round.excluded}
    included = {
        (f"{i.peer}/{record_name(s.round.round)}", bytes(i.contribution))
        for s in state.records
        for i in s.round.included
    }
    included_files = {f for f, _ in included}
    out = []
    for folder, name in store.list_contribution_files():
        if name.endswith(".delta"):
            continue  # payloads are read through their records
        candidate = read_candidate(store, folder, name)
        if (candidate.file, bytes(candidate.file_hash)) in excluded:
            continue
        if candidate.file in included_files and (
            (candidate.file, contribution_hash(candidate.raw)) in included
        ):
            continue
        out.append(candidate)
    return sorted(out, key=lambda c: c.file)


def theta_of(store: SharedStore, genesis: Genesis, root: bytes, model: nn.Module) -> torch.Tensor:
    """theta with ``root``, read and verified from the store (theta_0: rebuilt from the genesis
    when the store lacks it). AggregatorError when it does not verify."""
    if root == genesis.initial_root and not store.store.has_object(root):
        fresh = initial_model(genesis)
        encoded = theta_artifact(fresh, genesis.chunk_size)
        if encoded.root != root:
            raise AggregatorError(
                f"the genesis model builds theta_0 with root {encoded.root.hex()}, the genesis "
                f"says {root.hex()}"
            )
        return flatten(fresh)
    try:
        return store.read_theta(root, model)
    except StoreError as exc:
        raise AggregatorError(f"cannot load theta {root.hex()}: {exc}") from exc


def load_corpus(genesis: Genesis, corpus: Corpus | None) -> Corpus:
    """``corpus`` or the genesis dataset's source paths, checked against its root."""
    data = corpus if corpus is not None else Corpus.from_paths(genesis.dataset.source.split(","))
    if data.commitment().root != genesis.dataset.root:
        raise AggregatorError(
            f"the probe corpus has root {data.commitment().root.hex()}, the genesis dataset "
            f"{genesis.dataset.root.hex()} (pass the genesis corpus)"
        )
    return data


def prober_factory(genesis: Genesis, corpus: Corpus | None) -> Callable[[int], Prober]:
    """``seed -> Prober`` on the genesis dataset (loaded lazily: only rounds with survivors
    probe)."""

    def make(seed: int) -> Prober:
        data = load_corpus(genesis, corpus)
        model = initial_model(genesis)
        return make_prober(model, data, probe_offsets(genesis, seed, len(data)), genesis.context)

    return make


def decide(
    store: SharedStore,
    state: RunState,
    r: int,
    candidates: list[CandidateFile],
    *,
    corpus: Corpus | None = None,
    progress: Progress | None = None,
) -> tuple[RoundResult, nn.Module]:
    """Screen and aggregate ``candidates`` for round ``r`` of ``state``; the model holds theta_r."""
    genesis = state.genesis
    model = initial_model(genesis)
    roots = state.theta_roots(r)
    theta = theta_of(store, genesis, roots[-1], model)
    ctx = RoundContext(genesis=genesis, round=r, size=theta.numel(), theta_roots=roots)
    result = decide_round(
        ctx,
        candidates,
        StoreSource(store),
        theta,
        prober_for=prober_factory(genesis, corpus) if genesis.screening.probe else None,
        progress=None if progress is None else lambda d, t: progress("screen", d, t),
    )
    return result, model

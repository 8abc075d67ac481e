"""Screening one contribution file of a shared run (checks 1-7): pure, no store IO.

trainer.aggregation runs these on every unscreened file of a round, then the round-wide rules
(duplicates, norm, probe); trainer.roundinputs hands in the bytes. Each check that fails
excludes the file with its reason code (``trainer.roundrecord.EXCLUSION_REASONS``) and a
one-line detail; the first failing check wins:

1. ``misnamed`` when the listed folder or name is not a safe path component
   (``trainer.sharedstore.is_safe_name``; checked before anything is read, so a hostile name
   never reaches a path); ``unreadable``: not a readable, strict signed contribution record of
   at most MAX_RECORD_BYTES;
2. ``unregistered``: its key is not the roster's key of the peer it names; ``signature``: not
   signed by that key;
3. ``wrong-run``: another shared run or another genesis;
4. ``misnamed``: the file is not ``contributions/<record.peer>/r<record.round>.json``;
5. ``wrong-round``: a round after the one being closed (no such theta exists yet); ``stale``: an
   earlier round, or a base root other than theta_r's (``built_on``: the round whose theta it
   started from, None for a root no round had);
6. ``missing-payload``: no payload file; ``malformed-payload``: bytes other than the record's
   delta hash, size or nnz, or bytes that :func:`trainer.compression.decode_payload` refuses
   (unsorted, repeated, out of range, not k per chunk, non-finite, wrong size; the detail starts
   with its reason code);
7. ``missing-inner-run``: no inner run header whose hash is the record's ``inner_header``, signed
   by the peer, and matching what the genesis assigns for the round
   (``trainer.innerrun.genesis_header_check``: run id ``inner_run_id(shared_run_id, r)``, the
   genesis hash as assignment, model, optimizer, schedule, data).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from proofs.codec import short
from proofs.errors import EncodingError, VeritrainError
from proofs.hashing import Hash32, sha256
from proofs.jsonlimits import loads_untrusted
from trainer.compression import PayloadError, SparseDelta, decode_payload, payload_size
from trainer.contribution import SignedContribution
from trainer.innerrun import genesis_header_check
from trainer.recipe import SignedRunHeader
from trainer.roundrecord import MAX_DETAIL, MAX_EXCLUDED, Excluded, file_label
from trainer.sharedrun import ZERO32, Genesis
from trainer.sharedstore import is_safe_name

logger = logging.getLogger(__name__)

PAYLOAD_SLACK = 4096
"""Bytes read past a payload's exact size (a longer file is refused unread)."""
MAX_RECORD_BYTES = 64 << 10
"""A contribution record file: a few hundred bytes plus H losses."""


def record_name(round_: int) -> str:
    """File name of a contribution record for round ``round_`` (``r000007.json``)."""
    return f"r{round_:06d}.json"


@dataclass(frozen=True, kw_only=True, slots=True)
class CandidateFile:
    """One listed contribution record file and what reading it gave."""

    folder: str
    """The peer folder as listed (untrusted)."""
    name: str
    """The file name as listed (untrusted)."""
    raw: bytes | None
    """Its bytes (at most MAX_RECORD_BYTES + 1), None when it could not be read."""
    error: str = ""
    """Why it could not be read (when ``raw`` is None)."""

    @property
    def file(self) -> str:
        """How the round record names it (``folder/name``, bounded by file_label)."""
        return file_label(self.folder, self.name)

    @property
    def file_hash(self) -> Hash32:
        return ZERO32 if self.raw is None else sha256(self.raw)


class SourceError(VeritrainError, OSError):
    """A file a record names is present but cannot be read (too large, not a regular file)."""


class ContributionSource(Protocol):
    """What screening reads beyond the record file; only called with roster names, so no
    peer-chosen string reaches a path."""

    def payload(self, peer: str, round_: int, max_bytes: int) -> bytes | None:
        """The peer's payload for the round; None if absent; SourceError when it is present
        but unreadable or larger than ``max_bytes``."""
        ...

    def inner_header(self, peer: str, round_: int) -> SignedRunHeader | None:
        """The peer's inner run header for the round; None if absent or unreadable."""
        ...


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundContext:
    """The round being closed: the genesis and the roots of theta_0 .. theta_r."""

    genesis: Genesis
    round: int
    size: int
    """Length of the flat parameter vector (the model's parameter count)."""
    theta_roots: tuple[Hash32, ...]
    """``theta_roots[q]`` is theta_q's root; the last is the round's base."""

    def __post_init__(self) -> None:
        if len(self.theta_roots) != self.round + 1:
            raise ValueError(
                f"round {self.round} needs {self.round + 1} theta roots, "
                f"got {len(self.theta_roots)}"
            )

    @property
    def genesis_hash(self) -> Hash32:
        return self.genesis.hash()

    @property
    def base_root(self) -> Hash32:
        return self.theta_roots[-1]


@dataclass(frozen=True, kw_only=True, slots=True)
class Survivor:
    """A contribution that passed checks 1-7, decoded."""

    file: str
    file_hash: Hash32
    signed: SignedContribution
    delta: SparseDelta
    norm: float

    @property
    def pubkey(self) -> bytes:
        return self.signed.contribution.pubkey


class _Reject(Exception):
    """Internal: a screening check failed (reason, detail, built_on)."""

    def __init__(self, reason: str, detail: str, built_on: int | None = None) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.built_on = reason, detail, built_on


def exclusion(
    file: str,
    file_hash: Hash32,
    reason: str,
    detail: str,
    *,
    signed: SignedContribution | None = None,
    built_on: int | None = None,
    norm: float | None = None,
    probe_loss: float | None = None,
) -> Excluded:
    """An :class:`Excluded` entry; peer and contribution hash when the record was readable."""
    record = None if signed is None else signed.contribution
    return Excluded(
        file=file,
        file_hash=file_hash,
        peer=None if record is None else record.peer,
        contribution=None if record is None else record.hash(),
        reason=reason,
        detail=detail if len(detail) <= MAX_DETAIL else detail[: MAX_DETAIL - 3] + "...",
        built_on=built_on,
        norm=norm,
        probe_loss=probe_loss,
    )


def select_candidates(
    candidates: Sequence[CandidateFile], round_: int, roster: Collection[str]
) -> tuple[list[CandidateFile], int]:
    """The files one round screens, and how many wait for a later round.

    A round record lists at most MAX_EXCLUDED exclusions, so a peer that floods the store with
    junk files must not make the round impossible to record, nor crowd out the others: every
    roster peer's file named for this round is screened, then the other files in name order up
    to the limit; the rest stay unscreened for the next rounds."""
    first = [c for c in candidates if c.folder in roster and c.name == record_name(round_)]
    rest = [c for c in candidates if not (c.folder in roster and c.name == record_name(round_))]
    room = max(0, MAX_EXCLUDED - len(first))
    chosen = sorted(first + rest[:room], key=lambda c: c.file)
    return chosen, max(0, len(rest) - room)


def screen_file(
    candidate: CandidateFile, ctx: RoundContext, source: ContributionSource
) -> Survivor | Excluded:
    """Checks 1-7 of the module docstring on one file."""
    file, file_hash = candidate.file, candidate.file_hash
    signed: SignedContribution | None = None
    try:
        signed = _read_record(candidate)
        survivor = _check_record(candidate, signed, ctx, source)
    except _Reject as rej:
        return exclusion(
            file, file_hash, rej.reason, rej.detail, signed=signed, built_on=rej.built_on
        )
    return survivor


def _read_record(candidate: CandidateFile) -> SignedContribution:
    if not (is_safe_name(candidate.folder) and is_safe_name(candidate.name)):
        raise _Reject("misnamed", f"unsafe file name {short(candidate.file)}")
    if candidate.raw is None:
        raise _Reject("unreadable", candidate.error or "cannot read the file")
    if len(candidate.raw) > MAX_RECORD_BYTES:
        raise _Reject("unreadable", f"larger than the record limit of {MAX_RECORD_BYTES} bytes")
    try:
        obj = loads_untrusted(candidate.raw, max_bytes=MAX_RECORD_BYTES, what="record")
        return SignedContribution.from_json(obj)
    except (EncodingError, ValueError) as exc:
        raise _Reject("unreadable", f"not a signed contribution record: {exc}") from None


def _check_record(
    candidate: CandidateFile,
    signed: SignedContribution,
    ctx: RoundContext,
    source: ContributionSource,
) -> Survivor:
    record, genesis = signed.contribution, ctx.genesis
    registered = genesis.peers.get(record.peer)
    if registered is None or bytes(registered) != bytes(record.pubkey):
        owner = next(
            (n for n, k in genesis.peers.items() if bytes(k) == bytes(record.pubkey)), None
        )
        seen = "not in the roster" if owner is None else f"registered to {short(owner)}"
        raise _Reject("unregistered", f"peer {short(record.peer)}: its key is {seen}")
    if not signed.verify(record.pubkey):
        raise _Reject("signature", f"not signed by peer {record.peer}'s key")
    if record.shared_run_id != genesis.shared_run_id or record.genesis != ctx.genesis_hash:
        raise _Reject(
            "wrong-run",
            f"run {short(record.shared_run_id)} genesis {record.genesis.hex()[:16]}, expected "
            f"{genesis.shared_run_id} genesis {ctx.genesis_hash.hex()[:16]}",
        )
    if candidate.folder != record.peer or candidate.name != record_name(record.round):
        raise _Reject(
            "misnamed",
            f"file {short(candidate.file)} holds peer {record.peer}'s round {record.round}, "
            f"expected {record.peer}/{record_name(record.round)}",
        )
    _check_round(record.round, record.base_root, ctx)
    delta = _check_payload(signed, ctx, source)
    _check_inner_run(signed, ctx, source)
    return Survivor(
        file=candidate.file,
        file_hash=candidate.file_hash,
        signed=signed,
        delta=delta,
        norm=delta.norm(),
    )


def _check_round(round_: int, base_root: bytes, ctx: RoundContext) -> None:
    if round_ > ctx.round:
        raise _Reject("wrong-round", f"round {round_}: the open round is {ctx.round}")
    if round_ == ctx.round and base_root == ctx.base_root:
        return
    built_on = built_on_round(base_root, round_, ctx.theta_roots)
    where = "an unknown root" if built_on is None else f"theta_{built_on}"
    raise _Reject(
        "stale",
        f"round {round_} built on {where}; round {ctx.round} starts from theta_{ctx.round}",
        built_on,
    )


def built_on_round(root: bytes, round_: int, theta_roots: Sequence[bytes]) -> int | None:
    """The round whose theta has ``root``: ``round_`` itself if its root matches (carried-over
    rounds share a root), else the latest round that had it; None for an unknown root."""
    if round_ < len(theta_roots) and theta_roots[round_] == root:
        return round_
    return next((q for q in reversed(range(len(theta_roots))) if theta_roots[q] == root), None)


def _check_payload(
    signed: SignedContribution, ctx: RoundContext, source: ContributionSource
) -> SparseDelta:
    record, rule = signed.contribution, ctx.genesis.outer
    n = ctx.size
    expected = payload_size(n, rule.chunk, rule.topk, rule.quantization)
    try:
        # Some slack past the exact size, so that decode_payload names what is wrong ("count":
        # entries past k per chunk) instead of the read refusing it; still bounded.
        data = source.payload(record.peer, record.round, expected + PAYLOAD_SLACK)
    except SourceError as exc:
        raise _Reject("malformed-payload", str(exc)) from None
    if data is None:
        raise _Reject("missing-payload", f"no payload for peer {record.peer} round {record.round}")
    if sha256(data) != record.delta:
        raise _Reject("malformed-payload", "payload bytes do not hash to the record's delta")
    if len(data) != record.payload_bytes:
        raise _Reject(
            "malformed-payload",
            f"payload is {len(data)} bytes, the record says {record.payload_bytes}",
        )
    try:
        delta = decode_payload(
            data, size=n, chunk=rule.chunk, topk=rule.topk, quantization=rule.quantization
        )
    except PayloadError as exc:
        raise _Reject("malformed-payload", f"{exc.reason}: {exc}") from None
    if not bool(torch.isfinite(delta.values).all()):
        # Finite codes and steps can still dequantize past float32 (127 * a step near its max).
        raise _Reject("malformed-payload", "non-finite: a dequantized value overflows float32")
    if delta.nnz != record.nnz:
        raise _Reject(
            "malformed-payload", f"payload has {delta.nnz} entries, the record says {record.nnz}"
        )
    return delta


def _check_inner_run(
    signed: SignedContribution, ctx: RoundContext, source: ContributionSource
) -> None:
    record = signed.contribution
    header = source.inner_header(record.peer, record.round)
    if header is None:
        raise _Reject("missing-inner-run", f"no inner run header for round {record.round}")
    if header.header.hash() != record.inner_header:
        raise _Reject("missing-inner-run", "the inner run header's hash is not the record's")
    differ = genesis_header_check(ctx.genesis, header.header, record.pubkey, round=record.round)
    if differ:
        raise _Reject("missing-inner-run", f"the inner run is not the genesis's: {differ[0]}")
    if not header.verify(record.pubkey):
        raise _Reject("missing-inner-run", "the inner run header is not signed by the peer")

"""Closing one round of a shared run, as pure functions: screening and the deterministic sum.

Nothing here reads or writes a store (trainer.aggregator does, and hands the bytes in).

Screening (docs/shared-runs.md, "Screening"): each unscreened contribution file goes through the
checks below in order; the first that fails excludes it with its reason code
(``trainer.sharedrun.EXCLUSION_REASONS``) and a one-line detail:

1. ``misnamed`` when the listed folder or name is not a safe path component (checked before
   reading anything, so a hostile name never reaches a path); ``unreadable``: not a readable,
   strict signed contribution record of at most the record limit;
2. ``unregistered``: its key is not the roster's key of the peer it names; ``signature``: not
   signed by that key;
3. ``wrong-run``: another shared run or another genesis;
4. ``misnamed``: the file is not ``contributions/<record.peer>/r<record.round>.json``;
5. ``wrong-round``: a round after the one being closed (no such theta exists yet); ``stale``: an
   earlier round, or a base root other than theta_r's (``built_on``: the round whose theta it
   started from, None for a root no round had);
6. ``missing-payload``: no payload file; ``malformed-payload``: bytes other than the record's
   delta hash, size or nnz, or bytes that :func:`trainer.compression.decode_payload` refuses
   (unsorted, repeated, out of range, not k per chunk, non-finite, wrong size);
7. ``missing-inner-run``: no inner run header whose hash is the record's ``inner_header``, signed
   by the peer, and matching what the genesis assigns for the round
   (``trainer.sharedrun.genesis_header_check``: run id ``inner_run_id(shared_run_id, r)``, the
   genesis hash as assignment, model, optimizer, schedule, data);
8. ``duplicate``: a second contribution of one key in the round, or a payload identical to
   another peer's (no rule can tell which one is the copy, so every copy is excluded);
9. ``norm``: an L2 norm above ``norm_factor`` times the median norm of the survivors of 1-8;
10. ``probe`` (when enabled): applied alone (``theta_r - fl32(alpha) * d``, the aggregate rule
    with one contribution), its loss on the probe batch exceeds theta_r's by more than
    ``probe_margin`` relative.

Probe batch: ``batch_offsets(seed, 0, batch_size=probe_batch, context=genesis.context, ...)``
over the genesis dataset, where seed = first 8 bytes (big-endian) of
``sha256(PROBE_MAGIC || genesis hash || u64be(r) || sorted contribution hashes of the survivors of
1-8)``. Those hashes are listed in the round record (included, plus excluded for norm or probe),
so anyone recomputes the batch from the record, and no peer knows it before the round closes.

Aggregation: peers sorted by public key bytes; ``acc = zeros(n, float32)``; ``d.add_into(acc)``
in that order (one index_add_ per contribution: every position receives at most one value per
contribution, so the order of rounding is fixed); ``c = fl32(alpha / n_included)``;
``u = acc * c``; ``theta_next = theta - u``. Each of these is one correctly rounded float32
operation per element, identical on every SIMD path and thread count (no fused multiply-add).
``aggregate = sha256(float32 little-endian bytes of u)``. Fewer than ``min_contributions``
survivors carry theta_r over unchanged (``carried_over``; the survivors are still listed as
included, none applied, and aggregate is 32 zero bytes).
"""

from __future__ import annotations

import hashlib
import logging
import statistics
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from proofs.codec import short
from proofs.errors import EncodingError, VeritrainError
from proofs.hashing import Hash32, sha256
from proofs.jsonlimits import loads_untrusted
from trainer.compression import PayloadError, SparseDelta, decode_payload, payload_size
from trainer.data import Corpus, batch_offsets
from trainer.globalstate import load_flat
from trainer.recipe import SignedRunHeader
from trainer.roundrecord import Excluded, Included, file_label
from trainer.sharedrun import ZERO32, Genesis, SignedContribution, genesis_header_check
from trainer.sharedstore import is_safe_name

logger = logging.getLogger(__name__)

PROBE_MAGIC = b"veritrain/probe/v1\x00"
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
        detail=detail,
        built_on=built_on,
        norm=norm,
        probe_loss=probe_loss,
    )


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


def screen_duplicates(survivors: Sequence[Survivor]) -> tuple[list[Survivor], list[Excluded]]:
    """Check 8: one contribution per key and round, and no payload shared by two peers."""
    by_key: dict[bytes, list[Survivor]] = {}
    by_delta: dict[bytes, list[Survivor]] = {}
    for s in survivors:
        by_key.setdefault(bytes(s.pubkey), []).append(s)
        by_delta.setdefault(bytes(s.signed.contribution.delta), []).append(s)
    kept, out = [], []
    for s in survivors:
        same_key = by_key[bytes(s.pubkey)]
        copies = by_delta[bytes(s.signed.contribution.delta)]
        if len(same_key) > 1 and s is not min(same_key, key=lambda x: x.file):
            detail = f"a second contribution of peer {s.signed.contribution.peer} this round"
        elif len({bytes(c.pubkey) for c in copies}) > 1:
            others = sorted(
                {c.signed.contribution.peer for c in copies} - {s.signed.contribution.peer}
            )
            detail = f"payload identical to that of {', '.join(others)}"
        else:
            kept.append(s)
            continue
        out.append(
            exclusion(s.file, s.file_hash, "duplicate", detail, signed=s.signed, norm=s.norm)
        )
    return kept, out


def norm_limit(norms: Sequence[float], factor: float) -> float:
    """``factor`` times the median of ``norms`` (Python floats: the same on every machine)."""
    return factor * statistics.median(norms) if norms else 0.0


def screen_norms(
    survivors: Sequence[Survivor], factor: float
) -> tuple[list[Survivor], list[Excluded]]:
    """Check 9: exclude a norm above ``factor`` times the median of the survivors' norms."""
    limit = norm_limit([s.norm for s in survivors], factor)
    kept, out = [], []
    for s in survivors:
        if s.norm > limit:
            detail = f"norm {s.norm:.6g} > {factor:g} x median = {limit:.6g}"
            out.append(exclusion(s.file, s.file_hash, "norm", detail, signed=s.signed, norm=s.norm))
        else:
            kept.append(s)
    return kept, out


def probe_seed(genesis_hash: bytes, round_: int, contributions: Sequence[bytes]) -> int:
    """The probe batch's seed (module docstring)."""
    message = PROBE_MAGIC + bytes(genesis_hash) + struct.pack(">Q", round_)
    digest = hashlib.sha256(message + b"".join(sorted(bytes(c) for c in contributions))).digest()
    return int.from_bytes(digest[:8], "big")


def probe_offsets(genesis: Genesis, seed: int, corpus_size: int) -> tuple[int, ...]:
    """Corpus offsets of the probe batch for ``seed``."""
    return batch_offsets(
        seed,
        0,
        batch_size=genesis.screening.probe_batch,
        context=genesis.context,
        corpus_size=corpus_size,
    )


Prober = Callable[[torch.Tensor], float]
"""The loss of a flat parameter vector on the round's probe batch."""


def make_prober(model: nn.Module, corpus: Corpus, offsets: Sequence[int], context: int) -> Prober:
    """A :data:`Prober` that loads the vector into ``model`` (eval mode: no dropout) and returns
    its mean cross-entropy on the batch at ``offsets``."""
    batch = corpus.batch(offsets, context)

    def loss(flat: torch.Tensor) -> float:
        load_flat(model, flat)
        model.eval()
        with torch.no_grad():
            _, value = model(batch.inputs, batch.targets)
        if value is None:  # pragma: no cover - GPT returns a loss when given targets
            raise RuntimeError("model returned no loss")
        return float(value)

    return loss


def probe_worse(loss: float, base: float, margin: float) -> bool:
    """True when ``loss`` exceeds ``base`` by more than ``margin`` relative (NaN is worse)."""
    return not loss <= base + margin * abs(base)


def screen_probe(
    survivors: Sequence[Survivor], theta: torch.Tensor, ctx: RoundContext, prober: Prober
) -> tuple[list[tuple[Survivor, float]], list[Excluded], float]:
    """Check 10: each survivor's lone application against theta_r's loss. Returns the kept ones
    with their probe losses, the exclusions and the base loss."""
    margin, alpha = ctx.genesis.screening.probe_margin, ctx.genesis.outer.alpha
    base = prober(theta)
    kept, out = [], []
    for s in survivors:
        loss = prober(apply_sum(theta, [s.delta], alpha)[0])
        if probe_worse(loss, base, margin):
            detail = f"probe loss {loss:.6g} > base {base:.6g} + {margin:g} relative"
            out.append(
                exclusion(
                    s.file,
                    s.file_hash,
                    "probe",
                    detail,
                    signed=s.signed,
                    norm=s.norm,
                    probe_loss=loss,
                )
            )
        else:
            kept.append((s, loss))
    return kept, out, base


def outer_scale(alpha: float, count: int) -> float:
    """``fl32(alpha / count)``: the Python division, rounded to float32 once."""
    return float(np.float32(alpha / count))


def apply_sum(
    theta: torch.Tensor, deltas: Sequence[SparseDelta], alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(theta_next, u)`` of the module docstring; ``deltas`` already in aggregation order."""
    if not deltas:
        raise ValueError("apply_sum needs at least one contribution")
    acc = torch.zeros(theta.numel(), dtype=torch.float32)
    for d in deltas:
        d.add_into(acc)
    u = acc * outer_scale(alpha, len(deltas))
    return theta - u, u


def aggregate_hash(u: torch.Tensor) -> Hash32:
    """sha256 of the float32 little-endian bytes of ``u`` (hashed in place, no copy)."""
    array = u.contiguous().numpy()
    if array.dtype != np.dtype("<f4"):
        array = array.astype("<f4")
    return Hash32(hashlib.sha256(array.data).digest())


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundResult:
    """What closing a round decided: the lists of the round record, and theta_{r+1}."""

    included: tuple[Included, ...]
    excluded: tuple[Excluded, ...]
    base_probe_loss: float | None
    aggregate: Hash32
    theta_next: torch.Tensor
    carried_over: bool


def close_round(
    ctx: RoundContext,
    candidates: Sequence[CandidateFile],
    source: ContributionSource,
    theta: torch.Tensor,
    *,
    prober_for: Callable[[int], Prober] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RoundResult:
    """Screen ``candidates`` (the unscreened files) and aggregate the survivors into theta_{r+1}.

    ``prober_for(seed)`` builds the probe for a seed (required when the genesis enables it).
    ``progress(done, total)`` is called after each file is screened.
    """
    screening = ctx.genesis.screening
    survivors: list[Survivor] = []
    excluded: list[Excluded] = []
    for i, candidate in enumerate(candidates):
        outcome = screen_file(candidate, ctx, source)
        (survivors if isinstance(outcome, Survivor) else excluded).append(outcome)  # type: ignore[arg-type]
        if progress is not None:
            progress(i + 1, len(candidates))
    survivors, dupes = screen_duplicates(survivors)
    excluded += dupes
    seed = probe_seed(
        ctx.genesis_hash, ctx.round, [s.signed.contribution.hash() for s in survivors]
    )
    survivors, by_norm = screen_norms(survivors, screening.norm_factor)
    excluded += by_norm
    base_loss: float | None = None
    if screening.probe and survivors:
        if prober_for is None:
            raise ValueError("the genesis enables the probe: pass prober_for")
        scored, by_probe, base_loss = screen_probe(survivors, theta, ctx, prober_for(seed))
        excluded += by_probe
    else:
        scored = [(s, None) for s in survivors]  # type: ignore[misc]
    scored.sort(key=lambda pair: bytes(pair[0].pubkey))
    included = tuple(
        Included(
            peer=s.signed.contribution.peer,
            contribution=s.signed.contribution.hash(),
            delta=s.signed.contribution.delta,
            norm=s.norm,
            probe_loss=loss,
        )
        for s, loss in scored
    )
    excluded.sort(key=lambda e: e.file)
    if len(scored) < max(screening.min_contributions, 1):
        return RoundResult(
            included=included,
            excluded=tuple(excluded),
            base_probe_loss=base_loss,
            aggregate=ZERO32,
            theta_next=theta,
            carried_over=True,
        )
    theta_next, u = apply_sum(theta, [s.delta for s, _ in scored], ctx.genesis.outer.alpha)
    return RoundResult(
        included=included,
        excluded=tuple(excluded),
        base_probe_loss=base_loss,
        aggregate=aggregate_hash(u),
        theta_next=theta_next,
        carried_over=False,
    )


__all__ = [
    "MAX_RECORD_BYTES",
    "PROBE_MAGIC",
    "CandidateFile",
    "ContributionSource",
    "RoundContext",
    "RoundResult",
    "Survivor",
    "aggregate_hash",
    "apply_sum",
    "close_round",
    "make_prober",
    "outer_scale",
    "probe_offsets",
    "probe_seed",
    "record_name",
    "screen_file",
]

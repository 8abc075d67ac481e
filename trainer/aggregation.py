"""Closing one round of a shared run, as pure functions: round-wide screening and the sum.

Nothing here reads or writes a store (trainer.aggregator does, through trainer.roundinputs).
Every unscreened file first goes through checks 1-7 of trainer.screening; then, over the round:

8. ``duplicate``: a second contribution of one key in the round. A payload identical to another
   peer's is *not* excluded: nothing here tells the copy from the original, and excluding both
   would let any roster peer knock an honest one out of a round by copying its payload. Both stay
   included, the sum applies that payload once (below), and the audit of each contribution
   (issue #16: its payload must be what its own inner run and error feedback produce) catches the
   copy whenever it is sampled;
9. ``norm``: an L2 norm above ``norm_factor`` times the median norm of the survivors of 1-8;
10. ``probe`` (when the genesis enables it): applied alone (:func:`apply_sum` with that one
    contribution: ``theta_r - fl32(alpha) * d``), its loss on the probe batch exceeds theta_r's
    by more than ``probe_margin`` relative (a NaN loss is worse), or its gain (theta_r's loss
    minus its own) is below ``probe_gain`` times the median gain of the probed contributions
    when that median is positive (Gauntlet-style: an update of plausible norm in a random
    direction barely moves the loss while honest ones lower it; measured in
    benchmarks/shared_quality.py).

Probe batch: ``batch_offsets(seed, 0, batch_size=probe_batch, context=genesis.context, ...)``
over the genesis dataset, model in eval mode (no dropout), where seed = first 8 bytes
(big-endian) of ``sha256(PROBE_MAGIC || genesis hash || u64be(r) || the sorted contribution
hashes of the survivors of 1-8)``. Those hashes are all in the round record (included, plus
excluded for norm or probe), so anyone recomputes the batch from the record, and no peer can
know it before the round closes.

Aggregation: peers sorted by public key bytes; of several included contributions with one payload
hash only the first in that order is summed; ``acc = zeros(n, float32)``; ``d.add_into(acc)`` in
that order (one index_add_ per distinct payload; each position receives at most one value per
payload, so the order of rounding is fixed); ``c = fl32(alpha / n_distinct)``;
``u = acc * c``; ``theta_next = theta - u``. Each is one correctly rounded float32 operation per
element, identical on every SIMD path and thread count: no fused multiply-add (``theta.add(acc,
alpha=-c)`` or ``addcmul`` would fuse on AVX2/AVX-512 and not on the default path).
``aggregate = sha256(float32 little-endian bytes of u)``. Fewer than ``min_contributions``
survivors carry theta_r over unchanged (``carried_over``: the survivors are still listed as
included, none applied, and the aggregate is 32 zero bytes).
"""

from __future__ import annotations

import hashlib
import logging
import math
import statistics
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from proofs.hashing import Hash32
from trainer.compression import SparseDelta
from trainer.data import Corpus, batch_offsets
from trainer.globalstate import load_flat
from trainer.roundrecord import Excluded, Included
from trainer.screening import (
    CandidateFile,
    ContributionSource,
    RoundContext,
    Survivor,
    exclusion,
    screen_file,
)
from trainer.sharedrun import ZERO32, Genesis

logger = logging.getLogger(__name__)

PROBE_MAGIC = b"veritrain/probe/v1\x00"


def screen_duplicates(survivors: Sequence[Survivor]) -> tuple[list[Survivor], list[Excluded]]:
    """Check 8: one contribution per key and round (identical payloads of two peers both stay:
    see the module docstring)."""
    by_key: dict[bytes, list[Survivor]] = {}
    for s in survivors:
        by_key.setdefault(bytes(s.pubkey), []).append(s)
    kept, out = [], []
    for s in survivors:
        same_key = by_key[bytes(s.pubkey)]
        if len(same_key) > 1 and s is not min(same_key, key=lambda x: x.file):
            detail = f"a second contribution of peer {s.signed.contribution.peer} this round"
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


def probe_threshold(base: float, losses: Sequence[float], margin: float, gain: float) -> float:
    """The highest probe loss a contribution may reach and stay: ``base + margin * |base|``, and
    with ``gain`` > 0 also ``base - gain * median(base - losses)`` when that median is positive
    (NaN losses count as no gain). Python floats: the same on every machine."""
    limit = base + margin * abs(base)
    gains = [base - loss if loss == loss else -math.inf for loss in losses]
    if gain > 0 and gains:
        median = statistics.median(gains)
        if median > 0:
            limit = min(limit, base - gain * median)
    return limit


def screen_probe(
    survivors: Sequence[Survivor], theta: torch.Tensor, ctx: RoundContext, prober: Prober
) -> tuple[list[tuple[Survivor, float]], list[Excluded], float]:
    """Check 10: each survivor's lone application against theta_r's loss and against the median
    gain. Returns the kept ones with their probe losses, the exclusions and the base loss."""
    screening, alpha = ctx.genesis.screening, ctx.genesis.outer.alpha
    base = prober(theta)
    losses = [prober(apply_sum(theta, [s.delta], alpha)[0]) for s in survivors]
    limit = probe_threshold(base, losses, screening.probe_margin, screening.probe_gain)
    kept, out = [], []
    for s, loss in zip(survivors, losses, strict=True):
        if not loss <= limit:
            detail = (
                f"probe loss {loss:.6g} > limit {limit:.6g} (base {base:.6g}, margin "
                f"{screening.probe_margin:g}, gain {screening.probe_gain:g} x median)"
            )
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


def distinct_payloads(included: Sequence[tuple[bytes, SparseDelta]]) -> list[SparseDelta]:
    """The payloads to sum, from (payload hash, decoded payload) pairs in aggregation order: the
    first of several identical payloads, at its place in that order (see the module docstring)."""
    distinct: dict[bytes, SparseDelta] = {}
    for digest, delta in included:
        distinct.setdefault(bytes(digest), delta)
    return list(distinct.values())


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
    pairs = [(inc.delta, s.delta) for inc, (s, _) in zip(included, scored, strict=True)]
    theta_next, u = apply_sum(theta, distinct_payloads(pairs), ctx.genesis.outer.alpha)
    return RoundResult(
        included=included,
        excluded=tuple(excluded),
        base_probe_loss=base_loss,
        aggregate=aggregate_hash(u),
        theta_next=theta_next,
        carried_over=False,
    )


__all__ = [
    "PROBE_MAGIC",
    "Prober",
    "RoundResult",
    "aggregate_hash",
    "apply_sum",
    "close_round",
    "distinct_payloads",
    "make_prober",
    "outer_scale",
    "probe_offsets",
    "probe_seed",
    "probe_threshold",
    "screen_duplicates",
    "screen_norms",
    "screen_probe",
]

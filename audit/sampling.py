"""Which steps an auditor checks, and how likely that sample is to catch a cheat.

The sample is a pure function of a beacon, the run's final manifest hash and the auditor's public
key (issue 4): the peer commits first, the beacon is drawn afterwards, so the peer cannot know which
steps will be re-executed when it decides where to cheat; and because the auditor's key is mixed in,
two auditors of the same run check different steps. Anyone holding the three inputs recomputes the
sample with :func:`sample_steps`.

Detection probability for a peer that cheats on a fraction ``f`` of its steps and an auditor that
samples ``n`` distinct steps: with replacement (or a very long run) ``1 - (1 - f)^n``; without
replacement from ``N`` steps of which ``K`` are cheated, the hypergeometric
``1 - C(N - K, n) / C(N, n)``, which is always at least as large.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import NewType

from proofs.errors import VeritrainError
from proofs.hashing import Hash32

Step = NewType("Step", int)
SampleSeed = NewType("SampleSeed", bytes)

SAMPLE_DOMAIN = b"veritrain/audit-sample/v1"
MAX_SAMPLE_SIZE = 1 << 20


class SamplingError(VeritrainError, ValueError):
    """A sample was asked for with impossible parameters."""


def _framed(part: bytes) -> bytes:
    # Length-prefix every part so that (a, bc) and (ab, c) can never hash alike.
    return len(part).to_bytes(4, "big") + part


def sample_seed(*, beacon: bytes, manifest_hash: bytes, auditor_pubkey: bytes) -> SampleSeed:
    """H(domain || beacon || final manifest hash || auditor public key), each part length-framed."""
    h = hashlib.sha256(_framed(SAMPLE_DOMAIN))
    for part in (beacon, manifest_hash, auditor_pubkey):
        h.update(_framed(bytes(part)))
    return SampleSeed(h.digest())


class _HashStream:
    """Counter-mode sha256 over the seed: a reproducible stream of unbiased integers."""

    def __init__(self, seed: bytes) -> None:
        self._seed = bytes(seed)
        self._counter = 0

    def _word(self) -> int:
        block = hashlib.sha256(self._seed + self._counter.to_bytes(8, "big")).digest()
        self._counter += 1
        return int.from_bytes(block[:8], "big")

    def below(self, bound: int) -> int:
        """Uniform integer in [0, bound) by rejection sampling (no modulo bias)."""
        limit = (1 << 64) - ((1 << 64) % bound)
        while True:
            word = self._word()
            if word < limit:
                return word % bound


def sample_steps(seed: bytes, *, total_steps: int, count: int) -> tuple[Step, ...]:
    """``count`` distinct steps out of ``range(total_steps)``, sorted, determined by ``seed``.

    A partial Fisher-Yates shuffle driven by :class:`_HashStream` (sparse, so a huge run costs
    only ``count`` draws). ``count`` larger than the run is clipped to the whole run.
    Raises :class:`SamplingError` on a negative count or a run without steps.
    """
    if total_steps <= 0:
        raise SamplingError(f"a run needs at least one step to sample, got {total_steps}")
    if count < 0 or count > MAX_SAMPLE_SIZE:
        raise SamplingError(f"sample size must be in [0, {MAX_SAMPLE_SIZE}], got {count}")
    count = min(count, total_steps)
    stream = _HashStream(seed)
    swapped: dict[int, int] = {}
    chosen: list[Step] = []
    for i in range(count):
        j = i + stream.below(total_steps - i)
        chosen.append(Step(swapped.get(j, j)))
        swapped[j] = swapped.get(i, i)
    return tuple(sorted(chosen))


def detection_probability(cheat_fraction: float, sampled: int) -> float:
    """1 - (1 - f)^n: the chance that one of ``n`` independent draws hits a cheated step."""
    _check_fraction(cheat_fraction)
    if sampled < 0:
        raise SamplingError(f"sample size must be >= 0, got {sampled}")
    return 1.0 - (1.0 - cheat_fraction) ** sampled


def detection_probability_exact(*, total_steps: int, cheated_steps: int, sampled: int) -> float:
    """Hypergeometric 1 - C(N-K, n) / C(N, n), computed in exact rational arithmetic."""
    if total_steps <= 0 or not 0 <= cheated_steps <= total_steps:
        raise SamplingError(
            f"need 0 <= cheated_steps <= total_steps and total_steps > 0, "
            f"got {cheated_steps} of {total_steps}"
        )
    if not 0 <= sampled <= total_steps:
        raise SamplingError(f"sample size must be in [0, {total_steps}], got {sampled}")
    miss = Fraction(
        math.comb(total_steps - cheated_steps, sampled), math.comb(total_steps, sampled)
    )
    return float(1 - miss)


def cheated_steps_for(cheat_fraction: float, total_steps: int) -> int:
    """The number of cheated steps a fraction stands for in a run: at least one if f > 0."""
    _check_fraction(cheat_fraction)
    if cheat_fraction == 0.0:
        return 0
    return max(1, math.ceil(cheat_fraction * total_steps - 1e-9))


def sample_size_for(
    *, cheat_fraction: float, confidence: float, total_steps: int | None = None
) -> int:
    """The smallest n whose detection probability reaches ``confidence``.

    Without ``total_steps`` the binomial bound ``ceil(log(1-c) / log(1-f))``; with it, the exact
    hypergeometric (found by bisection, since it grows with n), never more than the run itself.
    """
    _check_fraction(cheat_fraction)
    if cheat_fraction == 0.0:
        raise SamplingError("a peer that never cheats cannot be detected: cheat fraction is 0")
    if not 0.0 < confidence < 1.0:
        raise SamplingError(f"confidence must be in (0, 1), got {confidence}")
    if total_steps is None:
        if cheat_fraction == 1.0:
            return 1
        return max(1, math.ceil(math.log1p(-confidence) / math.log1p(-cheat_fraction) - 1e-12))
    cheated = cheated_steps_for(cheat_fraction, total_steps)
    lo, hi = 1, total_steps
    while lo < hi:
        mid = (lo + hi) // 2
        p = detection_probability_exact(total_steps=total_steps, cheated_steps=cheated, sampled=mid)
        if p >= confidence:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _check_fraction(f: float) -> None:
    if not (isinstance(f, float | int) and 0.0 <= f <= 1.0):
        raise SamplingError(f"cheat fraction must be in [0, 1], got {f!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class SamplePlan:
    """A sample and what it buys: recomputable by anyone from the seed inputs."""

    seed: Hash32
    total_steps: int
    steps: tuple[Step, ...]
    cheat_fraction: float
    detection_binomial: float
    detection_exact: float


def plan_sample(
    *,
    beacon: bytes,
    manifest_hash: bytes,
    auditor_pubkey: bytes,
    total_steps: int,
    count: int | None = None,
    cheat_fraction: float = 0.05,
    confidence: float | None = None,
) -> SamplePlan:
    """Draw the sample and report detection against ``cheat_fraction``.

    Give either ``count`` or ``confidence`` (then n = :func:`sample_size_for` on this run).
    """
    if count is not None and confidence is not None:
        raise SamplingError("give a sample size or a target confidence, not both")
    if count is None:
        if confidence is None:
            raise SamplingError("give a sample size or a target confidence")
        count = sample_size_for(
            cheat_fraction=cheat_fraction, confidence=confidence, total_steps=total_steps
        )
    seed = sample_seed(beacon=beacon, manifest_hash=manifest_hash, auditor_pubkey=auditor_pubkey)
    steps = sample_steps(seed, total_steps=total_steps, count=count)
    cheated = cheated_steps_for(cheat_fraction, total_steps)
    return SamplePlan(
        seed=Hash32(seed),
        total_steps=total_steps,
        steps=steps,
        cheat_fraction=cheat_fraction,
        detection_binomial=detection_probability(cheat_fraction, len(steps)),
        detection_exact=detection_probability_exact(
            total_steps=total_steps, cheated_steps=cheated, sampled=len(steps)
        ),
    )

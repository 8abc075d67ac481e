"""Dishonest peers of a shared run, for tests and the demo: a testing aid, not a protocol role.

Each is a :class:`~trainer.peer.Behaviour` that :func:`trainer.peer.run_round` follows instead of
the honest protocol (docs/threat-model.md says what catches each):

- ``fabricate``: sends random noise with the norm of its real delta (a made-up contribution of
  plausible size); its inner run is honest. The probe's gain rule usually excludes it; when it
  gets in, the audit's error-feedback check fails it.
- ``stale``: builds round r on theta_{r-1} and says so in ``base_root``; the aggregator screens it
  ``stale`` (built on round r-1).
- ``copy:NAME``: trains its own inner run, then waits for NAME's contribution of the same round
  and re-signs NAME's payload and payload-derived fields (delta, size, entries, final state,
  local state, losses) as its own, keeping its own inner run's header and manifest so that the
  aggregator's inner-run check passes. The aggregator keeps both (it cannot tell the original;
  an identical payload is summed once); the audit's final-state check fails the copy.

``trainer join --behaviour`` (hidden from --help) takes these names.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from proofs.errors import VeritrainError
from trainer.contribution import Contribution
from trainer.peer import Behaviour, PeerError
from trainer.sharedstore import SharedStore

logger = logging.getLogger(__name__)

BEHAVIOURS = ("honest", "fabricate", "stale", "copy:NAME")

_COPIED = ("delta", "payload_bytes", "nnz", "final_state", "local_state", "losses")
"""The victim's fields a copier takes: everything its payload and inner result decide."""


def fabricator(seed: int = 0) -> Behaviour:
    """Random normal noise scaled to the norm of the real delta, a new draw every round."""
    rounds = [0]

    def replace(delta: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + rounds[0])
        rounds[0] += 1
        noise = torch.randn(delta.shape, generator=gen, dtype=torch.float32)
        return noise * (float(delta.norm()) / float(noise.norm()))

    return Behaviour(replace_delta=replace)


def stale(by: int = 1) -> Behaviour:
    """Build round r on theta_{r-by} (round 0 on theta_0)."""
    return Behaviour(stale_by=by)


def copier(
    store: SharedStore, victim: str, *, poll_s: float = 0.2, wait_s: float = 600.0
) -> Behaviour:
    """Re-sign ``victim``'s contribution of the same round (see the module docstring). Waits up to
    ``wait_s`` for it while the round is open; when none comes, publishes its own honest one."""

    def rewrite(own: Contribution, payload: bytes) -> tuple[Contribution, bytes]:
        r, name = own.round, f"r{own.round:06d}.json"
        deadline = time.monotonic() + wait_s
        while (victim, name) not in store.list_contribution_files():
            latest = store.latest_round()
            if (latest is not None and latest >= r) or time.monotonic() > deadline:
                logger.info("copier: %s sent nothing for round %d; sending its own", victim, r)
                return own, payload
            time.sleep(poll_s)
        try:
            theirs = store.read_contribution(victim, r).contribution
            copied = store.read_contribution_file(
                victim, f"r{r:06d}.delta", max_bytes=theirs.payload_bytes
            )
        except VeritrainError as exc:
            logger.warning(
                "copier: %s's round %d is unreadable (%s); sending its own", victim, r, exc
            )
            return own, payload
        fields = {f: getattr(theirs, f) for f in _COPIED}
        return dataclasses.replace(own, **fields), copied

    return Behaviour(rewrite=rewrite)


def parse_behaviour(text: str, store: SharedStore, roster: frozenset[str]) -> Behaviour | None:
    """``honest`` (None), ``fabricate``, ``stale`` or ``copy:NAME`` (NAME in ``roster``).
    PeerError on anything else."""
    if text == "honest":
        return None
    if text == "fabricate":
        return fabricator()
    if text == "stale":
        return stale()
    kind, _, victim = text.partition(":")
    if kind == "copy" and victim in roster:
        return copier(store, victim)
    raise PeerError(
        f"--behaviour {text!r}: expected one of {', '.join(BEHAVIOURS)} (NAME a roster peer: "
        f"{', '.join(sorted(roster))})"
    )

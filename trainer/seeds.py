"""Per-step replay seeds: every bit of a step's randomness is a pure function of (run seed, step).

A seed is sha256 over a versioned, length-prefixed message naming a *domain* (what the randomness
is for), the run seed and the step, truncated to 63 bits. A hash rather than ``seed + step``: with
addition, run seed ``s`` at step ``t + 1`` equals run seed ``s + 1`` at step ``t``, so two runs
would share dropout masks one step apart; a hash makes every (domain, run seed, step) independent.

The auditor recomputes exactly these values (``replay_seed``) before re-executing a step.
"""

from __future__ import annotations

import hashlib
import struct
from typing import NewType

import torch

Seed = NewType("Seed", int)
"""A non-negative 63-bit integer fed to ``torch.manual_seed``."""

RunSeed = NewType("RunSeed", int)
"""The run's master seed in ``[0, 2**64)``, derived by :func:`run_seed_for` and signed in the
header; no peer chooses it."""

SEED_MAGIC = b"veritrain/seed/v1\x00"
RUN_SEED_MAGIC = b"veritrain/run-seed/v1\x00"
REPLAY_DOMAIN = "replay"
"""Domain of the seed set before each training step (dropout and any other sampling)."""
INIT_DOMAIN = "init"
"""Domain of the seed set before the model is built (parameter initialisation)."""

_MAX_RUN_SEED = 1 << 64


def check_run_seed(run_seed: int) -> RunSeed:
    """Return ``run_seed`` as a :data:`RunSeed`; raise ValueError unless it is in ``[0, 2**64)``."""
    if isinstance(run_seed, bool) or not isinstance(run_seed, int):
        raise TypeError(f"run seed must be an int, got {type(run_seed).__name__}")
    if not 0 <= run_seed < _MAX_RUN_SEED:
        raise ValueError(f"run seed must be in [0, 2**64), got {run_seed}")
    return RunSeed(run_seed)


def run_seed_for(pubkey: bytes, assignment: bytes, run_id: str) -> RunSeed:
    """The run seed of run ``run_id`` of the peer with BLS key ``pubkey`` under ``assignment``
    (the assignment's 32-byte hash; 32 zero bytes for work no epoch assigned).

    Message: ``RUN_SEED_MAGIC || pubkey (48) || assignment (32) || u32be(len(run_id)) || run_id
    (UTF-8)``; seed = first 8 bytes of its sha256, big-endian. Binding the seed to the key is what
    makes a run the peer's own: another peer's key gives other batches and other dropout masks, so
    a copied or re-run store can neither be re-signed nor be reproduced under the copier's key.
    Raises ValueError on a key that is not 48 bytes or an assignment that is not 32.
    """
    if len(pubkey) != 48:
        raise ValueError(f"pubkey must be 48 bytes, got {len(pubkey)}")
    if len(assignment) != 32:
        raise ValueError(f"assignment hash must be 32 bytes, got {len(assignment)}")
    name = run_id.encode("utf-8")
    message = RUN_SEED_MAGIC + bytes(pubkey) + bytes(assignment) + struct.pack(">I", len(name))
    digest = hashlib.sha256(message + name).digest()
    return RunSeed(int.from_bytes(digest[:8], "big"))


def derive_seed(domain: str, run_seed: int, step: int) -> Seed:
    """The seed for ``domain`` at ``step`` of the run seeded ``run_seed``.

    Message:
    ``SEED_MAGIC || u32be(len(domain)) || domain (UTF-8) || u64be(run_seed) || u64be(step)``;
    seed = first 8 bytes of its sha256, big-endian, shifted right by one bit (63 bits, so it fits a
    signed 64-bit integer in every language and JSON library). Raises ValueError on a negative step
    or a run seed outside ``[0, 2**64)``.
    """
    check_run_seed(run_seed)
    if step < 0 or step >= _MAX_RUN_SEED:
        raise ValueError(f"step must be in [0, 2**64), got {step}")
    tag = domain.encode("utf-8")
    message = SEED_MAGIC + struct.pack(">I", len(tag)) + tag + struct.pack(">QQ", run_seed, step)
    digest = hashlib.sha256(message).digest()
    return Seed(int.from_bytes(digest[:8], "big") >> 1)


def replay_seed(run_seed: int, step: int) -> Seed:
    """The seed set on every torch generator right before training step ``step``."""
    return derive_seed(REPLAY_DOMAIN, run_seed, step)


def init_seed(run_seed: int) -> Seed:
    """The seed set right before the model is built, so its initial weights are reproducible."""
    return derive_seed(INIT_DOMAIN, run_seed, 0)


def seed_generators(seed: int) -> None:
    """Seed torch's default CPU generator and every CUDA device's generator with ``seed``.

    ``torch.manual_seed`` already seeds all CUDA devices (lazily when CUDA is not initialised yet);
    the explicit call keeps that true if torch ever narrows it.
    """
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def cpu_rng_state(seed: int) -> torch.Tensor:
    """The CPU generator state right after ``seed_generators(seed)``, as a uint8 tensor.

    State checkpoints store this for the step they resume at; anyone can recompute it from the seed,
    which is what lets the gradient-to-state chain reproduce a state checkpoint bit for bit.
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator.get_state()

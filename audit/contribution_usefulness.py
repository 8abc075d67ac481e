"""Usefulness of a shared-run contribution: the held-out loss at theta_r and at
theta_r - fl32(alpha)*d (the contribution applied alone, as the aggregator applies one), on a
batch no peer trains on (docs/auditing.md, "Auditing shared-run contributions").

The batch: ``batch_offsets(seed, r, batch_size=genesis.batch_size, context=genesis.context)`` over
the genesis held-out corpus when the genesis names one, else over the genesis dataset, with
seed = the first 8 bytes (big-endian) of ``sha256(b"veritrain/shared-heldout/v1" || genesis
hash)``. Model in eval mode (no dropout), no gradients.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from trainer.aggregation import apply_sum
from trainer.compression import SparseDelta
from trainer.data import Corpus, batch_offsets
from trainer.globalstate import load_flat
from trainer.sharedrun import Genesis

HELDOUT_MAGIC = b"veritrain/shared-heldout/v1"


def heldout_seed(genesis: Genesis) -> int:
    """The held-out batch seed: first 8 bytes (big-endian) of sha256(MAGIC || genesis hash)."""
    return int.from_bytes(hashlib.sha256(HELDOUT_MAGIC + genesis.hash()).digest()[:8], "big")


def heldout_offsets(genesis: Genesis, r: int, corpus_size: int) -> tuple[int, ...]:
    return batch_offsets(
        heldout_seed(genesis), r, batch_size=genesis.batch_size, context=genesis.context,
        corpus_size=corpus_size,
    )  # fmt: skip


def heldout_description(genesis: Genesis, r: int, held_out: bool) -> str:
    source = genesis.heldout if held_out and genesis.heldout is not None else genesis.dataset
    kind = "heldout" if held_out else "dataset"
    return (
        f"{kind}=0x{source.root.hex()};seed=0x{heldout_seed(genesis):016x};round={r};"
        f"batch={genesis.batch_size};ctx={genesis.context}"
    )


def usefulness(
    model: nn.Module, genesis: Genesis, r: int, corpus: Corpus, theta_r: torch.Tensor,
    d: SparseDelta | None,
) -> tuple[float, float]:  # fmt: skip
    """(loss at theta_r, loss at theta_r - fl32(alpha)*d) on the round's held-out batch, eval
    mode, no gradients; loss_after is NaN when there is no decodable d."""
    batch = corpus.batch(heldout_offsets(genesis, r, len(corpus.data)), genesis.context)

    def loss(flat: torch.Tensor) -> float:
        load_flat(model, flat)
        model.eval()
        with torch.inference_mode():
            _, value = model(batch.inputs, batch.targets)
        return math.nan if value is None else float(value)

    before = loss(theta_r)
    after = math.nan if d is None else loss(apply_sum(theta_r, [d], genesis.outer.alpha)[0])
    return before, after

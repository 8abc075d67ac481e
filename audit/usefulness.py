"""Usefulness: does the step's committed update lower the loss on a fixed held-out batch?

An honest step can be worthless (noise) and a re-executed step can still be a waste of compute;
rewards should pay for updates that help. The auditor measures the mean cross-entropy on one
fixed batch, in eval mode (no dropout) and without gradients, on the state before step ``t`` and
on the state after applying step ``t``'s *committed* update through the recorded optimizer.
``gain = loss_before - loss_after``.

The batch is cut from the run's corpus at offsets given by :data:`HELDOUT_SEED` (the same for every
run and step, so figures compare across peers). It is "held out" only in the sense that the peer
did not choose it: training samples are spread over the whole corpus.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from trainer.data import Corpus
from trainer.recipe import RunHeader

HELDOUT_SEED = int.from_bytes(hashlib.sha256(b"veritrain/heldout/v1").digest()[:8], "big") >> 1
HELDOUT_STEP = 0


def heldout_description(header: RunHeader) -> str:
    return f"seed={HELDOUT_SEED};step={HELDOUT_STEP};batch={header.batch_size};ctx={header.context}"


HeldoutBatch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets) on the auditor's device


def heldout_batch(corpus: Corpus, header: RunHeader, device: torch.device) -> HeldoutBatch:
    """The fixed held-out batch for ``header``'s batch size and context."""
    batch = corpus.batch_for_step(
        HELDOUT_SEED, HELDOUT_STEP, batch_size=header.batch_size, context=header.context
    )
    return batch.inputs.to(device), batch.targets.to(device)


def heldout_loss(model: nn.Module, batch: HeldoutBatch) -> float | None:
    """Mean loss of ``model`` on ``batch`` in eval mode without gradients (None if the model
    returns no loss). Leaves the model's train/eval mode as it found it."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            _, loss = model(*batch)
    finally:
        model.train(was_training)
    return None if loss is None else float(loss)

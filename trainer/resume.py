"""Resuming a run from its store: the last complete state checkpoint and the chain position there.

A window is complete once its manifest exists (the committer writes it after every artifact it
names), so resuming means: load the state checkpoint of the last manifest (or the header's initial
state), check it against its root, load it into the model and optimizer, and continue the hash
chain from that manifest. Artifacts of a window that was cut short are left where they are; the
rerun finds them already present (same content, same name) and does not write them again.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from trainer.artifact import first_bad_leaf
from trainer.checkpoint import ParamLayout, decode_checkpoint, restore_state
from trainer.manifest import StateRef
from trainer.pipeline import ChainPosition
from trainer.recipe import RunHeader, SignedRunHeader
from trainer.store import RunStore, StoreError

logger = logging.getLogger(__name__)


def header_mismatch(stored: RunHeader, built: RunHeader) -> list[str]:
    """Header fields (other than the initial state) on which two recipes differ."""
    a, b = stored.to_json(), built.to_json()
    return sorted(k for k in a if k != "initial_state" and a[k] != b[k])


def load_state(store: RunStore, ref: StateRef) -> dict[str, torch.Tensor]:
    """Read a state checkpoint and check it against ``ref.root``; StoreError on a mismatch."""
    index, leaves = store.read_artifact(ref.root)
    bad = first_bad_leaf(index, leaves, ref.root)
    if bad is not None:
        raise StoreError(f"state checkpoint at step {ref.step} is corrupt (leaf {bad})")
    return decode_checkpoint(leaves)


def resume_position(
    store: RunStore,
    signed: SignedRunHeader,
    built: RunHeader,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    layout: ParamLayout,
) -> tuple[ChainPosition, int]:
    """Restore ``model``/``optimizer`` from the store's last complete window.

    Returns the chain position and the step to train next. Raises StoreError when the store holds
    another run (different recipe or key) or its last checkpoint is missing or corrupt.
    """
    differs = header_mismatch(signed.header, built)
    if differs:
        raise StoreError(f"{store.url} holds a different run (fields differ: {', '.join(differs)})")
    windows = store.manifest_windows()
    if windows != list(range(len(windows))):
        raise StoreError(f"{store.url}: manifest windows are not contiguous: {windows}")
    header_hash = signed.header.hash()
    if not windows:
        ref = signed.header.initial_state
        position = ChainPosition(window=0, prev_record=header_hash, prev_manifest=header_hash)
    else:
        last = store.read_manifest(windows[-1]).manifest
        if not last.records:
            raise StoreError(f"{store.url}: window {last.window} has no step records")
        ref = last.state
        position = ChainPosition(
            window=last.window + 1, prev_record=last.records[-1].hash(), prev_manifest=last.hash()
        )
    step = restore_state(model, optimizer, layout, load_state(store, ref))
    if step != ref.step:
        raise StoreError(f"state checkpoint says step {step}, its manifest says {ref.step}")
    logger.info("resuming %s at step %d (window %d)", store.url, step, position.window)
    return position, step

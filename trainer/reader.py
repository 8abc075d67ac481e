"""RunReader: what an auditor needs from a run store, typed and checked against the commitments.

Every tensor read here is checked against the root it is committed under (StoreError otherwise);
signatures are NOT checked here (``trainer.verify`` and the auditor do that once per manifest).
Building blocks for re-executing step t: ``model_at(t)`` (registry model with the parameters before
step t), ``batch(t, corpus)``, ``replay_seed(t)`` and ``gradients(t)`` (what the peer committed).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Mapping

import torch
from torch import nn

from proofs.encoding import ChunkRef, parse_header
from proofs.hashing import leaf_hash
from trainer.artifact import first_bad_leaf
from trainer.checkpoint import BUFFER, PARAM, decode_checkpoint
from trainer.data import Batch, Corpus
from trainer.manifest import StateRef, StepRecord, WindowManifest
from trainer.models import build_model
from trainer.recipe import RunHeader, SignedRunHeader
from trainer.replay import apply_gradients
from trainer.resume import load_state
from trainer.seeds import Seed
from trainer.seeds import replay_seed as derive_replay_seed
from trainer.store import RunStore, StoreError, object_name

logger = logging.getLogger(__name__)


class RunReader:
    """Read-only view of one run. Raises StoreError on missing or mismatching data."""

    def __init__(self, store: RunStore | str) -> None:
        self.store = store if isinstance(store, RunStore) else RunStore(store)
        self._signed: SignedRunHeader | None = None
        self._manifests: list[WindowManifest] | None = None
        self._starts: list[int] = []

    @property
    def signed_header(self) -> SignedRunHeader:
        if self._signed is None:
            self._signed = self.store.read_header()
        return self._signed

    @property
    def header(self) -> RunHeader:
        return self.signed_header.header

    def manifests(self) -> list[WindowManifest]:
        """Every window manifest in order (read once)."""
        if self._manifests is None:
            self._manifests = [m.manifest for m in self.store.read_manifests()]
            self._starts = [m.first_step for m in self._manifests]
        return self._manifests

    @property
    def committed_steps(self) -> int:
        """Number of steps covered by manifests (steps 0 .. committed_steps - 1)."""
        manifests = self.manifests()
        return manifests[-1].end_step if manifests else 0

    def window_of(self, step: int) -> WindowManifest:
        """The manifest whose records include ``step``; KeyError if none does."""
        manifests = self.manifests()
        i = bisect.bisect_right(self._starts, step) - 1
        if i < 0 or not manifests[i].first_step <= step < manifests[i].end_step:
            raise KeyError(f"step {step} is not committed (0..{self.committed_steps - 1})")
        return manifests[i]

    def record(self, step: int) -> StepRecord:
        """The step record of ``step``; KeyError if not committed."""
        window = self.window_of(step)
        return window.records[step - window.first_step]

    def replay_seed(self, step: int) -> Seed:
        """The seed to set before re-executing ``step`` (derived, not read from the peer)."""
        return derive_replay_seed(self.header.run_seed, step)

    def gradients(self, step: int) -> dict[str, torch.Tensor]:
        """The committed raw gradients of ``step``, checked leaf by leaf against ``grad_root``."""
        root = self.record(step).grad_root
        index, leaves = self.store.read_artifact(root)
        bad = first_bad_leaf(index, leaves, root)
        if bad is not None:
            raise StoreError(f"{object_name(root)}: gradient of step {step} corrupt (leaf {bad})")
        return decode_checkpoint(leaves)

    def leaf_layout(self, root: bytes) -> list[ChunkRef]:
        """Which tensor and byte range each leaf of artifact ``root`` holds, reading only the
        header leaves (one small range read per tensor). Use it to pick the leaves of the tensors
        you want, then ``store.read_leaves`` and ``index.tree().multiproof`` for just those."""
        index = self.store.read_index(root)
        refs: list[ChunkRef] = []
        i = 0
        while i < index.leaf_count:
            leaf = self.store.read_leaves(root, [i], index=index)[i]
            if leaf_hash(leaf) != index.hashes[i]:
                raise StoreError(f"{object_name(root)}: header leaf {i} does not match its hash")
            header = parse_header(leaf)
            refs.append(
                ChunkRef(index=i, tensor=header.name, kind="header", offset=0, length=len(leaf))
            )
            for offset in range(0, header.nbytes, header.chunk_size):
                length = min(header.chunk_size, header.nbytes - offset)
                refs.append(
                    ChunkRef(
                        index=len(refs),
                        tensor=header.name,
                        kind="data",
                        offset=offset,
                        length=length,
                    )
                )
            i = len(refs)
        if i != index.leaf_count:
            raise StoreError(
                f"{object_name(root)}: headers describe {i} leaves, table has {index.leaf_count}"
            )
        return refs

    def state(self, ref: StateRef) -> dict[str, torch.Tensor]:
        """A state checkpoint's tensors, checked against ``ref.root``."""
        return load_state(self.store, ref)

    def nearest_state(self, step: int) -> StateRef:
        """The last state checkpoint at or before ``step`` (the initial state for early steps)."""
        best = self.header.initial_state
        for m in self.manifests():
            if m.state.step <= step:
                best = m.state
        return best

    def state_at(self, step: int, *, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """State checkpoint tensors before ``step`` runs: the nearest checkpoint at or before
        ``step`` with the committed gradients of the steps in between applied through the
        recorded optimizer (``replay.apply_gradients``)."""
        ref = self.nearest_state(step)
        state = self.state(ref)
        steps = [(self.record(t), self.gradients(t)) for t in range(ref.step, step)]
        return apply_gradients(self.header, state, steps, device=device) if steps else state

    def model_at(self, step: int, *, device: torch.device | str = "cpu") -> nn.Module:
        """The registry model with its parameters and buffers as they were before ``step``.

        Raises KeyError when the run's model is not in the registry (``header.model == ""``).
        """
        h = self.header
        if not h.model:
            raise KeyError("the run's model is not a registered model; rebuild it yourself")
        model = build_model(h.model, h.model_config)
        load_model_state(model, self.state_at(step), h.aliases)
        return model.to(device)

    def batch(self, step: int, corpus: Corpus) -> Batch:
        """Rebuild ``step``'s batch from ``corpus``; StoreError if the corpus is not the one the
        header commits to or the record's offsets are not the derived ones."""
        h = self.header
        if h.dataset is None or corpus.commitment().root != h.dataset.root:
            raise StoreError("corpus does not match the run's dataset commitment")
        batch = corpus.batch_for_step(h.run_seed, step, batch_size=h.batch_size, context=h.context)
        if batch.offsets != self.record(step).batch:
            raise StoreError(f"step {step}: recorded batch offsets are not the derived ones")
        return batch


def load_model_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], aliases: Mapping[str, str] | None = None
) -> None:
    """Load ``param/*`` and ``buffer/*`` checkpoint tensors into ``model`` (strict)."""
    sd: dict[str, torch.Tensor] = {}
    tied = aliases or {}
    for key in model.state_dict():
        if key in tied:
            sd[key] = state[PARAM + tied[key]]
        elif PARAM + key in state:
            sd[key] = state[PARAM + key]
        elif BUFFER + key in state:
            sd[key] = state[BUFFER + key]
        else:
            raise StoreError(f"state checkpoint has no tensor for {key!r}")
    model.load_state_dict(sd)

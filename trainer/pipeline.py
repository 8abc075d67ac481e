"""The background committer: turns captured gradients and states into artifacts, records, manifests.

The training thread only copies tensors and enqueues them (a bounded queue, so a slow disk slows
training down instead of growing memory). One worker thread encodes, hashes, writes each artifact,
extends the hash chain and, at each state checkpoint, signs and writes the window manifest. Its
order is the commit order: a manifest is written only after every artifact it names.

A failure in the worker is kept and re-raised (as :class:`PipelineError`) by the next call from the
training thread; the worker then drops further work, so nothing after the failure is committed.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from proofs.errors import VeritrainError
from proofs.hashing import Hash32, Root
from proofs.signatures import Domain
from trainer.artifact import Encoded
from trainer.checkpoint import Gradients, encode_checkpoint, encode_gradients
from trainer.manifest import (
    MANIFEST_VERSION,
    SignedWindowManifest,
    StateRef,
    StepRecord,
    WindowManifest,
)
from trainer.recipe import RunHeader, SignedRunHeader
from trainer.store import RunStore

logger = logging.getLogger(__name__)


class PipelineError(VeritrainError, RuntimeError):
    """The background committer failed; the message names the step, the cause is chained."""


@dataclass(frozen=True, kw_only=True, slots=True)
class GradientItem:
    """One step's capture: raw gradients (private copies) and what the record needs."""

    step: int
    replay_seed: int
    batch: tuple[int, ...]
    loss: torch.Tensor
    lrs: tuple[float, ...]
    grads: Gradients


@dataclass(frozen=True, kw_only=True, slots=True)
class HeaderItem:
    """A new run's header and its initial state artifact: written before anything else."""

    header: RunHeader
    initial: Encoded


@dataclass(frozen=True, kw_only=True, slots=True)
class StateItem:
    """A state checkpoint capture that closes the current window."""

    step: int
    tensors: dict[str, torch.Tensor]


@dataclass(kw_only=True, slots=True)
class ChainPosition:
    """Where the hash chain stands: the next window, and the hashes new entries link to."""

    window: int
    prev_record: Hash32
    prev_manifest: Hash32


@dataclass(kw_only=True, slots=True)
class Stats:
    """Counters the progress bar shows (read from the training thread; ints are atomic)."""

    steps_committed: int = 0
    windows_committed: int = 0
    bytes_written: int = 0
    last_loss: float = float("nan")
    errors: list[BaseException] = field(default_factory=list)


Sign = Callable[[Domain, str, bytes], bytes]
"""Signs (domain, context, payload): proofs.signatures.sign bound to a key, or a SignerProcess."""

Item = HeaderItem | GradientItem | StateItem | None


class Committer:
    """The worker thread and its queue. ``submit`` blocks while ``depth`` items are pending."""

    def __init__(
        self,
        *,
        store: RunStore,
        sign: Sign,
        run_id: str,
        chunk_size: int,
        position: ChainPosition,
        depth: int = 4,
    ) -> None:
        self._store = store
        self._sign = sign
        self._run_id = run_id
        self._chunk_size = chunk_size
        self._pos = position
        self._records: list[StepRecord] = []
        self._queue: queue.Queue[Item] = queue.Queue(maxsize=depth)
        self.stats = Stats()
        self._thread = threading.Thread(target=self._run, name="veritrain-committer", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise PipelineError if the worker has failed."""
        if self.stats.errors:
            exc = self.stats.errors[0]
            raise PipelineError(f"audit pipeline failed: {exc}") from exc

    def submit(self, item: HeaderItem | GradientItem | StateItem) -> None:
        """Queue ``item`` (blocking when full); raises PipelineError if the worker failed."""
        self.check()
        self._queue.put(item)

    def close(self) -> None:
        """Drain the queue, stop the worker, and raise any error it hit."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self.check()

    def close_quietly(self) -> None:
        """Stop the worker after what is queued, without raising (the caller is already failing)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self.stats.errors:
                continue  # after a failure, commit nothing more; keep draining so put() never hangs
            try:
                if isinstance(item, GradientItem):
                    self._commit_gradient(item)
                elif isinstance(item, StateItem):
                    self._commit_window(item)
                else:
                    self._commit_header(item)
            except BaseException as exc:  # re-raised on the training thread by check()
                logger.exception("audit pipeline failed")
                self.stats.errors.append(exc)

    def _commit_header(self, item: HeaderItem) -> None:
        if self._store.put_object(item.initial.root, item.initial.parts):
            self.stats.bytes_written += item.initial.nbytes
        h = item.header
        signature = self._sign(Domain.RUN_HEADER, h.run_id, h.hash())
        self._store.sync()
        self._store.put_header(SignedRunHeader(header=h, signature=bytes(signature)))
        logger.info("run %s: header written", h.run_id)

    def _commit_gradient(self, item: GradientItem) -> None:
        encoded = encode_gradients(item.grads, chunk_size=self._chunk_size)
        if self._store.put_object(encoded.root, encoded.parts):
            self.stats.bytes_written += encoded.nbytes
        loss = float(item.loss.item())
        record = StepRecord(
            step=item.step,
            replay_seed=item.replay_seed,
            batch=item.batch,
            loss=loss,
            lrs=item.lrs,
            grad_root=encoded.root,
            grad_leaves=encoded.index.leaf_count,
            grad_bytes=sum(encoded.index.lengths),
            prev=self._pos.prev_record,
        )
        self._records.append(record)
        self._pos.prev_record = record.hash()
        self.stats.last_loss = loss

    def _commit_window(self, item: StateItem) -> None:
        encoded = encode_checkpoint(item.tensors, chunk_size=self._chunk_size)
        if self._store.put_object(encoded.root, encoded.parts):
            self.stats.bytes_written += encoded.nbytes
        records = tuple(self._records)
        first = records[0].step if records else item.step
        if first + len(records) != item.step:
            raise PipelineError(f"state at step {item.step} does not close steps from {first}")
        manifest = WindowManifest(
            version=MANIFEST_VERSION,
            run_id=self._run_id,
            window=self._pos.window,
            first_step=first,
            records=records,
            state=state_ref(item.step, encoded.root, encoded.index.leaf_count, encoded.nbytes),
            prev=self._pos.prev_manifest,
        )
        signature = self._sign(Domain.STEP_MANIFEST, manifest.run_id, manifest.hash())
        signed = SignedWindowManifest(manifest=manifest, signature=bytes(signature))
        self._store.sync()  # every artifact the manifest names is durable before the manifest
        self._store.put_manifest(signed)
        self._records.clear()
        self._pos.window += 1
        self._pos.prev_manifest = manifest.hash()
        self.stats.steps_committed += len(records)
        self.stats.windows_committed += 1
        logger.info("window %d committed (steps %d..%d)", manifest.window, first, item.step - 1)


def state_ref(step: int, root: bytes, leaf_count: int, nbytes: int) -> StateRef:
    """A :class:`StateRef` for an encoded state artifact."""
    return StateRef(step=step, root=Root(root), leaf_count=leaf_count, nbytes=nbytes)

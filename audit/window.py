"""Verified gradient checkpoints of a run, fetched ahead on a background thread.

Re-executing step ``t`` of a window that starts at ``c`` needs the committed gradients of steps
``c .. t`` (and, for the chain check, the rest of the window), in order. :class:`GradientFetcher`
reads, verifies (one batched hash of the leaves against the root-checked table) and decodes them on
one worker thread while the auditor's own thread replays and re-executes: reading and hashing
release the GIL, so on two cores the fetch costs little wall time. Nothing reaches the caller
before it is verified; a gradient that fails raises :class:`audit.fetch.ArtifactInvalid` where it
is used, exactly as a fetch on the caller's thread would.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from audit.compare import structure_problem
from audit.fetch import ArtifactInvalid, VerifiedRun, decode_checked, fetch_artifact
from trainer.artifact import ArtifactIndex
from trainer.store import RunStore, object_name

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class Gradient:
    """One step's committed gradient, verified against its root and the model's structure."""

    step: int
    index: ArtifactIndex
    tensors: dict[str, torch.Tensor]
    nbytes: int  # leaf bytes read from the store


class GradientFetcher:
    """Fetches gradients of one verified run ahead of use and keeps them until forgotten.

    ``shapes`` are the model's parameters (names, shapes, dtypes) a gradient must match, a
    parameter without gradient may be absent; ``max_bytes`` caps what one artifact may declare.
    Call :meth:`close` (or use it as a context manager) to stop the worker thread.
    """

    def __init__(
        self,
        store: RunStore,
        run: VerifiedRun,
        *,
        shapes: Mapping[str, torch.Tensor],
        max_bytes: int,
    ) -> None:
        self.store, self.run, self.shapes, self.max_bytes = store, run, dict(shapes), max_bytes
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-fetch")
        self._ready: dict[int, Gradient] = {}
        self._pending: dict[int, Future[tuple[ArtifactIndex, list[bytes]]]] = {}

    def prefetch(self, steps: Iterable[int]) -> None:
        """Queue ``steps`` (in the order they will be used) unless held or queued already."""
        for step in steps:
            if step not in self._ready and step not in self._pending:
                self._pending[step] = self._pool.submit(self._fetch, step)

    def get(self, step: int) -> tuple[Gradient, bool]:
        """(the verified gradient of ``step``, whether it was read from the store for this call:
        False when an earlier call already returned it). Raises ArtifactInvalid."""
        held = self._ready.get(step)
        if held is not None:
            return held, False
        future = self._pending.pop(step, None)
        fetched = future.result() if future is not None else self._fetch(step)
        grad = self._decode(step, *fetched)
        self._ready[step] = grad
        return grad, True

    def forget_before(self, step: int) -> None:
        """Drop gradients of steps before ``step``: steps audited in ascending order never need
        them again (out of order, they are fetched again)."""
        self._ready = {s: g for s, g in self._ready.items() if s >= step}
        for s in [s for s in self._pending if s < step]:
            self._pending.pop(s).cancel()

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> GradientFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fetch(self, step: int) -> tuple[ArtifactIndex, list[bytes]]:
        """Read and verify (the worker's part: reading and hashing release the GIL)."""
        record = self.run.record(step)
        return fetch_artifact(
            self.store,
            record.grad_root,
            leaf_count=record.grad_leaves,
            max_bytes=self.max_bytes,
            leaf_bytes=record.grad_bytes,
        )

    def _decode(self, step: int, index: ArtifactIndex, leaves: list[bytes]) -> Gradient:
        """Tensors of verified leaves, on the caller's thread: decoding is Python and torch
        calls that would hand the GIL back and forth with the auditor's own work."""
        name = object_name(self.run.record(step).grad_root)
        tensors = decode_checked(name, leaves)
        # Names, dtypes and shapes must be the model's; a parameter without gradient may be absent.
        problem = structure_problem(tensors, self.shapes, allow_missing=True)
        if problem is not None:
            raise ArtifactInvalid(name, problem)
        return Gradient(step=step, index=index, tensors=tensors, nbytes=sum(map(len, leaves)))


State = dict[str, torch.Tensor]


class ReplayedStates:
    """States rebuilt from committed state checkpoints, by origin (the checkpoint's step) and step.

    A state under ``(origin, step)`` is the state before ``step`` runs, replayed from the committed
    checkpoint at ``origin`` through the committed gradients of ``origin .. step-1`` (or, under
    ``(step, step)``, a replayed state proven equal to the committed checkpoint at ``step``).
    At most ``limit`` states are kept per origin.
    """

    def __init__(self, *, limit: int = 8) -> None:
        self.limit = limit
        self._by_origin: dict[int, dict[int, State]] = {}

    def nearest(self, origin: int, step: int) -> tuple[int, State] | None:
        """The furthest state from ``origin`` that is not past ``step``."""
        held = self._by_origin.get(origin, {})
        best = max((s for s in held if s <= step), default=None)
        return None if best is None else (best, held[best])

    def has(self, origin: int, step: int) -> bool:
        return step in self._by_origin.get(origin, {})

    def put(self, origin: int, step: int, state: State) -> None:
        held = self._by_origin.setdefault(origin, {})
        if step in held or len(held) < self.limit:
            held[step] = state

    def forget_before(self, origin: int, step: int) -> None:
        """Drop states of earlier origins and those from ``origin`` before ``step``."""
        self._by_origin = {o: h for o, h in self._by_origin.items() if o >= origin}
        if origin in self._by_origin:
            held = self._by_origin[origin]
            self._by_origin[origin] = {s: st for s, st in held.items() if s >= step}

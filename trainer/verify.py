"""verify-store: re-check a stored run offline and name the first broken link.

Walks the chain in commit order with :class:`trainer.chainwalk.ChainWalk` (the walker the auditor
and ingest use too), here with every manifest's signature and every record's derived values
checked: the header (key when the caller expects one, signature, canonical form), the initial
state checkpoint, then window by window the manifest and its step records as the walker checks
them, each record's gradient artifact against its root, leaf by leaf, the window's state
checkpoint, and finally the gradient-to-state chain (replaying the window's gradients through the
optimizer must give the stored state root bit for bit where this machine reproduces the run's
recorded determinism settings, and each state tensor within the calibrated tolerance of
trainer.chain elsewhere; never skipped). The first failure stops the walk and is reported as a
:class:`BrokenLink` (window, step, artifact, leaf index, reason).

``check_store`` returns a report and ``verify_store`` a bool; neither raises on bad store content.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from proofs.errors import VeritrainError
from trainer.artifact import first_bad_leaf
from trainer.chain import compare_chain
from trainer.chainwalk import BrokenLink, ChainBroken, ChainWalk, fail
from trainer.checkpoint import BUFFER, decode_checkpoint, encode_checkpoint
from trainer.determinism import key_differences, recorded_threads
from trainer.manifest import WindowManifest
from trainer.recipe import RunHeader
from trainer.replay import apply_gradients
from trainer.store import RunStore, object_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class StoreReport:
    """Result of :func:`check_store`: what was checked and the first broken link, if any."""

    run_id: str | None
    windows: int
    steps: int
    broken: BrokenLink | None
    final_hash: bytes | None = None
    """Hash of the last verified manifest: the root a peer records on chain (``commit-run``)."""

    @property
    def ok(self) -> bool:
        return self.broken is None


Progress = Callable[[int, int], None]


def verify_store(store: RunStore | str, *, pubkey: bytes | None = None) -> bool:
    """True when every check of :func:`check_store` passes."""
    return check_store(store, pubkey=pubkey).ok


def check_store(
    store: RunStore | str,
    *,
    pubkey: bytes | None = None,
    chain: bool = True,
    progress: Progress | None = None,
) -> StoreReport:
    """Re-check the run in ``store``. ``pubkey``: the key the run must be signed by (default: the
    header's own key, which only proves self-consistency). ``chain=False`` skips the replay.
    ``progress(done_windows, total_windows)`` is called after each window."""
    st = store if isinstance(store, RunStore) else RunStore(store)
    walker = _Walker(st, pubkey=pubkey, chain=chain, progress=progress)
    try:
        walker.run()
    except ChainBroken as exc:
        logger.info("verify-store: %s", exc.link.describe())
        return walker.report(exc.link)
    except Exception as exc:  # bad input must give a report, never an exception
        reason = f"unreadable: {type(exc).__name__}: {exc}"
        link = BrokenLink(artifact=walker.walk.current, check="format", reason=reason)
        return walker.report(link)
    return walker.report(None)


class _Walker:
    def __init__(
        self, store: RunStore, *, pubkey: bytes | None, chain: bool, progress: Progress | None
    ) -> None:
        self.store = store
        self.walk = ChainWalk(store, expected_key=pubkey, signatures="every", derived=True)
        self.chain = chain
        self.progress = progress
        self.windows = 0
        self.steps = 0
        self.final_hash: bytes | None = None

    def report(self, broken: BrokenLink | None) -> StoreReport:
        return StoreReport(
            run_id=self.walk.run_id,
            windows=self.windows,
            steps=self.steps,
            broken=broken,
            final_hash=self.final_hash if broken is None else None,
        )

    def run(self) -> None:
        header = self.walk.header()
        state = self._artifact(header.initial_state.root, "state", step=0, window=None)
        total = len(self.store.manifest_windows())
        for manifest in self.walk.windows():
            grads = [
                self._artifact(rec.grad_root, "gradient", step=rec.step, window=manifest.window)
                for rec in manifest.records
            ]
            end = manifest.end_step
            target = self._artifact(manifest.state.root, "state", step=end, window=manifest.window)
            if self.chain:
                self._replay(header, manifest, state, grads, target)
            state = target
            self.final_hash = manifest.hash()
            self.windows += 1
            self.steps += len(manifest.records)
            if self.progress is not None:
                self.progress(self.windows, total)

    def _artifact(
        self, root: bytes, check: str, *, step: int, window: int | None
    ) -> dict[str, torch.Tensor]:
        path = self.walk.current = object_name(root)
        try:
            index, leaves = self.store.read_artifact(root)
        except VeritrainError as exc:
            fail(path, check, str(exc), window=window, step=step)
        bad = first_bad_leaf(index, leaves, root)
        if bad is not None:
            reason = (
                "leaf bytes do not match their hash"
                if bad >= 0
                else "leaf table does not rebuild the committed root"
            )
            fail(path, check, reason, window=window, step=step, leaf=bad)
        try:
            return decode_checkpoint(leaves)
        except (VeritrainError, ValueError) as exc:
            fail(path, check, f"not a canonical encoding: {exc}", window=window, step=step)

    def _replay(
        self,
        header: RunHeader,
        m: WindowManifest,
        start: Mapping[str, torch.Tensor],
        grads: list[dict[str, torch.Tensor]],
        target: Mapping[str, torch.Tensor],
    ) -> None:
        path, check = object_name(m.state.root), "gradient-to-state chain"
        self.walk.current = path
        device = replay_device(header)
        steps = list(zip(m.records, grads, strict=True))
        # The recorded thread count, so that a run from this machine replays bit for bit.
        with recorded_threads(header.determinism):
            differs = key_differences(
                device=header.device,
                torch_version=header.torch_version,
                recorded=header.determinism,
                here=device,
            )
            try:
                expected = apply_gradients(header, start, steps, device=device)
            except (VeritrainError, ValueError, KeyError, RuntimeError) as exc:
                fail(path, check, f"replay failed: {exc}", window=m.window, step=m.end_step)
        expected.update({k: v for k, v in target.items() if k.startswith(BUFFER)})
        encoded = encode_checkpoint(expected, chunk_size=header.chunk_size)
        if encoded.root == m.state.root:
            return
        reason = "applying the window's gradients does not give this state"
        if differs:
            # Bitwise equality is not promised here: compare within the calibrated tolerance.
            try:
                cmp = compare_chain(
                    header=header,
                    start=start,
                    steps=steps,
                    replayed=expected,
                    committed=target,
                    device=device,
                )
            except (VeritrainError, ValueError, KeyError, RuntimeError) as exc:
                fail(path, check, f"replay failed: {exc}", window=m.window, step=m.end_step)
            if cmp.passed:
                logger.info("window %d: state follows within tolerance: %s", m.window, cmp.reason)
                return
            reason += f" within tolerance ({'; '.join(differs)}): {cmp.reason}"
        else:
            reason += " (compared bit for bit: this machine reproduces the recorded settings)"
        ours, stored = encoded.index.hashes, self.store.read_index(m.state.root).hashes
        diffs = (i for i, (a, b) in enumerate(zip(ours, stored, strict=False)) if a != b)
        leaf = next(diffs, min(len(ours), len(stored)))
        fail(path, check, reason, window=m.window, step=m.end_step, leaf=leaf)


def replay_device(header: RunHeader) -> str:
    """The run's own device type when this machine has it, else CPU."""
    if header.device == "cuda" and torch.cuda.is_available():
        return "cuda"
    return "cpu"

"""verify-store: re-check a stored run offline and name the first broken link.

Walks the chain in commit order: the header's signature (and key, when the caller expects one), the
initial state checkpoint, then window by window the manifest (file number, run id, first step, link
to the previous manifest, signature), each step record (step number, link to the previous record,
the replay seed, learning rates and batch offsets the header derives, the gradient artifact against
its root, leaf by leaf), the window's state checkpoint, and finally the gradient-to-state chain
(replaying the window's gradients through the optimizer must give the stored state root bit for
bit where this machine reproduces the run's recorded determinism settings, and each state tensor
within the calibrated tolerance of trainer.chain elsewhere; never skipped). The first failure stops
the walk and is reported as a :class:`BrokenLink` (window, step, artifact, leaf index, reason).

``check_store`` returns a report and ``verify_store`` a bool; neither raises on bad store content.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NoReturn

import torch

from proofs.codec import canonical_json
from proofs.errors import VeritrainError
from proofs.hashing import Hash32
from trainer.artifact import first_bad_leaf
from trainer.chain import compare_chain
from trainer.checkpoint import BUFFER, decode_checkpoint, encode_checkpoint
from trainer.derived import derivation_problem
from trainer.determinism import key_differences, recorded_threads
from trainer.manifest import StepRecord, WindowManifest
from trainer.recipe import RunHeader
from trainer.replay import apply_gradients
from trainer.store import HEADER_PATH, RunStore, manifest_name, object_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class BrokenLink:
    """Where and why the chain breaks."""

    artifact: str
    """Store-relative path of the file at fault."""
    check: str
    """Which check failed: "signature", "key", "hash chain", "record", "gradient", "state",
    "gradient-to-state chain", "format"."""
    reason: str
    window: int | None = None
    step: int | None = None
    leaf: int | None = None
    """Leaf index inside the artifact (-1: the leaf table does not rebuild the root)."""

    def describe(self) -> str:
        where = [
            f"{k} {v}" for k, v in (("window", self.window), ("step", self.step)) if v is not None
        ]
        if self.leaf is not None:
            where.append(f"leaf {self.leaf}")
        prefix = ", ".join(where)
        return (
            f"{self.check} broken at {self.artifact}"
            + (f" ({prefix})" if prefix else "")
            + (f": {self.reason}")
        )


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


class _Broken(Exception):
    def __init__(self, link: BrokenLink) -> None:
        super().__init__(link.describe())
        self.link = link


def _fail(
    artifact: str,
    check: str,
    reason: str,
    *,
    window: int | None = None,
    step: int | None = None,
    leaf: int | None = None,
) -> NoReturn:
    raise _Broken(
        BrokenLink(
            artifact=artifact, check=check, reason=reason, window=window, step=step, leaf=leaf
        )
    )


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
    except _Broken as exc:
        logger.info("verify-store: %s", exc.link.describe())
        return walker.report(exc.link)
    except Exception as exc:  # bad input must give a report, never an exception
        reason = f"unreadable: {type(exc).__name__}: {exc}"
        return walker.report(BrokenLink(artifact=walker.current, check="format", reason=reason))
    return walker.report(None)


class _Walker:
    def __init__(
        self, store: RunStore, *, pubkey: bytes | None, chain: bool, progress: Progress | None
    ) -> None:
        self.store = store
        self.pubkey = pubkey
        self.chain = chain
        self.progress = progress
        self.run_id: str | None = None
        self.current = HEADER_PATH
        """The file being checked (named in the report if something unexpected fails)."""
        self.windows = 0
        self.steps = 0
        self.final_hash: bytes | None = None

    def report(self, broken: BrokenLink | None) -> StoreReport:
        return StoreReport(
            run_id=self.run_id,
            windows=self.windows,
            steps=self.steps,
            broken=broken,
            final_hash=self.final_hash if broken is None else None,
        )

    def run(self) -> None:
        header = self._header()
        state = self._artifact(header.initial_state.root, "state", step=0, window=None)
        windows = self.store.manifest_windows()
        for expected, w in enumerate(windows):
            if w != expected:
                _fail(manifest_name(expected), "hash chain", "manifest missing", window=expected)
        prev_manifest = prev_record = header.hash()
        step = 0
        for w in windows:
            manifest = self._manifest(header, w, step, prev_manifest)
            prev_record, grads = self._records(header, manifest, prev_record)
            end = manifest.end_step
            if manifest.state.step != end:
                reason = f"state step {manifest.state.step}, expected {end}"
                _fail(manifest_name(w), "record", reason, window=w, step=end)
            target = self._artifact(manifest.state.root, "state", step=end, window=w)
            if self.chain:
                self._replay(header, manifest, state, grads, target)
            state = target
            prev_manifest = manifest.hash()
            self.final_hash = prev_manifest
            step = end
            self.windows += 1
            self.steps += len(manifest.records)
            if self.progress is not None:
                self.progress(self.windows, len(windows))

    def _header(self) -> RunHeader:
        try:
            signed = self.store.read_header()
        except VeritrainError as exc:
            _fail(HEADER_PATH, "format", str(exc))
        self.run_id = signed.header.run_id
        if self.pubkey is not None and bytes(self.pubkey) != signed.header.pubkey:
            _fail(HEADER_PATH, "key", "header names another public key than the expected one")
        if not signed.verify():
            _fail(HEADER_PATH, "signature", "header signature does not verify")
        if self.store.read_bytes(HEADER_PATH) != canonical_json(signed.to_json()):
            _fail(HEADER_PATH, "format", "file is not the canonical JSON of what it holds")
        return signed.header

    def _manifest(self, header: RunHeader, w: int, step: int, prev: Hash32) -> WindowManifest:
        path = self.current = manifest_name(w)
        try:
            signed = self.store.read_manifest(w)
        except VeritrainError as exc:
            _fail(path, "format", str(exc), window=w)
        m = signed.manifest
        if m.window != w:
            _fail(path, "hash chain", f"file holds window {m.window}", window=w)
        if m.run_id != header.run_id:
            _fail(path, "hash chain", f"run id {m.run_id!r} is not the header's", window=w)
        if m.first_step != step:
            _fail(path, "hash chain", f"first step {m.first_step}, expected {step}", window=w)
        if m.prev != prev:
            _fail(path, "hash chain", "prev is not the previous manifest's hash", window=w)
        if m.spans_checkpoint(header.checkpoint_every):
            reason = f"window of steps {m.first_step}..{m.end_step - 1} is empty or crosses a"
            reason += f" multiple of checkpoint_every {header.checkpoint_every}"
            _fail(path, "record", reason, window=w)
        if not signed.verify(header.pubkey):
            _fail(
                path,
                "signature",
                "manifest signature does not verify under the header key",
                window=w,
            )
        if self.store.read_bytes(path) != canonical_json(signed.to_json()):
            _fail(path, "format", "file is not the canonical JSON of what it holds", window=w)
        return m

    def _records(
        self, header: RunHeader, m: WindowManifest, prev: Hash32
    ) -> tuple[Hash32, list[dict[str, torch.Tensor]]]:
        grads = []
        for i, rec in enumerate(m.records):
            step = m.first_step + i
            problem = _record_problem(header, rec, step, prev)
            if problem is not None:
                _fail(manifest_name(m.window), problem[0], problem[1], window=m.window, step=step)
            grads.append(self._artifact(rec.grad_root, "gradient", step=step, window=m.window))
            prev = rec.hash()
        return prev, grads

    def _artifact(
        self, root: bytes, check: str, *, step: int, window: int | None
    ) -> dict[str, torch.Tensor]:
        path = self.current = object_name(root)
        try:
            index, leaves = self.store.read_artifact(root)
        except VeritrainError as exc:
            _fail(path, check, str(exc), window=window, step=step)
        bad = first_bad_leaf(index, leaves, root)
        if bad is not None:
            reason = (
                "leaf bytes do not match their hash"
                if bad >= 0
                else "leaf table does not rebuild the committed root"
            )
            _fail(path, check, reason, window=window, step=step, leaf=bad)
        try:
            return decode_checkpoint(leaves)
        except (VeritrainError, ValueError) as exc:
            _fail(path, check, f"not a canonical encoding: {exc}", window=window, step=step)

    def _replay(
        self,
        header: RunHeader,
        m: WindowManifest,
        start: Mapping[str, torch.Tensor],
        grads: list[dict[str, torch.Tensor]],
        target: Mapping[str, torch.Tensor],
    ) -> None:
        path, check = object_name(m.state.root), "gradient-to-state chain"
        self.current = path
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
                _fail(path, check, f"replay failed: {exc}", window=m.window, step=m.end_step)
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
                _fail(path, check, f"replay failed: {exc}", window=m.window, step=m.end_step)
            if cmp.passed:
                logger.info("window %d: state follows within tolerance: %s", m.window, cmp.reason)
                return
            reason += f" within tolerance ({'; '.join(differs)}): {cmp.reason}"
        else:
            reason += " (compared bit for bit: this machine reproduces the recorded settings)"
        ours, stored = encoded.index.hashes, self.store.read_index(m.state.root).hashes
        diffs = (i for i, (a, b) in enumerate(zip(ours, stored, strict=False)) if a != b)
        leaf = next(diffs, min(len(ours), len(stored)))
        _fail(path, check, reason, window=m.window, step=m.end_step, leaf=leaf)


def replay_device(header: RunHeader) -> str:
    """The run's own device type when this machine has it, else CPU."""
    if header.device == "cuda" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _record_problem(
    header: RunHeader, rec: StepRecord, step: int, prev: Hash32
) -> tuple[str, str] | None:
    if rec.step != step:
        return "hash chain", f"record for step {rec.step}, expected {step}"
    if rec.prev != prev:
        return "hash chain", "prev does not match the previous record's hash"
    problem = derivation_problem(header, rec)
    if problem is not None:
        return "record", problem
    return None

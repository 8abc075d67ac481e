"""The one walker of a run's signed chain: header -> manifests -> step records.

Both readers of a run store use it: ``verify-store`` (:func:`trainer.verify.check_store`, which
then checks the artifacts and replays the gradient-to-state chain) and the auditor and ingest
(:func:`audit.fetch.load_run`). It checks, in commit order and stopping at the first failure:

- the header: its key (when the caller expects one), its signature under its own key, and that
  the file is the canonical JSON of what it holds;
- the manifests: numbered 0..n-1 with no gap, at most :data:`MAX_WINDOWS`; each names its window
  and this run, starts at the step after the previous one, carries the previous manifest's hash
  (the header's for window 0), does not span a ``checkpoint_every`` boundary, has its state
  checkpoint at its end step, is signed by the header's key (see ``signatures``) and is the
  canonical JSON of what it holds;
- the step records: numbered contiguously, each carrying the hash of the record before it (the
  header's for step 0), at most :data:`MAX_STEPS` in all, and (``derived=True``) carrying the
  seed, learning rates and batch offsets the header derives (:mod:`trainer.derived`).

``signatures`` sets the BLS cost: ``"every"`` verifies each manifest's signature where it stands
(``verify-store``: names the first badly signed window); ``"last"`` verifies the header and the
last manifest only, two verifications per run, which is enough to authenticate the whole run
because each manifest carries the hash of the one before and of every record (the auditor and
ingest); ``"none"`` skips BLS altogether, for a run whose signatures this process already checked.

A failure raises :class:`ChainBroken` carrying a :class:`BrokenLink` (artifact, check, reason,
window, step). Store errors and malformed files are failures too; anything else (an I/O error of
the filesystem) propagates.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, NoReturn

from proofs.codec import canonical_json
from proofs.errors import VeritrainError
from proofs.hashing import Hash32
from trainer.derived import derivation_problem
from trainer.manifest import StateRef, StepRecord, WindowManifest
from trainer.recipe import RunHeader
from trainer.store import HEADER_PATH, RunStore, manifest_name

logger = logging.getLogger(__name__)

MAX_WINDOWS = 1 << 20
"""Most manifests a run may have (a hostile store must not make a reader loop for ever)."""
MAX_STEPS = 1 << 24
"""Most step records a run may have."""

Signatures = Literal["every", "last", "none"]
NOT_CANONICAL = "file is not the canonical JSON of what it holds"


@dataclass(frozen=True, kw_only=True, slots=True)
class BrokenLink:
    """Where and why the chain breaks."""

    artifact: str
    """Store-relative path of the file at fault ("manifests" for the manifest count)."""
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


class ChainBroken(VeritrainError, ValueError):
    """The run's chain breaks at ``link``."""

    def __init__(self, link: BrokenLink) -> None:
        super().__init__(link.describe())
        self.link = link


def fail(
    artifact: str,
    check: str,
    reason: str,
    *,
    window: int | None = None,
    step: int | None = None,
    leaf: int | None = None,
) -> NoReturn:
    """Raise :class:`ChainBroken` for this link."""
    link = BrokenLink(
        artifact=artifact, check=check, reason=reason, window=window, step=step, leaf=leaf
    )
    raise ChainBroken(link)


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifiedRun:
    """A run whose header, manifests and step records passed the walk (:func:`walk_run`)."""

    url: str
    header: RunHeader
    header_hash: Hash32
    manifests: tuple[WindowManifest, ...]
    final_hash: Hash32
    """Hash of the last manifest (the header hash for a run with none): the root a peer
    records on chain."""
    records: tuple[StepRecord, ...]  # records[t].step == t

    @property
    def total_steps(self) -> int:
        return len(self.records)

    def record(self, step: int) -> StepRecord:
        if not 0 <= step < len(self.records):
            raise IndexError(f"step {step} not in run of {len(self.records)} steps")
        return self.records[step]

    def manifest_of(self, step: int) -> WindowManifest:
        for m in self.manifests:
            if m.first_step <= step < m.end_step:
                return m
        raise IndexError(f"step {step} is in no window")

    def state_at_or_before(self, step: int) -> StateRef:
        """The nearest state checkpoint taken before ``step`` runs, at or before it."""
        best = self.header.initial_state
        for m in self.manifests:
            if m.state.step <= step and m.state.step > best.step:
                best = m.state
        return best

    def state_at(self, step: int) -> StateRef | None:
        """The state checkpoint taken exactly before ``step`` runs, if there is one."""
        refs = [self.header.initial_state, *(m.state for m in self.manifests)]
        return next((r for r in refs if r.step == step), None)


class ChainWalk:
    """One walk over ``store``: call :meth:`header` first, then iterate :meth:`windows` (each
    manifest is yielded once it and its records passed), or call :meth:`run` for both.

    ``expected_key``: the BLS key the header must name (default: its own, which only proves
    self-consistency). ``signatures`` and ``derived``: see the module docstring.
    """

    def __init__(
        self,
        store: RunStore,
        *,
        expected_key: bytes | None = None,
        signatures: Signatures = "every",
        derived: bool = True,
    ) -> None:
        self.store = store
        self.expected_key = expected_key
        self.signatures = signatures
        self.derived = derived
        self.current = HEADER_PATH
        """The file being read (callers name it when something unexpected fails)."""
        self.run_id: str | None = None
        self.manifests: list[WindowManifest] = []
        self.records: list[StepRecord] = []
        self._header: RunHeader | None = None

    def header(self) -> RunHeader:
        """The run header, once its key, signature and form are checked."""
        self.current = HEADER_PATH
        try:
            signed = self.store.read_header()
        except VeritrainError as exc:
            fail(HEADER_PATH, "format", str(exc))
        header = signed.header
        self.run_id = header.run_id
        if self.expected_key is not None and bytes(self.expected_key) != header.pubkey:
            fail(HEADER_PATH, "key", "header names another public key than the expected one")
        if self.signatures != "none" and not signed.verify():
            fail(HEADER_PATH, "signature", "header signature does not verify")
        if self.store.read_bytes(HEADER_PATH) != canonical_json(signed.to_json()):
            fail(HEADER_PATH, "format", NOT_CANONICAL)
        self._header = header
        return header

    def windows(self) -> Iterator[WindowManifest]:
        """Each manifest in window order, after it and its step records passed."""
        header = self._header if self._header is not None else self.header()
        windows = self.store.manifest_windows()
        if len(windows) > MAX_WINDOWS:
            fail("manifests", "format", f"{len(windows)} windows exceeds {MAX_WINDOWS}")
        for expected, w in enumerate(windows):
            if w != expected:
                reason = "manifest missing (gap in windows)"
                fail(manifest_name(expected), "hash chain", reason, window=expected)
        prev_manifest = prev_record = header.hash()
        for w in windows:
            manifest = self._manifest(header, w, prev_manifest, last=w == windows[-1])
            prev_record = self._records(header, manifest, prev_record)
            self.manifests.append(manifest)
            prev_manifest = manifest.hash()
            yield manifest

    def run(self, *, url: str | None = None) -> VerifiedRun:
        """Walk everything; the authenticated run."""
        header = self.header()
        for _ in self.windows():
            pass
        return VerifiedRun(
            url=self.store.url if url is None else url,
            header=header,
            header_hash=header.hash(),
            manifests=tuple(self.manifests),
            final_hash=self.manifests[-1].hash() if self.manifests else header.hash(),
            records=tuple(self.records),
        )

    def _manifest(self, header: RunHeader, w: int, prev: Hash32, *, last: bool) -> WindowManifest:
        path = self.current = manifest_name(w)
        try:
            signed = self.store.read_manifest(w)
        except VeritrainError as exc:
            fail(path, "format", str(exc), window=w)
        m = signed.manifest
        step = len(self.records)
        if m.window != w:
            fail(path, "hash chain", f"file holds window {m.window}", window=w)
        if m.run_id != header.run_id:
            reason = f"names run {m.run_id!r}, not the header's {header.run_id!r}"
            fail(path, "hash chain", reason, window=w)
        if m.first_step != step:
            fail(path, "hash chain", f"first step {m.first_step}, expected {step}", window=w)
        if m.prev != prev:
            fail(path, "hash chain", "prev is not the previous manifest's hash", window=w)
        if m.spans_checkpoint(header.checkpoint_every):
            reason = f"window of steps {m.first_step}..{m.end_step - 1} is empty or crosses a"
            reason += f" multiple of checkpoint_every {header.checkpoint_every}"
            fail(path, "record", reason, window=w)
        if m.state.step != m.end_step:
            reason = f"state checkpoint at step {m.state.step}, expected {m.end_step}"
            fail(path, "record", reason, window=w, step=m.end_step)
        verify = self.signatures == "every" or (self.signatures == "last" and last)
        if verify and not signed.verify(header.pubkey):
            reason = "manifest signature does not verify under the header key"
            fail(path, "signature", reason, window=w)
        if self.store.read_bytes(path) != canonical_json(signed.to_json()):
            fail(path, "format", NOT_CANONICAL, window=w)
        return m

    def _records(self, header: RunHeader, m: WindowManifest, prev: Hash32) -> Hash32:
        path = manifest_name(m.window)
        for i, rec in enumerate(m.records):
            step = m.first_step + i
            if rec.step != step:
                fail(path, "hash chain", f"record for step {rec.step}, expected {step}",
                     window=m.window, step=step)  # fmt: skip
            if rec.prev != prev:
                reason = "prev does not match the previous record's hash"
                fail(path, "hash chain", reason, window=m.window, step=step)
            if self.derived:
                problem = derivation_problem(header, rec)
                if problem is not None:
                    fail(path, "record", problem, window=m.window, step=step)
            prev = rec.hash()
            self.records.append(rec)
        if len(self.records) > MAX_STEPS:
            fail(path, "format", f"run exceeds {MAX_STEPS} steps", window=m.window)
        return prev


def walk_run(
    store: RunStore,
    *,
    expected_key: bytes | None = None,
    signatures: Signatures = "every",
    derived: bool = True,
) -> VerifiedRun:
    """Walk the whole chain of ``store`` (see the module docstring); :class:`ChainBroken` names
    the first broken link."""
    walk = ChainWalk(store, expected_key=expected_key, signatures=signatures, derived=derived)
    return walk.run()

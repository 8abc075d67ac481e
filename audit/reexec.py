"""Re-execute one committed training step and judge it.

For step ``t`` of a run whose records passed :func:`audit.fetch.load_run`:

1. fetch the nearest state checkpoint ``c <= t`` and the gradient checkpoints of steps
   ``c .. t-1`` (plus the rest of the window when the chain is checked), each verified against
   its committed root before use;
2. rebuild the state at ``t`` by applying those committed gradients through the recorded
   optimizer (``trainer.replay.apply_gradients``: no forward or backward);
3. build the model from the auditor's own registry (``trainer.models.build_model``; nothing the
   peer names is imported), rebuild the batch from the corpus and the run seed, seed every
   generator with the step's replay seed and run forward and backward;
4. compare with the committed gradient (:mod:`audit.compare`), measure usefulness, and check
   that the window's next state checkpoint follows from its gradients.

Device: ``cuda`` when present, else CPU. Exact mode needs the run's device type.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from audit.chunks import choose_chunks
from audit.compare import Comparison, compare_chunks, compare_full
from audit.fetch import ArtifactInvalid, VerifiedRun, decode_checked, fetch_artifact, fetch_index
from audit.fetch import fetch_leaves as fetch_some_leaves
from audit.tolerance import DEFAULT_SAFETY_FACTOR, Calibration, Mode, calibrate, distances
from audit.usefulness import heldout_loss
from audit.verdict import Evidence, TensorCheck
from audit.window import GradientFetcher, ReplayedStates
from proofs.hashing import Root
from trainer.artifact import ArtifactIndex
from trainer.checkpoint import (
    BUFFER,
    PARAM,
    capture_gradients,
    checkpoint_root,
)
from trainer.data import Corpus
from trainer.loop import configure_determinism
from trainer.manifest import StateRef
from trainer.models import build_model
from trainer.replay import replay_states
from trainer.seeds import replay_seed, seed_generators
from trainer.store import RunStore, object_name

log = logging.getLogger(__name__)

# States kept per window for the steps a job said it will audit (each ~3x the parameters).
MAX_KEPT_STATES = 8


class AuditSetupError(RuntimeError):
    """The auditor cannot audit this run (its fault or choice, not the peer's): unknown model,
    missing corpus, exact mode on another device type."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ReexecConfig:
    mode: Mode = Mode.TOLERANT
    device: str | None = None  # None: cuda when present, else cpu
    chunk_fraction: float | None = None  # compare only this fraction of the step's leaves
    check_chain: bool = True  # replay the rest of the window against its next state root
    usefulness: bool = True
    safety_factor: float = DEFAULT_SAFETY_FACTOR
    calibration_threads: int | None = None  # None: 2 if this process uses 1 thread, else 1

    def __post_init__(self) -> None:
        if self.chunk_fraction is not None and not 0.0 < self.chunk_fraction <= 1.0:
            raise ValueError(f"chunk_fraction must be in (0, 1], got {self.chunk_fraction}")
        if self.safety_factor < 1.0:
            raise ValueError(f"safety_factor must be >= 1, got {self.safety_factor}")


@dataclass(frozen=True, kw_only=True, slots=True)
class StepResult:
    """What re-execution found; :mod:`audit.jobs` turns it into a signed verdict."""

    passed: bool
    invalid: bool
    reason: str
    committed_root: Root | None
    recomputed_root: Root | None
    tensors: tuple[TensorCheck, ...]
    evidence: tuple[Evidence, ...]
    loss_before: float | None
    loss_after: float | None
    bytes_fetched: int


@dataclass(frozen=True, kw_only=True, slots=True)
class _ChainReplay:
    """A window replayed to its next checkpoint on the worker thread."""

    states: dict[int, dict[str, torch.Tensor]]  # the kept states and the final one
    root: Root  # of the final state
    nbytes: int  # gradient bytes the replay read


def auditor_device(config: ReexecConfig) -> torch.device:
    if config.device is not None:
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def max_artifact_bytes(param_bytes: int, factor: int) -> int:
    """Largest artifact worth reading: ``factor`` x the parameter bytes plus slack for headers."""
    return factor * param_bytes + (4 << 20)


class StepAuditor:
    """Re-executes steps of one verified run; keeps the model and calibration between steps."""

    def __init__(
        self,
        store: RunStore,
        run: VerifiedRun,
        corpus: Corpus | None,
        config: ReexecConfig,
        *,
        sample_seed: bytes | None = None,
    ) -> None:
        """``sample_seed``: the audit's beacon-derived seed (chooses sampled chunks); a fresh
        random one when not given, which keeps chunks unpredictable but not reproducible."""
        h = run.header
        self.sample_seed = bytes(sample_seed) if sample_seed is not None else os.urandom(32)
        self.store, self.run, self.corpus, self.config = store, run, corpus, config
        self.device = auditor_device(config)
        if config.mode is Mode.EXACT:
            if self.device.type != h.device:
                raise AuditSetupError(
                    f"exact mode needs a {h.device} device, this auditor has {self.device.type}"
                )
            configure_determinism(None)  # the trainer's own settings (deterministic kernels)
        if self.device.type == "cuda":
            # TF32 matmuls carry ~1e-3 relative error, far above the float32 noise calibrated
            # against: an auditor must never run them.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        if not h.model:
            raise AuditSetupError("run uses a model outside the registry: cannot re-execute")
        if h.dataset is None or corpus is None:
            raise AuditSetupError("run has no dataset commitment or no corpus was given")
        if corpus.commitment().root != h.dataset.root:
            raise AuditSetupError("the auditor's corpus does not match the run's dataset root")
        try:
            self.model: nn.Module = build_model(h.model, h.model_config).to(self.device)
        except (KeyError, ValueError) as exc:
            raise AuditSetupError(f"cannot build model {h.model!r}: {exc}") from exc
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.calibration: Calibration | None = None
        self.bytes_fetched = 0
        # Reused across the steps of one window (jobs audit sampled steps in ascending order):
        # verified gradients (fetched ahead on a worker thread), replayed states, held-out losses
        # and each window's chain result. Nothing is kept before it was checked.
        self._fetcher = GradientFetcher(
            store, run, shapes=self._shapes(), max_bytes=max_artifact_bytes(self.param_bytes, 2)
        )
        self._states = ReplayedStates(limit=MAX_KEPT_STATES)
        self._expected: tuple[int, ...] = ()
        self._heldout: dict[tuple[int, int], float | None] = {}
        self._chain: dict[int, str | None] = {}
        # A window's chain replay runs here while this thread re-executes the step.
        self._replayer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-replay")

    def expect(self, steps: Iterable[int]) -> None:
        """Say which steps will be audited (any order; jobs pass their sample): replaying a
        window then keeps the states these steps start from instead of replaying them again."""
        self._expected = tuple(sorted(set(steps)))

    def close(self) -> None:
        """Stop the worker threads (idempotent); the auditor cannot audit afterwards."""
        self._replayer.shutdown(wait=True)
        self._fetcher.close()

    def __enter__(self) -> StepAuditor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- fetching -------------------------------------------------------------------------------

    def _gradient(self, step: int) -> dict[str, torch.Tensor]:
        return self._gradient_with_index(step)[1]

    def _gradient_with_index(self, step: int) -> tuple[ArtifactIndex, dict[str, torch.Tensor]]:
        grad, fetched = self._fetcher.get(step)
        if fetched:
            self.bytes_fetched += grad.nbytes
        return grad.index, grad.tensors

    def _shapes(self) -> dict[str, torch.Tensor]:
        return {n: torch.empty(p.shape, dtype=p.dtype) for n, p in self.model.named_parameters()}

    def _prefetch(self, ref: StateRef, step: int) -> None:
        """Queue every gradient auditing ``step`` will use, in the order it uses them."""
        near = self._states.nearest(ref.step, step)
        needed = list(range(near[0] if near is not None else ref.step, step))
        if not self._sampled():  # the step's own gradient is compared whole, then applied
            needed.append(step)
            end = self.run.manifest_of(step).state.step
            if self.config.check_chain and end not in self._chain:
                needed += range(step + 1, end)
        # Then the window of the next expected step, if it is another one: read while this step
        # re-executes.
        later = [e for e in self._expected if e > step]
        if later and not self._sampled():
            nxt = self.run.manifest_of(later[0])
            if nxt.first_step > step:
                needed += range(nxt.first_step, nxt.end_step)
        self._fetcher.prefetch(needed)

    def _state(self, root: Root, leaf_count: int) -> dict[str, torch.Tensor]:
        _, leaves = fetch_artifact(
            self.store,
            root,
            leaf_count=leaf_count,
            max_bytes=max_artifact_bytes(self.param_bytes, 8),
        )
        self.bytes_fetched += sum(len(b) for b in leaves)
        return decode_checked(object_name(root), leaves)

    def _replay(self, ref: StateRef, target: int) -> dict[str, torch.Tensor]:
        """The state before ``target`` runs, replayed from the committed checkpoint ``ref``
        through the furthest state already replayed from it; on the way it keeps the states that
        expected steps start from (and reach after their own update)."""
        near = self._states.nearest(ref.step, target)
        if near is None:
            near = (ref.step, self._state(ref.root, ref.leaf_count))
            self._states.put(ref.step, ref.step, near[1])
        start, state = near
        if target == start:
            return state
        keep = {s for e in self._expected for s in (e, e + 1) if start < s < target}
        keep = {s for s in keep if not self._states.has(ref.step, s)}
        states, nbytes = self._replay_range(state, start, target, keep)
        self.bytes_fetched += nbytes
        for s, st in sorted(states.items()):
            self._states.put(ref.step, s, st)
        return states[target]

    def _forget_before(self, origin: int, step: int) -> None:
        """Drop what auditing steps in ascending order no longer needs once ``step`` is reached
        from ``origin``: earlier windows, earlier states and gradients (out of order, they are
        fetched and replayed again)."""
        self._states.forget_before(origin, step)
        self._fetcher.forget_before(step)
        self._heldout = {k: v for k, v in self._heldout.items() if k[0] >= origin}

    def _heldout_loss(self, origin: int, step: int) -> float | None:
        """Held-out loss of the model as loaded (the state before ``step`` from ``origin``)."""
        key = (origin, step)
        if key not in self._heldout:
            self._heldout[key] = heldout_loss(self.model, self.corpus, self.run.header, self.device)
        return self._heldout[key]

    # ---- the model ------------------------------------------------------------------------------

    def _load(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        aliases = self.run.header.aliases
        sd = {}
        for key in model.state_dict():
            if key in aliases:
                sd[key] = state[PARAM + aliases[key]]
            elif PARAM + key in state:
                sd[key] = state[PARAM + key]
            else:
                sd[key] = state[BUFFER + key]
        model.load_state_dict(sd)

    def _recompute(
        self, model: nn.Module, step: int, *, dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        h = self.run.header
        if self.corpus is None:  # checked in __init__; keeps the type checker honest
            raise AuditSetupError("no corpus")
        batch = self.corpus.batch_for_step(
            h.run_seed, step, batch_size=h.batch_size, context=h.context
        )
        model.train()
        for p in model.parameters():
            p.grad = None
        seed_generators(replay_seed(h.run_seed, step))
        _, loss = model(batch.inputs.to(self.device), batch.targets.to(self.device))
        if loss is None:
            raise AuditSetupError("model returned no loss")
        loss.backward()
        grads = capture_gradients(model)
        if dtype is not None:
            grads = {n: g.to(dtype) for n, g in grads.items()}
        return {n: g.cpu() for n, g in grads.items()}

    def _calibrate(self, step: int, primary: Mapping[str, torch.Tensor]) -> Calibration:
        """Reproduce the step with another thread count and in float64 (docs/auditing.md)."""
        repros = []
        threads = torch.get_num_threads()
        try:
            other_threads = self.config.calibration_threads or (2 if threads == 1 else 1)
            torch.set_num_threads(other_threads)
            other = self._recompute(self.model, step)
        finally:
            torch.set_num_threads(threads)
        repros.append(distances(other, primary))
        ref = copy.deepcopy(self.model).double()
        ref64 = self._recompute(ref, step)
        ref32 = {n: g.to(primary[n].dtype) for n, g in ref64.items()}
        repros.append(distances(ref32, primary))
        return calibrate(repros, safety_factor=self.config.safety_factor)

    # ---- one step -------------------------------------------------------------------------------

    def audit(self, step: int) -> StepResult:
        """Re-execute ``step``; artifacts that fail their commitment give an invalid result."""
        self.bytes_fetched = 0
        record = self.run.record(step)
        try:
            return self._audit(step)
        except ArtifactInvalid as exc:
            return StepResult(
                passed=False,
                invalid=True,
                reason=str(exc),
                committed_root=record.grad_root,
                recomputed_root=None,
                tensors=(),
                evidence=exc.evidence,
                loss_before=None,
                loss_after=None,
                bytes_fetched=self.bytes_fetched,
            )

    def _audit(self, step: int) -> StepResult:
        run, cfg, h = self.run, self.config, self.run.header
        record = run.record(step)
        ref = run.state_at_or_before(step)
        origin = ref.step
        self._prefetch(ref, step)
        state = self._replay(ref, step)
        self._forget_before(origin, step)
        chain_job = self._start_chain(ref, step, state)
        self._load(self.model, state)
        heldout = self._heldout_loss(origin, step) if cfg.usefulness else None
        batch = self.corpus.batch_for_step(  # type: ignore[union-attr]
            h.run_seed, step, batch_size=h.batch_size, context=h.context
        )
        if tuple(record.batch) and tuple(record.batch) != batch.offsets:
            return self._fail(record.grad_root, "committed batch differs from the seed's batch")
        cmp = self._compare(step, self._recompute(self.model, step))
        passed, reason, loss_after = cmp.passed, cmp.reason, None
        if chain_job is not None:
            self._finish_chain(ref, step, chain_job, passed)
        # Both need the whole committed gradient of the step, which chunk sampling does not fetch.
        if not self._sampled() and (cfg.usefulness or cfg.check_chain):
            after = self._replay(ref, step + 1)
            if cfg.usefulness:
                self._load(self.model, after)
                loss_after = self._heldout_loss(origin, step + 1)
            if cfg.check_chain and passed:
                chain = self._check_chain(ref, step)
                if chain is not None:
                    passed, reason = False, chain
        return StepResult(
            passed=passed,
            invalid=False,
            reason=reason,
            committed_root=record.grad_root,
            recomputed_root=cmp.recomputed_root,
            tensors=cmp.tensors,
            evidence=cmp.evidence,
            loss_before=heldout,
            loss_after=loss_after,
            bytes_fetched=self.bytes_fetched,
        )

    def _sampled(self) -> bool:
        return self.config.chunk_fraction is not None and self.config.chunk_fraction < 1.0

    def _compare(self, step: int, recomputed: Mapping[str, torch.Tensor]) -> Comparison:
        calibration = None
        if self.config.mode is Mode.TOLERANT:
            if self.calibration is None:
                self.calibration = self._calibrate(step, recomputed)
            calibration = self.calibration
        if self._sampled():
            return self._compare_sampled(step, recomputed, calibration)
        record = self.run.record(step)
        index, committed = self._gradient_with_index(step)
        return compare_full(
            artifact=object_name(record.grad_root),
            committed_root=record.grad_root,
            committed_index=index,
            committed=committed,
            recomputed=recomputed,
            chunk_size=self.run.header.chunk_size,
            calibration=calibration,
        )

    def _compare_sampled(
        self, step: int, recomputed: Mapping[str, torch.Tensor], calibration: Calibration | None
    ) -> Comparison:
        record = self.run.record(step)
        index = fetch_index(
            self.store,
            record.grad_root,
            leaf_count=record.grad_leaves,
            max_bytes=max_artifact_bytes(self.param_bytes, 2),
            leaf_bytes=record.grad_bytes,
        )
        self.bytes_fetched += 16 + 40 * index.leaf_count
        # Chosen from the beacon-derived sample seed: the peer could not know them at commit time.
        picks = choose_chunks(
            self.sample_seed + step.to_bytes(8, "big"),
            leaf_count=index.leaf_count,
            fraction=self.config.chunk_fraction or 1.0,
        )
        leaves = fetch_some_leaves(self.store, record.grad_root, index, picks)
        self.bytes_fetched += sum(len(b) for b in leaves.values())
        return compare_chunks(
            artifact=object_name(record.grad_root),
            committed_root=record.grad_root,
            committed_index=index,
            committed_leaves=leaves,
            recomputed=recomputed,
            chunk_size=self.run.header.chunk_size,
            calibration=calibration,
        )

    def _check_chain(self, ref: StateRef, step: int) -> str | None:
        """Replay ``step``'s window to its next state checkpoint; a reason string if it does not
        match.

        The answer depends only on the window's committed artifacts, so it is worked out once per
        window. A replayed state whose root equals the next checkpoint's *is* that checkpoint:
        it is kept as the starting point of the next window."""
        end = self.run.manifest_of(step).state
        if end.step not in self._chain:
            final = self._replay(ref, end.step)
            root = checkpoint_root(final, chunk_size=self.run.header.chunk_size)
            if root == end.root:
                self._states.put(end.step, end.step, final)
            self._chain[end.step] = self._chain_problem(root, end)
        return self._chain[end.step]

    def _start_chain(
        self, ref: StateRef, step: int, state: dict[str, torch.Tensor]
    ) -> Future[_ChainReplay] | None:
        """Start the replay of ``step``'s window from ``state`` to its next checkpoint on the
        worker thread, when the chain check will need it. Not while the tolerant mode has yet to
        calibrate: calibrating changes the thread count, and the replay's reductions must run
        as the trainer's did."""
        cfg = self.config
        end = self.run.manifest_of(step).state
        if self._sampled() or not cfg.check_chain or end.step in self._chain:
            return None
        if cfg.mode is Mode.TOLERANT and self.calibration is None:
            return None
        self._gradient(step)  # fetched here: this thread compares it meanwhile
        keep = {s for e in self._expected for s in (e, e + 1) if step < s < end.step}
        keep = {s for s in keep if not self._states.has(ref.step, s)} | {step + 1}
        return self._replayer.submit(self._chain_replay, step, state, end, keep)

    def _chain_replay(
        self, step: int, state: dict[str, torch.Tensor], end: StateRef, keep: set[int]
    ) -> _ChainReplay:
        """Worker thread: replay ``step .. end-1`` from ``state``; reads no cache but the
        fetcher's, writes none (the auditor's thread stores the outcome)."""
        states, nbytes = self._replay_range(state, step, end.step, keep)
        root = checkpoint_root(states[end.step], chunk_size=self.run.header.chunk_size)
        return _ChainReplay(states=states, root=root, nbytes=nbytes)

    def _replay_range(
        self, state: dict[str, torch.Tensor], start: int, stop: int, keep: set[int]
    ) -> tuple[dict[int, dict[str, torch.Tensor]], int]:
        """States after replaying ``start .. stop-1`` from ``state`` (at ``stop`` and ``keep``),
        and the gradient bytes read for it. Safe on the worker thread: it writes no cache."""
        steps, nbytes = [], 0
        for s in range(start, stop):
            grad, fetched = self._fetcher.get(s)
            nbytes += grad.nbytes if fetched else 0
            steps.append((self.run.record(s), grad.tensors))
        try:
            states = replay_states(self.run.header, state, steps, keep=keep, device=self.device)
        except (ValueError, KeyError) as exc:
            raise ArtifactInvalid(f"steps {start}..{stop - 1}", f"replay failed: {exc}") from exc
        return states, nbytes

    def _finish_chain(
        self, ref: StateRef, step: int, job: Future[_ChainReplay], passed: bool
    ) -> None:
        """Store what the chain replay found. A failure to fetch or replay counts only for a
        step that passed on its own (one that failed never needed the rest of the window)."""
        end = self.run.manifest_of(step).state
        try:
            out = job.result()
        except ArtifactInvalid:
            if passed:
                raise
            return
        self.bytes_fetched += out.nbytes
        for s, st in sorted(out.states.items()):
            self._states.put(ref.step, s, st)
        if out.root == end.root:
            self._states.put(end.step, end.step, out.states[end.step])
        self._chain[end.step] = self._chain_problem(out.root, end)

    def _chain_problem(self, root: Root, end: StateRef) -> str | None:
        if root == end.root:
            return None
        if self.device.type != self.run.header.device:
            return None  # bitwise state equality is only promised on the same device type
        return (
            f"state checkpoint at step {end.step} ({object_name(end.root)}) does not follow "
            f"from the committed gradients"
        )

    def _fail(self, root: Root, reason: str) -> StepResult:
        return StepResult(
            passed=False,
            invalid=False,
            reason=reason,
            committed_root=root,
            recomputed_root=None,
            tensors=(),
            evidence=(),
            loss_before=None,
            loss_after=None,
            bytes_fetched=self.bytes_fetched,
        )

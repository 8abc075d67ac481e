"""Re-execute one committed training step and judge it.

For step ``t`` of a run whose records passed :func:`audit.fetch.load_run`:

1. fetch the nearest state checkpoint ``c <= t`` and the gradient checkpoints of steps
   ``c .. t-1`` (plus the rest of the window when the chain is checked), each verified against
   its committed root before use;
2. rebuild the state at ``t`` by applying those committed gradients through the recorded
   optimizer (:class:`audit.window.WindowReplay`, ``trainer.replay``: no forward or backward);
3. build the model from the auditor's own registry (``trainer.models.build_model``; nothing the
   peer names is imported), rebuild the batch from the corpus and the run seed, seed every
   generator with the step's replay seed and run forward and backward;
4. compare with the committed gradient (:mod:`audit.compare`), measure usefulness, and check
   that the window's next state checkpoint follows from its gradients.

Device: ``cuda`` when present, else CPU. Exact mode adopts the run's recorded determinism
settings (thread count, deterministic kernels) and refuses, before any verdict, a run whose
recorded key it cannot reproduce (device type, CPU kernel capability, GPU, versions:
trainer.determinism). The chain check always runs: bit for bit where the key is reproduced,
per tensor within a calibrated tolerance elsewhere (trainer.chain).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import weakref
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch
from torch import nn

from audit.chunks import choose_chunks
from audit.compare import Comparison, compare_chunks, compare_full
from audit.fetch import ArtifactInvalid, VerifiedRun, fetch_index
from audit.fetch import fetch_leaves as fetch_some_leaves
from audit.tolerance import DEFAULT_SAFETY_FACTOR, Calibration, Mode, calibrate, distances
from audit.usefulness import HeldoutBatch, heldout_batch, heldout_loss
from audit.verdict import Evidence, TensorCheck
from audit.window import ChainJob, State, WindowReplay, max_artifact_bytes
from proofs.hashing import Root
from trainer.chain import ChainComparison
from trainer.checkpoint import (
    BUFFER,
    PARAM,
    capture_gradients,
)
from trainer.data import Corpus
from trainer.derived import derivation_problem
from trainer.determinism import Settings, apply_settings, key_differences, reproduce
from trainer.manifest import StateRef
from trainer.models import build_model
from trainer.recipe import RunHeader
from trainer.seeds import replay_seed, seed_generators
from trainer.store import RunStore, object_name

log = logging.getLogger(__name__)


class AuditSetupError(RuntimeError):
    """The auditor cannot audit this run (its fault or choice, not the peer's): unknown model,
    missing corpus, exact mode where the run's recorded determinism settings cannot be
    reproduced."""


def exact_settings(header: RunHeader, device: torch.device) -> Settings:
    """Adopt the run's recorded determinism settings for exact mode (thread count, deterministic
    kernels, TF32, matmul precision) and return the previous ones; raises AuditSetupError, with
    the settings restored, when the rest of the recorded key (device type, CPU kernel
    capability, GPU, versions) differs here, so that no verdict blames the peer for it."""
    before = reproduce(header.determinism)
    differs = key_differences(
        device=header.device,
        torch_version=header.torch_version,
        recorded=header.determinism,
        here=device,
    )
    if not differs:
        return before
    apply_settings(before)
    hints = []
    capability = header.determinism.get("cpu_capability")
    if header.device == device.type == "cpu" and isinstance(capability, str):
        hints.append(
            f"start the auditor with ATEN_CPU_CAPABILITY={capability.lower()} if this CPU has it"
        )
    hints.append("or audit in tolerant mode")
    raise AuditSetupError(
        "exact mode cannot reproduce this run's recorded determinism settings ("
        + "; ".join(differs)
        + "): "
        + " ".join(hints)
    )


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


def state_checks(end: int, cmp: ChainComparison) -> tuple[TensorCheck, ...]:
    """A tolerant chain comparison as verdict tensor checks, named ``state@<end>/<entry>``: every
    entry compared within tolerance (distance relative to the update, the update's cosine
    distance, the threshold; no cosine bound), and the exactly compared ones that differ."""
    return tuple(
        TensorCheck(
            name=f"state@{end}/{c.name}",
            rel_l2=c.distance,
            cosine=c.cosine,
            max_rel_l2=c.threshold,
            max_cosine=None,
            passed=c.passed,
        )
        for c in cmp.checks
        if c.threshold is not None or not c.passed
    )


def auditor_device(config: ReexecConfig) -> torch.device:
    if config.device is not None:
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


LOSS_TOLERANCE = 1e-4
"""Relative difference allowed between a step's recorded and re-executed training loss: float32
cross-entropy differs by ~1e-6 relative between kernels and devices, a peer's made-up loss by far
more."""


def loss_matches(recorded: float, recomputed: float) -> bool:
    """True when ``recorded`` is ``recomputed`` within LOSS_TOLERANCE (NaN matches only NaN)."""
    if math.isnan(recorded) or math.isnan(recomputed):
        return math.isnan(recorded) and math.isnan(recomputed)
    return abs(recorded - recomputed) <= LOSS_TOLERANCE * max(1.0, abs(recomputed))


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
        self._restore: Settings | None = None
        if config.mode is Mode.EXACT:
            # Before any worker thread exists: a torch thread keeps the thread count it had at
            # its first parallel kernel.
            self._restore = exact_settings(h, self.device)
        elif self.device.type == "cuda":
            # TF32 matmuls carry ~1e-3 relative error, far above the float32 noise calibrated
            # against: a tolerant auditor must never run them.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        # The chain is compared bit for bit only where this auditor reproduces the recorded key;
        # a declaration can only make it tolerant, never switch it off.
        self.key_differences = key_differences(
            device=h.device, torch_version=h.torch_version, recorded=h.determinism, here=self.device
        )
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.calibration: Calibration | None = None
        self.bytes_fetched = 0  # this step's chunk-sampled reads; the window counts its own
        self._last_loss = math.nan  # the training loss of the last re-execution
        # Reused across the steps of one window (jobs audit sampled steps in ascending order):
        # verified gradients, replayed states, chain results, held-out losses. Nothing is kept
        # before it was checked.
        self._window = WindowReplay(
            store,
            run,
            shapes=self._shapes(),
            param_bytes=self.param_bytes,
            device=self.device,
            bitwise=not self.key_differences,
            safety_factor=config.safety_factor,
        )
        self._heldout: dict[tuple[int, int], float | None] = {}
        self._heldout_batch: HeldoutBatch | None = None
        # Held-out losses of states at hand are measured on their own thread, on a copy of the
        # model, while this one re-executes: two forward passes per sampled step off its path.
        self._loss_model: nn.Module | None = None
        self._loss_pool: ThreadPoolExecutor | None = None
        self._loss_job: Future[dict[int, float | None]] | None = None
        self._slots: weakref.WeakKeyDictionary[nn.Module, list[tuple[str, torch.Tensor, str]]]
        self._slots = weakref.WeakKeyDictionary()

    def expect(self, steps: Iterable[int]) -> None:
        """Say which steps will be audited (any order; jobs pass their sample): replaying a
        window then keeps the states these steps start from instead of replaying them again."""
        self._window.expected = tuple(sorted(set(steps)))

    def close(self) -> None:
        """Stop the worker threads (idempotent); the auditor cannot audit afterwards."""
        if self._loss_pool is not None:
            self._loss_pool.shutdown(wait=True)
        self._window.close()
        if self._restore is not None:
            apply_settings(self._restore)
            self._restore = None

    def __enter__(self) -> StepAuditor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- fetching -------------------------------------------------------------------------------

    def _shapes(self) -> dict[str, torch.Tensor]:
        return {n: torch.empty(p.shape, dtype=p.dtype) for n, p in self.model.named_parameters()}

    def _fetched(self) -> int:
        return self.bytes_fetched + self._window.bytes_fetched

    def _heldout_loss(self, origin: int, step: int) -> float | None:
        """Held-out loss of the model as loaded (the state before ``step`` from ``origin``)."""
        key = (origin, step)
        if key not in self._heldout:
            self._heldout[key] = heldout_loss(self.model, self._batch())
        return self._heldout[key]

    def _batch(self) -> HeldoutBatch:
        if self._heldout_batch is None:
            if self.corpus is None:  # checked in __init__; keeps the type checker honest
                raise AuditSetupError("no corpus")
            self._heldout_batch = heldout_batch(self.corpus, self.run.header, self.device)
        return self._heldout_batch

    def _start_losses(
        self, origin: int, step: int, state: State, job: ChainJob | None
    ) -> Future[dict[int, float | None]] | None:
        """Measure the held-out losses before and after ``step`` on the loss thread, from
        ``state`` and the state after (the chain job's, or one held): None when neither is
        needed, or the state after is at hand only by a replay on this thread."""
        after = self._window.states.get(origin, step + 1)
        if job is None and after is None:
            return None
        todo = [s for s in (step, step + 1) if (origin, s) not in self._heldout]
        if not todo:
            return None
        if self._loss_pool is None or self._loss_model is None:
            self._loss_model = copy.deepcopy(self.model)
            # Its slots are made here, so the loss thread only ever reads ``_slots``.
            self._slots[self._loss_model] = self._state_slots(self._loss_model)
            self._loss_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-loss")
        model, batch = self._loss_model, self._batch()

        def measure() -> dict[int, float | None]:
            states = {step: state, step + 1: after}
            if step + 1 in todo and after is None and job is not None and not job.exception():
                states[step + 1] = job.result().states.get(step + 1)
            out: dict[int, float | None] = {}
            for s in todo:
                st = states[s]
                if st is not None:
                    self._load(model, st)
                    out[s] = heldout_loss(model, batch)
            return out

        return self._loss_pool.submit(measure)

    def _collect_losses(self, origin: int) -> None:
        """Keep what the loss thread measured (nothing if it failed: this thread measures)."""
        job, self._loss_job = self._loss_job, None
        if job is not None and not job.exception():
            self._heldout.update({(origin, s): loss for s, loss in job.result().items()})

    # ---- the model ------------------------------------------------------------------------------

    def _load(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        """Load a replayed or committed state. In place where every tensor matches (the module
        walk of ``load_state_dict`` costs ~1 ms, once or twice per audited step); anything else
        goes through ``load_state_dict`` and its errors."""
        slots = self._slots.get(model)
        if slots is None:
            slots = self._slots[model] = self._state_slots(model)
        pairs = [(dst, state.get(source)) for _, dst, source in slots]
        ready = [
            (d, s) for d, s in pairs if s is not None and (s.shape, s.dtype) == (d.shape, d.dtype)
        ]
        if len(ready) < len(pairs):
            model.load_state_dict({key: state[source] for key, _, source in slots})
            return
        with torch.no_grad():
            for dst, src in ready:
                dst.copy_(src)

    def _state_slots(self, model: nn.Module) -> list[tuple[str, torch.Tensor, str]]:
        """(state_dict key, the model's tensor, the state's key) for every entry."""
        aliases = self.run.header.aliases
        params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        out = []
        for key, tensor in model.state_dict(keep_vars=True).items():
            source = PARAM + aliases.get(key, key) if key in params else BUFFER + key
            out.append((key, tensor, source))
        return out

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
        self._last_loss = float(loss.detach())
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
        self.bytes_fetched = self._window.bytes_fetched = 0
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
                bytes_fetched=self._fetched(),
            )

    def _audit(self, step: int) -> StepResult:
        cfg, window, whole = self.config, self._window, not self._sampled()
        ref = self.run.state_at_or_before(step)
        origin = ref.step
        window.prefetch(ref, step, whole=whole, chain=cfg.check_chain)
        state = window.state(ref, step)
        window.forget_before(origin, step)
        self._heldout = {k: v for k, v in self._heldout.items() if k[0] >= origin}
        # The chain replay runs on the worker thread during re-execution; not while the tolerant
        # mode has yet to calibrate, which changes torch's thread count under the replay.
        calibrating = cfg.mode is Mode.TOLERANT and self.calibration is None
        job = None
        if whole and cfg.check_chain and not calibrating:
            job = window.start_chain(ref, step, state)
        if cfg.usefulness and whole and not calibrating:
            self._loss_job = self._start_losses(origin, step, state, job)
        try:
            return self._reexecute(step, ref, state, job)
        finally:
            # Whatever happened, the workers are done before the next step.
            if job is not None:
                wait([job])
            if self._loss_job is not None:
                wait([self._loss_job])
                self._loss_job = None

    def _reexecute(
        self, step: int, ref: StateRef, state: dict[str, torch.Tensor], job: ChainJob | None
    ) -> StepResult:
        run, cfg, h, window, origin = self.run, self.config, self.run.header, self._window, ref.step
        record, whole = run.record(step), not self._sampled()
        self._load(self.model, state)
        heldout = None
        if cfg.usefulness and self._loss_job is None:
            heldout = self._heldout_loss(origin, step)
        # Every value the record carries that the header derives (seed, learning rates, batch):
        # a step trained with a rate or on data of the peer's choosing is not the assigned work.
        problem = derivation_problem(h, record)
        if problem is not None:
            if job is not None:
                window.finish_chain(ref, step, job, passed=False)
            return self._fail(record.grad_root, f"step record: {problem}")
        recomputed = self._recompute(self.model, step)
        loss = self._last_loss
        cmp = self._compare(step, recomputed)
        passed, reason, loss_after, tensors = cmp.passed, cmp.reason, None, cmp.tensors
        if passed and not loss_matches(record.loss, loss):
            # The recorded loss is signed, shown and charted: it must be the step's.
            passed = False
            reason = f"step record: loss {record.loss!r}, re-execution gives {loss!r}"
        if job is not None:
            window.finish_chain(ref, step, job, passed=passed)
        # Both need the whole committed gradient of the step, which chunk sampling does not fetch.
        if whole and (cfg.usefulness or cfg.check_chain):
            if cfg.usefulness:
                self._collect_losses(origin)
                if heldout is None:
                    heldout = self._heldout_loss(origin, step)  # the model still holds it
                if (origin, step + 1) not in self._heldout:
                    self._load(self.model, window.state(ref, step + 1))
                loss_after = self._heldout_loss(origin, step + 1)
            if cfg.check_chain and passed:
                chain = window.check_chain(ref, step)
                if chain is not None:
                    passed, reason = False, chain
                state_cmp = window.comparison(step)
                if state_cmp is not None:
                    tensors += state_checks(run.manifest_of(step).state.step, state_cmp)
                    if chain is None:
                        reason += f"; state checkpoint follows within tolerance: {state_cmp.reason}"
        return StepResult(
            passed=passed,
            invalid=False,
            reason=reason,
            committed_root=record.grad_root,
            recomputed_root=cmp.recomputed_root,
            tensors=tensors,
            evidence=cmp.evidence,
            loss_before=heldout,
            loss_after=loss_after,
            bytes_fetched=self._fetched(),
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
        grad = self._window.gradient(step)
        index, committed = grad.index, grad.tensors
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
            bytes_fetched=self._fetched(),
        )

"""AuditHook: commit every step of any ``nn.Module`` + ``torch.optim`` training loop.

A user loop needs five added lines::

    hook = AuditHook(model, optimizer, store="runs/my-run", keypair=load_keypair("peer.key"),
                     config=HookConfig(run_id="my-run", schedule=Schedule.constant(1e-3)))
    for step in range(hook.start(), total_steps):   # start() writes the header or resumes
        hook.begin_step(step)                       # replay seed; lr from the schedule
        loss = loss_fn(model(x), y)
        loss.backward()
        hook.step(loss)                             # commit raw grads, clip, optimizer.step()
    hook.close()                                    # last state checkpoint, drain, raise errors

``hook.step`` is ``commit`` + ``clip`` + ``optimizer.step()`` + ``zero_grad`` + ``end_step``; call
those separately to keep your own optimizer call (then clip only with ``hook.clip()``, whose
parameter order replay reproduces, and call ``end_step`` right after ``optimizer.step()``, before
any lr scheduler step, so the state checkpoint holds the lr that step used).

The run seed is not the caller's choice: it is derived from the peer's key, the assignment and the
run id (``hook.run_seed``, or ``trainer.seeds.run_seed_for`` before the model is built). Nor is
the learning rate: ``begin_step`` sets every param group's rate from the run's schedule, and
``commit`` refuses a step whose optimizer holds another rate (an lr scheduler of the caller's
would change what the step trains, and no auditor would pay for it).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from proofs.errors import VeritrainError
from proofs.hashing import Hash32
from proofs.signatures import KeyPair, sign
from trainer.assignment import NO_ASSIGNMENT
from trainer.checkpoint import (
    ParamLayout,
    capture_gradient_buffer,
    capture_state,
    encode_checkpoint,
    param_layout,
)
from trainer.data import CorpusCommitment
from trainer.determinism import determinism_flags
from trainer.pipeline import (
    ChainPosition,
    Committer,
    GradientItem,
    HeaderItem,
    Sign,
    StateItem,
    Stats,
    state_ref,
)
from trainer.recipe import (
    GROUP_KEYS_NOT_HYPERPARAMETERS,
    HEADER_VERSION,
    OptimizerSpec,
    RunHeader,
    check_run_id,
    jsonable_hyperparameters,
)
from trainer.resume import resume_position
from trainer.schedule import Schedule
from trainer.seeds import RunSeed, replay_seed, run_seed_for, seed_generators
from trainer.signer import SignerProcess
from trainer.store import RunStore
from trainer.tensors import dtype_name

logger = logging.getLogger(__name__)

_MISSING = object()

DEFAULT_CHUNK_SIZE = 1 << 16
"""Leaf size of gradient/state encodings: 64 KiB keeps leaf-level proofs small."""


class HookStateError(VeritrainError, RuntimeError):
    """The hook's methods were called out of order (e.g. a step index that is not the next)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class HookConfig:
    """What the hook records beyond what it reads off the model and optimizer."""

    run_id: str
    """1-64 of A-Z a-z 0-9 . _ - (trainer.recipe.RUN_ID_PATTERN)."""
    assignment: Hash32 = NO_ASSIGNMENT
    """Hash of the assignment trained for (trainer.assignment); the default is unpaid work."""
    schedule: Schedule | None = None
    """The learning rate of every step; None: constant at the optimizer's rate at construction."""
    checkpoint_every: int = 100
    chunk_size: int = DEFAULT_CHUNK_SIZE
    grad_clip: float | None = None
    queue_depth: int = 4
    sign_in_subprocess: bool = True
    """Sign manifests in a child process (no GIL contention with training); False: in a thread."""
    model_name: str = ""
    """Registry name (trainer.models) or "" for a model the registry does not know."""
    model_config: Mapping[str, Any] = field(default_factory=dict)
    dataset: CorpusCommitment | None = None
    batch_size: int = 0
    context: int = 0

    def __post_init__(self) -> None:
        check_run_id(self.run_id)
        if len(self.assignment) != 32:
            raise ValueError(f"assignment must be a 32-byte hash, got {len(self.assignment)} bytes")
        if self.checkpoint_every <= 0:
            raise ValueError(f"checkpoint_every must be positive, got {self.checkpoint_every}")
        if self.chunk_size <= 0 or self.queue_depth <= 0:
            raise ValueError("chunk_size and queue_depth must be positive")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")


class AuditHook:
    """Commits gradients, state checkpoints and signed manifests of one run to a run store."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        store: RunStore | str,
        keypair: KeyPair,
        config: HookConfig,
    ) -> None:
        if type(optimizer).__module__.split(".")[:2] != ["torch", "optim"]:
            raise TypeError(f"optimizer must be a torch.optim optimizer, got {type(optimizer)}")
        self.model = model
        self.optimizer = optimizer
        self.store = store if isinstance(store, RunStore) else RunStore(store)
        self.keypair = keypair
        self.config = config
        self.run_seed: RunSeed = run_seed_for(
            bytes(keypair.public), config.assignment, config.run_id
        )
        self.schedule = config.schedule or _constant_schedule(optimizer)
        self.layout: ParamLayout = param_layout(model, optimizer)
        self.header: RunHeader | None = None
        self._committer: Committer | None = None
        self._signer: SignerProcess | None = None
        self._next_step = -1
        self._window_steps = 0
        self._in_step = False
        self._committed = False

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> int:
        """Write and sign the run header, or resume a run already in the store.

        Returns the step to train next (0 for a new run). On resume the model and optimizer are
        loaded from the last complete state checkpoint. Raises StoreError when the store holds a
        different run (another recipe or key), EncodingError for bad config values.
        """
        if self._committer is not None:
            raise HookStateError("start() was already called")
        built = self._build_header()
        first: HeaderItem | None = None
        if self.store.has_header():
            signed = self.store.read_header()
            position, step = resume_position(
                self.store, signed, built, self.model, self.optimizer, self.layout
            )
            self.header = signed.header
        else:
            first = self._new_header(built)
            self.header = first.header
            chain = first.header.hash()
            position, step = ChainPosition(window=0, prev_record=chain, prev_manifest=chain), 0
        self._committer = Committer(
            store=self.store,
            sign=self._make_signer(),
            run_id=self.config.run_id,
            chunk_size=self.config.chunk_size,
            position=position,
            depth=self.config.queue_depth,
        )
        if first is not None:
            self._committer.submit(first)  # signed and written by the worker, before any manifest
        self._next_step = step
        return step

    def _make_signer(self) -> Sign:
        if not self.config.sign_in_subprocess:
            keypair = self.keypair
            return lambda domain, context, payload: bytes(sign(keypair, domain, context, payload))
        self._signer = SignerProcess(self.keypair)
        return self._signer.sign

    def _stop_signer(self) -> None:
        if self._signer is not None:
            self._signer.close()
            self._signer = None

    def close(self) -> None:
        """Checkpoint a partial window, wait for every write, raise any pipeline error."""
        committer = self._require()
        if self._in_step:
            raise HookStateError(f"close() inside step {self._next_step}: call step() first")
        if self._window_open():
            self._submit_state()
        try:
            committer.close()
        finally:
            self._stop_signer()

    def __enter__(self) -> AuditHook:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._committer is None:
            return
        if exc_type is None:
            self.close()
        else:
            self._committer.close_quietly()
            self._stop_signer()

    # ---- per step -----------------------------------------------------------------------------

    def begin_step(self, step: int) -> int:
        """Start ``step`` (must be the next one): seed every torch generator with its replay seed.

        Returns the replay seed. Raises PipelineError if the background committer failed.
        """
        committer = self._require()
        committer.check()
        if self._in_step or step != self._next_step:
            raise HookStateError(f"begin_step({step}): expected step {self._next_step}")
        seed = replay_seed(self.run_seed, step)
        seed_generators(seed)
        groups = self.optimizer.param_groups
        for group, lr in zip(groups, self.schedule.lrs_at(step, len(groups)), strict=True):
            group["lr"] = lr
        self._in_step = True
        self._committed = False
        return seed

    def commit(self, loss: torch.Tensor | float, *, batch: Sequence[int] = ()) -> None:
        """Commit this step's raw gradients (after backward, before clipping/optimizer step).

        ``batch``: the sample indices of the step (the reference trainer passes corpus offsets).
        """
        committer = self._require()
        if not self._in_step or self._committed:
            raise HookStateError("commit() must follow begin_step() once per step")
        step = self._next_step
        lrs = tuple(float(g["lr"]) for g in self.optimizer.param_groups)
        off = [i for i, lr in enumerate(lrs) if not self.schedule.matches(step, i, lr)]
        if off:
            raise HookStateError(
                f"step {step}: param group {off[0]} holds lr {lrs[off[0]]!r}, the run's schedule "
                f"says {self.schedule.lr_at(step, off[0])!r} (set it in the schedule, not "
                "between begin_step and commit)"
            )
        loss_t = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        item = GradientItem(
            step=step,
            replay_seed=replay_seed(self.run_seed, step),
            batch=tuple(int(i) for i in batch),
            loss=loss_t,
            lrs=lrs,
            grads=capture_gradient_buffer(self.model),
        )
        committer.submit(item)
        self._committed = True

    def clip(self) -> None:
        """Clip gradients to the configured norm, over parameters in optimizer order."""
        if self.config.grad_clip is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)

    def end_step(self) -> None:
        """Finish the step (after ``optimizer.step()``); every ``checkpoint_every`` steps this
        captures a state checkpoint and closes the window."""
        self._require()
        if not self._committed:
            raise HookStateError("end_step() before commit()")
        self._in_step = False
        self._next_step += 1
        self._window_steps += 1
        if self._next_step % self.config.checkpoint_every == 0:
            self._submit_state()

    def step(self, loss: torch.Tensor | float, *, batch: Sequence[int] = ()) -> None:
        """``commit`` + ``clip`` + ``optimizer.step()`` + ``zero_grad`` + ``end_step``."""
        self.commit(loss, batch=batch)
        self.clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.end_step()

    @property
    def next_step(self) -> int:
        return self._next_step

    @property
    def stats(self) -> Stats:
        """Committed steps, windows, bytes written, last loss (for progress display)."""
        return self._require().stats

    # ---- internals ----------------------------------------------------------------------------

    def _require(self) -> Committer:
        if self._committer is None:
            raise HookStateError("call start() first")
        return self._committer

    def _window_open(self) -> bool:
        """True when steps were committed since the last state checkpoint."""
        return self._window_steps > 0

    def _submit_state(self) -> None:
        tensors = capture_state(
            self.model,
            self.optimizer,
            self.layout,
            run_seed=self.run_seed,
            step=self._next_step,
        )
        self._require().submit(StateItem(step=self._next_step, tensors=tensors))
        self._window_steps = 0

    def planned_header(self) -> RunHeader:
        """The header ``start()`` would write for a new run, its initial state not yet filled
        in: what a caller checks against an assignment before anything is written."""
        return self._build_header()

    def _build_header(self) -> RunHeader:
        """The header this hook would write (initial_state filled in by ``_new_header``)."""
        cfg = self.config
        params = list(self.model.parameters())
        first = params[0] if params else torch.empty(0)
        placeholder = state_ref(0, bytes(32), 0, 0)
        defaults = jsonable_hyperparameters(self.optimizer.defaults, drop=("lr",))
        return RunHeader(
            version=HEADER_VERSION,
            run_id=cfg.run_id,
            run_seed=self.run_seed,
            assignment=cfg.assignment,
            model=cfg.model_name,
            model_config=dict(cfg.model_config),
            optimizer=OptimizerSpec(
                name=type(self.optimizer).__name__,
                defaults=defaults,
                groups=self.layout.groups,
                overrides=tuple(
                    {k: v for k, v in held.items() if defaults.get(k, _MISSING) != v}
                    for held in (
                        jsonable_hyperparameters(g, drop=GROUP_KEYS_NOT_HYPERPARAMETERS)
                        for g in self.optimizer.param_groups
                    )
                ),
            ),
            grad_clip=cfg.grad_clip,
            schedule=self.schedule,
            dataset=cfg.dataset,
            batch_size=cfg.batch_size,
            context=cfg.context,
            dtype=dtype_name(first.dtype),
            device=first.device.type,
            torch_version=torch.__version__,
            determinism=determinism_flags(first.device),
            checkpoint_every=cfg.checkpoint_every,
            chunk_size=cfg.chunk_size,
            initial_state=placeholder,
            pubkey=bytes(self.keypair.public),
            aliases=dict(self.layout.aliases),
        )

    def _new_header(self, built: RunHeader) -> HeaderItem:
        """The complete header of a new run (initial state committed) for the worker to sign."""
        state = capture_state(
            self.model, self.optimizer, self.layout, run_seed=self.run_seed, step=0
        )
        encoded = encode_checkpoint(state, chunk_size=self.config.chunk_size)
        initial = state_ref(0, encoded.root, encoded.index.leaf_count, encoded.nbytes)
        header = dataclasses.replace(built, initial_state=initial)
        return HeaderItem(header=header, initial=encoded)

    def chain_start(self) -> Hash32:
        """Hash of the run header (the root of the chain); only after ``start()``."""
        if self.header is None:
            raise HookStateError("call start() first")
        return self.header.hash()


def _constant_schedule(optimizer: torch.optim.Optimizer) -> Schedule:
    """The optimizer's rates at construction, kept for every step (each group its own)."""
    lrs = [float(g["lr"]) for g in optimizer.param_groups]
    if not lrs:
        raise ValueError("the optimizer has no param groups")
    scales = tuple(lr / lrs[0] for lr in lrs) if len(set(lrs)) > 1 else ()
    return Schedule.constant(lrs[0], group_scales=scales)

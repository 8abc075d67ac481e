"""The reference trainer: the byte-level GPT on a file corpus, through the same AuditHook as users.

``train(config, store, keypair)`` writes (or resumes) a run in ``store``. Everything random is
seeded from the run seed, which is derived from the peer's key, the assignment and the run id
(``run_seed_for``): weights from ``init_seed``, each step's dropout from its replay seed, each
batch from ``batch_offsets(run_seed, step)``. The learning rate of step t is the schedule's (by
default linear warmup, then cosine decay to 10%), set by the hook before the step, so a resumed
run uses exactly the rates an uninterrupted one would. With ``config.assignment`` the whole recipe
comes from the assignment (``TrainConfig.from_assignment``) and is checked against it before the
first step.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from proofs.hashing import Hash32
from proofs.signatures import KeyPair
from trainer.assignment import NO_ASSIGNMENT, Assignment, full_model_config
from trainer.data import Corpus, CorpusCommitment
from trainer.hook import DEFAULT_CHUNK_SIZE, AuditHook, HookConfig
from trainer.models import GPT_NAME, build_model, parse_model_config
from trainer.pipeline import Stats
from trainer.recipe import check_run_id, jsonable_hyperparameters
from trainer.replay import optimizer_class
from trainer.schedule import Schedule
from trainer.seeds import init_seed, run_seed_for, seed_generators
from trainer.store import RunStore
from trainer.tensors import dtype_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """The reference trainer's settings (validated on construction)."""

    run_id: str
    steps: int = 200
    batch_size: int = 8
    model: str = GPT_NAME
    model_config: Mapping[str, Any] = field(default_factory=dict)
    lr: float = 3e-3
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    checkpoint_every: int = 100
    chunk_size: int = DEFAULT_CHUNK_SIZE
    corpus: tuple[str, ...] = ()
    """Files or folders; empty means the Python standard library's ``.py`` sources."""
    threads: int | None = None
    """torch CPU threads; None leaves one core to the committer and signer (see default_threads)."""
    device: str = "auto"
    assignment: Assignment | None = None
    """The work this run is paid for; None: unassigned (verifiable, never paid)."""

    def __post_init__(self) -> None:
        check_run_id(self.run_id)
        if self.steps < 0 or self.batch_size <= 0 or self.warmup_steps < 0:
            raise ValueError("steps and warmup_steps must be >= 0, batch_size > 0")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        parse_model_config(self.model, self.model_config)  # raises on a bad model config

    @property
    def context(self) -> int:
        return int(getattr(parse_model_config(self.model, self.model_config), "context", 0))

    @property
    def schedule(self) -> Schedule:
        """The assignment's schedule, else warmup over ``warmup_steps``, cosine to 10%."""
        if self.assignment is not None:
            return self.assignment.schedule
        return Schedule.warmup_cosine(
            self.lr, warmup_steps=self.warmup_steps, total_steps=max(self.steps, 1)
        )

    @classmethod
    def from_assignment(
        cls,
        assignment: Assignment,
        *,
        run_id: str,
        steps: int | None = None,
        checkpoint_every: int | None = None,
        corpus: tuple[str, ...] = (),
        threads: int | None = None,
        device: str = "auto",
    ) -> TrainConfig:
        """The reference trainer's settings for ``assignment`` (steps default to the schedule's
        length; the checkpoint interval to 100 within the assignment's bounds)."""
        a = assignment
        every = checkpoint_every or min(max(100, a.checkpoint_every_min), a.checkpoint_every_max)
        return cls(
            run_id=run_id,
            steps=a.schedule.total_steps if steps is None else steps,
            batch_size=a.batch_size,
            model=a.model,
            model_config=dict(a.model_config),
            lr=a.schedule.lr,
            warmup_steps=a.schedule.warmup_steps,
            weight_decay=float(a.hyperparameters.get("weight_decay", 0.0)),
            grad_clip=a.grad_clip,
            checkpoint_every=every,
            corpus=corpus,
            threads=threads,
            device=device,
            assignment=a,
        )

    def run_seed(self, pubkey: bytes) -> int:
        """This run's seed for the peer with BLS key ``pubkey``."""
        return run_seed_for(pubkey, self.assignment_hash, self.run_id)

    @property
    def assignment_hash(self) -> Hash32:
        return NO_ASSIGNMENT if self.assignment is None else self.assignment.hash()


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainResult:
    """What ``train`` did: where it started (0, or the resumed step) and what it committed."""

    start_step: int
    end_step: int
    last_loss: float
    bytes_written: int


def reference_assignment(
    config: TrainConfig,
    dataset: CorpusCommitment,
    *,
    checkpoint_every: tuple[int, int] = (1, 1000),
) -> Assignment:
    """The assignment of ``config``'s recipe on ``dataset``: the model's
    whole config, the optimizer's hyperparameters as the hook records them, the schedule. Builds
    the model once (on CPU) to read them off the real optimizer."""
    model = build_model(config.model, config.model_config)
    optimizer = make_optimizer(config, model)
    return Assignment(
        model=config.model,
        model_config=full_model_config(config.model, config.model_config),
        dataset_root=dataset.root,
        dataset_bytes=dataset.nbytes,
        batch_size=config.batch_size,
        context=config.context,
        dtype=dtype_name(next(model.parameters()).dtype),
        optimizer=type(optimizer).__name__,
        hyperparameters=jsonable_hyperparameters(optimizer.defaults, drop=("lr",)),
        schedule=config.schedule,
        grad_clip=config.grad_clip,
        checkpoint_every_min=checkpoint_every[0],
        checkpoint_every_max=checkpoint_every[1],
    )


def pick_device(name: str) -> torch.device:
    """``cuda`` when asked for or when ``auto`` finds one, else CPU."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def default_threads() -> int:
    """All usable cores but one: the committer thread (hashing, writing) and the signer process
    get a core of their own instead of preempting torch's workers."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def configure_determinism(threads: int | None) -> None:
    """Deterministic kernels everywhere torch has them, and a fixed CPU thread count (recorded
    in the run header, since results can depend on it)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by cuBLAS determinism
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.set_num_threads(threads if threads is not None else default_threads())


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The reference loop's optimizer for ``model``: AdamW, or the assignment's optimizer built
    with the assignment's hyperparameters (the hook records them in the header)."""
    if config.assignment is None:
        return torch.optim.AdamW(
            model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay
        )
    return build_assigned_optimizer(config.assignment, model)


def build_assigned_optimizer(assignment: Assignment, model: nn.Module) -> torch.optim.Optimizer:
    """``assignment``'s torch.optim optimizer over ``model``'s parameters, with every
    hyperparameter the constructor takes (lists become tuples); EncodingError for an optimizer
    outside torch.optim."""
    # Typed loosely: concrete optimizers take (params, lr=...), the base class does not.
    cls: Any = optimizer_class(assignment.optimizer)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in assignment.hyperparameters.items()
        if k in accepted
    }
    optimizer: torch.optim.Optimizer = cls(model.parameters(), lr=assignment.schedule.lr, **kwargs)
    return optimizer


def train(
    config: TrainConfig,
    store: RunStore | str,
    keypair: KeyPair,
    *,
    corpus: Corpus | None = None,
    on_step: Callable[[int, Stats], None] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``config.steps`` steps into ``store`` (resuming if it already holds this run).

    ``corpus`` overrides ``config.corpus`` (tests pass a small one). ``on_step(step, stats)`` runs
    after every step. ``stop_after`` ends this call after that many steps (the run stays resumable).
    Raises StoreError when the store holds another run, PipelineError when committing fails.
    """
    configure_determinism(config.threads)
    device = pick_device(config.device)
    data = corpus if corpus is not None else _load_corpus(config.corpus)
    run_seed = config.run_seed(bytes(keypair.public))
    seed_generators(init_seed(run_seed))
    model = build_model(config.model, config.model_config).to(device)
    optimizer = make_optimizer(config, model)
    hook = AuditHook(
        model,
        optimizer,
        store=store,
        keypair=keypair,
        config=HookConfig(
            run_id=config.run_id,
            assignment=config.assignment_hash,
            schedule=config.schedule,
            checkpoint_every=config.checkpoint_every,
            chunk_size=config.chunk_size,
            grad_clip=config.grad_clip,
            model_name=config.model,
            model_config=dict(config.model_config),
            dataset=data.commitment(),
            batch_size=config.batch_size,
            context=config.context,
        ),
    )
    if config.assignment is not None:
        # Before anything is written: a store whose header is not the assigned work is unpaid.
        config.assignment.check(hook.planned_header())
    with hook:
        start = hook.start()
        end = config.steps if stop_after is None else min(config.steps, start + stop_after)
        model.train()
        for step in range(start, end):
            hook.begin_step(step)  # the replay seed and the schedule's learning rate
            batch = data.batch_for_step(
                run_seed, step, batch_size=config.batch_size, context=config.context
            )
            _, loss = model(batch.inputs.to(device), batch.targets.to(device))
            if loss is None:  # pragma: no cover - GPT always returns a loss with targets
                raise RuntimeError("model returned no loss")
            loss.backward()
            hook.step(loss, batch=batch.offsets)
            if on_step is not None:
                on_step(step, hook.stats)
    stats = hook.stats
    return TrainResult(
        start_step=start, end_step=end, last_loss=stats.last_loss, bytes_written=stats.bytes_written
    )


def _load_corpus(paths: Sequence[str]) -> Corpus:
    return Corpus.from_paths(paths) if paths else Corpus.stdlib()

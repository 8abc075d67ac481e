"""A peer's own training loop with the public audit hook (``trainer.hook.AuditHook``).

This is what a user who does not run ``python -m trainer run`` writes: the reference GPT and corpus
from veritrain's public modules, the user's own optimizer and loop, and the five hook calls. The
``Strategy`` lets a *dishonest* user decide, step by step, to skip the real forward/backward and
commit gradients of its own making instead (see cheating_peer.py and lazy_peer.py). The hook cannot
tell: it commits whatever ``.grad`` holds, signs it, and the optimizer applies it, so the run is
internally consistent (``verify-store`` passes). Only an auditor that re-executes a cheated step
notices. Nothing in veritrain knows these scripts exist.

The loop chooses neither its seed nor its learning rates: the run seed is derived from the peer's
key, the assignment and the run id (``TrainConfig.run_seed``), and the hook sets every step's rate
from the run's schedule in ``begin_step``. With ``--assignment`` the recipe (model, batch size,
optimizer, schedule, clipping) is the epoch's, checked against it before anything is written.

    python examples/own_loop.py --store runs/mine --key-file mine.key --steps 48
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from proofs.errors import VeritrainError
from proofs.signatures import generate_keypair, load_keypair, save_keypair
from trainer.assignment import read_assignment
from trainer.data import Corpus
from trainer.hook import AuditHook, HookConfig
from trainer.loop import (
    TrainConfig,
    build_assigned_optimizer,
    configure_determinism,
    pick_device,
)
from trainer.models import build_model
from trainer.seeds import init_seed, seed_generators

log = logging.getLogger("own_loop")


class Strategy:
    """An honest peer: every step is computed. Subclasses override ``fakes`` and ``forge``."""

    name = "honest"

    def fakes(self, step: int) -> bool:
        """Whether this step's gradient is made up instead of computed."""
        return False

    def observe(self, step: int, model: nn.Module) -> bool:
        """Called after each real backward pass; True if it altered the gradient."""
        return False

    def forge(self, step: int, model: nn.Module) -> None:
        """Fill every parameter's ``.grad`` without computing it."""
        raise NotImplementedError


def parse_args(
    description: str, extra: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
    parser = extra or argparse.ArgumentParser(description=description)
    parser.add_argument("--store", required=True, help="run store folder or fsspec URL")
    parser.add_argument(
        "--key-file", required=True, type=Path, help="BLS key file (created if absent)"
    )
    parser.add_argument("--run-id", help="run name (default: the store's folder name)")
    parser.add_argument(
        "--assignment", type=Path, help="the epoch's assignment JSON (default: unassigned work)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="default: the assignment's, else 48"
    )
    parser.add_argument("--checkpoint-every", type=int, default=8)
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default 8; the assignment fixes it"
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.assignment is not None and args.batch_size is not None:
        parser.error("--batch-size: the assignment fixes the recipe")
    return args


def make_config(args: argparse.Namespace) -> TrainConfig:
    """The reference trainer's recipe (so the auditor's registry knows the model), or the
    assignment's."""
    run_id = args.run_id or Path(args.store.rstrip("/")).name
    if args.assignment is not None:
        return TrainConfig.from_assignment(
            read_assignment(args.assignment),
            run_id=run_id,
            steps=args.steps,
            checkpoint_every=args.checkpoint_every,
            threads=args.threads,
        )
    return TrainConfig(
        run_id=run_id,
        steps=48 if args.steps is None else args.steps,
        batch_size=8 if args.batch_size is None else args.batch_size,
        checkpoint_every=args.checkpoint_every,
        threads=args.threads,
    )


def train(args: argparse.Namespace, config: TrainConfig, strategy: Strategy) -> list[int]:
    """Train ``config`` with the audit hook; return the steps whose gradient was faked."""
    key_file: Path = args.key_file
    if not key_file.exists():
        save_keypair(key_file, generate_keypair())
    keypair = load_keypair(key_file)
    run_seed = config.run_seed(bytes(keypair.public))  # derived: the same key always gets it
    configure_determinism(config.threads)
    device = pick_device("auto")
    corpus = Corpus.stdlib()
    seed_generators(init_seed(run_seed))
    model = build_model(config.model, config.model_config).to(device)
    optimizer: torch.optim.Optimizer
    if config.assignment is not None:
        optimizer = build_assigned_optimizer(config.assignment, model)
    else:  # any lr will do here: the hook sets each step's rate from the schedule
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay
        )
    hook = AuditHook(
        model,
        optimizer,
        store=args.store,
        keypair=keypair,
        config=HookConfig(
            run_id=config.run_id,
            assignment=config.assignment_hash,
            schedule=config.schedule,
            checkpoint_every=config.checkpoint_every,
            grad_clip=config.grad_clip,
            model_name=config.model,
            model_config=dict(config.model_config),
            dataset=corpus.commitment(),
            batch_size=config.batch_size,
            context=config.context,
        ),
    )
    if config.assignment is not None:
        config.assignment.check(hook.planned_header())  # before anything is written
    faked: list[int] = []
    last_loss = torch.tensor(float("nan"))
    with hook:
        model.train()
        for step in range(hook.start(), config.steps):
            hook.begin_step(step)  # the replay seed, and the schedule's lr in every group
            batch = corpus.batch_for_step(
                run_seed, step, batch_size=config.batch_size, context=config.context
            )
            if strategy.fakes(step):
                strategy.forge(step, model)  # no forward, no backward: the compute it saves
                faked.append(step)
                loss = last_loss  # and it reports the last loss it saw
            else:
                _, out = model(batch.inputs.to(device), batch.targets.to(device))
                if out is None:
                    raise RuntimeError("model returned no loss")
                out.backward()
                if strategy.observe(step, model):
                    faked.append(step)
                loss = last_loss = out.detach()
            hook.step(loss, batch=batch.offsets)  # commit .grad, clip, optimizer.step()
    return faked


def report(strategy: Strategy, faked: list[int], steps: int) -> None:
    share = len(faked) / max(1, steps)
    print(f"{strategy.name}: faked {len(faked)} of {steps} steps ({share:.0%}): {faked}")


def main(strategy_for: Callable[[int], Strategy], args: argparse.Namespace) -> None:
    """Train with the strategy ``strategy_for(total steps)``; bad input ends in one line, exit 1."""
    try:
        config = make_config(args)
        strategy = strategy_for(config.steps)
        report(strategy, train(args, config, strategy), config.steps)
    except (VeritrainError, ValueError, OSError) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main(lambda steps: Strategy(), parse_args("An honest peer's own loop with the audit hook."))

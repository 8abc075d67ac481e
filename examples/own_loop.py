"""A peer's own training loop with the public audit hook (``trainer.hook.AuditHook``).

This is what a user who does not run ``python -m trainer run`` writes: the reference GPT and corpus
from veritrain's public modules, the user's own optimizer and loop, and the five hook calls. The
``Strategy`` lets a *dishonest* user decide, step by step, to skip the real forward/backward and
commit gradients of its own making instead (see cheating_peer.py and lazy_peer.py). The hook cannot
tell: it commits whatever ``.grad`` holds, signs it, and the optimizer applies it, so the run is
internally consistent (``verify-store`` passes). Only an auditor that re-executes a cheated step
notices. Nothing in veritrain knows these scripts exist.

    python examples/own_loop.py --store runs/mine --key-file mine.key --steps 48
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch import nn

from proofs.signatures import generate_keypair, load_keypair, save_keypair
from trainer.data import Corpus
from trainer.hook import AuditHook, HookConfig
from trainer.loop import TrainConfig, configure_determinism, lr_at, pick_device
from trainer.models import GPT_NAME, build_model
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--checkpoint-every", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args()


def train(args: argparse.Namespace, strategy: Strategy) -> list[int]:
    """Train with the audit hook; return the steps whose gradient was faked."""
    key_file: Path = args.key_file
    if not key_file.exists():
        save_keypair(key_file, generate_keypair())
    keypair = load_keypair(key_file)
    run_id = args.run_id or Path(args.store.rstrip("/")).name
    # The same recipe as the reference trainer, so the auditor's registry knows the model.
    config = TrainConfig(
        run_id=run_id, run_seed=args.seed, steps=args.steps, batch_size=args.batch_size
    )
    configure_determinism(args.threads)
    device = pick_device("auto")
    corpus = Corpus.stdlib()
    seed_generators(init_seed(args.seed))
    model = build_model(GPT_NAME, {}).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay
    )
    hook = AuditHook(
        model,
        optimizer,
        store=args.store,
        keypair=keypair,
        config=HookConfig(
            run_id=run_id,
            run_seed=args.seed,
            checkpoint_every=args.checkpoint_every,
            grad_clip=config.grad_clip,
            model_name=GPT_NAME,
            dataset=corpus.commitment(),
            batch_size=args.batch_size,
            context=config.context,
        ),
    )
    faked: list[int] = []
    last_loss = torch.tensor(float("nan"))
    with hook:
        model.train()
        for step in range(hook.start(), args.steps):
            hook.begin_step(step)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(config, step)
            batch = corpus.batch_for_step(
                args.seed, step, batch_size=args.batch_size, context=config.context
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


if __name__ == "__main__":
    arguments = parse_args("An honest peer's own loop with the audit hook.")
    honest = Strategy()
    report(honest, train(arguments, honest), arguments.steps)

"""A lazy peer: it computes only some steps and re-commits a stale gradient on the others.

Every ``--every``-th step (after the first) it skips the forward and backward pass and commits the
last gradient it computed again, claiming the full run's tokens for a fraction of the compute.
Like the cheater it uses only the public audit hook (own_loop.py); the stale gradient is signed
and applied like any other, so the run verifies, and only re-execution of a lazy step catches it.

    python examples/lazy_peer.py --store runs/dave --key-file dave.key --every 2
"""

from __future__ import annotations

import argparse

import torch
from own_loop import Strategy, main, parse_args
from torch import nn


class Lazy(Strategy):
    name = "lazy"

    def __init__(self, every: int) -> None:
        self.every = every
        self.stale: dict[str, torch.Tensor] = {}

    def fakes(self, step: int) -> bool:
        return step > 0 and step % self.every == self.every - 1

    def observe(self, step: int, model: nn.Module) -> bool:
        self.stale = {
            name: p.grad.detach().clone()
            for name, p in model.named_parameters()
            if p.grad is not None
        }
        return False

    def forge(self, step: int, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.stale:
                p.grad = self.stale[name].clone()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--every", type=int, default=2, help="re-commit a stale gradient every Nth step"
    )
    args = parse_args("", parser)
    if args.every < 1:
        parser.error(f"--every must be at least 1, got {args.every}")
    main(lambda steps: Lazy(args.every), args)

"""A cheating peer: on a secret fraction of its steps it commits a gradient it did not compute.

It writes its own loop around the public audit hook (own_loop.py). On the steps its private coin
picks it skips the forward and backward pass and fills ``.grad`` with noise of a plausible size
(``--attack fabricate``, the compute it saves is its motive), or it commits the true gradient
scaled by 0.5 (``--attack scale``, a bias). Everything it commits is signed and internally
consistent (``python -m trainer verify-store`` passes); only an auditor's re-execution of a
cheated step exposes it.

    python examples/cheating_peer.py --store runs/carol --key-file carol.key --fraction 0.33
"""

from __future__ import annotations

import argparse
import os
import random

import torch
from own_loop import Strategy, main, parse_args
from torch import nn


class Cheater(Strategy):
    name = "cheater"

    def __init__(self, *, steps: int, fraction: float, attack: str, secret: bytes) -> None:
        # A private coin: which steps are fake is the cheater's secret (an auditor never needs it).
        rng = random.Random(secret)
        count = round(fraction * (steps - 1))
        self.cheat_steps = (
            frozenset(rng.sample(range(1, steps), count)) if steps > 1 else frozenset()
        )
        self.attack = attack
        self.norms: dict[str, float] = {}

    def fakes(self, step: int) -> bool:
        return self.attack == "fabricate" and step in self.cheat_steps

    def observe(self, step: int, model: nn.Module) -> bool:
        for name, p in model.named_parameters():
            if p.grad is not None:  # remember a plausible per-element size for forgeries
                self.norms[name] = float(p.grad.norm()) / max(1, p.numel()) ** 0.5
        if self.attack == "scale" and step in self.cheat_steps:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(0.5)
            return True
        return False

    def forge(self, step: int, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            p.grad = torch.randn_like(p) * self.norms.get(name, 1e-3)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A peer that cheats on a fraction of its steps.")
    parser.add_argument("--fraction", type=float, default=0.33, help="share of steps to cheat on")
    parser.add_argument("--attack", choices=["fabricate", "scale"], default="fabricate")
    args = parse_args("", parser)
    if not 0.0 <= args.fraction <= 1.0:
        parser.error(f"--fraction must be in [0, 1], got {args.fraction}")
    secret = os.urandom(16)
    main(
        lambda steps: Cheater(
            steps=steps, fraction=args.fraction, attack=args.attack, secret=secret
        ),
        args,
    )

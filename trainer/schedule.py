"""Learning-rate schedules: the learning rate of every step is a pure function of the step.

A run's schedule is part of its recipe (the run header) and of the work an epoch pays for (the
assignment). The hook sets each param group's learning rate from it before every step, and anyone
can recompute the rate a step record carries: a peer cannot train with a rate it chose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from proofs.errors import EncodingError
from trainer.jsonform import check_keys, get_float, get_int, get_str

ScheduleKind = Literal["constant", "warmup_cosine"]
KINDS: tuple[ScheduleKind, ...] = ("constant", "warmup_cosine")

LR_RELATIVE_TOLERANCE = 1e-9
"""How far a recorded rate may sit from the schedule's: the rate is computed in float64 with
``math.cos``, whose last bit may differ between C libraries; no training effect hides in 1e-9."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Schedule:
    """``constant``: ``lr`` at every step. ``warmup_cosine``: linear warmup over ``warmup_steps``
    (step t gets ``lr * (t + 1) / warmup_steps``), then cosine decay from ``lr`` to
    ``final_fraction * lr`` at ``total_steps``, constant after it."""

    kind: ScheduleKind
    lr: float
    warmup_steps: int = 0
    total_steps: int = 0
    final_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise EncodingError(f"schedule kind must be one of {KINDS}, got {self.kind!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise EncodingError(f"schedule lr must be a positive number, got {self.lr!r}")
        if self.warmup_steps < 0 or self.total_steps < 0:
            raise EncodingError("schedule warmup_steps and total_steps must be >= 0")
        if not 0.0 <= self.final_fraction <= 1.0:
            raise EncodingError(f"final_fraction must be in [0, 1], got {self.final_fraction}")
        if self.kind == "constant" and (self.warmup_steps, self.total_steps) != (0, 0):
            raise EncodingError("a constant schedule has no warmup_steps or total_steps")

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step`` (0-based)."""
        if self.kind == "constant":
            return self.lr
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.final_fraction
        return self.lr * (floor + (1.0 - floor) / 2 * (1.0 + math.cos(math.pi * progress)))

    def matches(self, step: int, lr: float) -> bool:
        """True when ``lr`` is the schedule's rate of ``step`` (see LR_RELATIVE_TOLERANCE)."""
        expected = self.lr_at(step)
        return abs(lr - expected) <= LR_RELATIVE_TOLERANCE * abs(expected)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "lr": self.lr,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "final_fraction": self.final_fraction,
        }

    @classmethod
    def from_json(cls, obj: Any) -> Schedule:
        check_keys(obj, "schedule", ("kind", "lr", "warmup_steps", "total_steps", "final_fraction"))
        kind = get_str(obj, "kind")
        if kind not in KINDS:
            raise EncodingError(f"schedule kind must be one of {', '.join(KINDS)}, got {kind!r}")
        return cls(
            kind=kind,  # checked against KINDS just above
            lr=get_float(obj, "lr"),
            warmup_steps=get_int(obj, "warmup_steps"),
            total_steps=get_int(obj, "total_steps"),
            final_fraction=get_float(obj, "final_fraction"),
        )

    @classmethod
    def constant(cls, lr: float) -> Schedule:
        return cls(kind="constant", lr=lr)

    @classmethod
    def warmup_cosine(
        cls, lr: float, *, warmup_steps: int, total_steps: int, final_fraction: float = 0.1
    ) -> Schedule:
        return cls(
            kind="warmup_cosine",
            lr=lr,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            final_fraction=final_fraction,
        )

"""Learning-rate schedules: the learning rate of every step is a pure function of the step.

A run's schedule is part of its recipe (the run header) and of the work an epoch pays for (the
assignment). The hook sets each param group's learning rate from it before every step, and anyone
can recompute the rate a step record carries: a peer cannot train with a rate it chose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from proofs.codec import as_float, check_keys, get_float, get_int, get_list, get_str
from proofs.errors import EncodingError

ScheduleKind = Literal["constant", "warmup_cosine", "step"]
KINDS: tuple[ScheduleKind, ...] = ("constant", "warmup_cosine", "step")

MAX_GROUPS = 1024
LR_RELATIVE_TOLERANCE = 1e-9
"""How far a recorded rate may sit from the schedule's: the rate is computed in float64 with
``math.cos``, whose last bit may differ between C libraries; no training effect hides in 1e-9."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Schedule:
    """``constant``: ``lr`` at every step. ``warmup_cosine``: linear warmup over ``warmup_steps``
    (step t gets ``lr * (t + 1) / warmup_steps``), then cosine decay from ``lr`` to
    ``final_fraction * lr`` at ``total_steps``, constant after it. ``step``: ``lr * gamma ** (t //
    step_size)`` (torch's StepLR). Param group i gets the rate times ``group_scales[i]`` (1 for
    every group when empty), so a recipe can give groups different rates."""

    kind: ScheduleKind
    lr: float
    warmup_steps: int = 0
    total_steps: int = 0
    final_fraction: float = 0.1
    step_size: int = 0
    gamma: float = 1.0
    group_scales: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise EncodingError(f"schedule kind must be one of {KINDS}, got {self.kind!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise EncodingError(f"schedule lr must be a positive number, got {self.lr!r}")
        if self.warmup_steps < 0 or self.total_steps < 0:
            raise EncodingError("schedule warmup_steps and total_steps must be >= 0")
        if not 0.0 <= self.final_fraction <= 1.0:
            raise EncodingError(f"final_fraction must be in [0, 1], got {self.final_fraction}")
        if self.kind != "warmup_cosine" and (self.warmup_steps, self.total_steps) != (0, 0):
            raise EncodingError(f"a {self.kind} schedule has no warmup_steps or total_steps")
        if (self.kind == "step") != (self.step_size > 0):
            raise EncodingError("step_size is positive for a step schedule and 0 for any other")
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise EncodingError(f"gamma must be a positive number, got {self.gamma!r}")
        if not all(math.isfinite(s) and s > 0 for s in self.group_scales):
            raise EncodingError(f"group scales must be positive numbers, got {self.group_scales}")

    def lr_at(self, step: int, group: int = 0) -> float:
        """The learning rate of param group ``group`` at ``step`` (both 0-based)."""
        scale = self.group_scales[group] if self.group_scales else 1.0
        return self._base_at(step) * scale

    def lrs_at(self, step: int, groups: int) -> tuple[float, ...]:
        """The rates of ``groups`` param groups at ``step``; EncodingError when the schedule
        scales another number of groups."""
        if self.group_scales and len(self.group_scales) != groups:
            raise EncodingError(
                f"the schedule scales {len(self.group_scales)} param groups, the optimizer has "
                f"{groups}"
            )
        return tuple(self.lr_at(step, g) for g in range(groups))

    def _base_at(self, step: int) -> float:
        if self.kind == "constant":
            return self.lr
        if self.kind == "step":
            return self.lr * self.gamma ** (step // self.step_size)
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.final_fraction
        return self.lr * (floor + (1.0 - floor) / 2 * (1.0 + math.cos(math.pi * progress)))

    def matches(self, step: int, group: int, lr: float) -> bool:
        """True when ``lr`` is the schedule's rate of ``group`` at ``step`` (within
        LR_RELATIVE_TOLERANCE)."""
        expected = self.lr_at(step, group)
        return abs(lr - expected) <= LR_RELATIVE_TOLERANCE * abs(expected)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "lr": self.lr,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "final_fraction": self.final_fraction,
            "step_size": self.step_size,
            "gamma": self.gamma,
            "group_scales": list(self.group_scales),
        }

    @classmethod
    def from_json(cls, obj: Any) -> Schedule:
        keys = ("kind", "lr", "warmup_steps", "total_steps", "final_fraction", "step_size")
        check_keys(obj, "schedule", (*keys, "gamma", "group_scales"))
        scales = get_list(obj, "group_scales")
        if len(scales) > MAX_GROUPS:
            raise EncodingError(f"group_scales: more than {MAX_GROUPS} groups")
        kind = get_str(obj, "kind")
        if kind not in KINDS:
            raise EncodingError(f"schedule kind must be one of {', '.join(KINDS)}, got {kind!r}")
        return cls(
            kind=kind,  # checked against KINDS just above
            lr=get_float(obj, "lr"),
            warmup_steps=get_int(obj, "warmup_steps"),
            total_steps=get_int(obj, "total_steps"),
            final_fraction=get_float(obj, "final_fraction"),
            step_size=get_int(obj, "step_size"),
            gamma=get_float(obj, "gamma"),
            group_scales=tuple(as_float(s, "group_scales") for s in scales),
        )

    @classmethod
    def constant(cls, lr: float, *, group_scales: tuple[float, ...] = ()) -> Schedule:
        return cls(kind="constant", lr=lr, group_scales=group_scales)

    @classmethod
    def step_decay(
        cls, lr: float, *, step_size: int, gamma: float, group_scales: tuple[float, ...] = ()
    ) -> Schedule:
        return cls(kind="step", lr=lr, step_size=step_size, gamma=gamma, group_scales=group_scales)

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

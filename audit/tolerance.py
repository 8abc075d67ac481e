"""How close a recomputed gradient must be to the committed one.

Two modes (issue 4):

- ``exact``: same device type, deterministic algorithms. The recomputed gradient's Merkle root
  must equal the committed root, bit for bit. Any difference fails.
- ``tolerant``: different hardware, kernels or thread counts. Each parameter tensor's gradient is
  compared with two distances, computed in float64:

  * relative L2: ``||g_committed - g_recomputed|| / ||g_recomputed||``
  * cosine distance: ``1 - <g_c, g_r> / (||g_c|| ||g_r||)``

  and both must stay at or below a per-tensor threshold.

Thresholds are **calibrated** by the auditor from its own reproduction noise: it re-executes the
step under settings that differ the way honest peers legitimately differ (another thread count,
nondeterministic kernels, a float64 reference instead of float32), measures the same distances
between those reproductions, and multiplies the largest by ``safety_factor``. A ``floor`` keeps a
threshold from collapsing to zero where two settings happen to agree bit for bit. docs/auditing.md
gives the statistics behind the default factor.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from proofs.errors import VeritrainError

DEFAULT_SAFETY_FACTOR = 16.0
"""Multiplier over the largest observed honest reproduction distance (docs/auditing.md)."""

DEFAULT_REL_L2_FLOOR = 1e-5
"""Smallest relative-L2 threshold: ~100 float32 ulps (2^-23 ~ 1.2e-7), far below a useful cheat."""

DEFAULT_COSINE_FLOOR = 1e-9
"""Smallest cosine-distance threshold; cosine distance scales as (rel L2)^2 / 2 for noise."""


class ToleranceError(VeritrainError, ValueError):
    """Tensors that cannot be compared (missing, wrong shape, non-finite thresholds)."""


class Mode(enum.Enum):
    """How a recomputed gradient is compared with the committed one."""

    EXACT = "exact"
    TOLERANT = "tolerant"


@dataclass(frozen=True, kw_only=True, slots=True)
class Distance:
    """Distances between one committed and one recomputed tensor (float64 arithmetic)."""

    rel_l2: float
    cosine: float


@dataclass(frozen=True, kw_only=True, slots=True)
class Threshold:
    """The largest distances a tensor may show and still pass."""

    rel_l2: float
    cosine: float

    def __post_init__(self) -> None:
        for name, value in (("rel_l2", self.rel_l2), ("cosine", self.cosine)):
            if not (math.isfinite(value) and value >= 0.0):
                raise ToleranceError(f"threshold {name} must be finite and >= 0, got {value}")

    def admits(self, distance: Distance) -> bool:
        """True when both distances are finite and within bounds (NaN never passes)."""
        return (
            math.isfinite(distance.rel_l2)
            and math.isfinite(distance.cosine)
            and distance.rel_l2 <= self.rel_l2
            and distance.cosine <= self.cosine
        )


def distance(committed: torch.Tensor, recomputed: torch.Tensor) -> Distance:
    """Relative L2 and cosine distance of two same-shaped tensors, in float64.

    Zero tensors: two zeros are at distance 0; a zero against a non-zero is at distance inf
    (relative) and 1 (cosine). Non-finite input (or float64 values whose squares overflow)
    yields NaN distances, which never pass.
    Raises :class:`ToleranceError` on a shape mismatch.
    """
    if committed.shape != recomputed.shape:
        raise ToleranceError(
            f"shape mismatch: committed {tuple(committed.shape)} vs "
            f"recomputed {tuple(recomputed.shape)}"
        )
    c = committed.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    r = recomputed.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    norm_c = float(torch.linalg.vector_norm(c))
    norm_r = float(torch.linalg.vector_norm(r))
    # A NaN or inf element makes its norm non-finite (no separate pass over the elements): a
    # float32 or narrower tensor cannot overflow a float64 sum of squares otherwise.
    if not (math.isfinite(norm_c) and math.isfinite(norm_r)):
        return Distance(rel_l2=math.nan, cosine=math.nan)
    diff = float(torch.linalg.vector_norm(c - r))
    rel = (0.0 if diff == 0.0 else math.inf) if norm_r == 0.0 else diff / norm_r
    if norm_c == 0.0 or norm_r == 0.0:
        cos = 0.0 if norm_c == norm_r else 1.0
    else:
        cos = max(0.0, 1.0 - float(torch.dot(c, r)) / (norm_c * norm_r))
    return Distance(rel_l2=rel, cosine=cos)


def distances(
    committed: Mapping[str, torch.Tensor], recomputed: Mapping[str, torch.Tensor]
) -> dict[str, Distance]:
    """Per-tensor distances; the two mappings must name the same tensors."""
    if set(committed) != set(recomputed):
        missing = sorted(set(recomputed) - set(committed))
        extra = sorted(set(committed) - set(recomputed))
        raise ToleranceError(f"tensor names differ: missing {missing[:5]}, unexpected {extra[:5]}")
    return {name: distance(committed[name], recomputed[name]) for name in sorted(committed)}


@dataclass(frozen=True, kw_only=True, slots=True)
class Calibration:
    """Per-tensor thresholds and the reproduction noise they were derived from."""

    safety_factor: float
    rel_l2_floor: float
    cosine_floor: float
    observed: Mapping[str, Distance]
    thresholds: Mapping[str, Threshold]

    def threshold(self, name: str) -> Threshold:
        """The threshold for ``name``; raises :class:`ToleranceError` for an unknown tensor."""
        try:
            return self.thresholds[name]
        except KeyError as exc:
            raise ToleranceError(f"no calibrated threshold for tensor {name!r}") from exc

    def max_rel_l2(self) -> float:
        return max((t.rel_l2 for t in self.thresholds.values()), default=0.0)

    def max_observed_rel_l2(self) -> float:
        return max((d.rel_l2 for d in self.observed.values()), default=0.0)


def calibrate(
    reproductions: Iterable[Mapping[str, Distance]],
    *,
    safety_factor: float = DEFAULT_SAFETY_FACTOR,
    rel_l2_floor: float = DEFAULT_REL_L2_FLOOR,
    cosine_floor: float = DEFAULT_COSINE_FLOOR,
) -> Calibration:
    """Thresholds from honest reproduction noise.

    ``reproductions`` holds, for each pair of honest settings the auditor ran, the per-tensor
    distances between their gradients. Per tensor: the worst observed distance times
    ``safety_factor``, but never below the floors. For cosine, whose noise grows as the square of
    the relative error, the factor is squared so both distances get the same headroom.
    Raises :class:`ToleranceError` on a bad factor or floor or on non-finite observed noise
    (an honest reproduction that produced NaN says the step cannot be audited tolerantly).
    """
    if not (math.isfinite(safety_factor) and safety_factor >= 1.0):
        raise ToleranceError(f"safety factor must be finite and >= 1, got {safety_factor}")
    for name, floor in (("rel_l2_floor", rel_l2_floor), ("cosine_floor", cosine_floor)):
        if not (math.isfinite(floor) and floor >= 0.0):
            raise ToleranceError(f"{name} must be finite and >= 0, got {floor}")
    worst: dict[str, Distance] = {}
    for repro in reproductions:
        for name, d in repro.items():
            if not (math.isfinite(d.rel_l2) and math.isfinite(d.cosine)):
                raise ToleranceError(f"honest reproduction of {name!r} is not finite: {d}")
            prev = worst.get(name)
            if prev is None:
                worst[name] = d
            else:
                worst[name] = Distance(
                    rel_l2=max(prev.rel_l2, d.rel_l2), cosine=max(prev.cosine, d.cosine)
                )
    if not worst:
        raise ToleranceError("calibration needs at least one reproduction")
    thresholds = {
        name: Threshold(
            rel_l2=max(rel_l2_floor, d.rel_l2 * safety_factor),
            cosine=max(cosine_floor, d.cosine * safety_factor**2),
        )
        for name, d in sorted(worst.items())
    }
    return Calibration(
        safety_factor=safety_factor,
        rel_l2_floor=rel_l2_floor,
        cosine_floor=cosine_floor,
        observed=dict(sorted(worst.items())),
        thresholds=thresholds,
    )

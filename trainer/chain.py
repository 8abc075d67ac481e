"""The gradient-to-state chain compared within a calibrated tolerance, tensor by tensor.

A window's committed state checkpoint must follow from the window's start checkpoint and its
committed gradients applied through the recorded optimizer (trainer.replay). Where the replaying
process reproduces the run's recorded determinism key (trainer.determinism) the replayed state's
root must equal the committed one, bit for bit. Elsewhere (another CPU kernel capability, thread
count, device type, torch build) the optimizer's arithmetic rounds differently, so
:func:`compare_chain` compares per tensor instead:

- per-element floating-point state (``param/*`` and every ``optim/state/<i>/<key>`` shaped like
  parameter ``i``, Adam's moments for example) within a threshold measured relative to the size
  of the update: ``d = ||replayed - committed|| / ||replayed - start||`` (the auditor's own
  update as the yardstick: the peer cannot inflate it);
- everything else exactly: step counts, the param groups' hyper-parameters (``optim/meta``),
  buffers, the RNG state, the step number, names, shapes and dtypes.

The threshold is calibrated per window like the gradient thresholds (audit.tolerance): the
window is replayed a second time in float64 from the same start and gradients, the float32
replay's distance to that reference (relative to the same update) is the replaying process's
own rounding noise ``n``, and ``threshold = max(floor, factor x n)``. An honest peer's float32
state is another rounding of the same computation, ``d(peer, ours) <= d(peer, exact) +
d(ours, exact)``; the factor lets its rounding be 15x ours. docs/auditing.md gives the measured
false-positive and detection figures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from trainer.checkpoint import OPTIM_STATE, PARAM
from trainer.manifest import StepRecord
from trainer.recipe import RunHeader
from trainer.replay import replay_states

CHAIN_SAFETY_FACTOR = 16.0
"""Multiplier over the measured float64-reference noise (the gradient thresholds' factor)."""

CHAIN_FLOOR = 1e-5
"""Smallest threshold, relative to the update (~100 float32 ulps of a state as large as it)."""

State = Mapping[str, torch.Tensor]
Steps = Sequence[tuple[StepRecord, Mapping[str, torch.Tensor]]]


@dataclass(frozen=True, kw_only=True, slots=True)
class StateTensorCheck:
    """One state entry: its distance to the committed one and the bound applied.

    ``distance`` is relative to the update (``||replayed - committed|| / ||replayed - start||``);
    ``cosine`` the cosine distance between the committed and the replayed update; ``noise`` the
    float64-reference noise on the same scale; ``threshold`` None for an entry compared exactly
    (then ``distance`` is 0 when equal, inf when not)."""

    name: str
    distance: float
    cosine: float
    noise: float | None
    threshold: float | None
    passed: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class ChainComparison:
    """What :func:`compare_chain` found; ``reason`` says it in one line with the figures."""

    passed: bool
    reason: str
    checks: tuple[StateTensorCheck, ...]

    @property
    def exact_entries(self) -> int:
        return sum(1 for c in self.checks if c.threshold is None)


def per_element(header: RunHeader, state: State) -> set[str]:
    """Names compared within tolerance: floating ``param/*`` and optimizer state shaped like its
    parameter (not ``step``, which counts)."""
    order = [n for g in header.optimizer.groups for n in g]
    out = set()
    for name, t in state.items():
        if not t.is_floating_point():
            continue
        if name.startswith(PARAM):
            out.add(name)
        elif name.startswith(OPTIM_STATE):
            index, _, key = name[len(OPTIM_STATE) :].partition("/")
            if key == "step" or not index.isdigit() or int(index) >= len(order):
                continue
            param = state.get(PARAM + order[int(index)])
            if param is not None and param.shape == t.shape:
                out.add(name)
    return out


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64).reshape(-1)


def _relative(diff: torch.Tensor, update: float) -> float:
    norm = float(torch.linalg.vector_norm(diff))
    if not math.isfinite(norm) or not math.isfinite(update):
        return math.nan
    if update == 0.0:
        return 0.0 if norm == 0.0 else math.inf
    return norm / update


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    if not (math.isfinite(na) and math.isfinite(nb)):
        return math.nan
    if na == 0.0 or nb == 0.0:
        return 0.0 if na == nb else 1.0
    return max(0.0, 1.0 - float(torch.dot(a, b)) / (na * nb))


def _structure(replayed: State, committed: State) -> str | None:
    missing = sorted(set(replayed) - set(committed))[:3]
    extra = sorted(set(committed) - set(replayed))[:3]
    if missing or extra:
        return f"state entries differ: missing {missing}, unexpected {extra}"
    for name, r in replayed.items():
        c = committed[name]
        if r.shape != c.shape or r.dtype != c.dtype:
            return (
                f"{name}: committed {c.dtype}{tuple(c.shape)}, replayed {r.dtype}{tuple(r.shape)}"
            )
    return None


def float64_reference(
    header: RunHeader, start: State, steps: Steps, *, per: set[str], device: torch.device | str
) -> dict[str, torch.Tensor]:
    """The window replayed in float64 from ``start`` (its per-element state widened)."""
    wide = {k: (v.to(torch.float64) if k in per else v) for k, v in start.items()}
    states = replay_states(header, wide, steps, keep=(), device=device)
    return states[max(states)]


def compare_chain(
    *,
    header: RunHeader,
    start: State,
    steps: Steps,
    replayed: State,
    committed: State,
    device: torch.device | str = "cpu",
    safety_factor: float = CHAIN_SAFETY_FACTOR,
    floor: float = CHAIN_FLOOR,
) -> ChainComparison:
    """Compare the ``replayed`` end state of a window (``start`` plus ``steps`` through the
    recorded optimizer, in float32) with the ``committed`` one, within the calibrated tolerance
    (module docstring). Raises ValueError/KeyError/EncodingError where the float64 replay fails
    (the caller's replay of the same inputs succeeded, so only on inconsistent inputs)."""
    if not (math.isfinite(safety_factor) and safety_factor >= 1.0):
        raise ValueError(f"safety_factor must be finite and >= 1, got {safety_factor}")
    if not (math.isfinite(floor) and floor >= 0.0):
        raise ValueError(f"floor must be finite and >= 0, got {floor}")
    problem = _structure(replayed, committed)
    if problem is not None:
        return ChainComparison(passed=False, reason=problem, checks=())
    per = per_element(header, replayed)
    reference = float64_reference(header, start, steps, per=per, device=device)
    checks = []
    for name in sorted(replayed):
        r, c = replayed[name], committed[name]
        if name not in per:
            same = torch.equal(r, c)
            distance = 0.0 if same else math.inf
            checks.append(StateTensorCheck(name=name, distance=distance, cosine=0.0, noise=None,
                                           threshold=None, passed=same))  # fmt: skip
            continue
        r64, c64 = _f64(r), _f64(c)
        s = start.get(name)
        s64 = _f64(s) if s is not None and s.shape == r.shape else torch.zeros_like(r64)
        update = float(torch.linalg.vector_norm(r64 - s64))
        d = _relative(r64 - c64, update)
        noise = _relative(r64 - _f64(reference[name]), update)
        threshold = max(floor, safety_factor * noise) if math.isfinite(noise) else floor
        checks.append(
            StateTensorCheck(
                name=name,
                distance=d,
                cosine=_cosine(c64 - s64, r64 - s64),
                noise=noise,
                threshold=threshold,
                passed=math.isfinite(d) and d <= threshold,
            )
        )
    return ChainComparison(passed=all(c.passed for c in checks), reason=_reason(checks),
                           checks=tuple(checks))  # fmt: skip


def _reason(checks: Sequence[StateTensorCheck]) -> str:
    tolerant = [c for c in checks if c.threshold is not None]
    exact = len(checks) - len(tolerant)
    failing = [c for c in checks if not c.passed]
    if tolerant:
        w = max(tolerant, key=lambda c: c.distance / (c.threshold or 1.0))
        worst = (
            f"worst {w.name} at {w.distance:.2e} of the update (threshold {w.threshold:.2e}, "
            f"float64-reference noise {w.noise:.2e})"
        )
    else:
        worst = "no per-element state"
    if not failing:
        return f"{len(tolerant)} tensors within tolerance, {worst}; {exact} entries equal"
    names = ", ".join(c.name for c in failing[:3])
    return (
        f"{len(failing)} of {len(checks)} state entries differ beyond tolerance ({names}); {worst}"
    )

"""Replay: apply stored gradients through the recorded optimizer, from a state checkpoint.

This is the gradient-to-state chain. Starting from the state checkpoint at step c and the gradient
checkpoints and step records of steps c..c+k-1, :func:`apply_gradients` re-runs exactly what the
hook's ``step()`` did after each commitment (clip, set lr, ``optimizer.step()``, ``zero_grad``) and
returns the state checkpoint tensors at c+k, which must match the stored ones bit for bit on the
same device. No model code runs: parameters are rebuilt from the checkpoint, so this works for any
``nn.Module``. Only optimizers from ``torch.optim`` are resolved (never code named by the peer).

Nothing the peer records is taken on trust: each step's learning rate is the header's schedule's
(a recorded rate that differs is the record checks' business, and a state trained with another
rate does not follow from the replay), and every param group of the starting state must carry
the header's hyperparameters.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from proofs.errors import EncodingError
from trainer.checkpoint import (
    BUFFER,
    PARAM,
    RNG_CPU,
    STEP,
    ParamLayout,
    optimizer_state_dict,
    optimizer_tensors,
)
from trainer.manifest import StepRecord
from trainer.recipe import GROUP_KEYS_NOT_HYPERPARAMETERS, RunHeader, jsonable_hyperparameters
from trainer.seeds import cpu_rng_state, replay_seed


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim`` class called ``name``; EncodingError for anything else."""
    cls = getattr(torch.optim, name, None)
    if not isinstance(cls, type) or not issubclass(cls, torch.optim.Optimizer):
        raise EncodingError(f"optimizer {name!r} is not a torch.optim optimizer")
    return cls


def layout_of(header: RunHeader, state: Mapping[str, torch.Tensor]) -> ParamLayout:
    """The parameter layout recorded in ``header`` (names taken from the state's ``param/*``)."""
    names = tuple(k[len(PARAM) :] for k in state if k.startswith(PARAM))
    return ParamLayout(names=names, groups=header.optimizer.groups, aliases=header.aliases)


def build_optimizer(
    header: RunHeader, state: Mapping[str, torch.Tensor], *, device: torch.device | str = "cpu"
) -> tuple[dict[str, nn.Parameter], torch.optim.Optimizer]:
    """Parameters (by name) and the recorded optimizer, loaded from state checkpoint tensors."""
    layout = layout_of(header, state)
    params: dict[str, nn.Parameter] = {}
    for name in layout.names:
        params[name] = nn.Parameter(state[PARAM + name].clone().to(device))
    try:
        groups = [{"params": [params[n] for n in g]} for g in layout.groups]
    except KeyError as exc:
        raise EncodingError(f"optimizer group names a parameter not in the state: {exc}") from None
    # Typed loosely: concrete optimizers take (params, lr=...), the base class does not.
    cls: Any = optimizer_class(header.optimizer.name)
    optimizer: torch.optim.Optimizer = cls(groups, lr=header.schedule.lr)
    # The saved param groups carry every hyper-parameter; loading them overrides the defaults,
    # so they must be the ones the header records (a group with its own weight decay or betas
    # would train another recipe than the one signed).
    optimizer.load_state_dict(optimizer_state_dict(state, layout))
    for index, group in enumerate(optimizer.param_groups):
        held = jsonable_hyperparameters(group, drop=GROUP_KEYS_NOT_HYPERPARAMETERS)
        recorded = header.optimizer.group_hyperparameters(index)
        for key in sorted(set(held) | set(recorded)):
            if held.get(key) != recorded.get(key):
                raise EncodingError(
                    f"param group {index}: {key} {held.get(key)!r} in the state checkpoint, "
                    f"the header records {recorded.get(key)!r}"
                )
    return params, optimizer


def apply_gradients(
    header: RunHeader,
    state: Mapping[str, torch.Tensor],
    steps: Sequence[tuple[StepRecord, Mapping[str, torch.Tensor]]],
    *,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """The state checkpoint tensors after applying ``steps`` (record, gradients) to ``state``.

    ``steps`` must be consecutive, starting at the state's step. Buffers (``buffer/*``) are copied
    from ``state`` unchanged: forward passes, not gradients, drive them. Raises EncodingError on a
    gradient for an unknown parameter, a step out of sequence, or a wrong number of lrs.
    Neither ``state`` nor the gradients in ``steps`` are modified.
    """
    states = replay_states(header, state, steps, keep=(), device=device)
    return states[max(states)]


def replay_states(
    header: RunHeader,
    state: Mapping[str, torch.Tensor],
    steps: Sequence[tuple[StepRecord, Mapping[str, torch.Tensor]]],
    *,
    keep: Collection[int],
    device: torch.device | str = "cpu",
) -> dict[int, dict[str, torch.Tensor]]:
    """As :func:`apply_gradients`, in one pass, also returning the state reached before each step
    in ``keep`` runs: ``{step: state}`` for the steps of ``keep`` passed on the way, and always
    the final state. Costs one optimizer build however many states are kept (plus a copy each).
    """
    params, optimizer = build_optimizer(header, state, device=device)
    order = [params[n] for g in header.optimizer.groups for n in g]
    step = int(state[STEP].item())
    last = step + len(steps)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for record, grads in steps:
        if record.step != step:
            raise EncodingError(f"replay expected step {step}, got record for {record.step}")
        _apply_one(header, params, order, optimizer, record, grads)
        step += 1
        if step in keep and step != last:
            out[step] = _export(header, state, params, optimizer, step, copy=True)
    # The optimizer is dropped now: the final state may share its tensors.
    out[last] = _export(header, state, params, optimizer, last, copy=False)
    return out


def _apply_one(
    header: RunHeader,
    params: Mapping[str, nn.Parameter],
    order: Sequence[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    record: StepRecord,
    grads: Mapping[str, torch.Tensor],
) -> None:
    """What the hook's ``step()`` does after the commit: clip, set lrs, step, zero."""
    step = record.step
    unknown = sorted(set(grads) - set(params))
    if unknown:
        raise EncodingError(f"step {step}: gradients for unknown parameters {unknown[:3]}")
    for name, p in params.items():
        g = grads.get(name)
        # A copy: clipping scales .grad in place, and the caller's tensors must stay as
        # committed (an auditor replays the same verified gradients more than once).
        p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype, copy=True)
    if header.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(order, header.grad_clip)
    lrs = header.schedule.lrs_at(step, len(optimizer.param_groups))
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _export(
    header: RunHeader,
    state: Mapping[str, torch.Tensor],
    params: Mapping[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    step: int,
    *,
    copy: bool,
) -> dict[str, torch.Tensor]:
    """State checkpoint tensors at ``step``; ``copy=False`` shares the live tensors (CPU)."""
    out: dict[str, torch.Tensor] = {
        PARAM + n: p.detach().to("cpu", copy=copy) for n, p in params.items()
    }
    out.update({k: v for k, v in state.items() if k.startswith(BUFFER)})
    out.update(optimizer_tensors(optimizer.state_dict(), copy=copy))
    out[RNG_CPU] = cpu_rng_state(replay_seed(header.run_seed, step))
    out[STEP] = torch.tensor(step, dtype=torch.int64)
    return out

"""The global state theta of a shared run: a model's parameters as one flat float32 vector.

The flat order is ``named_parameters()`` order (a tied weight appears once), each parameter
flattened row-major. On disk theta is an ordinary checkpoint artifact (trainer.checkpoint) of
``{name: parameter}`` with the genesis's chunk size; its Merkle root is "the root of theta", which
round records and contributions name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from proofs.errors import EncodingError
from trainer.artifact import Encoded
from trainer.checkpoint import decode_checkpoint, encode_checkpoint
from trainer.models import build_model
from trainer.seeds import seed_generators
from trainer.sharedrun import Genesis


def param_names(model: nn.Module) -> tuple[str, ...]:
    """Parameter names in ``named_parameters()`` order (tied weights once): the flat order."""
    return tuple(name for name, _ in model.named_parameters())


def _params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    params = list(model.named_parameters())
    for name, p in params:
        if p.dtype != torch.float32:
            raise EncodingError(f"parameter {name} is {p.dtype}; the global state is float32")
    return params


def flatten(model: nn.Module) -> torch.Tensor:
    """Every parameter, concatenated: a new 1-D float32 CPU tensor. EncodingError when a
    parameter is not float32 (the state is never cast silently)."""
    parts = [p.detach().reshape(-1).to("cpu", copy=True) for _, p in _params(model)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float32)


def load_flat(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy ``flat`` (1-D float32, as :func:`flatten` returns) into the model's parameters.

    Raises EncodingError when its dtype, shape or length differ from the model's."""
    params = _params(model)
    total = sum(p.numel() for _, p in params)
    if flat.dtype != torch.float32 or flat.dim() != 1 or flat.numel() != total:
        raise EncodingError(
            f"flat state must be 1-D float32 of {total} values, got {flat.dtype} "
            f"{tuple(flat.shape)}"
        )
    offset = 0
    with torch.no_grad():
        for _, p in params:
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p))
            offset += n


def theta_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: parameter}`` as private float32 CPU copies: what the theta artifact holds."""
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in _params(model)}


def theta_artifact(model: nn.Module, chunk_size: int) -> Encoded:
    """The theta artifact of ``model``'s parameters; its ``root`` is the root of theta."""
    return encode_checkpoint(theta_tensors(model), chunk_size=chunk_size)


def theta_from_artifact(leaves: Sequence[bytes], model: nn.Module) -> torch.Tensor:
    """The flat theta held by artifact ``leaves`` (checked against their root by the caller).

    Raises EncodingError when the leaves do not decode, or name, shape or type the parameters
    differently from ``model``."""
    tensors = decode_checkpoint(leaves)
    params = _params(model)
    expected = {name for name, _ in params}
    if set(tensors) != expected:
        missing = sorted(expected - set(tensors))[:3]
        extra = sorted(set(tensors) - expected)[:3]
        raise EncodingError(
            f"theta artifact does not hold the model's parameters: missing {missing}, "
            f"unexpected {extra}"
        )
    parts = []
    for name, p in params:
        t = tensors[name]
        if t.dtype != torch.float32 or tuple(t.shape) != tuple(p.shape):
            raise EncodingError(
                f"theta artifact {name}: {t.dtype} {tuple(t.shape)}, the model has float32 "
                f"{tuple(p.shape)}"
            )
        parts.append(t.reshape(-1))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float32)


def initial_model(genesis: Genesis) -> nn.Module:
    """theta_0's model: the genesis's registry model built on the CPU in float32 right after
    ``seed_generators(genesis.init_seed)``. Raises KeyError for an unregistered model name."""
    seed_generators(genesis.init_seed)
    model = build_model(genesis.model, genesis.model_config)
    return model.to(device="cpu", dtype=torch.float32)

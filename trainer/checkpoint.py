"""Gradient and state checkpoints as named tensors, and their Merkle-committed encoding.

A **gradient checkpoint** maps each parameter name (``named_parameters``) that has a gradient to
that raw gradient. A **state checkpoint** (the state *before* step ``step`` runs) holds:

- ``param/<name>``: every parameter (tied aliases are stored once, see ``RunHeader.aliases``);
- ``buffer/<key>``: persistent buffers (not linked to gradients: forward passes may change them);
- ``optim/state/<i>/<key>``: tensor optimizer state of the i-th parameter in optimizer order;
- ``optim/meta``: uint8 tensor of canonical JSON {"param_groups": [...], "scalars": {...}} (the
  hyper-parameters of each group, without the parameter lists, and non-tensor state values);
- ``rng/cpu``: the CPU generator state at the start of ``step`` (derived from its replay seed);
- ``step``: int64 scalar.

Both are encoded with ``proofs.encoding.encode_tensors`` and committed by the Merkle root of those
leaves (trainer.artifact stores them under that root).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from proofs.codec import canonical_json
from proofs.encoding import TensorBytes, decode_tensors, encode_tensors
from proofs.errors import EncodingError
from proofs.hashing import Root
from proofs.jsonlimits import loads_untrusted
from trainer.artifact import Encoded, encode_artifact
from trainer.seeds import cpu_rng_state, replay_seed
from trainer.tensors import (
    dtype_name,
    from_tensor_bytes_list,
    to_tensor_bytes,
    to_tensor_bytes_list,
)

PARAM = "param/"
BUFFER = "buffer/"
OPTIM_STATE = "optim/state/"
OPTIM_META = "optim/meta"
_MAX_META_BYTES = 16 << 20
RNG_CPU = "rng/cpu"
STEP = "step"


@dataclass(frozen=True, kw_only=True, slots=True)
class ParamLayout:
    """How a model's parameters map to names, optimizer order and tied aliases."""

    names: tuple[str, ...]
    """Parameter names in ``named_parameters`` order."""
    groups: tuple[tuple[str, ...], ...]
    """Names per optimizer param group, in optimizer order."""
    aliases: Mapping[str, str]
    """State-dict keys that are the same Parameter as another name: key -> name."""

    @property
    def optimizer_order(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g)


def param_layout(model: nn.Module, optimizer: torch.optim.Optimizer) -> ParamLayout:
    """Name every optimizer parameter. Raises EncodingError if the optimizer holds a tensor that
    is not a parameter of ``model`` (the commitment could not name it)."""
    named = dict(model.named_parameters())
    by_id = {id(p): n for n, p in named.items()}
    groups = []
    for gi, group in enumerate(optimizer.param_groups):
        names = []
        for p in group["params"]:
            if id(p) not in by_id:
                raise EncodingError(f"optimizer group {gi} holds a tensor that is not in the model")
            names.append(by_id[id(p)])
        groups.append(tuple(names))
    aliases = {}
    for key, value in model.state_dict(keep_vars=True).items():
        name = by_id.get(id(value))
        if name is not None and name != key:
            aliases[key] = name
    return ParamLayout(names=tuple(named), groups=tuple(groups), aliases=aliases)


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A private CPU copy: a clone on CPU, the device-to-host copy itself on an accelerator."""
    t = t.detach()
    return t.clone() if t.device.type == "cpu" else t.to("cpu")


@dataclass(frozen=True, kw_only=True, slots=True)
class FlatGradients:
    """Every gradient of a step, copied into one flat CPU buffer (in ``named_parameters`` order).

    One ``torch.cat`` is one kernel (and one device-to-host transfer on an accelerator) instead of
    a copy per parameter, and the committer thread slices the buffer as bytes without calling into
    torch per tensor: every torch call drops and retakes the GIL, which stalls the training thread.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    flat: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        """``name -> gradient`` as views of the flat buffer."""
        out = {}
        offset = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            numel = math.prod(shape)
            out[name] = self.flat.narrow(0, offset, numel).view(shape)
            offset += numel
        return out

    def tensor_bytes(self) -> list[TensorBytes]:
        """Every gradient as TensorBytes: zero-copy slices of one byte view of the buffer."""
        dtype = dtype_name(self.flat.dtype)
        raw = to_tensor_bytes("flat", self.flat).data
        out = []
        offset = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            end = offset + math.prod(shape) * self.flat.element_size()
            out.append(TensorBytes(name=name, dtype=dtype, shape=shape, data=raw[offset:end]))
            offset = end
        return out


Gradients = FlatGradients | dict[str, torch.Tensor]
"""What :func:`capture_gradient_buffer` returns: one flat buffer, or per-tensor copies."""


def capture_gradient_buffer(model: nn.Module) -> Gradients:
    """Private CPU copies of every parameter gradient (the only cost the training thread pays).

    Copies, because clipping and the optimizer may change ``.grad`` in place after the commit.
    One flat buffer when every gradient shares a dtype and device, else a copy per tensor.
    """
    grads = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    if len(grads) < 2 or len({(g.dtype, g.device) for _, g in grads}) != 1:
        return {name: _host_copy(g) for name, g in grads}
    flat = torch.cat([g.detach().reshape(-1) for _, g in grads])  # a new tensor: the copy
    if flat.device.type != "cpu":
        flat = flat.to("cpu")
    return FlatGradients(
        names=tuple(n for n, _ in grads), shapes=tuple(tuple(g.shape) for _, g in grads), flat=flat
    )


def capture_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """``name -> private CPU copy`` of every parameter gradient."""
    grads = capture_gradient_buffer(model)
    return grads.tensors() if isinstance(grads, FlatGradients) else grads


def encode_gradients(grads: Gradients, *, chunk_size: int) -> Encoded:
    """The artifact of a gradient capture; identical to :func:`encode_checkpoint` of its tensors."""
    if isinstance(grads, dict):
        return encode_checkpoint(grads, chunk_size=chunk_size)
    return encode_artifact(encode_tensors(grads.tensor_bytes(), chunk_size=chunk_size))


def capture_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    layout: ParamLayout,
    *,
    run_seed: int,
    step: int,
) -> dict[str, torch.Tensor]:
    """Private copies of the state checkpoint tensors (see module docstring) before ``step``."""
    out: dict[str, torch.Tensor] = {}
    params = dict(model.named_parameters())
    for name in layout.names:
        out[PARAM + name] = _host_copy(params[name])
    for key, value in model.state_dict().items():
        if key not in params and key not in layout.aliases:
            out[BUFFER + key] = _host_copy(value)
    out.update(optimizer_tensors(optimizer.state_dict()))
    out[RNG_CPU] = cpu_rng_state(replay_seed(run_seed, step))
    out[STEP] = torch.tensor(step, dtype=torch.int64)
    return out


def optimizer_tensors(
    state_dict: Mapping[str, Any], *, copy: bool = True
) -> dict[str, torch.Tensor]:
    """``optim/*`` tensors of an optimizer ``state_dict()``, on the CPU: private copies, or with
    ``copy=False`` the optimizer's own CPU tensors (for an optimizer nobody steps again)."""
    out: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                out[f"{OPTIM_STATE}{index}/{key}"] = (
                    _host_copy(value) if copy else value.detach().cpu()
                )
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in state_dict["param_groups"]]
    meta = canonical_json({"param_groups": groups, "scalars": scalars})
    out[OPTIM_META] = torch.frombuffer(bytearray(meta), dtype=torch.uint8)
    return out


def optimizer_state_dict(state: Mapping[str, torch.Tensor], layout: ParamLayout) -> dict[str, Any]:
    """Rebuild an optimizer ``state_dict()`` from state checkpoint tensors."""
    try:
        # Peer-written bytes (committed, but by the peer): depth- and size-limited like any
        # other peer JSON; the meta is optimizer hyperparameters and scalars, kilobytes.
        meta = loads_untrusted(
            bytes(state[OPTIM_META].numpy().tobytes()), max_bytes=_MAX_META_BYTES, what=OPTIM_META
        )
    except (KeyError, ValueError) as exc:
        raise EncodingError(f"state checkpoint has no valid {OPTIM_META}: {exc}") from exc
    per_param: dict[int, dict[str, Any]] = {}
    for name, tensor in state.items():
        if name.startswith(OPTIM_STATE):
            index, key = name[len(OPTIM_STATE) :].split("/", 1)
            per_param.setdefault(int(index), {})[key] = tensor.clone()
    for index, values in meta["scalars"].items():
        per_param.setdefault(int(index), {}).update(values)
    groups = []
    offset = 0
    if len(meta["param_groups"]) != len(layout.groups):
        raise EncodingError("state checkpoint param groups do not match the run header")
    for saved, names in zip(meta["param_groups"], layout.groups, strict=True):
        groups.append({**saved, "params": list(range(offset, offset + len(names)))})
        offset += len(names)
    return {"state": per_param, "param_groups": groups}


def restore_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    layout: ParamLayout,
    state: Mapping[str, torch.Tensor],
) -> int:
    """Load a state checkpoint into ``model`` and ``optimizer``; returns its step."""
    sd: dict[str, torch.Tensor] = {}
    for key in model.state_dict():
        if key in layout.aliases:
            sd[key] = state[PARAM + layout.aliases[key]]
        elif PARAM + key in state:
            sd[key] = state[PARAM + key]
        else:
            sd[key] = state[BUFFER + key]
    model.load_state_dict(sd)
    optimizer.load_state_dict(optimizer_state_dict(state, layout))
    return int(state[STEP].item())


def encode_checkpoint(tensors: Mapping[str, torch.Tensor], *, chunk_size: int) -> Encoded:
    """The artifact (file bytes, Merkle root, leaf table) of named tensors."""
    leaves = encode_tensors(to_tensor_bytes_list(tensors), chunk_size=chunk_size)
    return encode_artifact(leaves)


def decode_checkpoint(leaves: Sequence[bytes]) -> dict[str, torch.Tensor]:
    """Named tensors back from artifact leaves. Raises EncodingError if not canonical."""
    return from_tensor_bytes_list(decode_tensors(leaves), adopt=True)


def checkpoint_root(tensors: Mapping[str, torch.Tensor], *, chunk_size: int) -> Root:
    """Merkle root of named tensors (without building the file)."""
    return encode_checkpoint(tensors, chunk_size=chunk_size).root

"""torch tensors <-> proofs.encoding.TensorBytes, without copying where torch allows it.

``TensorBytes.data`` must be contiguous little-endian C-order bytes. A contiguous CPU tensor is
viewed as bytes in place (``view(torch.uint8)``, which also covers bfloat16, a dtype numpy lacks);
a GPU or non-contiguous tensor is copied once. The reverse direction copies once into a writable
buffer, since torch tensors built on read-only memory are unsafe to use.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence

import torch

from proofs.encoding import TensorBytes, itemsize
from proofs.errors import EncodingError

_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("trainer.tensors assumes a little-endian host (canonical encoding is LE)")


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical dtype name (torch's, without ``torch.``); EncodingError if unsupported."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise EncodingError(f"unsupported tensor dtype {dtype}") from None


def torch_dtype(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; EncodingError if unknown."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise EncodingError(f"unsupported dtype name {name!r}") from None


def to_tensor_bytes(name: str, tensor: torch.Tensor) -> TensorBytes:
    """``tensor`` as TensorBytes named ``name``.

    Zero-copy for a contiguous CPU tensor: the returned view aliases the tensor's storage, so the
    caller must not modify the tensor while the view is in use (the hook hands in private copies).
    """
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return TensorBytes(
        name=name, dtype=dtype_name(t.dtype), shape=tuple(t.shape), data=raw.numpy().data
    )


def from_tensor_bytes(
    tb: TensorBytes, *, device: torch.device | str | None = None, adopt: bool = False
) -> torch.Tensor:
    """A new tensor (one copy) holding ``tb``'s values, on ``device`` (CPU by default).

    ``adopt``: use ``tb.data`` itself as the CPU tensor's storage when it is writable (no copy);
    only for buffers nobody else holds, such as those ``proofs.encoding.decode_tensors`` returns.
    """
    dtype = torch_dtype(tb.dtype)
    if tb.data.nbytes != itemsize(tb.dtype) * _numel(tb.shape):
        raise EncodingError(f"tensor {tb.name!r}: byte length does not match shape and dtype")
    if tb.data.nbytes == 0:
        out = torch.empty(tb.shape, dtype=dtype)
    else:
        own = adopt and not tb.data.readonly
        raw = torch.frombuffer(tb.data if own else bytearray(tb.data), dtype=torch.uint8)
        out = raw.view(dtype).reshape(tb.shape)
    return out if device is None else out.to(device)


def to_tensor_bytes_list(tensors: Mapping[str, torch.Tensor]) -> list[TensorBytes]:
    """Every ``name -> tensor`` as TensorBytes (order does not matter to the encoding)."""
    return [to_tensor_bytes(name, t) for name, t in tensors.items()]


def from_tensor_bytes_list(
    items: Iterable[TensorBytes], *, device: torch.device | str | None = None, adopt: bool = False
) -> dict[str, torch.Tensor]:
    """``name -> tensor`` for every TensorBytes (e.g. the output of ``decode_tensors``)."""
    return {tb.name: from_tensor_bytes(tb, device=device, adopt=adopt) for tb in items}


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

"""Chunked top-k compression of a peer's error-feedback vector, and its canonical payload bytes.

SparseLoCo (Sarfi et al. 2025, arXiv 2508.15706): the dense vector e (length ``size``) is cut into
C = ceil(size/chunk) chunks; chunk c (length len_c, the last one may be short) keeps its
k_c = min(topk, len_c) entries of largest |e|, ties broken by the lower index, so the selection is a
pure function of e's bits. Values are sent as float32 or int8 with one float32 step per chunk:
``step_c = fl32(max|v| / 127)`` (0 when every selected value is 0),
``q = clamp(round_half_even(fl32(v / step_c)), -127, 127)``, value ``fl32(q * step_c)``. Every
operation is a single correctly rounded IEEE division or multiply, so the result is the same on
every SIMD path and thread count.

Payload bytes (little-endian, columnar so that decoding is a few ``np.frombuffer`` views)::

    b"VTSD" | u8 version=1 | u8 quant (0=float32, 1=int8) | u16 0 | u64 size | u32 chunk | u32 topk
    offsets: u16[total]  within-chunk offsets, strictly ascending inside each chunk, < len_c
    steps:   f32[C]      int8 only; finite, >= 0
    values:  i8[total] (-127..127) or f32[total] (finite)

with total = sum_c k_c. ``decode_payload`` is strict: anything else raises ``PayloadError``.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from proofs.errors import VeritrainError

QUANTIZATIONS = ("int8", "float32")
VERSION = 1
MAGIC = b"VTSD"
MAX_CHUNK = 65536  # offsets are u16
_HEADER = struct.Struct("<4sBBHQII")
HEADER_BYTES = _HEADER.size  # 24
_QUANT_CODE = {"float32": 0, "int8": 1}
_INT8_MAX = 127

I64 = npt.NDArray[np.int64]


class CompressionError(VeritrainError, ValueError):
    """Compression was asked for with bad arguments (non-finite e, bad chunk/topk, wrong dtype)."""


class PayloadError(VeritrainError, ValueError):
    """A payload's bytes are not the canonical encoding the run expects.

    ``reason`` is a short code: "size" (byte length, truncated or extra), "count" (the length fits
    another number of entries), "header", "out-of-range", "unsorted", "repeated", "non-finite",
    "step" (negative step), "code" (int8 code -128).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _check_params(size: int, chunk: int, topk: int, quantization: str) -> None:
    if not 1 <= chunk <= MAX_CHUNK:
        raise CompressionError(f"chunk must be in 1..{MAX_CHUNK}, got {chunk}")
    if not 1 <= topk < 2**32:
        raise CompressionError(f"topk must be in 1..2**32-1, got {topk}")
    if not 1 <= size < 2**64:
        raise CompressionError(f"size must be in 1..2**64-1, got {size}")
    if quantization not in QUANTIZATIONS:
        raise CompressionError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")


def _layout(size: int, chunk: int, topk: int) -> tuple[int, int, int, int]:
    """(full chunks m, k per full chunk, length of the short last chunk (0: none), its k)."""
    full, tail = divmod(size, chunk)
    return full, min(topk, chunk), tail, min(topk, tail)


def chunk_counts(size: int, chunk: int, topk: int) -> list[int]:
    """k_c = min(topk, len_c) for each chunk c."""
    full, k, tail, k_tail = _layout(size, chunk, topk)
    return [k] * full + ([k_tail] if tail else [])


def total_entries(size: int, chunk: int, topk: int) -> int:
    full, k, _, k_tail = _layout(size, chunk, topk)
    return full * k + k_tail


def payload_size(size: int, chunk: int, topk: int, quantization: str) -> int:
    """Exact byte length of every valid payload with these parameters."""
    _check_params(size, chunk, topk, quantization)
    total = total_entries(size, chunk, topk)
    if quantization == "int8":
        return HEADER_BYTES + 2 * total + 4 * math.ceil(size / chunk) + total
    return HEADER_BYTES + 2 * total + 4 * total


def _entry_starts(size: int, chunk: int, topk: int) -> I64:
    """Index of the first entry of each chunk in the entry arrays."""
    full, k, tail, _ = _layout(size, chunk, topk)
    return np.arange(full + (1 if tail else 0), dtype=np.int64) * k


@dataclass(frozen=True, kw_only=True, slots=True)
class SparseDelta:
    """A compressed vector: ``offsets`` are ascending int64 *global* indices into the dense vector
    (the payload stores them per chunk as u16), ``values`` the float32 values that are applied."""

    size: int
    chunk: int
    topk: int
    quantization: str
    offsets: torch.Tensor
    values: torch.Tensor
    codes: torch.Tensor | None
    steps: torch.Tensor | None

    def __post_init__(self) -> None:
        # Shapes and dtypes only (cheap); the index rules are checked where the entries come from.
        _check_params(self.size, self.chunk, self.topk, self.quantization)
        total = total_entries(self.size, self.chunk, self.topk)
        if self.offsets.dtype != torch.int64 or self.offsets.shape != (total,):
            raise CompressionError(
                f"offsets must be int64 of shape ({total},), got {self.offsets.dtype} "
                f"{tuple(self.offsets.shape)}"
            )
        if self.values.dtype != torch.float32 or self.values.shape != (total,):
            raise CompressionError(
                f"values must be float32 of shape ({total},), got {self.values.dtype} "
                f"{tuple(self.values.shape)}"
            )
        int8 = self.quantization == "int8"
        if int8 != (self.codes is not None) or int8 != (self.steps is not None):
            raise CompressionError("codes and steps are set exactly when quantization is int8")
        if self.codes is not None and (
            self.codes.dtype != torch.int8 or self.codes.shape != (total,)
        ):
            raise CompressionError(f"codes must be int8 of shape ({total},)")
        chunks = math.ceil(self.size / self.chunk)
        if self.steps is not None and (
            self.steps.dtype != torch.float32 or self.steps.shape != (chunks,)
        ):
            raise CompressionError(f"steps must be float32 of shape ({chunks},)")

    @property
    def nnz(self) -> int:
        """Number of transmitted entries (zeros included: the count is fixed by the layout)."""
        return int(self.offsets.numel())

    @property
    def indices(self) -> torch.Tensor:
        return self.offsets

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.size, dtype=torch.float32)
        dense[self.offsets] = self.values
        return dense

    def add_into(self, acc: torch.Tensor) -> None:
        """acc += this delta, in place (indices are unique, so the order of adds is irrelevant)."""
        if acc.dtype != torch.float32 or acc.shape != (self.size,):
            raise CompressionError(
                f"accumulator must be float32 of shape ({self.size},), got {acc.dtype} "
                f"{tuple(acc.shape)}"
            )
        acc.index_add_(0, self.offsets, self.values)

    def norm(self) -> float:
        """L2 norm of the dequantized values, bit-identical on every machine.

        int8: sqrt(fsum_c(S_c * step_c**2)) with S_c the exact integer sum of q**2 in chunk c;
        float32: sqrt(fsum(v**2)) (a float32 squared is exact in float64). fsum sums exactly, so
        no summation order can change the result.
        """
        if self.codes is not None and self.steps is not None:
            q = self.codes.numpy().astype(np.int64)
            starts = _entry_starts(self.size, self.chunk, self.topk)
            sums = np.add.reduceat(q * q, starts)
            step = self.steps.numpy().astype(np.float64)
            return math.sqrt(math.fsum((sums.astype(np.float64) * (step * step)).tolist()))
        v = self.values.numpy().astype(np.float64)
        return math.sqrt(math.fsum((v * v).tolist()))


def _check_type(e: torch.Tensor, name: str = "e") -> None:
    if e.dtype != torch.float32 or e.dim() != 1 or e.device.type != "cpu":
        raise CompressionError(
            f"{name} must be a 1-D float32 CPU tensor, got {e.dtype} of shape {tuple(e.shape)} "
            f"on {e.device}"
        )


def _check_finite(e: torch.Tensor, mag: torch.Tensor, name: str = "e") -> None:
    """One max reduction of |e| (max propagates NaN); the slow search only on failure."""
    if e.numel() and not math.isfinite(float(mag.max())):
        bad = torch.nonzero(~torch.isfinite(e)).squeeze(1)
        raise CompressionError(
            f"{name} must be finite; {name}[{int(bad[0])}] = {float(e[bad[0]])} "
            f"({bad.numel()} non-finite entries)"
        )


def _select_rows(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Positions in ``mag.view(-1)`` (ascending) of the k largest entries of each row of ``mag``
    (>= 0), ties -> lower column. Only the *values* of torch.topk are used (the multiset of the
    k largest is unique); the order in which it returns tied indices is not."""
    kth = torch.topk(mag, k, dim=1, largest=True, sorted=False).values.amin(dim=1, keepdim=True)
    keep = mag >= kth
    pos = torch.nonzero(keep.view(-1)).squeeze(1)
    if pos.numel() == mag.shape[0] * k:  # every row has exactly k entries >= its k-th value
        return pos
    # Some rows hold more entries equal to their k-th value than they may take: in those rows
    # keep every entry above it, then the lowest-column equal ones (a running count).
    rows = torch.nonzero(keep.sum(dim=1) > k).squeeze(1)
    sub, sub_kth = mag[rows], kth[rows]
    above = sub > sub_kth
    equal = sub == sub_kth
    need = k - above.sum(dim=1, keepdim=True)
    keep[rows] = above | (equal & (equal.cumsum(dim=1, dtype=torch.int32) <= need))
    return torch.nonzero(keep.view(-1)).squeeze(1)


def topk_per_chunk(e: torch.Tensor, chunk: int, topk: int) -> torch.Tensor:
    """Ascending int64 global indices of the k_c largest |e| of every chunk (ties -> lower index).

    Raises CompressionError if e is not a finite 1-D float32 CPU tensor or chunk/topk are invalid.
    """
    _check_type(e)
    size = e.numel()
    _check_params(size, chunk, topk, "float32")
    mag = e.abs()
    _check_finite(e, mag)
    full, k, tail, k_tail = _layout(size, chunk, topk)
    parts = []
    if full:
        parts.append(_select_rows(mag[: full * chunk].view(full, chunk), k))
    if tail:
        parts.append(_select_rows(mag[full * chunk :].view(1, tail), k_tail) + full * chunk)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _check_indices(idx: I64, size: int, chunk: int, topk: int) -> None:
    total = total_entries(size, chunk, topk)
    if idx.shape != (total,):
        raise CompressionError(f"expected {total} indices, got {idx.shape[0]}")
    if total and (idx[0] < 0 or idx[-1] >= size or bool((np.diff(idx) <= 0).any())):
        raise CompressionError(f"indices must be strictly ascending in 0..{size - 1}")
    counts = np.bincount(idx // chunk, minlength=math.ceil(size / chunk))
    if not np.array_equal(counts, np.asarray(chunk_counts(size, chunk, topk))):
        raise CompressionError("indices must hold exactly min(topk, len_c) entries of each chunk")


def quantize(
    e: torch.Tensor,
    indices: torch.Tensor,
    *,
    chunk: int,
    quantization: str,
    topk: int | None = None,
) -> SparseDelta:
    """The SparseDelta carrying e[indices], quantized as the module docstring says.

    ``topk`` defaults to the largest per-chunk count of ``indices``; pass the run's value when
    topk may exceed chunk. Raises CompressionError for bad e or indices.
    """
    _check_type(e)
    size = e.numel()
    if indices.dtype != torch.int64 or indices.dim() != 1:
        raise CompressionError(f"indices must be 1-D int64, got {indices.dtype}")
    idx = indices.numpy()
    _check_params(size, chunk, topk or 1, quantization)
    if topk is None:
        topk = int(np.bincount(idx // chunk).max()) if idx.size else 1
        _check_params(size, chunk, topk, quantization)
    _check_indices(idx, size, chunk, topk)
    v = e[indices].numpy()
    _check_finite(torch.from_numpy(v), torch.from_numpy(np.abs(v)), "e[indices]")
    if quantization == "float32":
        return SparseDelta(
            size=size, chunk=chunk, topk=topk, quantization=quantization,
            offsets=indices.clone(), values=torch.from_numpy(v.copy()), codes=None, steps=None,
        )  # fmt: skip
    starts = _entry_starts(size, chunk, topk)
    vmax = np.maximum.reduceat(np.abs(v), starts)
    # fl32(max / 127): a float64 quotient of two float32s rounded once more to float32 equals the
    # correctly rounded float32 quotient (float64 carries > 2*24+2 bits), on any hardware.
    steps = (vmax.astype(np.float64) / _INT8_MAX).astype(np.float32)
    counts = np.diff(np.append(starts, idx.size))
    step_e = np.repeat(steps, counts)
    safe = np.where(step_e > 0, step_e, np.float32(1))
    quotient = np.where(step_e > 0, v / safe, np.float32(0))  # float32 / float32: one rounding
    codes = np.clip(np.rint(quotient), -_INT8_MAX, _INT8_MAX).astype(np.int8)  # rint: half-even
    values = codes.astype(np.float32) * step_e
    return SparseDelta(
        size=size, chunk=chunk, topk=topk, quantization=quantization,
        offsets=indices.clone(), values=torch.from_numpy(values),
        codes=torch.from_numpy(codes), steps=torch.from_numpy(steps),
    )  # fmt: skip


def compress(e: torch.Tensor, *, chunk: int, topk: int, quantization: str) -> SparseDelta:
    """Q(TopK_per_chunk(e)). Raises CompressionError on non-finite e or bad parameters."""
    if quantization not in QUANTIZATIONS:
        raise CompressionError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    return quantize(
        e, topk_per_chunk(e, chunk, topk), chunk=chunk, quantization=quantization, topk=topk
    )


def error_feedback_step(
    e: torch.Tensor,
    delta: torch.Tensor,
    *,
    beta: float,
    chunk: int,
    topk: int,
    quantization: str,
) -> tuple[SparseDelta, torch.Tensor]:
    """e' = beta*e + delta; d = compress(e'); returns (d, e' - d).

    beta is rounded to float32 once; beta*e and + delta are two separate float32 ops (no fused
    multiply-add on any path); e' - d changes only the selected entries, and is exact there
    (Sterbenz: each value is within a factor 2 of the entry it quantizes, or 0), so
    e_new + d == e' bit for bit. e and delta are not modified. Raises CompressionError when
    e, delta or e' is not finite.
    """
    _check_type(e, "e")
    _check_type(delta, "delta")
    if e.shape != delta.shape:
        raise CompressionError(f"e has shape {tuple(e.shape)} but delta {tuple(delta.shape)}")
    if not math.isfinite(beta):
        raise CompressionError(f"beta must be finite, got {beta}")
    scaled = e * beta
    e_prime = scaled + delta
    if e_prime.numel() and not math.isfinite(float(e_prime.abs().max())):
        for name, x in (("e", e), ("delta", delta)):
            _check_finite(x, x.abs(), name)
        raise CompressionError("beta*e + delta overflowed float32 (non-finite entries)")
    d = compress(e_prime, chunk=chunk, topk=topk, quantization=quantization)
    e_new = e_prime.clone()
    e_new[d.offsets] = e_prime[d.offsets] - d.values
    return d, e_new


def encode_payload(d: SparseDelta) -> bytes:
    """The canonical payload bytes of d (see the module docstring)."""
    idx = d.offsets.numpy()
    _check_indices(idx, d.size, d.chunk, d.topk)
    header = _HEADER.pack(MAGIC, VERSION, _QUANT_CODE[d.quantization], 0, d.size, d.chunk, d.topk)
    parts = [header, (idx % d.chunk).astype("<u2").tobytes()]
    if d.codes is not None and d.steps is not None:
        parts += [d.steps.numpy().astype("<f4").tobytes(), d.codes.numpy().tobytes()]
    else:
        parts.append(d.values.numpy().astype("<f4").tobytes())
    return b"".join(parts)


def _fail_header(field: str, expected: object, seen: object) -> PayloadError:
    return PayloadError("header", f"payload header {field}: expected {expected!r}, got {seen!r}")


def _check_header(data: bytes, size: int, chunk: int, topk: int, quantization: str) -> None:
    if len(data) < HEADER_BYTES:
        raise PayloadError(
            "size", f"payload has {len(data)} bytes, shorter than its {HEADER_BYTES}-byte header"
        )
    magic, version, quant, reserved, p_size, p_chunk, p_topk = _HEADER.unpack_from(data)
    for field, expected, seen in (
        ("magic", MAGIC, magic),
        ("version", VERSION, version),
        ("quantization", _QUANT_CODE[quantization], quant),
        ("reserved", 0, reserved),
        ("size", size, p_size),
        ("chunk", chunk, p_chunk),
        ("topk", topk, p_topk),
    ):
        if seen != expected:
            raise _fail_header(field, expected, seen)


def _check_length(data: bytes, size: int, chunk: int, topk: int, quantization: str) -> None:
    expected = payload_size(size, chunk, topk, quantization)
    if len(data) == expected:
        return
    total = total_entries(size, chunk, topk)
    per_entry = 3 if quantization == "int8" else 6
    body = len(data) - (expected - per_entry * total)
    if body >= 0 and body % per_entry == 0:
        raise PayloadError(
            "count",
            f"payload holds {body // per_entry} entries, expected {total} "
            f"(min(topk={topk}, len_c) per chunk): {len(data)} bytes instead of {expected}",
        )
    raise PayloadError("size", f"payload has {len(data)} bytes, expected exactly {expected}")


def _check_offsets(off: npt.NDArray[np.uint16], size: int, chunk: int, topk: int) -> None:
    full, k, tail, _ = _layout(size, chunk, topk)
    if full and int(off[: full * k].max()) >= chunk:
        at = int(np.argmax(off[: full * k] >= chunk))
        raise PayloadError(
            "out-of-range",
            f"offset {int(off[at])} of entry {at} (chunk {at // k}) is not below chunk {chunk}",
        )
    if tail and int(off[full * k :].max()) >= tail:
        at = full * k + int(np.argmax(off[full * k :] >= tail))
        raise PayloadError(
            "out-of-range",
            f"offset {int(off[at])} of entry {at} is not below {tail}, the length of the short "
            f"last chunk {full}",
        )
    step = np.diff(off.astype(np.int32))
    # A new chunk may restart at any offset: its first entry is not compared with the previous.
    step[_entry_starts(size, chunk, topk)[1:] - 1] = 1
    bad = step <= 0
    if bool(bad.any()):
        at = int(np.argmax(bad))
        reason = "repeated" if step[at] == 0 else "unsorted"
        raise PayloadError(
            reason,
            f"offsets must be strictly ascending within a chunk: entry {at + 1} has offset "
            f"{int(off[at + 1])} after {int(off[at])} ({reason})",
        )


def _global_indices(off: npt.NDArray[np.uint16], size: int, chunk: int, topk: int) -> I64:
    full, k, tail, _ = _layout(size, chunk, topk)
    idx = off.astype(np.int64)
    if full:
        idx[: full * k].reshape(full, k)[:] += (np.arange(full, dtype=np.int64) * chunk)[:, None]
    if tail:
        idx[full * k :] += full * chunk
    return idx


def decode_payload(
    data: bytes, *, size: int, chunk: int, topk: int, quantization: str
) -> SparseDelta:
    """Parse payload bytes strictly against the run's (size, chunk, topk, quantization).

    Raises PayloadError (``reason``, and a message saying what was expected and what was seen)
    for any byte string that ``encode_payload`` would not produce for these parameters, and
    CompressionError if the parameters themselves are invalid.
    """
    _check_params(size, chunk, topk, quantization)
    data = bytes(data)
    _check_header(data, size, chunk, topk, quantization)
    _check_length(data, size, chunk, topk, quantization)
    total = total_entries(size, chunk, topk)
    off = np.frombuffer(data, dtype="<u2", count=total, offset=HEADER_BYTES)
    _check_offsets(off, size, chunk, topk)
    pos = HEADER_BYTES + 2 * total
    codes_t: torch.Tensor | None = None
    steps_t: torch.Tensor | None = None
    if quantization == "int8":
        chunks = math.ceil(size / chunk)
        steps = np.frombuffer(data, dtype="<f4", count=chunks, offset=pos).astype(np.float32)
        codes = np.frombuffer(data, dtype=np.int8, count=total, offset=pos + 4 * chunks).copy()
        if not bool(np.isfinite(steps).all()):
            at = int(np.argmax(~np.isfinite(steps)))
            raise PayloadError("non-finite", f"step of chunk {at} is {steps[at]}, not finite")
        if bool((steps < 0).any()):
            at = int(np.argmax(steps < 0))
            raise PayloadError("step", f"step of chunk {at} is {steps[at]}, expected >= 0")
        if bool((codes == -128).any()):
            at = int(np.argmax(codes == -128))
            raise PayloadError("code", f"int8 code of entry {at} is -128, expected -127..127")
        counts = np.asarray(chunk_counts(size, chunk, topk))
        values = codes.astype(np.float32) * np.repeat(steps, counts)
        codes_t, steps_t = torch.from_numpy(codes), torch.from_numpy(steps)
    else:
        values = np.frombuffer(data, dtype="<f4", count=total, offset=pos).astype(np.float32)
        if not bool(np.isfinite(values).all()):
            at = int(np.argmax(~np.isfinite(values)))
            raise PayloadError("non-finite", f"value of entry {at} is {values[at]}, not finite")
    return SparseDelta(
        size=size, chunk=chunk, topk=topk, quantization=quantization,
        offsets=torch.from_numpy(_global_indices(off, size, chunk, topk)),
        values=torch.from_numpy(values), codes=codes_t, steps=steps_t,
    )  # fmt: skip

"""Issue 15: chunked top-k compression and the canonical sparse payload (trainer/compression.py).

Every expected value here comes from an oracle written separately from the module: a pure-Python
top-k (sort by (-|e|, index)), a per-chunk numpy float32 quantizer, ``struct.pack`` for the bytes
and ``math.fsum`` for the norm. Run ``python tests/test_shared_compression.py --write`` to
regenerate tests/vectors/shared/payload.json (then review the diff: those bytes are pinned).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.compression import (
    HEADER_BYTES,
    QUANTIZATIONS,
    CompressionError,
    PayloadError,
    SparseDelta,
    chunk_counts,
    compress,
    decode_payload,
    encode_payload,
    error_feedback_step,
    payload_size,
    quantize,
    topk_per_chunk,
    total_entries,
)

ROOT = Path(__file__).resolve().parent.parent
VECTOR = ROOT / "tests" / "vectors" / "shared" / "payload.json"
F32 = np.float32


# ---------------------------------------------------------------- independent oracle


def oracle_topk(e: list[float], chunk: int, topk: int) -> list[int]:
    """Largest |e| per chunk, ties -> lower index, by an explicit sort (slow, obviously right)."""
    out: list[int] = []
    for start in range(0, len(e), chunk):
        idx = range(start, min(start + chunk, len(e)))
        best = sorted(idx, key=lambda i: (-abs(e[i]), i))[: min(topk, len(idx))]
        out += sorted(best)
    return out


def oracle_quantize(
    e: list[float], indices: list[int], chunk: int, quantization: str
) -> tuple[list[float], list[int], list[float]]:
    """(values, codes, steps): float32 scalar arithmetic, one chunk at a time."""
    if quantization == "float32":
        return [float(F32(e[i])) for i in indices], [], []
    values: list[float] = []
    codes: list[int] = []
    steps: list[float] = []
    for c in sorted({i // chunk for i in indices}):
        v = [F32(e[i]) for i in indices if i // chunk == c]
        step = F32(max(abs(x) for x in v)) / F32(127)  # float32 division, correctly rounded
        steps.append(float(step))
        for x in v:
            q = 0 if step == 0 else min(127, max(-127, round(float(x / step))))  # half-even
            codes.append(q)
            values.append(float(F32(q) * step))
    return values, codes, steps


def oracle_payload(
    size: int, chunk: int, topk: int, quantization: str, indices: list[int],
    values: list[float], codes: list[int], steps: list[float],
) -> bytes:  # fmt: skip
    quant = {"float32": 0, "int8": 1}[quantization]
    out = struct.pack("<4sBBHQII", b"VTSD", 1, quant, 0, size, chunk, topk)
    out += struct.pack(f"<{len(indices)}H", *(i % chunk for i in indices))
    if quantization == "int8":
        out += struct.pack(f"<{len(steps)}f", *steps) + struct.pack(f"<{len(codes)}b", *codes)
    else:
        out += struct.pack(f"<{len(values)}f", *values)
    return out


def tie_heavy(rng: np.random.Generator, n: int) -> torch.Tensor:
    """Few distinct magnitudes, both signs, +0.0 and -0.0: nearly every chunk has ties."""
    pool = np.array([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0, 3.0, -3.0], dtype=np.float32)
    return torch.from_numpy(pool[rng.integers(0, len(pool), n)])


# ---------------------------------------------------------------- selection


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 70),
    chunk=st.integers(1, 17),
    topk=st.integers(1, 20),
    seed=st.integers(0, 2**32 - 1),
    ties=st.booleans(),
)
def test_topk_matches_oracle(n: int, chunk: int, topk: int, seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    e = tie_heavy(rng, n) if ties else torch.from_numpy(rng.standard_normal(n).astype(F32))
    got = topk_per_chunk(e, chunk, topk)
    assert got.dtype == torch.int64
    assert got.tolist() == oracle_topk(e.tolist(), chunk, topk)
    assert len(got) == total_entries(n, chunk, topk) == sum(chunk_counts(n, chunk, topk))


def test_topk_ties_take_lower_index_in_big_chunks() -> None:
    # All-equal chunks: torch.topk may return any k of them; we must take the first k.
    e = torch.ones(3 * 4096 + 100)
    e[5000] = 2.0
    got = topk_per_chunk(e, 4096, 64).tolist()
    want = oracle_topk(e.tolist(), 4096, 64)
    assert got == want
    assert got[:64] == list(range(64)) and 5000 in got and got[-64:] == list(range(12288, 12352))


def test_short_last_chunk_and_size_below_chunk() -> None:
    assert chunk_counts(10, 4, 3) == [3, 3, 2] and chunk_counts(3, 4096, 64) == [3]
    e = torch.tensor([0.0, -5.0, 1.0], dtype=torch.float32)
    assert topk_per_chunk(e, 4096, 64).tolist() == [0, 1, 2]
    d = compress(e, chunk=4096, topk=64, quantization="int8")
    assert d.nnz == 3 and d.steps is not None and d.steps.tolist() == [float(F32(5.0) / F32(127))]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_e_is_refused(bad: float) -> None:
    e = torch.zeros(10)
    e[7] = bad
    with pytest.raises(CompressionError, match=r"e\[7\]"):
        compress(e, chunk=4, topk=2, quantization="int8")
    with pytest.raises(CompressionError, match="finite"):
        error_feedback_step(torch.zeros(10), e, beta=0.9, chunk=4, topk=2, quantization="int8")


def test_bad_arguments_are_refused() -> None:
    e = torch.ones(10)
    for kwargs in ({"chunk": 0}, {"chunk": 65537}, {"topk": 0}, {"quantization": "int4"}):
        args: dict[str, Any] = {"chunk": 4, "topk": 2, "quantization": "int8", **kwargs}
        with pytest.raises(CompressionError):
            compress(e, **args)
    with pytest.raises(CompressionError, match="float32"):
        compress(e.double(), chunk=4, topk=2, quantization="int8")
    with pytest.raises(CompressionError, match="overflow"):
        error_feedback_step(
            torch.full((4,), 3e38), torch.full((4,), 3e38), beta=1.0, chunk=4, topk=1,
            quantization="int8",
        )  # fmt: skip


# ---------------------------------------------------------------- quantization and bytes


def test_quantize_and_encode_refuse_bad_indices() -> None:
    e = torch.arange(10, dtype=torch.float32)
    good = torch.tensor([1, 2, 5, 6, 8, 9])  # chunk 4, topk 2: chunks of 4, 4, 2
    assert quantize(e, good, chunk=4, quantization="int8").topk == 2
    for bad, words in (
        (torch.tensor([2, 1, 5, 6, 8, 9]), "ascending"),
        (torch.tensor([1, 1, 5, 6, 8, 9]), "ascending"),
        (torch.tensor([1, 2, 3, 6, 8, 9]), "each chunk"),
        (torch.tensor([1, 2, 5, 6, 9]), "expected 6 indices"),
        (torch.tensor([1, 2, 5, 6, 8, 10]), "ascending in 0..9"),
    ):
        with pytest.raises(CompressionError, match=words):
            quantize(e, bad, chunk=4, quantization="int8", topk=2)
    d = quantize(e, good, chunk=4, quantization="float32", topk=2)
    forged = SparseDelta(
        size=10, chunk=4, topk=2, quantization="float32",
        offsets=torch.tensor([1, 2, 3, 6, 8, 9]), values=d.values, codes=None, steps=None,
    )  # fmt: skip
    with pytest.raises(CompressionError, match="each chunk"):
        encode_payload(forged)


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 60),
    chunk=st.integers(1, 16),
    topk=st.integers(1, 9),
    seed=st.integers(0, 2**32 - 1),
    quantization=st.sampled_from(QUANTIZATIONS),
    ties=st.booleans(),
)
def test_compress_and_encode_match_oracle(
    n: int, chunk: int, topk: int, seed: int, quantization: str, ties: bool
) -> None:
    rng = np.random.default_rng(seed)
    scaled = rng.standard_normal(n) * 10.0 ** int(rng.integers(-30, 30))
    e = tie_heavy(rng, n) if ties else torch.from_numpy(scaled.astype(F32))
    d = compress(e, chunk=chunk, topk=topk, quantization=quantization)
    indices = oracle_topk(e.tolist(), chunk, topk)
    values, codes, steps = oracle_quantize(e.tolist(), indices, chunk, quantization)
    assert d.offsets.tolist() == indices
    assert d.values.tolist() == values
    if quantization == "int8":
        assert d.codes is not None and d.steps is not None
        assert d.codes.tolist() == codes and d.steps.tolist() == steps
    payload = encode_payload(d)
    assert payload == oracle_payload(n, chunk, topk, quantization, indices, values, codes, steps)
    assert len(payload) == payload_size(n, chunk, topk, quantization)
    back = decode_payload(payload, size=n, chunk=chunk, topk=topk, quantization=quantization)
    assert torch.equal(back.offsets, d.offsets) and torch.equal(back.values, d.values)
    assert torch.equal(back.to_dense(), d.to_dense())
    assert encode_payload(back) == payload


def test_int8_quotient_is_rounded_to_float32_before_half_even() -> None:
    # v / step is exactly 64.5 - 2**-25 or so: float32 division gives 64.5 (-> 64, half-even),
    # a float64 quotient would give 65. The spec rounds every intermediate to float32.
    e = torch.tensor([1.6369616985321045, 0.8313703536987305], dtype=torch.float32)
    d = compress(e, chunk=2, topk=2, quantization="int8")
    assert d.codes is not None and d.codes.tolist() == [127, 64]
    assert oracle_quantize(e.tolist(), [0, 1], 2, "int8")[1] == [127, 64]


def test_int8_rounds_half_to_even() -> None:
    e = torch.tensor([127.0, 2.5, -2.5, 3.5, 0.5, -0.5, 126.5, -127.0], dtype=torch.float32)
    d = compress(e, chunk=8, topk=8, quantization="int8")  # step = 127 / 127 = 1 exactly
    assert d.steps is not None and d.steps.tolist() == [1.0]
    assert d.codes is not None and d.codes.tolist() == [127, 2, -2, 4, 0, 0, 126, -127]


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_norm_sums_exactly(quantization: str) -> None:
    # 2**60 + 1000 * 1.0: a running float64 sum drops every 1.0 (ulp(2**60) = 256), fsum does not.
    e = torch.ones(1001)
    e[0] = 2.0**30
    d = compress(e, chunk=1, topk=1, quantization=quantization)
    if d.steps is None:
        terms = [v * v for v in d.values.tolist()]
    else:
        terms = [127 * 127 * (st * st) for st in d.steps.tolist()]  # every code is 127
    naive = 0.0
    for term in terms:
        naive += term
    assert d.norm() == math.sqrt(math.fsum(terms)) != math.sqrt(naive)


def test_add_into_and_to_dense() -> None:
    e = torch.from_numpy(np.random.default_rng(1).standard_normal(1000).astype(F32))
    d = compress(e, chunk=64, topk=5, quantization="int8")
    acc = torch.ones(1000)
    d.add_into(acc)
    assert torch.equal(acc, torch.ones(1000) + d.to_dense())
    dense = d.to_dense()
    assert torch.nonzero(dense).squeeze(1).tolist() == [
        i for i in d.offsets.tolist() if dense[i] != 0
    ]
    with pytest.raises(CompressionError, match="accumulator"):
        d.add_into(torch.ones(999))


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_norm_is_bit_identical_to_fsum_reference(quantization: str) -> None:
    rng = np.random.default_rng(7)
    e = torch.from_numpy((rng.standard_normal(5000) * 1e3).astype(F32))
    d = compress(e, chunk=128, topk=9, quantization=quantization)
    if quantization == "int8":
        assert d.codes is not None and d.steps is not None
        codes, steps = d.codes.tolist(), d.steps.tolist()
        per_chunk = [sum(q * q for q in codes[c * 9 : c * 9 + 9]) for c in range(len(steps))]
        want = math.sqrt(math.fsum(s * (st * st) for s, st in zip(per_chunk, steps, strict=True)))
    else:
        want = math.sqrt(math.fsum(v * v for v in d.values.tolist()))
    assert d.norm() == want
    assert d.norm() == pytest.approx(float(torch.linalg.norm(d.values.double())), rel=1e-6)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_error_feedback_step_is_exact(quantization: str) -> None:
    rng = np.random.default_rng(3)
    e_np = rng.standard_normal(3000).astype(F32)
    delta_np = (rng.standard_normal(3000) * 0.01).astype(F32)
    beta = 0.95
    e, delta = torch.from_numpy(e_np.copy()), torch.from_numpy(delta_np.copy())
    d, e_new = error_feedback_step(
        e, delta, beta=beta, chunk=256, topk=7, quantization=quantization
    )
    assert torch.equal(e, torch.from_numpy(e_np)), "e must not be modified"
    expected = torch.from_numpy(e_np * F32(beta) + delta_np)  # numpy float32, two roundings
    dense = d.to_dense()
    assert torch.equal(e_new + dense, expected)
    selected = torch.zeros(3000, dtype=torch.bool)
    selected[d.offsets] = True
    assert not bool(dense[~selected].any())
    assert torch.equal(e_new[~selected], expected[~selected])
    assert d.offsets.tolist() == oracle_topk(expected.tolist(), 256, 7)


def test_payload_size_formula_and_three_percent() -> None:
    n, chunk, topk = 1_000_003, 4096, 64
    chunks = math.ceil(n / chunk)
    total = (chunks - 1) * 64 + min(64, n % chunk)
    assert payload_size(n, chunk, topk, "int8") == 24 + 2 * total + 4 * chunks + total
    assert payload_size(n, chunk, topk, "float32") == 24 + 6 * total
    e = torch.from_numpy(np.random.default_rng(0).standard_normal(n).astype(F32))
    payload = encode_payload(compress(e, chunk=chunk, topk=topk, quantization="int8"))
    assert len(payload) == payload_size(n, chunk, topk, "int8")
    for size in (n, 100_000_000, 7_000_000_000):
        assert payload_size(size, chunk, topk, "int8") <= 0.03 * 4 * size


# ---------------------------------------------------------------- hostile payloads

# size 10, chunk 4, topk 3: chunks of 4, 4, 2 entries -> k = 3, 3, 2 (the last chunk is short).
SIZE, CHUNK, TOPK = 10, 4, 3
OFFSETS = HEADER_BYTES  # offsets start right after the header; 8 entries of u16
STEPS = OFFSETS + 16  # int8: 3 f32 steps, then 8 int8 codes
CODES = STEPS + 12


def _valid(quantization: str) -> bytearray:
    e = torch.tensor([1, -2, 3, 0.5, 4, 0, -1, 2, 7, -7], dtype=torch.float32)
    return bytearray(encode_payload(compress(e, chunk=CHUNK, topk=TOPK, quantization=quantization)))


def _put(buf: bytearray, fmt: str, at: int, *values: Any) -> bytearray:
    struct.pack_into(fmt, buf, at, *values)
    return buf


def _decode(buf: bytes, quantization: str = "int8", **expected: int) -> SparseDelta:
    args = {"size": SIZE, "chunk": CHUNK, "topk": TOPK, **expected}
    return decode_payload(bytes(buf), quantization=quantization, **args)


def test_valid_hostile_baseline_decodes() -> None:
    # The mutations below start from these bytes: they must be valid to begin with.
    for quantization in QUANTIZATIONS:
        d = _decode(_valid(quantization), quantization)
        assert d.offsets.tolist() == [0, 1, 2, 4, 6, 7, 8, 9]


HOSTILE: list[tuple[str, str, Any, str]] = [
    # (name, reason, mutate(int8 payload), words the message must contain)
    ("unsorted", "unsorted", lambda b: _put(b, "<3H", OFFSETS, 0, 2, 1), "ascending"),
    ("repeated", "repeated", lambda b: _put(b, "<3H", OFFSETS, 0, 1, 1), "repeated"),
    ("out-of-range", "out-of-range", lambda b: _put(b, "<H", OFFSETS + 4, 4), "below chunk 4"),
    ("short-last-chunk", "out-of-range", lambda b: _put(b, "<H", OFFSETS + 14, 2), "short last"),
    ("truncated-byte", "size", lambda b: b[:-1], "expected exactly 60"),
    ("extra-byte", "size", lambda b: b + b"\0", "expected exactly 60"),
    ("short-header", "size", lambda b: b[:10], "header"),
    ("empty", "size", lambda b: b[:0], "0 bytes"),
    ("one-entry-less", "count", lambda b: b[:-3], "holds 7 entries, expected 8"),
    ("one-entry-more", "count", lambda b: b + b"\0" * 3, "holds 9 entries, expected 8"),
    ("magic", "header", lambda b: _put(b, "<4s", 0, b"VTSE"), "magic"),
    ("version", "header", lambda b: _put(b, "<B", 4, 2), "version: expected 1, got 2"),
    ("quantization", "header", lambda b: _put(b, "<B", 5, 0), "quantization: expected 1, got 0"),
    ("reserved", "header", lambda b: _put(b, "<H", 6, 1), "reserved"),
    ("size-field", "header", lambda b: _put(b, "<Q", 8, 11), "size: expected 10, got 11"),
    ("chunk-field", "header", lambda b: _put(b, "<I", 16, 5), "chunk: expected 4, got 5"),
    ("topk-field", "header", lambda b: _put(b, "<I", 20, 2), "topk: expected 3, got 2"),
    ("nan-step", "non-finite", lambda b: _put(b, "<f", STEPS + 4, math.nan), "chunk 1"),
    ("inf-step", "non-finite", lambda b: _put(b, "<f", STEPS, math.inf), "chunk 0"),
    ("negative-step", "step", lambda b: _put(b, "<f", STEPS + 8, -0.5), ">= 0"),
    ("code-128", "code", lambda b: _put(b, "<b", CODES + 5, -128), "entry 5 is -128"),
]


@pytest.mark.parametrize(
    ("name", "reason", "mutate", "words"), HOSTILE, ids=[h[0] for h in HOSTILE]
)
def test_hostile_int8_payload(name: str, reason: str, mutate: Any, words: str) -> None:
    with pytest.raises(PayloadError, match=r"^") as info:
        _decode(mutate(_valid("int8")))
    assert info.value.reason == reason, str(info.value)
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_hostile_float32_values(bad: float) -> None:
    values_at = OFFSETS + 16
    with pytest.raises(PayloadError) as info:
        _decode(_put(_valid("float32"), "<f", values_at + 4 * 6, bad), "float32")
    assert info.value.reason == "non-finite" and "entry 6" in str(info.value)


def test_expected_parameters_are_the_run_ones() -> None:
    # The same valid bytes are refused against another run's parameters.
    payload = bytes(_valid("int8"))
    for expected in ({"size": 11}, {"chunk": 5}, {"topk": 4}):
        with pytest.raises(PayloadError) as info:
            _decode(payload, **expected)
        assert info.value.reason == "header"
    with pytest.raises(PayloadError) as info:
        _decode(payload, "float32")
    assert info.value.reason == "header"


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_accepted_payload_is_canonical(data: st.DataObject) -> None:
    """Random byte edits: decode raises PayloadError or yields bytes that re-encode identically."""
    quantization = data.draw(st.sampled_from(QUANTIZATIONS))
    buf = _valid(quantization)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(buf) - 1))
        buf[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        buf = buf[: data.draw(st.integers(0, len(buf)))]
    try:
        d = _decode(buf, quantization)
    except PayloadError:
        return
    assert encode_payload(d) == bytes(buf)
    assert bool(torch.isfinite(d.values).all())


# ---------------------------------------------------------------- pinned vector

CASES: list[dict[str, Any]] = [
    {"name": "int8-ties-short-last-chunk", "size": 23, "chunk": 8, "topk": 3,
     "quantization": "int8", "beta": 0.75, "seed": 11},
    {"name": "float32", "size": 13, "chunk": 4, "topk": 2,
     "quantization": "float32", "beta": 0.9, "seed": 12},
    {"name": "int8-topk-above-chunk", "size": 9, "chunk": 4, "topk": 6,
     "quantization": "int8", "beta": 0.5, "seed": 13},
    # beta 1, delta 0, max 127 -> step 1: the codes show round-half-even (2.5 -> 2, 3.5 -> 4).
    {"name": "int8-half-even", "size": 6, "chunk": 6, "topk": 5, "quantization": "int8",
     "beta": 1.0, "e": [2.5, -127.0, 3.5, -0.5, 1.5, 0.25], "delta": [0.0] * 6},
]  # fmt: skip


def _case_inputs(case: dict[str, Any]) -> tuple[list[float], list[float]]:
    if "e" in case:
        return case["e"], case["delta"]
    rng = np.random.default_rng(case["seed"])
    e = tie_heavy(rng, case["size"]).tolist()
    delta = [float(x) for x in (rng.integers(-4, 5, case["size"]) / F32(8)).astype(F32)]
    return e, delta


def build_vector() -> dict[str, Any]:
    """The vector as trainer.compression produces it (used by --write)."""
    cases = []
    for case in CASES:
        e, delta = _case_inputs(case)
        d, e_new = error_feedback_step(
            torch.tensor(e, dtype=torch.float32), torch.tensor(delta, dtype=torch.float32),
            beta=case["beta"], chunk=case["chunk"], topk=case["topk"],
            quantization=case["quantization"],
        )  # fmt: skip
        payload = encode_payload(d)
        cases.append({
            **{k: case[k] for k in ("name", "size", "chunk", "topk", "quantization", "beta")},
            "e": e, "delta": delta,
            "indices": d.offsets.tolist(), "values": d.values.tolist(),
            "codes": [] if d.codes is None else d.codes.tolist(),
            "steps": [] if d.steps is None else d.steps.tolist(),
            "e_new": e_new.tolist(), "norm": d.norm(),
            "payload": "0x" + payload.hex(), "sha256": "0x" + hashlib.sha256(payload).hexdigest(),
        })  # fmt: skip
    return {
        "description": "trainer/compression.py payload version 1 (issue 15). e' = fl32(beta)*e + "
        "delta (float32), d = Q(TopK_per_chunk(e')), e_new = e' - d. Floats are float32 values "
        "written as exact decimals; payload/sha256 are 0x hex. Regenerate with "
        "`python tests/test_shared_compression.py --write`.",
        "version": 1,
        "cases": cases,
    }


def test_vector_matches_independent_recomputation() -> None:
    vector = json.loads(VECTOR.read_text())
    assert vector["version"] == 1 and [c["name"] for c in vector["cases"]] == [
        c["name"] for c in CASES
    ]
    for case in vector["cases"]:
        size, chunk, topk, quant = case["size"], case["chunk"], case["topk"], case["quantization"]
        e_prime = np.array(case["e"], F32) * F32(case["beta"]) + np.array(case["delta"], F32)
        indices = oracle_topk(e_prime.tolist(), chunk, topk)
        values, codes, steps = oracle_quantize(e_prime.tolist(), indices, chunk, quant)
        payload = oracle_payload(size, chunk, topk, quant, indices, values, codes, steps)
        assert (case["indices"], case["values"]) == (indices, values)
        assert (case["codes"], case["steps"]) == (codes, steps)
        assert case["payload"] == "0x" + payload.hex()
        assert case["sha256"] == "0x" + hashlib.sha256(payload).hexdigest()
        e_new = e_prime.copy()
        e_new[indices] = e_prime[indices] - np.array(values, F32)
        assert case["e_new"] == e_new.tolist()
        d = decode_payload(payload, size=size, chunk=chunk, topk=topk, quantization=quant)
        assert d.norm() == case["norm"]


def test_vector_matches_the_module() -> None:
    assert json.loads(VECTOR.read_text()) == build_vector()


# ---------------------------------------------------------------- determinism across kernels

_PROBE = """
import hashlib, sys
import numpy as np, torch
from trainer.compression import encode_payload, error_feedback_step
torch.set_num_threads(int(sys.argv[1]))
rng = np.random.default_rng(2026)  # numpy, not torch.randn: torch's normal_ has per-ISA kernels
n = (1 << 20) + 123  # above ATen's 32768-element grain: the threaded paths run
e = rng.standard_normal(n).astype(np.float32)
e[::5] = np.round(e[::5])  # ties
delta = (rng.standard_normal(n) * 1e-3).astype(np.float32)
print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())
for quantization in ("int8", "float32"):
    d, e_new = error_feedback_step(torch.from_numpy(e), torch.from_numpy(delta), beta=0.9,
                                   chunk=4096, topk=64, quantization=quantization)
    print(hashlib.sha256(encode_payload(d)).hexdigest(),
          hashlib.sha256(e_new.numpy().tobytes()).hexdigest(), d.norm().hex())
"""


def test_payload_identical_across_cpu_capability_and_threads() -> None:
    runs = [("default", 1), (None, 2), (None, 1)]
    procs = []
    for capability, threads in runs:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("ATEN_CPU_CAPABILITY", None)
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability  # read when torch loads: a fresh process
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _PROBE, str(threads)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs.append(out.splitlines())
    assert outputs[0][0] == "DEFAULT 1" and outputs[1][0].endswith(" 2"), outputs
    assert outputs[1][0].split()[0] == torch.backends.cpu.get_cpu_capability()
    assert len(outputs[0]) == 3 and outputs[0][1:] == outputs[1][1:] == outputs[2][1:], outputs


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_shared_compression.py --write")
    VECTOR.parent.mkdir(parents=True, exist_ok=True)
    VECTOR.write_text(json.dumps(build_vector(), indent=1) + "\n")

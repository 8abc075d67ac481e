"""Aggregating a round's contributions vs the bare minimum of work (issue #15, "Speed").

    .venv/bin/python benchmarks/shared_aggregate.py [--size 100000000] [--peers 20]
        [--chunk 4096] [--topk 64] [--quantization int8] [--repeats 5] [--threads 1]

Builds ``--peers`` canonical payloads of a synthetic ``--size``-parameter vector (random
within-chunk offsets, codes and steps; the same bytes ``trainer.compression.encode_payload``
writes), then times, per repeat:

* **aggregate**: for every payload, what the aggregator does to it: sha256 of the bytes,
  ``decode_payload`` (the strict validation: header, length, offsets in range, strictly
  ascending, finite steps, codes), ``norm()`` and ``add_into`` the float32 accumulator, then
  the scale ``u = acc * fl32(alpha/n)`` (trainer.aggregation.apply_sum's arithmetic);
* **floor**: one ``index_add_`` of the same ``peers * nnz`` values at their global indices
  (concatenated beforehand, not timed) plus one sha256 pass over all payload bytes.

The round's dense tail (``u = acc * fl32(alpha/n)``, ``theta - u``, the aggregate hash: three
passes over the dense vector, once per round whatever the number of peers) is in neither and is
printed apart. Prints the median of each, their ratio (target <= 1.5x), the payload size
against the dense float32 vector (target <= 3 %), and the machine load before and after (this
machine is shared: read the ratio, not the seconds).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import statistics
import struct
import time

import numpy as np
import torch

from trainer.aggregation import outer_scale
from trainer.compression import (
    SparseDelta,
    chunk_counts,
    decode_payload,
    payload_size,
    total_entries,
)

_QUANT_CODE = {"float32": 0, "int8": 1}


def synthetic_payload(
    rng: np.random.Generator, size: int, chunk: int, topk: int, quantization: str
) -> bytes:
    """A canonical payload: per chunk k_c distinct ascending offsets (sorted draws plus their
    rank, so no two repeat), random codes in -127..127 and positive steps (int8) or values."""
    counts = chunk_counts(size, chunk, topk)
    full, tail = divmod(size, chunk)
    blocks = []
    for rows, length in ((full, chunk), (1 if tail else 0, tail)):
        if rows:
            k = min(topk, length)
            draws = np.sort(rng.integers(0, length - k + 1, size=(rows, k)), axis=1)
            blocks.append((draws + np.arange(k)).reshape(-1))
    offsets = np.concatenate(blocks).astype("<u2")
    header = struct.pack("<4sBBHQII", b"VTSD", 1, _QUANT_CODE[quantization], 0, size, chunk, topk)
    total = offsets.size
    if quantization == "int8":
        steps = (rng.random(len(counts), dtype=np.float32) * 1e-4 + 1e-6).astype("<f4")
        codes = rng.integers(-127, 128, size=total, dtype=np.int8)
        body = steps.tobytes() + codes.tobytes()
    else:
        body = (rng.standard_normal(total, dtype=np.float32) * 1e-3).astype("<f4").tobytes()
    return header + offsets.tobytes() + body


def aggregate(
    payloads: list[bytes], size: int, chunk: int, topk: int, quantization: str
) -> torch.Tensor:
    acc = torch.zeros(size, dtype=torch.float32)
    for data in payloads:
        hashlib.sha256(data).digest()
        d: SparseDelta = decode_payload(
            data, size=size, chunk=chunk, topk=topk, quantization=quantization
        )
        d.norm()
        d.add_into(acc)
    return acc


def floor(size: int, indices: torch.Tensor, values: torch.Tensor, payloads: list[bytes]) -> None:
    acc = torch.zeros(size, dtype=torch.float32)
    acc.index_add_(0, indices, values)
    digest = hashlib.sha256()
    for data in payloads:
        digest.update(data)
    digest.digest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=100_000_000)
    parser.add_argument("--peers", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--quantization", choices=("int8", "float32"), default="int8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size, chunk, topk, quant = args.size, args.chunk, args.topk, args.quantization
    print(f"load before: {os.getloadavg()}  torch threads: {torch.get_num_threads()}")
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    payloads = [synthetic_payload(rng, size, chunk, topk, quant) for _ in range(args.peers)]
    decoded = [
        decode_payload(p, size=size, chunk=chunk, topk=topk, quantization=quant) for p in payloads
    ]
    indices = torch.cat([d.offsets for d in decoded])
    values = torch.cat([d.values for d in decoded])
    del decoded
    print(f"built {args.peers} payloads in {time.perf_counter() - t0:.1f} s")

    timed: dict[str, list[float]] = {"aggregate": [], "floor": []}
    for _ in range(args.repeats):  # interleaved, so drift in machine speed hits both alike
        t = time.perf_counter()
        aggregate(payloads, size, chunk, topk, quant)
        timed["aggregate"].append(time.perf_counter() - t)
        t = time.perf_counter()
        floor(size, indices, values, payloads)
        timed["floor"].append(time.perf_counter() - t)
    acc = aggregate(payloads, size, chunk, topk, quant)
    theta = torch.zeros(size, dtype=torch.float32)
    t = time.perf_counter()
    u = acc * outer_scale(1.0, args.peers)
    theta - u
    hashlib.sha256(u.numpy().data).digest()
    dense = time.perf_counter() - t
    agg, base = statistics.median(timed["aggregate"]), statistics.median(timed["floor"])
    nnz = total_entries(size, chunk, topk)
    nbytes = payload_size(size, chunk, topk, quant)
    print(
        f"size {size:,}  chunk {chunk}  topk {topk}  {quant}  peers {args.peers}  "
        f"nnz/peer {nnz:,}  chunks {math.ceil(size / chunk):,}"
    )
    print(f"aggregate (hash+decode+validate+norm+index_add, {args.peers} payloads): {agg:.3f} s")
    print(f"floor (one index_add_ of {args.peers * nnz:,} values + one sha256 pass): {base:.3f} s")
    print(f"ratio aggregate/floor: {agg / base:.2f}x  (target <= 1.5x)")
    print(
        f"not in either: the round's dense tail (u = acc * c, theta - u, sha256 of u), once per "
        f"round whatever the peer count: {dense:.3f} s"
    )
    print(
        f"payload {nbytes:,} bytes = {100 * nbytes / (4 * size):.2f} % of dense float32 "
        f"({4 * size:,} bytes)  (target <= 3 %)"
    )
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()

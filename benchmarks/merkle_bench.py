"""Benchmark: tensor commitment speed vs one plain sha256 pass, and vs merkletools.

Part 1 commits to ``--gib`` GiB of float32 tensor data (numpy arrays -> encode_tensors with the
default 1 MiB chunks -> MerkleTree.build) and divides the time by one single-threaded
``hashlib.sha256`` pass over the same bytes, measured in the same run (medians of ``--runs``).
Goal: ratio <= 0.75 on a 2-core machine.

Part 2 builds trees over ``--leaves`` 32-byte leaves with merkletools.MerkleTools (add_leaf(hex,
do_hash=True) + make_tree + get_merkle_root), with our legacy_root (same root) and with our
RFC 6962 MerkleTree.build, and prints merkletools' time divided by ours.

Run: ``.venv/bin/python benchmarks/merkle_bench.py [--gib 1] [--runs 5] [--leaves 1000000]``
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

from proofs.encoding import TensorBytes, encode_tensors
from proofs.merkle import MerkleTree, legacy_root

TENSOR_BYTES = 64 << 20  # 64 MiB per tensor, like a large layer's weight


def _make_tensors(total: int) -> list[TensorBytes]:
    rng = np.random.default_rng(0)
    tensors = []
    for i, offset in enumerate(range(0, total, TENSOR_BYTES)):
        count = min(TENSOR_BYTES, total - offset) // 4
        arr = rng.random(count, dtype=np.float32)
        tensors.append(
            TensorBytes(name=f"layer{i:03d}.weight", dtype="float32", shape=(count,), data=arr.data)
        )
    return tensors


def bench_commitment(gib: float, runs: int) -> None:
    total = int(gib * (1 << 30)) // 4 * 4
    tensors = _make_tensors(total)

    def plain() -> bytes:
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.data)
        return h.digest()

    def commit() -> bytes:
        return MerkleTree.build(encode_tensors(tensors)).root

    # Interleave the two measurements so that load from other processes on a shared machine
    # hits both alike; report the median of the per-pair ratios.
    plain()
    root = commit()
    plains: list[float] = []
    commits: list[float] = []
    for _ in range(runs):
        for fn, sink in ((plain, plains), (commit, commits)):
            gc.collect()
            start = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - start)
    ratios = [c / p for c, p in zip(commits, plains, strict=True)]
    t_plain, t_commit = statistics.median(plains), statistics.median(commits)
    mb = total / 1e6
    print(f"data: {total / (1 << 30):.3f} GiB float32 in {len(tensors)} tensors, 1 MiB chunks")
    print(f"plain sha256 (1 thread): median {t_plain:.3f} s ({mb / t_plain:.0f} MB/s)")
    print(
        f"commitment (encode+build, {os.cpu_count()} CPUs): median {t_commit:.3f} s "
        f"({mb / t_commit:.0f} MB/s)"
    )
    print(f"root 0x{root.hex()}")
    print("per-run ratios: " + " ".join(f"{r:.3f}" for r in ratios))
    print(f"RATIO commitment / plain sha256 = {statistics.median(ratios):.3f}  (goal <= 0.75)")


def bench_vs_merkletools(n: int, runs: int) -> None:
    import merkletools  # installed with --no-deps: its pysha3 dependency does not build on 3.11

    rng = np.random.default_rng(1)
    leaves = [bytes(row) for row in rng.integers(0, 256, size=(n, 32), dtype=np.uint8)]

    def with_merkletools() -> str:
        # Both start from the same bytes; merkletools takes hex text, so the conversion is its cost.
        mt = merkletools.MerkleTools(hash_type="sha256")
        mt.add_leaf([leaf.hex() for leaf in leaves], do_hash=True)
        mt.make_tree()
        root: str = mt.get_merkle_root()
        return root

    mt_root = with_merkletools()
    if legacy_root(leaves).hex() != mt_root:
        raise SystemExit("legacy_root disagrees with merkletools")
    contenders: dict[str, Callable[[], object]] = {
        "merkletools": with_merkletools,
        "legacy_root": lambda: legacy_root(leaves),
        "MerkleTree.build": lambda: MerkleTree.build(leaves),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(runs):  # interleaved, as above
        for name, fn in contenders.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(
        f"{n} leaves of 32 bytes (medians): merkletools {med['merkletools']:.3f} s, "
        f"legacy_root {med['legacy_root']:.3f} s, "
        f"MerkleTree.build (RFC 6962, all levels kept) {med['MerkleTree.build']:.3f} s"
    )
    for name in ("legacy_root", "MerkleTree.build"):
        ratios = [m / t for m, t in zip(times["merkletools"], times[name], strict=True)]
        print(f"RATIO merkletools / {name} = {statistics.median(ratios):.2f}x  (goal >= 10x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="GiB of float32 data (default 1)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--leaves", type=int, default=1_000_000, help="leaves for merkletools")
    args = parser.parse_args()
    bench_commitment(args.gib, args.runs)
    if args.leaves:
        bench_vs_merkletools(args.leaves, args.runs)


if __name__ == "__main__":
    main()

"""Benchmark: tensor commitment speed vs one plain sha256 pass, and vs merkletools.

Part 1 commits to ``--gib`` GiB of float32 tensor data (numpy arrays -> encode_tensors with the
default 1 MiB chunks -> MerkleTree.build) and divides the time by one single-threaded
``hashlib.sha256`` pass over the same bytes, measured in the same run (medians of ``--runs``).
Goal: ratio <= 0.75 on a 2-core machine.

Part 2 builds trees over ``--leaves`` 32-byte leaves with merkletools.MerkleTools (add_leaf(hex,
do_hash=True) + make_tree + get_merkle_root), with our legacy_root (same root) and with our
RFC 6962 MerkleTree.build, and prints merkletools' time divided by ours. Goal: >= 10x.

Both parts time proofs.merkle twice: with the C accelerator proofs._sha256tree ("native") and
with it switched off ("pure", hashlib only); roots are checked equal. The load average is printed
because the machine may be shared.

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

from proofs import merkle
from proofs.encoding import TensorBytes, encode_tensors
from proofs.merkle import MerkleTree, legacy_root

TENSOR_BYTES = 64 << 20  # 64 MiB per tensor, like a large layer's weight


def _modes() -> list[tuple[str, bool]]:
    if not merkle.native_available():
        print("WARNING: proofs._sha256tree is not built; timing the pure-Python path only")
        return [("pure", False)]
    return [("native", True), ("pure", False)]


def _with_mode(native: bool, fn: Callable[[], bytes]) -> Callable[[], bytes]:
    def run() -> bytes:
        merkle.set_native(native)
        try:
            return fn()
        finally:
            merkle.set_native(merkle.native_available())

    return run


def _interleaved(contenders: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    """Times of each contender, interleaved run by run so that load from other processes on a
    shared machine hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(runs):
        for name, fn in contenders.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


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

    contenders: dict[str, Callable[[], object]] = {"plain": plain}
    roots = set()
    for mode, native in _modes():
        contenders[f"commit {mode}"] = _with_mode(native, commit)
        roots.add(_with_mode(native, commit)())  # also warms up
    if len(roots) != 1:
        raise SystemExit("native and pure commitments disagree")
    plain()
    times = _interleaved(contenders, runs)
    t_plain = statistics.median(times["plain"])
    mb = total / 1e6
    print(f"data: {total / (1 << 30):.3f} GiB float32 in {len(tensors)} tensors, 1 MiB chunks")
    print(f"plain sha256 (1 thread): median {t_plain:.3f} s ({mb / t_plain:.0f} MB/s)")
    print(f"root 0x{roots.pop().hex()}")
    for name in contenders:
        if name == "plain":
            continue
        t = statistics.median(times[name])
        ratios = [c / p for c, p in zip(times[name], times["plain"], strict=True)]
        print(
            f"{name} (encode+build, {os.cpu_count()} CPUs): median {t:.3f} s ({mb / t:.0f} MB/s);"
            " per-run ratios: " + " ".join(f"{r:.3f}" for r in ratios)
        )
        print(f"RATIO {name} / plain sha256 = {statistics.median(ratios):.3f}  (goal <= 0.75)")


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
    contenders: dict[str, Callable[[], object]] = {"merkletools": with_merkletools}
    rfc_roots = set()
    for mode, native in _modes():
        legacy = _with_mode(native, lambda: legacy_root(leaves))
        build = _with_mode(native, lambda: MerkleTree.build(leaves).root)
        if legacy().hex() != mt_root:
            raise SystemExit(f"legacy_root ({mode}) disagrees with merkletools")
        rfc_roots.add(build())
        contenders[f"legacy_root {mode}"] = legacy
        contenders[f"MerkleTree.build {mode}"] = build
    if len(rfc_roots) != 1:
        raise SystemExit("native and pure MerkleTree.build disagree")
    times = _interleaved(contenders, runs)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(
        f"{n} leaves of 32 bytes (medians, MerkleTree.build keeps all levels): "
        + ", ".join(f"{name} {t:.3f} s" for name, t in med.items())
    )
    for name in contenders:
        if name == "merkletools":
            continue
        ratios = [m / t for m, t in zip(times["merkletools"], times[name], strict=True)]
        print(f"RATIO merkletools / {name} = {statistics.median(ratios):.2f}x  (goal >= 10x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="GiB of float32 data (default 1)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--leaves", type=int, default=1_000_000, help="leaves for merkletools")
    args = parser.parse_args()
    with open("/proc/loadavg") as f:
        print(f"load average (1/5/15 min) at start: {' '.join(f.read().split()[:3])}")
    bench_commitment(args.gib, args.runs)
    if args.leaves:
        bench_vs_merkletools(args.leaves, args.runs)
    with open("/proc/loadavg") as f:
        print(f"load average (1/5/15 min) at end: {' '.join(f.read().split()[:3])}")


if __name__ == "__main__":
    main()

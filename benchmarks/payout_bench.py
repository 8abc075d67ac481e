"""Payout tree build time: veritrain's PayoutTree.build vs @openzeppelin/merkle-tree, same leaves.

Usage (repository root, after `make setup`):

    .venv/bin/python benchmarks/payout_bench.py [--leaves 100000] [--repeats 5] [--js-repeats 3]

Both sides build the same (address, uint256) entries; the OpenZeppelin time is measured inside
node around `StandardMerkleTree.of` (process start-up and JSON parsing excluded). Medians are
printed with their ratio, and the two roots must agree.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from proofs.payout import PayoutTree

REPO = Path(__file__).resolve().parent.parent
JS_BENCH = REPO / "tests" / "js" / "payout_bench.mjs"


def make_entries(count: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [("0x" + rng.randbytes(20).hex(), rng.randrange(10**24)) for _ in range(count)]


def time_ours(entries: list[tuple[str, int]], repeats: int) -> tuple[list[float], str]:
    times, root = [], ""
    for _ in range(repeats):
        start = time.perf_counter()
        tree = PayoutTree.build(entries)
        times.append(time.perf_counter() - start)
        root = "0x" + tree.root.hex()
    return times, root


def time_openzeppelin(entries: list[tuple[str, int]], repeats: int) -> tuple[list[float], str]:
    node = shutil.which("node")
    if node is None or not (REPO / "node_modules" / "@openzeppelin" / "merkle-tree").is_dir():
        sys.exit("node or node_modules/@openzeppelin/merkle-tree missing: run `npm ci` first")
    payload = json.dumps({"entries": [[a, str(v)] for a, v in entries], "repeats": repeats})
    done = subprocess.run(
        [node, str(JS_BENCH)], input=payload, capture_output=True, text=True, cwd=REPO, check=True
    )
    result = json.loads(done.stdout)
    return [ms / 1000 for ms in result["ms"]], result["root"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--js-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()

    entries = make_entries(args.leaves, args.seed)
    ours, our_root = time_ours(entries, args.repeats)
    theirs, their_root = time_openzeppelin(entries, args.js_repeats)
    if our_root != their_root:
        sys.exit(f"ROOT MISMATCH: veritrain {our_root} vs OpenZeppelin {their_root}")

    ours_med, theirs_med = statistics.median(ours), statistics.median(theirs)
    print(f"payout tree, {args.leaves} leaves (address, uint256), root {our_root} (both agree)")
    print(f"  veritrain PayoutTree.build       median {ours_med:8.3f} s  ({args.repeats} runs)")
    print(
        f"  OZ StandardMerkleTree.of (node)  median {theirs_med:8.3f} s  ({args.js_repeats} runs)"
    )
    print(f"  ratio veritrain / OpenZeppelin   {ours_med / theirs_med:.3f}")
    print(f"  speed-up over OpenZeppelin       {theirs_med / ours_med:.1f}x")


if __name__ == "__main__":
    main()

"""Benchmark: BLS sign / verify / aggregate verify, native backend vs py_ecc, in one run.

Times proofs.bls under each backend on the same domain-separated message (median of ``--runs``
repeats, ``--keys`` signers for aggregate verify on distinct messages, plus the G2 subgroup-checked
aggregate of those signatures), checks both backends gave identical bytes, and prints py_ecc's time
divided by the native one. Goals: verify native <= 1/50 of py_ecc's time, sign <= 1/20. The load
average is printed because the machine may be shared.

Run: ``.venv/bin/python benchmarks/bls_bench.py [--runs 5] [--keys 8]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

from proofs import bls
from proofs.signatures import Domain, KeyPair, keypair_from_seed, signing_message


def _median_s(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time_backend(
    backend: bls.Backend, keys: list[KeyPair], messages: list[bytes], runs: int
) -> tuple[dict[str, float], bytes]:
    sigs = [backend.sign(k.secret, m) for k, m in zip(keys, messages, strict=True)]
    agg = backend.aggregate(sigs)
    pubs = [k.public for k in keys]
    if not backend.verify(keys[0].public, messages[0], sigs[0]):
        raise SystemExit(f"{backend.name}: verify failed")
    if not backend.aggregate_verify(pubs, messages, agg):
        raise SystemExit(f"{backend.name}: aggregate_verify failed")
    n = len(keys)
    times = {
        "sign": _median_s(lambda: backend.sign(keys[0].secret, messages[0]), runs),
        "verify": _median_s(lambda: backend.verify(keys[0].public, messages[0], sigs[0]), runs),
        f"aggregate ({n} sigs)": _median_s(lambda: backend.aggregate(sigs), runs),
        f"aggregate_verify ({n})": _median_s(
            lambda: backend.aggregate_verify(pubs, messages, agg), runs
        ),
    }
    return times, sigs[0] + agg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keys", type=int, default=8)
    args = parser.parse_args()
    keys = [keypair_from_seed(bytes([i + 1]) * 32) for i in range(args.keys)]
    messages = [signing_message(Domain.VERDICT, f"run-{i}", b"x" * 64) for i in range(args.keys)]
    results: dict[str, dict[str, float]] = {}
    outputs: dict[str, bytes] = {}
    for name in ("native", "py_ecc"):
        results[name], outputs[name] = _time_backend(
            bls.make_backend(name), keys, messages, args.runs
        )
    if outputs["native"] != outputs["py_ecc"]:
        raise SystemExit("backends disagree on signature or aggregate bytes")
    print(f"load average {os.getloadavg()[0]:.2f}; runs {args.runs}; bytes identical")
    print(f"{'operation':<24}{'native ms':>12}{'py_ecc ms':>12}{'ratio':>10}")
    for op, native_s in results["native"].items():
        ref_s = results["py_ecc"][op]
        print(f"{op:<24}{native_s * 1e3:>12.2f}{ref_s * 1e3:>12.1f}{ref_s / native_s:>9.0f}x")


if __name__ == "__main__":
    main()

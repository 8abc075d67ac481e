"""Time spent in BLS, for the benchmarks: wraps proofs.bls's module functions with a stopwatch.

Every signature operation of the code base goes through proofs.signatures, which calls these
functions of proofs.bls by attribute; wrapping them therefore counts all of it (signing,
verifying, aggregating, key validation, public keys from secrets), whichever backend is active.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from proofs import bls

TIMED = ("sign", "verify", "aggregate", "aggregate_verify", "fast_aggregate_verify",
         "key_validate", "sk_to_pk")  # fmt: skip


@dataclass
class BlsClock:
    """Seconds and calls per wrapped function since the clock was started."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def summary(self) -> str:
        parts = [f"{n} {self.calls[n]}x {self.seconds[n]:.2f} s" for n in sorted(self.calls)]
        return ", ".join(parts) or "no BLS calls"


def _wrap(clock: BlsClock, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock.seconds[name] = clock.seconds.get(name, 0.0) + time.perf_counter() - start
            clock.calls[name] = clock.calls.get(name, 0) + 1

    return timed


@contextmanager
def bls_clock(backend: str) -> Iterator[BlsClock]:
    """Switch proofs.bls to ``backend`` ("native" or "py_ecc") and time every BLS call inside
    the block; the previous backend and the unwrapped functions are restored after it."""
    clock = BlsClock()
    originals = {name: getattr(bls, name) for name in TIMED}
    previous = bls.set_backend(backend)
    try:
        for name, fn in originals.items():
            setattr(bls, name, _wrap(clock, name, fn))
        yield clock
    finally:
        for name, fn in originals.items():
            setattr(bls, name, fn)
        bls.set_backend(previous)

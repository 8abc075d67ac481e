"""Sampling and detection probability, checked against brute force and simulation."""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audit.sampling import (
    SamplingError,
    detection_probability,
    detection_probability_exact,
    plan_sample,
    sample_seed,
    sample_size_for,
    sample_steps,
)


def test_seed_is_framed_sha256_of_its_inputs() -> None:
    # Independent recomputation with hashlib of the documented layout.
    def framed(b: bytes) -> bytes:
        return len(b).to_bytes(4, "big") + b

    beacon, manifest, key = b"\x01" * 32, b"\x02" * 32, b"\x03" * 48
    expected = hashlib.sha256(
        framed(b"veritrain/audit-sample/v1") + framed(beacon) + framed(manifest) + framed(key)
    ).digest()
    assert sample_seed(beacon=beacon, manifest_hash=manifest, auditor_pubkey=key) == expected
    # Each input matters, and moving a byte between inputs changes the seed.
    others = {
        sample_seed(beacon=b"\x09" * 32, manifest_hash=manifest, auditor_pubkey=key),
        sample_seed(beacon=beacon, manifest_hash=b"\x09" * 32, auditor_pubkey=key),
        sample_seed(beacon=beacon, manifest_hash=manifest, auditor_pubkey=b"\x09" * 48),
        sample_seed(beacon=beacon + b"\x02", manifest_hash=manifest[1:], auditor_pubkey=key),
    }
    assert expected not in others and len(others) == 4


@given(
    seed=st.binary(min_size=32, max_size=32),
    total=st.integers(min_value=1, max_value=5000),
    count=st.integers(min_value=0, max_value=60),
)
@settings(max_examples=150, deadline=None)
def test_sample_is_distinct_sorted_in_range_and_reproducible(
    seed: bytes, total: int, count: int
) -> None:
    steps = sample_steps(seed, total_steps=total, count=count)
    assert len(steps) == min(count, total)
    assert list(steps) == sorted(set(steps))
    assert all(0 <= s < total for s in steps)
    assert steps == sample_steps(seed, total_steps=total, count=count)


def test_sample_is_uniform_over_steps() -> None:
    # 4000 samples of 3 out of 10: every step expected 1200 times; allow 5 sigma.
    counts: Counter[int] = Counter()
    for i in range(4000):
        counts.update(sample_steps(i.to_bytes(4, "big"), total_steps=10, count=3))
    sigma = math.sqrt(4000 * 0.3 * 0.7)
    assert all(abs(counts[s] - 1200) < 5 * sigma for s in range(10)), counts


def test_bad_sample_parameters_raise() -> None:
    with pytest.raises(SamplingError):
        sample_steps(b"x" * 32, total_steps=0, count=1)
    with pytest.raises(SamplingError):
        sample_steps(b"x" * 32, total_steps=10, count=-1)
    with pytest.raises(SamplingError):
        detection_probability(1.5, 3)
    with pytest.raises(SamplingError):
        sample_size_for(cheat_fraction=0.0, confidence=0.9)
    with pytest.raises(SamplingError):
        sample_size_for(cheat_fraction=0.1, confidence=1.0)


@pytest.mark.parametrize(("total", "cheated", "n"), [(8, 2, 3), (10, 1, 4), (9, 3, 0), (7, 7, 2)])
def test_exact_detection_matches_enumeration(total: int, cheated: int, n: int) -> None:
    cheats = set(range(cheated))
    combos = list(itertools.combinations(range(total), n))
    hits = sum(1 for c in combos if cheats & set(c))
    assert detection_probability_exact(
        total_steps=total, cheated_steps=cheated, sampled=n
    ) == pytest.approx(hits / len(combos), abs=1e-12)


def test_binomial_detection_matches_simulation() -> None:
    rng = random.Random(7)
    f, n, trials = 0.05, 30, 20000
    caught = sum(1 for _ in range(trials) if any(rng.random() < f for _ in range(n)))
    p = detection_probability(f, n)
    assert abs(caught / trials - p) < 4 * math.sqrt(p * (1 - p) / trials)


def test_hypergeometric_is_never_below_binomial() -> None:
    for total in (20, 100, 1000):
        for n in (1, 5, 19):
            k = max(1, total // 20)
            exact = detection_probability_exact(total_steps=total, cheated_steps=k, sampled=n)
            assert exact >= detection_probability(k / total, n) - 1e-12


@pytest.mark.parametrize(
    ("f", "c", "total"), [(0.05, 0.99, None), (0.01, 0.9, None), (0.05, 0.99, 200), (0.1, 0.5, 30)]
)
def test_sample_size_is_the_smallest_reaching_confidence(
    f: float, c: float, total: int | None
) -> None:
    n = sample_size_for(cheat_fraction=f, confidence=c, total_steps=total)

    def p(m: int) -> float:
        if total is None:
            return detection_probability(f, m)
        k = max(1, math.ceil(f * total))
        return detection_probability_exact(total_steps=total, cheated_steps=k, sampled=m)

    assert p(n) >= c
    assert n == 1 or p(n - 1) < c


def test_known_binomial_sample_size() -> None:
    # log(0.01)/log(0.95) = 89.78 -> 90, the textbook figure for 5% cheating at 99%.
    assert sample_size_for(cheat_fraction=0.05, confidence=0.99) == 90


def test_plan_reports_detection_and_respects_target() -> None:
    plan = plan_sample(
        beacon=b"b" * 32,
        manifest_hash=b"m" * 32,
        auditor_pubkey=b"k" * 48,
        total_steps=200,
        cheat_fraction=0.05,
        confidence=0.99,
    )
    assert plan.detection_exact >= 0.99
    assert plan.detection_binomial == pytest.approx(1 - 0.95 ** len(plan.steps))
    with pytest.raises(SamplingError):
        plan_sample(
            beacon=b"b" * 32,
            manifest_hash=b"m" * 32,
            auditor_pubkey=b"k" * 48,
            total_steps=200,
        )

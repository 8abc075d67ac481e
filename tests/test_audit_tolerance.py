"""Distances and calibration, checked against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from audit.tolerance import (
    Distance,
    Threshold,
    ToleranceError,
    calibrate,
    distance,
    distances,
)


def test_distance_matches_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 11, generator=g)
    b = a + 1e-3 * torch.randn(37, 11, generator=g)
    d = distance(a, b)
    an, bn = a.double().numpy().ravel(), b.double().numpy().ravel()
    assert d.rel_l2 == pytest.approx(np.linalg.norm(an - bn) / np.linalg.norm(bn), rel=1e-12)
    cos = float(an @ bn / (np.linalg.norm(an) * np.linalg.norm(bn)))
    assert d.cosine == pytest.approx(1 - cos, rel=1e-6, abs=1e-15)


def test_scaling_shows_in_rel_l2_not_cosine() -> None:
    a = torch.randn(100, generator=torch.Generator().manual_seed(1))
    d = distance(a * 1.05, a)
    assert d.rel_l2 == pytest.approx(0.05, rel=1e-6)
    assert d.cosine < 1e-12


def test_zero_and_non_finite_edge_cases() -> None:
    z = torch.zeros(4)
    assert distance(z, z) == Distance(rel_l2=0.0, cosine=0.0)
    d = distance(torch.ones(4), z)
    assert math.isinf(d.rel_l2) and d.cosine == 1.0
    bad = distance(torch.tensor([1.0, float("nan")]), torch.ones(2))
    assert math.isnan(bad.rel_l2)
    assert not Threshold(rel_l2=1.0, cosine=1.0).admits(bad)
    with pytest.raises(ToleranceError):
        distance(torch.ones(3), torch.ones(4))
    with pytest.raises(ToleranceError):
        distances({"a": torch.ones(1)}, {"b": torch.ones(1)})


def test_calibration_takes_worst_noise_times_factor_with_floors() -> None:
    repro = [
        {"w": Distance(rel_l2=1e-6, cosine=1e-12), "b": Distance(rel_l2=0.0, cosine=0.0)},
        {"w": Distance(rel_l2=3e-6, cosine=2e-12), "b": Distance(rel_l2=0.0, cosine=0.0)},
    ]
    cal = calibrate(repro, safety_factor=10.0, rel_l2_floor=1e-5, cosine_floor=1e-9)
    assert cal.threshold("w").rel_l2 == pytest.approx(3e-5)
    assert cal.threshold("w").cosine == pytest.approx(1e-9)  # 2e-12 * 100 < floor
    assert cal.threshold("b") == Threshold(rel_l2=1e-5, cosine=1e-9)
    with pytest.raises(ToleranceError):
        cal.threshold("missing")
    with pytest.raises(ToleranceError):
        calibrate(repro, safety_factor=0.5)
    with pytest.raises(ToleranceError):
        calibrate([{"w": Distance(rel_l2=math.nan, cosine=0.0)}])
    with pytest.raises(ToleranceError):
        calibrate([])

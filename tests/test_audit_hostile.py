"""Hostile stored gradients that are consistently committed and re-signed by the peer (written
with the trainer's own encoder and store): wrong dtype, wrong shape, extra tensors, NaN. Each gives
an invalid or failed verdict, never a crash."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from audit_runs import corpus, make_run, rewrite_gradient, stored_gradient, threads

from audit.fetch import load_run
from audit.reexec import ReexecConfig, StepAuditor
from audit.tolerance import Mode
from trainer.store import RunStore

STEP = 4
Grads = dict[str, torch.Tensor]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with threads(1):
        yield


def _first(grads: Grads) -> str:
    return sorted(grads)[0]


def _float64(g: Grads) -> Grads:
    return {**g, _first(g): g[_first(g)].double()}


def _flattened(g: Grads) -> Grads:
    name = next(n for n, t in sorted(g.items()) if t.dim() == 2)
    return {**g, name: g[name].reshape(-1)}


def _extra(g: Grads) -> Grads:
    return {**g, "evil.weight": torch.zeros(3)}


def _missing(g: Grads) -> Grads:
    return {n: t for n, t in g.items() if n != _first(g)}


def _nan(g: Grads) -> Grads:
    t = g[_first(g)].clone()
    t.view(-1)[0] = float("nan")
    return {**g, _first(g): t}


@pytest.mark.parametrize(
    ("change", "outcome"),
    [
        (_float64, "invalid"),
        (_flattened, "invalid"),
        (_extra, "invalid"),
        (_missing, "fail"),
        (_nan, "fail"),
    ],
)
def test_hostile_gradient_is_judged_not_crashed(
    change: Callable[[Grads], Grads], outcome: str
) -> None:
    honest = make_run("honest")
    url = rewrite_gradient(
        honest, f"hostile-{change.__name__}", STEP, change(stored_gradient(honest, STEP))
    )
    store = RunStore(url)
    # The rewritten run is consistently re-signed: only the first case pays for checking it.
    run = load_run(store, check_signatures=change is _float64)
    auditor = StepAuditor(store, run, corpus(), ReexecConfig(mode=Mode.TOLERANT))
    assert auditor.audit(1).passed  # the window before is untouched
    result = auditor.audit(STEP)
    assert not result.passed
    assert result.invalid == (outcome == "invalid"), result.reason

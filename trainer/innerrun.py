"""What the genesis assigns to a peer's inner run: its optimizer, and the header it must write.

Round r of peer P is an ordinary audited solo run (trainer.hook) whose recipe the genesis fixes:
:func:`build_inner_optimizer` is the optimizer every peer trains with, and
:func:`genesis_header_check` lists how a written inner-run header departs from the assignment
(the aggregator screens with it, the auditor checks with it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from proofs.codec import to_hex
from trainer.recipe import RunHeader, jsonable_hyperparameters
from trainer.schedule import Schedule
from trainer.sharedrun import Genesis, _build, inner_run_id


def build_inner_optimizer(genesis: Genesis, model: nn.Module) -> torch.optim.Optimizer:
    """The inner optimizer every peer trains with: ``torch.optim.<genesis.optimizer>`` over
    ``model.parameters()`` (one param group), ``lr=genesis.inner_lr`` and the genesis's
    hyperparameters. Raises EncodingError for an optimizer outside torch.optim."""
    return _build(model.parameters(), genesis.optimizer, genesis.inner_lr, genesis.hyperparameters)


def genesis_header_check(
    genesis: Genesis, header: RunHeader, pubkey: bytes, *, round: int | None = None
) -> list[str]:
    """How an inner run's header differs from what ``genesis`` assigns to the peer with key
    ``pubkey`` (for round ``round``; any round when None). Empty when it matches."""
    problems: list[str] = []

    def differ(what: str, seen: Any, expected: Any) -> None:
        if seen != expected:
            problems.append(
                f"{what}: header has {seen!r:.120}, the genesis assigns {expected!r:.120}"
            )

    if round is not None:
        differ("run id", header.run_id, inner_run_id(genesis.shared_run_id, round))
    else:
        prefix, _, digits = header.run_id.rpartition(".r")
        ok = prefix == genesis.shared_run_id and len(digits) == 6 and digits.isdigit()
        if not ok:
            problems.append(f"run id {header.run_id!r} is not {genesis.shared_run_id}.rNNNNNN")
    differ("assignment", header.assignment, genesis.hash())
    differ("model", header.model, genesis.model)
    differ("model config", dict(header.model_config), dict(genesis.model_config))
    differ("optimizer", header.optimizer.name, genesis.optimizer)
    differ("optimizer defaults", dict(header.optimizer.defaults), _expected_defaults(genesis))
    differ("param groups", len(header.optimizer.groups), 1)
    differ("group overrides", [dict(o) for o in header.optimizer.overrides], [{}])
    differ("schedule", header.schedule, Schedule.constant(genesis.inner_lr))
    differ("grad_clip", header.grad_clip, genesis.grad_clip)
    if header.dataset is None:
        problems.append("dataset: header has none, the genesis assigns one")
    else:
        # ``source`` describes where a peer keeps its copy; it is not part of the commitment.
        seen, want = header.dataset.to_json(), genesis.dataset.to_json()
        seen.pop("source")
        want.pop("source")
        differ("dataset", seen, want)
    differ("batch_size", header.batch_size, genesis.batch_size)
    differ("context", header.context, genesis.context)
    differ("checkpoint_every", header.checkpoint_every, genesis.checkpoint_every)
    differ("chunk_size", header.chunk_size, genesis.chunk_size)
    differ("pubkey", to_hex(header.pubkey), to_hex(pubkey))
    return problems


def _expected_defaults(genesis: Genesis) -> dict[str, Any]:
    """The optimizer defaults the hook records for build_inner_optimizer's optimizer."""
    probe = _build(
        [torch.zeros(1, requires_grad=True)],
        genesis.optimizer,
        genesis.inner_lr,
        genesis.hyperparameters,
    )
    return jsonable_hyperparameters(probe.defaults, drop=("lr",))

"""The per-step values of a record that anyone can derive from the run header, and their check.

A step record carries its replay seed, the learning rate of each param group and the batch's
corpus offsets. None of them is the peer's choice: each is a pure function of the header (run
seed, schedule, dataset size, batch shape) and the step. ``verify-store`` and ingest check every
record, the auditor every sampled one; a record that differs fails its step.
"""

from __future__ import annotations

from trainer.data import batch_offsets
from trainer.manifest import StepRecord
from trainer.recipe import RunHeader
from trainer.seeds import replay_seed


def derivation_problem(header: RunHeader, record: StepRecord) -> str | None:
    """Why ``record`` is not what its header derives for its step, or None when it is."""
    step = record.step
    if record.replay_seed != replay_seed(header.run_seed, step):
        return "replay seed is not the one derived from the run seed"
    groups = len(header.optimizer.groups)
    if len(record.lrs) != groups:
        return f"{len(record.lrs)} lrs for {groups} param groups"
    if header.schedule.group_scales and len(header.schedule.group_scales) != groups:
        return f"the schedule scales {len(header.schedule.group_scales)} of {groups} param groups"
    for index, lr in enumerate(record.lrs):
        if not header.schedule.matches(step, index, lr):
            return (
                f"param group {index} records lr {lr!r}, the schedule gives "
                f"{header.schedule.lr_at(step, index)!r} at step {step}"
            )
    if header.dataset is not None and header.batch_size > 0:
        expected = batch_offsets(
            header.run_seed,
            step,
            batch_size=header.batch_size,
            context=header.context,
            corpus_size=header.dataset.nbytes,
        )
        if record.batch != expected:
            return "batch offsets are not the ones derived from (run seed, step)"
    return None

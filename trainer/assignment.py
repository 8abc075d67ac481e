"""Assignments: the work an epoch pays for, stated by the operator before peers train.

An assignment fixes everything that decides what a run trains: the registry model and its whole
config (dropout included), the dataset (root and size), batch size and context, the dtype, the
optimizer and every hyperparameter it was built with, the learning-rate schedule, gradient
clipping and the bounds of the checkpoint interval. Its hash (sha256 of canonical JSON) is signed
into every run header trained for it, and derives the run's seed together with the peer's key
(``trainer.seeds.run_seed_for``). Ingest refuses a run whose header differs from its epoch's
assignment in any of these, with the list of differences as the reason (docs/protocol.md §8).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proofs.codec import (
    canonical_json,
    check_keys,
    get_bytes,
    get_int,
    get_object,
    get_str,
    record_hash,
    to_hex,
)
from proofs.errors import EncodingError
from proofs.hashing import Hash32, Root
from proofs.jsonlimits import read_untrusted
from trainer.models import parse_model_config
from trainer.recipe import RunHeader
from trainer.schedule import Schedule
from trainer.seeds import run_seed_for

ASSIGNMENT_VERSION = 1
MAX_ASSIGNMENT_BYTES = 64 * 1024

NO_ASSIGNMENT = Hash32(bytes(32))
"""The assignment hash of a run trained for no epoch (experiments): verifiable, never paid."""


class AssignmentError(EncodingError):
    """A run, a config or a file does not match the assignment it is checked against."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Assignment:
    """A unit of work an epoch can pay for (the warehouse says which epochs do: ``rewards
    assign``). ``model_config`` is the model's whole config (every field, defaults included);
    ``hyperparameters`` are the optimizer's constructor defaults as the run header records them
    (learning rate excluded: it comes from ``schedule``)."""

    version: int = ASSIGNMENT_VERSION
    model: str
    model_config: Mapping[str, Any]
    dataset_root: Root
    dataset_bytes: int
    batch_size: int
    context: int
    dtype: str
    optimizer: str
    hyperparameters: Mapping[str, Any]
    schedule: Schedule
    grad_clip: float | None
    checkpoint_every_min: int
    checkpoint_every_max: int

    def __post_init__(self) -> None:
        if self.version != ASSIGNMENT_VERSION:
            raise EncodingError(f"assignment version {self.version}, this code reads 1")
        if self.batch_size <= 0 or self.context <= 0 or self.dataset_bytes <= self.context:
            raise EncodingError("assignment: batch_size, context and dataset size must fit")
        if not 1 <= self.checkpoint_every_min <= self.checkpoint_every_max:
            raise EncodingError(
                "assignment: need 1 <= checkpoint_every_min <= checkpoint_every_max, got "
                f"{self.checkpoint_every_min}, {self.checkpoint_every_max}"
            )
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise EncodingError(f"assignment: grad_clip must be positive or null: {self.grad_clip}")
        if "lr" in self.hyperparameters:
            raise EncodingError("assignment: the learning rate belongs in the schedule")
        try:
            full = full_model_config(self.model, self.model_config)
        except (KeyError, ValueError, TypeError) as exc:
            raise EncodingError(f"assignment: bad model config: {exc}") from exc
        if full != dict(self.model_config):
            raise EncodingError("assignment: model_config must list every field of the model")
        if full.get("context") != self.context:
            raise EncodingError(f"assignment: context {self.context} is not the model's")

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "model": self.model,
            "model_config": dict(self.model_config),
            "dataset": {"root": to_hex(self.dataset_root), "nbytes": self.dataset_bytes},
            "batch_size": self.batch_size,
            "context": self.context,
            "dtype": self.dtype,
            "optimizer": {"name": self.optimizer, "hyperparameters": dict(self.hyperparameters)},
            "schedule": self.schedule.to_json(),
            "grad_clip": self.grad_clip,
            "checkpoint_every": {
                "min": self.checkpoint_every_min,
                "max": self.checkpoint_every_max,
            },
        }

    @classmethod
    def from_json(cls, obj: Any) -> Assignment:
        check_keys(obj, "assignment", tuple(_JSON_KEYS))
        dataset = get_object(obj, "dataset")
        check_keys(dataset, "assignment.dataset", ("root", "nbytes"))
        optimizer = get_object(obj, "optimizer")
        check_keys(optimizer, "assignment.optimizer", ("name", "hyperparameters"))
        bounds = get_object(obj, "checkpoint_every")
        check_keys(bounds, "assignment.checkpoint_every", ("min", "max"))
        clip = obj["grad_clip"]
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, int | float)):
            raise EncodingError(f"grad_clip: expected a number or null, got {clip!r}")
        return cls(
            version=get_int(obj, "version"),
            model=get_str(obj, "model"),
            model_config=dict(get_object(obj, "model_config")),
            dataset_root=Root(get_bytes(dataset, "root", 32)),
            dataset_bytes=get_int(dataset, "nbytes", minimum=1),
            batch_size=get_int(obj, "batch_size", minimum=1),
            context=get_int(obj, "context", minimum=1),
            dtype=get_str(obj, "dtype"),
            optimizer=get_str(optimizer, "name"),
            hyperparameters=dict(get_object(optimizer, "hyperparameters")),
            schedule=Schedule.from_json(obj["schedule"]),
            grad_clip=None if clip is None else float(clip),
            checkpoint_every_min=get_int(bounds, "min", minimum=1),
            checkpoint_every_max=get_int(bounds, "max", minimum=1),
        )

    def hash(self) -> Hash32:
        """sha256 of the canonical JSON: what run headers and run seeds name."""
        return record_hash(self.to_json())

    def problems(self, header: RunHeader) -> list[str]:
        """Every way ``header`` departs from this assignment (empty: the run is this work)."""
        out: list[str] = []
        mine = self.hash()
        if header.assignment != mine:
            out.append(
                f"trained for assignment {to_hex(header.assignment)}, "
                f"the epoch pays for {to_hex(mine)}"
            )
        expected_seed = run_seed_for(header.pubkey, header.assignment, header.run_id)
        if header.run_seed != expected_seed:
            out.append(f"run seed {header.run_seed} is not the one derived from the peer's key")
        if header.model != self.model:
            out.append(f"model {header.model!r}, assigned {self.model!r}")
        else:
            try:
                config = full_model_config(header.model, header.model_config)
            except (KeyError, ValueError, TypeError) as exc:
                config = {"unreadable": str(exc)}
            for key in sorted(set(config) | set(self.model_config)):
                if config.get(key) != self.model_config.get(key):
                    out.append(
                        f"model {key} {config.get(key)!r}, assigned {self.model_config.get(key)!r}"
                    )
        ds = header.dataset
        if ds is None or (ds.root, ds.nbytes) != (self.dataset_root, self.dataset_bytes):
            held = "none" if ds is None else f"{to_hex(ds.root)} ({ds.nbytes} bytes)"
            out.append(
                f"dataset {held}, assigned {to_hex(self.dataset_root)} ({self.dataset_bytes} bytes)"
            )
        fields: tuple[tuple[str, object, object], ...] = (
            ("batch_size", header.batch_size, self.batch_size),
            ("context", header.context, self.context),
            ("dtype", header.dtype, self.dtype),
            ("optimizer", header.optimizer.name, self.optimizer),
            ("grad_clip", header.grad_clip, self.grad_clip),
        )
        for label, seen, want in fields:
            if seen != want:
                out.append(f"{label} {seen!r}, assigned {want!r}")
        if canonical_json(dict(header.optimizer.defaults)) != canonical_json(
            dict(self.hyperparameters)
        ):
            out.append(
                f"optimizer hyperparameters {dict(header.optimizer.defaults)}, "
                f"assigned {dict(self.hyperparameters)}"
            )
        if any(header.optimizer.overrides):
            out.append(f"param group overrides {list(header.optimizer.overrides)}, assigned none")
        if header.schedule != self.schedule:
            out.append(f"schedule {header.schedule.to_json()}, assigned {self.schedule.to_json()}")
        if not self.checkpoint_every_min <= header.checkpoint_every <= self.checkpoint_every_max:
            out.append(
                f"checkpoint_every {header.checkpoint_every}, assigned "
                f"{self.checkpoint_every_min}..{self.checkpoint_every_max}"
            )
        return out

    def check(self, header: RunHeader) -> None:
        """Raise AssignmentError listing every difference between ``header`` and this work."""
        problems = self.problems(header)
        if problems:
            raise AssignmentError("run is not the assigned work: " + "; ".join(problems))


_JSON_KEYS = (
    "version", "model", "model_config", "dataset", "batch_size", "context", "dtype",
    "optimizer", "schedule", "grad_clip", "checkpoint_every",
)  # fmt: skip


def full_model_config(model: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The model's whole config, defaults filled in (raises on an unknown model or bad field)."""
    parsed: Any = parse_model_config(model, config)
    return dict(dataclasses.asdict(parsed))


def read_assignment(path: str | os.PathLike[str]) -> Assignment:
    """Read an assignment file (canonical or pretty JSON) through the strict untrusted-JSON
    reader (size and depth bounded); AssignmentError saying what is wrong."""
    label = f"assignment {os.fspath(path)}"
    try:
        obj = read_untrusted(path, max_bytes=MAX_ASSIGNMENT_BYTES, what=label)
    except OSError as exc:
        raise AssignmentError(f"cannot read {label}: {exc.strerror}") from None
    except EncodingError as exc:  # the reader's limits and parse errors name the file already
        raise AssignmentError(str(exc)) from None
    try:
        return Assignment.from_json(obj)
    except EncodingError as exc:
        raise AssignmentError(f"{label}: {exc}") from None


def assignment_text(assignment: Assignment) -> str:
    """The file form of ``assignment``: indented JSON, sorted keys (its hash is over canonical JSON,
    so the layout of the file does not matter)."""
    return json.dumps(assignment.to_json(), indent=2, sort_keys=True) + "\n"

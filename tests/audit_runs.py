"""Runs for the auditor's tests, made by the REAL reference trainer (trainer.loop.train).

Dishonest runs are the same trainer with one deliberate change: ``AuditHook.step`` (or
``end_step``) is wrapped so that, on chosen steps, the gradient is modified before it is committed
and applied, exactly what a cheating peer running our hook would do. Runs are built once per test
session (cached by name) in a temporary folder.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from proofs.signatures import KeyPair, keypair_from_seed
from trainer.checkpoint import decode_checkpoint
from trainer.data import Corpus
from trainer.hook import AuditHook
from trainer.loop import TrainConfig, train
from trainer.store import RunStore

PEER = keypair_from_seed(b"audit-tests-peer-key-seed-000001")
OTHER_PEER = keypair_from_seed(b"audit-tests-other-peer-seed-0002")
AUDITOR = keypair_from_seed(b"audit-tests-auditor-key-seed-003")
AUDITOR2 = keypair_from_seed(b"audit-tests-auditor-key-seed-004")
MODEL = {"n_layer": 1, "n_head": 2, "d_model": 32, "context": 16, "dropout": 0.1}
BATCH = 4
CHUNK = 2048  # small leaves, so one tensor spans several and chunk sampling means something

Tamper = Callable[[int, nn.Module], None]


@functools.cache
def workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="audit-tests-"))
    atexit.register(shutil.rmtree, path, True)
    return path


@functools.cache
def corpus() -> Corpus:
    return Corpus.from_paths([os.path.join(sysconfig.get_paths()["stdlib"], "json")])


def config(name: str, *, steps: int, every: int, threads: int | None = None):  # type: ignore[no-untyped-def]
    return TrainConfig(
        run_id=name,
        steps=steps,
        batch_size=BATCH,
        model_config=MODEL,
        checkpoint_every=every,
        chunk_size=CHUNK,
        warmup_steps=2,
        threads=threads,
    )


@contextmanager
def _patched(method: str, before: Callable[[AuditHook], None]) -> Iterator[None]:
    original = getattr(AuditHook, method)

    def wrapper(self: AuditHook, *args: Any, **kwargs: Any) -> Any:
        before(self)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AuditHook, method, wrapper)
        yield


_RUNS: dict[str, str] = {}


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch threads. Tests use 1: on the shared 2-core machine a second thread
    made a backward pass of the tiny model 20x slower (1.5 ms vs 30 ms)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def make_run(
    name: str,
    *,
    steps: int = 6,
    every: int = 3,
    threads: int | None = 1,
    tamper: Tamper | None = None,
    tamper_state: Tamper | None = None,
    keypair: KeyPair = PEER,
) -> str:
    """Train (once per session) and return the store URL of run ``name``.

    ``tamper(step, model)`` runs after backward and before the commit of every step;
    ``tamper_state(next_step, model)`` runs after the optimizer step, before a state checkpoint.
    """
    if name in _RUNS:
        return _RUNS[name]
    url = str(workdir() / name)
    cfg = config(name, steps=steps, every=every, threads=threads)
    saved = torch.get_num_threads()
    try:
        if tamper is not None:
            with _patched("step", lambda hook: tamper(hook.next_step, hook.model)):
                train(cfg, url, keypair, corpus=corpus())
        elif tamper_state is not None:
            with _patched("end_step", lambda hook: tamper_state(hook.next_step + 1, hook.model)):
                train(cfg, url, keypair, corpus=corpus())
        else:
            train(cfg, url, keypair, corpus=corpus())
    finally:
        torch.set_num_threads(saved)
    _RUNS[name] = url
    return url


def copy_run(url: str, name: str) -> str:
    """A private copy of a stored run (for tests that damage it)."""
    dest = workdir() / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(url, dest)
    return str(dest)


def stored_gradient(url: str, step: int) -> dict[str, torch.Tensor]:
    """The gradient a stored run committed at ``step`` (read through the trainer's store API)."""
    store = RunStore(url)
    for w in store.manifest_windows():
        for record in store.read_manifest(w).manifest.records:
            if record.step == step:
                _, leaves = store.read_artifact(record.grad_root)
                return decode_checkpoint(leaves)
    raise KeyError(step)


def set_grads(model: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        p.grad = grads[name].clone().to(p.device)


def rewrite_gradient(
    src: str, name: str, step: int, grads: dict[str, torch.Tensor], keypair: KeyPair = PEER
) -> str:
    """A copy of run ``src`` whose step ``step`` commits ``grads`` instead, written with the
    trainer's own encoder and store, hash chain rebuilt and every later manifest re-signed by
    ``keypair``: a peer lying consistently about one stored gradient."""
    from dataclasses import replace

    from proofs.codec import canonical_json
    from trainer.checkpoint import encode_checkpoint
    from trainer.manifest import sign_manifest
    from trainer.store import manifest_name

    url = copy_run(src, name)
    store = RunStore(url)
    header = store.read_header().header
    encoded = encode_checkpoint(grads, chunk_size=header.chunk_size)
    store.put_object(encoded.root, encoded.payload)
    prev_manifest = prev_record = header.hash()
    touched = False
    for w in store.manifest_windows():
        manifest = store.read_manifest(w).manifest
        records = []
        for record in manifest.records:
            if record.step == step:
                touched = True
                record = replace(
                    record,
                    grad_root=encoded.root,
                    grad_leaves=encoded.index.leaf_count,
                    grad_bytes=sum(encoded.index.lengths),
                )
            record = replace(record, prev=prev_record)
            prev_record = record.hash()
            records.append(record)
        manifest = replace(manifest, records=tuple(records), prev=prev_manifest)
        prev_manifest = manifest.hash()
        if touched:
            signed = sign_manifest(keypair, manifest)
            data = canonical_json(signed.to_json())
            store.put_bytes(manifest_name(w), data, exclusive=False)
    return url

"""Test helpers for shared runs: a tiny genesis, real inner runs, signed contributions.

Contributions are built without the peer module: the inner run is a real AuditHook run of the
genesis's H steps from theta_r under the peer's key (so its header is what screening checks),
and the payload is whatever delta the test gives (an honest one by default: theta_r - theta_H
through one error-feedback step). Hostile tests sign their own bad records and payloads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from proofs.codec import canonical_json
from proofs.hashing import Hash32, sha256
from proofs.signatures import KeyPair, keypair_from_seed
from trainer.checkpoint import encode_checkpoint
from trainer.compression import (
    SparseDelta,
    compress,
    encode_payload,
    error_feedback_step,
    total_entries,
)
from trainer.contribution import Contribution, SignedContribution
from trainer.data import Corpus
from trainer.globalstate import flatten, initial_model, load_flat, theta_artifact
from trainer.hook import AuditHook, HookConfig
from trainer.innerrun import build_inner_optimizer
from trainer.models import GPT_NAME
from trainer.recipe import SignedRunHeader
from trainer.schedule import Schedule
from trainer.sharedrun import (
    SHARED_VERSION,
    ZERO32,
    Genesis,
    OuterRule,
    Screening,
    SignedGenesis,
    inner_run_id,
)
from trainer.sharedstore import SharedStore

RUN_ID = "test-shared"
MODEL_CONFIG = {"n_layer": 1, "n_head": 2, "d_model": 32, "context": 16, "dropout": 0.0}
CORPUS_TEXT = b"".join(
    f"def f{i}(x):\n    return x * {i} + {i * i} - len('abc{i}')\n".encode() for i in range(400)
)


def key(label: str) -> KeyPair:
    """A deterministic key pair per label."""
    return keypair_from_seed(sha256(label.encode()))


def write_corpus(folder: Path) -> Corpus:
    """The test corpus as a file (its path is the genesis dataset's source)."""
    path = folder / "corpus.py"
    path.write_bytes(CORPUS_TEXT)
    return Corpus.from_paths([path])


def build_genesis(
    corpus: Corpus,
    peers: Mapping[str, KeyPair],
    *,
    coordinator: KeyPair,
    aggregator: KeyPair,
    screening: Mapping[str, Any] | None = None,
    outer: Mapping[str, Any] | None = None,
    rounds: int = 0,
    inner_steps: int = 2,
) -> Genesis:
    """A tiny genesis (1-layer GPT, d_model 32, context 16) with its real initial root."""
    base = Genesis(
        version=SHARED_VERSION,
        shared_run_id=RUN_ID,
        model=GPT_NAME,
        model_config=dict(MODEL_CONFIG),
        init_seed=7,
        initial_root=ZERO32,
        optimizer="AdamW",
        hyperparameters={"weight_decay": 0.0},
        inner_lr=1e-2,
        grad_clip=1.0,
        inner_steps=inner_steps,
        batch_size=2,
        context=MODEL_CONFIG["context"],
        dataset=corpus.commitment(),
        checkpoint_every=inner_steps,
        chunk_size=4096,
        outer=OuterRule(
            **{"beta": 0.9, "chunk": 512, "topk": 32, "quantization": "int8", "alpha": 1.0}
            | dict(outer or {})
        ),
        screening=Screening(
            **{
                "norm_factor": 3.0,
                "probe": False,
                "probe_batch": 4,
                "probe_margin": 0.05,
                "min_contributions": 1,
                "max_contributions": len(peers),
                "deadline_s": 3600.0,
            }
            | dict(screening or {})
        ),
        rounds=rounds,
        coordinator=bytes(coordinator.public),
        aggregator=bytes(aggregator.public),
        peers={name: bytes(kp.public) for name, kp in peers.items()},
    )
    root = theta_artifact(initial_model(base), base.chunk_size).root
    return dataclasses.replace(base, initial_root=Hash32(root))


@dataclass
class Run:
    """A shared run in a temp folder: store, keys, genesis, corpus."""

    path: Path
    store: SharedStore
    genesis: Genesis
    corpus: Corpus
    coordinator: KeyPair
    aggregator: KeyPair
    peers: dict[str, KeyPair]
    headers: dict[tuple[str, int], SignedRunHeader] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(flatten(initial_model(self.genesis)).numel())


def make_run(
    tmp: Path,
    *,
    peers: int = 3,
    screening: Mapping[str, Any] | None = None,
    outer: Mapping[str, Any] | None = None,
    rounds: int = 0,
) -> Run:
    """A fresh shared store with a signed genesis and ``peers`` roster peers p0, p1, ..."""
    tmp.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(tmp)
    keys = {f"p{i}": key(f"peer-{i}") for i in range(peers)}
    coordinator, aggregator = key("coordinator"), key("aggregator")
    genesis = build_genesis(
        corpus,
        keys,
        coordinator=coordinator,
        aggregator=aggregator,
        screening=screening,
        outer=outer,
        rounds=rounds,
    )
    store = SharedStore(tmp / "store")
    store.put_genesis(SignedGenesis.sign(coordinator, genesis))
    # theta_0 in the store, as the coordinator publishes it: rebuilding it from the genesis is
    # not bitwise portable (torch's normal_ rounds differently under ATEN_CPU_CAPABILITY=default).
    encoded = theta_artifact(initial_model(genesis), genesis.chunk_size)
    store.put_object(encoded.root, encoded.parts)
    # theta_0 in the store, as the coordinator publishes it: rebuilding it from the genesis is
    # not bitwise portable (torch's normal_ rounds differently under ATEN_CPU_CAPABILITY=default).
    encoded = theta_artifact(initial_model(genesis), genesis.chunk_size)
    store.put_object(encoded.root, encoded.parts)
    return Run(
        path=tmp,
        store=store,
        genesis=genesis,
        corpus=corpus,
        coordinator=coordinator,
        aggregator=aggregator,
        peers=keys,
    )


def theta(run: Run, r: int) -> torch.Tensor:
    """theta_r as the store holds it (theta_0 rebuilt from the genesis)."""
    model = initial_model(run.genesis)
    if r == 0:
        return flatten(model)
    return run.store.read_theta(run.store.read_round(r - 1).round.new_root, model)


def inner_run(run: Run, peer: str, r: int, *, keypair: KeyPair | None = None) -> torch.Tensor:
    """Run the genesis's H inner steps of ``peer`` in round ``r`` from theta_r through a real
    AuditHook into the peer's inner store; returns theta_H (flat). The header is kept in
    ``run.headers``."""
    g = run.genesis
    kp = keypair or run.peers[peer]
    model = initial_model(g)
    load_flat(model, theta(run, r))
    optimizer = build_inner_optimizer(g, model)
    hook = AuditHook(
        model,
        optimizer,
        store=run.store.inner_store(peer, r),
        keypair=kp,
        config=HookConfig(
            run_id=inner_run_id(g.shared_run_id, r),
            assignment=g.hash(),
            schedule=Schedule.constant(g.inner_lr),
            checkpoint_every=g.checkpoint_every,
            chunk_size=g.chunk_size,
            grad_clip=g.grad_clip,
            sign_in_subprocess=False,
            model_name=g.model,
            model_config=dict(g.model_config),
            dataset=g.dataset,
            batch_size=g.batch_size,
            context=g.context,
        ),
    )
    with hook:
        start = hook.start()
        model.train()
        for step in range(start, g.inner_steps):
            hook.begin_step(step)
            batch = run.corpus.batch_for_step(
                hook.run_seed, step, batch_size=g.batch_size, context=g.context
            )
            _, loss = model(batch.inputs, batch.targets)
            assert loss is not None
            loss.backward()
            hook.step(loss, batch=batch.offsets)
    run.headers[(peer, r)] = run.store.inner_store(peer, r).read_header()
    return flatten(model)


def honest_delta(run: Run, peer: str, r: int) -> SparseDelta:
    """theta_r - theta_H of a real inner run, through one error-feedback step (fresh e)."""
    theta_h = inner_run(run, peer, r)
    delta = theta(run, r) - theta_h
    o = run.genesis.outer
    d, _ = error_feedback_step(
        torch.zeros_like(delta),
        delta,
        beta=o.beta,
        chunk=o.chunk,
        topk=o.topk,
        quantization=o.quantization,
    )
    return d


def random_delta(run: Run, *, scale: float = 1e-3, seed: int = 0) -> SparseDelta:
    """Top-k of a random vector of the model's size (a plausible-norm contribution)."""
    gen = torch.Generator().manual_seed(seed)
    e = torch.randn(run.size, generator=gen, dtype=torch.float32) * scale
    o = run.genesis.outer
    return compress(e, chunk=o.chunk, topk=o.topk, quantization=o.quantization)


def contribution(
    run: Run,
    peer: str,
    r: int,
    payload: bytes,
    *,
    nnz: int | None = None,
    keypair: KeyPair | None = None,
    **overrides: Any,
) -> SignedContribution:
    """A contribution record over ``payload`` signed by ``keypair`` (the peer's by default);
    its inner run (run once per peer and round) must exist: call :func:`inner_run` first or
    let this run it. ``overrides`` replace record fields (hostile records)."""
    if (peer, r) not in run.headers:
        inner_run(run, peer, r)
    kp = keypair or run.peers[peer]
    header = run.headers[(peer, r)]
    o = run.genesis.outer
    manifests = run.store.inner_store(peer, r).read_manifests()
    fields: dict[str, Any] = {
        "version": SHARED_VERSION,
        "shared_run_id": run.genesis.shared_run_id,
        "genesis": run.genesis.hash(),
        "round": r,
        "peer": peer,
        "pubkey": bytes(kp.public),
        "base_root": run_roots(run)[r],
        "prev_contribution": ZERO32,
        "prev_local_state": ZERO32,
        "inner_header": header.header.hash(),
        "inner_manifest": manifests[-1].manifest.hash() if manifests else ZERO32,
        "final_state": ZERO32,
        "delta": sha256(payload),
        "payload_bytes": len(payload),
        "nnz": total_entries(run.size, o.chunk, o.topk) if nnz is None else nnz,
        "local_state": encode_checkpoint({"ef": torch.zeros(1)}, chunk_size=64).root,
        "losses": (1.0,) * run.genesis.inner_steps,
    }
    fields.update(overrides)
    return SignedContribution.sign(kp, Contribution(**fields))


def run_roots(run: Run) -> list[Hash32]:
    """Roots of theta_0 .. theta_{closed rounds}."""
    roots = [run.genesis.initial_root]
    for r in run.store.rounds():
        roots.append(run.store.read_round(r).round.new_root)
    return roots


def publish(
    run: Run,
    peer: str,
    r: int,
    *,
    d: SparseDelta | None = None,
    payload: bytes | None = None,
    **overrides: Any,
) -> SignedContribution:
    """Sign and write a contribution of ``peer`` for round ``r`` (an honest one by default)."""
    if payload is None:
        payload = encode_payload(d if d is not None else honest_delta(run, peer, r))
    signed = contribution(run, peer, r, payload, **overrides)
    run.store.put_contribution(signed, payload)
    return signed


def write_raw(run: Run, folder: str, name: str, data: bytes) -> None:
    """Write bytes under contributions/<folder>/<name>, bypassing every check."""
    path = run.path / "store" / "contributions" / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def record_bytes(signed: SignedContribution) -> bytes:
    return canonical_json(signed.to_json())

"""A peer's shared-run round with hook and compression vs the same inner loop without them.

"round": ``trainer.peer.run_round`` end to end: read and verify theta_r, H inner steps through
the AuditHook (every gradient committed, signed manifests), delta, error feedback, top-k and int8
compression, theta_H and local-state artifacts, payload and signed contribution record.
"plain": the same model loaded with theta_r, the same optimizer and the same H steps on the same
batches (replay seeds and learning rate set as the hook sets them), nothing committed.

"hook only": the same H steps through the AuditHook with no round around them (what a solo run
pays), to show which part of the overhead is the shared round's own.

Prints the median wall-time ratios round/plain (issue #15 target: <= 1.15x) and hook only/plain
over interleaved repeats, the contribution's size against the dense float32 delta, and the load
average.

    .venv/bin/python benchmarks/shared_round.py [--inner-steps 20] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from proofs.hashing import Hash32
from proofs.signatures import keypair_from_seed
from trainer.data import Corpus
from trainer.globalstate import initial_model, theta_artifact
from trainer.hook import AuditHook, HookConfig
from trainer.innerrun import build_inner_optimizer
from trainer.loop import configure_determinism
from trainer.peer import run_round
from trainer.schedule import Schedule
from trainer.seeds import replay_seed, run_seed_for, seed_generators
from trainer.sharedrun import (
    SHARED_VERSION,
    Genesis,
    OuterRule,
    Screening,
    SignedGenesis,
    inner_run_id,
)
from trainer.sharedstore import SharedStore

COORDINATOR = keypair_from_seed(b"benchmark-shared-round-coordinator")
PEER = keypair_from_seed(b"benchmark-shared-round-peer-key-01")
MODEL_CONFIG = {"n_layer": 2, "n_head": 4, "d_model": 128, "context": 64, "dropout": 0.1,
                "vocab_size": 256}  # fmt: skip


def make_genesis(corpus: Corpus, inner_steps: int) -> Genesis:
    """The CLI's defaults (reference GPT, AdamW, H steps, SparseLoCo outer rule), one peer."""
    draft = Genesis(
        version=SHARED_VERSION, shared_run_id="bench-shared", model="gpt-bytes",
        model_config=MODEL_CONFIG, init_seed=0, initial_root=Hash32(bytes(32)), optimizer="AdamW",
        hyperparameters={"betas": [0.9, 0.95], "weight_decay": 0.1}, inner_lr=3e-3, grad_clip=1.0,
        inner_steps=inner_steps, batch_size=8, context=64, dataset=corpus.commitment(),
        checkpoint_every=inner_steps, chunk_size=1 << 16,
        outer=OuterRule(beta=0.95, chunk=4096, topk=64, quantization="int8", alpha=1.0),
        screening=Screening(norm_factor=3.0, probe=True, probe_batch=8, probe_margin=0.05,
                            min_contributions=1, max_contributions=1, deadline_s=600.0),
        rounds=0, coordinator=bytes(COORDINATOR.public), aggregator=bytes(COORDINATOR.public),
        peers={"peer": bytes(PEER.public)},
    )  # fmt: skip
    root = theta_artifact(initial_model(draft), draft.chunk_size).root
    return dataclasses.replace(draft, initial_root=Hash32(root))


def pristine_store(folder: Path, genesis: Genesis) -> None:
    store = SharedStore(str(folder))
    theta0 = theta_artifact(initial_model(genesis), genesis.chunk_size)
    store.put_object(theta0.root, theta0.parts)
    store.put_genesis(SignedGenesis.sign(COORDINATOR, genesis))


def plain(genesis: Genesis, corpus: Corpus) -> float:
    """The inner loop alone: theta_0 loaded, H optimizer steps on the peer's own batches."""
    start = time.perf_counter()
    model = initial_model(genesis)
    optimizer = build_inner_optimizer(genesis, model)
    run_seed = run_seed_for(bytes(PEER.public), genesis.hash(), inner_run_id("bench-shared", 0))
    model.train()
    for step in range(genesis.inner_steps):
        seed_generators(replay_seed(run_seed, step))  # what begin_step does
        for group in optimizer.param_groups:
            group["lr"] = genesis.inner_lr
        batch = corpus.batch_for_step(run_seed, step, batch_size=8, context=64)
        _, loss = model(batch.inputs, batch.targets)
        assert loss is not None
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def hook_only(folder: Path, genesis: Genesis, corpus: Corpus) -> float:
    """The inner loop through the AuditHook alone (what a solo run pays), no round around it."""
    start = time.perf_counter()
    model = initial_model(genesis)
    optimizer = build_inner_optimizer(genesis, model)
    hook = AuditHook(
        model, optimizer, store=str(folder), keypair=PEER,
        config=HookConfig(
            run_id=inner_run_id("bench-shared", 0), assignment=genesis.hash(),
            schedule=Schedule.constant(genesis.inner_lr), checkpoint_every=genesis.inner_steps,
            grad_clip=1.0, model_name="gpt-bytes", model_config=MODEL_CONFIG,
            dataset=genesis.dataset, batch_size=8, context=64,
        ),
    )  # fmt: skip
    with hook:
        hook.start()
        model.train()
        for step in range(genesis.inner_steps):
            hook.begin_step(step)
            batch = corpus.batch_for_step(hook.run_seed, step, batch_size=8, context=64)
            _, loss = model(batch.inputs, batch.targets)
            assert loss is not None
            loss.backward()
            hook.step(loss, batch=batch.offsets)
    return time.perf_counter() - start


def hooked(
    folder: Path, genesis: Genesis, corpus: Corpus, threads: int | None
) -> tuple[float, int]:
    """``run_round`` end to end; returns (seconds, payload bytes)."""
    start = time.perf_counter()
    result = run_round(SharedStore(str(folder)), genesis, PEER, "peer", 0, corpus=corpus,
                       threads=threads)  # fmt: skip
    seconds = time.perf_counter() - start
    assert result.contribution is not None
    return seconds, result.contribution.record.payload_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inner-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="default: the trainer's")
    args = parser.parse_args()
    configure_determinism(args.threads)
    corpus = Corpus.stdlib()
    genesis = make_genesis(corpus, args.inner_steps)
    tmp = Path(tempfile.mkdtemp(prefix="veritrain-shared-bench-"))
    try:
        pristine_store(tmp / "pristine", genesis)
        plain(genesis, corpus)  # warm-up (allocator, kernels)
        ratios, hook_ratios, plain_s, hook_s, hooked_s, sizes = [], [], [], [], [], []
        for rep in range(args.repeats):
            folder = Path(shutil.copytree(tmp / "pristine", tmp / f"rep{rep}"))
            # Rotate the order so drift in background load cancels out.
            kinds = ("plain", "hook", "round")[rep % 3 :] + ("plain", "hook", "round")[: rep % 3]
            for kind in kinds:
                if kind == "plain":
                    a = plain(genesis, corpus)
                elif kind == "hook":
                    h = hook_only(tmp / f"solo{rep}", genesis, corpus)
                else:
                    b, size = hooked(folder, genesis, corpus, args.threads)
            shutil.rmtree(folder)
            shutil.rmtree(tmp / f"solo{rep}")
            plain_s.append(a)
            hook_s.append(h)
            hooked_s.append(b)
            sizes.append(size)
            ratios.append(b / a)
            hook_ratios.append(h / a)
    finally:
        shutil.rmtree(tmp)
    n = sum(p.numel() for p in initial_model(genesis).parameters())
    load = os.getloadavg()
    print(f"config: GPT 2x128 ({n} parameters), context 64, batch 8, H={args.inner_steps}, "
          f"chunk 4096, top-64, int8, {torch.get_num_threads()} threads")  # fmt: skip
    for label, runs in (("plain    ", plain_s), ("hook only", hook_s), ("round    ", hooked_s)):
        print(f"{label} median {statistics.median(runs):.3f} s")
    for label, values, note in (
        ("hook only/plain", hook_ratios, "the solo-run hook's share"),
        ("round/plain", ratios, "target <= 1.15"),
    ):
        listed = ", ".join(f"{r:.3f}" for r in values)
        print(f"ratio {label}: median {statistics.median(values):.3f} (all: {listed}; {note})")
    print(f"contribution: {sizes[0]} bytes = {100 * sizes[0] / (4 * n):.2f} % of the dense "
          f"float32 delta ({4 * n} bytes)")  # fmt: skip
    print(f"load average (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()

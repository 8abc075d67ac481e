"""Hook overhead: the same training (same seeds, same steps) with and without the AuditHook.

Prints the median wall-time ratio (hooked / plain) over interleaved repeats, bytes written per
step, and where the hooked run's extra time goes on the training thread (gradient copy + enqueue
in ``commit``, state capture in ``end_step``, waiting in ``close``) versus compute slowed down by
the background committer competing for the cores.

    .venv/bin/python benchmarks/hook_overhead.py [--steps 100] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from proofs.signatures import keypair_from_seed
from trainer.data import Corpus
from trainer.hook import AuditHook, HookConfig
from trainer.loop import TrainConfig, configure_determinism
from trainer.models import GPT_NAME, build_model
from trainer.seeds import init_seed, replay_seed, seed_generators

KEY = keypair_from_seed(b"benchmark-hook-overhead-key-seed-01")
PUBKEY = bytes(KEY.public)


def make(config: TrainConfig) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    seed_generators(init_seed(config.run_seed(PUBKEY)))
    model = build_model(GPT_NAME, {})
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95))
    return model, optimizer


def plain(config: TrainConfig, corpus: Corpus, times: dict[str, float]) -> float:
    model, optimizer = make(config)
    run_seed, schedule = config.run_seed(PUBKEY), config.schedule
    start = time.perf_counter()
    for step in range(config.steps):
        seed_generators(replay_seed(run_seed, step))  # what begin_step does
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step)
        batch = corpus.batch_for_step(run_seed, step, batch_size=8, context=64)
        t = time.perf_counter()
        _, loss = model(batch.inputs, batch.targets)
        assert loss is not None
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times["compute"] += time.perf_counter() - t
    return time.perf_counter() - start


def hooked(config: TrainConfig, corpus: Corpus, store: Path, times: dict[str, float]) -> float:
    model, optimizer = make(config)
    hook = AuditHook(
        model,
        optimizer,
        store=str(store),
        keypair=KEY,
        config=HookConfig(
            run_id=config.run_id,
            schedule=config.schedule,
            checkpoint_every=config.checkpoint_every,
            grad_clip=1.0,
            model_name=GPT_NAME,
            dataset=corpus.commitment(),
            batch_size=8,
            context=64,
        ),
    )
    start = time.perf_counter()
    t = time.perf_counter()
    hook.start()
    times["start (header, initial state)"] += time.perf_counter() - t
    for step in range(config.steps):
        hook.begin_step(step)  # replay seed and the schedule's lr
        batch = corpus.batch_for_step(hook.run_seed, step, batch_size=8, context=64)
        t = time.perf_counter()
        _, loss = model(batch.inputs, batch.targets)
        assert loss is not None
        loss.backward()
        t1 = time.perf_counter()
        hook.commit(loss, batch=batch.offsets)
        t2 = time.perf_counter()
        hook.clip()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        hook.end_step()
        t4 = time.perf_counter()
        times["compute"] += (t1 - t) + (t3 - t2)
        times["commit (grad copy + enqueue)"] += t2 - t1
        times["end_step (state capture)"] += t4 - t3
    t = time.perf_counter()
    hook.close()
    times["close (drain + last window)"] += time.perf_counter() - t
    return time.perf_counter() - start


def cpu_seconds() -> float:
    """CPU time of this process (every thread) plus its reaped children (the signer process)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="default: the trainer's")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    args = parser.parse_args()
    configure_determinism(args.threads)
    corpus = Corpus.stdlib()
    config = TrainConfig(run_id="bench", steps=args.steps, checkpoint_every=args.checkpoint_every)
    ratios, plain_s, hooked_s, written, cpu_ratios = [], [], [], [], []
    t_plain: dict[str, float] = defaultdict(float)
    t_hook: dict[str, float] = defaultdict(float)
    plain(TrainConfig(run_id="warm", steps=5), corpus, defaultdict(float))  # warm-up
    for rep in range(args.repeats):
        tmp = Path(tempfile.mkdtemp(prefix="veritrain-bench-"))
        try:
            # Alternate the order (AB, BA, ...) so drift in background load cancels out.
            cpu: dict[str, float] = {}
            for kind in ("plain", "hooked") if rep % 2 == 0 else ("hooked", "plain"):
                c0 = cpu_seconds()
                if kind == "plain":
                    a = plain(config, corpus, t_plain)
                else:
                    b = hooked(config, corpus, tmp / "run", t_hook)
                cpu[kind] = cpu_seconds() - c0
            cpu_ratios.append(cpu["hooked"] / cpu["plain"])
            written.append(sum(p.stat().st_size for p in (tmp / "run").rglob("*") if p.is_file()))
        finally:
            shutil.rmtree(tmp)
        plain_s.append(a)
        hooked_s.append(b)
        ratios.append(b / a)
    n = args.repeats * args.steps
    print(
        f"config: GPT 2x128, context 64, batch 8, {args.steps} steps, "
        f"checkpoint every {args.checkpoint_every}, {torch.get_num_threads()} threads"
    )
    for label, runs in (("plain ", plain_s), ("hooked", hooked_s)):
        med = statistics.median(runs)
        print(f"{label} median {med:.3f} s ({args.steps / med:.1f} steps/s)")
    print(
        f"ratio hooked/plain: median {statistics.median(ratios):.3f} "
        f"(all: {', '.join(f'{r:.3f}' for r in ratios)})"
    )
    print(
        f"CPU-time ratio hooked/plain (all threads + signer process): median "
        f"{statistics.median(cpu_ratios):.3f} (all: {', '.join(f'{r:.3f}' for r in cpu_ratios)})"
    )
    print(f"bytes written per step: {statistics.median(written) / args.steps / 1e6:.2f} MB")
    print("per-step time on the training thread (ms, mean over all repeats):")
    print(f"  plain  compute {1e3 * t_plain['compute'] / n:.2f}")
    for name, total in t_hook.items():
        print(f"  hooked {name} {1e3 * total / n:.2f}")


if __name__ == "__main__":
    main()

"""Auditor cost per sampled step vs the trainer's cost per step, bytes fetched, calibrated noise,
and detection tables. Everything is measured in this run, on this machine, with one torch thread.

    .venv/bin/python benchmarks/audit_cost.py [--steps 48] [--every 8] [--repeats 3]
        [--model reference|quick|medium] [--batch 8]

``--model``: ``reference`` (default) is the reference GPT at the defaults of ``rewards assign``
(2 layers, d_model 128, context 64); ``quick`` (also ``--quick``) a tiny one for a smoke test;
``medium`` a 31.9M-parameter GPT (10 layers, d_model 512, 8 heads, context 256), where forward and
backward dominate the step. A medium step is ~400 GFLOP at batch 8: seconds on a GPU run (train
and audit pick cuda when present), minutes a step on this 2-core CPU, so measure it on a GPU, e.g.
``--model medium --steps 16 --every 4 --repeats 1``; ``--row default`` (repeatable) times only
the rows named.

The auditor's cost of a sample is the wall time of a fresh ``StepAuditor`` auditing every step of
it (so it includes fetching and verifying every artifact, replay, the tolerant mode's calibration,
the chain check and usefulness, whatever the row turns on), divided by the number of sampled steps:
an amortized figure, not the median step, because steps of one window share their fetched and
replayed window. Three samples per row:

* ``all``: every step (the most sharing);
* ``beacon``: what ``audit run`` draws for ``--cheat-fraction 0.25 --confidence 0.99`` (the demo);
* ``1/window``: one step in each state-checkpoint window (no sharing at all: the worst case).

Ratios pair each audit with a training run of the same recipe timed just before it (its median
step, audit hook included): this machine's speed drifts by 30-50 % within minutes, which a trainer
timed once at the start would put into the ratios. Each cell is the median of its pairs' ratios.
Not included: ``load_run`` (two BLS verifications per run) and signing each verdict, printed apart.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import statistics
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from audit.chunks import chunk_detection_probability
from audit.fetch import VerifiedRun, load_run
from audit.reexec import ReexecConfig, StepAuditor
from audit.sampling import detection_probability, plan_sample, sample_size_for
from audit.tolerance import Mode
from audit.verdict import sign_verdict
from proofs import bls
from proofs.hashing import Hash32
from proofs.signatures import keypair_from_seed
from trainer.data import Corpus
from trainer.loop import TrainConfig, configure_determinism, make_optimizer, pick_device, train
from trainer.models import build_model
from trainer.seeds import init_seed, replay_seed, seed_generators
from trainer.store import RunStore

KEY = keypair_from_seed(b"b" * 32)
"""The trainer's key: with the run id it derives the run seed of every timed run."""

ROWS = {  # --row name: (label, auditor settings)
    "exact": ("exact, chain check", ReexecConfig(mode=Mode.EXACT, usefulness=False)),
    "tolerant": ("tolerant, chain check", ReexecConfig(mode=Mode.TOLERANT, usefulness=False)),
    "default": ("tolerant, chain + usefulness (default)", ReexecConfig(mode=Mode.TOLERANT)),
    "no-chain": (
        "exact, no chain check",
        ReexecConfig(mode=Mode.EXACT, check_chain=False, usefulness=False),
    ),
    "chunks": (
        "exact, chunks 10%",
        ReexecConfig(mode=Mode.EXACT, chunk_fraction=0.1, usefulness=False),
    ),
}


MODELS: dict[str, dict[str, float]] = {
    "reference": {"n_layer": 2, "n_head": 4, "d_model": 128, "context": 64, "dropout": 0.1},
    "quick": {"n_layer": 1, "n_head": 2, "d_model": 32, "context": 16, "dropout": 0.1},
    "medium": {"n_layer": 10, "n_head": 8, "d_model": 512, "context": 256, "dropout": 0.1},
}
BATCH = {"size": 8}  # --batch: the batch of every run this benchmark trains


def _train(path: Path, corpus: Corpus, steps: int, every: int, model: dict[str, float]) -> float:
    stamps: list[float] = []
    cfg = TrainConfig(
        run_id="bench", steps=steps, batch_size=BATCH["size"], model_config=model,
        checkpoint_every=every, threads=1, warmup_steps=2,
    )  # fmt: skip
    stamps.append(time.perf_counter())
    train(cfg, str(path), KEY, corpus=corpus,
          on_step=lambda s, st: stamps.append(time.perf_counter()))  # fmt: skip
    return statistics.median(b - a for a, b in itertools.pairwise(stamps))


def _bare(corpus: Corpus, steps: int, model: dict[str, float]) -> float:
    """Median step of the same training loop without the audit hook (nothing committed)."""
    cfg = TrainConfig(run_id="bench", steps=steps, batch_size=BATCH["size"], model_config=model,
                      threads=1, warmup_steps=2)  # fmt: skip
    configure_determinism(cfg.threads)
    run_seed, schedule = cfg.run_seed(bytes(KEY.public)), cfg.schedule
    seed_generators(init_seed(run_seed))
    device = pick_device(cfg.device)  # where train() runs the same recipe
    net = build_model(cfg.model, cfg.model_config).to(device)
    opt = make_optimizer(cfg, net)
    net.train()
    times = []
    for step in range(steps):
        t = time.perf_counter()
        seed_generators(replay_seed(run_seed, step))  # as the hook's begin_step does
        for group in opt.param_groups:
            group["lr"] = schedule.lr_at(step)
        batch = corpus.batch_for_step(
            run_seed, step, batch_size=cfg.batch_size, context=cfg.context
        )
        _, loss = net(batch.inputs.to(device), batch.targets.to(device))
        assert loss is not None
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip or math.inf)
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()  # the step's kernels finished, as train()'s hook waits
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def samples(run: VerifiedRun, every: int) -> dict[str, list[int]]:
    plan = plan_sample(
        beacon=b"\x42" * 32, manifest_hash=run.final_hash, auditor_pubkey=b"\x01" * 48,
        total_steps=run.total_steps, cheat_fraction=0.25, confidence=0.99,
    )  # fmt: skip
    rng = random.Random(7)
    windows = range(0, run.total_steps, every)
    return {
        "all": list(range(run.total_steps)),
        "beacon": list(plan.steps),
        "1/window": [rng.randrange(c, min(c + every, run.total_steps)) for c in windows],
    }


def audit_sample(
    store: RunStore, run: VerifiedRun, corpus: Corpus, cfg: ReexecConfig, steps: list[int]
) -> tuple[float, float, int, StepAuditor]:
    """(seconds per step, bytes fetched per step, steps passed, the auditor) for one sample."""
    t = time.perf_counter()
    fetched, passed = 0, 0
    with StepAuditor(store, run, corpus, cfg, sample_seed=b"\x07" * 32) as auditor:
        auditor.expect(steps)  # as audit.jobs does with its sample
        for s in steps:
            r = auditor.audit(s)
            fetched += r.bytes_fetched
            passed += r.passed
    return (time.perf_counter() - t) / len(steps), fetched / len(steps), passed, auditor


Trainer = Callable[[], float]  # trains a fresh run of the recipe, returns its median step


def cost_table(
    store: RunStore, corpus: Corpus, trainer: Trainer, every: int, repeats: int, rows: list[str]
) -> tuple[StepAuditor | None, list[float]]:
    """Print the table; returns a tolerant auditor and every paired trainer step time."""
    run = load_run(store, check_signatures=False)
    picks = samples(run, every)
    print("sample sizes: " + ", ".join(f"{k} {len(v)}" for k, v in picks.items()))
    print(f"{'auditor / trainer step':40}" + "".join(f"{k:>18}" for k in picks) + "   KiB/step")
    tolerant, train_steps = None, []
    for label, cfg in (ROWS[name] for name in rows):
        cells, kib = [], []
        for steps in picks.values():
            pairs = [(trainer(), audit_sample(store, run, corpus, cfg, steps))
                     for _ in range(repeats)]  # fmt: skip
            train_steps += [p[0] for p in pairs]
            runs = [p[1] for p in pairs]
            t = statistics.median(r[0] for r in runs)
            ratio = statistics.median(r[0] / train for train, r in pairs)
            ok = runs[0][2]
            flag = "" if ok == len(steps) else f" ({len(steps) - ok} FAILED)"
            cells.append(f"{ratio:6.2f} ({t * 1e3:5.1f} ms){flag}")
            kib.append(f"{runs[0][1] / 1024:,.0f}")
            if cfg.mode is Mode.TOLERANT:
                tolerant = runs[0][3]
        print(f"{label:40}" + "".join(f"{c:>18}" for c in cells) + "   " + " / ".join(kib))
    return tolerant, train_steps


def fixed_costs(store: RunStore, auditor: StepAuditor) -> None:
    t = time.perf_counter()
    load_run(store)
    load_s = time.perf_counter() - t
    kp = keypair_from_seed(b"a" * 32)
    from audit.jobs import build_verdict  # the batch job's own verdict builder

    with StepAuditor(store, auditor.run, auditor.corpus, auditor.config) as fresh:
        result = fresh.audit(0)
    verdict = build_verdict(
        run=auditor.run, step=0, result=result, config=auditor.config,
        auditor=kp.public, sample_seed=Hash32(auditor.sample_seed), device=auditor.device.type,
    )  # fmt: skip
    t = time.perf_counter()
    sign_verdict(kp, verdict)
    sign_s = time.perf_counter() - t
    print(f"not in the ratios: load_run with signatures {load_s:.2f} s per run, "
          f"signing one verdict {sign_s * 1e3:.1f} ms ({bls.active().name} BLS)")  # fmt: skip


def calibration_line(auditor: StepAuditor) -> None:
    cal = auditor.calibration
    if cal is None:
        return
    obs = sorted(d.rel_l2 for d in cal.observed.values())
    thr = sorted(t.rel_l2 for t in cal.thresholds.values())
    cos = sorted(d.cosine for d in cal.observed.values())
    print(
        f"calibration (safety factor {cal.safety_factor}): observed rel L2 per tensor "
        f"median {statistics.median(obs):.2e} max {obs[-1]:.2e}; thresholds "
        f"min {thr[0]:.2e} median {statistics.median(thr):.2e} max {thr[-1]:.2e}; "
        f"observed cosine distance median {statistics.median(cos):.2e} max {cos[-1]:.2e}"
    )


def detection_tables(leaves: int) -> None:
    print(f"\ndetection of tampered leaves out of {leaves} vs chunk fraction:")
    for frac in (0.01, 0.05, 0.1, 0.25, 0.5, 1.0):
        m = max(1, round(frac * leaves))
        p1 = chunk_detection_probability(leaf_count=leaves, tampered=1, sampled=m)
        p10 = chunk_detection_probability(leaf_count=leaves, tampered=min(10, leaves), sampled=m)
        print(
            f"  fraction {frac:5.2f} ({m:4d} leaves): 1 bad leaf {p1:.3f}, 10 bad leaves {p10:.3f}"
        )
    print("\ndetection probability 1-(1-f)^n vs sample size n:")
    print("  n     " + "  ".join(f"f={f:<5}" for f in (0.01, 0.05, 0.1, 0.25)))
    for n in (1, 5, 10, 20, 50, 100, 300):
        print(
            f"  {n:<5} "
            + "  ".join(f"{detection_probability(f, n):7.3f}" for f in (0.01, 0.05, 0.1, 0.25))
        )
    for f in (0.01, 0.05):
        print(f"  n for 99% against f={f}: {sample_size_for(cheat_fraction=f, confidence=0.99)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--every", type=int, default=8, help="state checkpoint every K steps")
    ap.add_argument("--repeats", type=int, default=3, help="median of this many audits per cell")
    ap.add_argument("--model", choices=tuple(MODELS), default="reference")
    ap.add_argument("--batch", type=int, default=8, help="batch size of every run")
    ap.add_argument("--quick", action="store_true", help="same as --model quick (smoke test)")
    ap.add_argument("--row", action="append", choices=tuple(ROWS),
                    help="only this table row (repeatable; default: every row)")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = MODELS["quick" if args.quick else args.model]
    BATCH["size"] = args.batch
    corpus = Corpus.from_paths([Path(sysconfig.get_paths()["stdlib"]) / "json"])
    with tempfile.TemporaryDirectory() as tmp:
        audited = Path(tmp) / "run"
        _train(audited, corpus, args.steps, args.every, model)
        store = RunStore(str(audited))

        def trainer() -> float:
            with tempfile.TemporaryDirectory(dir=tmp) as fresh:
                return _train(Path(fresh) / "run", corpus, args.steps, args.every, model)

        params = sum(p.numel() for p in build_model("gpt-bytes", model).parameters())
        print(f"model {model} ({params:,} parameters), batch {args.batch}, "
              f"{args.steps} steps, state checkpoint every {args.every}")  # fmt: skip
        tolerant, per_run = cost_table(
            store, corpus, trainer, args.every, args.repeats, args.row or list(ROWS)
        )
        bare = statistics.median(_bare(corpus, args.steps, model) for _ in range(args.repeats))
        hooked = statistics.median(per_run)
        print(
            f"trainer: median step {hooked * 1e3:.1f} ms over the {len(per_run)} paired runs "
            f"(hook included), from {min(per_run) * 1e3:.1f} to {max(per_run) * 1e3:.1f} ms; "
            f"the same loop without the hook {bare * 1e3:.1f} ms (ratios against it are "
            f"x{hooked / bare:.2f})"
        )
        if tolerant is not None:
            calibration_line(tolerant)
            fixed_costs(store, tolerant)
        run = load_run(store, check_signatures=False)
        leaves = store.read_index(run.record(0).grad_root).leaf_count
    detection_tables(leaves)


if __name__ == "__main__":
    main()

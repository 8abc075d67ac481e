"""Auditor cost per sampled step vs the trainer's cost per step, bytes fetched, calibrated noise,
and detection tables. Everything is measured in this run, on this machine, with one torch thread.

    .venv/bin/python benchmarks/audit_bench.py [--steps 12] [--every 4] [--quick]

Prints medians; ratios compare figures measured in the same process.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from audit.chunks import chunk_detection_probability
from audit.fetch import load_run
from audit.reexec import ReexecConfig, StepAuditor
from audit.sampling import detection_probability, sample_size_for
from audit.tolerance import Mode
from proofs.signatures import keypair_from_seed
from trainer.data import Corpus
from trainer.loop import TrainConfig, train
from trainer.store import RunStore


def _train(path: Path, corpus: Corpus, steps: int, every: int, model: dict[str, int]) -> float:
    stamps: list[float] = []
    cfg = TrainConfig(
        run_id="bench", run_seed=1, steps=steps, batch_size=8, model_config=model,
        checkpoint_every=every, threads=1, warmup_steps=2,
    )  # fmt: skip
    stamps.append(time.perf_counter())
    train(cfg, str(path), keypair_from_seed(b"b" * 32), corpus=corpus,
          on_step=lambda s, st: stamps.append(time.perf_counter()))  # fmt: skip
    return statistics.median(b - a for a, b in itertools.pairwise(stamps))


def _audit(store: RunStore, corpus: Corpus, cfg: ReexecConfig, steps: list[int]):  # type: ignore[no-untyped-def]
    auditor = StepAuditor(store, load_run(store, check_signatures=False), corpus, cfg)
    times, fetched, passed = [], [], 0
    for s in steps:
        t = time.perf_counter()
        r = auditor.audit(s)
        times.append(time.perf_counter() - t)
        fetched.append(r.bytes_fetched)
        passed += r.passed
    return statistics.median(times), statistics.median(fetched), passed, auditor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="tiny model (smoke test)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = {"n_layer": 2, "n_head": 4, "d_model": 128, "context": 64, "dropout": 0.1}
    if args.quick:
        model = {"n_layer": 1, "n_head": 2, "d_model": 32, "context": 16, "dropout": 0.1}
    corpus = Corpus.from_paths([Path(sysconfig.get_paths()["stdlib"]) / "json"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run"
        train_step = _train(path, corpus, args.steps, args.every, model)
        store = RunStore(str(path))
        steps = list(range(args.steps))
        print(f"model {model}, batch 8, {args.steps} steps, state checkpoint every {args.every}")
        print(f"trainer: {train_step * 1e3:.1f} ms/step (median, hook included)")
        exact, tolerant_mode = Mode.EXACT, Mode.TOLERANT
        rows = [
            ("exact, chain check", ReexecConfig(mode=exact, usefulness=False)),
            (
                "exact, no chain check",
                ReexecConfig(mode=exact, check_chain=False, usefulness=False),
            ),
            (
                "tolerant, no chain check",
                ReexecConfig(mode=tolerant_mode, check_chain=False, usefulness=False),
            ),
            ("exact, chunks 10%", ReexecConfig(mode=exact, chunk_fraction=0.1, usefulness=False)),
            ("exact, full + usefulness", ReexecConfig(mode=exact)),
        ]
        print(f"{'auditor mode':28} {'ms/step':>9} {'ratio':>7} {'KiB fetched':>12} {'pass':>5}")
        tolerant = None
        for label, cfg in rows:
            t, b, ok, auditor = _audit(store, corpus, cfg, steps)
            if cfg.mode is Mode.TOLERANT:
                tolerant = auditor
            print(f"{label:28} {t * 1e3:9.1f} {t / train_step:7.2f} {b / 1024:12.1f} {ok:5d}")
        if tolerant is not None and tolerant.calibration is not None:
            cal = tolerant.calibration
            obs = sorted(d.rel_l2 for d in cal.observed.values())
            thr = sorted(t.rel_l2 for t in cal.thresholds.values())
            print(
                f"calibration (safety factor {cal.safety_factor}): observed rel L2 per tensor "
                f"median {statistics.median(obs):.2e} max {obs[-1]:.2e}; thresholds "
                f"min {thr[0]:.2e} median {statistics.median(thr):.2e} max {thr[-1]:.2e}"
            )
            cos = sorted(d.cosine for d in cal.observed.values())
            print(
                f"  observed cosine distance median {statistics.median(cos):.2e} max {cos[-1]:.2e}"
            )
        index = store.read_index(load_run(store, check_signatures=False).record(0).grad_root)
        leaves = index.leaf_count
    print(f"\ndetection of 1 tampered leaf out of {leaves} vs chunk fraction:")
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


if __name__ == "__main__":
    main()

"""Benchmark: the share of signature work in ``audit run`` of the demo's runs, native vs py_ecc.

Usage (repository root, after `make setup`):

    .venv/bin/python benchmarks/audit_signatures.py [--steps 48] [--corpus stdlib|json]

Four runs like scripts/demo.py's: the reference GPT at the defaults of ``rewards assign``
(2 layers, d_model 128, context 64, batch 8, dropout 0.1), ``--steps`` steps, a state checkpoint
every 8, each by its own key on one assignment; all four are honest here (the demo's cheater and
lazy peer change which verdicts fail, not how many are signed). One audit job (audit.jobs.run_job,
what ``audit run`` calls, one worker) audits the four with the demo's target (catch a 25 % cheat
with 99 %: 16 of 48 steps per run), the default re-execution mode (tolerant, chain check,
usefulness) and a fixed beacon (the demo reads it from the chain: not timed here). The job runs
twice, with the native BLS backend and with py_ecc; every BLS call inside it is timed by wrapping
proofs.bls (benchmarks/blstimer.py): header and manifest verification in load_run, verdict
signing. Both jobs must write byte-identical verdict files. Goal (issue 14): signature work
<= 5 % of the job's time. Torch runs one thread, as in the demo's parallel jobs on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from blstimer import bls_clock

from audit.beacon import Beacon
from audit.jobs import JobSpec, SampleSpec, run_job
from audit.reexec import ReexecConfig
from proofs.signatures import keypair_from_seed
from trainer.data import Corpus
from trainer.loop import TrainConfig, reference_assignment, train

PEERS = ("alice", "bob", "carol", "dave")
AUDITOR = keypair_from_seed(b"audit-signatures-bench-auditor-1")
BEACON = Beacon(value=b"audit-signatures-bench-beacon-01", source="cli")


def beacon_for(url: str) -> Beacon:
    return BEACON


def corpus_paths(name: str) -> tuple[str, ...]:
    stdlib = sysconfig.get_paths()["stdlib"]
    return (stdlib,) if name == "stdlib" else (os.path.join(stdlib, "json"),)


def train_runs(root: Path, steps: int, paths: tuple[str, ...]) -> list[str]:
    corpus = Corpus.from_paths(paths)
    recipe = TrainConfig(run_id="assignment", steps=steps)  # the defaults of `rewards assign`
    assignment = reference_assignment(recipe, corpus.commitment(), checkpoint_every=(4, 16))
    urls = []
    for name in PEERS:
        config = TrainConfig.from_assignment(
            assignment, run_id=f"{name}-r1", checkpoint_every=8, threads=1
        )
        key = keypair_from_seed(f"audit-signatures-bench-{name}".encode().ljust(32, b"."))
        train(config, str(root / "runs" / name), key, corpus=corpus)
        urls.append(str(root / "runs" / name))
    return urls


def audit(root: Path, urls: list[str], paths: tuple[str, ...], label: str) -> dict[str, float]:
    """Audit ``urls`` in one job with backend ``label`` ("warm-up": native, one step a run)."""
    backend = "native" if label == "warm-up" else label
    spec = SampleSpec(cheat_fraction=0.25, confidence=0.99)  # the demo's target
    job = JobSpec(
        urls=tuple(urls), out=root / f"verdicts-{label}", keypair=AUDITOR, beacon_for=beacon_for,
        spec=SampleSpec(count=1) if label == "warm-up" else spec, config=ReexecConfig(),
        corpus_paths=paths,
    )  # fmt: skip
    with bls_clock(backend) as clock:
        start = time.perf_counter()
        outcomes = run_job(job)
        total = time.perf_counter() - start
    errors = [o.error for o in outcomes if o.error is not None]
    if errors:
        raise SystemExit(f"{backend}: audit errors: {errors}")
    print(f"  {label}: BLS {clock.summary()}")
    steps = sum(len(o.steps) for o in outcomes)
    return {"total": total, "bls": clock.total, "steps": steps,
            "passed": sum(o.passed for o in outcomes)}  # fmt: skip


def verdict_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("step-*.json"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=48, help="training steps per run")
    ap.add_argument("--corpus", choices=("stdlib", "json"), default="stdlib",
                    help="the standard library (as the demo) or its json package")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(1)
    paths = corpus_paths(args.corpus)
    with tempfile.TemporaryDirectory(prefix="audit-sig-bench-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        urls = train_runs(root, args.steps, paths)
        print(f"set-up: trained {len(urls)} runs x {args.steps} steps in "
              f"{time.perf_counter() - start:.0f} s")  # fmt: skip
        audit(root, urls[:1], paths, "warm-up")  # first use of torch's kernels, not timed
        results = {name: audit(root, urls, paths, name) for name in ("native", "py_ecc")}
        if verdict_bytes(root / "verdicts-native") != verdict_bytes(root / "verdicts-py_ecc"):
            raise SystemExit("the two backends wrote different verdict files")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs;"
          f" verdict files identical under both backends")  # fmt: skip
    print(f"{'backend':<8}{'verdicts':>10}{'passed':>8}{'job s':>9}{'BLS s':>8}{'BLS share':>11}")
    for name, r in results.items():
        print(f"{name:<8}{r['steps']:>10.0f}{r['passed']:>8.0f}{r['total']:>9.1f}{r['bls']:>8.2f}"
              f"{100 * r['bls'] / r['total']:>10.1f}%")  # fmt: skip
    share = results["native"]["bls"] / results["native"]["total"]
    print(f"goal: signature work <= 5 % of audit run (native): "
          f"{'met' if share <= 0.05 else 'NOT met'} ({100 * share:.1f} %)")  # fmt: skip


if __name__ == "__main__":
    main()

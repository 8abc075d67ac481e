"""Benchmark: ``rewards ingest`` throughput (verdicts/s, runs/s), native BLS vs py_ecc, one run.

Usage (repository root, after `make setup`):

    .venv/bin/python benchmarks/ingest_bench.py [--runs 200] [--ref-runs 5] [--steps 14]

What is ingested is real: ``--runs`` runs of ``--steps`` steps each, trained by the reference
trainer (tiny GPT: 1 layer, d_model 16, context 16, batch 2; ~0.3 s a run on one core), each by
its own registered trainer key, on an epoch assignment they all match; and one verdict per step
of every run, signed by one registered auditor. The verdicts are not re-executions (auditing
every step of every run would dominate the set-up): each is built from the run's real step record
(replay seed, header hash, step manifest, gradient root) with outcome ``pass``, per-tensor checks
for every parameter of the model and a usefulness entry, so it has the size and the fields of a
real one, and ingest checks it exactly as it checks a real one (signature, run, step, manifest,
auditor, conflicts).

Ingest is timed into a fresh warehouse: all ``--runs`` runs with the native backend, then the
first ``--ref-runs`` of them with py_ecc (py_ecc verifies in ~0.5 s, so the reference is measured
on fewer runs and its rate compared per verdict). The time inside BLS is measured by wrapping
proofs.bls (benchmarks/blstimer.py). Goal (issue 14): 1,000 runs x 14 verdicts at >= 300
verdicts/s on 2 cores, signatures verified. The load average is printed: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from blstimer import bls_clock  # noqa: E402

from audit.fetch import VerifiedRun, load_run  # noqa: E402
from audit.tolerance import Mode  # noqa: E402
from audit.usefulness import heldout_description  # noqa: E402
from audit.verdict import Outcome, TensorCheck, Usefulness, Verdict, sign_verdict  # noqa: E402
from proofs.hashing import Hash32  # noqa: E402
from proofs.signatures import BLSPubkey, KeyPair, keypair_from_seed  # noqa: E402
from rewards import ingest, policy, warehouse  # noqa: E402
from rewards.assignments import assign  # noqa: E402
from trainer.assignment import Assignment  # noqa: E402
from trainer.data import Corpus  # noqa: E402
from trainer.loop import TrainConfig, reference_assignment, train  # noqa: E402
from trainer.models import build_model  # noqa: E402
from trainer.store import RunStore  # noqa: E402

CORPUS = (str(REPO / "proofs" / "hashing.py"),)
TINY = {"n_layer": 1, "n_head": 2, "d_model": 16, "context": 16}
AUDITOR = keypair_from_seed(b"ingest-bench-auditor-key-seed-01")


def trainer_key(i: int) -> KeyPair:
    return keypair_from_seed(f"ingest-bench-trainer-{i:06d}".encode().ljust(32, b"."))


def make_assignment(corpus: Corpus, steps: int) -> Assignment:
    recipe = TrainConfig(run_id="recipe", steps=steps, batch_size=2, model_config=TINY,
                         warmup_steps=1)  # fmt: skip
    return reference_assignment(recipe, corpus.commitment(), checkpoint_every=(1, steps))


def make_verdicts(run: VerifiedRun, tensor_names: list[str]) -> list[Verdict]:
    checks = tuple(
        TensorCheck(
            name=n, rel_l2=1e-7, cosine=1e-12, max_rel_l2=1e-4, max_cosine=1e-6, passed=True
        )
        for n in tensor_names
    )
    out = []
    for step in range(run.total_steps):
        record = run.record(step)
        out.append(
            Verdict(
                run_id=run.header.run_id,
                peer=BLSPubkey(run.header.pubkey),
                step=step,
                outcome=Outcome.PASS,
                mode=Mode.TOLERANT,
                reason="",
                replay_seed=record.replay_seed.to_bytes(8, "big"),
                recipe_hash=run.header_hash,
                manifest_hash=run.manifest_of(step).hash(),
                committed_root=Hash32(record.grad_root),
                recomputed_root=Hash32(record.grad_root),
                tensors=checks,
                evidence=(),
                usefulness=Usefulness(
                    heldout=heldout_description(run.header), loss_before=4.2, loss_after=4.1
                ),
                auditor=AUDITOR.public,
                sample_seed=Hash32(b"\x07" * 32),
                device="cpu",
                torch_version=torch.__version__,
            )
        )
    return out


def build(root: Path, runs: int, steps: int) -> Assignment:
    """Train ``runs`` runs under root/stores and write their signed verdicts under
    root/verdicts/<run>/ (native backend: the bytes are the same under either)."""
    corpus = Corpus.from_paths(CORPUS)
    assignment = make_assignment(corpus, steps)
    names = [n for n, _ in build_model(assignment.model, TINY).named_parameters()]
    t = time.perf_counter()
    for i in range(runs):
        config = TrainConfig.from_assignment(
            assignment, run_id=f"p{i:06d}-r1", checkpoint_every=max(1, steps // 2), threads=1
        )
        train(config, str(root / "stores" / f"p{i:06d}"), trainer_key(i), corpus=corpus)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    with bls_clock("native"):
        for i in range(runs):
            run = load_run(RunStore(str(root / "stores" / f"p{i:06d}")), check_signatures=False)
            folder = root / "verdicts" / f"p{i:06d}"
            folder.mkdir(parents=True)
            for v in make_verdicts(run, names):
                signed = sign_verdict(AUDITOR, v)
                (folder / f"step-{v.step:06d}.json").write_text(json.dumps(signed.to_json()))
    print(f"set-up: trained {runs} runs x {steps} steps in {train_s:.0f} s, "
          f"signed {runs * steps} verdicts in {time.perf_counter() - t:.0f} s")  # fmt: skip
    return assignment


def warehouse_for(path: Path, assignment: Assignment, runs: int) -> warehouse.Connection:
    con = warehouse.connect(path, create=True)
    policy.open_epoch(con, 0, 10**21)
    assign(con, 0, assignment)
    for i in range(runs):
        warehouse.register_peer(con, peer_id=f"p{i:06d}", pubkey="0x" + trainer_key(i).public.hex(),
                                role="trainer", payout_address="0x" + f"{i + 1:040x}")  # fmt: skip
    warehouse.register_peer(con, peer_id="auditor", pubkey="0x" + AUDITOR.public.hex(),
                            role="auditor", payout_address=None)  # fmt: skip
    return con


def time_ingest(
    root: Path, assignment: Assignment, runs: int, steps: int, backend: str
) -> dict[str, float]:
    """Ingest the first ``runs`` runs and their verdicts into a fresh warehouse."""
    sub = root / f"batch-{backend}"
    (sub / "stores").mkdir(parents=True)
    (sub / "verdicts").mkdir()
    for i in range(runs):  # only the chosen runs below the folders (verdict_files does not
        # follow symlinked folders, so the verdicts are copied)
        (sub / "stores" / f"p{i:06d}").symlink_to(root / "stores" / f"p{i:06d}")
        shutil.copytree(root / "verdicts" / f"p{i:06d}", sub / "verdicts" / f"p{i:06d}")
    con = warehouse_for(sub / "w.duckdb", assignment, runs)
    with bls_clock(backend) as clock:
        t = time.perf_counter()
        report = ingest.ingest(con, stores=[str(sub / "stores")],
                               verdicts_dir=str(sub / "verdicts"), epoch=0)  # fmt: skip
        total = time.perf_counter() - t
    con.close()
    if report.rejections or (report.runs_loaded, report.verdicts_loaded) != (runs, runs * steps):
        first = report.rejections[0] if report.rejections else None
        raise SystemExit(
            f"{backend}: {report.runs_loaded}/{runs} runs, {report.verdicts_loaded} verdicts"
            f" loaded; first rejection: {first}"
        )
    print(f"  {backend}: BLS {clock.summary()}")
    return {"runs": runs, "verdicts": report.verdicts_loaded, "total": total, "bls": clock.total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200, help="runs ingested with the native backend")
    ap.add_argument("--ref-runs", type=int, default=5, help="of those, ingested with py_ecc")
    ap.add_argument("--steps", type=int, default=14, help="steps per run (= verdicts per run)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        root = Path(tmp)
        assignment = build(root, args.runs, args.steps)
        results = {
            "native": time_ingest(root, assignment, args.runs, args.steps, "native"),
            "py_ecc": time_ingest(
                root, assignment, min(args.ref_runs, args.runs), args.steps, "py_ecc"
            ),
        }
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{os.cpu_count()} CPUs; {args.steps} verdicts per run")  # fmt: skip
    print(f"{'backend':<8}{'runs':>6}{'verdicts':>10}{'total s':>10}{'BLS s':>8}{'BLS %':>7}"
          f"{'runs/s':>9}{'verdicts/s':>12}")  # fmt: skip
    for name, r in results.items():
        print(f"{name:<8}{r['runs']:>6.0f}{r['verdicts']:>10.0f}{r['total']:>10.2f}"
              f"{r['bls']:>8.2f}{100 * r['bls'] / r['total']:>6.1f}%{r['runs'] / r['total']:>9.1f}"
              f"{r['verdicts'] / r['total']:>12.1f}")  # fmt: skip
    native, ref = results["native"], results["py_ecc"]
    per_v = (ref["total"] / ref["verdicts"]) / (native["total"] / native["verdicts"])
    print(f"py_ecc / native time per verdict: {per_v:.1f}x; goal >= 300 verdicts/s (native): "
          f"{'met' if native['verdicts'] / native['total'] >= 300 else 'NOT met'}")  # fmt: skip


if __name__ == "__main__":
    main()

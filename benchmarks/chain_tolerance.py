"""The tolerant chain check: false positives across thread counts and CPU kernel capabilities,
and the smallest window-final corruption it catches.

    .venv/bin/python benchmarks/chain_tolerance.py [--steps 24] [--every 4] [--quick]

False positives: honest runs of the default GPT (2x128, batch 8, context 64) are trained by
``trainer run`` in processes with 1 or 2 torch threads and this CPU's ATen kernels or
``ATEN_CPU_CAPABILITY=default``; each is audited on every step by ``audit run --mode tolerant``
in a process of every such kind (so that ``ATEN_CPU_CAPABILITY`` is set before torch loads).
A row counts failed steps, windows compared per tensor (roots differed) and the worst
distance/threshold ratio of the chain's state tensors and of the gradients.

Detection: a peer commits every gradient honestly but applies only ``1 - eps`` of the last
update of each window. Each window is compared per tensor (trainer.chain.compare_chain, what the
auditor runs wherever it does not reproduce the run's recorded determinism key); a row counts
the windows caught and the worst distance/threshold ratio.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

from proofs.signatures import keypair_from_seed, save_keypair
from trainer.chain import compare_chain
from trainer.checkpoint import decode_checkpoint
from trainer.data import Corpus
from trainer.hook import AuditHook
from trainer.loop import TrainConfig, train
from trainer.replay import apply_gradients
from trainer.store import RunStore

PEER = keypair_from_seed(b"chain-tolerance-bench-peer-00001")
AUDITOR = keypair_from_seed(b"chain-tolerance-bench-auditor-01")
CORPUS = str(Path(sysconfig.get_paths()["stdlib"]) / "json")


def _env(capability: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    return env


def _train(
    root: Path, name: str, capability: str | None, threads: int, args: argparse.Namespace
) -> str:
    url = str(root / name)
    cmd = [
        sys.executable, "-m", "trainer", "run", "--store", url, "--key-file",
        str(root / "peer.key"), "--steps", str(args.steps), "--checkpoint-every", str(args.every),
        "--threads", str(threads), "--corpus", CORPUS, "--seed", "3",
    ]  # fmt: skip
    subprocess.run(cmd, env=_env(capability), check=True, capture_output=True)
    return url


def _audit(
    root: Path, url: str, capability: str | None, threads: int, steps: int
) -> dict[str, float]:
    out = root / f"out-{Path(url).name}-{capability}-{threads}"
    cmd = [
        sys.executable, "-c",
        f"import torch, sys; torch.set_num_threads({threads}); from audit.cli import main; "
        "sys.argv[0] = 'audit'; main()",
        "run", "--out", str(out), "--store", url, "--key", str(root / "auditor.key"),
        "--beacon", "0x" + "11" * 32, "--count", str(steps), "--mode", "tolerant",
        "--corpus", CORPUS, "--no-usefulness",
    ]  # fmt: skip
    subprocess.run(cmd, env=_env(capability), capture_output=True)
    failed = windows = 0
    chain = grad = 0.0
    compared: set[str] = set()
    for path in sorted(out.glob("*/step-*.json")):
        v = json.loads(path.read_text())["verdict"]
        failed += v["outcome"] != "pass"
        for t in v["tensors"]:
            bound = t["max_rel_l2"]
            if bound is None or bound == 0:
                continue
            ratio = float(t["rel_l2"]) / bound
            if t["name"].startswith("state@"):
                chain = max(chain, ratio)
                compared.add(t["name"].split("/", 1)[0])
            else:
                grad = max(grad, ratio)
    windows = len(compared)
    return {"failed": failed, "windows": windows, "chain": chain, "grad": grad}


def false_positives(root: Path, args: argparse.Namespace) -> None:
    here = torch.backends.cpu.get_cpu_capability()
    kinds = list(itertools.product((None, "default"), (1, 2)))
    runs = {k: _train(root, f"honest-{k[0] or 'native'}-{k[1]}t", k[0], k[1], args) for k in kinds}
    print(f"false positives (this CPU: {here}; {args.steps} steps, state every {args.every})")
    print("trained by | audited by | steps failed | windows compared per tensor | worst chain "
          "d/threshold | worst gradient d/threshold")  # fmt: skip
    total = failed = 0
    for (tk, url), ak in itertools.product(runs.items(), kinds):
        r = _audit(root, url, ak[0], ak[1], args.steps)
        total += args.steps
        failed += int(r["failed"])
        name = lambda k: f"{(k[0] or here).upper()}, {k[1]} thr"  # noqa: E731
        print(f"| {name(tk)} | {name(ak)} | {int(r['failed'])}/{args.steps} | {int(r['windows'])} "
              f"| {r['chain']:.3f} | {r['grad']:.3f} |")  # fmt: skip
    print(f"total: {failed} of {total} honest steps failed")


def _withheld_run(root: Path, eps: float, args: argparse.Namespace, corpus: Corpus) -> str:
    """Train a run whose peer applies only ``1 - eps`` of the last update of each window."""
    url = str(root / f"withheld-{eps:g}")
    before: dict[str, torch.Tensor] = {}
    clip, end_step = AuditHook.clip, AuditHook.end_step

    def last(hook: AuditHook) -> bool:
        return (hook.next_step + 1) % args.every == 0

    def clip_and_keep(hook: AuditHook) -> None:
        clip(hook)
        if last(hook):
            before.update({n: p.detach().clone() for n, p in hook.model.named_parameters()})

    def end_step_withheld(hook: AuditHook) -> None:
        if last(hook):
            with torch.no_grad():
                for n, p in hook.model.named_parameters():
                    p.sub_(eps * (p - before[n]))
        end_step(hook)

    AuditHook.clip, AuditHook.end_step = clip_and_keep, end_step_withheld  # type: ignore[method-assign]
    try:
        cfg = TrainConfig(
            run_id=f"withheld-{eps:g}", steps=args.steps, checkpoint_every=args.every, threads=1,
        )  # fmt: skip
        train(cfg, url, PEER, corpus=corpus)
    finally:
        AuditHook.clip, AuditHook.end_step = clip, end_step  # type: ignore[method-assign]
    return url


def _windows_caught(url: str) -> tuple[int, int, float]:
    """(windows failing the per-tensor comparison, windows, worst distance/threshold)."""
    store = RunStore(url)
    header = store.read_header().header
    start_ref = header.initial_state
    caught = windows = 0
    worst = 0.0

    def load(root_: bytes) -> dict[str, torch.Tensor]:
        return decode_checkpoint(store.read_artifact(root_)[1])

    for w in store.manifest_windows():
        m = store.read_manifest(w).manifest
        start = load(start_ref.root)
        steps = [(r, load(r.grad_root)) for r in m.records]
        replayed = apply_gradients(header, start, steps)
        cmp = compare_chain(header=header, start=start, steps=steps, replayed=replayed,
                            committed=load(m.state.root))  # fmt: skip
        windows += 1
        caught += not cmp.passed
        worst = max([worst, *(c.distance / c.threshold for c in cmp.checks if c.threshold)])
        start_ref = m.state
    return caught, windows, worst


def detection(root: Path, args: argparse.Namespace) -> None:
    corpus = Corpus.from_paths([CORPUS])
    torch.set_num_threads(1)
    print("detection (last update of each window applied at 1 - eps; per-tensor comparison)")
    print("| eps | windows caught | worst d/threshold |")
    for eps in args.eps:
        caught, windows, worst = _windows_caught(_withheld_run(root, eps, args, corpus))
        print(f"| {eps:g} | {caught}/{windows} | {worst:.3g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--eps", type=float, nargs="*", default=[1e-1, 1e-2, 1e-3, 1e-4, 1e-5])
    parser.add_argument("--skip-fp", action="store_true", help="only the detection table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chain-tolerance-") as tmp:
        root = Path(tmp)
        save_keypair(root / "peer.key", PEER)
        save_keypair(root / "auditor.key", AUDITOR)
        if not args.skip_fp:
            false_positives(root, args)
        detection(root, args)


if __name__ == "__main__":
    main()

"""Training quality of a shared run (issue #15): does aggregation help, does screening protect it?

Four scenarios on the same genesis recipe (the reference GPT, the CLI's outer rule), each trained
for R rounds of H inner steps through the real peer (hook, compression, store) and the real
aggregator:

* ``honest-4``: four honest peers;
* ``solo-1``: one peer alone doing the same inner steps per round (a roster of one);
* ``attack-screened``: the four honest peers plus a fabricator that sends random contributions
  of plausible norm (its delta replaced by Gaussian noise with the norm of its real delta),
  screening on;
* ``attack-unscreened``: the same with the probe off and the norm rule wide open.

After every round the global state is evaluated on held-out batches cut from files that are not
in the shared corpus (no peer trains on them). Prints the curves and the two ratios the issue asks
for: ``honest-4`` must end below ``solo-1``; ``attack-screened`` must end within 2 % of
``honest-4``.

Usage: ``python benchmarks/shared_quality.py [--rounds 8] [--inner-steps 10] [--threads 1]``
(about 3-4 minutes on 2 CPU cores with the defaults).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from proofs.hashing import Hash32
from proofs.signatures import KeyPair, keypair_from_seed
from trainer.aggregator import close_round
from trainer.data import Corpus, batch_offsets
from trainer.globalstate import initial_model, load_flat, theta_artifact
from trainer.hook import DEFAULT_CHUNK_SIZE
from trainer.models import GPT_NAME
from trainer.peer import Behaviour, run_round
from trainer.sharedrun import SHARED_VERSION, Genesis, OuterRule, Screening, SignedGenesis
from trainer.sharedstore import SharedStore

HONEST = ("alice", "bob", "carol", "dave")
CONFIG = {
    "n_layer": 2,
    "n_head": 4,
    "d_model": 64,
    "context": 64,
    "dropout": 0.0,
    "vocab_size": 256,
}


def key(name: str) -> KeyPair:
    return keypair_from_seed(f"shared-quality-bench-{name}".encode().ljust(32, b"."))


def corpora(folder: Path) -> tuple[Corpus, Corpus]:
    """The shared corpus (top-level stdlib ``.py`` files whose name starts with a-m) and the
    held-out one (those starting with n-z), disjoint by construction; copied into two folders so
    each corpus is named by one path."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name, keep in (("train", lambda c: c <= "m"), ("heldout", lambda c: c > "m")):
        target = folder / name
        target.mkdir()
        for path in sorted(stdlib.glob("*.py")):
            if path.is_file() and keep(path.name[0]):
                shutil.copyfile(path, target / path.name)
        out.append(Corpus.from_paths([target]))
    return out[0], out[1]


def make_genesis(
    store: SharedStore, peers: tuple[str, ...], *, rounds: int, inner_steps: int, screened: bool,
    corpus: Corpus, probe_margin: float,
) -> Genesis:  # fmt: skip
    coordinator = key("coordinator")
    record = Genesis(
        version=SHARED_VERSION,
        shared_run_id="quality",
        model=GPT_NAME,
        model_config=CONFIG,
        init_seed=7,
        initial_root=Hash32(bytes(32)),
        optimizer="AdamW",
        hyperparameters={"betas": [0.9, 0.95], "weight_decay": 0.1},
        inner_lr=3e-3,
        grad_clip=1.0,
        inner_steps=inner_steps,
        batch_size=8,
        context=CONFIG["context"],
        dataset=corpus.commitment(),
        checkpoint_every=inner_steps,
        chunk_size=DEFAULT_CHUNK_SIZE,
        outer=OuterRule(beta=0.95, chunk=4096, topk=64, quantization="int8", alpha=1.0),
        screening=Screening(
            norm_factor=3.0 if screened else 1e9,
            probe=screened,
            probe_batch=8,
            probe_margin=probe_margin,
            probe_gain=0.25 if screened else 0.0,
            min_contributions=1,
            max_contributions=len(peers),
            deadline_s=3600.0,
        ),
        rounds=rounds,
        coordinator=bytes(coordinator.public),
        aggregator=bytes(key("aggregator").public),
        peers={p: bytes(key(p).public) for p in peers},
    )
    theta0 = theta_artifact(initial_model(record), record.chunk_size)
    record = dataclasses.replace(record, initial_root=Hash32(theta0.root))
    store.put_object(theta0.root, theta0.parts)
    store.put_genesis(SignedGenesis.sign(coordinator, record))
    return record


def fabricate(seed: int) -> Behaviour:
    """Random delta with the norm of the real one: plausible to a norm rule, useless to a model."""
    generator = torch.Generator().manual_seed(seed)

    def replace(delta: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(delta.shape, generator=generator, dtype=torch.float32)
        return noise * (delta.norm() / noise.norm())

    return Behaviour(replace_delta=replace)


@torch.no_grad()
def held_out_loss(genesis: Genesis, theta: torch.Tensor, held: Corpus, batches: int) -> float:
    model = initial_model(genesis)
    load_flat(model, theta)
    model.eval()
    total = 0.0
    for i in range(batches):
        offsets = batch_offsets(
            12345, i, batch_size=16, context=genesis.context, corpus_size=len(held)
        )
        batch = held.batch(offsets, genesis.context)
        _, loss = model(batch.inputs, batch.targets)
        assert loss is not None
        total += float(loss)
    return total / batches


def scenario(
    name: str, folder: Path, *, rounds: int, inner_steps: int, corpus: Corpus, held: Corpus,
    threads: int, eval_batches: int, probe_margin: float,
) -> tuple[list[float], list[str]]:  # fmt: skip
    peers = ("alice",) if name == "solo-1" else HONEST
    attack = name.startswith("attack")
    roster = (*peers, "mallory") if attack else peers
    store = SharedStore(folder / name)
    genesis = make_genesis(
        store, roster, rounds=rounds, inner_steps=inner_steps,
        screened=name != "attack-unscreened", corpus=corpus,
        probe_margin=probe_margin,
    )  # fmt: skip
    model = initial_model(genesis)
    curve = [held_out_loss(genesis, _flat(model), held, eval_batches)]
    notes: list[str] = []
    for r in range(rounds):
        for peer in roster:
            behaviour = fabricate(1000 + r) if peer == "mallory" else None
            run_round(
                store, genesis, key(peer), peer, r, corpus=corpus, behaviour=behaviour,
                threads=threads,
            )  # fmt: skip
        signed = close_round(store, key("aggregator"), now=time.time() + 10**6, corpus=corpus)
        assert signed is not None
        record = signed.round
        theta = store.read_theta(record.new_root, model)
        curve.append(held_out_loss(genesis, theta, held, eval_batches))
        excluded = [f"{e.peer}:{e.reason}" for e in record.excluded]
        notes.append(f"r{r}: {len(record.included)} in, out {excluded or '-'}")
    return curve, notes


def _flat(model: torch.nn.Module) -> torch.Tensor:
    from trainer.globalstate import flatten

    return flatten(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--probe-margin", type=float, default=0.05)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="shared-quality-")
    corpus, held = corpora(Path(tmp))
    print(
        f"shared corpus {len(corpus)} bytes, held-out corpus {len(held)} bytes; "
        f"{args.rounds} rounds x H={args.inner_steps}; load {os.getloadavg()[0]:.1f}"
    )
    curves: dict[str, list[float]] = {}
    try:
        for name in ("honest-4", "solo-1", "attack-screened", "attack-unscreened"):
            started = time.perf_counter()
            curve, notes = scenario(
                name, Path(tmp), rounds=args.rounds, inner_steps=args.inner_steps,
                corpus=corpus, held=held, threads=args.threads, eval_batches=args.eval_batches,
                probe_margin=args.probe_margin,
            )  # fmt: skip
            curves[name] = curve
            print(f"{name:<18} {time.perf_counter() - started:6.1f} s  " + "; ".join(notes))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nheld-out loss after each round (round 0 = theta_0):")
    print("round  " + "  ".join(f"{n:>17}" for n in curves))
    for r in range(args.rounds + 1):
        print(f"{r:>5}  " + "  ".join(f"{curves[n][r]:>17.4f}" for n in curves))
    honest, solo = curves["honest-4"][-1], curves["solo-1"][-1]
    screened, unscreened = curves["attack-screened"][-1], curves["attack-unscreened"][-1]
    print(
        f"\nfinal: honest-4 {honest:.4f} vs solo-1 {solo:.4f} "
        f"({'lower' if honest < solo else 'NOT lower'}; ratio {honest / solo:.3f})"
    )
    gap = (screened - honest) / honest
    print(
        f"final: attack-screened {screened:.4f} is {gap:+.2%} from honest-4 "
        f"({'within' if abs(gap) <= 0.02 else 'NOT within'} 2 %); "
        f"attack-unscreened {unscreened:.4f} ({(unscreened - honest) / honest:+.2%})"
    )
    if not all(math.isfinite(v) for c in curves.values() for v in c):
        raise SystemExit("a held-out loss is not finite")


if __name__ == "__main__":
    main()

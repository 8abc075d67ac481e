"""Gas of settlement: a claim in trees of 2^10 and 2^20 accounts, posting a root, recording a
commitment, against Uniswap's merkle-distributor measured on the same EVM in the same run.

The issue's goal: a claim costs no more gas than a claim on Uniswap's merkle-distributor for a tree
of the same size. The figure compared with is Uniswap's own compiled MerkleDistributor, the
bytecode published in the npm package @uniswap/merkle-distributor 1.0.1 (solc 0.6.11, OpenZeppelin
3.1 MerkleProof; installed by `npm ci`, deployed here only, no source copied), measured on the same
chain, token and gas schedule (Prague) in the same run. Its "first in word" claim writes a fresh
bitmap word (20,000 gas), as our first claim of an account writes its fresh cumulative slot; "same
word" is a later claim into an already set word. The second, stricter peer is
rewards/contracts/baseline/BitmapDistributor.sol: the same design compiled by solc 0.8.37 with
OpenZeppelin 5's calldata proof walk. Uniswap's published test figures were measured under the
Istanbul schedule (before EIP-2929 cold-access pricing) and are printed as context only.

Proofs of depth d are a valid path to a root of a 2^d-leaf tree (see settlement_bench.py); the
2^10 case is also measured on a real 1024-account PayoutTree.

    .venv/bin/python benchmarks/gas_report.py [--backend tester|anvil|both]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from eth_account import Account

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from settlement_bench import Bench, path_root, require_uniswap, uniswap_artifact

from proofs.payout import payout_leaf_hash
from rewards import chain as chainmod
from rewards.settlement import ClaimRequest, Settlement

# Uniswap/merkle-distributor, test/MerkleDistributor.spec.ts ("gas" tests; ganache, hardfork
# 'istanbul'): 2 accounts 78,466; 10 accounts 80,960; second claim in a set word 65,940;
# 100,000 accounts (depth 17) 91,650 at index 50,000 and 91,586 at index 90,000.
UNISWAP_SOURCE = "Uniswap/merkle-distributor test/MerkleDistributor.spec.ts (Istanbul schedule)"
UNISWAP_PUBLISHED = {"2": 78_466, "10": 80_960, "10 (same word)": 65_940, "100,000": 91_650}


def slow_path_claim(bench: Bench) -> int:
    """First claim against an older root while the newest one waits out its delay: the history
    walk instead of the one-slot fast path (the uncommon case)."""
    w3 = bench.w3
    s, _ = Settlement.deploy(w3, bench.admin, token=bench.token, activation_delay=3600)
    s.fund(bench.admin, 10**24)
    a, b = Account.create().address, Account.create().address
    amount = 10**18
    leaves = (payout_leaf_hash(a, amount), payout_leaf_hash(b, amount))
    root, upper = path_root(leaves, 10, os.urandom(8))
    s.post_root(bench.admin, epoch=1, root=root, cumulative_total=10**24, inputs_hash=bytes(32))
    chainmod.advance_time(w3, 3600)
    s.post_root(
        bench.admin, epoch=2, root=b"\x07" * 32, cumulative_total=10**24, inputs_hash=bytes(32)
    )
    proof = (leaves[1], *upper)
    return s.claim(
        bench.admin, ClaimRequest(account=a, cumulative_amount=amount, proof=proof)
    ).gas_used


def report(backend: str) -> None:
    node = chainmod.AnvilNode().start() if backend == "anvil" else None
    try:
        w3 = chainmod.connect(node.url if node else None)
        b = Bench(backend, w3)
        print(f"\n== {backend} (Prague) ==")
        commit = b.s.record_commitment(b.admin, "gas-report-run", b"\x01" * 32)
        print(f"record commitment            {commit.gas_used:>9,}")
        print(f"deploy settlement            {b.deploy_tx.gas_used:>9,}")
        rows = []
        for depth in (10, 20):
            ours, uni, base = b.claim_depth(depth), b.uniswap(depth), b.baseline(depth)
            rows.append((depth, ours, uni, base))
            print(f"post root (2^{depth} run)        {ours['post']:>9,}")
        print(
            f"{'claim':<15}{'ours first':>11}{'ours top-up':>12}{'Uniswap first':>14}"
            f"{'Uniswap same':>13}{'Bitmap first':>13}{'Bitmap same':>12}{'ours-Uniswap':>13}"
        )
        for depth, ours, uni, base in rows:
            gap = ours["first"] - uni["first"]
            print(
                f"2^{depth} accounts{'':<3}{ours['first']:>11,}{ours['topup']:>12,}"
                f"{uni['first']:>14,}{uni['same_word']:>13,}{base['first']:>13,}"
                f"{base['same_word']:>12,}{gap:>+8,} ({gap / uni['first']:+.1%})"
            )
        print(f"real 1024-account tree, first claim  {b.real_tree_claim():>9,}")
        print(f"older root while newest pending (2^10, first claim)  {slow_path_claim(b):>9,}")
        per = b.batch((10, 50))
        print("batch, gas per claim (2^10): " + ", ".join(f"{k}: {v:,.0f}" for k, v in per.items()))
        met = all(o["first"] <= u["first"] for _, o, u, _ in rows)
        print(
            "goal (our first claim <= Uniswap's first-in-word claim, same tree size): "
            f"{'met' if met else 'NOT met'} against Uniswap's real bytecode "
            f"({uniswap_artifact()['source']}, measured on this EVM in this run)"
        )
    finally:
        if node is not None:
            node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["tester", "anvil", "both"], default="tester")
    args = parser.parse_args()
    require_uniswap()
    for backend in ("tester", "anvil") if args.backend == "both" else (args.backend,):
        report(backend)
    print(
        f"\ncontext only, Uniswap published (accounts: gas), {UNISWAP_SOURCE}: {UNISWAP_PUBLISHED}"
    )
    print("Istanbul figures predate EIP-2929 (cold SLOAD 800 then, 2,100 now; cold CALL 700 then,")
    print("2,600 now): the same bytecode measured above on Prague is the figure compared with.")


if __name__ == "__main__":
    main()

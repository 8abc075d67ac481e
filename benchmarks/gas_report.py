"""Gas of settlement: a claim in trees of 2^10 and 2^20 accounts, posting a root, recording a
commitment, against a same-EVM Uniswap-style airdrop measured in the same run.

The issue's goal: a claim costs no more gas than a claim on Uniswap's merkle-distributor for a tree
of the same size. Uniswap's own figures were measured under the Istanbul schedule (before EIP-2929
cold-access pricing), so they cannot be set against Prague figures; the fair comparison is
rewards/contracts/baseline/BitmapDistributor.sol (Uniswap's design: immutable root, claimed-bit
bitmap, packed leaf, plain transfer) on the same EVM, in the same run. Its "first in word" claim
writes a fresh bitmap word (20,000 gas), as our first claim of an account writes its fresh
cumulative slot; "same word" is a later claim into an already set word.

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

from settlement_bench import Bench, path_root

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
            ours, base = b.claim_depth(depth), b.baseline(depth)
            rows.append((depth, ours, base))
            print(f"post root (2^{depth} run)        {ours['post']:>9,}")
        print(
            f"{'claim':<29}{'ours first':>11}{'ours top-up':>12}"
            f"{'base first':>12}{'base same':>11}{'first-base':>11}"
        )
        for depth, ours, base in rows:
            gap = ours["first"] - base["first"]
            print(
                f"2^{depth} accounts{'':<17}{ours['first']:>11,}{ours['topup']:>12,}"
                f"{base['first']:>12,}{base['same_word']:>11,}{gap:>+11,}"
            )
        print(f"real 1024-account tree, first claim  {b.real_tree_claim():>9,}")
        print(f"older root while newest pending (2^10, first claim)  {slow_path_claim(b):>9,}")
        per = b.batch((10, 50))
        print("batch, gas per claim (2^10): " + ", ".join(f"{k}: {v:,.0f}" for k, v in per.items()))
        met = all(o["first"] <= ba["first"] for _, o, ba in rows)
        print(
            f"goal (first claim <= same-EVM Uniswap-style first-in-word claim): "
            f"{'met' if met else 'NOT met'}"
        )
    finally:
        if node is not None:
            node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["tester", "anvil", "both"], default="tester")
    args = parser.parse_args()
    for backend in ("tester", "anvil") if args.backend == "both" else (args.backend,):
        report(backend)
    print(f"\nUniswap published (accounts: gas), {UNISWAP_SOURCE}: {UNISWAP_PUBLISHED}")
    print("Istanbul figures predate EIP-2929 (cold SLOAD 800 then, 2,100 now; cold CALL 700 then,")
    print("2,600 now): the same-EVM baseline above is the fair comparison.")


if __name__ == "__main__":
    main()

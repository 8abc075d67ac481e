"""Gas and latency of settlement on both backends (eth-tester in-process, Anvil over JSON-RPC).

Prints, per backend: gas of deploy, post root, record commitment; gas of a claim with proofs of
depth 10 and 20 (trees of 2^10 and 2^20 accounts), first claim and a later top-up; gas per claim in
batches; and the median milliseconds per transaction. Two peers are measured in the same run, on
the same EVM and gas schedule, with the same token and the same proof construction:

* Uniswap's merkle-distributor itself: the compiled MerkleDistributor that Uniswap published in the
  npm package @uniswap/merkle-distributor 1.0.1 (solc 0.6.11, OpenZeppelin 3.1 MerkleProof), read
  from node_modules (`npm ci` installs it). The package is GPL-3.0: nothing of it is copied into
  this repository, the benchmark only deploys its published bytecode on a local test chain.
* BitmapDistributor (rewards/contracts/baseline): the same design written here for solc 0.8.37 and
  OpenZeppelin 5 (calldata proof walk), a stricter modern-compiler peer.

Proofs of depth d come from a path of d random siblings above the claimed leaves: a valid Merkle
root of a tree with 2^d leaves whose other leaves are unknown. Claim gas depends only on the proof
length and storage state, so this measures a 2^20-account claim without building 2^20 leaves; the
path is checked with proofs.payout.verify_payout first, and the 2^10 case is also measured on a
real PayoutTree of 1024 accounts.

    .venv/bin/python benchmarks/settlement_bench.py [--backend tester|anvil|both]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proofs.hashing import keccak256
from proofs.payout import PayoutTree, payout_leaf_hash, verify_payout
from rewards import chain as chainmod
from rewards.settlement import ClaimRequest, Settlement, deploy_token

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "rewards/contracts/baseline/artifacts.json"
UNISWAP_PACKAGE = REPO / "node_modules/@uniswap/merkle-distributor"
UNISWAP_JSON = UNISWAP_PACKAGE / "build/MerkleDistributor.json"
# Uniswap merkle-distributor's own test suite (test/MerkleDistributor.spec.ts, ganache Istanbul
# schedule: no EIP-2929 cold-access surcharges): 2 accounts 78,466 gas; 10 accounts 80,960;
# 100,000 accounts (depth 17) 91,650; second claim into an already set bitmap word 65,940.
UNISWAP_PUBLISHED = {"2 accounts": 78_466, "10 accounts": 80_960, "100k accounts": 91_650}


def bitmap_artifact() -> dict[str, Any]:
    """ABI and bytecode of rewards/contracts/baseline/BitmapDistributor.sol (solc 0.8.37)."""
    art: dict[str, Any] = json.loads(BASELINE.read_text())["contracts"]["BitmapDistributor"]
    return art


def uniswap_artifact() -> dict[str, Any]:
    """ABI and bytecode of Uniswap's MerkleDistributor as published on npm, plus ``source``: the
    package, its version and the compiler that built it (from the artifact's metadata). Only this
    published bytecode is deployed, in benchmarks and tests; no GPL source is in this repository."""
    try:
        art = json.loads(UNISWAP_JSON.read_text())
        version = json.loads((UNISWAP_PACKAGE / "package.json").read_text())["version"]
    except FileNotFoundError:
        raise RuntimeError(
            f"{UNISWAP_JSON.relative_to(REPO)} is missing: run `npm ci` in {REPO} (package.json "
            "pins @uniswap/merkle-distributor 1.0.1, whose compiled contract is the gas peer)"
        ) from None
    solc = json.loads(art["metadata"])["compiler"]["version"]
    bytecode = art["bytecode"] if art["bytecode"].startswith("0x") else "0x" + art["bytecode"]
    return {
        "abi": art["abi"],
        "bytecode": bytecode,
        "source": f"npm @uniswap/merkle-distributor {version}, bytecode by solc {solc}",
    }


def require_uniswap() -> None:
    """Exit with the message of :func:`uniswap_artifact` (run `npm ci`) before any chain starts."""
    try:
        uniswap_artifact()
    except RuntimeError as exc:
        raise SystemExit(f"error: {exc}") from None


def airdrop_leaf(index: int, account: str, amount: int) -> bytes:
    """Uniswap's leaf, keccak256(abi.encodePacked(uint256 index, address account, uint256 amt))."""
    return keccak256(
        index.to_bytes(32, "big") + bytes.fromhex(account[2:]) + amount.to_bytes(32, "big")
    )


def node_hash(a: bytes, b: bytes) -> bytes:
    return keccak256(min(a, b) + max(a, b))  # OpenZeppelin's commutative (sorted) pair hash


def path_root(leaves: tuple[bytes, bytes], depth: int, seed: bytes) -> tuple[bytes, list[bytes]]:
    """Root over two sibling leaves plus depth-1 pseudo-random siblings; returns the shared upper
    path (the proof of leaf i is [other leaf, *upper])."""
    upper = [keccak256(seed + i.to_bytes(4, "big")) for i in range(depth - 1)]
    node = node_hash(*leaves)
    for sibling in upper:
        node = node_hash(node, sibling)
    return node, upper


class Bench:
    def __init__(self, backend: str, w3: Web3) -> None:
        self.backend, self.w3 = backend, w3
        self.admin = self.fresh("admin")
        self.token = deploy_token(w3, self.admin, supply=10**30, holder=self.admin.address)
        self.s, self.deploy_tx = Settlement.deploy(
            w3, self.admin, token=self.token, activation_delay=0
        )
        self.s.fund(self.admin, 10**27)
        self.tx_ms: list[float] = []
        self.epoch = 0

    def fresh(self, label: str) -> LocalAccount:
        acct: LocalAccount = Account.create(label)
        chainmod.fund_from_dev_account(self.w3, acct.address, 10**19)
        return acct

    def timed(self, fn, *args):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = fn(*args)
        self.tx_ms.append((time.perf_counter() - t0) * 1000)
        return out

    def post(self, root: bytes) -> int:
        """Post ``root`` as the next epoch; with delay 0 it is active from the next block."""
        self.epoch += 1
        result = self.s.post_root(
            self.admin, epoch=self.epoch, root=root, cumulative_total=10**27, inputs_hash=bytes(32)
        )
        return result.tx.gas_used if result.tx else 0

    def claim_depth(self, depth: int) -> dict[str, int]:
        a, b = Account.create().address, Account.create().address
        amount = 10**18
        leaves = (payout_leaf_hash(a, amount), payout_leaf_hash(b, amount))
        root, upper = path_root(leaves, depth, os.urandom(8))
        proof_a = (leaves[1], *upper)
        if not verify_payout(root, a, amount, proof_a):
            raise RuntimeError("synthetic path does not verify")
        post_gas = self.post(root)
        first = self.timed(
            self.s.claim,
            self.admin,
            ClaimRequest(account=a, cumulative_amount=amount, proof=proof_a),
        )
        # Top-up: the next epoch raises a's cumulative amount; slot and balance are now non-zero.
        leaves2 = (payout_leaf_hash(a, 2 * amount), payout_leaf_hash(b, amount))
        root2, upper2 = path_root(leaves2, depth, os.urandom(8))
        self.post(root2)
        again = self.timed(
            self.s.claim,
            self.admin,
            ClaimRequest(account=a, cumulative_amount=2 * amount, proof=(leaves2[1], *upper2)),
        )
        return {"post": post_gas, "first": first.gas_used, "topup": again.gas_used}

    def real_tree_claim(self, n: int = 1024) -> int:
        entries = [(Account.create().address, 10**15 + i) for i in range(n)]
        tree = PayoutTree.build(entries)
        self.post(tree.root)
        a, amt = entries[n // 2]
        return int(
            self.timed(
                self.s.claim,
                self.admin,
                ClaimRequest(account=a, cumulative_amount=amt, proof=tree.proof_for(a)),
            ).gas_used
        )

    def batch(self, sizes: tuple[int, ...]) -> dict[int, float]:
        entries = [(Account.create().address, 10**15 + i) for i in range(1024)]
        tree = PayoutTree.build(entries)
        self.post(tree.root)
        out, start = {}, 0
        for k in sizes:
            chunk = entries[start : start + k]
            start += k
            reqs = [
                ClaimRequest(account=a, cumulative_amount=v, proof=tree.proof_for(a))
                for a, v in chunk
            ]
            tx = self.timed(self.s.claim_batch, self.admin, reqs)
            out[k] = tx.gas_used / k
        return out

    def airdrop(self, art: dict[str, Any], depth: int) -> dict[str, int]:
        """Deploy a Uniswap-style distributor (constructor(token, root), claim(index, account,
        amount, proof)) for a depth-``depth`` tree and make two claims: index 0 writes a fresh
        bitmap word ("first"), index 1 sets a bit in that same word ("same_word")."""
        a, b = Account.create().address, Account.create().address
        amount = 10**18
        leaves = (airdrop_leaf(0, a, amount), airdrop_leaf(1, b, amount))
        root, upper = path_root(leaves, depth, os.urandom(8))
        factory = self.w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
        tx = chainmod.send(self.w3, self.admin, factory.constructor(self.token, root))
        addr = self.w3.eth.get_transaction_receipt(tx.tx_hash)["contractAddress"]  # type: ignore[arg-type]
        dist = self.w3.eth.contract(address=addr, abi=art["abi"])
        chainmod.send(self.w3, self.admin, self.s.token.functions.transfer(addr, 10 * amount))
        first = chainmod.send(
            self.w3, self.admin, dist.functions.claim(0, a, amount, [leaves[1], *upper])
        )
        second = chainmod.send(
            self.w3, self.admin, dist.functions.claim(1, b, amount, [leaves[0], *upper])
        )
        return {"first": first.gas_used, "same_word": second.gas_used}

    def baseline(self, depth: int) -> dict[str, int]:
        """BitmapDistributor, the solc 0.8.37 re-implementation of Uniswap's design."""
        return self.airdrop(bitmap_artifact(), depth)

    def uniswap(self, depth: int) -> dict[str, int]:
        """Uniswap's own MerkleDistributor bytecode from npm (solc 0.6.11)."""
        return self.airdrop(uniswap_artifact(), depth)


def run(backend: str) -> None:
    node = None
    if backend == "anvil":
        node = chainmod.AnvilNode().start()
    try:
        w3 = chainmod.connect(node.url if node else None)
        b = Bench(backend, w3)
        print(f"\n== {backend} ==")
        print(f"deploy settlement: {b.deploy_tx.gas_used:,} gas")
        commit = b.timed(b.s.record_commitment, b.admin, "bench-run", b"\x01" * 32)
        print(f"record commitment: {commit.gas_used:,} gas")
        for depth in (10, 20):
            ours, uni, base = b.claim_depth(depth), b.uniswap(depth), b.baseline(depth)
            print(
                f"2^{depth} accounts: post root {ours['post']:,} gas; "
                f"claim first {ours['first']:,}, top-up {ours['topup']:,} | "
                f"Uniswap bytecode first-in-word {uni['first']:,}, same word {uni['same_word']:,} "
                f"| bitmap baseline {base['first']:,} / {base['same_word']:,} | "
                f"ours/Uniswap first {ours['first'] / uni['first']:.3f}"
            )
        print(f"real 1024-account PayoutTree claim: {b.real_tree_claim():,} gas")
        per = b.batch((1, 10, 50))
        print("batch claim gas per claim: " + ", ".join(f"{k}: {v:,.0f}" for k, v in per.items()))
        print(f"median ms per claim/commit tx: {statistics.median(b.tx_ms):.1f} (n={len(b.tx_ms)})")
        print(f"Uniswap peer: {uniswap_artifact()['source']}, deployed on this chain")
        print(f"Uniswap published (Istanbul schedule, context only): {UNISWAP_PUBLISHED}")
    finally:
        if node is not None:
            node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["tester", "anvil", "both"], default="both")
    args = parser.parse_args()
    require_uniswap()
    for backend in ("tester", "anvil") if args.backend == "both" else (args.backend,):
        run(backend)


if __name__ == "__main__":
    main()

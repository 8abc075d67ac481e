"""Placeholder end-to-end demo: runs what exists today and exits 0.

The full demo (four peers, an auditor, payouts on a local chain) lands with the Demo issue.
"""
from __future__ import annotations

from proofs.hashing import leaf_hash

if __name__ == "__main__":
    print("veritrain demo (placeholder): proofs available, leaf hash of b'veritrain' =",
          leaf_hash(b"veritrain").hex())

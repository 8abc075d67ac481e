"""What any peer can do to a store with a key of its own: re-chain every step record and window
manifest to a new header hash and re-sign the manifests (tests of copied and re-declared runs)."""

from __future__ import annotations

import dataclasses

from proofs.codec import canonical_json
from proofs.hashing import Hash32
from proofs.signatures import KeyPair
from trainer.manifest import sign_manifest
from trainer.store import RunStore, manifest_name


def rechain(store: RunStore, keypair: KeyPair, head: Hash32, *, run_id: str | None = None) -> None:
    """Rewrite ``store``'s manifests to chain from header hash ``head`` (each record's ``prev``,
    each manifest's ``prev``), renamed to ``run_id`` when given, signed by ``keypair``."""
    prev_manifest = prev_record = head
    for w in store.manifest_windows():
        m = store.read_manifest(w).manifest
        records = []
        for r in m.records:
            records.append(dataclasses.replace(r, prev=prev_record))
            prev_record = records[-1].hash()
        m = dataclasses.replace(
            m, run_id=run_id or m.run_id, records=tuple(records), prev=prev_manifest
        )
        prev_manifest = m.hash()
        data = canonical_json(sign_manifest(keypair, m).to_json())
        store.put_bytes(manifest_name(w), data, exclusive=False)

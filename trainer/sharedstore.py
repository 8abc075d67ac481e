"""The shared store: one folder (any fsspec URL) that the coordinator, peers and aggregator share.

Layout (docs/protocol.md, "Shared runs")::

    genesis.json                        signed genesis, written once
    rounds/r{r:06d}.json                signed round record closing round r, written once
    objects/<root hex>.vtar             theta artifacts and local-state artifacts
    contributions/<peer>/r{r:06d}.json  signed contribution record of <peer> for round r
    contributions/<peer>/r{r:06d}.delta its payload
    peers/<peer>/r{r:06d}/              the run store of <peer>'s inner steps of round r

Writes are atomic (trainer.store.RunStore). Every peer may write under contributions/, so the
names found there are never trusted: :meth:`SharedStore.list_contribution_files` returns them as
listed, and :meth:`SharedStore.read_contribution_file` refuses a name that could leave the store.
Readers bound every read (JSON records: proofs.jsonlimits) and do NOT check signatures.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from torch import nn

from proofs.codec import canonical_json
from proofs.errors import EncodingError
from proofs.hashing import Root
from proofs.jsonlimits import UntrustedJsonError, loads_untrusted
from trainer.artifact import first_bad_leaf
from trainer.contribution import SignedContribution
from trainer.globalstate import theta_from_artifact
from trainer.recipe import check_run_id
from trainer.roundrecord import SignedRoundRecord
from trainer.sharedrun import SignedGenesis, check_round
from trainer.store import Data, RunStore, StoreError

GENESIS_PATH = "genesis.json"
ROUND_DIR = "rounds"
CONTRIBUTION_DIR = "contributions"
PEER_DIR = "peers"
MAX_GENESIS_BYTES = 4 << 20
"""A genesis is ~170 bytes per roster peer: 4096 peers fit in under 1 MiB."""
MAX_ROUND_BYTES = 8 << 20
"""A round record is under ~1 KiB per excluded file (detail <= 512, file <= 256 characters)."""
MAX_CONTRIBUTION_BYTES = 64 << 10
"""A contribution is ~1 KiB plus ~25 bytes per inner loss (at most 2048 losses)."""
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""A folder or file name under contributions/ that may be joined into a path (not . or ..)."""
_ROUND_RE = re.compile(r"r(\d{6})\.json")
_TMP_PREFIX = ".tmp-"  # RunStore's in-flight atomic writes; never a record


def round_name(r: int) -> str:
    """``rounds/r{r:06d}.json``."""
    return f"{ROUND_DIR}/r{check_round(r):06d}.json"


def contribution_name(peer: str, r: int) -> str:
    """``contributions/<peer>/r{r:06d}.json``."""
    return f"{CONTRIBUTION_DIR}/{check_run_id(peer)}/r{check_round(r):06d}.json"


def payload_name(peer: str, r: int) -> str:
    """``contributions/<peer>/r{r:06d}.delta``."""
    return f"{CONTRIBUTION_DIR}/{check_run_id(peer)}/r{check_round(r):06d}.delta"


def is_safe_name(name: str) -> bool:
    """True for a name that can be joined into a store path without leaving its folder."""
    return (
        isinstance(name, str)
        and SAFE_NAME.fullmatch(name) is not None
        and name.strip(".") != ""  # "." and ".." match the pattern
    )


class SharedStore:
    """A shared run's folder at ``url`` (local path, ``file://``, ``memory://``, ...)."""

    def __init__(self, url: str | os.PathLike[str]) -> None:
        self.store = RunStore(url)
        self.url = self.store.url

    # ---- genesis and round records ------------------------------------------------------------

    def _put_once(self, rel: str, data: bytes) -> None:
        if not self.store.put_bytes(rel, data) and self.store.read_bytes(rel) != data:
            raise StoreError(f"{self.url}: {rel} already exists with different content")

    def _read_json(self, rel: str, max_bytes: int) -> Any:
        raw = self.store.read_bytes(rel, 0, max_bytes + 1)
        try:
            return loads_untrusted(raw, max_bytes=max_bytes, what=f"{self.url}: {rel}")
        except UntrustedJsonError as exc:
            raise StoreError(str(exc)) from exc

    def put_genesis(self, signed: SignedGenesis) -> None:
        """Write the genesis; StoreError if a different one is already there."""
        self._put_once(GENESIS_PATH, _canonical(signed))

    def has_genesis(self) -> bool:
        return self.store.exists(GENESIS_PATH)

    def read_genesis(self) -> SignedGenesis:
        """The signed genesis (signature NOT checked); StoreError if missing or malformed."""
        try:
            return SignedGenesis.from_json(self._read_json(GENESIS_PATH, MAX_GENESIS_BYTES))
        except EncodingError as exc:
            raise StoreError(f"{self.url}: {GENESIS_PATH}: {exc}") from exc

    def put_round(self, signed: SignedRoundRecord) -> None:
        """Write round ``signed.round.round``'s record, once: StoreError if a different record
        is already there (an aggregator re-run after a crash writes the same bytes)."""
        self._put_once(round_name(signed.round.round), _canonical(signed))

    def read_round(self, r: int) -> SignedRoundRecord:
        """Round ``r``'s signed record (signature NOT checked). StoreError if missing, malformed
        or holding another round's record."""
        rel = round_name(r)
        try:
            signed = SignedRoundRecord.from_json(self._read_json(rel, MAX_ROUND_BYTES))
        except EncodingError as exc:
            raise StoreError(f"{self.url}: {rel}: {exc}") from exc
        if signed.round.round != r:
            raise StoreError(f"{self.url}: {rel} holds the record of round {signed.round.round}")
        return signed

    def rounds(self) -> list[int]:
        """Rounds that have a record file, ascending (gaps possible if tampered)."""
        found = []
        for name in self._ls(ROUND_DIR):
            match = _ROUND_RE.fullmatch(name)
            if match:
                found.append(int(match.group(1)))
        return sorted(found)

    def latest_round(self) -> int | None:
        """The highest round with a record, or None before round 0 closes."""
        done = self.rounds()
        return done[-1] if done else None

    # ---- artifacts ----------------------------------------------------------------------------

    def put_object(self, root: Root, payload: Data) -> bool:
        """Store an artifact under its root, durably (records written after it name it).
        Returns False when it was already there."""
        written = self.store.put_object(root, payload)
        self.store.sync()
        return written

    def read_verified_leaves(self, root: bytes) -> list[bytes]:
        """The leaves of artifact ``root``, each checked against the table and the table
        against ``root``. StoreError if missing, malformed or not matching."""
        index, leaves = self.store.read_artifact(root)
        bad = first_bad_leaf(index, leaves, root)
        if bad is not None:
            where = "its table" if bad == -1 else f"leaf {bad}"
            raise StoreError(f"{self.url}: artifact {root.hex()}: {where} does not match the root")
        return leaves

    def read_theta(self, root: bytes, model: nn.Module) -> torch.Tensor:
        """The flat theta stored under ``root``, verified against it and shaped like ``model``'s
        parameters. StoreError otherwise."""
        leaves = self.read_verified_leaves(root)
        try:
            return theta_from_artifact(leaves, model)
        except EncodingError as exc:
            raise StoreError(f"{self.url}: artifact {root.hex()}: {exc}") from exc

    # ---- contributions ------------------------------------------------------------------------

    def put_contribution(self, signed: SignedContribution, payload: bytes) -> None:
        """Write the payload, then the record (a reader that finds the record finds its
        payload). Each is written once: StoreError if different bytes are already there."""
        record = signed.contribution
        self._put_once(payload_name(record.peer, record.round), payload)
        self._put_once(contribution_name(record.peer, record.round), _canonical(signed))

    def read_contribution(self, peer: str, r: int) -> SignedContribution:
        """``peer``'s signed contribution of round ``r`` (signature NOT checked)."""
        rel = contribution_name(peer, r)
        try:
            return SignedContribution.from_json(self._read_json(rel, MAX_CONTRIBUTION_BYTES))
        except EncodingError as exc:
            raise StoreError(f"{self.url}: {rel}: {exc}") from exc

    def list_contribution_files(self) -> list[tuple[str, str]]:
        """(peer folder, file name) of every file under contributions/, sorted, names as
        listed: unsafe names (:func:`is_safe_name`) included, for the caller to exclude.
        Entries directly under contributions/ that are not folders are not listed."""
        out = []
        base = f"{self.store.root}/{CONTRIBUTION_DIR}"
        try:
            entries = self.store.fs.ls(base, detail=True)
        except FileNotFoundError:
            return []
        for entry in entries:
            if entry.get("type") != "directory":
                continue
            peer = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
            for name in self._ls(f"{CONTRIBUTION_DIR}/{peer}"):
                if not name.startswith(_TMP_PREFIX):
                    out.append((peer, name))
        return sorted(out)

    def read_contribution_file(self, peer: str, name: str, max_bytes: int) -> bytes:
        """The bytes of ``contributions/<peer>/<name>``, at most ``max_bytes``. StoreError when
        either name is unsafe, the file is missing, not a regular file (a symlink on a local
        store) or larger than ``max_bytes``."""
        if not (is_safe_name(peer) and is_safe_name(name)):
            raise StoreError(f"unsafe contribution file name {peer!r:.80}/{name!r:.80}")
        rel = f"{CONTRIBUTION_DIR}/{peer}/{name}"
        if isinstance(self.store.fs, LocalFileSystem):
            raw = _read_local_regular(f"{self.store.root}/{rel}", max_bytes)
        else:
            raw = self.store.read_bytes(rel, 0, max_bytes + 1)
        if len(raw) > max_bytes:
            raise StoreError(f"{self.url}: {rel} is larger than its limit of {max_bytes} bytes")
        return raw

    def inner_store(self, peer: str, r: int) -> RunStore:
        """The run store of ``peer``'s inner steps of round ``r``."""
        return RunStore(
            f"{self.url.rstrip('/')}/{PEER_DIR}/{check_run_id(peer)}/r{check_round(r):06d}"
        )

    def _ls(self, rel: str) -> list[str]:
        try:
            names = self.store.fs.ls(f"{self.store.root}/{rel}", detail=False)
        except FileNotFoundError:
            return []
        return [str(n).rstrip("/").rsplit("/", 1)[-1] for n in names]


def _canonical(signed: SignedGenesis | SignedRoundRecord | SignedContribution) -> bytes:
    return canonical_json(signed.to_json())


def _read_local_regular(path: str, max_bytes: int) -> bytes:
    """Read at most ``max_bytes + 1`` bytes of a regular file that is not a symlink and whose
    folder is not one (a peer must not make the aggregator read a file outside the store)."""
    folder = os.path.dirname(path)
    for link in (folder, os.path.dirname(folder)):
        if os.path.islink(link):
            raise StoreError(f"{link} is a symlink; contribution folders must be real folders")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise StoreError(f"{path} does not exist") from None
    except OSError as exc:  # ELOOP: a symlink
        raise StoreError(f"cannot open {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StoreError(f"{path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(max_bytes + 1)
    finally:
        os.close(fd)

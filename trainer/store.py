"""The run store: one folder (any fsspec URL) holding a run's header, manifests and artifacts.

Layout (docs/run-store.md)::

    RUN/header.json                 signed run header, written once
    RUN/manifests/w000000.json      signed window manifests, w = 0, 1, 2, ... (written once each)
    RUN/objects/<root hex>.vtar     artifacts (gradient and state checkpoints), named by Merkle root

Every write is atomic: a local file is written to a temp name in the same folder, fsynced and then
linked into place (``os.link`` fails if the name exists, so nothing committed is ever replaced);
other filesystems get one whole-object put, which object stores apply atomically. Readers never
see a half-written file under a final name.

The read API is what the auditor and the reward engine use; it never trusts what it reads: parse
errors raise :class:`StoreError`, and checking roots and signatures is the caller's job
(``trainer.verify`` does all of it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from proofs.codec import canonical_json
from proofs.errors import EncodingError, VeritrainError
from proofs.hashing import Root
from proofs.jsonlimits import UntrustedJsonError, loads_untrusted
from trainer.artifact import PREFIX_SIZE, ArtifactIndex, parse_artifact, parse_prefix, parse_table
from trainer.manifest import SignedWindowManifest
from trainer.recipe import SignedRunHeader

logger = logging.getLogger(__name__)

Data = bytes | Sequence[bytes | memoryview]
"""File contents: one buffer, or parts written in order (no join copy on local stores)."""

HEADER_PATH = "header.json"
MANIFEST_DIR = "manifests"
OBJECT_DIR = "objects"
OBJECT_SUFFIX = ".vtar"
_MANIFEST_RE = re.compile(r"^w(\d{6,})\.json$")

# Size limits of the JSON files a peer writes (docs/run-store.md, "Limits"); nesting is limited
# to proofs.jsonlimits.MAX_DEPTH. A header is a few KB (large models: their parameter names);
# a manifest ~0.5 KB per step plus ~10 bytes per batch index, i.e. ~1 MB for 1000 steps.
MAX_HEADER_BYTES = 4 << 20
MAX_MANIFEST_BYTES = 64 << 20


class StoreError(VeritrainError, OSError):
    """A store entry is missing, unreadable, malformed, or would be overwritten."""


def manifest_name(window: int) -> str:
    """Relative path of window ``window``'s manifest."""
    return f"{MANIFEST_DIR}/w{window:06d}.json"


def object_name(root: bytes) -> str:
    """Relative path of the artifact whose Merkle root is ``root``."""
    return f"{OBJECT_DIR}/{root.hex()}{OBJECT_SUFFIX}"


class RunStore:
    """A run folder at ``url`` (local path, ``file://``, ``memory://``, ``s3://``, ...)."""

    def __init__(self, url: str | os.PathLike[str]) -> None:
        self.url = str(url)
        fs, path = fsspec.core.url_to_fs(self.url)
        self.fs = fs
        self.root = str(path).rstrip("/")
        self._local = isinstance(fs, LocalFileSystem)
        self._unsynced: list[str] = []
        self._dirs: set[str] = set()

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    # ---- writes -------------------------------------------------------------------------------

    def put_bytes(
        self, rel: str, data: Data, *, exclusive: bool = True, durable: bool = True
    ) -> bool:
        """Write ``data`` at ``rel`` atomically. Returns False (writing nothing) when ``rel``
        already exists and ``exclusive`` is set; with ``exclusive=False`` an existing file is
        replaced atomically. ``durable=False`` skips the fsync: the caller must call
        :meth:`sync` before committing anything that names the file."""
        path = self._path(rel)
        if self._local:
            written = _put_local(path, data, exclusive=exclusive, durable=durable)
            if written and not durable:
                self._unsynced.append(path)
            return written
        if exclusive and self.fs.exists(path):
            return False
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        self.fs.pipe_file(path, data if isinstance(data, bytes) else b"".join(data))
        return True

    def put_object(self, root: Root, payload: Data) -> bool:
        """Store an artifact under its root, without fsync (see :meth:`sync`).

        Returns False when it is already there with the right size (never rewritten). A file of
        the wrong size under that name can only be a write that a power loss cut before any
        manifest named it (manifests are written after :meth:`sync`), so it is replaced.
        """
        rel = object_name(root)
        if not self._local:
            return self.put_bytes(rel, payload, durable=False)
        # One stat, then the write: few syscalls, as each one hands the GIL to the training thread
        # and waits to get it back (``os.link`` still refuses to replace anything).
        path = self._path(rel)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            size = None
        if size == _size(payload):
            return False
        if size is not None:
            logger.warning("replacing torn, never-committed artifact %s", rel)
        parent = os.path.dirname(path)
        if parent not in self._dirs:
            os.makedirs(parent, exist_ok=True)
            self._dirs.add(parent)
        written = _write_local(path, payload, exclusive=size is None, durable=False)
        if written:
            self._unsynced.append(path)
        return written

    def sync(self) -> None:
        """fsync every artifact written since the last call (local stores; a no-op elsewhere,
        where a completed put is already durable). Called before each manifest is written."""
        for path in self._unsynced:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if self._unsynced:
            _fsync_dir(os.path.dirname(self._unsynced[0]))
        self._unsynced.clear()

    def put_header(self, header: SignedRunHeader) -> None:
        """Write the run header; StoreError if a different header is already there."""
        data = canonical_json(header.to_json())
        if not self.put_bytes(HEADER_PATH, data) and self.read_bytes(HEADER_PATH) != data:
            raise StoreError(f"{self.url}: a different run header already exists")

    def put_manifest(self, signed: SignedWindowManifest) -> None:
        """Write a window manifest; StoreError if a different one exists for that window."""
        rel = manifest_name(signed.manifest.window)
        data = canonical_json(signed.to_json())
        if not self.put_bytes(rel, data) and self.read_bytes(rel) != data:
            raise StoreError(f"{self.url}: {rel} already exists with different content")

    # ---- reads --------------------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self._path(rel)))

    def read_bytes(self, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of ``rel`` (all of it by default); StoreError if missing."""
        try:
            data = self.fs.cat_file(self._path(rel), start=start, end=end)
        except (FileNotFoundError, OSError) as exc:
            raise StoreError(f"{self.url}: cannot read {rel}: {exc}") from exc
        return bytes(data)

    def _read_json(self, rel: str, max_bytes: int) -> Mapping[str, Any]:
        # One byte past the limit is enough to refuse an oversized file without reading it all.
        raw = self.read_bytes(rel, 0, max_bytes + 1)
        if len(raw) > max_bytes:
            raise StoreError(f"{self.url}: {rel} is larger than its limit of {max_bytes} bytes")
        try:
            obj = loads_untrusted(raw, max_bytes=max_bytes, what=rel)
        except UntrustedJsonError as exc:
            raise StoreError(f"{self.url}: {exc}") from exc
        if not isinstance(obj, dict):
            raise StoreError(f"{self.url}: {rel} is not a JSON object")
        return obj

    def has_header(self) -> bool:
        return self.exists(HEADER_PATH)

    def read_header(self) -> SignedRunHeader:
        """The signed run header (signature NOT checked). StoreError if missing or malformed."""
        try:
            return SignedRunHeader.from_json(self._read_json(HEADER_PATH, MAX_HEADER_BYTES))
        except EncodingError as exc:
            raise StoreError(f"{self.url}: {HEADER_PATH}: {exc}") from exc

    def manifest_windows(self) -> list[int]:
        """Window numbers that have a manifest file, ascending (gaps possible if tampered)."""
        try:
            names = self.fs.ls(self._path(MANIFEST_DIR), detail=False)
        except FileNotFoundError:
            return []
        windows = []
        for name in names:
            match = _MANIFEST_RE.match(str(name).rsplit("/", 1)[-1])
            if match:
                windows.append(int(match.group(1)))
        return sorted(windows)

    def read_manifest(self, window: int) -> SignedWindowManifest:
        """Window ``window``'s signed manifest (signature NOT checked); StoreError if malformed."""
        rel = manifest_name(window)
        try:
            return SignedWindowManifest.from_json(self._read_json(rel, MAX_MANIFEST_BYTES))
        except EncodingError as exc:
            raise StoreError(f"{self.url}: {rel}: {exc}") from exc

    def read_manifests(self) -> list[SignedWindowManifest]:
        """Every manifest in window order."""
        return [self.read_manifest(w) for w in self.manifest_windows()]

    def has_object(self, root: bytes) -> bool:
        return self.exists(object_name(root))

    def read_index(self, root: bytes) -> ArtifactIndex:
        """The leaf table of artifact ``root`` (two small range reads)."""
        rel = object_name(root)
        try:
            count = parse_prefix(self.read_bytes(rel, 0, PREFIX_SIZE))
            return parse_table(self.read_bytes(rel, PREFIX_SIZE, PREFIX_SIZE + 40 * count), count)
        except EncodingError as exc:
            raise StoreError(f"{self.url}: {rel}: {exc}") from exc

    def read_leaves(
        self, root: bytes, indices: Iterable[int], *, index: ArtifactIndex | None = None
    ) -> dict[int, bytes]:
        """Leaves ``indices`` of artifact ``root``, NOT checked: one range read per run of
        consecutive indices (a whole artifact is one read), so an object store sees few requests.

        Check them with ``proofs.hashing.leaf_hash`` against ``index.hashes`` and the root with
        ``index.tree().root``, or build a multiproof with ``index.tree().multiproof(indices)``.
        A file shorter than its table yields short leaves, which fail that check.
        """
        table = index if index is not None else self.read_index(root)
        rel = object_name(root)
        wanted = sorted(set(indices))
        bad = next((i for i in wanted if not 0 <= i < table.leaf_count), None)
        if bad is not None:
            raise StoreError(
                f"{self.url}: {rel}: leaf {bad} out of range (artifact has {table.leaf_count})"
            )
        starts = table.leaf_starts()
        out: dict[int, bytes] = {}
        for run in _consecutive_runs(wanted):
            base = starts[run[0]]
            data = self.read_bytes(rel, base, starts[run[-1] + 1])
            for i in run:
                out[i] = data[starts[i] - base : starts[i + 1] - base]
        return out

    def read_artifact(self, root: bytes) -> tuple[ArtifactIndex, list[bytes]]:
        """The whole artifact ``root``: (table, leaves), NOT checked against the root."""
        rel = object_name(root)
        try:
            return parse_artifact(self.read_bytes(rel))
        except EncodingError as exc:
            raise StoreError(f"{self.url}: {rel}: {exc}") from exc


def _consecutive_runs(sorted_indices: Sequence[int]) -> list[list[int]]:
    """``[0, 1, 2, 5, 6]`` -> ``[[0, 1, 2], [5, 6]]``: leaves of a run are adjacent in the file."""
    runs: list[list[int]] = []
    for i in sorted_indices:
        if runs and runs[-1][-1] + 1 == i:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _size(data: Data) -> int:
    return len(data) if isinstance(data, bytes) else sum(memoryview(p).nbytes for p in data)


def _put_local(path: str, data: Data, *, exclusive: bool, durable: bool) -> bool:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if exclusive and os.path.exists(path):
        return False
    return _write_local(path, data, exclusive=exclusive, durable=durable)


def _write_local(path: str, data: Data, *, exclusive: bool, durable: bool) -> bool:
    """Temp file + (link | rename) into ``path``, whose folder exists; False if ``exclusive`` and
    ``path`` appeared meanwhile."""
    parent = os.path.dirname(path)
    tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o666)
        try:
            _write_all(fd, [data] if isinstance(data, bytes) else data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            try:
                os.link(tmp, path)  # atomic and fails if the name exists: never overwrites
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):  # gone after a rename
            os.unlink(tmp)
    if durable:
        _fsync_dir(parent)
    return True


_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 16


def _write_all(fd: int, parts: Sequence[bytes | memoryview]) -> None:
    """Write ``parts`` in order with as few syscalls (and GIL releases) as possible: ``writev``
    of up to IOV_MAX buffers at a time, resumed after short writes."""
    views = [v for v in (memoryview(p).cast("B") for p in parts) if v.nbytes]
    if not hasattr(os, "writev"):  # pragma: no cover - every POSIX platform has writev
        for view in views:
            while view.nbytes:
                view = view[os.write(fd, view) :]
        return
    while views:
        batch = views[:_IOV_MAX]
        written = os.writev(fd, batch)
        done = 0
        while done < len(batch) and written >= batch[done].nbytes:
            written -= batch[done].nbytes
            done += 1
        views = views[done:]
        if written:
            views[0] = views[0][written:]


def _fsync_dir(path: str) -> None:
    """Make a directory's new entries durable (POSIX needs the directory itself fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_store(url: str | os.PathLike[str]) -> RunStore:
    """A :class:`RunStore` for ``url`` (the function form the CLI and the auditor use)."""
    return RunStore(url)

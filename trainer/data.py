"""Byte-level corpus from files on disk, its commitment, and the batch of any (run seed, step).

The corpus is the concatenation of the named files' bytes, in sorted relative-path order (folders
are walked recursively for files with the chosen suffixes). Its commitment is the proofs/ Merkle
root over the corpus bytes cut in ``chunk_size`` pieces, so a run header binds the exact bytes.

Batch offsets are a pure function of (run seed, step, batch size, context, corpus size): anyone
with the corpus and the seed rebuilds step t's batch without replaying steps 0..t-1
(:func:`batch_offsets`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import sysconfig
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from proofs.codec import MAX_STR, check_keys, get_bytes, get_int, get_str
from proofs.errors import EncodingError
from proofs.hashing import Root

logger = logging.getLogger(__name__)

CORPUS_CHUNK_SIZE = 1 << 20
"""Leaf size of the corpus commitment tree (bytes)."""

BATCH_MAGIC = b"veritrain/batch/v1\x00"
DEFAULT_SUFFIXES = (".py",)
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True, kw_only=True, slots=True)
class CorpusCommitment:
    """What a run header records about its data: the Merkle root over the corpus bytes and sizes."""

    root: Root
    nbytes: int
    file_count: int
    chunk_size: int
    source: str
    """Human-readable description of where the bytes came from (not part of the binding)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "root": "0x" + self.root.hex(),
            "nbytes": self.nbytes,
            "file_count": self.file_count,
            "chunk_size": self.chunk_size,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> CorpusCommitment:
        check_keys(obj, "dataset", ("root", "nbytes", "file_count", "chunk_size", "source"))
        return cls(
            root=Root(get_bytes(obj, "root", 32)),
            nbytes=get_int(obj, "nbytes"),
            file_count=get_int(obj, "file_count"),
            chunk_size=get_int(obj, "chunk_size"),
            source=get_str(obj, "source"),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Batch:
    """One step's batch: the corpus offsets it was cut from, inputs and next-byte targets."""

    offsets: tuple[int, ...]
    inputs: torch.Tensor
    """(batch, context) int64 byte ids."""
    targets: torch.Tensor
    """(batch, context) int64: ``inputs`` shifted by one byte."""


class Corpus:
    """Immutable corpus bytes plus the files they came from."""

    def __init__(self, data: bytes, files: Sequence[str], source: str) -> None:
        self.data = data
        self.files = tuple(files)
        self.source = source
        self._tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else None
        self._commitment: CorpusCommitment | None = None

    @classmethod
    def from_paths(
        cls, paths: Iterable[str | os.PathLike[str]], *, suffixes: Sequence[str] = DEFAULT_SUFFIXES
    ) -> Corpus:
        """Read files (as named) and folders (recursively, files ending in ``suffixes``).

        Order: each argument in the order given; inside a folder, sorted relative POSIX paths.
        Raises FileNotFoundError for a missing path and EncodingError if the result is empty.
        """
        names: list[str] = []
        parts: list[bytes] = []
        labels: list[str] = []
        for raw in paths:
            path = Path(raw)
            labels.append(str(path))
            if path.is_dir():
                for rel in _walk(path, tuple(suffixes)):
                    names.append(str(path / rel))
                    parts.append((path / rel).read_bytes())
            elif path.is_file():
                names.append(str(path))
                parts.append(path.read_bytes())
            else:
                raise FileNotFoundError(f"corpus path not found: {path}")
        data = b"".join(parts)
        if not data:
            raise EncodingError(f"corpus is empty: {', '.join(labels)}")
        logger.info("corpus: %d files, %d bytes", len(names), len(data))
        source = ",".join(labels)
        if len(source) > MAX_STR:
            # Every reader bounds a header's strings; a label past the bound would make the run
            # (or shared-run genesis) unreadable. ``source`` is description, not binding.
            head = f"{len(labels)} paths: "
            source = head + source[: MAX_STR - len(head) - 3] + "..."
        return cls(data, names, source=source)

    @classmethod
    def stdlib(cls) -> Corpus:
        """The running Python's standard library ``.py`` sources (present on every machine)."""
        return cls.from_paths([sysconfig.get_paths()["stdlib"]])

    def __len__(self) -> int:
        return len(self.data)

    def commitment(self) -> CorpusCommitment:
        """Merkle root over the corpus bytes in ``CORPUS_CHUNK_SIZE`` leaves (computed once)."""
        if self._commitment is None:
            from proofs.merkle import merkle_root

            view = memoryview(self.data)
            leaves = [
                view[i : i + CORPUS_CHUNK_SIZE] for i in range(0, len(view), CORPUS_CHUNK_SIZE)
            ]
            self._commitment = CorpusCommitment(
                root=merkle_root(leaves),
                nbytes=len(self.data),
                file_count=len(self.files),
                chunk_size=CORPUS_CHUNK_SIZE,
                source=self.source,
            )
        return self._commitment

    def batch(self, offsets: Sequence[int], context: int) -> Batch:
        """Cut ``context + 1`` bytes at each offset into (inputs, targets). Raises ValueError."""
        if self._tensor is None or len(self.data) < context + 1:
            raise ValueError(f"corpus of {len(self.data)} bytes is shorter than context + 1")
        rows = []
        for off in offsets:
            if not 0 <= off <= len(self.data) - context - 1:
                raise ValueError(f"offset {off} out of range for corpus of {len(self.data)} bytes")
            rows.append(self._tensor[off : off + context + 1])
        window = torch.stack(rows).to(torch.int64)
        return Batch(offsets=tuple(offsets), inputs=window[:, :-1], targets=window[:, 1:])

    def batch_for_step(self, run_seed: int, step: int, *, batch_size: int, context: int) -> Batch:
        """The batch of ``step`` in the run seeded ``run_seed`` (pure function, no history)."""
        offsets = batch_offsets(
            run_seed, step, batch_size=batch_size, context=context, corpus_size=len(self.data)
        )
        return self.batch(offsets, context)


def batch_offsets(
    run_seed: int, step: int, *, batch_size: int, context: int, corpus_size: int
) -> tuple[int, ...]:
    """Start offsets of the ``batch_size`` samples of ``step``.

    Sample i starts at ``H(i) mod (corpus_size - context)`` where
    ``H(i) = int(sha256(BATCH_MAGIC || u64be(run_seed) || u64be(step) || u32be(i)))`` (big-endian);
    each sample spans ``context + 1`` bytes. The modulo bias over a 256-bit hash is negligible.
    Raises ValueError when the corpus is too short or a size is not positive.
    """
    if batch_size <= 0 or context <= 0:
        raise ValueError(f"batch_size and context must be positive, got {batch_size}, {context}")
    span = corpus_size - context
    if span <= 0:
        raise ValueError(f"corpus of {corpus_size} bytes is shorter than context + 1")
    prefix = BATCH_MAGIC + struct.pack(">QQ", run_seed, step)
    return tuple(
        int.from_bytes(hashlib.sha256(prefix + struct.pack(">I", i)).digest(), "big") % span
        for i in range(batch_size)
    )


def _walk(folder: Path, suffixes: tuple[str, ...]) -> list[str]:
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        rel_dir = Path(dirpath).relative_to(folder)
        found.extend((rel_dir / f).as_posix() for f in filenames if f.endswith(suffixes))
    return sorted(found)

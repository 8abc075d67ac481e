"""The C accelerator proofs._sha256tree against hashlib and the pure-Python path.

Every native result is compared with an oracle written here from RFC 6962 section 2.1 with
hashlib only, and with proofs.merkle run with the accelerator switched off; the legacy root is
compared with merkletools itself.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proofs import merkle
from proofs.errors import MalformedProofError
from proofs.merkle import MerkleTree, legacy_root

try:
    from proofs import _sha256tree
except ImportError:
    _sha256tree = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parent.parent
needs_native = pytest.mark.skipif(_sha256tree is None, reason="proofs._sha256tree not built")


def _can_build_c() -> str | None:
    """Why the C extension cannot be built here, or None if it can."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc})"
    include_dirs = [Path("/usr/include"), Path("/usr/local/include")]
    if not any((d / "openssl" / "sha.h").exists() for d in include_dirs):
        return "no OpenSSL headers (openssl/sha.h; install libssl-dev)"
    return None


def test_native_module_is_built() -> None:
    """Where a compiler and OpenSSL headers exist, `pip install -e .` must have built it."""
    if _sha256tree is None:
        why = _can_build_c()
        if why is not None:
            pytest.skip(f"NATIVE ACCELERATOR NOT TESTED: cannot build proofs._sha256tree: {why}")
        pytest.fail(
            "proofs._sha256tree is missing although a C compiler and OpenSSL headers exist: "
            "run `pip install -e .` (or `python setup.py build_ext --inplace`) and read its log"
        )
    assert merkle.native_available()
    assert _sha256tree.OPENSSL_VERSION.startswith("OpenSSL")


# --- oracles: hashlib only ---------------------------------------------------------------------
def _rfc_root(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962 MTH, recursive, with k the largest power of two < n."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1 << ((n - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + _rfc_root(leaves[:k]) + _rfc_root(leaves[k:])).digest()


def _rfc_levels(level: list[bytes]) -> list[list[bytes]]:
    levels = [level]
    while len(levels[-1]) > 1:
        cur = levels[-1]
        nxt = [
            hashlib.sha256(b"\x01" + cur[i] + cur[i + 1]).digest()
            for i in range(0, len(cur) - 1, 2)
        ]
        levels.append(nxt + cur[len(cur) - 1 :] if len(cur) % 2 else nxt)
    return levels


def _legacy_oracle(leaves: Sequence[bytes]) -> bytes:
    level = [hashlib.sha256(leaf.hex().encode()).digest() for leaf in leaves]
    while len(level) > 1:
        pairs = [
            hashlib.sha256(level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)
        ]
        level = pairs + level[len(level) - 1 :] if len(level) % 2 else pairs
    return level[0]


@pytest.fixture
def pure() -> Iterator[None]:
    """Run the body with the accelerator bypassed, restoring the previous mode."""
    before = merkle.native_enabled()
    merkle.set_native(False)
    try:
        yield
    finally:
        merkle.set_native(before)


@pytest.fixture(params=[True, False], ids=["sha-ni", "openssl"])
def sha_ni(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Run the body with short messages hashed by SHA-NI (where the CPU has it) and by OpenSSL."""
    if _sha256tree is None:
        pytest.skip("proofs._sha256tree not built")
    on = _sha256tree.set_sha_ni(request.param)
    if request.param and not on:
        pytest.skip("this CPU has no SHA-NI: only the OpenSSL path runs")
    try:
        yield on
    finally:
        _sha256tree.set_sha_ni(True)


def _build(
    leaves: Sequence[bytes | memoryview], native: bool, workers: int | None = None
) -> MerkleTree:
    before = merkle.native_enabled()
    merkle.set_native(native)
    try:
        return MerkleTree.build(leaves, workers=workers)
    finally:
        merkle.set_native(before)


def _random_leaves(rng: random.Random, n: int, max_len: int) -> list[bytes]:
    return [rng.randbytes(rng.randint(0, max_len)) for _ in range(n)]


SIZES = [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 100, 255, 257, 1000, 1023, 2049, 3000]


# --- agreement ---------------------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("n", SIZES)
def test_native_matches_hashlib_and_pure(n: int, sha_ni: bool) -> None:
    rng = random.Random(n)
    max_len = 5000 if n <= 300 else 200  # big leaves on small trees keep the test fast
    leaves = _random_leaves(rng, n, max_len)
    expected_hashes = b"".join(hashlib.sha256(b"\x00" + leaf).digest() for leaf in leaves)
    assert _sha256tree.leaf_hashes(leaves) == expected_hashes
    oracle_levels = _rfc_levels(
        [expected_hashes[i : i + 32] for i in range(0, len(expected_hashes), 32)]
    )
    assert _sha256tree.tree_levels(expected_hashes) == [b"".join(lv) for lv in oracle_levels[1:]]
    native, python = _build(leaves, True), _build(leaves, False)
    assert native.root == python.root == _rfc_root(leaves)
    assert native._levels == python._levels
    if n:
        i = rng.randrange(n)
        assert native.proof(i) == python.proof(i)
        assert legacy_root(leaves) == _legacy_oracle(leaves)
        assert _sha256tree.legacy_root(leaves) == _legacy_oracle(leaves)


@needs_native
@pytest.mark.parametrize(
    ("n", "workers"), [(32768, 2), (32769, 3), (70001, 1), (70001, 2), (70001, 7)]
)
def test_threaded_native_levels_match(n: int, workers: int, sha_ni: bool) -> None:
    """Big trees split their lower levels between threads; the levels must not change."""
    rng = random.Random(n * 10 + workers)
    leaves = [rng.randbytes(rng.choice([0, 1, 32, 33, 64])) for _ in range(n)]
    native = _build(leaves, True, workers)
    assert native._levels == _build(leaves, False, 1)._levels
    assert native.root == _rfc_root(leaves)


@needs_native
def test_buffer_kinds_agree(sha_ni: bool) -> None:
    """bytes, bytearray, memoryviews (typed too) and numpy arrays hash as their raw bytes."""
    arr = np.arange(1000, dtype=np.float32)
    leaves: list[bytes | memoryview] = [
        b"abc",
        memoryview(bytearray(b"xyz")),
        memoryview(arr),
        memoryview(arr)[10:500],
        memoryview(b"0123456789")[2:7],
        memoryview(arr.reshape(10, 100)),
    ]
    raw = [bytes(leaf) for leaf in leaves]
    assert _sha256tree.leaf_hashes(leaves) == b"".join(
        hashlib.sha256(b"\x00" + r).digest() for r in raw
    )
    assert _sha256tree.leaf_hashes([arr, bytearray(b"q")]) == _sha256tree.leaf_hashes(
        [arr.tobytes(), b"q"]
    )
    assert _build(leaves, True).root == _build(leaves, False).root == _rfc_root(raw)
    assert legacy_root(leaves) == _legacy_oracle(raw)
    assert _sha256tree.tree_levels(
        memoryview(np.zeros(8, dtype=np.uint64))
    ) == _sha256tree.tree_levels(bytes(64))


@needs_native
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), max_size=70))
def test_property_native_equals_pure(leaves: list[bytes]) -> None:
    native = _build(leaves, True)
    assert native._levels == _build(leaves, False)._levels
    assert native.root == _rfc_root(leaves)
    if leaves:
        assert _sha256tree.legacy_root(leaves) == _legacy_oracle(leaves)


@needs_native
@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 1001])
def test_legacy_root_matches_merkletools(n: int) -> None:
    import merkletools  # installed --no-deps: its pysha3 dependency does not build on 3.11

    leaves = _random_leaves(random.Random(n), n, 100)
    mt = merkletools.MerkleTools(hash_type="sha256")
    mt.add_leaf([leaf.hex() for leaf in leaves], do_hash=True)
    mt.make_tree()
    assert _sha256tree.legacy_root(leaves).hex() == mt.get_merkle_root()


# --- bad input ---------------------------------------------------------------------------------
@needs_native
def test_native_bad_inputs_raise_cleanly() -> None:
    strided = memoryview(bytes(range(10)))[::2]
    for fn in (_sha256tree.leaf_hashes, _sha256tree.legacy_root):
        for bad in (b"abc", bytearray(b"x"), "text", 5, None, memoryview(b"ab")):
            with pytest.raises(TypeError, match="sequence of bytes-like objects"):
                fn(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="leaf 1: expected a bytes-like object, got int"):
            fn([b"a", 7])  # type: ignore[list-item]
        with pytest.raises(TypeError, match=r"leaf 0: .*got str"):
            fn(["a"])  # type: ignore[list-item]
        with pytest.raises(ValueError, match="leaf 2: memoryview is not a C-contiguous buffer"):
            fn([b"", b"", strided])
    with pytest.raises(ValueError, match="no root for an empty tree"):
        _sha256tree.legacy_root([])
    for length in (1, 31, 33, 65):
        with pytest.raises(ValueError, match=f"{length} bytes is not a multiple of 32"):
            _sha256tree.tree_levels(bytes(length))
    for bad_level in ("a" * 32, None, 3, [b"x" * 32], strided):
        with pytest.raises(TypeError, match="C-contiguous bytes-like"):
            _sha256tree.tree_levels(bad_level)  # type: ignore[arg-type]
    assert _sha256tree.tree_levels(b"") == _sha256tree.tree_levels(bytes(32)) == []
    assert _sha256tree.leaf_hashes([]) == b""
    assert _sha256tree.leaf_hashes(iter([b"a"])) == hashlib.sha256(b"\x00a").digest()  # type: ignore[arg-type]


@needs_native
@pytest.mark.parametrize("native", [True, False])
def test_public_errors_are_the_same_either_way(native: bool) -> None:
    strided = memoryview(bytes(range(10)))[::2]
    for bad in ([b"a", 7], [strided], ["text"]):
        with pytest.raises(MalformedProofError):
            _build(bad, native)  # type: ignore[arg-type]
    with pytest.raises(MalformedProofError):
        _build([b"a"], native, workers=0)
    before = merkle.native_enabled()
    merkle.set_native(native)
    try:
        with pytest.raises(MalformedProofError, match="empty tree"):
            legacy_root([])
        with pytest.raises(MalformedProofError):
            legacy_root([b"a", 7])  # type: ignore[list-item]
    finally:
        merkle.set_native(before)


@needs_native
def test_leaf_buffers_are_released_after_the_call() -> None:
    """A leaf's buffer is exported only during the call: the bytearray can grow afterwards."""
    leaf = bytearray(b"abc")
    assert _sha256tree.leaf_hashes([leaf]) == hashlib.sha256(b"\x00abc").digest()
    leaf.extend(b"d")  # raises BufferError if an export leaked
    assert _sha256tree.leaf_hashes([leaf]) == hashlib.sha256(b"\x00abcd").digest()


# --- switching -----------------------------------------------------------------------------------
def test_env_var_forces_fallback() -> None:
    code = "from proofs import merkle; print(merkle.native_enabled(), merkle.native_available())"
    env = {**os.environ, "VERITRAIN_NO_NATIVE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", str(_sha256tree is not None)]


def test_pure_fixture_bypasses_native(pure: None) -> None:
    assert not merkle.native_enabled()
    leaves = [b"a", b"bc", b"def"]
    assert MerkleTree.build(leaves).root == _rfc_root(leaves)
    if _sha256tree is None:
        with pytest.raises(RuntimeError, match="not built"):
            merkle.set_native(True)


@needs_native
def test_every_short_length(sha_ni: bool) -> None:
    """Lengths around the one-, two- and many-block boundaries of sha256 padding."""
    rng = random.Random(7)
    leaves = [rng.randbytes(n) for n in range(300)]
    expected = [hashlib.sha256(b"\x00" + leaf).digest() for leaf in leaves]
    assert _sha256tree.leaf_hashes(leaves) == b"".join(expected)
    for leaf in leaves:
        assert _sha256tree.legacy_root([leaf]) == hashlib.sha256(leaf.hex().encode()).digest()


@needs_native
@pytest.mark.parametrize("n", [32768, 40001])
def test_threaded_legacy_root_matches(n: int) -> None:
    leaves = _random_leaves(random.Random(n), n, 40)
    before = merkle.native_enabled()
    try:
        merkle.set_native(True)
        native = legacy_root(leaves)
        merkle.set_native(False)
        assert native == legacy_root(leaves) == _legacy_oracle(leaves)
    finally:
        merkle.set_native(before)


@needs_native
@pytest.mark.parametrize("native", [True, False])
def test_bad_leaf_in_a_big_list_is_named(native: bool) -> None:
    """Big lists are type-checked by the C code, in threads; the error still names the leaf."""
    leaves: list[object] = [b"x"] * 40000
    leaves[35001] = 7
    with pytest.raises(MalformedProofError, match="leaf 35001: expected bytes or memoryview"):
        _build(leaves, native, 2)  # type: ignore[arg-type]
    leaves[35001] = memoryview(bytes(10))[::2]
    with pytest.raises(MalformedProofError, match="leaf 35001: memoryview is not contiguous"):
        _build(leaves, native, 2)  # type: ignore[arg-type]
    before = merkle.native_enabled()
    merkle.set_native(native)
    try:
        with pytest.raises(MalformedProofError, match="leaf 35001"):
            legacy_root(leaves)  # type: ignore[arg-type]
    finally:
        merkle.set_native(before)


@needs_native
def test_strict_and_legacy_from_hashes() -> None:
    arr = np.zeros(4, dtype=np.uint8)
    assert _sha256tree.leaf_hashes([arr]) == hashlib.sha256(bytes(5)).digest()
    for fn in (_sha256tree.leaf_hashes, _sha256tree.legacy_root):
        with pytest.raises(TypeError, match="leaf 1: expected bytes or memoryview, got <class"):
            fn([b"a", arr], strict=True)
        assert fn([b"a", bytearray(b"b"), memoryview(b"c")], strict=True) == fn([b"a", b"b", b"c"])
    hashes = [hashlib.sha256(bytes([i])).digest() for i in range(7)]
    level = list(hashes)
    while len(level) > 1:
        pairs = [
            hashlib.sha256(level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)
        ]
        level = pairs + level[len(level) - 1 :] if len(level) % 2 else pairs
    assert _sha256tree.legacy_root_from_hashes(b"".join(hashes)) == level[0]
    assert _sha256tree.legacy_root_from_hashes(hashes[0]) == hashes[0]
    with pytest.raises(ValueError, match="no root for an empty tree"):
        _sha256tree.legacy_root_from_hashes(b"")
    with pytest.raises(ValueError, match="not a multiple of 32"):
        _sha256tree.legacy_root_from_hashes(bytes(33))
    with pytest.raises(TypeError):
        _sha256tree.legacy_root_from_hashes([hashes[0]])  # type: ignore[arg-type]

"""Hostile files fed to the real CLIs, each in its own interpreter (as an operator runs them).

A peer controls headers, manifests and verdict files, and may hand over key files; each case
below must end in a clear one-line error and a non-zero exit: no traceback, no crash by signal
(200k nested brackets used to overflow the C stack: exit 139), and nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from audit_runs import make_run

from audit.verdict import MAX_ITEMS, MAX_VERDICT_JSON, SignedVerdict, VerdictError
from audit.verdict import MAX_STR as MAX_VERDICT_STR
from proofs.codec import MAX_STR, check_keys, get_int, get_str
from proofs.errors import EncodingError
from proofs.signatures import keypair_from_seed, load_keypair, save_keypair
from trainer.manifest import MAX_BATCH, MAX_RECORDS, StepRecord, WindowManifest
from trainer.store import MAX_HEADER_BYTES

ROOT = Path(__file__).resolve().parent.parent
DEPTH = 200_000
KEY_DEPTH = 60_000  # within the 64 KiB key file limit, still deep enough to overflow the C stack
PEER = keypair_from_seed(b"hostile-input-tests-peer-key-001")
TINY = [
    "--steps", "1", "--checkpoint-every", "1", "--batch-size", "2", "--n-layer", "1",
    "--d-model", "16", "--n-head", "2", "--context", "8", "--threads", "1",
    "--corpus", str(Path(json.__file__).parent),
]  # fmt: skip


def _cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    return subprocess.run(
        [sys.executable, "-m", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _refused(result: subprocess.CompletedProcess[str], phrase: str, *, code: int = 2) -> str:
    """Assert a clean refusal; return the error line."""
    out = result.stdout + result.stderr
    assert result.returncode >= 0, f"killed by signal {-result.returncode}: {out[-2000:]}"
    assert result.returncode == code, out[-2000:]
    for crash in ("Traceback", "MarkupError", "RecursionError", "Segmentation fault"):
        assert crash not in out, out[-2000:]
    line = " ".join(result.stderr.split()) if code == 2 else " ".join(result.stdout.split())
    assert phrase in line, out[-2000:]
    return line


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def _tree(path: Path) -> dict[str, bytes | None]:
    """Every entry under ``path`` with its bytes (None for folders): to check nothing changed."""
    return {
        str(p.relative_to(path)): None if p.is_dir() else p.read_bytes()
        for p in sorted(path.rglob("*"))
    }


def _deep(char: str, depth: int = DEPTH) -> bytes:
    return (char * depth).encode()


def _private(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return path


@pytest.fixture(scope="module")
def real_store() -> Path:
    """A genuine one-window run, made by the reference trainer (copied before being damaged)."""
    return Path(make_run("hostile-input-base", steps=3, every=3))


# ---- run stores: verify-store reports a hostile file as a failed check ---------------------------


@pytest.mark.parametrize("char", ["[", "{"])
@pytest.mark.parametrize("target", ["header.json", "manifests/w000000.json"])
def test_verify_store_deeply_nested_file(
    real_store: Path, tmp_path: Path, char: str, target: str
) -> None:
    store = tmp_path / "run"
    shutil.copytree(real_store, store)
    (store / target).write_bytes(_deep(char))
    before = _tree(tmp_path)
    result = _cli("trainer", "verify-store", store, "--no-chain", cwd=tmp_path)
    line = _refused(result, f"{target} nests {DEPTH} levels deep; the limit is 64", code=1)
    assert line.startswith("FAIL ") and _one_line(result.stdout)
    assert result.stderr == ""  # no progress frames when stderr is not a terminal
    assert _tree(tmp_path) == before


def test_verify_store_oversized_header(tmp_path: Path) -> None:
    store = tmp_path / "run"
    store.mkdir()
    (store / "header.json").write_bytes(b"[" + b" " * MAX_HEADER_BYTES + b"]")
    result = _cli("trainer", "verify-store", store, cwd=tmp_path)
    _refused(result, f"header.json is larger than its limit of {MAX_HEADER_BYTES} bytes", code=1)


def test_verify_store_markup_in_path_is_printed_as_text(tmp_path: Path) -> None:
    store = tmp_path / "[/x][conceal]run"  # the "/" makes a folder "[" holding "x][conceal]run"
    store.mkdir(parents=True)
    result = _cli("trainer", "verify-store", store, cwd=tmp_path)
    line = _refused(result, "FAIL format broken at header.json", code=1)
    assert "[/x][conceal]run" in line


# ---- key files: trainer run refuses them before training or writing anything -------------------


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        (lambda p: _private(p, _deep("[", KEY_DEPTH)), f"nests {KEY_DEPTH} levels deep"),
        (lambda p: _private(p, _deep("{", KEY_DEPTH)), f"nests {KEY_DEPTH} levels deep"),
        (lambda p: _private(p, _deep("[")), "is 200000 bytes; the limit is 65536"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: _private(p, b'{"version": 1, "version": 1}'), "duplicate key 'version'"),
    ],
    ids=["deep-list", "deep-object", "oversized", "directory", "duplicate-key"],
)
def test_trainer_run_refuses_hostile_key_file(
    tmp_path: Path, make: Callable[[Path], object], phrase: str
) -> None:
    key = tmp_path / "peer.key"
    make(key)
    before = _tree(tmp_path)
    result = _cli("trainer", "run", "--store", tmp_path / "run", "--key-file", key, *TINY,
                  cwd=tmp_path)  # fmt: skip
    line = _refused(result, phrase)
    assert _one_line(result.stderr) and "Errno" not in line and f"key file {key}" in line
    assert _tree(tmp_path) == before  # no store folder, nothing else


def test_trainer_run_refuses_a_store_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "store").write_text("not a folder")
    for store in ("store", "store/sub"):
        result = _cli("trainer", "run", "--store", store, "--key-file", "k.key", "--new-key",
                      *TINY, cwd=tmp_path)  # fmt: skip
        _refused(result, f"run store {store} ")
        assert _one_line(result.stderr).endswith("a run store is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no key file created


def test_trainer_run_prints_markup_in_a_store_path_as_text(tmp_path: Path) -> None:
    store = tmp_path / "[/x][conceal]store"
    result = _cli("trainer", "run", "--store", store, "--run-id", "markup-run", "--key-file",
                  "k.key", "--new-key", *TINY, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    # Shown verbatim: "[/x]" did not raise MarkupError, "[conceal]" hid nothing.
    assert f"-> {store}; public key 0x{load_keypair(tmp_path / 'k.key').public.hex()}" in (
        result.stderr
    )
    assert "created key file k.key (mode 0600)" in result.stderr


# ---- keygen: never overwrites, clear errors ------------------------------------------------------


def test_keygen_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    key = tmp_path / "peer.key"
    save_keypair(key, PEER)
    result = _cli("trainer", "keygen", key, cwd=tmp_path)
    line = _refused(result, f"key file {key} already exists")
    assert "--force" in line and _one_line(result.stderr)
    assert load_keypair(key) == PEER and sorted(tmp_path.iterdir()) == [key]
    forced = _cli("trainer", "keygen", key, "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    fresh = load_keypair(key)
    assert fresh != PEER and forced.stdout.strip() == "0x" + fresh.public.hex()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and sorted(tmp_path.iterdir()) == [key]


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_keygen_into_a_missing_folder_or_onto_a_directory(tmp_path: Path, force: list[str]) -> None:
    missing = _cli("trainer", "keygen", tmp_path / "no" / "peer.key", *force, cwd=tmp_path)
    _refused(missing, f"folder {tmp_path / 'no'} does not exist")
    assert _one_line(missing.stderr)
    folder = tmp_path / "keys"
    folder.mkdir()
    onto_dir = _cli("trainer", "keygen", folder, *force, cwd=tmp_path)
    line = _refused(onto_dir, f"key file {folder} is a directory")
    assert "Errno" not in line and _one_line(onto_dir.stderr)
    assert sorted(tmp_path.iterdir()) == [folder] and not any(folder.iterdir())


# ---- verdict files: audit verify-verdict and verify-bundle -------------------------------------


@pytest.mark.parametrize(
    ("command", "data", "phrase"),
    [
        ("verify-verdict", _deep("["), f"nests {DEPTH} levels deep; the limit is 64"),
        ("verify-verdict", _deep("{"), f"nests {DEPTH} levels deep; the limit is 64"),
        ("check-evidence", _deep("["), f"nests {DEPTH} levels deep; the limit is 64"),
        ("verify-verdict", b" " * (MAX_VERDICT_JSON + 1), f"the limit is {MAX_VERDICT_JSON}"),
        ("verify-bundle", _deep("["), f"nests {DEPTH} levels deep; the limit is 64"),
        ("verify-bundle", _deep("{"), f"nests {DEPTH} levels deep; the limit is 64"),
    ],
)
def test_audit_refuses_hostile_verdict_files(
    tmp_path: Path, command: str, data: bytes, phrase: str
) -> None:
    path = tmp_path / "verdict.json"
    path.write_bytes(data)
    result = _cli("audit", command, path, cwd=tmp_path)
    _refused(result, phrase)
    assert sorted(tmp_path.iterdir()) == [path]


# ---- the strict readers bound what a peer controls -----------------------------------------------


def test_manifest_reader_bounds_counts_lengths_and_ints() -> None:
    manifest = {"version": 1, "run_id": "r", "window": 0, "first_step": 0, "state": {},
                "prev": "0x", "records": [None] * (MAX_RECORDS + 1)}  # fmt: skip
    with pytest.raises(EncodingError, match=f"records: {MAX_RECORDS + 1} items; the limit"):
        WindowManifest.from_json(manifest)
    record = {"step": 0, "replay_seed": 0, "batch": [0] * (MAX_BATCH + 1), "loss": 0.0, "lrs": [],
              "grad_root": "0x", "grad_leaves": 0, "grad_bytes": 0, "prev": "0x"}  # fmt: skip
    with pytest.raises(EncodingError, match=f"batch: {MAX_BATCH + 1} items; the limit"):
        StepRecord.from_json(record)
    with pytest.raises(EncodingError, match="batch: expected a list of ints in"):
        StepRecord.from_json({**record, "batch": [1 << 64]})
    with pytest.raises(EncodingError, match=f"run_id: {MAX_STR + 1} characters; the limit"):
        get_str({"run_id": "x" * (MAX_STR + 1)}, "run_id")
    assert get_int({"step": (1 << 64) - 1}, "step") == (1 << 64) - 1
    with pytest.raises(EncodingError, match=r"step: expected an int in \[0, 2\^64\)"):
        get_int({"step": 1 << 64}, "step")


def test_unknown_keys_are_quoted_bounded() -> None:
    keys = {f"{'k' * 10_000}{i}": 0 for i in range(1000)}
    with pytest.raises(EncodingError, match="and 995 more") as info:
        check_keys(keys, "run header", ())
    assert len(str(info.value)) < 200


def test_verdict_reader_bounds_counts_lengths_and_ints() -> None:
    vector = ROOT / "tests" / "vectors" / "verdict" / "pass_tolerant.json"
    body = json.loads(vector.read_text())["signed"]["verdict"]
    at_limit = {**body, "reason": "r" * MAX_VERDICT_STR}  # looser than the codec's default
    SignedVerdict.from_json({"verdict": at_limit, "signature": "0x" + "00" * 96})
    cases = [
        ({"reason": "r" * (MAX_VERDICT_STR + 1)}, f"reason: {MAX_VERDICT_STR + 1} characters"),
        ({"tensors": [None] * (MAX_ITEMS + 1)}, f"tensors: {MAX_ITEMS + 1} items; the limit"),
        ({"step": 1 << 64}, r"step: expected an int in \[0, 2\^64\)"),
        ({"peer": "0x" + "ab" * 47}, "peer: expected 48 bytes, got 47"),
        ({"peer": "0x" + "ab " * 48}, "peer: expected an even number of hex digits"),
    ]
    for change, message in cases:
        with pytest.raises(VerdictError, match=message):
            SignedVerdict.from_json({"verdict": {**body, **change}, "signature": "0x" + "00" * 96})

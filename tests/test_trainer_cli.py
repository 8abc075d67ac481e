"""The trainer CLI: key files, a run, verify-store's exit codes and messages."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from click.testing import CliRunner

from audit.fetch import load_run
from proofs.signatures import load_keypair
from trainer.cli import main
from trainer.store import RunStore


def test_keygen_writes_a_private_key_file_and_prints_only_the_public_key(tmp_path: Path) -> None:
    runner = CliRunner()
    key = tmp_path / "peer.key"
    result = runner.invoke(main, ["keygen", str(key)])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    keypair = load_keypair(key)
    assert result.output.strip() == "0x" + bytes(keypair.public).hex()
    assert f"{keypair.secret:x}" not in result.output
    again = runner.invoke(main, ["keygen", str(key)])
    assert again.exit_code != 0 and load_keypair(key) == keypair


def test_run_then_verify_store_ok_and_fail(tmp_path: Path) -> None:
    runner = CliRunner()
    key, store = tmp_path / "new.key", tmp_path / "run"
    args = [
        "run", "--store", str(store), "--key-file", str(key), "--steps", "3",
        "--checkpoint-every", "3", "--batch-size", "2", "--n-layer", "1", "--d-model", "16",
        "--n-head", "2", "--context", "8", "--threads", "1",
        "--corpus", str(Path(json.__file__).parent),
    ]  # fmt: skip
    refused = runner.invoke(main, args)
    assert refused.exit_code != 0 and "--new-key" in refused.output
    result = runner.invoke(main, [*args, "--new-key"])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    pubkey = "0x" + bytes(load_keypair(key).public).hex()
    ok = runner.invoke(main, ["verify-store", str(store), "--pubkey", pubkey])
    assert ok.exit_code == 0 and "1 windows, 3 steps verified" in ok.output
    # The root to record on chain, as the auditor's independent reader computes it.
    final = load_run(RunStore(str(store))).final_hash
    assert f"commitment root (final manifest hash) 0x{final.hex()}" in ok.output
    manifest = store / "manifests" / "w000000.json"
    obj = json.loads(manifest.read_bytes())
    obj["manifest"]["records"][1]["replay_seed"] += 1
    manifest.write_text(json.dumps(obj))
    bad = runner.invoke(main, ["verify-store", str(store)])
    assert bad.exit_code == 1
    assert "FAIL signature broken at manifests/w000000.json (window 0)" in bad.output

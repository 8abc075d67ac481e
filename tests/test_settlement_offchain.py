"""Settlement pieces that need no long-lived chain: the committed artifact, revert decoding, keys,
deployment records, the Anvil node's state file and its absence."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
from eth_abi.abi import encode
from eth_account import Account
from hypothesis import given
from hypothesis import strategies as st

from audit.onchain import Deployment, DeploymentError, run_id_bytes
from proofs.errors import KeyFileError
from proofs.hashing import keccak256
from rewards import chain as chainmod

REPO = Path(__file__).resolve().parents[1]
ARTIFACT = REPO / "rewards" / "contracts" / "artifacts.json"
COMPILE = REPO / "rewards" / "contracts" / "compile.mjs"


@pytest.mark.parametrize(
    "name", ["artifacts.json", "baseline/artifacts.json", "test/artifacts.json"]
)
def test_committed_artifact_matches_a_fresh_compile(name: str) -> None:
    node = shutil.which("node")
    if node is None or not (REPO / "node_modules" / "solc").is_dir():
        pytest.skip("NODE OR node_modules/solc ABSENT: committed artifact NOT re-checked (npm ci)")
    fresh = subprocess.run(
        [node, str(COMPILE), "--stdout", f"--only={name}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    committed = (ARTIFACT.parent / name).read_text()
    assert json.loads(fresh)["compiler"]["version"].startswith("0.8.37+")
    assert fresh == committed, f"{name} is stale: run `node rewards/contracts/compile.mjs`"


def test_artifact_pins_prague_and_is_self_consistent() -> None:
    body = json.loads(ARTIFACT.read_text())
    assert body["settings"]["evmVersion"] == "prague"
    for name in ("VeritrainSettlement", "RewardToken"):
        c = body["contracts"][name]
        # The runtime code is the tail of the creation code (before constructor arguments).
        assert c["deployedBytecode"][2:] in c["bytecode"][2:]


def selector(sig: str) -> bytes:
    return keccak256(sig.encode())[:4]


def test_decode_revert_names_custom_errors() -> None:
    account = "0x" + "11" * 20
    data = selector("InvalidProof(address,uint256)") + encode(["address", "uint256"], [account, 5])
    name, args = chainmod.decode_revert(data)
    assert name == "InvalidProof"
    assert args == {"account": account, "cumulativeAmount": 5}
    oz = selector("AccessControlUnauthorizedAccount(address,bytes32)")
    name, args = chainmod.decode_revert(
        oz + encode(["address", "bytes32"], [account, b"\x01" * 32])
    )
    assert name == "AccessControlUnauthorizedAccount" and args["neededRole"] == b"\x01" * 32
    assert chainmod.decode_revert(selector("EnforcedPause()")) == ("EnforcedPause", {})
    assert chainmod.decode_revert(b"") == ("EmptyRevert", {})
    text = selector("Error(string)") + encode(["string"], ["boom"])
    assert chainmod.decode_revert(text) == ("Error", {"message": "boom"})


@given(st.binary(max_size=80))
def test_decode_revert_never_raises(data: bytes) -> None:
    name, args = chainmod.decode_revert(data)
    assert isinstance(name, str) and isinstance(args, dict)


def test_key_from_env_is_never_in_messages_or_logs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    acct = Account.create()
    secret = acct.key.hex()
    monkeypatch.setenv(chainmod.KEY_ENV, secret)
    assert chainmod.load_account().address == acct.address
    monkeypatch.setenv(chainmod.KEY_ENV, secret[:-2] + "zz")
    with pytest.raises(KeyFileError) as info:
        chainmod.load_account()
    assert secret[:-2] not in str(info.value) and info.value.__cause__ is None
    monkeypatch.delenv(chainmod.KEY_ENV)
    with pytest.raises(KeyFileError, match=chainmod.KEY_ENV):
        chainmod.load_account()
    assert secret[:-2] not in caplog.text


def test_keystore_round_trip_and_wrong_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    acct = Account.create()
    path = tmp_path / "key.json"
    chainmod.save_keystore(path, acct, "correct horse")
    assert path.stat().st_mode & 0o077 == 0
    assert acct.key.hex() not in path.read_text()
    assert chainmod.load_account(keystore=path, password="correct horse").address == acct.address
    monkeypatch.setenv(chainmod.KEYSTORE_PASSWORD_ENV, "correct horse")
    assert chainmod.load_account(keystore=path).address == acct.address
    with pytest.raises(KeyFileError, match="cannot decrypt"):
        chainmod.load_account(keystore=path, password="wrong")
    monkeypatch.delenv(chainmod.KEYSTORE_PASSWORD_ENV)
    with pytest.raises(KeyFileError, match="needs a password"):
        chainmod.load_account(keystore=path)


def test_deployment_record_round_trips_and_rejects_garbage() -> None:
    d = Deployment(
        chain_id=31337,
        settlement="0x" + "ab" * 20,
        token="0x" + "cd" * 20,
        block_number=7,
    )
    back = Deployment.from_json(d.to_json())
    assert back.chain_id == 31337 and back.block_number == 7
    assert back.settlement.lower() == d.settlement and back.token.lower() == d.token
    for bad in ["{}", "[]", "not json", json.dumps({"version": 99}), d.to_json()[:-5]]:
        with pytest.raises(DeploymentError):
            Deployment.from_json(bad)


def test_deployment_vectors() -> None:
    vectors = json.loads((REPO / "tests/vectors/deployment/vectors.json").read_text())
    for case in vectors["valid"]:
        d = Deployment.from_json(case["text"])
        assert (d.chain_id, d.block_number) == (case["chain_id"], case["block_number"])
        assert (d.settlement, d.token) == (case["settlement_checksum"], case["token_checksum"])
        assert Deployment.from_json(d.to_json()) == d
    for text in vectors["invalid"]:
        with pytest.raises(DeploymentError):
            Deployment.from_json(text)


FIELDS = ["version", "chain_id", "settlement", "token", "block_number"]
VALUES = st.one_of(
    st.none(),
    st.integers(-(2**70), 2**70),
    st.text(max_size=50),
    st.sampled_from(["0x5fbdb2315678afecb367f032d93f642f64180aa3", "0x" + "Ab" * 20]),
    st.lists(st.integers(), max_size=2),
)


@given(st.dictionaries(st.sampled_from(FIELDS), VALUES) | st.text(max_size=60))
def test_deployment_parser_raises_only_its_error(body: dict[str, object] | str) -> None:
    text = body if isinstance(body, str) else json.dumps(body)
    try:
        d = Deployment.from_json(text)
    except DeploymentError:
        return
    assert Deployment.from_json(d.to_json()) == d  # whatever parses, round-trips


def test_run_id_key_is_keccak_of_utf8() -> None:
    # keccak256("") is a published constant (the empty code hash of every EOA).
    empty = "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    assert run_id_bytes("").hex() == empty
    assert len({run_id_bytes(str(i)) for i in range(100)}) == 100


def test_connect_refuses_bad_urls() -> None:
    with pytest.raises(chainmod.ChainError, match="tester"):
        chainmod.connect("ftp://example")
    with pytest.raises(chainmod.ChainError, match="no JSON-RPC node"):
        chainmod.connect(f"http://127.0.0.1:{chainmod.free_port()}")


def test_missing_anvil_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(chainmod.ChainError, match="npm ci"):
        chainmod.find_anvil(tmp_path)


def test_anvil_state_file_carries_the_chain_across_restarts(tmp_path: Path) -> None:
    try:
        binary = chainmod.find_anvil()
    except chainmod.ChainError as exc:
        pytest.skip(f"ANVIL ABSENT: state persistence not tested: {exc}")
    state = tmp_path / "chain.json"
    target = Account.create().address
    with chainmod.AnvilNode(binary=binary, state_file=state) as node:
        w3 = chainmod.connect(node.url)
        chainmod.fund_from_dev_account(w3, target, 12345)
        height = w3.eth.block_number
    assert state.exists()
    with chainmod.AnvilNode(binary=binary, state_file=state) as node:
        w3 = chainmod.connect(node.url)
        assert w3.eth.get_balance(target) == 12345
        assert w3.eth.block_number >= height

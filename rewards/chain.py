"""Chain backends and signing keys for settlement.

Two backends: an in-process py-evm chain through eth-tester (the default: no node, nothing to
start, state lives and dies with the process) and any JSON-RPC URL. :class:`AnvilNode` starts a
local Anvil (from ``node_modules`` or ``PATH``) on 127.0.0.1 with a state file, so separate
processes (trainer, auditor, rewards) can share one chain across commands.

Keys come from an environment variable (hex private key) or an encrypted eth-account keystore whose
password is in an environment variable or typed by the user; never from a command-line argument,
and they are never logged.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_account import Account
from web3 import Web3
from web3.exceptions import ContractCustomError, ContractLogicError, ContractPanicError
from web3.providers.eth_tester import EthereumTesterProvider

from audit.onchain import ChainError as ChainError  # defined below rewards, raised by both
from audit.onchain import connect as connect_rpc
from proofs.errors import KeyFileError
from proofs.hashing import keccak256

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount
    from web3.contract.contract import ContractConstructor, ContractFunction
    from web3.types import TxParams

log = logging.getLogger(__name__)

KEY_ENV = "VERITRAIN_ETH_KEY"
KEYSTORE_PASSWORD_ENV = "VERITRAIN_KEYSTORE_PASSWORD"
TESTER_URL = "tester"
ANVIL_START_TIMEOUT_S = 20.0
# Anvil's own choice of default hardfork may move with its releases; pin the one solc targets.
ANVIL_HARDFORK = "prague"
RECEIPT_TIMEOUT_S = 120.0
GAS_MARGIN_NUM, GAS_MARGIN_DEN = 6, 5  # 20 % over the estimate: refunds make estimates tight


def connect(url: str | None = None) -> Web3:
    """A Web3 for ``url``: ``None`` or ``"tester"`` for an in-process eth-tester chain, else an
    ``http(s)://`` JSON-RPC endpoint. Raises :class:`ChainError` if the endpoint does not answer."""
    if url is None or url == TESTER_URL:
        return Web3(EthereumTesterProvider())
    if not url.startswith(("http://", "https://")):
        raise ChainError(f"chain URL must be 'tester' or http(s)://..., got {url!r}")
    return connect_rpc(url)  # the auditor's read-only connection, one for both


def is_tester(w3: Web3) -> bool:
    """True for the in-process eth-tester backend."""
    return isinstance(w3.provider, EthereumTesterProvider)


def advance_time(w3: Web3, seconds: int) -> int:
    """Move a development chain's clock forward by ``seconds`` and mine a block; returns the new
    head timestamp. Works on eth-tester and Anvil; other nodes refuse (:class:`ChainError`)."""
    if seconds < 0:
        raise ChainError(f"cannot move time backwards ({seconds} s)")
    if is_tester(w3):
        provider = w3.provider
        if not isinstance(provider, EthereumTesterProvider):  # narrowing for mypy
            raise ChainError("not an eth-tester provider")
        tester: Any = provider.ethereum_tester
        now = int(w3.eth.get_block("latest")["timestamp"])
        try:
            tester.time_travel(now + seconds)
        except Exception as exc:  # eth-tester refuses a target at or before its pending block,
            if "backwards" not in str(exc):  # which is then already late enough
                raise
        tester.mine_blocks(1)
    else:
        try:
            w3.provider.make_request("evm_increaseTime", [seconds])  # type: ignore[arg-type]
            w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
        except Exception as exc:
            raise ChainError(f"node does not support evm_increaseTime/evm_mine: {exc}") from exc
    return int(w3.eth.get_block("latest")["timestamp"])


def fund_from_dev_account(w3: Web3, to: str, wei: int) -> None:
    """Send ether from the node's first unlocked development account (eth-tester, Anvil)."""
    accounts = w3.eth.accounts
    if not accounts:
        raise ChainError("node has no unlocked development account to fund from")
    tx = w3.eth.send_transaction(
        {"from": accounts[0], "to": Web3.to_checksum_address(to), "value": Web3.to_wei(wei, "wei")}
    )
    w3.eth.wait_for_transaction_receipt(tx)


# ---------------------------------------------------------------------------------- reverts


class RevertError(ChainError):
    """The contract refused a call. ``name`` is the custom error (``"InvalidProof"``), ``args`` its
    decoded arguments, ``tx_hash`` the mined transaction if the revert happened on chain."""

    def __init__(self, name: str, args: dict[str, Any], tx_hash: str | None = None) -> None:
        self.name = name
        self.args_decoded = args
        self.tx_hash = tx_hash
        shown = ", ".join(f"{k}={_show(v)}" for k, v in args.items())
        super().__init__(f"{name}({shown})" + (f" in tx {tx_hash}" if tx_hash else ""))


def _show(value: Any) -> str:
    return "0x" + value.hex() if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------- artifacts


@cache
def artifact(name: str) -> dict[str, Any]:
    """ABI and bytecode of ``name`` (``VeritrainSettlement`` or ``RewardToken``) from the committed
    ``rewards/contracts/artifacts.json``, so no node or compiler is needed at run time."""
    text = resources.files("rewards").joinpath("contracts/artifacts.json").read_text()
    contracts: dict[str, dict[str, Any]] = json.loads(text)["contracts"]
    if name not in contracts:
        raise ChainError(f"no contract {name!r} in artifacts.json")
    return contracts[name]


_ERROR_STRING = bytes.fromhex("08c379a0")  # selector of Solidity's Error(string)


@cache
def _error_table() -> dict[bytes, tuple[str, list[str], list[str]]]:
    """4-byte selector -> (name, arg names, arg types) for every custom error both contracts may
    raise (their ABIs include inherited OpenZeppelin errors), plus Solidity's Error(string)."""
    table: dict[bytes, tuple[str, list[str], list[str]]] = {
        _ERROR_STRING: ("Error", ["message"], ["string"]),
        bytes.fromhex("4e487b71"): ("Panic", ["code"], ["uint256"]),
    }
    for name in ("VeritrainSettlement", "RewardToken"):
        for item in artifact(name)["abi"]:
            if item["type"] != "error":
                continue
            types = [i["type"] for i in item["inputs"]]
            sig = f"{item['name']}({','.join(types)})"
            table[keccak256(sig.encode())[:4]] = (
                item["name"],
                [i["name"] for i in item["inputs"]],
                types,
            )
    return table


def decode_revert(data: bytes) -> tuple[str, dict[str, Any]]:
    """Decode revert data into (error name, arguments). Unknown data gives ``("UnknownRevert",
    {"data": data})``; empty data gives ``("EmptyRevert", {})``."""
    if not data:
        return "EmptyRevert", {}
    entry = _error_table().get(bytes(data[:4]))
    if entry is None:
        return "UnknownRevert", {"data": bytes(data)}
    name, names, types = entry
    try:
        values = abi_decode(types, bytes(data[4:]))
    except Exception:  # eth_abi raises several unrelated classes on short or bad data
        return name, {"data": bytes(data[4:])}
    return name, dict(zip(names, values, strict=True))


def _revert_data(exc: BaseException) -> bytes | None:
    """Raw revert data from whatever a backend raised, or None if ``exc`` is no revert."""
    if isinstance(exc, ContractCustomError | ContractPanicError | ContractLogicError):
        data = exc.data
        if isinstance(data, str) and data.startswith("0x"):
            return bytes.fromhex(data[2:])
        return b""
    # eth-tester raises TransactionFailed("execution reverted: b'...'"); web3.py's own tester
    # error formatter parses that same repr with ast.literal_eval.
    text = str(exc.args[0]) if exc.args else ""
    if type(exc).__name__ == "TransactionFailed" and text.startswith("execution reverted"):
        _, _, rest = text.partition(": ")
        try:
            value = ast.literal_eval(rest)
        except (ValueError, SyntaxError):
            # A require message: py-evm hands Error(string) back already decoded, as plain text.
            return _ERROR_STRING + abi_encode(["string"], [rest]) if rest else b""
        return value if isinstance(value, bytes) else str(value).encode()
    return None


def _as_revert(exc: BaseException, tx_hash: str | None = None) -> RevertError | None:
    data = _revert_data(exc)
    if data is None:
        return None
    name, args = decode_revert(data)
    return RevertError(name, args, tx_hash)


@dataclass(frozen=True, kw_only=True, slots=True)
class TxResult:
    """A mined, successful transaction."""

    tx_hash: str
    block_number: int
    gas_used: int


# ---------------------------------------------------------------------------------- transactions


def _prepared(w3: Web3, sender: LocalAccount, call: ContractFunction | ContractConstructor) -> Any:
    """The unsigned transaction, checked: a revert raises here, before anything is sent.

    Checks run against the *pending* block: on a chain that mines only on demand (Anvil, a quiet
    network) the latest block can be minutes old, and a root whose delay has passed would still
    look pending to it. A JSON-RPC node estimates the gas (+20 %). py-evm's estimate is a binary
    search costing ~8 executions (~60 ms), so on eth-tester one eth_call checks the transaction
    and the gas limit is the block's: unused gas is refunded and gasUsed does not depend on it.
    """
    params: dict[str, Any] = {
        "from": sender.address,
        "nonce": w3.eth.get_transaction_count(sender.address, "pending"),
        "gas": int(w3.eth.get_block("latest")["gasLimit"]),  # placeholder: no estimate in build
    }
    tx = call.build_transaction(params)  # type: ignore[arg-type]
    probe = {k: tx[k] for k in ("from", "to", "data", "value") if k in tx}
    if is_tester(w3):
        w3.eth.call(probe, "pending")  # type: ignore[arg-type]
    else:
        gas = w3.eth.estimate_gas(probe, "pending")  # type: ignore[arg-type]
        tx["gas"] = int(gas) * GAS_MARGIN_NUM // GAS_MARGIN_DEN
    return tx


def _nonce_clash(exc: BaseException) -> bool:
    """Another process using the same key took our nonce first (nodes word it differently:
    Web3RPCError "nonce too low", py-evm ValidationError "Invalid transaction nonce")."""
    return "nonce" in str(exc).lower()


def _refused(sender: LocalAccount, exc: Exception) -> ChainError:
    # e.g. a signer without ether for gas: py-evm's ValidationError, a node's Web3RPCError
    return ChainError(f"the node refused the transaction from {sender.address}: {exc}")


def send(w3: Web3, sender: LocalAccount, call: ContractFunction | ContractConstructor) -> TxResult:
    """Check, sign locally, send and wait for ``call``. Raises :class:`RevertError` (decoded)
    whether the revert shows before sending or in the mined receipt, and ChainError when the
    node refuses the transaction (no ether for gas, bad nonce...)."""
    for attempt in range(3):
        try:
            tx = _prepared(w3, sender, call)
        except Exception as exc:
            revert = _as_revert(exc)
            if revert is not None:
                raise revert from None
            if _nonce_clash(exc) and attempt < 2:  # eth-tester checks the nonce when estimating
                continue
            raise _refused(sender, exc) from exc
        signed = sender.sign_transaction(tx)
        try:
            tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
        except Exception as exc:
            if _nonce_clash(exc) and attempt < 2:
                log.warning("nonce %s taken, retrying", tx["nonce"])
                continue
            raise _refused(sender, exc) from exc
        receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RECEIPT_TIMEOUT_S)
        hex_hash = "0x" + bytes(tx_hash).hex()
        if receipt["status"] != 1:
            raise _replayed_revert(w3, tx, receipt["blockNumber"], hex_hash)
        return TxResult(
            tx_hash=hex_hash,
            block_number=int(receipt["blockNumber"]),
            gas_used=int(receipt["gasUsed"]),
        )
    raise ChainError("could not obtain a free nonce after 3 attempts")


def _replayed_revert(w3: Web3, tx: Any, block: int, tx_hash: str) -> RevertError:
    """A mined transaction failed: replay it on the parent block's state to learn why."""
    call: TxParams = {k: tx[k] for k in ("from", "to", "data", "value") if k in tx}  # type: ignore[assignment]
    try:
        w3.eth.call(call, block_identifier=max(block - 1, 0))
    except Exception as exc:
        revert = _as_revert(exc, tx_hash)
        if revert is not None:
            return revert
    return RevertError("RevertedWithoutReason", {}, tx_hash)


def call_view(call: ContractFunction, block: str = "latest") -> Any:
    """``call.call()`` at ``block`` with reverts decoded into :class:`RevertError`."""
    try:
        return call.call(block_identifier=block)  # type: ignore[arg-type]
    except Exception as exc:
        revert = _as_revert(exc)
        if revert is None:
            raise
        raise revert from None


# ---------------------------------------------------------------------------------- keys


def load_account(*, keystore: Path | None = None, password: str | None = None) -> LocalAccount:
    """The signing account: from ``keystore`` (an encrypted eth-account JSON keystore; password
    from ``password`` or the ``VERITRAIN_KEYSTORE_PASSWORD`` environment variable) if given, else
    from the hex private key in ``VERITRAIN_ETH_KEY``. Raises :class:`KeyFileError` with a message
    that never contains the key."""
    if keystore is not None:
        secret = password if password is not None else os.environ.get(KEYSTORE_PASSWORD_ENV)
        if secret is None:
            raise KeyFileError(
                f"keystore {keystore} needs a password (set {KEYSTORE_PASSWORD_ENV})"
            )
        try:
            encrypted = json.loads(Path(keystore).read_text())
            key = Account.decrypt(encrypted, secret)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # The cause names the file problem or "MAC mismatch"; it never contains the key.
            raise KeyFileError(
                f"cannot decrypt keystore {keystore}: {type(exc).__name__}"
            ) from None
        account: LocalAccount = Account.from_key(key)
        return account
    raw = os.environ.get(KEY_ENV)
    if not raw:
        raise KeyFileError(f"no signing key: set {KEY_ENV} or pass a keystore file")
    try:
        account = Account.from_key(raw.strip())
    except (ValueError, TypeError):
        raise KeyFileError(f"{KEY_ENV} is not a valid hex private key") from None
    return account


def save_keystore(path: Path, account: LocalAccount, password: str) -> None:
    """Write ``account`` as an encrypted keystore (mode 0600, atomic)."""
    encrypted = Account.encrypt(account.key, password)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(encrypted, fh)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- anvil


def find_anvil(repo_root: Path | None = None) -> Path:
    """Path of the anvil binary: ``node_modules/.bin/anvil`` (npm ``@foundry-rs/anvil-*``) under
    ``repo_root`` or the current directory, else ``anvil`` on ``PATH``. Raises :class:`ChainError`
    with the install command if none is found."""
    roots = (
        [repo_root] if repo_root is not None else [Path.cwd(), Path(__file__).resolve().parents[1]]
    )
    for root in roots:
        candidate = root / "node_modules" / ".bin" / "anvil"
        if candidate.exists() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("anvil")
    if found:
        return Path(found)
    raise ChainError(
        "anvil not found in node_modules/.bin or on PATH; install it with `npm ci` "
        "(package @foundry-rs/anvil-linux-amd64) or Foundry's foundryup"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AnvilNode:
    """A local Anvil process on 127.0.0.1. Use as a context manager or call :meth:`stop`.

    With ``state_file`` the chain is loaded from it at start (if present) and written back on exit,
    so a later ``AnvilNode`` (another command) continues the same chain.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        state_file: Path | None = None,
        chain_id: int = 31337,
        binary: Path | None = None,
    ) -> None:
        self.port = port if port is not None else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state_file = state_file
        self._binary = binary if binary is not None else find_anvil()
        self._chain_id = chain_id
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def command(self) -> list[str]:
        cmd = [str(self._binary), "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--chain-id", str(self._chain_id), "--hardfork", ANVIL_HARDFORK, "--silent"]
        if self.state_file is not None:
            cmd += ["--state", str(self.state_file)]
        return cmd

    def start(self) -> AnvilNode:
        """Start the process and wait until it answers JSON-RPC; raises :class:`ChainError`."""
        # stderr to a file, not a pipe: nobody drains a pipe while the node runs, and a full pipe
        # would stall it.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
        self._proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=self._log)
        deadline = time.monotonic() + ANVIL_START_TIMEOUT_S
        w3 = Web3(Web3.HTTPProvider(self.url, request_kwargs={"timeout": 2}))
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._log.seek(0)
                err = self._log.read().decode(errors="replace")
                raise ChainError(f"anvil exited with {self._proc.returncode}: {err.strip()[-500:]}")
            if w3.is_connected():
                log.info("anvil listening on %s (state %s)", self.url, self.state_file)
                return self
            time.sleep(0.05)
        self.stop()
        raise ChainError(f"anvil did not answer on {self.url} within {ANVIL_START_TIMEOUT_S} s")

    def wait(self) -> int:
        """Block until the process exits (the `chain` command runs in the foreground)."""
        if self._proc is None:
            raise ChainError("anvil was not started")
        return self._proc.wait()

    def stop(self) -> None:
        """Terminate the process (SIGTERM lets anvil write its state file) and wait for it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> AnvilNode:
        return self.start() if self._proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Chain fixtures shared by the settlement tests (imported by name; not a pytest conftest).

``chain`` is module-scoped and parametrized over both backends: the in-process eth-tester (py-evm)
chain and an Anvil node started on a free loopback port and stopped after the module. ``deployed``
gives each test its own token and settlement contract on that chain, so tests do not share state.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from proofs.hashing import keccak256
from rewards import chain as chainmod
from rewards.settlement import Settlement, deploy_token

ACTIVATION_DELAY = 3600
SUPPLY = 10**36  # under 2**128, the cap on a root total; covers the OZ vectors
GAS_ETHER = 10**20


def account(label: str) -> LocalAccount:
    """A deterministic test key per label (never a real key)."""
    acct: LocalAccount = Account.from_key(keccak256(b"veritrain-test:" + label.encode()))
    return acct


@dataclass(frozen=True, kw_only=True, slots=True)
class Chain:
    backend: str
    w3: Web3
    admin: LocalAccount
    poster: LocalAccount
    guardian: LocalAccount
    relayer: LocalAccount


@dataclass(frozen=True, kw_only=True, slots=True)
class Deployed:
    chain: Chain
    settlement: Settlement
    token: str


@pytest.fixture(scope="module", params=["tester", "anvil"])
def chain(request: pytest.FixtureRequest) -> Iterator[Chain]:
    node: chainmod.AnvilNode | None = None
    if request.param == "tester":
        w3 = chainmod.connect(None)
    else:
        try:
            binary = chainmod.find_anvil()
        except chainmod.ChainError as exc:
            pytest.skip(f"ANVIL ABSENT, Anvil backend not tested: {exc}")
        node = chainmod.AnvilNode(binary=binary).start()
        w3 = chainmod.connect(node.url)
    try:
        roles = {r: account(r) for r in ("admin", "poster", "guardian", "relayer")}
        for acct in roles.values():
            chainmod.fund_from_dev_account(w3, acct.address, GAS_ETHER)
        yield Chain(backend=request.param, w3=w3, **roles)
    finally:
        if node is not None:
            node.stop()


@pytest.fixture
def deployed(chain: Chain) -> Deployed:
    token = deploy_token(chain.w3, chain.admin, supply=SUPPLY, holder=chain.admin.address)
    settlement, _ = Settlement.deploy(
        chain.w3,
        chain.admin,
        token=token,
        activation_delay=ACTIVATION_DELAY,
        poster=chain.poster.address,
        guardian=chain.guardian.address,
    )
    return Deployed(chain=chain, settlement=settlement, token=token)

"""Payout Merkle tree, byte-identical to OpenZeppelin's ``StandardMerkleTree``.

Leaf type ``["address", "uint256"]`` as in ``@openzeppelin/merkle-tree`` 1.0.8 (and its Solidity
counterpart ``MerkleProof``): leaf = keccak256(keccak256(abi.encode(account, amount))), node =
keccak256 of the two children sorted as unsigned integers, all nodes of a complete binary tree in
one array (``tree[k] = H(tree[2k+1], tree[2k+2])``), leaves sorted by hash and stored from the end
(``tree[2n-2-i] = sorted_leaf_i``). The order of ``entries`` is kept as the dump's ``values``, so
index ``i`` means "the i-th entry given to :meth:`PayoutTree.build`", as OZ's value index does.
See docs/payout-tree.md.

Building raises :class:`PayoutError`; ``verify_*`` functions return a bool and never raise.
"""

from __future__ import annotations

import importlib  # noqa: F401 - tests reach the keccak fallbacks' importlib through this module
import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NewType

from proofs import codec
from proofs.codec import UINT256_LIMIT as UINT256_LIMIT
from proofs.codec import Address as Address
from proofs.codec import as_bytes, check_uint256
from proofs.codec import fast_keccak256 as _keccak
from proofs.codec import make_fast_keccak as _fast_keccak  # noqa: F401 - tested through here
from proofs.errors import EncodingError, VeritrainError
from proofs.hashing import Hash32, Root

Wei = NewType("Wei", int)
"""An amount in the token's smallest unit: 0 <= Wei < 2**256."""


LEAF_ENCODING = ("address", "uint256")
DUMP_FORMAT = "standard-v1"

_DECIMAL = re.compile(r"[0-9]+\Z")
_ADDRESS_PAD = bytes(12)


class PayoutError(VeritrainError, ValueError):
    """A payout entry, index, proof request or tree dump is invalid."""


def normalize_address(account: str) -> Address:
    """``account`` in EIP-55 checksum case (the rule of :func:`proofs.codec.normalize_address`).

    Raises PayoutError unless ``account`` is a str of 0x + 40 hex digits; a mixed-case address
    must carry a correct EIP-55 checksum (all-lowercase or all-uppercase digits carry none).
    """
    try:
        return codec.normalize_address(account)
    except EncodingError as exc:
        raise PayoutError(str(exc)) from None


def check_amount(amount: int) -> Wei:
    """``amount`` as Wei. Raises PayoutError unless it is an int (not bool) in [0, 2**256)."""
    try:
        return Wei(check_uint256(amount))
    except EncodingError as exc:
        raise PayoutError(str(exc)) from None


@dataclass(frozen=True, kw_only=True, slots=True)
class PayoutEntry:
    """One payout: ``amount`` Wei to ``account``. Validated and checksummed on creation."""

    account: Address
    amount: Wei

    def __post_init__(self) -> None:
        object.__setattr__(self, "account", normalize_address(self.account))
        object.__setattr__(self, "amount", check_amount(self.amount))


def _leaf(account: Address, amount: Wei) -> Hash32:
    # abi.encode(address, uint256) is two 32-byte big-endian words, the address left-padded.
    encoded = _ADDRESS_PAD + bytes.fromhex(account[2:]) + amount.to_bytes(32, "big")
    return Hash32(_keccak(_keccak(encoded)))


def payout_leaf_hash(account: str, amount: int) -> Hash32:
    """keccak256(keccak256(abi.encode(account, amount))). Raises PayoutError on bad input."""
    return _leaf(normalize_address(account), check_amount(amount))


def _node(a: bytes, b: bytes) -> bytes:
    # Sorted pair (OZ standardNodeHash): the verifier needs no left/right bits.
    return _keccak(a + b if a <= b else b + a)


@dataclass(frozen=True, kw_only=True, slots=True)
class PayoutMultiProof:
    """OZ ``getMultiProof`` output: proven entries in processing order, sibling hashes, flags."""

    leaves: tuple[PayoutEntry, ...]
    proof: tuple[Hash32, ...]
    proof_flags: tuple[bool, ...]

    def to_json(self) -> dict[str, Any]:
        """OZ's JSON shape: leaves as [address, decimal string], proof as 0x-hex."""
        return {
            "leaves": [[e.account, str(e.amount)] for e in self.leaves],
            "proof": ["0x" + h.hex() for h in self.proof],
            "proofFlags": list(self.proof_flags),
        }

    @classmethod
    def from_json(cls, obj: object) -> PayoutMultiProof:
        """Parse :meth:`to_json` output strictly. Raises PayoutError when malformed."""
        if not isinstance(obj, dict) or set(obj) != {"leaves", "proof", "proofFlags"}:
            raise PayoutError("multiproof must be an object with leaves, proof, proofFlags")
        leaves, proof, flags = obj["leaves"], obj["proof"], obj["proofFlags"]
        if not (isinstance(leaves, list) and isinstance(proof, list) and isinstance(flags, list)):
            raise PayoutError("multiproof leaves, proof and proofFlags must be lists")
        if not all(isinstance(f, bool) for f in flags):
            raise PayoutError("proofFlags must be booleans")
        return cls(
            leaves=tuple(_parse_value(v) for v in leaves),
            proof=tuple(_parse_hash(h) for h in proof),
            proof_flags=tuple(flags),
        )


def _parse_hash(value: object) -> Hash32:
    try:
        return Hash32(as_bytes(value, "hash", 32))
    except EncodingError as exc:
        raise PayoutError(str(exc)) from None


def _parse_amount(value: object) -> Wei:
    # OZ (via @metamask/abi-utils) accepts a decimal string, a 0x-hex string or a bigint.
    if isinstance(value, str) and _DECIMAL.match(value):
        return check_amount(int(value))
    if isinstance(value, str) and re.fullmatch(r"0x[0-9a-fA-F]{1,64}", value):
        return check_amount(int(value, 16))
    if isinstance(value, int) and not isinstance(value, bool):
        return check_amount(value)
    raise PayoutError(f"amount must be a decimal string, got {value!r}")


def _parse_value(value: object) -> PayoutEntry:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise PayoutError(f"a leaf value must be [address, amount], got {value!r}")
    return PayoutEntry(account=normalize_address(value[0]), amount=_parse_amount(value[1]))


def _as_entry(item: PayoutEntry | tuple[str, int]) -> PayoutEntry:
    if isinstance(item, PayoutEntry):
        return item
    if not isinstance(item, tuple | list) or len(item) != 2:
        raise PayoutError(f"an entry must be (address, amount), got {item!r}")
    return PayoutEntry(account=Address(item[0]), amount=Wei(item[1]))


def _build_nodes(tree: list[bytes], leaf_count: int) -> None:
    for k in range(len(tree) - 1 - leaf_count, -1, -1):
        tree[k] = _node(tree[2 * k + 1], tree[2 * k + 2])


class PayoutTree:
    """A built payout tree: entries in caller order, the node array, and each entry's node index.

    Immutable after construction; use :meth:`build` or :meth:`load`.
    """

    __slots__ = ("_by_account", "_entries", "_tree", "_tree_index")

    def __init__(
        self,
        *,
        entries: tuple[PayoutEntry, ...],
        tree: tuple[Hash32, ...],
        tree_index: tuple[int, ...],
    ) -> None:
        self._entries = entries
        self._tree = tree
        self._tree_index = tree_index
        by_account: dict[str, list[int]] = {}
        for i, entry in enumerate(entries):
            by_account.setdefault(entry.account, []).append(i)
        self._by_account = by_account

    @classmethod
    def build(cls, entries: Sequence[PayoutEntry | tuple[str, int]]) -> PayoutTree:
        """Build the tree OZ's ``StandardMerkleTree.of(entries, ["address","uint256"])`` builds.

        Raises PayoutError on an empty list, a bad address (length, hex, checksum) or an amount
        outside uint256. Duplicate entries are kept, as OZ keeps them.
        """
        parsed = tuple(_as_entry(item) for item in entries)
        if not parsed:
            raise PayoutError("a payout tree needs at least one entry")
        hashes = [_leaf(e.account, e.amount) for e in parsed]
        # Stable sort by hash, as JS Array.prototype.sort is stable: equal leaves keep their order.
        order = sorted(range(len(hashes)), key=hashes.__getitem__)
        n = len(hashes)
        tree: list[bytes] = [b""] * (2 * n - 1)
        tree_index = [0] * n
        for position, value_index in enumerate(order):
            tree[2 * n - 2 - position] = hashes[value_index]
            tree_index[value_index] = 2 * n - 2 - position
        _build_nodes(tree, n)
        return cls(
            entries=parsed, tree=tuple(Hash32(h) for h in tree), tree_index=tuple(tree_index)
        )

    @property
    def root(self) -> Root:
        return Root(self._tree[0])

    @property
    def entries(self) -> tuple[PayoutEntry, ...]:
        return self._entries

    @property
    def tree(self) -> tuple[Hash32, ...]:
        """Every node, root first, in OZ's array layout."""
        return self._tree

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"PayoutTree(root=0x{self._tree[0].hex()}, entries={len(self._entries)})"

    def leaf_hash(self, index: int) -> Hash32:
        """The leaf hash of entry ``index``. Raises PayoutError when out of range."""
        return self._tree[self._node_of(index)]

    def _node_of(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, int):
            raise PayoutError(f"entry index must be an int, got {type(index).__name__}")
        if not 0 <= index < len(self._entries):
            raise PayoutError(f"entry index {index} out of range [0, {len(self._entries)})")
        return self._tree_index[index]

    def proof(self, index: int) -> tuple[Hash32, ...]:
        """Sibling hashes from entry ``index``'s leaf up to the root (OZ ``getProof``)."""
        k = self._node_of(index)
        siblings: list[Hash32] = []
        while k > 0:
            siblings.append(self._tree[k + 1 if k % 2 else k - 1])
            k = (k - 1) // 2
        return tuple(siblings)

    def index_of(self, account: str) -> int:
        """The entry index paying ``account``; PayoutError if absent or listed more than once."""
        found = self._by_account.get(normalize_address(account), [])
        if len(found) != 1:
            what = "not in the tree" if not found else f"listed {len(found)} times; use proof(i)"
            raise PayoutError(f"account {account} is {what}")
        return found[0]

    def proof_for(self, account: str) -> tuple[Hash32, ...]:
        """The proof for the single entry paying ``account`` (see :meth:`index_of`)."""
        return self.proof(self.index_of(account))

    def multiproof(self, indices: Iterable[int]) -> PayoutMultiProof:
        """OZ ``getMultiProof`` for entry indices. PayoutError on a bad or duplicated index."""
        nodes = sorted((self._node_of(i) for i in indices), reverse=True)
        if len(set(nodes)) != len(nodes):
            raise PayoutError("cannot prove a duplicated index")
        stack = deque(nodes)
        proof: list[Hash32] = []
        flags: list[bool] = []
        while stack and stack[0] > 0:
            j = stack.popleft()
            sibling = j + 1 if j % 2 else j - 1
            if stack and stack[0] == sibling:
                flags.append(True)
                stack.popleft()
            else:
                flags.append(False)
                proof.append(self._tree[sibling])
            stack.append((j - 1) // 2)
        if not nodes:
            proof.append(self._tree[0])
        by_node = {k: i for i, k in enumerate(self._tree_index)}
        leaves = tuple(self._entries[by_node[k]] for k in nodes)
        return PayoutMultiProof(leaves=leaves, proof=tuple(proof), proof_flags=tuple(flags))

    def dump(self) -> dict[str, Any]:
        """The ``standard-v1`` JSON object ``StandardMerkleTree.load`` accepts.

        Amounts are decimal strings (JSON numbers cannot hold uint256; OZ rejects numbers),
        addresses EIP-55, nodes lowercase 0x-hex.
        """
        return {
            "format": DUMP_FORMAT,
            "leafEncoding": list(LEAF_ENCODING),
            "tree": ["0x" + h.hex() for h in self._tree],
            "values": [
                {"value": [e.account, str(e.amount)], "treeIndex": k}
                for e, k in zip(self._entries, self._tree_index, strict=True)
            ],
        }

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> PayoutTree:
        """Parse and fully validate a ``standard-v1`` dump (ours or OZ's).

        Every node is recomputed and every value must sit at a distinct leaf position holding its
        hash. Raises PayoutError on anything else.
        """
        if not isinstance(data, Mapping):
            raise PayoutError("a tree dump must be a JSON object")
        if data.get("format") != DUMP_FORMAT:
            raise PayoutError(f"unknown dump format {data.get('format')!r}")
        if list(data.get("leafEncoding") or []) != list(LEAF_ENCODING):
            raise PayoutError(f"leafEncoding must be {list(LEAF_ENCODING)}")
        raw_tree, raw_values = data.get("tree"), data.get("values")
        if not isinstance(raw_tree, list) or not isinstance(raw_values, list) or not raw_values:
            raise PayoutError("dump needs a non-empty values list and a tree list")
        n = len(raw_values)
        if len(raw_tree) != 2 * n - 1:
            raise PayoutError(f"tree has {len(raw_tree)} nodes; {n} values need {2 * n - 1}")
        tree = [_parse_hash(h) for h in raw_tree]
        entries, tree_index = _parse_dump_values(raw_values, tree)
        expected: list[bytes] = list(tree)
        _build_nodes(expected, n)
        if expected != tree:
            raise PayoutError("tree nodes do not hash to their parents: the dump is corrupt")
        return cls(entries=entries, tree=tuple(tree), tree_index=tree_index)


def _parse_dump_values(
    raw_values: list[Any], tree: list[Hash32]
) -> tuple[tuple[PayoutEntry, ...], tuple[int, ...]]:
    n = len(raw_values)
    entries: list[PayoutEntry] = []
    tree_index: list[int] = []
    for item in raw_values:
        if not isinstance(item, dict) or set(item) != {"value", "treeIndex"}:
            raise PayoutError("each dump value must be {value, treeIndex}")
        k = item["treeIndex"]
        if isinstance(k, bool) or not isinstance(k, int) or not n - 1 <= k < 2 * n - 1:
            raise PayoutError(f"treeIndex {k!r} is not a leaf position of a {n}-leaf tree")
        entry = _parse_value(item["value"])
        if tree[k] != _leaf(entry.account, entry.amount):
            raise PayoutError(f"value at treeIndex {k} does not match the tree")
        entries.append(entry)
        tree_index.append(k)
    if len(set(tree_index)) != n:
        raise PayoutError("two values share a treeIndex")
    return tuple(entries), tuple(tree_index)


def _process_proof(leaf: bytes, proof: Sequence[bytes]) -> bytes:
    node = leaf
    for sibling in proof:
        node = _node(node, sibling)
    return node


def _process_multiproof(
    leaves: Sequence[bytes], proof: Sequence[bytes], flags: Sequence[bool]
) -> bytes | None:
    """OZ ``processMultiProof``; None where OZ (or MerkleProof.sol) would throw."""
    if len(proof) < sum(1 for f in flags if not f):
        return None
    if len(leaves) + len(proof) != len(flags) + 1:
        return None
    stack = deque(leaves)
    pending = deque(proof)
    for flag in flags:
        if not stack:
            return None
        a = stack.popleft()
        if flag and not stack:
            return None
        b = stack.popleft() if flag else pending.popleft()
        stack.append(_node(a, b))
    if len(stack) + len(pending) != 1:
        return None
    return stack.pop() if stack else pending.popleft()


def _valid_hashes(values: object) -> bool:
    return isinstance(values, Sequence) and all(
        isinstance(h, bytes) and len(h) == 32 for h in values
    )


def verify_payout(root: bytes, account: str, amount: int, proof: Sequence[bytes]) -> bool:
    """True iff ``proof`` shows (account, amount) is a leaf of the tree with ``root``.

    Never raises: malformed roots, addresses, amounts or proofs give False.
    """
    try:
        if not (isinstance(root, bytes) and len(root) == 32 and _valid_hashes(proof)):
            return False
        leaf = payout_leaf_hash(account, amount)
        return _process_proof(leaf, proof) == root
    except Exception:
        return False


def verify_payout_multiproof(
    root: bytes,
    leaves: Sequence[PayoutEntry | tuple[str, int]],
    proof: Sequence[bytes],
    proof_flags: Sequence[bool],
) -> bool:
    """True iff the multiproof shows every (account, amount) in ``leaves`` is in the tree.

    ``leaves`` must be in the order :meth:`PayoutTree.multiproof` returns them. Never raises.
    """
    try:
        if not (isinstance(root, bytes) and len(root) == 32 and _valid_hashes(proof)):
            return False
        if not isinstance(proof_flags, Sequence) or not all(
            isinstance(f, bool) for f in proof_flags
        ):
            return False
        hashes = [_leaf(e.account, e.amount) for e in (_as_entry(item) for item in leaves)]
        return _process_multiproof(hashes, proof, proof_flags) == root
    except Exception:
        return False

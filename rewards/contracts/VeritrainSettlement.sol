// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";

/// @title veritrain settlement: commitment registry and cumulative Merkle payouts.
/// @notice Peers record training commitments; a poster publishes cumulative payout roots that
/// activate after a delay (a guardian may revoke them until then); anyone submits claims that pay
/// an account the difference between its cumulative amount and what it already received.
/// @dev Leaves follow OpenZeppelin's StandardMerkleTree for ["address", "uint256"]:
/// keccak256(bytes.concat(keccak256(abi.encode(account, cumulativeAmount)))). The double hash keeps
/// a 64-byte internal node from passing as a leaf.
/// @dev Gas layout. The "reference root" is the newest root that is not revoked. Its claim word
/// (`_claimWord`, keyed by the root hash itself) holds everything a claim against it needs in one
/// storage slot: headroom = its cumulative total minus everything ever paid, its activation time,
/// its index, a reference flag and a copy of the pause flag. A claim computes the root from its
/// proof and reads that one word: if it is the reference root's, active and not paused, the root
/// is the newest active one and no other slot is read. Otherwise (paused, reference root still in
/// its delay, bad proof) the claim takes the history walk of `activeRootIndex`, as before.
/// Keying by the full 256-bit root means a proof is accepted exactly when its computed root equals
/// a posted root, as MerkleProof.verify would decide.
contract VeritrainSettlement is AccessControl {
    using SafeERC20 for IERC20;

    bytes32 public constant POSTER_ROLE = keccak256("POSTER_ROLE");
    bytes32 public constant GUARDIAN_ROLE = keccak256("GUARDIAN_ROLE");

    /// @dev Slot 0 is the Merkle root; slot 1 packs total, activation, epoch and revocation;
    /// inputsHash sits in slot 2. Claims on the fast path read none of them.
    struct PayoutRoot {
        bytes32 root;
        uint128 cumulativeTotal;
        uint48 activatedAt;
        uint64 epoch;
        bool revoked;
        bytes32 inputsHash;
    }

    /// @dev What a batch learned from its first entry (see _resolve).
    struct Resolution {
        bytes32 root;
        uint256 index;
        bytes32 key;
        uint256 word;
        uint256 limit;
    }

    struct Commitment {
        bytes32 root;
        uint64 blockNumber;
    }

    // Claim word fields: headroom in the low 128 bits (so paying subtracts from the word itself),
    // then activation time, index and the two flags.
    uint256 private constant AT_SHIFT = 128; // uint48 activatedAt
    uint256 private constant INDEX_SHIFT = 176; // uint64 index
    uint256 private constant REF_BIT = 1 << 240; // this word describes the reference root
    uint256 private constant PAUSED_BIT = 1 << 241; // mirrors _paused while REF_BIT is set

    IERC20 public immutable token;
    uint48 public immutable activationDelay;

    /// @dev One slot: the pause flag, the history length and 1 + the reference root's index.
    bool private _paused;
    uint64 private _rootCount;
    uint64 private _refPlusOne;
    /// @notice Largest cumulative total any root ever promised (revoked ones included, which only
    /// makes recoverExcess more conservative).
    uint256 public maxPostedTotal;
    mapping(address account => uint256 amount) public cumulativeClaimed;

    mapping(uint256 index => PayoutRoot) private _roots;
    mapping(uint64 epoch => uint256 indexPlusOne) private _epochRoot;
    mapping(bytes32 root => uint256 word) private _claimWord;
    mapping(address committer => mapping(bytes32 runId => Commitment)) private _commitments;

    event CommitmentRecorded(
        address indexed committer, bytes32 indexed runId, bytes32 root, uint256 blockNumber
    );
    event RootPosted(
        uint256 indexed index,
        uint64 indexed epoch,
        bytes32 root,
        uint256 cumulativeTotal,
        bytes32 inputsHash,
        uint256 activatedAt
    );
    event RootRevoked(uint256 indexed index, uint64 indexed epoch, address guardian);
    /// @dev rootIndex is data, not a topic: a topic costs 375 gas on every claim, and claims are
    /// found by account.
    event Claimed(
        address indexed account, uint256 rootIndex, uint256 amount, uint256 cumulativeAmount
    );
    event ExcessRecovered(address indexed to, uint256 amount);
    /// @dev Same signatures as OpenZeppelin's Pausable, whose flag could not share the claim word.
    event Paused(address account);
    event Unpaused(address account);

    error ZeroAddress();
    error ZeroRoot();
    error CommitmentExists(address committer, bytes32 runId);
    error EpochNotIncreasing(uint64 epoch, uint64 lastEpoch);
    error TotalTooLarge(uint256 cumulativeTotal);
    error TotalDecreasing(uint256 cumulativeTotal, uint256 previousTotal);
    error InsufficientFunding(uint256 cumulativeTotal, uint256 available);
    error UnknownRoot(uint256 index);
    error RootAlreadyActive(uint256 index, uint256 activatedAt);
    error RootAlreadyRevoked(uint256 index);
    error NoActiveRoot();
    error InvalidProof(address account, uint256 cumulativeAmount);
    error NothingToClaim(address account, uint256 cumulativeAmount, uint256 alreadyClaimed);
    error ClaimExceedsRootTotal(uint256 rootIndex, uint256 cumulativeTotal);
    error LengthMismatch();
    error EmptyBatch();
    error ExcessTooSmall(uint256 requested, uint256 excess);
    error EnforcedPause();
    error ExpectedPause();

    constructor(IERC20 token_, uint48 activationDelay_, address admin, address poster, address guardian) {
        if (address(token_) == address(0) || admin == address(0)) revert ZeroAddress();
        token = token_;
        activationDelay = activationDelay_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        if (poster != address(0)) _grantRole(POSTER_ROLE, poster);
        if (guardian != address(0)) _grantRole(GUARDIAN_ROLE, guardian);
    }

    // ------------------------------------------------------------------ commitment registry

    /// @notice Record a training run's commitment root from the caller's own address. A record is
    /// immutable: its block is the point after which an auditor's beacon (a later block hash) is
    /// unpredictable to the peer, so it must never move.
    function recordCommitment(bytes32 runId, bytes32 root) external {
        if (root == bytes32(0)) revert ZeroRoot();
        Commitment storage c = _commitments[msg.sender][runId];
        if (c.blockNumber != 0) revert CommitmentExists(msg.sender, runId);
        c.root = root;
        c.blockNumber = uint64(block.number);
        emit CommitmentRecorded(msg.sender, runId, root, block.number);
    }

    /// @notice The commitment `committer` recorded for `runId`; blockNumber 0 means none.
    function commitment(address committer, bytes32 runId)
        external
        view
        returns (bytes32 root, uint64 blockNumber)
    {
        Commitment storage c = _commitments[committer][runId];
        return (c.root, c.blockNumber);
    }

    // ------------------------------------------------------------------ payout roots

    /// @notice Append a payout root. Epochs strictly increase, except that the newest epoch may be
    /// posted again once its root was revoked. Cumulative totals never decrease from one live root
    /// to the next. The root must be fully funded: its cumulative total may not exceed the token
    /// balance plus everything already paid out.
    function postRoot(uint64 epoch, bytes32 root, uint256 cumulativeTotal, bytes32 inputsHash)
        external
        onlyRole(POSTER_ROLE)
        returns (uint256 index)
    {
        if (root == bytes32(0)) revert ZeroRoot();
        if (cumulativeTotal > type(uint128).max) revert TotalTooLarge(cumulativeTotal);
        index = _rootCount;
        if (index > 0) {
            PayoutRoot storage last = _roots[index - 1];
            if (epoch < last.epoch || (epoch == last.epoch && !last.revoked)) {
                revert EpochNotIncreasing(epoch, last.epoch);
            }
        }
        uint256 paid;
        uint256 refPlusOne = _refPlusOne;
        if (refPlusOne != 0) {
            PayoutRoot storage ref = _roots[refPlusOne - 1];
            // Headroom stays non-negative only if totals do not fall; cumulative payouts never do.
            if (cumulativeTotal < ref.cumulativeTotal) {
                revert TotalDecreasing(cumulativeTotal, ref.cumulativeTotal);
            }
            uint256 word = _claimWord[ref.root];
            paid = ref.cumulativeTotal - uint128(word);
            _claimWord[ref.root] = word & ~REF_BIT; // the new root takes over as reference
        }
        uint256 available = token.balanceOf(address(this)) + paid;
        if (cumulativeTotal > available) revert InsufficientFunding(cumulativeTotal, available);
        uint48 activatedAt = uint48(block.timestamp) + activationDelay;
        _roots[index] = PayoutRoot({
            root: root,
            cumulativeTotal: uint128(cumulativeTotal),
            activatedAt: activatedAt,
            epoch: epoch,
            revoked: false,
            inputsHash: inputsHash
        });
        _setReference(index, root, cumulativeTotal - paid, activatedAt);
        _rootCount = uint64(index + 1);
        _epochRoot[epoch] = index + 1;
        if (cumulativeTotal > maxPostedTotal) maxPostedTotal = cumulativeTotal;
        emit RootPosted(index, epoch, root, cumulativeTotal, inputsHash, activatedAt);
    }

    /// @notice Revoke a root that is not active yet. Works while paused, so a guardian can pause
    /// first and then take a bad root out.
    function revokeRoot(uint256 index) external onlyRole(GUARDIAN_ROLE) {
        if (index >= _rootCount) revert UnknownRoot(index);
        PayoutRoot storage r = _roots[index];
        if (r.revoked) revert RootAlreadyRevoked(index);
        if (r.activatedAt <= block.timestamp) revert RootAlreadyActive(index, r.activatedAt);
        r.revoked = true;
        if (index + 1 == _refPlusOne) _retireReference(index, r);
        emit RootRevoked(index, r.epoch, msg.sender);
    }

    function rootCount() external view returns (uint256) {
        return _rootCount;
    }

    /// @notice Everything ever paid out by claims: the reference root's total minus its headroom.
    function totalClaimed() public view returns (uint256) {
        uint256 refPlusOne = _refPlusOne;
        if (refPlusOne == 0) return 0; // no live root was ever claimable (see _retireReference)
        PayoutRoot storage ref = _roots[refPlusOne - 1];
        return ref.cumulativeTotal - uint128(_claimWord[ref.root]);
    }

    function rootAt(uint256 index) external view returns (PayoutRoot memory) {
        if (index >= _rootCount) revert UnknownRoot(index);
        return _roots[index];
    }

    /// @notice Index of the root most recently posted for `epoch` (found = false if none).
    function rootIndexForEpoch(uint64 epoch) external view returns (bool found, uint256 index) {
        uint256 plusOne = _epochRoot[epoch];
        return (plusOne != 0, plusOne == 0 ? 0 : plusOne - 1);
    }

    /// @notice Index of the newest root that is active (past its delay and not revoked).
    function activeRootIndex() public view returns (uint256) {
        // Roots activate in posting order (same delay), so the newest active one is the first
        // non-revoked, past-delay root walking back; the walk only passes pending or revoked roots.
        for (uint256 i = _rootCount; i > 0; --i) {
            PayoutRoot storage r = _roots[i - 1];
            if (!r.revoked && r.activatedAt <= block.timestamp) return i - 1;
        }
        revert NoActiveRoot();
    }

    function paused() external view returns (bool) {
        return _paused;
    }

    // ------------------------------------------------------------------ claims

    /// @notice Pay `account` the difference between `cumulativeAmount` (its leaf in the newest
    /// active root) and what it already received. Anyone may submit; tokens always go to `account`.
    function claim(address account, uint256 cumulativeAmount, bytes32[] calldata proof) external {
        bytes32 root = MerkleProof.processProofCalldata(proof, _leaf(account, cumulativeAmount));
        (uint256 index, bytes32 key, uint256 word, uint256 limit) =
            _resolve(root, account, cumulativeAmount);
        uint256 amount = _settle(index, account, cumulativeAmount);
        if (amount > limit) revert ClaimExceedsRootTotal(index, _roots[index].cumulativeTotal);
        unchecked {
            _claimWord[key] = word - amount; // amount <= limit <= headroom, the word's low bits
        }
        token.safeTransfer(account, amount); // interaction last: every effect is written
    }

    /// @notice Several claims against the newest active root in one transaction. All or nothing:
    /// any invalid entry reverts the whole batch.
    function claimBatch(
        address[] calldata accounts,
        uint256[] calldata cumulativeAmounts,
        bytes32[][] calldata proofs
    ) external {
        if (cumulativeAmounts.length != accounts.length || proofs.length != accounts.length) {
            revert LengthMismatch();
        }
        if (accounts.length == 0) revert EmptyBatch();
        Resolution memory res;
        res.root =
            MerkleProof.processProofCalldata(proofs[0], _leaf(accounts[0], cumulativeAmounts[0]));
        (res.index, res.key, res.word, res.limit) =
            _resolve(res.root, accounts[0], cumulativeAmounts[0]);
        (uint256[] memory amounts, uint256 sum) =
            _settleBatch(res, accounts, cumulativeAmounts, proofs);
        if (sum > res.limit) {
            revert ClaimExceedsRootTotal(res.index, _roots[res.index].cumulativeTotal);
        }
        unchecked {
            _claimWord[res.key] = res.word - sum; // sum <= limit <= headroom
        }
        // Interactions last, after every effect of the batch is written.
        for (uint256 i; i < amounts.length; ++i) {
            token.safeTransfer(accounts[i], amounts[i]);
        }
    }

    /// @dev Checks and effects of every claim of a batch (the first entry's proof was checked by
    /// _resolve, the others against the same root); returns the amounts owed and their sum.
    function _settleBatch(
        Resolution memory res,
        address[] calldata accounts,
        uint256[] calldata cumulativeAmounts,
        bytes32[][] calldata proofs
    ) private returns (uint256[] memory amounts, uint256 sum) {
        uint256 n = accounts.length;
        amounts = new uint256[](n);
        for (uint256 i; i < n; ++i) {
            if (i > 0) {
                bytes32 leaf = _leaf(accounts[i], cumulativeAmounts[i]);
                if (!MerkleProof.verifyCalldata(proofs[i], res.root, leaf)) {
                    revert InvalidProof(accounts[i], cumulativeAmounts[i]);
                }
            }
            amounts[i] = _settle(res.index, accounts[i], cumulativeAmounts[i]);
            sum += amounts[i];
        }
    }

    /// @dev OpenZeppelin StandardMerkleTree leaf for ["address", "uint256"].
    function _leaf(address account, uint256 cumulativeAmount) private pure returns (bytes32) {
        return keccak256(bytes.concat(keccak256(abi.encode(account, cumulativeAmount))));
    }

    /// @dev Which root a claim whose proof computes `root` is paid from, checked to be the newest
    /// active root; and where its headroom lives: the claim word `key` (read as `word`) and how
    /// much the claim may pay in all (`limit`) without the paid-out sum exceeding that root's
    /// total. Reverts EnforcedPause, NoActiveRoot or InvalidProof, in that order.
    function _resolve(bytes32 root, address account, uint256 cumulativeAmount)
        private
        view
        returns (uint256 index, bytes32 key, uint256 word, uint256 limit)
    {
        word = _claimWord[root];
        // Fast path: the reference root (every newer root is revoked), past its delay, not paused.
        if (word & (REF_BIT | PAUSED_BIT) == REF_BIT && uint48(word >> AT_SHIFT) <= block.timestamp) {
            return (uint64(word >> INDEX_SHIFT), root, word, uint128(word));
        }
        if (_paused) revert EnforcedPause();
        index = activeRootIndex();
        PayoutRoot storage r = _roots[index];
        if (r.root != root) revert InvalidProof(account, cumulativeAmount);
        // An older root is active while the reference root waits out its delay (had the reference
        // root been active, its own word would have taken the fast path). Totals do not decrease
        // and nothing was paid from a revoked root, so paid <= r.cumulativeTotal <= ref total.
        PayoutRoot storage ref = _roots[_refPlusOne - 1];
        key = ref.root;
        word = _claimWord[key];
        uint256 headroom = uint128(word);
        limit = r.cumulativeTotal - (ref.cumulativeTotal - headroom);
        // Equal while totals never decrease; the cap keeps a payment inside the word's low field
        // whatever happens, since the caller subtracts it from the whole word.
        if (limit > headroom) limit = headroom;
    }

    /// @dev Checks and effects of one claim; returns the amount owed. No token transfer here.
    function _settle(uint256 index, address account, uint256 cumulativeAmount)
        private
        returns (uint256 amount)
    {
        uint256 already = cumulativeClaimed[account];
        if (cumulativeAmount <= already) revert NothingToClaim(account, cumulativeAmount, already);
        unchecked {
            amount = cumulativeAmount - already; // strictly positive: checked just above
        }
        cumulativeClaimed[account] = cumulativeAmount;
        emit Claimed(account, index, amount, cumulativeAmount);
    }

    /// @dev Make root `index` the reference: its claim word gets the headroom, activation time,
    /// index, the reference flag and the current pause flag.
    function _setReference(uint256 index, bytes32 root, uint256 headroom, uint48 activatedAt)
        private
    {
        uint256 word = headroom | (uint256(activatedAt) << AT_SHIFT) | (index << INDEX_SHIFT)
            | REF_BIT;
        if (_paused) word |= PAUSED_BIT;
        _claimWord[root] = word;
        _refPlusOne = uint64(index + 1);
    }

    /// @dev The reference root `index` was just revoked: the newest earlier root that is not
    /// revoked takes over, with the same paid-out sum.
    function _retireReference(uint256 index, PayoutRoot storage r) private {
        uint256 word = _claimWord[r.root];
        uint256 paid = r.cumulativeTotal - uint128(word);
        _claimWord[r.root] = word & ~REF_BIT;
        for (uint256 i = index; i > 0; --i) {
            PayoutRoot storage q = _roots[i - 1];
            if (!q.revoked) {
                // paid <= q.cumulativeTotal: every payment came from q or an earlier live root.
                _setReference(i - 1, q.root, q.cumulativeTotal - paid, q.activatedAt);
                return;
            }
        }
        // No live root left. Then nothing was ever paid (paid == 0): a root that paid was active,
        // and an active root can no longer be revoked.
        _refPlusOne = 0;
    }

    // ------------------------------------------------------------------ administration

    /// @notice Stop claims. Posting, revoking and the registry keep working.
    function pause() external onlyRole(GUARDIAN_ROLE) {
        if (_paused) revert EnforcedPause();
        _paused = true;
        _mirrorPause(true);
        emit Paused(msg.sender);
    }

    /// @notice Unpausing needs the admin, not the guardian: stopping is fast, resuming deliberate.
    function unpause() external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (!_paused) revert ExpectedPause();
        _paused = false;
        _mirrorPause(false);
        emit Unpaused(msg.sender);
    }

    /// @dev Copy the pause flag into the reference root's claim word, which the fast path reads.
    function _mirrorPause(bool on) private {
        uint256 refPlusOne = _refPlusOne;
        if (refPlusOne == 0) return;
        bytes32 key = _roots[refPlusOne - 1].root;
        uint256 word = _claimWord[key];
        _claimWord[key] = on ? word | PAUSED_BIT : word & ~PAUSED_BIT;
    }

    /// @notice Send tokens no root ever promised (balance + paid - largest posted total) to `to`,
    /// so funds do not stay stuck after a distribution ends.
    function recoverExcess(address to, uint256 amount) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (to == address(0)) revert ZeroAddress();
        uint256 backing = token.balanceOf(address(this)) + totalClaimed();
        uint256 excess = backing > maxPostedTotal ? backing - maxPostedTotal : 0;
        if (amount > excess) revert ExcessTooSmall(amount, excess);
        emit ExcessRecovered(to, amount);
        token.safeTransfer(to, amount);
    }
}

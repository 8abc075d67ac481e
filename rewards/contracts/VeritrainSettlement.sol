// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {Pausable} from "@openzeppelin/contracts/utils/Pausable.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";

/// @title veritrain settlement: commitment registry and cumulative Merkle payouts.
/// @notice Peers record training commitments; a poster publishes cumulative payout roots that
/// activate after a delay (a guardian may revoke them until then); anyone submits claims that pay
/// an account the difference between its cumulative amount and what it already received.
/// @dev Leaves follow OpenZeppelin's StandardMerkleTree for ["address", "uint256"]:
/// keccak256(bytes.concat(keccak256(abi.encode(account, cumulativeAmount)))). The double hash keeps
/// a 64-byte internal node from passing as a leaf.
contract VeritrainSettlement is AccessControl, Pausable, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    bytes32 public constant POSTER_ROLE = keccak256("POSTER_ROLE");
    bytes32 public constant GUARDIAN_ROLE = keccak256("GUARDIAN_ROLE");

    /// @dev Slot 0 is the Merkle root; slot 1 packs everything a claim reads next to it, so a claim
    /// touches two slots of its root. inputsHash sits in slot 2, which claims never read.
    struct PayoutRoot {
        bytes32 root;
        uint128 cumulativeTotal;
        uint48 activatedAt;
        uint64 epoch;
        bool revoked;
        bytes32 inputsHash;
    }

    struct Commitment {
        bytes32 root;
        uint64 blockNumber;
    }

    IERC20 public immutable token;
    uint48 public immutable activationDelay;

    /// @dev Declared first so that they share Pausable's `_paused` slot: a claim reads the pause
    /// flag, the paid-out sum and the root count with one storage read and writes back the same
    /// slot. _totalClaimed is the sum of every payment ever made; with the balance it bounds what
    /// a root may promise (cumulative totals are capped at uint128, so it cannot overflow).
    uint128 private _totalClaimed;
    uint64 private _rootCount;
    /// @notice Largest cumulative total any root ever promised (revoked ones included, which only
    /// makes recoverExcess more conservative).
    uint256 public maxPostedTotal;
    mapping(address account => uint256 amount) public cumulativeClaimed;

    mapping(uint256 index => PayoutRoot) private _roots;
    mapping(uint64 epoch => uint256 indexPlusOne) private _epochRoot;
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
    event Claimed(
        address indexed account, uint256 indexed rootIndex, uint256 amount, uint256 cumulativeAmount
    );
    event ExcessRecovered(address indexed to, uint256 amount);

    error ZeroAddress();
    error ZeroRoot();
    error CommitmentExists(address committer, bytes32 runId);
    error EpochNotIncreasing(uint64 epoch, uint64 lastEpoch);
    error TotalTooLarge(uint256 cumulativeTotal);
    error InsufficientFunding(uint256 cumulativeTotal, uint256 available);
    error UnknownRoot(uint256 index);
    error RootAlreadyActive(uint256 index, uint256 activatedAt);
    error RootAlreadyRevoked(uint256 index);
    error NoActiveRoot();
    error InvalidProof(address account, uint256 cumulativeAmount);
    error NothingToClaim(address account, uint256 cumulativeAmount, uint256 alreadyClaimed);
    error ClaimExceedsRootTotal(uint256 rootIndex, uint256 cumulativeTotal);
    error LengthMismatch();
    error ExcessTooSmall(uint256 requested, uint256 excess);

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
    /// posted again once its root was revoked. The root must be fully funded: its cumulative total
    /// may not exceed the token balance plus everything already paid out.
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
        uint256 available = token.balanceOf(address(this)) + _totalClaimed;
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
        emit RootRevoked(index, r.epoch, msg.sender);
    }

    function rootCount() external view returns (uint256) {
        return _rootCount;
    }

    function totalClaimed() external view returns (uint256) {
        return _totalClaimed;
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

    // ------------------------------------------------------------------ claims

    /// @notice Pay `account` the difference between `cumulativeAmount` (its leaf in the newest
    /// active root) and what it already received. Anyone may submit; tokens always go to `account`.
    function claim(address account, uint256 cumulativeAmount, bytes32[] calldata proof)
        external
        whenNotPaused
        nonReentrant
    {
        uint256 index = activeRootIndex();
        PayoutRoot storage r = _roots[index];
        uint256 amount = _settle(r.root, index, account, cumulativeAmount, proof);
        uint256 newTotal = _totalClaimed + amount;
        if (newTotal > r.cumulativeTotal) revert ClaimExceedsRootTotal(index, r.cumulativeTotal);
        _totalClaimed = uint128(newTotal); // <= cumulativeTotal <= uint128 max
        token.safeTransfer(account, amount);
    }

    /// @notice Several claims against the newest active root in one transaction. All or nothing:
    /// any invalid entry reverts the whole batch.
    function claimBatch(
        address[] calldata accounts,
        uint256[] calldata cumulativeAmounts,
        bytes32[][] calldata proofs
    ) external whenNotPaused nonReentrant {
        uint256 n = accounts.length;
        if (cumulativeAmounts.length != n || proofs.length != n) revert LengthMismatch();
        uint256 index = activeRootIndex();
        PayoutRoot storage r = _roots[index];
        bytes32 root = r.root;
        uint256[] memory amounts = new uint256[](n);
        uint256 sum;
        for (uint256 i; i < n; ++i) {
            amounts[i] = _settle(root, index, accounts[i], cumulativeAmounts[i], proofs[i]);
            sum += amounts[i];
        }
        uint256 newTotal = _totalClaimed + sum;
        if (newTotal > r.cumulativeTotal) revert ClaimExceedsRootTotal(index, r.cumulativeTotal);
        _totalClaimed = uint128(newTotal); // <= cumulativeTotal <= uint128 max
        // Interactions last, after every effect of the batch is written.
        for (uint256 i; i < n; ++i) {
            token.safeTransfer(accounts[i], amounts[i]);
        }
    }

    /// @dev Checks and effects of one claim; returns the amount owed. No token transfer here.
    function _settle(
        bytes32 root,
        uint256 index,
        address account,
        uint256 cumulativeAmount,
        bytes32[] calldata proof
    ) private returns (uint256 amount) {
        bytes32 leaf = keccak256(bytes.concat(keccak256(abi.encode(account, cumulativeAmount))));
        if (!MerkleProof.verifyCalldata(proof, root, leaf)) {
            revert InvalidProof(account, cumulativeAmount);
        }
        uint256 already = cumulativeClaimed[account];
        if (cumulativeAmount <= already) revert NothingToClaim(account, cumulativeAmount, already);
        amount = cumulativeAmount - already;
        cumulativeClaimed[account] = cumulativeAmount;
        emit Claimed(account, index, amount, cumulativeAmount);
    }

    // ------------------------------------------------------------------ administration

    function pause() external onlyRole(GUARDIAN_ROLE) {
        _pause();
    }

    /// @notice Unpausing needs the admin, not the guardian: stopping is fast, resuming deliberate.
    function unpause() external onlyRole(DEFAULT_ADMIN_ROLE) {
        _unpause();
    }

    /// @notice Send tokens no root ever promised (balance + paid - largest posted total) to `to`,
    /// so funds do not stay stuck after a distribution ends.
    function recoverExcess(address to, uint256 amount) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (to == address(0)) revert ZeroAddress();
        uint256 backing = token.balanceOf(address(this)) + _totalClaimed;
        uint256 excess = backing > maxPostedTotal ? backing - maxPostedTotal : 0;
        if (amount > excess) revert ExcessTooSmall(amount, excess);
        emit ExcessRecovered(to, amount);
        token.safeTransfer(to, amount);
    }
}

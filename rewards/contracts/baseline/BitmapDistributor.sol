// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";

/// @title Gas baseline only (benchmarks/settlement_bench.py): a one-shot airdrop written here after
/// the design of Uniswap's merkle-distributor (immutable token and root, a bitmap of claimed leaf
/// indices, leaf = keccak256(abi.encodePacked(index, account, amount)), sorted-pair proofs, a plain
/// transfer). Not deployed by veritrain; it lets the benchmark compare claim gas on the same EVM and
/// gas schedule instead of against figures measured under Istanbul pricing.
contract BitmapDistributor {
    IERC20 public immutable token;
    bytes32 public immutable merkleRoot;
    mapping(uint256 word => uint256 bits) private _claimed;

    event Claimed(uint256 index, address account, uint256 amount);

    error AlreadyClaimed();
    error InvalidProof();
    error TransferFailed();

    constructor(IERC20 token_, bytes32 merkleRoot_) {
        token = token_;
        merkleRoot = merkleRoot_;
    }

    function isClaimed(uint256 index) public view returns (bool) {
        return (_claimed[index / 256] >> (index % 256)) & 1 == 1;
    }

    function claim(uint256 index, address account, uint256 amount, bytes32[] calldata proof) external {
        if (isClaimed(index)) revert AlreadyClaimed();
        bytes32 leaf = keccak256(abi.encodePacked(index, account, amount));
        if (!MerkleProof.verifyCalldata(proof, merkleRoot, leaf)) revert InvalidProof();
        _claimed[index / 256] |= 1 << (index % 256);
        if (!token.transfer(account, amount)) revert TransferFailed();
        emit Claimed(index, account, amount);
    }
}

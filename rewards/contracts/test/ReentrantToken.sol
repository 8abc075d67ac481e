// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title Test only: an ERC-20 that, once armed, calls back into the settlement contract from
/// inside `transfer`, so tests can check that a claim cannot be re-entered mid-payment.
contract ReentrantToken is ERC20 {
    address public target;
    bytes public payload;

    constructor(uint256 supply, address holder) ERC20("Reentrant", "RE") {
        _mint(holder, supply);
    }

    function arm(address target_, bytes calldata payload_) external {
        target = target_;
        payload = payload_;
    }

    function transfer(address to, uint256 value) public override returns (bool) {
        address t = target;
        if (t != address(0) && msg.sender == t) {
            target = address(0);
            (bool ok, bytes memory ret) = t.call(payload);
            if (!ok) {
                assembly {
                    revert(add(ret, 32), mload(ret))
                }
            }
        }
        return super.transfer(to, value);
    }
}

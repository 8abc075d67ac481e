// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title A plain ERC-20 for tests and local chains: the whole supply goes to `holder` at deploy.
contract RewardToken is ERC20 {
    constructor(string memory name_, string memory symbol_, uint256 supply, address holder)
        ERC20(name_, symbol_)
    {
        _mint(holder, supply);
    }
}

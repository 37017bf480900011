// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.24;

import {ERC1967Slots} from "./ERC1967Slots.sol";

/// @title ERC1967Proxy
/// @notice Minimal ERC-1967 proxy: every call is forwarded with delegatecall to the implementation
/// stored in the ERC-1967 slot. Upgrades are the implementation's business (UUPS).
contract ERC1967Proxy {
    // Upgraded is declared (and emitted) by the ERC1967Slots library.

    /// @param implementation first implementation
    /// @param data initialisation call delegated to `implementation` (may be empty)
    constructor(address implementation, bytes memory data) payable {
        ERC1967Slots.upgradeAndCall(implementation, data);
    }

    fallback() external payable {
        _forward();
    }

    receive() external payable {
        _forward();
    }

    function _forward() private {
        address impl = ERC1967Slots.implementation();
        assembly {
            calldatacopy(0, 0, calldatasize())
            let ok := delegatecall(gas(), impl, 0, calldatasize(), 0, 0)
            returndatacopy(0, 0, returndatasize())
            switch ok
            case 0 {
                revert(0, returndatasize())
            }
            default {
                return(0, returndatasize())
            }
        }
    }
}

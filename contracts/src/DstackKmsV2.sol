// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.24;

import {DstackKms} from "./DstackKms.sol";

/// @title DstackKmsV2 (keywarden test contract)
/// @notice An upgrade of DstackKms with the same checks but other code: code keywarden does not
/// know, so its answers are asked of the chain. It can also remove an OS image without an event.
contract DstackKmsV2 is DstackKms {
    function kmsVersion() external pure returns (uint256) {
        return 2;
    }

    /// @notice Removes an OS image without any event, as code keywarden does not know may.
    function forgetOsImage(bytes32 osImageHash) external onlyOwner {
        delete allowedOsImages[osImageHash];
    }
}

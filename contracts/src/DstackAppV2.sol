// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.24;

import {AppBootInfo} from "./IAppAuth.sol";
import {DstackApp} from "./DstackApp.sol";

/// @title DstackAppV2 (keywarden test contract)
/// @notice A DstackApp upgrade with one extra check (an instance id is required), a
/// re-initialiser that turns the TCB requirement on without an event, as initialisers do, and a
/// removal that emits nothing.
contract DstackAppV2 is DstackApp {
    string public constant REASON_NO_INSTANCE = "Instance ID required";

    function initializeV2() external reinitializer(2) {
        requireTcbUpToDate = true;
    }

    /// @notice Removes a compose hash without any event, as code keywarden does not know may.
    function forgetComposeHash(bytes32 composeHash) external onlyOwner {
        delete allowedComposeHashes[composeHash];
    }

    function isAppAllowed(AppBootInfo calldata bootInfo) public view override returns (bool isAllowed, string memory reason) {
        if (bootInfo.instanceId == address(0)) {
            return (false, REASON_NO_INSTANCE);
        }
        return super.isAppAllowed(bootInfo);
    }
}

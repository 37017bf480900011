// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.24;

import {AppBootInfo} from "./IAppAuth.sol";
import {DstackApp} from "./DstackApp.sol";

/// @title DstackAppV2 (keywarden test contract)
/// @notice A DstackApp upgrade with one extra check (an instance id is required) and a
/// re-initialiser that turns the TCB requirement on without an event, as initialisers do.
contract DstackAppV2 is DstackApp {
    string public constant REASON_NO_INSTANCE = "Instance ID required";

    function initializeV2() external reinitializer(2) {
        requireTcbUpToDate = true;
    }

    function isAppAllowed(AppBootInfo calldata bootInfo) public view override returns (bool isAllowed, string memory reason) {
        if (bootInfo.instanceId == address(0)) {
            return (false, REASON_NO_INSTANCE);
        }
        return super.isAppAllowed(bootInfo);
    }
}

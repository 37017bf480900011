// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.24;

import {AppBootInfo, IAppAuth} from "./IAppAuth.sol";
import {Initializable} from "./Initializable.sol";
import {Ownable2Step} from "./Ownable2Step.sol";
import {UUPSUpgradeable} from "./UUPSUpgradeable.sol";

/// @title DenyAllApp (keywarden test contract)
/// @notice An implementation an app owner can upgrade a DstackApp proxy to: it refuses every boot
/// and emits nothing, so only the chain knows. The owner (kept in the shared namespaced slot) can
/// upgrade back.
contract DenyAllApp is Initializable, Ownable2Step, UUPSUpgradeable, IAppAuth {
    string public constant REASON = "denied by upgraded implementation";

    constructor() {
        _disableInitializers();
    }

    function isAppAllowed(AppBootInfo calldata) external pure returns (bool isAllowed, string memory reason) {
        return (false, REASON);
    }

    function _authorizeUpgrade(address) internal view override onlyOwner {}
}

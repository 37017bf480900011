// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.24;

import {AppBootInfo, IAppAuth} from "./IAppAuth.sol";

/// @title AllowListAppAuth (keywarden test contract)
/// @notice A custom app: not a DstackApp and not a proxy. It allows boots by instance id only,
/// as dstack lets any IAppAuth contract be a registered app. Its answers can only be had from the
/// chain.
contract AllowListAppAuth is IAppAuth {
    /// @notice Reason returned for an instance that is not on the list.
    string public constant REASON_NOT_LISTED = "Instance not on the allow-list";

    address public immutable owner;
    mapping(address => bool) public allowedInstances;

    event InstanceAllowed(address instanceId, bool allowed);

    error NotOwner(address caller);

    constructor(address owner_) {
        owner = owner_;
    }

    function setInstance(address instanceId, bool allowed) external {
        if (msg.sender != owner) {
            revert NotOwner(msg.sender);
        }
        allowedInstances[instanceId] = allowed;
        emit InstanceAllowed(instanceId, allowed);
    }

    function isAppAllowed(AppBootInfo calldata bootInfo) external view returns (bool isAllowed, string memory reason) {
        if (!allowedInstances[bootInfo.instanceId]) {
            return (false, REASON_NOT_LISTED);
        }
        return (true, "");
    }
}

// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.24;

import {ERC1967Slots} from "./ERC1967Slots.sol";

/// @notice ERC-1822 "proxiable" marker: an implementation names the slot it expects to live in.
interface IProxiable {
    function proxiableUUID() external view returns (bytes32);
}

/// @title UUPSUpgradeable
/// @notice Upgrade logic that lives in the implementation (UUPS): the proxy only forwards calls.
abstract contract UUPSUpgradeable is IProxiable {
    // Upgraded is declared (and emitted) by the ERC1967Slots library.

    /// @dev Called directly on the implementation, or through a proxy that does not point at it.
    error UUPSUnauthorizedCallContext();

    /// @dev The new implementation is not a UUPS implementation for the ERC-1967 slot.
    error UUPSUnsupportedProxiableUUID(bytes32 slot);

    /// @dev ETH sent to an upgrade without an initialisation call would be stuck.
    error UpgradeWithValueAndNoCall();

    address private immutable SELF = address(this);

    modifier onlyProxy() {
        if (address(this) == SELF || ERC1967Slots.implementation() != SELF) {
            revert UUPSUnauthorizedCallContext();
        }
        _;
    }

    modifier notDelegated() {
        if (address(this) != SELF) {
            revert UUPSUnauthorizedCallContext();
        }
        _;
    }

    /// @notice The ERC-1967 implementation slot; only answers on the implementation itself.
    function proxiableUUID() external view notDelegated returns (bytes32) {
        return ERC1967Slots.IMPLEMENTATION_SLOT;
    }

    /// @notice Points the proxy at `newImplementation` and delegate-calls `data` on it when non-empty.
    function upgradeToAndCall(address newImplementation, bytes memory data) public payable onlyProxy {
        _authorizeUpgrade(newImplementation);
        if (newImplementation.code.length == 0) {
            revert ERC1967Slots.ImplementationHasNoCode(newImplementation);
        }
        try IProxiable(newImplementation).proxiableUUID() returns (bytes32 slot) {
            if (slot != ERC1967Slots.IMPLEMENTATION_SLOT) {
                revert UUPSUnsupportedProxiableUUID(slot);
            }
        } catch {
            revert UUPSUnsupportedProxiableUUID(bytes32(0));
        }
        if (data.length == 0 && msg.value > 0) {
            revert UpgradeWithValueAndNoCall();
        }
        ERC1967Slots.upgradeAndCall(newImplementation, data);
        _afterUpgrade(newImplementation);
    }

    /// @dev Reverts unless the caller may upgrade to `newImplementation`.
    function _authorizeUpgrade(address newImplementation) internal virtual;

    /// @dev Hook run after a successful upgrade (after `Upgraded` was emitted).
    function _afterUpgrade(address newImplementation) internal virtual {}
}

// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.24;

/// @title ERC1967Slots
/// @notice Reads and writes the ERC-1967 implementation slot and emits the standard `Upgraded` event.
/// @dev Written for keywarden's test chain. The slot is keccak256("eip1967.proxy.implementation") - 1.
library ERC1967Slots {
    /// @dev The ERC-1967 implementation slot.
    bytes32 internal constant IMPLEMENTATION_SLOT =
        0x360894a13ba1a3210667c828492db98dca3e2076cc3735a920a3ca505d382bbc;

    /// @notice Emitted whenever the implementation behind a proxy changes.
    event Upgraded(address indexed implementation);

    /// @dev The new implementation has no code.
    error ImplementationHasNoCode(address implementation);

    /// @dev The initialisation call to the new implementation failed without a reason.
    error InitCallFailed();

    function implementation() internal view returns (address impl) {
        bytes32 slot = IMPLEMENTATION_SLOT;
        assembly {
            impl := sload(slot)
        }
    }

    /// @dev Stores `newImplementation`, emits `Upgraded`, then delegate-calls `data` when non-empty.
    function upgradeAndCall(address newImplementation, bytes memory data) internal {
        if (newImplementation.code.length == 0) {
            revert ImplementationHasNoCode(newImplementation);
        }
        bytes32 slot = IMPLEMENTATION_SLOT;
        assembly {
            sstore(slot, newImplementation)
        }
        emit Upgraded(newImplementation);
        if (data.length > 0) {
            (bool ok, bytes memory ret) = newImplementation.delegatecall(data);
            if (!ok) {
                if (ret.length == 0) {
                    revert InitCallFailed();
                }
                assembly {
                    revert(add(ret, 0x20), mload(ret))
                }
            }
        }
    }
}

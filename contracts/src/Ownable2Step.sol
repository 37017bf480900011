// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.24;

import {Initializable} from "./Initializable.sol";

/// @title Ownable2Step
/// @notice Single-owner access control where a transfer only completes when the new owner accepts it.
/// The state lives in its own storage slot (proxy-friendly).
abstract contract Ownable2Step is Initializable {
    /// @notice A transfer was started; `newOwner` must call `acceptOwnership()`.
    event OwnershipTransferStarted(address indexed previousOwner, address indexed newOwner);

    /// @notice Ownership moved (including to address zero on renounce).
    event OwnershipTransferred(address indexed previousOwner, address indexed newOwner);

    /// @dev The caller is not allowed to do this.
    error OwnableUnauthorizedAccount(address account);

    /// @dev The owner given is not a valid owner (address zero).
    error OwnableInvalidOwner(address owner);

    struct OwnerState {
        address owner;
        address pendingOwner;
    }

    bytes32 private constant OWNER_SLOT = keccak256("keywarden.test.Ownable2Step");

    function _ownerState() private pure returns (OwnerState storage s) {
        bytes32 slot = OWNER_SLOT;
        assembly {
            s.slot := slot
        }
    }

    modifier onlyOwner() {
        if (msg.sender != _ownerState().owner) {
            revert OwnableUnauthorizedAccount(msg.sender);
        }
        _;
    }

    function __Ownable2Step_init(address initialOwner) internal onlyInitializing {
        if (initialOwner == address(0)) {
            revert OwnableInvalidOwner(address(0));
        }
        _setOwner(initialOwner);
    }

    /// @notice The current owner.
    function owner() public view returns (address) {
        return _ownerState().owner;
    }

    /// @notice The account a transfer was started to, or address zero.
    function pendingOwner() public view returns (address) {
        return _ownerState().pendingOwner;
    }

    /// @notice Starts a transfer to `newOwner` (replaces any pending one; address zero cancels).
    function transferOwnership(address newOwner) public onlyOwner {
        OwnerState storage s = _ownerState();
        s.pendingOwner = newOwner;
        emit OwnershipTransferStarted(s.owner, newOwner);
    }

    /// @notice Completes a pending transfer; only the pending owner may call it.
    function acceptOwnership() public {
        if (msg.sender != _ownerState().pendingOwner) {
            revert OwnableUnauthorizedAccount(msg.sender);
        }
        _setOwner(msg.sender);
    }

    /// @notice Gives up ownership for good: owner-only functions become uncallable.
    function renounceOwnership() public onlyOwner {
        _setOwner(address(0));
    }

    function _setOwner(address newOwner) private {
        OwnerState storage s = _ownerState();
        address previous = s.owner;
        s.pendingOwner = address(0);
        s.owner = newOwner;
        emit OwnershipTransferred(previous, newOwner);
    }
}

// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.24;

import {AppBootInfo, IAppAuth, Policy} from "./IAppAuth.sol";
import {Initializable} from "./Initializable.sol";
import {Ownable2Step} from "./Ownable2Step.sol";
import {UUPSUpgradeable} from "./UUPSUpgradeable.sol";

/// @title DstackApp (keywarden test implementation)
/// @notice Per-app boot policy: allowed compose hashes and devices, optional TCB requirement.
/// Same ABI and check order as dstack's DstackApp.
contract DstackApp is Initializable, Ownable2Step, UUPSUpgradeable, IAppAuth {
    // Storage layout as dstack's DstackApp (keywarden reads the upgrades-disabled flag from slot 1,
    // byte 0): slot 0 compose hashes; slot 1 upgrades-disabled (byte 0) and allowAnyDevice
    // (byte 1); slot 2 devices; slot 3 requireTcbUpToDate.

    /// @notice Compose hashes the app may boot with.
    mapping(bytes32 => bool) public allowedComposeHashes;
    bool internal _upgradesDisabled;
    /// @notice When true, any device may run the app.
    bool public allowAnyDevice;
    /// @notice Devices the app may boot on (unless `allowAnyDevice`).
    mapping(bytes32 => bool) public allowedDeviceIds;
    /// @notice When true, the reported TCB status must be "UpToDate".
    bool public requireTcbUpToDate;

    event ComposeHashAdded(bytes32 composeHash);
    event ComposeHashRemoved(bytes32 composeHash);
    event DeviceAdded(bytes32 deviceId);
    event DeviceRemoved(bytes32 deviceId);
    event AllowAnyDeviceSet(bool allowAny);
    event RequireTcbUpToDateSet(bool requireUpToDate);
    event UpgradesDisabled();
    // PolicyChanged is declared (and emitted) by the Policy library.

    constructor() {
        _disableInitializers();
    }

    /// @notice Initialiser without the TCB requirement (it stays off).
    function initialize(
        address initialOwner,
        bool disableUpgrades_,
        bool allowAnyDevice_,
        bytes32 initialDeviceId,
        bytes32 initialComposeHash
    ) external initializer {
        _init(initialOwner, disableUpgrades_, false, allowAnyDevice_, initialDeviceId, initialComposeHash);
    }

    /// @notice Initialiser with every setting.
    function initialize(
        address initialOwner,
        bool disableUpgrades_,
        bool requireTcbUpToDate_,
        bool allowAnyDevice_,
        bytes32 initialDeviceId,
        bytes32 initialComposeHash
    ) external initializer {
        _init(initialOwner, disableUpgrades_, requireTcbUpToDate_, allowAnyDevice_, initialDeviceId, initialComposeHash);
    }

    /// @notice Interface version of this contract.
    function version() external pure returns (uint256) {
        return 2;
    }

    function addComposeHash(bytes32 composeHash) external onlyOwner {
        _addComposeHash(composeHash);
    }

    function removeComposeHash(bytes32 composeHash) external onlyOwner {
        delete allowedComposeHashes[composeHash];
        emit ComposeHashRemoved(composeHash);
        Policy.changed("compose-hash", composeHash, false);
    }

    function addDevice(bytes32 deviceId) external onlyOwner {
        _addDevice(deviceId);
    }

    function removeDevice(bytes32 deviceId) external onlyOwner {
        delete allowedDeviceIds[deviceId];
        emit DeviceRemoved(deviceId);
        Policy.changed("device", deviceId, false);
    }

    function setAllowAnyDevice(bool allowAny) external onlyOwner {
        _setAllowAnyDevice(allowAny);
    }

    function setRequireTcbUpToDate(bool requireUpToDate) external onlyOwner {
        _setRequireTcbUpToDate(requireUpToDate);
    }

    /// @notice Forbids every future upgrade of this app contract. Irreversible.
    function disableUpgrades() external onlyOwner {
        _disableUpgrades();
    }

    /// @notice Whether the app may boot: TCB (if required), compose hash, device (unless any), in order.
    function isAppAllowed(AppBootInfo calldata bootInfo) public view virtual returns (bool isAllowed, string memory reason) {
        if (requireTcbUpToDate && !Policy.isUpToDate(bootInfo.tcbStatus)) {
            return (false, Policy.REASON_TCB_NOT_UP_TO_DATE);
        }
        if (!allowedComposeHashes[bootInfo.composeHash]) {
            return (false, Policy.REASON_COMPOSE_HASH_NOT_ALLOWED);
        }
        if (!allowAnyDevice && !allowedDeviceIds[bootInfo.deviceId]) {
            return (false, Policy.REASON_DEVICE_NOT_ALLOWED);
        }
        return (true, "");
    }

    /// @dev As dstack's initialiser: the three flags are assigned without any event; only the
    /// initial device and compose hash emit theirs.
    function _init(
        address initialOwner,
        bool disableUpgrades_,
        bool requireTcbUpToDate_,
        bool allowAnyDevice_,
        bytes32 initialDeviceId,
        bytes32 initialComposeHash
    ) private {
        __Ownable2Step_init(initialOwner);
        _upgradesDisabled = disableUpgrades_;
        allowAnyDevice = allowAnyDevice_;
        requireTcbUpToDate = requireTcbUpToDate_;
        if (initialDeviceId != bytes32(0)) {
            _addDevice(initialDeviceId);
        }
        if (initialComposeHash != bytes32(0)) {
            _addComposeHash(initialComposeHash);
        }
    }

    function _addComposeHash(bytes32 composeHash) private {
        allowedComposeHashes[composeHash] = true;
        emit ComposeHashAdded(composeHash);
        Policy.changed("compose-hash", composeHash, true);
    }

    function _addDevice(bytes32 deviceId) private {
        allowedDeviceIds[deviceId] = true;
        emit DeviceAdded(deviceId);
        Policy.changed("device", deviceId, true);
    }

    function _setAllowAnyDevice(bool allowAny) private {
        allowAnyDevice = allowAny;
        emit AllowAnyDeviceSet(allowAny);
        Policy.changed("allow-any-device", Policy.boolValue(allowAny), allowAny);
    }

    function _setRequireTcbUpToDate(bool requireUpToDate) private {
        requireTcbUpToDate = requireUpToDate;
        emit RequireTcbUpToDateSet(requireUpToDate);
        Policy.changed("require-tcb-up-to-date", Policy.boolValue(requireUpToDate), requireUpToDate);
    }

    function _disableUpgrades() private {
        _upgradesDisabled = true;
        emit UpgradesDisabled();
        Policy.changed("upgrades-disabled", Policy.boolValue(true), true);
    }

    function _authorizeUpgrade(address) internal view override onlyOwner {
        require(!_upgradesDisabled, "Upgrades are disabled");
    }

    function _afterUpgrade(address newImplementation) internal override {
        Policy.changed("implementation-upgrade", Policy.addressValue(newImplementation), true);
    }
}

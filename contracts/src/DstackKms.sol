// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.24;

import {AppBootInfo, IAppAuth, IERC165, Policy} from "./IAppAuth.sol";
import {ERC1967Proxy} from "./ERC1967Proxy.sol";
import {Initializable} from "./Initializable.sol";
import {Ownable2Step} from "./Ownable2Step.sol";
import {UUPSUpgradeable} from "./UUPSUpgradeable.sol";

/// @title DstackKms (keywarden test implementation)
/// @notice KMS governance contract: registry of apps, allowed KMS measurements, devices and OS images,
/// and a factory for per-app DstackApp proxies. Same ABI and check order as dstack's DstackKms.
contract DstackKms is Initializable, Ownable2Step, UUPSUpgradeable, IAppAuth, IERC165 {
    /// @notice The KMS's public material.
    struct KmsInfo {
        bytes k256Pubkey;
        bytes caPubkey;
        bytes quote;
        bytes eventlog;
    }

    /// @notice The KMS's public material.
    KmsInfo public kmsInfo;
    /// @notice App id of the gateway.
    string public gatewayAppId;
    /// @notice Registered app contracts.
    mapping(address => bool) public registeredApps;
    /// @notice Aggregated measurements a KMS instance may boot with.
    mapping(bytes32 => bool) public kmsAllowedAggregatedMrs;
    /// @notice Devices a KMS instance may boot on.
    mapping(bytes32 => bool) public kmsAllowedDeviceIds;
    /// @notice OS images allowed for KMS instances and apps.
    mapping(bytes32 => bool) public allowedOsImages;
    /// @notice DstackApp implementation used by `deployAndRegisterApp`.
    address public appImplementation;

    event AppRegistered(address appId);
    event KmsInfoSet(bytes k256Pubkey);
    event KmsAggregatedMrAdded(bytes32 mrAggregated);
    event KmsAggregatedMrRemoved(bytes32 mrAggregated);
    event KmsDeviceAdded(bytes32 deviceId);
    event KmsDeviceRemoved(bytes32 deviceId);
    event OsImageHashAdded(bytes32 osImageHash);
    event OsImageHashRemoved(bytes32 osImageHash);
    event GatewayAppIdSet(string gatewayAppId);
    event AppImplementationSet(address implementation);
    event AppDeployedViaFactory(address indexed appId, address indexed deployer);
    // PolicyChanged is declared (and emitted) by the Policy library.

    constructor() {
        _disableInitializers();
    }

    /// @notice Initialises the proxy: owner, and optionally the DstackApp implementation (zero: set later).
    function initialize(address initialOwner, address initialAppImplementation) external initializer {
        __Ownable2Step_init(initialOwner);
        if (initialAppImplementation != address(0)) {
            _setAppImplementation(initialAppImplementation);
        }
    }

    // ----------------------------------------------------------------- owner-only configuration

    function setKmsInfo(KmsInfo calldata info) external onlyOwner {
        kmsInfo = info;
        emit KmsInfoSet(info.k256Pubkey);
        Policy.changed("kms-info", keccak256(info.k256Pubkey), info.k256Pubkey.length != 0);
    }

    function setKmsQuote(bytes calldata quote) external onlyOwner {
        kmsInfo.quote = quote;
    }

    function setKmsEventlog(bytes calldata eventlog) external onlyOwner {
        kmsInfo.eventlog = eventlog;
    }

    function setGatewayAppId(string calldata appId) external onlyOwner {
        gatewayAppId = appId;
        emit GatewayAppIdSet(appId);
        Policy.changed("gateway-app-id", keccak256(bytes(appId)), bytes(appId).length != 0);
    }

    function setAppImplementation(address implementation) external onlyOwner {
        _setAppImplementation(implementation);
    }

    function addKmsAggregatedMr(bytes32 mrAggregated) external onlyOwner {
        kmsAllowedAggregatedMrs[mrAggregated] = true;
        emit KmsAggregatedMrAdded(mrAggregated);
        Policy.changed("kms-aggregated-mr", mrAggregated, true);
    }

    function removeKmsAggregatedMr(bytes32 mrAggregated) external onlyOwner {
        delete kmsAllowedAggregatedMrs[mrAggregated];
        emit KmsAggregatedMrRemoved(mrAggregated);
        Policy.changed("kms-aggregated-mr", mrAggregated, false);
    }

    function addKmsDevice(bytes32 deviceId) external onlyOwner {
        kmsAllowedDeviceIds[deviceId] = true;
        emit KmsDeviceAdded(deviceId);
        Policy.changed("kms-device", deviceId, true);
    }

    function removeKmsDevice(bytes32 deviceId) external onlyOwner {
        delete kmsAllowedDeviceIds[deviceId];
        emit KmsDeviceRemoved(deviceId);
        Policy.changed("kms-device", deviceId, false);
    }

    function addOsImageHash(bytes32 osImageHash) external onlyOwner {
        allowedOsImages[osImageHash] = true;
        emit OsImageHashAdded(osImageHash);
        Policy.changed("os-image", osImageHash, true);
    }

    function removeOsImageHash(bytes32 osImageHash) external onlyOwner {
        delete allowedOsImages[osImageHash];
        emit OsImageHashRemoved(osImageHash);
        Policy.changed("os-image", osImageHash, false);
    }

    // ----------------------------------------------------------------- app registry (anyone)

    /// @notice Registers an app contract. Anyone may call this.
    function registerApp(address appId) public {
        // As dstack's: registering an app again does not revert.
        require(appId != address(0), "Invalid app ID");
        registeredApps[appId] = true;
        emit AppRegistered(appId);
        Policy.changed("registered-app", Policy.addressValue(appId), true);
    }

    /// @notice Deploys a DstackApp proxy of `appImplementation`, initialises it and registers it.
    function deployAndRegisterApp(
        address initialOwner,
        bool disableUpgrades,
        bool requireTcbUpToDate,
        bool allowAnyDevice,
        bytes32 initialDeviceId,
        bytes32 initialComposeHash
    ) public returns (address appId) {
        require(appImplementation != address(0), "DstackApp implementation not set");
        require(initialOwner != address(0), "Invalid owner address");
        bytes memory init = abi.encodeWithSignature(
            "initialize(address,bool,bool,bool,bytes32,bytes32)",
            initialOwner,
            disableUpgrades,
            requireTcbUpToDate,
            allowAnyDevice,
            initialDeviceId,
            initialComposeHash
        );
        appId = address(new ERC1967Proxy(appImplementation, init));
        registerApp(appId);
        emit AppDeployedViaFactory(appId, msg.sender);
    }

    /// @notice Legacy overload: as the 6-argument one with `requireTcbUpToDate = false`.
    function deployAndRegisterApp(
        address initialOwner,
        bool disableUpgrades,
        bool allowAnyDevice,
        bytes32 initialDeviceId,
        bytes32 initialComposeHash
    ) external returns (address appId) {
        return deployAndRegisterApp(
            initialOwner, disableUpgrades, false, allowAnyDevice, initialDeviceId, initialComposeHash
        );
    }

    // ----------------------------------------------------------------- checks

    /// @notice Whether a KMS instance may boot: TCB up to date, OS image, aggregated MR, device, in order.
    function isKmsAllowed(AppBootInfo calldata bootInfo) external view returns (bool isAllowed, string memory reason) {
        if (!Policy.isUpToDate(bootInfo.tcbStatus)) {
            return (false, Policy.REASON_TCB_NOT_UP_TO_DATE);
        }
        if (!allowedOsImages[bootInfo.osImageHash]) {
            return (false, Policy.REASON_OS_IMAGE_NOT_ALLOWED);
        }
        if (!kmsAllowedAggregatedMrs[bootInfo.mrAggregated]) {
            return (false, Policy.REASON_AGGREGATED_MR_NOT_ALLOWED);
        }
        if (!kmsAllowedDeviceIds[bootInfo.deviceId]) {
            return (false, Policy.REASON_KMS_DEVICE_NOT_ALLOWED);
        }
        return (true, "");
    }

    /// @notice Whether an app may boot: registered, OS image, has code, then the app contract decides.
    function isAppAllowed(AppBootInfo calldata bootInfo) external view returns (bool isAllowed, string memory reason) {
        if (!registeredApps[bootInfo.appId]) {
            return (false, Policy.REASON_APP_NOT_REGISTERED);
        }
        if (!allowedOsImages[bootInfo.osImageHash]) {
            return (false, Policy.REASON_OS_IMAGE_NOT_ALLOWED);
        }
        if (bootInfo.appId.code.length == 0) {
            return (false, Policy.REASON_APP_HAS_NO_CODE);
        }
        return IAppAuth(bootInfo.appId).isAppAllowed(bootInfo);
    }

    /// @notice ERC-165: IERC165 and IAppAuth.
    function supportsInterface(bytes4 interfaceId) external pure returns (bool) {
        return interfaceId == type(IERC165).interfaceId || interfaceId == type(IAppAuth).interfaceId;
    }

    // ----------------------------------------------------------------- internals

    function _setAppImplementation(address implementation) private {
        appImplementation = implementation;
        emit AppImplementationSet(implementation);
        Policy.changed("app-implementation", Policy.addressValue(implementation), implementation != address(0));
    }

    function _authorizeUpgrade(address) internal override onlyOwner {}

    function _afterUpgrade(address newImplementation) internal override {
        Policy.changed("implementation-upgrade", Policy.addressValue(newImplementation), true);
    }
}

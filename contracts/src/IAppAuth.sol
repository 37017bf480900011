// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.24;

/// @notice What a CVM reports about itself when it asks the KMS for keys.
struct AppBootInfo {
    address appId;
    bytes32 composeHash;
    address instanceId;
    bytes32 deviceId;
    bytes32 mrAggregated;
    bytes32 mrSystem;
    bytes32 osImageHash;
    string tcbStatus;
    string[] advisoryIds;
}

/// @notice Boot authorisation answered by an app contract (and, for apps, by the KMS contract).
interface IAppAuth {
    /// @return isAllowed whether the boot is allowed
    /// @return reason empty when allowed, otherwise why not
    function isAppAllowed(AppBootInfo calldata bootInfo) external view returns (bool isAllowed, string memory reason);
}

/// @notice ERC-165 interface detection.
interface IERC165 {
    function supportsInterface(bytes4 interfaceId) external view returns (bool);
}

/// @notice Reason strings and policy labels shared by DstackKms and DstackApp.
/// @dev keywarden's Rust mirror carries the same strings; keep both in step.
library Policy {
    string internal constant TCB_UP_TO_DATE = "UpToDate";

    string internal constant REASON_TCB_NOT_UP_TO_DATE = "TCB status is not up to date";
    string internal constant REASON_OS_IMAGE_NOT_ALLOWED = "OS image is not allowed";
    string internal constant REASON_AGGREGATED_MR_NOT_ALLOWED = "Aggregated MR not allowed";
    string internal constant REASON_KMS_DEVICE_NOT_ALLOWED = "KMS is not allowed to boot on this device";
    string internal constant REASON_APP_NOT_REGISTERED = "App not registered";
    string internal constant REASON_APP_HAS_NO_CODE = "App not deployed or invalid address";
    string internal constant REASON_COMPOSE_HASH_NOT_ALLOWED = "Compose hash not allowed";
    string internal constant REASON_DEVICE_NOT_ALLOWED = "Device not allowed";

    /// @notice Emitted next to every specific governance event, so one filter sees every change.
    /// @param actor msg.sender of the change
    /// @param policy keccak256 of the policy label (e.g. keccak256("os-image"))
    /// @param value the item: a bytes32 as is, an address left-padded, a string or key hashed
    /// @param enabled true when added / set to a non-empty value / true, false when removed / cleared
    event PolicyChanged(address indexed actor, bytes32 indexed policy, bytes32 indexed value, bool enabled);

    function isUpToDate(string calldata tcbStatus) internal pure returns (bool) {
        return keccak256(bytes(tcbStatus)) == keccak256(bytes(TCB_UP_TO_DATE));
    }

    function changed(string memory label, bytes32 value, bool enabled) internal {
        emit PolicyChanged(msg.sender, keccak256(bytes(label)), value, enabled);
    }

    function addressValue(address a) internal pure returns (bytes32) {
        return bytes32(uint256(uint160(a)));
    }

    function boolValue(bool b) internal pure returns (bytes32) {
        return b ? bytes32(uint256(1)) : bytes32(0);
    }
}

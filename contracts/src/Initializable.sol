// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.24;

/// @title Initializable
/// @notice Initialiser guard for contracts used behind proxies. The state lives in its own storage
/// slot so it never collides with the inheriting contract's variables.
abstract contract Initializable {
    /// @notice Emitted when the contract has been initialised to `version`.
    event Initialized(uint64 version);

    /// @dev The contract is already initialised (or initialisers are disabled).
    error InvalidInitialization();

    /// @dev A function restricted to initialisation ran outside of it.
    error NotInitializing();

    struct InitState {
        uint64 version;
        bool initializing;
    }

    // keccak256("keywarden.test.Initializable")
    bytes32 private constant INIT_SLOT = keccak256("keywarden.test.Initializable");

    function _initState() private pure returns (InitState storage s) {
        bytes32 slot = INIT_SLOT;
        assembly {
            s.slot := slot
        }
    }

    /// @dev Runs the function as the first (version 1) initialisation; only once per storage.
    modifier initializer() {
        InitState storage s = _initState();
        if (s.initializing || s.version != 0) {
            revert InvalidInitialization();
        }
        s.version = 1;
        s.initializing = true;
        _;
        s.initializing = false;
        emit Initialized(1);
    }

    /// @dev Runs the function as initialisation `version` of an upgraded implementation; only once,
    /// and only above the version already reached.
    modifier reinitializer(uint64 version) {
        InitState storage s = _initState();
        if (s.initializing || s.version >= version) {
            revert InvalidInitialization();
        }
        s.version = version;
        s.initializing = true;
        _;
        s.initializing = false;
        emit Initialized(version);
    }

    /// @dev Restricts a helper to run only while an initialiser is running.
    modifier onlyInitializing() {
        if (!_initState().initializing) {
            revert NotInitializing();
        }
        _;
    }

    /// @dev Locks the storage this runs on against any future initialisation. Implementations call it
    /// from their constructor so nobody can initialise (and take over) the bare implementation.
    function _disableInitializers() internal {
        InitState storage s = _initState();
        if (s.initializing) {
            revert InvalidInitialization();
        }
        if (s.version != type(uint64).max) {
            s.version = type(uint64).max;
            emit Initialized(type(uint64).max);
        }
    }
}

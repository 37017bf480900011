//! Local authorization: `isKmsAllowed` / `isAppAllowed` answered from the mirror.
//!
//! Flow: the KMS path builds an [`AuthQuery`] (the on-chain `AppBootInfo` fields) and calls
//! [`is_kms_allowed`] / [`is_app_allowed`] on a [`MirrorState`] snapshot. The checks run in the
//! contracts' order and return the contracts' reason strings, so a decision can be compared with an
//! `eth_call` call for call. Freshness (fail closed with [`Reason::ChainStateStale`]) and the choice
//! between these local answers and a live `eth_call` (for code the mirror does not know) are the
//! caller's concern: see [`super::Mirror::authorize_app`].

use std::sync::Arc;

use alloy::primitives::{Address, B256};
use serde::Serialize;

use super::contracts::{TCB_UP_TO_DATE, reason};
use super::mirror::MirrorState;

/// What the contracts receive as `AppBootInfo`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct AuthQuery {
    /// `appId`.
    pub app_id: [u8; 20],
    /// `composeHash`.
    pub compose_hash: [u8; 32],
    /// `instanceId`.
    pub instance_id: [u8; 20],
    /// `deviceId`.
    pub device_id: [u8; 32],
    /// `mrAggregated`.
    pub mr_aggregated: [u8; 32],
    /// `mrSystem`.
    pub mr_system: [u8; 32],
    /// `osImageHash`.
    pub os_image_hash: [u8; 32],
    /// `tcbStatus`.
    pub tcb_status: String,
    /// `advisoryIds`.
    pub advisory_ids: Vec<String>,
}

/// Why a boot was allowed or refused (closed set, usable as a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Every check passed.
    Allowed,
    /// TCB status is not `UpToDate`.
    TcbNotUpToDate,
    /// OS image not in `allowedOsImages`.
    OsImageNotAllowed,
    /// Aggregated MR not allowed for KMS instances.
    AggregatedMrNotAllowed,
    /// Device not allowed for KMS instances.
    KmsDeviceNotAllowed,
    /// App not registered.
    AppNotRegistered,
    /// Registered app address without code.
    AppHasNoCode,
    /// Compose hash not allowed by the app.
    ComposeHashNotAllowed,
    /// Device not allowed by the app.
    DeviceNotAllowed,
    /// The mirror is older than `chain.max_staleness`: refused without looking.
    ChainStateStale,
    /// Code the mirror does not know refused with a reason string of its own (the string is in
    /// [`Decision::reason_str`]).
    AppDefined,
    /// A live `eth_call` was needed and got no answer: refused (fail closed).
    AuthUnavailable,
}

/// Where a decision came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The local mirror.
    Mirror,
    /// A live `eth_call` of the KMS contract.
    EthCall,
}

impl Source {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Mirror => "mirror",
            Self::EthCall => "eth_call",
        }
    }
}

impl Reason {
    /// Every reason, for pre-initialising metric labels.
    pub const ALL: [Reason; 12] = [
        Self::Allowed,
        Self::TcbNotUpToDate,
        Self::OsImageNotAllowed,
        Self::AggregatedMrNotAllowed,
        Self::KmsDeviceNotAllowed,
        Self::AppNotRegistered,
        Self::AppHasNoCode,
        Self::ComposeHashNotAllowed,
        Self::DeviceNotAllowed,
        Self::ChainStateStale,
        Self::AppDefined,
        Self::AuthUnavailable,
    ];

    /// The typed reason of a contract's answer (a string the known contracts do not return is
    /// [`Reason::AppDefined`]).
    pub fn from_contract(allowed: bool, reason: &str) -> Self {
        if allowed {
            return Self::Allowed;
        }
        Self::ALL
            .into_iter()
            .filter(|r| {
                !matches!(
                    r,
                    Self::Allowed | Self::ChainStateStale | Self::AuthUnavailable
                )
            })
            .find(|r| r.as_contract_str() == reason)
            .unwrap_or(Self::AppDefined)
    }

    /// The snake_case name (metric label, JSON).
    pub fn label(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::TcbNotUpToDate => "tcb_not_up_to_date",
            Self::OsImageNotAllowed => "os_image_not_allowed",
            Self::AggregatedMrNotAllowed => "aggregated_mr_not_allowed",
            Self::KmsDeviceNotAllowed => "kms_device_not_allowed",
            Self::AppNotRegistered => "app_not_registered",
            Self::AppHasNoCode => "app_has_no_code",
            Self::ComposeHashNotAllowed => "compose_hash_not_allowed",
            Self::DeviceNotAllowed => "device_not_allowed",
            Self::ChainStateStale => "chain_state_stale",
            Self::AppDefined => "app_defined",
            Self::AuthUnavailable => "auth_unavailable",
        }
    }

    /// The string the contracts return for this reason (`""` when allowed; `chain_state_stale`
    /// has no contract counterpart).
    pub fn as_contract_str(self) -> &'static str {
        match self {
            Self::Allowed => "",
            Self::TcbNotUpToDate => reason::TCB_NOT_UP_TO_DATE,
            Self::OsImageNotAllowed => reason::OS_IMAGE_NOT_ALLOWED,
            Self::AggregatedMrNotAllowed => reason::AGGREGATED_MR_NOT_ALLOWED,
            Self::KmsDeviceNotAllowed => reason::KMS_DEVICE_NOT_ALLOWED,
            Self::AppNotRegistered => reason::APP_NOT_REGISTERED,
            Self::AppHasNoCode => reason::APP_HAS_NO_CODE,
            Self::ComposeHashNotAllowed => reason::COMPOSE_HASH_NOT_ALLOWED,
            Self::DeviceNotAllowed => reason::DEVICE_NOT_ALLOWED,
            Self::ChainStateStale => "chain_state_stale",
            Self::AppDefined => "app_defined",
            Self::AuthUnavailable => "auth_unavailable",
        }
    }
}

/// The answer: allowed or not, why, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Whether the boot may proceed.
    pub allowed: bool,
    /// Why, as a closed enum.
    pub reason: Reason,
    /// The mirror or a live call.
    pub source: Source,
    /// The contract's own reason string, when it is not one of [`Reason`]'s (or the error of a
    /// live call that got no answer).
    pub detail: Option<Arc<str>>,
}

impl Decision {
    /// A local refusal.
    pub fn refuse(reason: Reason) -> Self {
        Self {
            allowed: false,
            reason,
            source: Source::Mirror,
            detail: None,
        }
    }

    /// A local approval.
    pub const ALLOW: Self = Self {
        allowed: true,
        reason: Reason::Allowed,
        source: Source::Mirror,
        detail: None,
    };

    /// The contract's answer `(allowed, reason)` from a live call.
    pub fn from_chain(allowed: bool, reason: &str) -> Self {
        let typed = Reason::from_contract(allowed, reason);
        Self {
            allowed,
            reason: typed,
            source: Source::EthCall,
            detail: (typed == Reason::AppDefined).then(|| Arc::from(reason)),
        }
    }

    /// The reason string as the contracts return it.
    pub fn reason_str(&self) -> &str {
        match (&self.detail, self.reason) {
            (Some(d), Reason::AppDefined) => d,
            _ => self.reason.as_contract_str(),
        }
    }
}

/// `DstackKms.isKmsAllowed`: TCB, OS image, aggregated MR, device, in that order.
pub fn is_kms_allowed(m: &MirrorState, q: &AuthQuery) -> Decision {
    if q.tcb_status != TCB_UP_TO_DATE {
        return Decision::refuse(Reason::TcbNotUpToDate);
    }
    if !m.kms.os_images.contains(&B256::from(q.os_image_hash)) {
        return Decision::refuse(Reason::OsImageNotAllowed);
    }
    if !m
        .kms
        .allowed_aggregated_mrs
        .contains(&B256::from(q.mr_aggregated))
    {
        return Decision::refuse(Reason::AggregatedMrNotAllowed);
    }
    if !m.kms.devices.contains(&B256::from(q.device_id)) {
        return Decision::refuse(Reason::KmsDeviceNotAllowed);
    }
    Decision::ALLOW
}

/// `DstackKms.isAppAllowed` followed by `DstackApp.isAppAllowed`: registered, OS image, has code,
/// then the app's TCB requirement, compose hash and device (unless any device is allowed).
///
/// The app is evaluated as a DstackApp: an app contract with other logic cannot be mirrored from
/// DstackApp events, and one that emitted none of them has an empty allow-list, so it is refused
/// (fail closed).
pub fn is_app_allowed(m: &MirrorState, q: &AuthQuery) -> Decision {
    let app_id = Address::from(q.app_id);
    if !m.registered_apps.contains(&app_id) {
        return Decision::refuse(Reason::AppNotRegistered);
    }
    if !m.kms.os_images.contains(&B256::from(q.os_image_hash)) {
        return Decision::refuse(Reason::OsImageNotAllowed);
    }
    let Some(app) = m.apps.get(&app_id).filter(|a| a.has_code) else {
        return Decision::refuse(Reason::AppHasNoCode);
    };
    if app.require_tcb_up_to_date && q.tcb_status != TCB_UP_TO_DATE {
        return Decision::refuse(Reason::TcbNotUpToDate);
    }
    if !app.compose_hashes.contains(&B256::from(q.compose_hash)) {
        return Decision::refuse(Reason::ComposeHashNotAllowed);
    }
    if !app.allow_any_device && !app.devices.contains(&B256::from(q.device_id)) {
        return Decision::refuse(Reason::DeviceNotAllowed);
    }
    Decision::ALLOW
}

#[cfg(test)]
mod tests {
    use alloy::primitives::address;

    use super::*;
    use crate::chain::events::Event;

    const KMS: Address = address!("00000000000000000000000000000000000000aa");
    const APP: Address = address!("00000000000000000000000000000000000000bb");

    fn mirror() -> MirrorState {
        let mut m = MirrorState::new(KMS);
        for e in [
            Event::OsImage(B256::repeat_byte(1), true),
            Event::KmsAggregatedMr(B256::repeat_byte(2), true),
            Event::KmsDevice(B256::repeat_byte(3), true),
            Event::AppDeployedViaFactory(APP),
            Event::ComposeHash(APP, B256::repeat_byte(4), true),
            Event::Device(APP, B256::repeat_byte(3), true),
        ] {
            m.apply(&e);
        }
        m
    }

    fn query() -> AuthQuery {
        AuthQuery {
            app_id: APP.into(),
            compose_hash: [4; 32],
            device_id: [3; 32],
            mr_aggregated: [2; 32],
            os_image_hash: [1; 32],
            tcb_status: TCB_UP_TO_DATE.into(),
            ..AuthQuery::default()
        }
    }

    #[test]
    fn kms_checks_run_in_contract_order() {
        let m = mirror();
        assert_eq!(is_kms_allowed(&m, &query()), Decision::ALLOW);
        let mut q = query();
        q.device_id = [9; 32];
        assert_eq!(is_kms_allowed(&m, &q).reason, Reason::KmsDeviceNotAllowed);
        q.mr_aggregated = [9; 32];
        assert_eq!(
            is_kms_allowed(&m, &q).reason,
            Reason::AggregatedMrNotAllowed
        );
        q.os_image_hash = [9; 32];
        assert_eq!(is_kms_allowed(&m, &q).reason, Reason::OsImageNotAllowed);
        q.tcb_status = "OutOfDate".into();
        let d = is_kms_allowed(&m, &q);
        assert_eq!(d.reason_str(), reason::TCB_NOT_UP_TO_DATE);
    }

    #[test]
    fn app_checks_run_in_contract_order() {
        let mut m = mirror();
        assert_eq!(is_app_allowed(&m, &query()), Decision::ALLOW);
        let mut q = query();
        q.device_id = [9; 32];
        assert_eq!(is_app_allowed(&m, &q).reason, Reason::DeviceNotAllowed);
        m.apply(&Event::AllowAnyDevice(APP, true));
        assert!(is_app_allowed(&m, &q).allowed);
        q.compose_hash = [9; 32];
        assert_eq!(is_app_allowed(&m, &q).reason, Reason::ComposeHashNotAllowed);
        q.tcb_status = "OutOfDate".into();
        assert_eq!(is_app_allowed(&m, &q).reason, Reason::ComposeHashNotAllowed);
        m.apply(&Event::RequireTcbUpToDate(APP, true));
        assert_eq!(is_app_allowed(&m, &q).reason, Reason::TcbNotUpToDate);
        q.os_image_hash = [9; 32];
        assert_eq!(is_app_allowed(&m, &q).reason, Reason::OsImageNotAllowed);
        q.app_id = [9; 20];
        assert_eq!(is_app_allowed(&m, &q).reason, Reason::AppNotRegistered);
    }

    #[test]
    fn chain_answers_map_to_typed_reasons() {
        let d = Decision::from_chain(false, reason::COMPOSE_HASH_NOT_ALLOWED);
        assert_eq!(d.reason, Reason::ComposeHashNotAllowed);
        assert_eq!(d.source, Source::EthCall);
        assert_eq!(d.reason_str(), reason::COMPOSE_HASH_NOT_ALLOWED);
        let d = Decision::from_chain(false, "Instance not on the allow-list");
        assert_eq!(d.reason, Reason::AppDefined);
        assert_eq!(d.reason_str(), "Instance not on the allow-list");
        let d = Decision::from_chain(true, "");
        assert!(d.allowed);
        assert_eq!(d.reason, Reason::Allowed);
        // A string that happens to equal a label is still the contract's own.
        assert_eq!(
            Decision::from_chain(false, "chain_state_stale").reason,
            Reason::AppDefined
        );
    }

    #[test]
    fn registered_address_without_code_is_refused() {
        let mut m = mirror();
        let eoa = address!("00000000000000000000000000000000000000cc");
        m.apply(&Event::AppRegistered(eoa));
        let mut q = query();
        q.app_id = eoa.into();
        assert_eq!(is_app_allowed(&m, &q).reason, Reason::AppHasNoCode);
        m.apply(&Event::CodeObserved(eoa));
        assert_eq!(is_app_allowed(&m, &q).reason, Reason::ComposeHashNotAllowed);
    }
}

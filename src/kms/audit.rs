//! The audit records of key requests: one per request that reached the attestation step, with
//! its final outcome and typed reason, written through the ledger (a released key's record is
//! committed before the key leaves).

use super::metrics::{Method, Refusal};
use super::refusal::{Refused, Subject};
use super::rpc::KmsRpc;

impl KmsRpc {
    /// Records the release about `boot`; the key leaves only once it is committed.
    pub(super) async fn audit_release(
        &self,
        method: Method,
        boot: &crate::attestation::BootInfo,
    ) -> Result<(), Refused> {
        let record = audit_record(method, boot, "ok", &serde_json::Value::Null);
        self.0.ledger.audit(record).await.map_err(not_recorded)
    }

    /// The one audit record of a refused key request that reached the attestation step.
    pub(super) async fn audit_refusal(&self, method: Method, refused: &Refused) {
        let outcome = match refused.reason {
            Refusal::Canary => "security_incident",
            _ => "refused",
        };
        let why = serde_json::json!({
            "reason": refused.reason.as_str(),
            "message": refused.message,
        });
        let record = match &refused.subject {
            Subject::Unaudited => return,
            Subject::Unverified => {
                crate::store::AuditRecord::new(method.audit_kind(), outcome, &why)
            }
            Subject::Boot(boot) => audit_record(method, boot, outcome, &why),
        };
        // A failure is logged by the ledger, on the audit target too.
        let _ = self.0.ledger.audit(record).await;
    }
}

/// The refusal of a release whose record could not be committed (the ledger logged why).
pub(super) fn not_recorded(e: super::ledger::LedgerError) -> Refused {
    tracing::error!(error = %e, "the key release could not be recorded; keys withheld");
    Refused::new(
        Refusal::StoreUnavailable,
        "could not record the key release; retry later",
    )
}

/// The audit record of a key request about `boot`; `why` (an object) adds the refusal's reason
/// and message.
pub(super) fn audit_record(
    method: Method,
    boot: &crate::attestation::BootInfo,
    outcome: &str,
    why: &serde_json::Value,
) -> crate::store::AuditRecord {
    let mut detail = serde_json::json!({
        "app_id": hex::encode(&boot.app_id),
        "instance_id": hex::encode(&boot.instance_id),
        "compose_hash": hex::encode(&boot.compose_hash),
        "mr_aggregated": hex::encode(&boot.mr_aggregated),
        "os_image_hash": hex::encode(&boot.os_image_hash),
        "device_id": hex::encode(&boot.device_id),
    });
    if let (Some(detail), Some(why)) = (detail.as_object_mut(), why.as_object()) {
        detail.extend(why.clone());
    }
    crate::store::AuditRecord::new(method.audit_kind(), outcome, &detail)
}

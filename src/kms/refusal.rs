//! A refused key-path request: its typed reason ([`Refusal`]), the message the caller sees, and
//! what its audit record is about. One value feeds the error body, the metric label and the
//! audit record.

pub use super::metrics::Refusal;

/// A refused request: the reason label, the message the caller sees, and what its audit record
/// is about.
#[derive(Debug, Clone)]
pub struct Refused {
    /// Closed-set reason.
    pub reason: Refusal,
    /// Message for the caller (upstream's wording where it has one).
    pub message: String,
    /// What the refusal's audit record is about.
    pub subject: Subject,
}

/// What a refused key request's audit record is about.
#[derive(Debug, Clone, Default)]
pub enum Subject {
    /// Refused before the attestation step (overload, a malformed request): not audited.
    #[default]
    Unaudited,
    /// Refused at the attestation step, before any boot was verified.
    Unverified,
    /// Refused about this verified boot.
    Boot(Box<crate::attestation::BootInfo>),
}

impl Refused {
    /// A refusal before the attestation step.
    pub(crate) fn new(reason: Refusal, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            subject: Subject::Unaudited,
        }
    }

    /// The refusal, audited as about `boot`.
    pub(crate) fn about(mut self, boot: &crate::attestation::BootInfo) -> Self {
        self.subject = Subject::Boot(Box::new(boot.clone()));
        self
    }

    /// The refusal, audited as reached at the attestation step (unless it names a boot).
    pub(crate) fn attested(mut self) -> Self {
        if matches!(self.subject, Subject::Unaudited) {
            self.subject = Subject::Unverified;
        }
        self
    }
}

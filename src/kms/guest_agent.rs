//! The KMS's own attestation inside a real dstack CVM: the dstack guest agent (spec/01 §9).
//!
//! Flow: [`locate`] (pure) picks the agent: `kms.guest_agent` when set (`unix:/path` or an
//! `http://` base URL, as the SDKs' simulator endpoint), else the first of [`SOCKETS`] that
//! exists; none is a start-up error naming the paths, never a silent fallback. [`GuestAgent::
//! connect`] asks `Info` for the OS image hash the KMS runs (and the host's `vm_config`). Each attestation is `GetQuote` with
//! the 64 bytes of report data (the RPC key's, then the bootstrap's); [`attestation_of`] (pure)
//! turns the answer into a dstack `VersionedAttestation`: the agent's own `attestation` when it
//! gives one (non-TDX platforms), else its TDX quote with the event log and `vm_config` carried
//! along. The answer's report data must be ours.

use std::path::Path;
use std::time::Duration;

use futures::FutureExt as _;
use serde::Deserialize;

use super::selfcheck::{AttestationSource, Attested, SelfCheckError};
use crate::attestation::versioned::{self, Attestation, Platform};
use crate::http::client::{Client, ClientError, Endpoint};

/// Where the guest agent's socket is, in the order tried.
pub const SOCKETS: [&str; 4] = [
    "/var/run/dstack.sock",
    "/run/dstack.sock",
    "/var/run/dstack/dstack.sock",
    "/run/dstack/dstack.sock",
];

/// Why the guest agent gave no attestation.
#[derive(Debug, thiserror::Error)]
pub enum GuestAgentError {
    /// No agent configured and none of the sockets exists.
    #[error(
        "no dstack guest agent: none of {0} exists, so this is not a dstack CVM; set kms.guest_agent to the agent's socket (unix:/path) or choose another kms.self_attestation"
    )]
    NotFound(String),
    /// The call failed.
    #[error("the dstack guest agent at {at}: {method}: {source}")]
    Call {
        /// Where the agent is.
        at: String,
        /// `Info` or `GetQuote`.
        method: &'static str,
        /// Why.
        source: ClientError,
    },
    /// The answer is not what the API documents.
    #[error("the dstack guest agent at {at}: {method} answered {problem}")]
    Answer {
        /// Where the agent is.
        at: String,
        /// `Info` or `GetQuote`.
        method: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

/// The agent `configured` names (`unix:/path` or an `http(s)://` base URL), else the first of
/// [`SOCKETS`] that `exists`.
pub fn locate(
    configured: Option<&str>,
    exists: impl Fn(&Path) -> bool,
) -> Result<Endpoint, GuestAgentError> {
    if let Some(c) = configured {
        return Ok(Endpoint::parse(c));
    }
    SOCKETS
        .iter()
        .map(Path::new)
        .find(|p| exists(p))
        .map(|p| Endpoint::Unix(p.to_path_buf()))
        .ok_or_else(|| GuestAgentError::NotFound(SOCKETS.join(", ")))
}

/// `GetQuote`'s answer (unknown fields ignored).
#[derive(Debug, Default, Deserialize)]
struct QuoteAnswer {
    #[serde(default)]
    quote: String,
    #[serde(default)]
    event_log: String,
    #[serde(default)]
    report_data: String,
    #[serde(default)]
    vm_config: String,
    #[serde(default)]
    attestation: String,
}

fn unhex(field: &str, text: &str) -> Result<Vec<u8>, String> {
    hex::decode(text.trim_start_matches("0x")).map_err(|e| format!("{field} that is not hex: {e}"))
}

/// The dstack attestation in a `GetQuote` answer `body`, which must be over `report_data`.
pub fn attestation_of(body: &[u8], report_data: &[u8; 64]) -> Result<Vec<u8>, String> {
    let a: QuoteAnswer =
        serde_json::from_slice(body).map_err(|e| format!("something that is not JSON: {e}"))?;
    if !a.attestation.is_empty() {
        let raw = unhex("an attestation", &a.attestation)?;
        let parsed = versioned::parse(&raw).map_err(|e| format!("an attestation: {e}"))?;
        if &parsed.report_data != report_data {
            return Err("an attestation over other report data".into());
        }
        return Ok(raw);
    }
    if a.quote.is_empty() {
        return Err("neither a quote nor an attestation".into());
    }
    let quote = unhex("a quote", &a.quote)?;
    let echoed = unhex("report data", &a.report_data)?;
    // The agent zero-pads what it was given to 64 bytes.
    if echoed.len() > 64
        || echoed
            .iter()
            .chain(std::iter::repeat(&0))
            .take(64)
            .ne(report_data)
    {
        return Err("a quote over other report data".into());
    }
    let event_log = crate::attestation::eventlog::parse_full_json_event_log(a.event_log.as_bytes())
        .map_err(|e| format!("an event log: {e}"))?;
    Ok(versioned::encode_v0(&Attestation {
        platform: Platform::Tdx { quote, event_log },
        runtime_events: Vec::new(),
        report_data: *report_data,
        config: a.vm_config,
    }))
}

/// The guest agent of the CVM the KMS runs in.
pub struct GuestAgent {
    client: Client,
    at: String,
    os_image_hash: Vec<u8>,
    vm_config: String,
}

impl GuestAgent {
    /// The agent at `endpoint`, each call bounded by `timeout`; asks it for the OS image hash.
    pub async fn connect(endpoint: Endpoint, timeout: Duration) -> Result<Self, GuestAgentError> {
        let at = match &endpoint {
            Endpoint::Http(base) => base.clone(),
            Endpoint::Unix(path) => format!("unix:{}", path.display()),
        };
        let client = Client::new(endpoint, None, "dstack", timeout);
        let body = client
            .post("/Info", &serde_json::json!({}))
            .await
            .map_err(|source| GuestAgentError::Call {
                at: at.clone(),
                method: "Info",
                source,
            })?;
        let answer = |problem: String| GuestAgentError::Answer {
            at: at.clone(),
            method: "Info",
            problem,
        };
        let info: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| answer(format!("something that is not JSON: {e}")))?;
        let os_image_hash = info["os_image_hash"]
            .as_str()
            .ok_or_else(|| answer("no os_image_hash".into()))
            .and_then(|h| unhex("an os_image_hash", h).map_err(answer))?;
        // Newer agents give the host's vm_config; otherwise what the KMS checks of it.
        let vm_config = info["vm_config"]
            .as_str()
            .filter(|c| !c.is_empty())
            .map_or_else(
                || serde_json::json!({"os_image_hash": hex::encode(&os_image_hash)}).to_string(),
                str::to_owned,
            );
        Ok(Self {
            client,
            at,
            os_image_hash,
            vm_config,
        })
    }

    async fn quote(&self, report_data: [u8; 64]) -> Result<Vec<u8>, GuestAgentError> {
        let body = self
            .client
            .post(
                "/GetQuote",
                &serde_json::json!({"report_data": hex::encode(report_data)}),
            )
            .await
            .map_err(|source| GuestAgentError::Call {
                at: self.at.clone(),
                method: "GetQuote",
                source,
            })?;
        attestation_of(&body, &report_data).map_err(|problem| GuestAgentError::Answer {
            at: self.at.clone(),
            method: "GetQuote",
            problem,
        })
    }
}

impl AttestationSource for GuestAgent {
    fn attest(&self, report_data: &[u8; 64]) -> Attested<'_> {
        let report_data = *report_data;
        async move {
            self.quote(report_data)
                .await
                .map_err(|e| SelfCheckError::Unavailable(e.to_string()))
        }
        .boxed()
    }

    fn os_image_hash(&self) -> Vec<u8> {
        self.os_image_hash.clone()
    }

    fn vm_config(&self) -> String {
        self.vm_config.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_configured_agent_wins_then_the_first_socket_that_exists() {
        assert_eq!(
            locate(Some("unix:/tmp/agent.sock"), |_| true).unwrap(),
            Endpoint::Unix("/tmp/agent.sock".into())
        );
        assert_eq!(
            locate(Some("http://127.0.0.1:8090/"), |_| false).unwrap(),
            Endpoint::Http("http://127.0.0.1:8090".into())
        );
        assert_eq!(
            locate(None, |p| p.starts_with("/run")).unwrap(),
            Endpoint::Unix("/run/dstack.sock".into())
        );
        let missing = locate(None, |_| false).unwrap_err().to_string();
        assert!(
            missing.contains("/var/run/dstack.sock, /run/dstack.sock")
                && missing.contains("not a dstack CVM"),
            "{missing}"
        );
    }

    #[test]
    fn a_tdx_answer_becomes_an_attestation_with_its_event_log_and_vm_config() {
        let rd = [7u8; 64];
        let events = vec![crate::attestation::eventlog::TdxEvent::runtime(
            "app-id",
            &[1; 20],
            crate::attestation::eventlog::EventVersion::V1,
        )];
        let body = serde_json::json!({
            "quote": hex::encode([0xaa; 16]),
            "event_log": serde_json::to_string(&events).unwrap(),
            "report_data": hex::encode(rd),
            "vm_config": "{\"os_image_hash\":\"05\"}",
        })
        .to_string();
        let raw = attestation_of(body.as_bytes(), &rd).unwrap();
        let parsed = versioned::parse(&raw).unwrap();
        assert_eq!(parsed.report_data, rd);
        assert_eq!(parsed.config, "{\"os_image_hash\":\"05\"}");
        assert_eq!(
            parsed.platform,
            Platform::Tdx {
                quote: vec![0xaa; 16],
                event_log: events
            }
        );
        // Short report data comes back zero-padded; other report data is refused.
        let mut short = [0u8; 64];
        short[..2].copy_from_slice(&[1, 2]);
        let padded = body.replace(&hex::encode(rd), "0102");
        assert!(attestation_of(padded.as_bytes(), &short).is_ok());
        assert!(
            attestation_of(body.as_bytes(), &[8; 64])
                .unwrap_err()
                .contains("other report data")
        );
    }

    #[test]
    fn a_ready_made_attestation_is_taken_when_over_our_report_data() {
        let rd = [3u8; 64];
        let att = versioned::encode_v0(&Attestation {
            platform: Platform::NitroEnclave {
                document: vec![1, 2, 3],
            },
            runtime_events: Vec::new(),
            report_data: rd,
            config: String::new(),
        });
        let body =
            serde_json::json!({"quote": "", "event_log": "", "attestation": hex::encode(&att)})
                .to_string();
        assert_eq!(attestation_of(body.as_bytes(), &rd).unwrap(), att);
        assert!(attestation_of(body.as_bytes(), &[4; 64]).is_err());
        for bad in [
            "not json",
            "{}",
            r#"{"quote":"zz"}"#,
            r#"{"quote":"aa","report_data":"00","event_log":"[{"}"#,
        ] {
            assert!(attestation_of(bad.as_bytes(), &rd).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn any_answer_gives_an_attestation_or_a_reason(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = attestation_of(&body, &[0; 64]);
        }
    }
}

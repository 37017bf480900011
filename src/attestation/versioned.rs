//! dstack `VersionedAttestation`: V0 (SCALE, first byte 0x00) and V1 (msgpack map).
//!
//! V0: `00 ‖ variant ‖ body ‖ runtime_events ‖ report_data[64] ‖ config`, variant 0 = DstackTdx
//! (`quote: Vec<u8>, event_log: Vec<TdxEvent>`), 2 = DstackNitroEnclave (`nsm_quote: Vec<u8>`).
//! V1: msgpack `{version: 1, platform: {kind, data}, stack: {kind, data}}` with named fields.

use serde::Deserialize;

use super::eventlog::{EventVersion, MAX_FULL_EVENT_LOG_LEN, RuntimeEvent, TdxEvent, flex_bytes};
use super::reason::{AttestationError, Result, check_size, reject};
use super::scale::{ScaleError, ScaleReader, ScaleWriter};

impl From<ScaleError> for AttestationError {
    fn from(e: ScaleError) -> Self {
        reject!(AttestationMalformed, "{e}")
    }
}

/// Largest `VersionedAttestation` accepted (a full one carries the boot event log).
pub const MAX_ATTESTATION_LEN: usize = 64 * 1024 + MAX_FULL_EVENT_LOG_LEN;

/// The platform evidence of a dstack attestation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Platform {
    /// A TDX quote and its event log.
    Tdx {
        /// Raw quote.
        quote: Vec<u8>,
        /// Boot and runtime events (possibly stripped to RTMR3 only).
        event_log: Vec<TdxEvent>,
    },
    /// An AWS Nitro Enclave attestation document (COSE_Sign1).
    NitroEnclave {
        /// The COSE document.
        document: Vec<u8>,
    },
}

/// A parsed dstack attestation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attestation {
    /// The platform evidence.
    pub platform: Platform,
    /// Runtime events carried beside the evidence (used for Nitro, where no RTMR binds them).
    pub runtime_events: Vec<RuntimeEvent>,
    /// The report data the guest asked for.
    pub report_data: [u8; 64],
    /// The guest's config JSON (`os_image_hash`, `vm_config`...); a claim, not verified.
    pub config: String,
}

impl Attestation {
    /// The attestation of older guests: a bare TDX quote and its event log. The quote's own
    /// report data is what binds; the separate field stays zero.
    pub fn legacy_tdx(quote: Vec<u8>, event_log: Vec<TdxEvent>) -> Self {
        Self {
            platform: Platform::Tdx { quote, event_log },
            runtime_events: Vec::new(),
            report_data: [0; 64],
            config: String::new(),
        }
    }

    /// The copy placed in certificates: a TDX event log keeps only its RTMR3 events (the quoted
    /// RTMR0-2 stand for the boot events, see [`super::eventlog::verify_replay`]).
    pub fn stripped(&self) -> Self {
        let mut out = self.clone();
        if let Platform::Tdx { event_log, .. } = &mut out.platform {
            event_log.retain(|e| e.imr == 3);
        }
        out
    }
}

/// Parses V0 or V1 bytes.
pub fn parse(raw: &[u8]) -> Result<Attestation> {
    check_size("attestation", raw, MAX_ATTESTATION_LEN)?;
    match raw[0] {
        0x00 => parse_v0(&raw[1..]),
        0x80..=0x8f | 0xde | 0xdf => parse_v1(raw),
        b => Err(reject!(
            AttestationMalformed,
            "unknown VersionedAttestation prefix {b:#04x}"
        )),
    }
}

fn parse_v0(body: &[u8]) -> Result<Attestation> {
    let mut r = ScaleReader(body);
    let platform = match r.u8()? {
        0 => {
            let quote = r.bytes()?;
            let n = r.len()?;
            let mut event_log = Vec::with_capacity(n.min(256));
            for _ in 0..n {
                event_log.push(TdxEvent {
                    imr: r.u32()?,
                    event_type: r.u32()?,
                    digest: r.bytes()?,
                    event: r.string()?,
                    event_payload: r.bytes()?,
                    version: EventVersion::V1,
                });
            }
            Platform::Tdx { quote, event_log }
        }
        2 => Platform::NitroEnclave {
            document: r.bytes()?,
        },
        v => return Err(reject!(UnsupportedTee, "attestation variant {v}")),
    };
    let n = r.len()?;
    let mut runtime_events = Vec::with_capacity(n.min(256));
    for _ in 0..n {
        runtime_events.push(RuntimeEvent {
            event: r.string()?,
            payload: r.bytes()?,
            version: EventVersion::V1,
        });
    }
    let report_data = r.array::<64>()?;
    let config = r.string()?;
    if !r.0.is_empty() {
        return Err(reject!(
            AttestationMalformed,
            "{} trailing bytes after V0 attestation",
            r.0.len()
        ));
    }
    Ok(Attestation {
        platform,
        runtime_events,
        report_data,
        config,
    })
}

/// Encodes an attestation as V0 SCALE (what dstack puts in RA-TLS certificates).
pub fn encode_v0(att: &Attestation) -> Vec<u8> {
    let mut w = ScaleWriter(vec![0x00]);
    match &att.platform {
        Platform::Tdx { quote, event_log } => {
            w.0.push(0);
            w.bytes(quote);
            w.compact(event_log.len());
            for ev in event_log {
                w.0.extend_from_slice(&ev.imr.to_le_bytes());
                w.0.extend_from_slice(&ev.event_type.to_le_bytes());
                w.bytes(&ev.digest);
                w.bytes(ev.event.as_bytes());
                w.bytes(&ev.event_payload);
            }
        }
        Platform::NitroEnclave { document } => {
            w.0.push(2);
            w.bytes(document);
        }
    }
    w.compact(att.runtime_events.len());
    for ev in &att.runtime_events {
        w.bytes(ev.event.as_bytes());
        w.bytes(&ev.payload);
    }
    w.0.extend_from_slice(&att.report_data);
    w.bytes(att.config.as_bytes());
    w.0
}

#[derive(Deserialize)]
struct V1 {
    version: u64,
    platform: Tagged<V1Platform>,
    stack: Tagged<V1Stack>,
}

#[derive(Deserialize)]
struct Tagged<T> {
    kind: String,
    data: T,
}

#[derive(Deserialize)]
struct V1Platform {
    #[serde(default, with = "flex_bytes")]
    quote: Vec<u8>,
    #[serde(default)]
    event_log: Vec<TdxEvent>,
    #[serde(default, with = "flex_bytes")]
    nsm_quote: Vec<u8>,
}

#[derive(Deserialize)]
struct V1Stack {
    #[serde(with = "flex_bytes")]
    report_data: Vec<u8>,
    #[serde(default)]
    runtime_events: Vec<RuntimeEvent>,
    #[serde(default)]
    config: String,
}

fn parse_v1(raw: &[u8]) -> Result<Attestation> {
    let v1: V1 =
        rmp_serde::from_slice(raw).map_err(|e| reject!(AttestationMalformed, "V1 msgpack: {e}"))?;
    if v1.version != 1 {
        return Err(reject!(
            AttestationMalformed,
            "attestation version {}",
            v1.version
        ));
    }
    let platform = match v1.platform.kind.as_str() {
        "tdx" => Platform::Tdx {
            quote: v1.platform.data.quote,
            event_log: v1.platform.data.event_log,
        },
        "nitro-enclave" => Platform::NitroEnclave {
            document: v1.platform.data.nsm_quote,
        },
        other => return Err(reject!(UnsupportedTee, "platform {other:?}")),
    };
    // dstack-pod stacks bind report_data to a payload we do not model: refuse them
    if v1.stack.kind != "dstack" {
        return Err(reject!(UnsupportedTee, "stack {:?}", v1.stack.kind));
    }
    let report_data = <[u8; 64]>::try_from(v1.stack.data.report_data.as_slice())
        .map_err(|_| reject!(AttestationMalformed, "report_data is not 64 bytes"))?;
    Ok(Attestation {
        platform,
        runtime_events: v1.stack.data.runtime_events,
        report_data,
        config: v1.stack.data.config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v0_roundtrip() {
        let att = Attestation {
            platform: Platform::Tdx {
                quote: vec![7; 300],
                event_log: vec![TdxEvent::runtime("app-id", &[1; 20], EventVersion::V1)],
            },
            runtime_events: vec![RuntimeEvent {
                event: "x".into(),
                payload: vec![2; 70_000],
                version: EventVersion::V1,
            }],
            report_data: [9; 64],
            config: "{}".into(),
        };
        let bytes = encode_v0(&att);
        assert_eq!(parse(&bytes).unwrap(), att);
        assert!(parse(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn v1_msgpack_named() {
        #[derive(serde::Serialize)]
        struct P<'a> {
            kind: &'a str,
            data: serde_json::Value,
        }
        #[derive(serde::Serialize)]
        struct A<'a> {
            version: u64,
            platform: P<'a>,
            stack: P<'a>,
        }
        let a = A {
            version: 1,
            platform: P {
                kind: "nitro-enclave",
                data: serde_json::json!({"nsm_quote": [1, 2, 3]}),
            },
            stack: P {
                kind: "dstack",
                data: serde_json::json!({"report_data": vec![0u8; 64], "runtime_events": [{"event": "app-id", "payload": [1, 2]}], "config": "{}"}),
            },
        };
        let bytes = rmp_serde::to_vec_named(&a).unwrap();
        let att = parse(&bytes).unwrap();
        assert_eq!(
            att.platform,
            Platform::NitroEnclave {
                document: vec![1, 2, 3]
            }
        );
        assert_eq!(att.runtime_events[0].payload, vec![1, 2]);
    }
}

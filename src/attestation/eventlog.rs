//! dstack / CCEL event logs: parsing (JSON list, optionally `ELGZv1` gzip), RTMR replay and
//! runtime-event digests (v1 binary pre-image, v2 JCS JSON pre-image).

use std::io::Read;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha384};

use super::reason::{Result, check_size, reject};

/// Event type of dstack runtime events (extended into RTMR3).
pub const DSTACK_RUNTIME_EVENT_TYPE: u32 = 0x0800_0001;
/// Magic prefix of a gzip-compressed event log extension.
pub const ELGZ_MAGIC: &[u8] = b"ELGZv1";
/// Largest event log accepted, compressed or not (and the cap after decompression).
pub const MAX_EVENT_LOG_LEN: usize = 16 * 1024;
/// Largest event log inside a full `VersionedAttestation` (boot events carry ACPI tables).
pub const MAX_FULL_EVENT_LOG_LEN: usize = 256 * 1024;

/// The digest scheme of a runtime event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u32", try_from = "u32")]
pub enum EventVersion {
    /// `sha384(le32(type) ‖ ":" ‖ name ‖ ":" ‖ payload)`.
    #[default]
    V1,
    /// `sha384(JCS({"name","payload":hex,"type"}))`.
    V2,
}

impl From<EventVersion> for u32 {
    fn from(v: EventVersion) -> u32 {
        match v {
            EventVersion::V1 => 1,
            EventVersion::V2 => 2,
        }
    }
}

impl TryFrom<u32> for EventVersion {
    type Error = String;
    fn try_from(v: u32) -> std::result::Result<Self, String> {
        match v {
            1 => Ok(Self::V1),
            2 => Ok(Self::V2),
            other => Err(format!("unknown event log version {other}")),
        }
    }
}

impl EventVersion {
    fn is_v1(&self) -> bool {
        *self == Self::V1
    }
}

/// One event of a TDX event log (boot events from CCEL, runtime events from dstack).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TdxEvent {
    /// Register index: 0..=3 for RTMR0..3.
    pub imr: u32,
    /// TCG event type (`0x08000001` for dstack runtime events).
    pub event_type: u32,
    /// The digest extended into the register (48 bytes).
    #[serde(with = "flex_bytes", default)]
    pub digest: Vec<u8>,
    /// Event name (runtime events) or description.
    #[serde(default)]
    pub event: String,
    /// Event payload (may be stripped for boot events).
    #[serde(with = "flex_bytes", default)]
    pub event_payload: Vec<u8>,
    /// Digest scheme of runtime events.
    #[serde(default, skip_serializing_if = "EventVersion::is_v1")]
    pub version: EventVersion,
}

/// A dstack runtime event as carried outside the TDX event log (Nitro attestations).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeEvent {
    /// Event name (`app-id`, `compose-hash`...).
    pub event: String,
    /// Payload bytes.
    #[serde(with = "flex_bytes")]
    pub payload: Vec<u8>,
    /// Digest scheme.
    #[serde(default, skip_serializing_if = "EventVersion::is_v1")]
    pub version: EventVersion,
}

impl TdxEvent {
    /// Builds a dstack runtime event with its digest computed.
    pub fn runtime(name: &str, payload: &[u8], version: EventVersion) -> Self {
        Self {
            imr: 3,
            event_type: DSTACK_RUNTIME_EVENT_TYPE,
            digest: runtime_digest(name, payload, version).to_vec(),
            event: name.to_owned(),
            event_payload: payload.to_vec(),
            version,
        }
    }

    /// Whether this is a dstack runtime event (RTMR3, type `0x08000001`).
    pub fn is_runtime(&self) -> bool {
        self.imr == 3 && self.event_type == DSTACK_RUNTIME_EVENT_TYPE
    }
}

/// Digest of a runtime event under `version`.
pub fn runtime_digest(name: &str, payload: &[u8], version: EventVersion) -> [u8; 48] {
    let mut h = Sha384::new();
    match version {
        EventVersion::V1 => {
            h.update(DSTACK_RUNTIME_EVENT_TYPE.to_le_bytes());
            h.update(b":");
            h.update(name.as_bytes());
            h.update(b":");
            h.update(payload);
        }
        EventVersion::V2 => h.update(canonical_event_json_v2(name, payload)),
    }
    h.finalize().into()
}

/// RFC 8785 canonical JSON of a v2 runtime event. Keys are already in sorted order, the number
/// is an integer and serde_json escapes strings the way JCS does for the characters a name holds.
pub fn canonical_event_json_v2(name: &str, payload: &[u8]) -> String {
    #[derive(Serialize)]
    struct Canonical<'a> {
        name: &'a str,
        payload: String,
        #[serde(rename = "type")]
        ty: u32,
    }
    serde_json::to_string(&Canonical {
        name,
        payload: hex::encode(payload),
        ty: DSTACK_RUNTIME_EVENT_TYPE,
    })
    .unwrap_or_default()
}

/// Parses a JSON event log, accepting the `ELGZv1` gzip form. Both forms are capped at
/// [`MAX_EVENT_LOG_LEN`] bytes (the compressed one also after decompression).
pub fn parse_json_event_log(raw: &[u8]) -> Result<Vec<TdxEvent>> {
    check_size("event log", raw, MAX_EVENT_LOG_LEN)?;
    let json = match raw.strip_prefix(ELGZ_MAGIC) {
        Some(gz) => gunzip_capped(gz, MAX_EVENT_LOG_LEN)?,
        None => raw.to_vec(),
    };
    serde_json::from_slice(&json).map_err(|e| reject!(EventLogMalformed, "event log JSON: {e}"))
}

/// Parses a larger JSON event log (the `event_log` of a dstack `tcb_info` or a `--event-log`
/// file), capped at [`MAX_FULL_EVENT_LOG_LEN`].
pub fn parse_full_json_event_log(raw: &[u8]) -> Result<Vec<TdxEvent>> {
    check_size("event log", raw, MAX_FULL_EVENT_LOG_LEN)?;
    if raw.starts_with(ELGZ_MAGIC) {
        return parse_json_event_log(raw);
    }
    serde_json::from_slice(raw).map_err(|e| reject!(EventLogMalformed, "event log JSON: {e}"))
}

/// Compresses a JSON event log into the `ELGZv1` form.
pub fn compress_event_log(json: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(ELGZ_MAGIC.to_vec(), flate2::Compression::best());
    enc.write_all(json)
        .and_then(|()| enc.finish())
        .map_err(|e| reject!(EventLogMalformed, "gzip: {e}"))
}

fn gunzip_capped(gz: &[u8], cap: usize) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    // read one byte past the cap so that an oversized stream is detected, not truncated
    flate2::read::GzDecoder::new(gz)
        .take(cap as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| reject!(EventLogMalformed, "gzip: {e}"))?;
    if out.len() > cap {
        return Err(reject!(
            InputTooLarge,
            "event log exceeds {cap} bytes decompressed"
        ));
    }
    Ok(out)
}

/// The runtime event that ends the boot-time measurement: dstack extends it once the identity
/// events are in, before the key provider and anything the app adds later.
pub const BOOT_MR_DONE: &str = "boot-mr-done";

/// The events up to and including the first that `is_boot_mr_done` matches; all of them when
/// none does (a guest without the marker is measured in full, as upstream does).
pub fn boot_prefix<T>(events: &[T], is_boot_mr_done: impl Fn(&T) -> bool) -> &[T] {
    match events.iter().position(is_boot_mr_done) {
        Some(i) => &events[..=i],
        None => events,
    }
}

/// Replays the event log: for each register, `mr = sha384(mr ‖ digest)` from zero.
/// Also returns which registers had at least one event.
pub fn replay(events: &[TdxEvent]) -> Result<([[u8; 48]; 4], [bool; 4])> {
    let mut mrs = [[0u8; 48]; 4];
    let mut seen = [false; 4];
    for ev in events {
        let idx = usize::try_from(ev.imr)
            .ok()
            .filter(|i| *i < 4)
            .ok_or_else(|| reject!(EventLogMalformed, "event for register {}", ev.imr))?;
        if ev.digest.len() != 48 {
            return Err(reject!(
                EventLogMalformed,
                "event {:?} has a {}-byte digest",
                ev.event,
                ev.digest.len()
            ));
        }
        let mut h = Sha384::new();
        h.update(mrs[idx]);
        h.update(&ev.digest);
        mrs[idx] = h.finalize().into();
        seen[idx] = true;
    }
    Ok((mrs, seen))
}

/// Checks every runtime event's digest against its name and payload.
pub fn check_runtime_digests(events: &[TdxEvent]) -> Result<()> {
    for ev in events.iter().filter(|e| e.is_runtime()) {
        if runtime_digest(&ev.event, &ev.event_payload, ev.version)[..] != ev.digest[..] {
            return Err(reject!(
                EventDigestMismatch,
                "runtime event {:?} digest does not match its payload",
                ev.event
            ));
        }
    }
    Ok(())
}

/// Replays the log and requires equality with the quoted RTMRs. RTMR3 must always match. RTMR0-2
/// must match when the log is a complete boot log (events for all three); the copies placed in
/// certificates are stripped to RTMR3 (plus, in V1, a placeholder ACPI event), and then the quoted
/// RTMR0-2 are used as they are: identity derives from the quoted registers, never from boot
/// event contents.
pub fn verify_replay(events: &[TdxEvent], quoted: &[[u8; 48]; 4]) -> Result<()> {
    check_runtime_digests(events)?;
    let (mrs, seen) = replay(events)?;
    let full_boot_log = seen[..3].iter().all(|s| *s);
    for i in 0..4 {
        if (i == 3 || full_boot_log) && mrs[i] != quoted[i] {
            return Err(reject!(
                RtmrMismatch,
                "RTMR{i} replay {} != quoted {}",
                hex::encode(mrs[i]),
                hex::encode(quoted[i])
            ));
        }
    }
    Ok(())
}

/// Bytes that deserialize from raw bytes (msgpack bin), a list of integers, or a hex string
/// (optionally `0x`-prefixed), and serialize as lowercase hex in human-readable formats.
pub(crate) mod flex_bytes {
    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    /// Serializes as hex (JSON) or raw bytes (binary formats).
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(v))
        } else {
            s.serialize_bytes(v)
        }
    }

    /// Deserializes from bytes, a sequence of u8, or a hex string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes, a list of bytes or a hex string")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
                hex::decode(v.strip_prefix("0x").unwrap_or(v)).map_err(E::custom)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_canonical_json_shape() {
        assert_eq!(
            canonical_event_json_v2("app-id", &[0xab]),
            r#"{"name":"app-id","payload":"ab","type":134217729}"#
        );
        assert_ne!(
            runtime_digest("a", b"x", EventVersion::V1),
            runtime_digest("a", b"x", EventVersion::V2)
        );
    }

    #[test]
    fn elgz_roundtrip_and_bomb() {
        let events = vec![TdxEvent::runtime("app-id", &[1; 20], EventVersion::V1)];
        let json = serde_json::to_vec(&events).unwrap();
        let gz = compress_event_log(&json).unwrap();
        assert_eq!(parse_json_event_log(&gz).unwrap(), events);
        assert_eq!(parse_json_event_log(&json).unwrap(), events);
        // a small gzip stream that inflates past the cap
        let bomb = compress_event_log(&vec![b' '; MAX_EVENT_LOG_LEN * 4]).unwrap();
        assert!(bomb.len() < MAX_EVENT_LOG_LEN);
        assert_eq!(
            parse_json_event_log(&bomb).unwrap_err().reason,
            super::super::RejectReason::InputTooLarge
        );
    }

    #[test]
    fn replay_detects_tampering() {
        let mut events = vec![
            TdxEvent::runtime("a", b"1", EventVersion::V1),
            TdxEvent::runtime("b", b"2", EventVersion::V2),
        ];
        let (mrs, _) = replay(&events).unwrap();
        verify_replay(&events, &mrs).unwrap();
        // a lone boot event (a stripped log's placeholder) does not have to replay
        let mut stripped = events.clone();
        stripped.insert(
            0,
            TdxEvent {
                imr: 0,
                event_type: 1,
                digest: vec![0; 48],
                event: String::new(),
                event_payload: vec![],
                version: EventVersion::V1,
            },
        );
        verify_replay(&stripped, &mrs).unwrap();
        events[1].event_payload = b"3".to_vec();
        assert_eq!(
            verify_replay(&events, &mrs).unwrap_err().reason,
            super::super::RejectReason::EventDigestMismatch
        );
    }
}

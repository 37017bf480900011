//! The dstack boot identity (`BootInfo`) derived from a verified attestation.

use serde::{Serialize, Serializer};
use sha2::{Digest, Sha256};

use super::eventlog::{RuntimeEvent, TdxEvent};
use super::reason::{Result, reject};
use super::tdx::TdMeasurements;

/// The TEE variant names upstream uses in boot info.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TeeVariant {
    /// Intel TDX under dstack.
    DstackTdx,
    /// AWS Nitro Enclave under dstack.
    DstackNitroEnclave,
}

impl TeeVariant {
    /// Upstream's spelling (`dstack-tdx`, `dstack-nitro-enclave`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DstackTdx => "dstack-tdx",
            Self::DstackNitroEnclave => "dstack-nitro-enclave",
        }
    }
}

impl Serialize for TeeVariant {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// What the authorization step is asked about: upstream's boot info, serialized as its
/// camelCase webhook JSON with lowercase hex bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BootInfo {
    /// TEE variant.
    pub tee_variant: TeeVariant,
    /// Aggregated measurement of the whole boot chain and app.
    #[serde(serialize_with = "hex_ser")]
    pub mr_aggregated: Vec<u8>,
    /// OS image hash claimed by the host's vm_config (bound to measurements by the caller).
    #[serde(serialize_with = "hex_ser")]
    pub os_image_hash: Vec<u8>,
    /// Measurement of the OS (firmware, kernel, cmdline) and key provider.
    #[serde(serialize_with = "hex_ser")]
    pub mr_system: Vec<u8>,
    /// App id (20 bytes).
    #[serde(serialize_with = "hex_ser")]
    pub app_id: Vec<u8>,
    /// sha256 of app-compose.json.
    #[serde(serialize_with = "hex_ser")]
    pub compose_hash: Vec<u8>,
    /// Instance id (20 bytes, or empty).
    #[serde(serialize_with = "hex_ser")]
    pub instance_id: Vec<u8>,
    /// Device id (sha256 of the PPID for TDX).
    #[serde(serialize_with = "hex_ser")]
    pub device_id: Vec<u8>,
    /// Payload of the `key-provider` event (JSON `{"name","id"}`), empty if none.
    #[serde(serialize_with = "hex_ser")]
    pub key_provider_info: Vec<u8>,
    /// TCB status (`UpToDate`...; empty for Nitro).
    pub tcb_status: String,
    /// Advisory ids.
    pub advisory_ids: Vec<String>,
}

fn hex_ser<S: Serializer>(v: &[u8], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(v))
}

/// The identity events of an RTMR3 log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DstackEvents {
    /// `app-id` payload.
    pub app_id: Option<Vec<u8>>,
    /// `compose-hash` payload.
    pub compose_hash: Option<Vec<u8>>,
    /// `instance-id` payload.
    pub instance_id: Option<Vec<u8>>,
    /// `key-provider` payload.
    pub key_provider: Option<Vec<u8>>,
    /// `os-image-hash` payload.
    pub os_image_hash: Option<Vec<u8>>,
}

impl DstackEvents {
    /// Collects the identity events from runtime events; the first occurrence counts (later ones
    /// are app events that cannot override boot identity).
    pub fn collect<'a>(events: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Self {
        let mut out = Self::default();
        for (name, payload) in events {
            let slot = match name {
                "app-id" => &mut out.app_id,
                "compose-hash" => &mut out.compose_hash,
                "instance-id" => &mut out.instance_id,
                "key-provider" => &mut out.key_provider,
                "os-image-hash" => &mut out.os_image_hash,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(payload.to_vec());
            }
        }
        out
    }

    /// The boot-time view, without the key provider: dstack extends `key-provider` after
    /// `boot-mr-done`, so the boot-time measurement does not cover it.
    pub fn at_boot_time(self) -> Self {
        Self {
            key_provider: None,
            ..self
        }
    }

    /// From a TDX event log (runtime events only; their digests must have been checked).
    pub fn from_tdx_log(events: &[TdxEvent]) -> Self {
        Self::collect(
            events
                .iter()
                .filter(|e| e.is_runtime())
                .map(|e| (e.event.as_str(), e.event_payload.as_slice())),
        )
    }

    /// From detached runtime events (Nitro).
    pub fn from_runtime(events: &[RuntimeEvent]) -> Self {
        Self::collect(
            events
                .iter()
                .map(|e| (e.event.as_str(), e.payload.as_slice())),
        )
    }
}

fn sha256(parts: &[&[u8]]) -> Vec<u8> {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().to_vec()
}

/// Derives the TDX boot info from verified measurements and a replayed event log.
///
/// Requires `app-id` (20 bytes) and `compose-hash` (32 bytes) events; when the quote's
/// `mr_config_id` has the dstack form (`0x01 ‖ compose_hash`), the compose hash must match it.
pub fn tdx_boot_info(
    td: &TdMeasurements,
    events: &DstackEvents,
    ppid: &[u8],
    tcb_status: &str,
    advisory_ids: &[String],
    os_image_hash: &[u8],
) -> Result<BootInfo> {
    let compose_hash = events
        .compose_hash
        .clone()
        .filter(|c| c.len() == 32)
        .ok_or_else(|| reject!(IdentityMissing, "no 32-byte compose-hash event"))?;
    let app_id = events
        .app_id
        .clone()
        .filter(|a| a.len() == 20)
        .ok_or_else(|| reject!(IdentityMissing, "no 20-byte app-id event"))?;
    if td.mr_config_id[0] == 0x01 && td.mr_config_id[1..33] != compose_hash[..] {
        return Err(reject!(
            ComposeHashMismatch,
            "mr_config_id does not carry the compose hash"
        ));
    }
    let key_provider_info = events.key_provider.clone().unwrap_or_default();
    let mr_key_provider = if key_provider_info.is_empty() {
        vec![0u8; 32]
    } else {
        sha256(&[&key_provider_info])
    };
    let [r0, r1, r2, r3] = &td.rtmr;
    let mr_system = sha256(&[&td.mr_td, r0, r1, r2, &mr_key_provider]);
    let zero = [0u8; 48];
    let mr_aggregated =
        if td.mr_config_id == zero && td.mr_owner == zero && td.mr_owner_config == zero {
            sha256(&[&td.mr_td, r0, r1, r2, r3])
        } else {
            sha256(&[
                &td.mr_td,
                r0,
                r1,
                r2,
                r3,
                &td.mr_config_id,
                &td.mr_owner,
                &td.mr_owner_config,
            ])
        };
    Ok(BootInfo {
        tee_variant: TeeVariant::DstackTdx,
        mr_aggregated,
        os_image_hash: os_image_hash.to_vec(),
        mr_system,
        app_id,
        compose_hash,
        instance_id: events.instance_id.clone().unwrap_or_default(),
        device_id: sha256(&[ppid]),
        key_provider_info,
        tcb_status: tcb_status.to_owned(),
        advisory_ids: advisory_ids.to_vec(),
    })
}

/// Derives the Nitro Enclave boot info: `mr_system = mr_aggregated = sha256(PCR0‖PCR1‖PCR2)`,
/// `compose_hash := os_image_hash`, the app id from the runtime events.
pub fn nitro_boot_info(
    pcrs: [&[u8]; 3],
    events: &DstackEvents,
    os_image_hash: &[u8],
) -> Result<BootInfo> {
    let app_id = events
        .app_id
        .clone()
        .ok_or_else(|| reject!(IdentityMissing, "no app-id runtime event"))?;
    let mr = sha256(&pcrs);
    Ok(BootInfo {
        tee_variant: TeeVariant::DstackNitroEnclave,
        mr_aggregated: mr.clone(),
        os_image_hash: os_image_hash.to_vec(),
        mr_system: mr,
        app_id,
        compose_hash: os_image_hash.to_vec(),
        instance_id: events.instance_id.clone().unwrap_or_default(),
        // an enclave has no PPID: upstream hashes the empty one
        device_id: sha256(&[]),
        key_provider_info: events.key_provider.clone().unwrap_or_default(),
        tcb_status: String::new(),
        advisory_ids: Vec::new(),
    })
}

/// Reads `os_image_hash` from a dstack config JSON (top level or under `vm_config`, itself an
/// object or a JSON string). The value is a host claim, bound to the measurements by the caller.
/// An empty config claims nothing. A config that is not JSON, repeats a key anywhere (a reader
/// taking the last one could be shown another value than a reader taking the first), or carries
/// an `os_image_hash` that is not exactly 32 bytes of hex is malformed.
pub fn os_image_hash_from_config(config: &str) -> std::result::Result<Option<[u8; 32]>, String> {
    if config.trim().is_empty() {
        return Ok(None);
    }
    let v = strict_json(config)?;
    let claim = match v.get("os_image_hash") {
        Some(h) => Some(h),
        None => match v.get("vm_config") {
            Some(serde_json::Value::String(inner)) => return os_image_hash_from_config(inner),
            Some(obj) => obj.get("os_image_hash"),
            None => None,
        },
    };
    let Some(claim) = claim else {
        return Ok(None);
    };
    let hex_str = claim.as_str().ok_or("os_image_hash is not a hex string")?;
    let bytes = hex::decode(hex_str.trim_start_matches("0x"))
        .map_err(|e| format!("os_image_hash is not hex: {e}"))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map(Some)
        .map_err(|_| format!("os_image_hash is {} bytes, not 32", bytes.len()))
}

/// Parses JSON, refusing any object that repeats a key.
fn strict_json(text: &str) -> std::result::Result<serde_json::Value, String> {
    use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

    struct Strict(serde_json::Value);

    impl<'de> Deserialize<'de> for Strict {
        fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
            d.deserialize_any(StrictVisitor).map(Strict)
        }
    }

    struct StrictVisitor;

    impl<'de> Visitor<'de> for StrictVisitor {
        type Value = serde_json::Value;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, v: bool) -> std::result::Result<Self::Value, E> {
            Ok(v.into())
        }
        fn visit_i64<E>(self, v: i64) -> std::result::Result<Self::Value, E> {
            Ok(v.into())
        }
        fn visit_u64<E>(self, v: u64) -> std::result::Result<Self::Value, E> {
            Ok(v.into())
        }
        fn visit_f64<E>(self, v: f64) -> std::result::Result<Self::Value, E> {
            Ok(v.into())
        }
        fn visit_str<E>(self, v: &str) -> std::result::Result<Self::Value, E> {
            Ok(v.into())
        }
        fn visit_unit<E>(self) -> std::result::Result<Self::Value, E> {
            Ok(serde_json::Value::Null)
        }
        fn visit_seq<A: SeqAccess<'de>>(
            self,
            mut a: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(Strict(v)) = a.next_element()? {
                out.push(v);
            }
            Ok(out.into())
        }
        fn visit_map<A: MapAccess<'de>>(
            self,
            mut a: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut out = serde_json::Map::new();
            while let Some(key) = a.next_key::<String>()? {
                let Strict(v) = a.next_value()?;
                if out.insert(key.clone(), v).is_some() {
                    return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
                }
            }
            Ok(out.into())
        }
    }

    let mut de = serde_json::Deserializer::from_str(text);
    let Strict(v) = Strict::deserialize(&mut de).map_err(|e| format!("not valid JSON: {e}"))?;
    de.end().map_err(|e| format!("not valid JSON: {e}"))?;
    Ok(v)
}

impl BootInfo {
    /// Refuses a boot info whose fixed-size fields do not have exactly their size: the
    /// contracts' `AppBootInfo` takes `address`/`bytes32` values, and a longer value would be
    /// authorized by its prefix and recorded whole.
    pub fn check_sizes(&self) -> std::result::Result<(), String> {
        let fields: [(&str, &[u8], &[usize]); 7] = [
            ("app_id", &self.app_id, &[20]),
            ("compose_hash", &self.compose_hash, &[32]),
            ("instance_id", &self.instance_id, &[0, 20]),
            ("device_id", &self.device_id, &[32]),
            ("mr_aggregated", &self.mr_aggregated, &[32]),
            ("mr_system", &self.mr_system, &[32]),
            ("os_image_hash", &self.os_image_hash, &[0, 32]),
        ];
        for (name, value, sizes) in fields {
            if !sizes.contains(&value.len()) {
                return Err(format!(
                    "{name} is {} bytes, not {}",
                    value.len(),
                    sizes
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(" or ")
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_config_claims_are_exact() {
        let h = "ab".repeat(32);
        assert_eq!(os_image_hash_from_config(""), Ok(None));
        assert_eq!(os_image_hash_from_config("{}"), Ok(None));
        assert_eq!(
            os_image_hash_from_config(&format!(r#"{{"os_image_hash":"{h}"}}"#)),
            Ok(Some([0xab; 32]))
        );
        let nested = serde_json::json!({ "vm_config": format!(r#"{{"os_image_hash":"{h}"}}"#) });
        assert_eq!(
            os_image_hash_from_config(&nested.to_string()),
            Ok(Some([0xab; 32]))
        );
        let long = format!(r#"{{"os_image_hash":"{h}cd"}}"#);
        assert!(
            os_image_hash_from_config(&long)
                .unwrap_err()
                .contains("33 bytes")
        );
        let dup = format!(
            r#"{{"os_image_hash":"{h}","os_image_hash":"{}"}}"#,
            "cd".repeat(32)
        );
        assert!(
            os_image_hash_from_config(&dup)
                .unwrap_err()
                .contains("duplicate key")
        );
        let nested_dup = r#"{"vm_config":{"a":1,"a":2}}"#;
        assert!(os_image_hash_from_config(nested_dup).is_err());
        assert!(os_image_hash_from_config("not json").is_err());
        assert!(os_image_hash_from_config(r#"{"os_image_hash":7}"#).is_err());
    }

    proptest::proptest! {
        #[test]
        fn vm_config_parser_never_panics(text in ".{0,200}") {
            let _ = os_image_hash_from_config(&text);
        }
    }

    #[test]
    fn boot_info_json_is_camel_hex() {
        let b = BootInfo {
            tee_variant: TeeVariant::DstackTdx,
            mr_aggregated: vec![0xab],
            os_image_hash: vec![],
            mr_system: vec![1],
            app_id: vec![2],
            compose_hash: vec![3],
            instance_id: vec![],
            device_id: vec![4],
            key_provider_info: vec![5],
            tcb_status: "UpToDate".into(),
            advisory_ids: vec!["INTEL-SA-1".into()],
        };
        let v = serde_json::to_value(&b).unwrap();
        assert_eq!(v["teeVariant"], "dstack-tdx");
        assert_eq!(v["mrAggregated"], "ab");
        assert_eq!(v["keyProviderInfo"], "05");
        assert_eq!(v["advisoryIds"][0], "INTEL-SA-1");
        assert_eq!(v["instanceId"], "");
    }

    #[test]
    fn config_os_image_hash() {
        let nested = format!(
            r#"{{"vm_config":{{"os_image_hash":"{}"}}}}"#,
            "cd".repeat(32)
        );
        assert_eq!(os_image_hash_from_config(&nested), Ok(Some([0xcd; 32])));
        // Shorter than 32 bytes: malformed, not zero-padded.
        assert!(
            os_image_hash_from_config(r#"{"vm_config":"{\"os_image_hash\":\"ab\"}"}"#)
                .unwrap_err()
                .contains("1 bytes, not 32")
        );
        assert!(os_image_hash_from_config("nope").is_err());
    }
}

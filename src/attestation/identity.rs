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

/// Reads `os_image_hash` from a dstack config JSON (top level or under `vm_config`); the value
/// is a host claim and is used only when the caller supplies none.
pub fn os_image_hash_from_config(config: &str) -> Option<Vec<u8>> {
    let v: serde_json::Value = serde_json::from_str(config).ok()?;
    if let Some(s) = v.get("os_image_hash").and_then(|s| s.as_str()) {
        return hex::decode(s).ok();
    }
    // `vm_config` is itself a JSON document, embedded as an object or as a string
    match v.get("vm_config")? {
        serde_json::Value::String(inner) => os_image_hash_from_config(inner),
        obj => obj
            .get("os_image_hash")
            .and_then(|s| s.as_str())
            .and_then(|s| hex::decode(s).ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            os_image_hash_from_config(r#"{"vm_config":{"os_image_hash":"abcd"}}"#),
            Some(vec![0xab, 0xcd])
        );
        assert_eq!(
            os_image_hash_from_config(r#"{"vm_config":"{\"os_image_hash\":\"ab\"}"}"#),
            Some(vec![0xab])
        );
        assert_eq!(os_image_hash_from_config("nope"), None);
    }
}

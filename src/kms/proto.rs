//! The KMS wire messages (proto package `kms`), as protobuf (prost) and as pRPC JSON.
//!
//! JSON uses the proto field names; `bytes` are lowercase hex on output. On input upstream's pRPC
//! accepts hex only; we accept hex (with or without `0x`) and, as our own extension, base64.

use serde::{Deserialize, Serialize};

/// `bytes` fields in JSON: hex (upstream's form), or base64 (our extension).
mod hexbytes {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        let body = text.strip_prefix("0x").unwrap_or(&text);
        if let Ok(v) = hex::decode(body) {
            return Ok(v);
        }
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(|_| serde::de::Error::custom("bytes must be hex or base64"))
    }
}

/// `GetAppKey` request.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct GetAppKeyRequest {
    /// API version (1).
    #[prost(uint32, tag = "1")]
    pub api_version: u32,
    /// The host's vm_config JSON.
    #[prost(string, tag = "2")]
    pub vm_config: String,
}

/// `GetAppKey` response.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct AppKeyResponse {
    /// Root CA certificate (PEM).
    #[prost(string, tag = "1")]
    pub ca_cert: String,
    /// Disk encryption key.
    #[prost(bytes = "vec", tag = "2")]
    #[serde(with = "hexbytes")]
    pub disk_crypt_key: Vec<u8>,
    /// Env decryption key (X25519 secret).
    #[prost(bytes = "vec", tag = "3")]
    #[serde(with = "hexbytes")]
    pub env_crypt_key: Vec<u8>,
    /// App secp256k1 key.
    #[prost(bytes = "vec", tag = "4")]
    #[serde(with = "hexbytes")]
    pub k256_key: Vec<u8>,
    /// Root signature over the app key.
    #[prost(bytes = "vec", tag = "5")]
    #[serde(with = "hexbytes")]
    pub k256_signature: Vec<u8>,
    /// Deprecated duplicate of `gateway_app_id`.
    #[prost(string, tag = "6")]
    pub tproxy_app_id: String,
    /// Gateway app id.
    #[prost(string, tag = "7")]
    pub gateway_app_id: String,
    /// OS image hash the boot was authorized with.
    #[prost(bytes = "vec", tag = "8")]
    #[serde(with = "hexbytes")]
    pub os_image_hash: Vec<u8>,
}

/// `GetAppEnvEncryptPubKey` request.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct AppId {
    /// App id (20 bytes).
    #[prost(bytes = "vec", tag = "1")]
    #[serde(with = "hexbytes")]
    pub app_id: Vec<u8>,
}

/// `GetAppEnvEncryptPubKey` response.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct PublicKeyResponse {
    /// X25519 public key.
    #[prost(bytes = "vec", tag = "1")]
    #[serde(with = "hexbytes")]
    pub public_key: Vec<u8>,
    /// Root k256 signature (legacy, no timestamp).
    #[prost(bytes = "vec", tag = "2")]
    #[serde(with = "hexbytes")]
    pub signature: Vec<u8>,
    /// Unix seconds signed in `signature_v1`.
    #[prost(uint64, tag = "3")]
    pub timestamp: u64,
    /// Root k256 signature with the timestamp.
    #[prost(bytes = "vec", tag = "4")]
    #[serde(with = "hexbytes")]
    pub signature_v1: Vec<u8>,
}

/// Bootstrap information inside `GetMeta`.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct BootstrapResponse {
    /// Root CA public key (SPKI DER).
    #[prost(bytes = "vec", tag = "1")]
    #[serde(with = "hexbytes")]
    pub ca_pubkey: Vec<u8>,
    /// Root k256 public key (compressed).
    #[prost(bytes = "vec", tag = "2")]
    #[serde(with = "hexbytes")]
    pub k256_pubkey: Vec<u8>,
    /// Attestation binding both keys (empty when not running attested).
    #[prost(bytes = "vec", tag = "3")]
    #[serde(with = "hexbytes")]
    pub attestation: Vec<u8>,
}

/// `GetMeta` response.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct GetMetaResponse {
    /// Root CA certificate (PEM).
    #[prost(string, tag = "1")]
    pub ca_cert: String,
    /// Whether any app upgrade is allowed (dev mode).
    #[prost(bool, tag = "2")]
    pub allow_any_upgrade: bool,
    /// Root k256 public key (compressed).
    #[prost(bytes = "vec", tag = "3")]
    #[serde(with = "hexbytes")]
    pub k256_pubkey: Vec<u8>,
    /// Bootstrap information.
    #[prost(message, optional, tag = "4")]
    pub bootstrap_info: Option<BootstrapResponse>,
    /// Dev mode.
    #[prost(bool, tag = "5")]
    pub is_dev: bool,
    /// Gateway app id.
    #[prost(string, optional, tag = "6")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_app_id: Option<String>,
    /// DstackKms contract address.
    #[prost(string, optional, tag = "7")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_contract_address: Option<String>,
    /// Chain id.
    #[prost(uint64, optional, tag = "8")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chain_id: Option<u64>,
    /// DstackApp implementation address.
    #[prost(string, optional, tag = "9")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_auth_implementation: Option<String>,
}

/// `GetTempCaCert` response.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct GetTempCaCertResponse {
    /// Temp CA certificate (PEM).
    #[prost(string, tag = "1")]
    pub temp_ca_cert: String,
    /// Temp CA key (PEM); authenticates nobody.
    #[prost(string, tag = "2")]
    pub temp_ca_key: String,
    /// Root CA certificate (PEM).
    #[prost(string, tag = "3")]
    pub ca_cert: String,
}

/// `GetKmsKey` request.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct GetKmsKeyRequest {
    /// The host's vm_config JSON.
    #[prost(string, tag = "1")]
    pub vm_config: String,
}

/// One root key set handed to a replica.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct KmsKeys {
    /// Root CA key (PKCS#8 PEM).
    #[prost(string, tag = "1")]
    pub ca_key: String,
    /// Root secp256k1 key (32 bytes).
    #[prost(bytes = "vec", tag = "2")]
    #[serde(with = "hexbytes")]
    pub k256_key: Vec<u8>,
}

/// `GetKmsKey` response.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct KmsKeyResponse {
    /// Temp CA key (PEM).
    #[prost(string, tag = "1")]
    pub temp_ca_key: String,
    /// The root key sets.
    #[prost(message, repeated, tag = "2")]
    pub keys: Vec<KmsKeys>,
}

/// `GetAppBlsKey` response (keywarden's addition; the request is a `GetAppKeyRequest`).
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct AppBlsKeyResponse {
    /// BLS12-381 secret key (32 bytes, big-endian).
    #[prost(bytes = "vec", tag = "1")]
    #[serde(with = "hexbytes")]
    pub secret_key: Vec<u8>,
    /// Compressed G1 public key (48 bytes).
    #[prost(bytes = "vec", tag = "2")]
    #[serde(with = "hexbytes")]
    pub public_key: Vec<u8>,
    /// Root k256 signature over `keccak256("dstack-kms-issued-bls:" ‖ app_id ‖ public_key)`.
    #[prost(bytes = "vec", tag = "3")]
    #[serde(with = "hexbytes")]
    pub k256_signature: Vec<u8>,
}

/// `SignCert` request.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct SignCertRequest {
    /// CSR format: 1 (`CertSigningRequestV1`) or 2 (`CertSigningRequestV2`).
    #[prost(uint32, tag = "1")]
    pub api_version: u32,
    /// The SCALE-encoded CSR.
    #[prost(bytes = "vec", tag = "2")]
    #[serde(with = "hexbytes")]
    pub csr: Vec<u8>,
    /// DER ECDSA-P256-SHA256 signature of `csr` by the CSR's key.
    #[prost(bytes = "vec", tag = "3")]
    #[serde(with = "hexbytes")]
    pub signature: Vec<u8>,
    /// The host's vm_config JSON.
    #[prost(string, tag = "4")]
    pub vm_config: String,
}

/// `SignCert` response.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct SignCertResponse {
    /// PEM certificates: leaf, app CA, root CA.
    #[prost(string, repeated, tag = "1")]
    pub certificate_chain: Vec<String>,
}

/// Error body for protobuf callers.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProtoError {
    /// The message.
    #[prost(string, tag = "1")]
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn json_bytes_are_hex_out_and_hex_or_base64_in() {
        let r = AppId {
            app_id: vec![0xab; 20],
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, format!("{{\"app_id\":\"{}\"}}", "ab".repeat(20)));
        let back: AppId =
            serde_json::from_str(&format!("{{\"app_id\":\"0x{}\"}}", "ab".repeat(20))).unwrap();
        assert_eq!(back, r);
        let b64: AppId =
            serde_json::from_str("{\"app_id\":\"q6urq6urq6urq6urq6urq6urq6s=\"}").unwrap();
        assert_eq!(b64, r);
        assert!(serde_json::from_str::<AppId>("{\"app_id\":\"not bytes!\"}").is_err());
    }

    #[test]
    fn protobuf_field_numbers_match_the_proto() {
        // GetAppKeyRequest{api_version=1 (varint), vm_config=2 (string)}
        let bytes = GetAppKeyRequest {
            api_version: 1,
            vm_config: "{}".into(),
        }
        .encode_to_vec();
        assert_eq!(bytes, vec![0x08, 0x01, 0x12, 0x02, b'{', b'}']);
        let meta = GetMetaResponse {
            chain_id: Some(5),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(meta, vec![0x40, 0x05], "chain_id is field 8, optional");
        let sign = SignCertRequest {
            api_version: 2,
            csr: vec![0xc5],
            signature: vec![0x5e],
            vm_config: "{}".into(),
        }
        .encode_to_vec();
        assert_eq!(
            sign,
            vec![
                0x08, 0x02, 0x12, 0x01, 0xc5, 0x1a, 0x01, 0x5e, 0x22, 0x02, b'{', b'}'
            ]
        );
        let chain = SignCertResponse {
            certificate_chain: vec!["a".into(), "b".into()],
        }
        .encode_to_vec();
        assert_eq!(chain, vec![0x0a, 0x01, b'a', 0x0a, 0x01, b'b']);
    }
}

//! A dstack guest, simulated with the test attestation PKI: what `kms client`, `loadgen` and the
//! demo use to talk to a KMS exactly as a CVM does.
//!
//! Flow: `GetTempCaCert` (no client certificate) → a fresh P-256 key and an RA-TLS certificate
//! under the temp CA carrying a test-PKI TDX attestation that binds the key → mutual TLS →
//! `GetAppKey`. The server certificate must chain to the KMS root CA (given, or learnt from the
//! first answer) and carry the usage `kms:rpc`. `SignCert` needs no client certificate: the
//! guest signs a CSR for a fresh key whose attestation binds that key ([`guest_csr`]).

use std::time::Duration;

use sha2::{Digest as _, Sha256};

use p256::pkcs8::DecodePrivateKey as _;

use super::testpki::{GuestSpec, TestPki, TestTcb};
use crate::attestation::ratls::{CertBuilder, report_data_for_spki};
use crate::attestation::versioned::{self, Platform};
use crate::kms::proto;
use crate::kms::signcert::{CONFIRM, CertConfig, Csr, CsrEvidence, CsrVersion};

/// Why the guest could not get its keys.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Transport failure (connect, TLS, timeout).
    #[error("cannot reach the KMS at {url}: {reason}")]
    Transport {
        /// The KMS URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The KMS answered with an error.
    #[error("KMS refused ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The KMS's error message.
        message: String,
    },
    /// The server certificate is not a KMS RPC certificate.
    #[error("the server certificate is not a KMS RPC certificate: {0}")]
    NotKms(String),
    /// Local failure (test PKI, certificate building).
    #[error("{0}")]
    Local(String),
}

/// The OS image simulated guests claim to run.
pub const SIMULATED_OS_IMAGE_HASH: [u8; 32] = [0x5e; 32];
const SIMULATED_MRTD: [u8; 48] = [0x7d; 48];
const SIMULATED_RTMR0_2: [[u8; 48]; 3] = [[0x70; 48], [0x71; 48], [0x72; 48]];

/// The `kms.os_images` entry that admits simulated guests' OS image (or, under another `hash`, an
/// image with the same measurements).
pub fn simulated_os_image_as(hash: &[u8; 32]) -> crate::kms::osimage::OsImage {
    crate::kms::osimage::OsImage::new(hash, &SIMULATED_MRTD, &SIMULATED_RTMR0_2)
}

/// The `kms.os_images` entry that admits simulated guests' OS image.
pub fn simulated_os_image() -> crate::kms::osimage::OsImage {
    simulated_os_image_as(&SIMULATED_OS_IMAGE_HASH)
}

/// The vm_config a host passes for a simulated guest.
pub fn simulated_vm_config() -> String {
    serde_json::json!({ "os_image_hash": hex::encode(SIMULATED_OS_IMAGE_HASH) }).to_string()
}

/// The identity of a simulated guest, from the command line.
pub fn guest_spec(app_id: [u8; 20], compose: &[u8], instance_id: Vec<u8>) -> GuestSpec {
    GuestSpec {
        app_id,
        compose_hash: Sha256::digest(compose).into(),
        instance_id,
        key_provider: br#"{"name":"kms","id":""}"#.to_vec(),
        mr_td: SIMULATED_MRTD,
        rtmr0_2: SIMULATED_RTMR0_2,
        debug: false,
        tcb: TestTcb::UpToDate,
        ppid: None,
        fmspc: None,
    }
}

/// A guest holding its RA-TLS identity, ready to ask for keys.
#[derive(Debug, Clone)]
pub struct Guest {
    url: String,
    http: reqwest::Client,
    /// Root CA the KMS's certificate chains to (PEM).
    pub ca_pem: String,
}

/// A CSR of format `version` for a fresh P-256 key, carrying a test-PKI attestation for `spec`
/// that binds the key; returns it with the key.
pub fn guest_csr(
    pki: &TestPki,
    spec: &GuestSpec,
    config: CertConfig,
    version: CsrVersion,
) -> Result<(Csr, p256::ecdsa::SigningKey), ClientError> {
    let local = |e: &dyn std::fmt::Display| ClientError::Local(e.to_string());
    let key = CertBuilder::new_key().map_err(|e| local(&e))?;
    let signing =
        p256::ecdsa::SigningKey::from_pkcs8_der(&key.serialize_der()).map_err(|e| local(&e))?;
    let pubkey = rcgen::PublicKeyData::subject_public_key_info(&key);
    let attestation = pki
        .dstack_attestation(spec, &report_data_for_spki(&pubkey))
        .map_err(|e| local(&e))?;
    let evidence = match version {
        CsrVersion::V2 => CsrEvidence::Attestation(attestation),
        CsrVersion::V1 => match versioned::parse(&attestation)
            .map_err(|e| local(&e))?
            .platform
        {
            Platform::Tdx { quote, event_log } => CsrEvidence::Quote {
                quote,
                event_log: serde_json::to_vec(&event_log).map_err(|e| local(&e))?,
            },
            Platform::NitroEnclave { .. } => {
                return Err(ClientError::Local("the test PKI issues TDX quotes".into()));
            }
        },
    };
    let csr = Csr {
        confirm: CONFIRM.into(),
        pubkey,
        config,
        evidence,
    };
    Ok((csr, signing))
}

fn transport(url: &str) -> impl Fn(reqwest::Error) -> ClientError + '_ {
    move |e| ClientError::Transport {
        url: url.to_owned(),
        reason: flatten_error(&e),
    }
}

fn flatten_error(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

async fn post_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
    method: &str,
    body: &serde_json::Value,
) -> Result<T, ClientError> {
    let resp = http
        .post(format!("{url}/prpc/KMS.{method}?json"))
        .json(body)
        .send()
        .await
        .map_err(transport(url))?;
    decode(url, resp).await
}

/// The body of a 200 answer, or the KMS's refusal.
async fn decode<T: serde::de::DeserializeOwned>(
    url: &str,
    resp: reqwest::Response,
) -> Result<T, ClientError> {
    let status = resp.status().as_u16();
    if status != 200 {
        let message = resp
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "no error message".into());
        return Err(ClientError::Refused { status, message });
    }
    resp.json().await.map_err(transport(url))
}

fn client_builder(timeout: Duration, fresh_connections: bool) -> reqwest::ClientBuilder {
    crate::tls::ensure_crypto_provider();
    let b = reqwest::Client::builder().timeout(timeout).tls_info(true);
    if fresh_connections {
        b.pool_max_idle_per_host(0)
    } else {
        b
    }
}

impl Guest {
    /// Obtains the temp CA (trusting `ca_pem` if given, else the CA the KMS names — trust on
    /// first use) and builds an RA-TLS identity for `spec` from `pki`.
    pub async fn enroll(
        url: &str,
        ca_pem: Option<String>,
        pki: &TestPki,
        spec: &GuestSpec,
        fresh_connections: bool,
    ) -> Result<Self, ClientError> {
        let url = url.trim_end_matches('/').to_owned();
        let timeout = Duration::from_secs(30);
        let local = |e: &dyn std::fmt::Display| ClientError::Local(e.to_string());
        let first = match &ca_pem {
            Some(pem) => client_builder(timeout, false).add_root_certificate(
                reqwest::Certificate::from_pem(pem.as_bytes()).map_err(|e| local(&e))?,
            ),
            // The temp CA authenticates nobody; what it returns is checked below.
            None => client_builder(timeout, false).danger_accept_invalid_certs(true),
        }
        .build()
        .map_err(|e| local(&e))?;
        let temp: proto::GetTempCaCertResponse =
            post_json(&first, &url, "GetTempCaCert", &serde_json::json!({})).await?;
        let ca_pem = ca_pem.unwrap_or(temp.ca_cert);
        let temp_ca_der = pem::parse(&temp.temp_ca_cert)
            .map_err(|e| local(&e))?
            .into_contents();
        let temp_ca_key = rcgen::KeyPair::from_pem(&temp.temp_ca_key).map_err(|e| local(&e))?;
        let cert = pki
            .guest_cert(spec, Some((&temp_ca_der, &temp_ca_key)))
            .map_err(|e| local(&e))?;
        let identity =
            reqwest::Identity::from_pem(format!("{}{}", cert.cert_pem, cert.key_pem).as_bytes())
                .map_err(|e| local(&e))?;
        let http = client_builder(timeout, fresh_connections)
            .add_root_certificate(
                reqwest::Certificate::from_pem(ca_pem.as_bytes()).map_err(|e| local(&e))?,
            )
            .identity(identity)
            .build()
            .map_err(|e| local(&e))?;
        Ok(Self { url, http, ca_pem })
    }

    /// `SignCert` for a fresh key attested for `spec` (CSR format `version`); returns the
    /// certificate chain (PEM): leaf, app CA, root CA.
    pub async fn sign_cert(
        &self,
        pki: &TestPki,
        spec: &GuestSpec,
        config: CertConfig,
        version: CsrVersion,
        vm_config: &str,
    ) -> Result<Vec<String>, ClientError> {
        let (csr, key) = guest_csr(pki, spec, config, version)?;
        let (csr, signature) = csr.signed_by(&key);
        let request = proto::SignCertRequest {
            api_version: version.api(),
            csr,
            signature,
            vm_config: vm_config.to_owned(),
        };
        let body = serde_json::to_value(&request).map_err(|e| ClientError::Local(e.to_string()))?;
        let resp: proto::SignCertResponse =
            post_json(&self.http, &self.url, "SignCert", &body).await?;
        Ok(resp.certificate_chain)
    }

    /// `GetAppKey` over mutual TLS; checks the server certificate is for `kms:rpc`.
    pub async fn get_app_key(&self, vm_config: &str) -> Result<proto::AppKeyResponse, ClientError> {
        let resp = self
            .http
            .post(format!("{}/prpc/KMS.GetAppKey?json", self.url))
            .json(&serde_json::json!({ "api_version": 1, "vm_config": vm_config }))
            .send()
            .await
            .map_err(transport(&self.url))?;
        let server_cert = resp
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|t| t.peer_certificate())
            .map(<[u8]>::to_vec)
            .ok_or_else(|| ClientError::NotKms("no server certificate".into()))?;
        let usage = crate::attestation::ratls::parse_cert(&server_cert)
            .map_err(|e| ClientError::NotKms(e.to_string()))?
            .usage;
        if usage.as_deref() != Some("kms:rpc") {
            return Err(ClientError::NotKms(format!("usage is {usage:?}")));
        }
        decode(&self.url, resp).await
    }
}

//! `keywarden kms onboard --from URL --ca FILE`: a new replica fetches the root keys from a
//! running KMS (keywarden, or upstream dstack's) the way upstream replicas onboard.
//!
//! Flow: over TLS trusting only the source's root CA (`--ca`), `GetMeta` (its root CA, which must
//! be that CA, and its k256 public key) → `GetTempCaCert` → a fresh P-256 key whose SPKI our
//! [`AttestationSource`] attests (the dstack guest agent, or a test PKI) → an RA-TLS client
//! certificate under the temp CA → `GetKmsKey` over mutual TLS with our vm_config (the source
//! must have `kms.allow_kms_replication` on and admit our boot through `isKmsAllowed`) → the
//! keys checked against what `GetMeta` said → [`super::root::install_received`]: stored like
//! locally created keys, never over other keys.

use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use super::config::KmsConfig;
use super::proto;
use super::root::{Installed, Received, RootKeyError};
use super::selfcheck::{AttestationSource, SelfCheckError};

/// How long each call to the source may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Why onboarding failed.
#[derive(Debug, thiserror::Error)]
pub enum OnboardError {
    /// The source's root CA file is unusable.
    #[error("--ca {path}: {reason}")]
    Ca {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// No answer from the source.
    #[error("{method}: the source did not answer: {0}", method = .1)]
    Unreachable(String, &'static str),
    /// The source refused (replication off, our boot not admitted, ...).
    #[error("{method}: the source refused (HTTP {status}): {message}")]
    Refused {
        /// The method.
        method: &'static str,
        /// Its status.
        status: u16,
        /// Its error message.
        message: String,
    },
    /// The source's answers do not agree with each other or with `--ca`.
    #[error("the source is not the KMS expected: {0}")]
    Mismatch(String),
    /// Our own attestation failed.
    #[error(transparent)]
    Attestation(#[from] SelfCheckError),
    /// The keys could not be stored.
    #[error(transparent)]
    Keys(#[from] RootKeyError),
}

impl OnboardError {
    /// The exit code: 2 for what the operator gave or must change here, 1 for the source.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Ca { .. } | Self::Keys(RootKeyError::Different { .. }) => 2,
            _ => 1,
        }
    }
}

fn same_pem(a: &str, b: &str) -> bool {
    let der = |t: &str| pem::parse(t).map(pem::Pem::into_contents).ok();
    der(a).is_some() && der(a) == der(b)
}

/// `POST {url}/prpc/KMS.{method}?json` with `body`, the answer as `T`.
async fn call<T: DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
    method: &'static str,
    body: &serde_json::Value,
) -> Result<T, OnboardError> {
    let unreachable = |e: reqwest::Error| OnboardError::Unreachable(e.to_string(), method);
    let resp = http
        .post(format!("{url}/prpc/KMS.{method}?json"))
        .json(body)
        .send()
        .await
        .map_err(unreachable)?;
    let status = resp.status().as_u16();
    let text = resp.text().await.map_err(unreachable)?;
    if status != 200 {
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| text.chars().take(200).collect());
        return Err(OnboardError::Refused {
            method,
            status,
            message,
        });
    }
    serde_json::from_str(&text).map_err(|e| {
        OnboardError::Mismatch(format!(
            "{method} answered something that does not parse: {e}"
        ))
    })
}

/// Onboards the KMS whose data directory is `data_dir` from the KMS at `url`, whose root CA is
/// `ca_file`, attesting with `source`.
pub async fn onboard(
    url: &str,
    ca_file: &Path,
    source: &dyn AttestationSource,
    data_dir: &Path,
    cfg: &KmsConfig,
) -> Result<Installed, OnboardError> {
    crate::tls::ensure_crypto_provider();
    let url = url.trim_end_matches('/');
    let bad_ca = |reason: String| OnboardError::Ca {
        path: ca_file.display().to_string(),
        reason,
    };
    let ca_pem = std::fs::read_to_string(ca_file).map_err(|e| bad_ca(e.to_string()))?;
    let ca =
        reqwest::Certificate::from_pem(ca_pem.as_bytes()).map_err(|e| bad_ca(e.to_string()))?;
    let client = |identity: Option<reqwest::Identity>| {
        let mut b = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .tls_certs_only([ca.clone()]);
        if let Some(id) = identity {
            b = b.identity(id);
        }
        b.build()
            .map_err(|e| OnboardError::Unreachable(e.to_string(), "TLS setup"))
    };
    let plain = client(None)?;
    let empty = serde_json::json!({});
    let meta: proto::GetMetaResponse = call(&plain, url, "GetMeta", &empty).await?;
    if !same_pem(&meta.ca_cert, &ca_pem) {
        return Err(OnboardError::Mismatch(
            "its GetMeta names another root CA than --ca".into(),
        ));
    }
    let temp: proto::GetTempCaCertResponse = call(&plain, url, "GetTempCaCert", &empty).await?;

    // Our RA-TLS identity: a fresh key, attested, certified by the source's temp CA.
    let local = |e: &dyn std::fmt::Display| OnboardError::Mismatch(format!("its temp CA: {e}"));
    let temp_der = pem::parse(&temp.temp_ca_cert)
        .map_err(|e| local(&e))?
        .into_contents();
    let temp_key = rcgen::KeyPair::from_pem(&temp.temp_ca_key).map_err(|e| local(&e))?;
    let key = crate::attestation::ratls::CertBuilder::new_key().map_err(SelfCheckError::Source)?;
    let report_data = crate::attestation::ratls::report_data_for_spki(
        &rcgen::PublicKeyData::subject_public_key_info(&key),
    );
    let attestation = source.attest(&report_data).await?;
    let cert = crate::attestation::ratls::CertBuilder::new("keywarden KMS replica")
        .attestation(&attestation)
        .signed_by(&key, &temp_der, &temp_key)
        .map_err(SelfCheckError::Source)?;
    let identity = Zeroizing::new(format!("{}{}", cert.cert_pem, cert.key_pem));
    let identity = reqwest::Identity::from_pem(identity.as_bytes())
        .map_err(|e| OnboardError::Unreachable(e.to_string(), "TLS setup"))?;
    let keys: proto::KmsKeyResponse = call(
        &client(Some(identity))?,
        url,
        "GetKmsKey",
        &serde_json::json!({"vm_config": source.vm_config()}),
    )
    .await?;
    let root = keys
        .keys
        .into_iter()
        .next()
        .ok_or_else(|| OnboardError::Mismatch("GetKmsKey gave no keys".into()))?;
    let k256 = Zeroizing::new(root.k256_key);
    let k256_pub = k256::ecdsa::SigningKey::from_slice(&k256)
        .map(|k| k.verifying_key().to_encoded_point(true).as_bytes().to_vec())
        .map_err(|e| OnboardError::Mismatch(format!("GetKmsKey's k256 key: {e}")))?;
    if k256_pub != meta.k256_pubkey {
        return Err(OnboardError::Mismatch(
            "GetKmsKey's k256 key is not the one GetMeta publishes".into(),
        ));
    }
    Ok(super::root::install_received(
        data_dir,
        cfg,
        &Received {
            root_ca_pem: meta.ca_cert,
            root_ca_key_pem: Zeroizing::new(root.ca_key),
            k256,
            tmp_ca_pem: temp.temp_ca_cert,
            tmp_ca_key_pem: Zeroizing::new(keys.temp_ca_key),
        },
    )?)
}

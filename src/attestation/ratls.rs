//! RA-TLS certificates (OID arc 1.3.6.1.4.1.62397.1): reading the attestation extensions,
//! checking the report-data binding to the certificate key, and producing such certificates.

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    PublicKeyData,
};
use sha2::{Digest, Sha512};

use super::eventlog::parse_json_event_log;
use super::reason::{Result, check_size, reject};
use super::versioned::{self, Attestation};

/// OID arc of dstack's RA-TLS extensions.
pub const OID_ARC: [u64; 9] = [1, 3, 6, 1, 4, 1, 62397, 1, 0];
/// `.1`: TDX quote (legacy).
pub const EXT_TDX_QUOTE: u64 = 1;
/// `.2`: event log (legacy, JSON, optional `ELGZv1` gzip).
pub const EXT_EVENT_LOG: u64 = 2;
/// `.3`: app id.
pub const EXT_APP_ID: u64 = 3;
/// `.4`: special usage (`kms:rpc`, `app:ca`...).
pub const EXT_USAGE: u64 = 4;
/// `.8`: `VersionedAttestation`.
pub const EXT_ATTESTATION: u64 = 8;
/// `.9`: app info (msgpack).
pub const EXT_APP_INFO: u64 = 9;
/// Largest certificate accepted.
pub const MAX_CERT_LEN: usize = 64 * 1024;

/// The report data that binds a certificate's key: `sha512("ratls-cert:" ‖ SPKI DER)`.
pub fn report_data_for_spki(spki_der: &[u8]) -> [u8; 64] {
    let mut h = Sha512::new();
    h.update(b"ratls-cert:");
    h.update(spki_der);
    h.finalize().into()
}

/// A parsed RA-TLS certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaTlsCert {
    /// SubjectPublicKeyInfo DER of the certificate key.
    pub spki_der: Vec<u8>,
    /// Validity window (unix seconds).
    pub not_before: i64,
    /// Validity window end (unix seconds).
    pub not_after: i64,
    /// `.1` legacy quote.
    pub quote: Option<Vec<u8>>,
    /// `.2` legacy event log (raw, maybe `ELGZv1`).
    pub event_log: Option<Vec<u8>>,
    /// `.3` app id.
    pub app_id: Option<Vec<u8>>,
    /// `.4` usage string.
    pub usage: Option<String>,
    /// `.8` attestation bytes.
    pub attestation: Option<Vec<u8>>,
    /// `.9` app info.
    pub app_info: Option<Vec<u8>>,
}

impl RaTlsCert {
    /// The attestation: `.8` if present, else the legacy `.1` quote with the `.2` event log.
    pub fn attestation(&self) -> Result<Attestation> {
        if let Some(att) = &self.attestation {
            return versioned::parse(att);
        }
        let quote = self
            .quote
            .clone()
            .ok_or_else(|| reject!(CertNoAttestation, "no attestation extension"))?;
        let event_log = match &self.event_log {
            Some(raw) => parse_json_event_log(raw)?,
            None => Vec::new(),
        };
        Ok(Attestation::legacy_tdx(quote, event_log))
    }

    /// The report data this certificate's key requires.
    pub fn expected_report_data(&self) -> [u8; 64] {
        report_data_for_spki(&self.spki_der)
    }

    /// Refuses the certificate outside its validity window at `now` (unix seconds).
    pub fn check_valid_at(&self, now: u64) -> Result<()> {
        let t = i64::try_from(now).unwrap_or(i64::MAX);
        if t < self.not_before || t > self.not_after {
            return Err(reject!(CertExpired, "certificate not valid at {now}"));
        }
        Ok(())
    }
}

/// Decodes a PEM or DER certificate into DER.
pub fn cert_der_from_input(input: &[u8]) -> Result<Vec<u8>> {
    check_size("certificate", input, MAX_CERT_LEN)?;
    if input.starts_with(b"-----BEGIN") {
        let (_, pem) = x509_parser::pem::parse_x509_pem(input)
            .map_err(|e| reject!(CertMalformed, "PEM: {e}"))?;
        Ok(pem.contents)
    } else {
        Ok(input.to_vec())
    }
}

/// Parses a DER certificate and reads its RA-TLS extensions.
pub fn parse_cert(der: &[u8]) -> Result<RaTlsCert> {
    check_size("certificate", der, MAX_CERT_LEN)?;
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| reject!(CertMalformed, "X.509: {e}"))?;
    if !rest.is_empty() {
        return Err(reject!(CertMalformed, "trailing bytes after certificate"));
    }
    let mut out = RaTlsCert {
        spki_der: cert.public_key().raw.to_vec(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        ..RaTlsCert::default()
    };
    let prefix = &OID_ARC[..8];
    for ext in cert.extensions() {
        let Some(arcs) = ext.oid.iter() else { continue };
        let arcs: Vec<u64> = arcs.collect();
        if arcs.len() != 9 || arcs[..8] != *prefix {
            continue;
        }
        let content = unwrap_octet_string(ext.value)?;
        match arcs[8] {
            EXT_TDX_QUOTE => out.quote = Some(content),
            EXT_EVENT_LOG => out.event_log = Some(content),
            EXT_APP_ID => out.app_id = Some(content),
            EXT_USAGE => {
                out.usage = Some(
                    String::from_utf8(content)
                        .map_err(|_| reject!(CertMalformed, "usage is not UTF-8"))?,
                )
            }
            EXT_ATTESTATION => out.attestation = Some(content),
            EXT_APP_INFO => out.app_info = Some(content),
            _ => {}
        }
    }
    Ok(out)
}

/// Strips the DER OCTET STRING wrapping of an extension value.
fn unwrap_octet_string(v: &[u8]) -> Result<Vec<u8>> {
    let bad = || reject!(CertMalformed, "extension value is not an OCTET STRING");
    let (&tag, rest) = v.split_first().ok_or_else(bad)?;
    let (&l0, rest) = rest.split_first().ok_or_else(bad)?;
    if tag != 0x04 {
        return Err(bad());
    }
    let (len, body) = if l0 < 0x80 {
        (usize::from(l0), rest)
    } else {
        let n = usize::from(l0 & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err(bad());
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |a, b| (a << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if body.len() != len {
        return Err(bad());
    }
    Ok(body.to_vec())
}

/// DER tag-length-value with a definite length (short or long form).
pub(crate) fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(content);
    out
}

fn octet_string(content: &[u8]) -> Vec<u8> {
    der_tlv(0x04, content)
}

/// A generated certificate with its key.
#[derive(Debug)]
pub struct GeneratedCert {
    /// Certificate DER.
    pub cert_der: Vec<u8>,
    /// Certificate PEM.
    pub cert_pem: String,
    /// Private key, PKCS#8 PEM.
    pub key_pem: String,
}

/// Builds RA-TLS certificates (P-256, ECDSA-SHA256) carrying the 62397 extensions.
#[derive(Debug, Clone, Default)]
pub struct CertBuilder {
    subject: String,
    org: Option<String>,
    alt_names: Vec<String>,
    usage: Option<String>,
    app_id: Option<Vec<u8>>,
    app_info: Option<Vec<u8>>,
    attestation: Option<Vec<u8>>,
    legacy_quote: Option<Vec<u8>>,
    legacy_event_log: Option<Vec<u8>>,
    ca_path_len: Option<u8>,
    tls_usages: Option<(bool, bool)>,
    validity: Option<(i64, i64)>,
}

impl CertBuilder {
    /// A certificate with common name `subject`.
    pub fn new(subject: &str) -> Self {
        Self {
            subject: subject.to_owned(),
            ..Self::default()
        }
    }

    /// DNS subject alternative names.
    pub fn alt_names(mut self, names: &[&str]) -> Self {
        self.alt_names = names.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// The subject's organization name (O, before the CN).
    pub fn org(mut self, org: &str) -> Self {
        self.org = Some(org.to_owned());
        self
    }

    /// A leaf for TLS: key usage digitalSignature, extended key usages serverAuth and/or
    /// clientAuth as asked.
    pub fn tls_usages(mut self, server_auth: bool, client_auth: bool) -> Self {
        self.tls_usages = Some((server_auth, client_auth));
        self
    }

    /// The `.9` app info (msgpack).
    pub fn app_info(mut self, app_info: &[u8]) -> Self {
        self.app_info = Some(app_info.to_vec());
        self
    }

    /// The `.4` usage (`kms:rpc` for the KMS server certificate).
    pub fn usage(mut self, usage: &str) -> Self {
        self.usage = Some(usage.to_owned());
        self
    }

    /// The `.3` app id.
    pub fn app_id(mut self, app_id: &[u8]) -> Self {
        self.app_id = Some(app_id.to_vec());
        self
    }

    /// The `.8` attestation (`VersionedAttestation` bytes).
    pub fn attestation(mut self, attestation: &[u8]) -> Self {
        self.attestation = Some(attestation.to_vec());
        self
    }

    /// The legacy `.1` quote (older guests; prefer [`CertBuilder::attestation`]).
    pub fn legacy_quote(mut self, quote: &[u8]) -> Self {
        self.legacy_quote = Some(quote.to_vec());
        self
    }

    /// The legacy `.2` event log (JSON, optionally `ELGZv1`-compressed).
    pub fn legacy_event_log(mut self, event_log: &[u8]) -> Self {
        self.legacy_event_log = Some(event_log.to_vec());
        self
    }

    /// Makes a CA certificate that may have one CA below it (path length 1).
    pub fn ca(self) -> Self {
        self.ca_with_path_len(1)
    }

    /// Makes a CA certificate with path length `path_len` (0: it signs only leaves).
    pub fn ca_with_path_len(mut self, path_len: u8) -> Self {
        self.ca_path_len = Some(path_len);
        self
    }

    /// Validity window in unix seconds.
    pub fn validity(mut self, not_before: i64, not_after: i64) -> Self {
        self.validity = Some((not_before, not_after));
        self
    }

    /// A fresh P-256 key, whose SPKI the attestation must bind (see [`report_data_for_spki`]).
    pub fn new_key() -> Result<KeyPair> {
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| reject!(ConfigInvalid, "key generation: {e}"))
    }

    fn params(&self) -> Result<CertificateParams> {
        let err = |e: rcgen::Error| reject!(ConfigInvalid, "certificate parameters: {e}");
        let mut p = CertificateParams::new(self.alt_names.clone()).map_err(err)?;
        let mut dn = DistinguishedName::new();
        if let Some(org) = &self.org {
            dn.push(DnType::OrganizationName, org.clone());
        }
        dn.push(DnType::CommonName, self.subject.clone());
        p.distinguished_name = dn;
        if let Some(path_len) = self.ca_path_len {
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        }
        if let Some((server, client)) = self.tls_usages {
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            if server {
                p.extended_key_usages
                    .push(ExtendedKeyUsagePurpose::ServerAuth);
            }
            if client {
                p.extended_key_usages
                    .push(ExtendedKeyUsagePurpose::ClientAuth);
            }
        }
        if let Some((nb, na)) = self.validity {
            let ts = |t: i64| {
                time::OffsetDateTime::from_unix_timestamp(t)
                    .map_err(|e| reject!(ConfigInvalid, "validity: {e}"))
            };
            p.not_before = ts(nb)?;
            p.not_after = ts(na)?;
        }
        let mut push = |arc: u64, content: &[u8]| {
            let mut oid = OID_ARC;
            oid[8] = arc;
            let mut ext = CustomExtension::from_oid_content(&oid, octet_string(content));
            ext.set_criticality(false);
            p.custom_extensions.push(ext);
        };
        if let Some(v) = &self.legacy_quote {
            push(EXT_TDX_QUOTE, v);
        }
        if let Some(v) = &self.legacy_event_log {
            push(EXT_EVENT_LOG, v);
        }
        if let Some(v) = &self.app_id {
            push(EXT_APP_ID, v);
        }
        if let Some(v) = &self.usage {
            push(EXT_USAGE, v.as_bytes());
        }
        if let Some(v) = &self.attestation {
            push(EXT_ATTESTATION, v);
        }
        if let Some(v) = &self.app_info {
            push(EXT_APP_INFO, v);
        }
        Ok(p)
    }

    /// Self-signs with `key`.
    pub fn self_signed(&self, key: &KeyPair) -> Result<GeneratedCert> {
        let cert = self
            .params()?
            .self_signed(key)
            .map_err(|e| reject!(ConfigInvalid, "signing: {e}"))?;
        Ok(finish(cert, key))
    }

    /// Signs `key`'s certificate with the CA (`ca_cert_der`, `ca_key`).
    pub fn signed_by(
        &self,
        key: &KeyPair,
        ca_cert_der: &[u8],
        ca_key: &KeyPair,
    ) -> Result<GeneratedCert> {
        let cert = self.sign_public(key, ca_cert_der, ca_key)?;
        Ok(finish(cert, key))
    }

    /// Signs a certificate for a public key only (SubjectPublicKeyInfo DER), whose private key
    /// stays with its owner; returns the certificate (DER, PEM).
    pub fn signed_for_spki(
        &self,
        spki_der: &[u8],
        ca_cert_der: &[u8],
        ca_key: &KeyPair,
    ) -> Result<(Vec<u8>, String)> {
        let spki = rcgen::SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| reject!(ConfigInvalid, "public key: {e}"))?;
        let cert = self.sign_public(&spki, ca_cert_der, ca_key)?;
        Ok((cert.der().to_vec(), cert.pem()))
    }

    fn sign_public(
        &self,
        key: &impl PublicKeyData,
        ca_cert_der: &[u8],
        ca_key: &KeyPair,
    ) -> Result<rcgen::Certificate> {
        let issuer = Issuer::from_ca_cert_der(&ca_cert_der.into(), ca_key)
            .map_err(|e| reject!(ConfigInvalid, "CA certificate: {e}"))?;
        self.params()?
            .signed_by(key, &issuer)
            .map_err(|e| reject!(ConfigInvalid, "signing: {e}"))
    }
}

fn finish(cert: rcgen::Certificate, key: &KeyPair) -> GeneratedCert {
    GeneratedCert {
        cert_der: cert.der().to_vec(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_roundtrip() {
        let key = CertBuilder::new_key().unwrap();
        let big = vec![0x5a; 5000];
        let cert = CertBuilder::new("kms")
            .alt_names(&["kms.local"])
            .usage("kms:rpc")
            .app_id(&[7; 20])
            .attestation(&big)
            .self_signed(&key)
            .unwrap();
        let parsed = parse_cert(&cert.cert_der).unwrap();
        assert_eq!(parsed.usage.as_deref(), Some("kms:rpc"));
        assert_eq!(parsed.app_id, Some(vec![7; 20]));
        assert_eq!(parsed.attestation, Some(big));
        assert_eq!(parsed.spki_der, key.subject_public_key_info());
        let pem_parsed =
            parse_cert(&cert_der_from_input(cert.cert_pem.as_bytes()).unwrap()).unwrap();
        assert_eq!(pem_parsed, parsed);
    }

    #[test]
    fn octet_string_forms() {
        for n in [0usize, 1, 127, 128, 255, 256, 70_000] {
            let v = vec![1u8; n];
            assert_eq!(unwrap_octet_string(&octet_string(&v)).unwrap(), v);
        }
        assert!(unwrap_octet_string(&[0x04, 0x05, 1]).is_err());
    }
}

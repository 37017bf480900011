//! Root key material: created once at first start, persisted under `<data_dir>/kms/`, loaded on
//! every later start.
//!
//! Files (mode 0600, directory 0700): `root-ca.key` / `root-ca.pem` (P-256 root CA, "Dstack KMS
//! CA", path length 1), `root-k256.key` (32 raw bytes), `tmp-ca.key` / `tmp-ca.pem` ("Dstack Client
//! Temp CA", whose key is handed to anyone: it authenticates nobody, only the attestation inside a
//! client certificate does), `rpc.key` / `rpc.pem` (the RPC server certificate, usage `kms:rpc`,
//! signed by the root CA). With a key-encryption secret configured, every `.key` file is sealed
//! with AES-256-GCM under a key derived from it. Bootstrap writes into a temporary directory and
//! renames it into place, so a crash never leaves half a key set.

use std::path::{Path, PathBuf};

use k256::ecdsa::SigningKey as K256SigningKey;
use p256::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use zeroize::Zeroizing;

use super::config::KmsConfig;
use super::keys::RootKeys;
use crate::attestation::ratls::CertBuilder;

/// Magic prefix of a sealed key file.
const SEALED_MAGIC: &[u8] = b"KWSEAL1\0";
const ROOT_CA_KEY: &str = "root-ca.key";
const ROOT_CA_CERT: &str = "root-ca.pem";
const ROOT_K256_KEY: &str = "root-k256.key";
const TMP_CA_KEY: &str = "tmp-ca.key";
const TMP_CA_CERT: &str = "tmp-ca.pem";
const RPC_KEY: &str = "rpc.key";
const RPC_CERT: &str = "rpc.pem";
/// sha256 of every key and certificate file as written at creation, to catch a file that was
/// changed but still decodes (a flipped bit in a key silently changes every derived key).
const FINGERPRINTS: &str = "fingerprints.json";
/// Every file of a key set.
const KEY_FILES: [&str; 7] = [
    ROOT_CA_KEY,
    ROOT_CA_CERT,
    ROOT_K256_KEY,
    TMP_CA_KEY,
    TMP_CA_CERT,
    RPC_KEY,
    RPC_CERT,
];

/// Why root key material could not be created or loaded.
#[derive(Debug, thiserror::Error)]
pub enum RootKeyError {
    /// A key file of an existing key set is missing.
    #[error(
        "KMS key file {path} is missing (fix: restore the whole key directory from backup; never regenerate keys that apps depend on)"
    )]
    Missing {
        /// The file.
        path: String,
    },
    /// File system failure.
    #[error(
        "KMS key path {path}: {reason} (fix: make the data directory readable and writable by keywarden)"
    )]
    Io {
        /// The file or directory.
        path: String,
        /// Why.
        reason: String,
    },
    /// A key file does not decode (corrupt, or sealed with another key).
    #[error("KMS key file {path} is unusable: {reason} (fix: {fix})")]
    Corrupt {
        /// The file.
        path: String,
        /// Why.
        reason: String,
        /// What to do.
        fix: &'static str,
    },
    /// The key-encryption secret could not be read.
    #[error(
        "kms.key_encryption_key {reference}: {reason} (fix: point it at a readable file or a set environment variable)"
    )]
    Secret {
        /// The reference.
        reference: String,
        /// Why.
        reason: String,
    },
    /// Key or certificate generation failed.
    #[error("cannot generate KMS key material: {0}")]
    Generate(String),
    /// Onboarding found other root keys in place.
    #[error(
        "{path} already holds other root keys than the source's; refusing to overwrite them (fix: onboard into an empty data directory)"
    )]
    Different {
        /// The key directory.
        path: String,
    },
}

/// The loaded root key material and certificates.
pub struct KmsKeys {
    /// Root CA and k256 keys.
    pub root: RootKeys,
    /// Root CA certificate (PEM).
    pub root_ca_pem: String,
    /// Root CA key as an rcgen key pair (for signing app CAs and leaves).
    pub root_ca_key: KeyPair,
    /// Temp CA certificate (PEM).
    pub tmp_ca_pem: String,
    /// Temp CA key (PKCS#8 PEM), handed out by GetTempCaCert.
    pub tmp_ca_key_pem: Zeroizing<String>,
    /// RPC server certificate (PEM).
    pub rpc_cert_pem: String,
    /// RPC server key (PKCS#8 PEM).
    pub rpc_key_pem: Zeroizing<String>,
    /// True when this start created the keys.
    pub created: bool,
}

impl KmsKeys {
    fn rpc_key(&self) -> Result<KeyPair, RootKeyError> {
        KeyPair::from_pem(&self.rpc_key_pem)
            .map_err(|e| RootKeyError::Generate(format!("RPC key: {e}")))
    }

    /// SubjectPublicKeyInfo DER of the RPC key (what the KMS's own attestation binds).
    pub fn rpc_spki(&self) -> Result<Vec<u8>, RootKeyError> {
        Ok(rcgen::PublicKeyData::subject_public_key_info(
            &self.rpc_key()?,
        ))
    }

    /// Re-issues the RPC certificate for the same key, for `domains`, carrying `attestation`;
    /// kept in memory only, since an attestation belongs to one boot. Returns the new DER.
    pub fn reissue_rpc_cert(
        &mut self,
        domains: &[String],
        attestation: &[u8],
    ) -> Result<Vec<u8>, RootKeyError> {
        let root_der = pem::parse(&self.root_ca_pem)
            .map_err(|e| RootKeyError::Generate(format!("root CA certificate: {e}")))?
            .into_contents();
        let cert = rpc_cert(
            domains,
            &self.rpc_key()?,
            &root_der,
            &self.root_ca_key,
            Some(attestation),
        )?;
        self.rpc_cert_pem = cert.cert_pem;
        Ok(cert.cert_der)
    }
}

/// The RPC server certificate of `rpc_key` (usage `kms:rpc`, for `domains`), signed by the root
/// CA, carrying the KMS's own attestation when it has one.
fn rpc_cert(
    domains: &[String],
    rpc_key: &KeyPair,
    root_der: &[u8],
    root_key: &KeyPair,
    attestation: Option<&[u8]>,
) -> Result<crate::attestation::ratls::GeneratedCert, RootKeyError> {
    let names: Vec<&str> = domains.iter().map(String::as_str).collect();
    let mut builder = CertBuilder::new(names.first().copied().unwrap_or("localhost"))
        .alt_names(&names)
        .usage("kms:rpc");
    if let Some(attestation) = attestation {
        builder = builder.attestation(attestation);
    }
    builder
        .signed_by(rpc_key, root_der, root_key)
        .map_err(|e| RootKeyError::Generate(e.to_string()))
}

impl std::fmt::Debug for KmsKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsKeys")
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

/// Key files live here.
pub fn key_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("kms")
}

/// Loads the key material under `data_dir`, creating it on first use.
pub fn load_or_create(data_dir: &Path, cfg: &KmsConfig) -> Result<KmsKeys, RootKeyError> {
    let dir = key_dir(data_dir);
    let sealer = Sealer::from_config(cfg)?;
    if dir.join(ROOT_CA_KEY).exists() {
        return load(&dir, &sealer);
    }
    let mut keys = install(data_dir, &sealer, &generate(cfg)?)?;
    keys.created = true;
    Ok(keys)
}

/// Writes `files` (secret ones sealed) into a staging directory, checks that they load as a key
/// set, and renames it into place: a crash or a bad set never leaves half a key directory.
fn install(data_dir: &Path, sealer: &Sealer, files: &KeyFiles) -> Result<KmsKeys, RootKeyError> {
    let dir = key_dir(data_dir);
    let staging = data_dir.join(".kms-bootstrap");
    let _ = std::fs::remove_dir_all(&staging);
    create_private_dir(&staging)?;
    let staged = (|| {
        for (name, bytes, secret) in files {
            let content = if *secret {
                sealer.seal(bytes)?
            } else {
                bytes.to_vec()
            };
            write_private(&staging.join(name), &content)?;
        }
        write_fingerprints(&staging)?;
        load(&staging, sealer)
    })();
    if let Err(e) = staged {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    std::fs::rename(&staging, &dir).map_err(io_err(&dir))?;
    load(&dir, sealer)
}

/// Root key material received from another KMS when onboarding (`GetMeta`, `GetTempCaCert`,
/// `GetKmsKey`).
pub struct Received {
    /// The root CA certificate (PEM), as the source serves it.
    pub root_ca_pem: String,
    /// The root CA key (PKCS#8 PEM).
    pub root_ca_key_pem: Zeroizing<String>,
    /// The root k256 key (32 bytes).
    pub k256: Zeroizing<Vec<u8>>,
    /// The temp CA certificate (PEM).
    pub tmp_ca_pem: String,
    /// The temp CA key (PKCS#8 PEM).
    pub tmp_ca_key_pem: Zeroizing<String>,
}

/// What installing received keys did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// The key set was written.
    Created,
    /// The data directory already held these very root keys.
    AlreadyPresent,
}

/// Stores `received` under `data_dir` like locally created keys (0600, sealed when
/// configured), with an RPC certificate of our own for `cfg.domains`. Existing keys are never
/// overwritten: the same root keys are [`Installed::AlreadyPresent`], others an error.
pub fn install_received(
    data_dir: &Path,
    cfg: &KmsConfig,
    received: &Received,
) -> Result<Installed, RootKeyError> {
    let gen_err = |what: &str, e: &dyn std::fmt::Display| {
        RootKeyError::Generate(format!("the received {what}: {e}"))
    };
    let ca = p256::SecretKey::from_pkcs8_pem(&received.root_ca_key_pem)
        .map_err(|e| gen_err("root CA key", &e))?;
    let k256 = K256SigningKey::from_slice(&received.k256).map_err(|e| gen_err("k256 key", &e))?;
    let dir = key_dir(data_dir);
    let sealer = Sealer::from_config(cfg)?;
    if dir.join(ROOT_CA_KEY).exists() {
        let existing = load(&dir, &sealer)?;
        let same = existing.root.ca.to_bytes() == ca.to_bytes()
            && existing.root.k256.to_bytes() == k256.to_bytes();
        return if same {
            Ok(Installed::AlreadyPresent)
        } else {
            Err(RootKeyError::Different {
                path: dir.display().to_string(),
            })
        };
    }
    let ca_der = ca.to_pkcs8_der().map_err(|e| gen_err("root CA key", &e))?;
    let root_ca_kp =
        KeyPair::try_from(ca_der.as_bytes()).map_err(|e| gen_err("root CA key", &e))?;
    let root_der = pem::parse(&received.root_ca_pem)
        .map_err(|e| gen_err("root CA certificate", &e))?
        .into_contents();
    let rpc_kp = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| RootKeyError::Generate(e.to_string()))?;
    let rpc = rpc_cert(&cfg.domains, &rpc_kp, &root_der, &root_ca_kp, None)?;
    let text = |s: &str| Zeroizing::new(s.as_bytes().to_vec());
    let files: KeyFiles = vec![
        (
            ROOT_CA_KEY,
            Zeroizing::new(ca_der.as_bytes().to_vec()),
            true,
        ),
        (ROOT_CA_CERT, text(&received.root_ca_pem), false),
        (
            ROOT_K256_KEY,
            Zeroizing::new(k256.to_bytes().to_vec()),
            true,
        ),
        (TMP_CA_KEY, text(&received.tmp_ca_key_pem), true),
        (TMP_CA_CERT, text(&received.tmp_ca_pem), false),
        (RPC_KEY, text(&rpc_kp.serialize_pem()), true),
        (RPC_CERT, text(&rpc.cert_pem), false),
    ];
    install(data_dir, &sealer, &files)?;
    Ok(Installed::Created)
}

/// Loads existing key material only (for `kms info`); never creates it.
pub fn load_existing(data_dir: &Path, cfg: &KmsConfig) -> Result<KmsKeys, RootKeyError> {
    let dir = key_dir(data_dir);
    if !dir.join(ROOT_CA_KEY).exists() {
        return Err(RootKeyError::Io {
            path: dir.display().to_string(),
            reason: "no KMS keys yet; they are created on the first `keywarden serve`".into(),
        });
    }
    load(&dir, &Sealer::from_config(cfg)?)
}

/// (file name, content, is secret)
type KeyFiles = Vec<(&'static str, Zeroizing<Vec<u8>>, bool)>;

fn generate(cfg: &KmsConfig) -> Result<KeyFiles, RootKeyError> {
    let gen_err = |e: &dyn std::fmt::Display| RootKeyError::Generate(e.to_string());
    let root_ca = random_p256()?;
    let root_ca_der = root_ca.to_pkcs8_der().map_err(|e| gen_err(&e))?;
    let root_ca_kp = KeyPair::try_from(root_ca_der.as_bytes()).map_err(|e| gen_err(&e))?;
    let root_cert = CertBuilder::new("Dstack KMS CA")
        .ca()
        .self_signed(&root_ca_kp)
        .map_err(|e| gen_err(&e))?;

    let k256 = random_k256()?;

    let tmp_kp = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| gen_err(&e))?;
    let tmp_cert = CertBuilder::new("Dstack Client Temp CA")
        .ca()
        .self_signed(&tmp_kp)
        .map_err(|e| gen_err(&e))?;

    let rpc_kp = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| gen_err(&e))?;
    let rpc_cert = rpc_cert(
        &cfg.domains,
        &rpc_kp,
        &root_cert.cert_der,
        &root_ca_kp,
        None,
    )?;

    let pem = |s: String| Zeroizing::new(s.into_bytes());
    Ok(vec![
        (
            ROOT_CA_KEY,
            Zeroizing::new(root_ca_der.as_bytes().to_vec()),
            true,
        ),
        (ROOT_CA_CERT, pem(root_cert.cert_pem), false),
        (
            ROOT_K256_KEY,
            Zeroizing::new(k256.to_bytes().to_vec()),
            true,
        ),
        (TMP_CA_KEY, pem(tmp_kp.serialize_pem()), true),
        (TMP_CA_CERT, pem(tmp_cert.cert_pem), false),
        (RPC_KEY, pem(rpc_kp.serialize_pem()), true),
        (RPC_CERT, pem(rpc_cert.cert_pem), false),
    ])
}

fn fingerprint_map(dir: &Path) -> Result<std::collections::BTreeMap<String, String>, RootKeyError> {
    use sha2::Digest as _;
    KEY_FILES
        .iter()
        .map(|name| {
            let path = dir.join(name);
            let raw = std::fs::read(&path).map_err(read_err(&path))?;
            Ok(((*name).to_owned(), hex::encode(sha2::Sha256::digest(&raw))))
        })
        .collect()
}

fn write_fingerprints(dir: &Path) -> Result<(), RootKeyError> {
    let map = fingerprint_map(dir)?;
    let json = serde_json::to_vec_pretty(&map)
        .map_err(|e| RootKeyError::Generate(format!("fingerprints: {e}")))?;
    write_private(&dir.join(FINGERPRINTS), &json)
}

/// Every key file still has the fingerprint recorded at creation. A key set created before
/// fingerprints existed gets them recorded now (trust on first use, logged).
fn check_fingerprints(dir: &Path) -> Result<(), RootKeyError> {
    let path = dir.join(FINGERPRINTS);
    let recorded = match std::fs::read(&path) {
        Ok(raw) => raw,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write_fingerprints(dir)?;
            tracing::info!(path = %path.display(), "recorded the fingerprints of the existing KMS key files");
            return Ok(());
        }
        Err(e) => return Err(io_err(&path)(e)),
    };
    let recorded: std::collections::BTreeMap<String, String> = serde_json::from_slice(&recorded)
        .map_err(|e| RootKeyError::Corrupt {
            path: path.display().to_string(),
            reason: e.to_string(),
            fix: "restore the key directory from backup",
        })?;
    for (name, now) in fingerprint_map(dir)? {
        if recorded.get(&name) != Some(&now) {
            return Err(RootKeyError::Corrupt {
                path: dir.join(&name).display().to_string(),
                reason: "it differs from the fingerprint recorded when the key set was created"
                    .into(),
                fix: "restore the key directory from backup; never regenerate keys that apps depend on",
            });
        }
    }
    Ok(())
}

/// The key set's certificates belong to their keys and are signed by their issuers (the root CA
/// signs itself and the RPC certificate; the temp CA signs itself).
fn check_certificates(dir: &Path, keys: &KmsKeys) -> Result<(), RootKeyError> {
    let corrupt = |name: &str, reason: String| RootKeyError::Corrupt {
        path: dir.join(name).display().to_string(),
        reason,
        fix: "restore the key directory from backup; never regenerate keys that apps depend on",
    };
    let parse = |name: &str, pem_text: &str| -> Result<Vec<u8>, RootKeyError> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem_text.as_bytes())
            .map_err(|e| corrupt(name, format!("not a PEM certificate: {e}")))?;
        Ok(pem.contents)
    };
    let root_der = parse(ROOT_CA_CERT, &keys.root_ca_pem)?;
    let tmp_der = parse(TMP_CA_CERT, &keys.tmp_ca_pem)?;
    let rpc_der = parse(RPC_CERT, &keys.rpc_cert_pem)?;
    fn cert<'a>(
        der: &'a [u8],
        bad: impl Fn(String) -> RootKeyError,
    ) -> Result<x509_parser::certificate::X509Certificate<'a>, RootKeyError> {
        x509_parser::parse_x509_certificate(der)
            .map(|(_, c)| c)
            .map_err(|e| bad(format!("not a certificate: {e}")))
    }
    let (root, tmp, rpc) = (
        cert(&root_der, |r| corrupt(ROOT_CA_CERT, r))?,
        cert(&tmp_der, |r| corrupt(TMP_CA_CERT, r))?,
        cert(&rpc_der, |r| corrupt(RPC_CERT, r))?,
    );
    let tmp_key =
        KeyPair::from_pem(&keys.tmp_ca_key_pem).map_err(|e| corrupt(TMP_CA_KEY, e.to_string()))?;
    let rpc_key =
        KeyPair::from_pem(&keys.rpc_key_pem).map_err(|e| corrupt(RPC_KEY, e.to_string()))?;
    for (cert_name, c, key_name, key) in [
        (ROOT_CA_CERT, &root, ROOT_CA_KEY, &keys.root_ca_key),
        (TMP_CA_CERT, &tmp, TMP_CA_KEY, &tmp_key),
        (RPC_CERT, &rpc, RPC_KEY, &rpc_key),
    ] {
        if c.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(corrupt(
                cert_name,
                format!("its public key is not the one of {key_name}"),
            ));
        }
    }
    // The root CA signs itself and the RPC certificate; the temp CA is self-signed.
    for (name, c, issuer) in [
        (ROOT_CA_CERT, &root, &root),
        (RPC_CERT, &rpc, &root),
        (TMP_CA_CERT, &tmp, &tmp),
    ] {
        let issuer_key = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            issuer.public_key().subject_public_key.data.as_ref(),
        );
        issuer_key
            .verify(c.tbs_certificate.as_ref(), c.signature_value.data.as_ref())
            .map_err(|_| {
                corrupt(
                    name,
                    "its signature does not verify against its issuer".into(),
                )
            })?;
    }
    Ok(())
}

/// Loads a key set and checks it: every file decodes, the certificates match their keys and
/// issuers, and (last, so a set created before fingerprints is recorded only once it checks out)
/// every file still has its recorded fingerprint.
fn load(dir: &Path, sealer: &Sealer) -> Result<KmsKeys, RootKeyError> {
    let keys = load_files(dir, sealer)?;
    check_certificates(dir, &keys)?;
    check_fingerprints(dir)?;
    Ok(keys)
}

fn load_files(dir: &Path, sealer: &Sealer) -> Result<KmsKeys, RootKeyError> {
    let secret = |name: &str| -> Result<Zeroizing<Vec<u8>>, RootKeyError> {
        let path = dir.join(name);
        let raw = Zeroizing::new(std::fs::read(&path).map_err(read_err(&path))?);
        sealer.open(&path, &raw)
    };
    let public = |name: &str| -> Result<String, RootKeyError> {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(read_err(&path))
    };
    let corrupt = |name: &str, e: &dyn std::fmt::Display| RootKeyError::Corrupt {
        path: dir.join(name).display().to_string(),
        reason: e.to_string(),
        fix: "restore the key directory from backup; never regenerate keys that apps depend on",
    };
    let ca_der = secret(ROOT_CA_KEY)?;
    let ca = p256::SecretKey::from_pkcs8_der(&ca_der).map_err(|e| corrupt(ROOT_CA_KEY, &e))?;
    let root_ca_key = KeyPair::try_from(ca_der.as_slice()).map_err(|e| corrupt(ROOT_CA_KEY, &e))?;
    let k256 = K256SigningKey::from_slice(&secret(ROOT_K256_KEY)?)
        .map_err(|e| corrupt(ROOT_K256_KEY, &e))?;
    let text = |name: &str| -> Result<Zeroizing<String>, RootKeyError> {
        String::from_utf8(secret(name)?.to_vec())
            .map(Zeroizing::new)
            .map_err(|e| corrupt(name, &e))
    };
    Ok(KmsKeys {
        root: RootKeys { ca, k256 },
        root_ca_pem: public(ROOT_CA_CERT)?,
        root_ca_key,
        tmp_ca_pem: public(TMP_CA_CERT)?,
        tmp_ca_key_pem: text(TMP_CA_KEY)?,
        rpc_cert_pem: public(RPC_CERT)?,
        rpc_key_pem: text(RPC_KEY)?,
        created: false,
    })
}

fn random_32() -> Result<Zeroizing<[u8; 32]>, RootKeyError> {
    let mut b = Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut *b).map_err(|e| RootKeyError::Generate(format!("no randomness: {e}")))?;
    Ok(b)
}

fn random_p256() -> Result<p256::SecretKey, RootKeyError> {
    // A uniformly random 32-byte string is a valid scalar except with probability ~2^-32;
    // draw again in that case.
    for _ in 0..16 {
        if let Ok(k) = p256::SecretKey::from_slice(&*random_32()?) {
            return Ok(k);
        }
    }
    Err(RootKeyError::Generate("no valid P-256 scalar drawn".into()))
}

fn random_k256() -> Result<K256SigningKey, RootKeyError> {
    for _ in 0..16 {
        if let Ok(k) = K256SigningKey::from_slice(&*random_32()?) {
            return Ok(k);
        }
    }
    Err(RootKeyError::Generate(
        "no valid secp256k1 scalar drawn".into(),
    ))
}

/// Seals key files at rest when a key-encryption secret is configured.
struct Sealer(Option<LessSafeKey>);

impl Sealer {
    fn from_config(cfg: &KmsConfig) -> Result<Self, RootKeyError> {
        let Some(reference) = &cfg.key_encryption_key else {
            return Ok(Self(None));
        };
        let secret = reference.resolve().map_err(|e| RootKeyError::Secret {
            reference: reference.to_string(),
            reason: e.to_string(),
        })?;
        // Any passphrase-like secret becomes a uniform AES key.
        let kek = super::keys::derive_key(
            secret.expose().as_bytes(),
            &[b"keywarden-key-file-encryption"],
            32,
        )
        .map_err(|e| RootKeyError::Generate(e.to_string()))?;
        let key = UnboundKey::new(&AES_256_GCM, &kek)
            .map_err(|_| RootKeyError::Generate("AES key".into()))?;
        Ok(Self(Some(LessSafeKey::new(key))))
    }

    fn seal(&self, plain: &[u8]) -> Result<Vec<u8>, RootKeyError> {
        let Some(key) = &self.0 else {
            return Ok(plain.to_vec());
        };
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce)
            .map_err(|e| RootKeyError::Generate(format!("no randomness: {e}")))?;
        let mut buf = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(SEALED_MAGIC),
            &mut buf,
        )
        .map_err(|_| RootKeyError::Generate("sealing failed".into()))?;
        Ok([SEALED_MAGIC, &nonce, &buf].concat())
    }

    fn open(&self, path: &Path, raw: &[u8]) -> Result<Zeroizing<Vec<u8>>, RootKeyError> {
        let corrupt = |reason: &str, fix: &'static str| RootKeyError::Corrupt {
            path: path.display().to_string(),
            reason: reason.into(),
            fix,
        };
        let sealed = raw.starts_with(SEALED_MAGIC);
        match (&self.0, sealed) {
            (None, false) => Ok(Zeroizing::new(raw.to_vec())),
            (None, true) => Err(corrupt(
                "the file is encrypted but no kms.key_encryption_key is configured",
                "configure the key-encryption secret it was sealed with",
            )),
            (Some(_), false) => Err(corrupt(
                "the file is not encrypted but kms.key_encryption_key is configured",
                "remove kms.key_encryption_key, or re-seal the key files",
            )),
            (Some(key), true) => {
                let rest = &raw[SEALED_MAGIC.len()..];
                if rest.len() < 12 + 16 {
                    return Err(corrupt(
                        "truncated",
                        "restore the key directory from backup",
                    ));
                }
                let (nonce, ct) = rest.split_at(12);
                let mut nonce_arr = [0u8; 12];
                nonce_arr.copy_from_slice(nonce);
                let mut buf = Zeroizing::new(ct.to_vec());
                let plain_len = key
                    .open_in_place(
                        Nonce::assume_unique_for_key(nonce_arr),
                        Aad::from(SEALED_MAGIC),
                        &mut buf,
                    )
                    .map_err(|_| {
                        corrupt(
                            "decryption failed: wrong key-encryption secret or a modified file",
                            "configure the secret the keys were sealed with",
                        )
                    })?
                    .len();
                buf.truncate(plain_len);
                Ok(buf)
            }
        }
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> RootKeyError + '_ {
    move |e| RootKeyError::Io {
        path: path.display().to_string(),
        reason: e.kind().to_string(),
    }
}

/// Reading a file of an existing key set: a missing one is restored, not regenerated.
fn read_err(path: &Path) -> impl Fn(std::io::Error) -> RootKeyError + '_ {
    move |e| match e.kind() {
        std::io::ErrorKind::NotFound => RootKeyError::Missing {
            path: path.display().to_string(),
        },
        _ => io_err(path)(e),
    }
}

fn create_private_dir(dir: &Path) -> Result<(), RootKeyError> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir).map_err(io_err(dir))
}

fn write_private(path: &Path, content: &[u8]) -> Result<(), RootKeyError> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).map_err(io_err(path))?;
    f.write_all(content).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::keys::BootstrapInfo;
    use crate::secret::SecretRef;

    #[test]
    fn keys_are_created_once_with_private_modes_and_reloaded_identically() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = KmsConfig::default();
        let first = load_or_create(dir.path(), &cfg).unwrap();
        assert!(first.created);
        let second = load_or_create(dir.path(), &cfg).unwrap();
        assert!(!second.created);
        assert_eq!(
            BootstrapInfo::of(&first.root).unwrap(),
            BootstrapInfo::of(&second.root).unwrap()
        );
        assert_eq!(first.root_ca_pem, second.root_ca_pem);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let kd = key_dir(dir.path());
            assert_eq!(
                std::fs::metadata(&kd).unwrap().permissions().mode() & 0o777,
                0o700
            );
            for f in [
                ROOT_CA_KEY,
                ROOT_K256_KEY,
                TMP_CA_KEY,
                RPC_KEY,
                ROOT_CA_CERT,
            ] {
                let mode = std::fs::metadata(kd.join(f)).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{f}");
            }
        }
        assert!(!dir.path().join(".kms-bootstrap").exists());
    }

    #[test]
    fn rpc_certificate_is_for_kms_rpc_and_signed_by_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let keys = load_or_create(dir.path(), &KmsConfig::default()).unwrap();
        let der = pem::parse(&keys.rpc_cert_pem).unwrap();
        let cert = crate::attestation::ratls::parse_cert(der.contents()).unwrap();
        assert_eq!(cert.usage.as_deref(), Some("kms:rpc"));
        let (_, root) = x509_parser::pem::parse_x509_pem(keys.root_ca_pem.as_bytes()).unwrap();
        let root = root.parse_x509().unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(der.contents()).unwrap();
        leaf.verify_signature(Some(root.public_key())).unwrap();
        assert_eq!(leaf.issuer(), root.subject());
    }

    #[test]
    fn sealed_keys_need_the_right_secret() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("kek");
        std::fs::write(&secret, "a long passphrase").unwrap();
        let cfg = KmsConfig {
            key_encryption_key: Some(SecretRef::File(secret.clone())),
            ..Default::default()
        };
        let created = load_or_create(dir.path(), &cfg).unwrap();
        let raw = std::fs::read(key_dir(dir.path()).join(ROOT_K256_KEY)).unwrap();
        assert!(raw.starts_with(SEALED_MAGIC), "key must be sealed at rest");
        assert!(
            !raw.windows(32)
                .any(|w| w == &created.root.k256.to_bytes()[..])
        );
        let reloaded = load_existing(dir.path(), &cfg).unwrap();
        assert_eq!(reloaded.root.k256.to_bytes(), created.root.k256.to_bytes());

        std::fs::write(&secret, "another passphrase").unwrap();
        let err = load_existing(dir.path(), &cfg).unwrap_err().to_string();
        assert!(err.contains("decryption failed"), "{err}");
        let err = load_existing(dir.path(), &KmsConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("encrypted but no kms.key_encryption_key"),
            "{err}"
        );
    }

    #[test]
    fn canary_ids_accept_20_byte_hex_and_name_the_first_bad_entry() {
        let mut cfg = KmsConfig {
            canary_app_ids: vec!["ab".repeat(20), format!("0x{}", "cd".repeat(20))],
            ..Default::default()
        };
        assert_eq!(
            cfg.canary_ids().unwrap(),
            vec![vec![0xab; 20], vec![0xcd; 20]]
        );
        cfg.canary_app_ids.push("abcd".into());
        assert_eq!(cfg.canary_ids(), Err("abcd".to_owned()));
    }

    #[test]
    fn load_existing_never_creates() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_existing(dir.path(), &KmsConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no KMS keys yet"), "{err}");
        assert!(!key_dir(dir.path()).exists());
    }
}

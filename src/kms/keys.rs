//! Key derivations, byte-compatible with upstream dstack's KMS.
//!
//! - `derive_key(ikm, ctx, n)`: HKDF-SHA256, salt `RATLS`, info = concatenated context slices.
//! - `derive_p256(root, ctx)`: HKDF over the root P-256 secret scalar → the new scalar.
//! - `derive_dh_secret(root, ctx)`: SHA-256 of the derived P-256 key's PKCS#8 DER, as the
//!   RustCrypto `p256` crate encodes it (138 bytes) — the encoding is part of the format.
//! - App CA key (SignCert): `derive_p256(root_ca, app_id ‖ "app-ca")`.
//! - App k256 key: `HKDF(root_k256, app_id ‖ "app-key")`, signed by the root k256 key as a
//!   recoverable ECDSA signature over `keccak256("dstack-kms-issued:" ‖ app_id ‖ compressed pubkey)`.
//!
//! Everything here is pure: no I/O, deterministic (RFC 6979 signatures), secrets zeroized on drop.

use hkdf::Hkdf;
use k256::ecdsa::SigningKey as K256SigningKey;
use p256::pkcs8::EncodePrivateKey as _;
use p256::pkcs8::EncodePublicKey as _;
use sha2::{Digest as _, Sha256};
use sha3::Keccak256;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::KmsError;

/// The HKDF salt every upstream derivation uses.
pub const SALT: &[u8] = b"RATLS";

/// HKDF-SHA256 with salt `RATLS` over `ikm`, info = the concatenation of `context`.
pub fn derive_key(
    ikm: &[u8],
    context: &[&[u8]],
    len: usize,
) -> Result<Zeroizing<Vec<u8>>, KmsError> {
    let hk = Hkdf::<Sha256>::new(Some(SALT), ikm);
    let mut out = Zeroizing::new(vec![0u8; len]);
    hk.expand_multi_info(context, &mut out)
        .map_err(|_| KmsError::DerivationLength(len))?;
    Ok(out)
}

fn derive_32(ikm: &[u8], context: &[&[u8]]) -> Result<Zeroizing<[u8; 32]>, KmsError> {
    let v = derive_key(ikm, context, 32)?;
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&v);
    Ok(out)
}

/// Derives a P-256 secret key from `root` under `context`.
pub fn derive_p256(root: &p256::SecretKey, context: &[&[u8]]) -> Result<p256::SecretKey, KmsError> {
    let root_bytes = Zeroizing::new(root.to_bytes());
    let derived = derive_32(&root_bytes, context)?;
    p256::SecretKey::from_slice(&*derived)
        .map_err(|_| KmsError::DerivedKeyInvalid { curve: "P-256" })
}

/// The key of an app's CA (SignCert): `derive_p256(root_ca, app_id ‖ "app-ca")`.
pub fn app_ca_key(root: &RootKeys, app_id: &[u8]) -> Result<p256::SecretKey, KmsError> {
    derive_p256(&root.ca, &[app_id, b"app-ca"])
}

/// SHA-256 of the PKCS#8 DER of the P-256 key derived from `root` under `context`.
pub fn derive_dh_secret(root: &p256::SecretKey, context: &[&[u8]]) -> Result<[u8; 32], KmsError> {
    let derived = derive_p256(root, context)?;
    let der = derived
        .to_pkcs8_der()
        .map_err(|e| KmsError::Encoding(e.to_string()))?;
    Ok(Sha256::digest(der.as_bytes()).into())
}

/// Recoverable ECDSA signature (r ‖ s ‖ recid, 65 bytes) by `key` over
/// `keccak256(prefix ‖ ":" ‖ app_id ‖ message)`.
pub fn sign_message(
    key: &K256SigningKey,
    prefix: &[u8],
    app_id: &[u8],
    message: &[u8],
) -> Result<[u8; 65], KmsError> {
    sign_parts(key, &[prefix, b":", app_id, message])
}

/// Like [`sign_message`] with the timestamp (8 bytes big-endian) before the message.
pub fn sign_message_with_timestamp(
    key: &K256SigningKey,
    prefix: &[u8],
    app_id: &[u8],
    timestamp: u64,
    message: &[u8],
) -> Result<[u8; 65], KmsError> {
    sign_parts(
        key,
        &[prefix, b":", app_id, &timestamp.to_be_bytes(), message],
    )
}

fn sign_parts(key: &K256SigningKey, parts: &[&[u8]]) -> Result<[u8; 65], KmsError> {
    let mut digest = Keccak256::new();
    for p in parts {
        digest.update(p);
    }
    let (sig, recid) = key
        .sign_digest_recoverable(digest)
        .map_err(|e| KmsError::Signing(e.to_string()))?;
    let mut out = [0u8; 65];
    out[..64].copy_from_slice(&sig.to_bytes());
    out[64] = recid.to_byte();
    Ok(out)
}

/// The root key material every derivation starts from.
pub struct RootKeys {
    /// Root CA key (P-256).
    pub ca: p256::SecretKey,
    /// Root secp256k1 key.
    pub k256: K256SigningKey,
}

impl std::fmt::Debug for RootKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RootKeys([redacted])")
    }
}

/// The keys `GetAppKey` hands to one app instance.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct AppKeys {
    /// Disk encryption key (per app and instance).
    pub disk_crypt_key: [u8; 32],
    /// X25519 static secret for decrypting the app's sealed environment (per app).
    pub env_crypt_key: [u8; 32],
    /// secp256k1 app secret key (per app).
    pub k256_key: [u8; 32],
    /// Root k256 signature over the app key's compressed public key.
    pub k256_signature: [u8; 65],
}

impl std::fmt::Debug for AppKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AppKeys([redacted])")
    }
}

impl AppKeys {
    /// Derives the keys of `app_id` (20 bytes) / `instance_id` (20 bytes, or empty).
    pub fn derive(root: &RootKeys, app_id: &[u8], instance_id: &[u8]) -> Result<Self, KmsError> {
        let disk_crypt_key =
            derive_dh_secret(&root.ca, &[app_id, instance_id, b"app-disk-crypt-key"])?;
        let env_crypt_key = env_secret(root, app_id)?;
        let (k256_key, k256_signature) = app_k256(root, app_id)?;
        Ok(Self {
            disk_crypt_key,
            env_crypt_key,
            k256_key,
            k256_signature,
        })
    }
}

fn env_secret(root: &RootKeys, app_id: &[u8]) -> Result<[u8; 32], KmsError> {
    derive_dh_secret(&root.ca, &[app_id, b"env-encrypt-key"])
}

fn app_k256(root: &RootKeys, app_id: &[u8]) -> Result<([u8; 32], [u8; 65]), KmsError> {
    let root_bytes = Zeroizing::new(root.k256.to_bytes());
    let derived = derive_32(&root_bytes, &[app_id, b"app-key"])?;
    let key = K256SigningKey::from_slice(&*derived)
        .map_err(|_| KmsError::DerivedKeyInvalid { curve: "secp256k1" })?;
    let pubkey = key.verifying_key().to_encoded_point(true);
    let sig = sign_message(&root.k256, b"dstack-kms-issued", app_id, pubkey.as_bytes())?;
    Ok((*derived, sig))
}

/// An app's BLS12-381 key (our addition to upstream): EIP-2333 from a per-app seed
/// `HKDF(root_k256, app_id ‖ "app-bls-seed")`, along the EIP-2334 signing path m/12381/3600/0/0/0,
/// with the root k256 signature over the compressed public key.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct AppBlsKey {
    /// Secret key, 32 bytes big-endian.
    pub secret_key: [u8; 32],
    /// Compressed G1 public key.
    pub public_key: [u8; 48],
    /// Recoverable root k256 signature over `"dstack-kms-issued-bls:" ‖ app_id ‖ public_key`.
    pub k256_signature: [u8; 65],
}

/// EIP-2334 path of a validator's signing key (account 0).
pub const BLS_SIGNING_PATH: [u32; 5] = [12381, 3600, 0, 0, 0];

impl AppBlsKey {
    /// Derives the BLS key of `app_id`.
    pub fn derive(root: &RootKeys, app_id: &[u8]) -> Result<Self, KmsError> {
        let root_bytes = Zeroizing::new(root.k256.to_bytes());
        let seed = derive_32(&root_bytes, &[app_id, b"app-bls-seed"])?;
        let sk = bls_derive_path(&*seed, &BLS_SIGNING_PATH)?;
        let public_key = sk.sk_to_pk().compress();
        Ok(Self {
            secret_key: sk.to_bytes(),
            public_key,
            k256_signature: sign_message(
                &root.k256,
                b"dstack-kms-issued-bls",
                app_id,
                &public_key,
            )?,
        })
    }
}

/// EIP-2333 `derive_master_SK(seed)` followed by `derive_child_SK` along `path`.
pub fn bls_derive_path(seed: &[u8], path: &[u32]) -> Result<blst::min_pk::SecretKey, KmsError> {
    let mut sk = blst::min_pk::SecretKey::derive_master_eip2333(seed)
        .map_err(|e| KmsError::Encoding(format!("EIP-2333 master key: {e:?}")))?;
    for index in path {
        sk = sk.derive_child_eip2333(*index);
    }
    Ok(sk)
}

/// The app's env-encryption public key (X25519) with the root's signatures, as
/// `GetAppEnvEncryptPubKey` returns them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvEncryptPubKey {
    /// X25519 public key.
    pub public_key: [u8; 32],
    /// Signature over `keccak256("dstack-env-encrypt-pubkey:" ‖ app_id ‖ public_key)`.
    pub signature: [u8; 65],
    /// Signature with the timestamp before the public key.
    pub signature_v1: [u8; 65],
    /// The timestamp signed in `signature_v1` (unix seconds).
    pub timestamp: u64,
}

impl EnvEncryptPubKey {
    /// Derives and signs the env-encryption public key of `app_id` at `timestamp`.
    pub fn derive(root: &RootKeys, app_id: &[u8], timestamp: u64) -> Result<Self, KmsError> {
        let secret = x25519_dalek::StaticSecret::from(env_secret(root, app_id)?);
        let public_key = x25519_dalek::PublicKey::from(&secret).to_bytes();
        const PREFIX: &[u8] = b"dstack-env-encrypt-pubkey";
        Ok(Self {
            public_key,
            signature: sign_message(&root.k256, PREFIX, app_id, &public_key)?,
            signature_v1: sign_message_with_timestamp(
                &root.k256,
                PREFIX,
                app_id,
                timestamp,
                &public_key,
            )?,
            timestamp,
        })
    }
}

/// What an operator registers on-chain: the public halves of the root keys and the report data
/// a bootstrap attestation binds them with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapInfo {
    /// SubjectPublicKeyInfo DER of the root CA key.
    pub ca_pubkey: Vec<u8>,
    /// Compressed SEC1 root k256 public key (33 bytes).
    pub k256_pubkey: Vec<u8>,
    /// `keccak256("dstack-kms-genereted-keys-v1:" hex(ca) ";" hex(k256) ";")`, zero-padded to 64.
    pub report_data: [u8; 64],
}

impl BootstrapInfo {
    /// Computes the bootstrap information of `root`.
    pub fn of(root: &RootKeys) -> Result<Self, KmsError> {
        let ca_pubkey = root
            .ca
            .public_key()
            .to_public_key_der()
            .map_err(|e| KmsError::Encoding(e.to_string()))?
            .into_vec();
        let k256_pubkey = root
            .k256
            .verifying_key()
            .to_encoded_point(true)
            .as_bytes()
            .to_vec();
        // "genereted" is upstream's spelling and part of the format.
        let text = format!(
            "dstack-kms-genereted-keys-v1:{};{};",
            hex::encode(&ca_pubkey),
            hex::encode(&k256_pubkey)
        );
        let mut report_data = [0u8; 64];
        report_data[..32].copy_from_slice(&Keccak256::digest(text.as_bytes()));
        Ok(Self {
            ca_pubkey,
            k256_pubkey,
            report_data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};
    use k256::ecdsa::{RecoveryId, Signature, VerifyingKey};

    fn root() -> RootKeys {
        RootKeys {
            ca: p256::SecretKey::from_slice(&[0x11; 32]).unwrap(),
            k256: K256SigningKey::from_slice(&[0x22; 32]).unwrap(),
        }
    }
    const APP: [u8; 20] = [0xaa; 20];
    const INSTANCE: [u8; 20] = [0xbb; 20];

    /// RFC 5869 extract-then-expand written out with HMAC, to check the HKDF wiring independently.
    fn hkdf_by_hand(ikm: &[u8], info: &[u8], len: usize) -> Vec<u8> {
        let mut mac = Hmac::<Sha256>::new_from_slice(SALT).unwrap();
        mac.update(ikm);
        let prk = mac.finalize().into_bytes();
        let (mut out, mut t, mut i) = (Vec::new(), Vec::new(), 1u8);
        while out.len() < len {
            let mut mac = Hmac::<Sha256>::new_from_slice(&prk).unwrap();
            mac.update(&t);
            mac.update(info);
            mac.update(&[i]);
            t = mac.finalize().into_bytes().to_vec();
            out.extend_from_slice(&t);
            i += 1;
        }
        out.truncate(len);
        out
    }

    #[test]
    fn derive_key_is_rfc5869_hkdf_with_ratls_salt_over_concatenated_context() {
        for len in [16, 32, 64, 256] {
            let got = derive_key(b"input key material", &[b"context ", b"one"], len).unwrap();
            assert_eq!(
                *got,
                hkdf_by_hand(b"input key material", b"context one", len)
            );
        }
        assert!(derive_key(b"x", &[b"y"], 255 * 32 + 1).is_err());
    }

    #[test]
    fn pkcs8_encoding_is_the_138_byte_form() {
        let der = derive_p256(&root().ca, &[b"x"])
            .unwrap()
            .to_pkcs8_der()
            .unwrap();
        assert_eq!(der.as_bytes().len(), 138);
    }

    #[test]
    fn app_keys_match_pinned_vectors() {
        let keys = AppKeys::derive(&root(), &APP, &INSTANCE).unwrap();
        assert_eq!(hex::encode(keys.disk_crypt_key), PINNED_DISK);
        assert_eq!(hex::encode(keys.env_crypt_key), PINNED_ENV);
        assert_eq!(hex::encode(keys.k256_key), PINNED_K256);
        assert_eq!(hex::encode(keys.k256_signature), PINNED_K256_SIG);
        let no_instance = AppKeys::derive(&root(), &APP, &[]).unwrap();
        assert_ne!(
            no_instance.disk_crypt_key, keys.disk_crypt_key,
            "disk key is per instance"
        );
        assert_eq!(
            no_instance.env_crypt_key, keys.env_crypt_key,
            "env key is per app"
        );
    }

    #[test]
    fn k256_signature_recovers_the_root_key_over_the_app_pubkey() {
        let r = root();
        let keys = AppKeys::derive(&r, &APP, &INSTANCE).unwrap();
        let app_pub = K256SigningKey::from_slice(&keys.k256_key)
            .unwrap()
            .verifying_key()
            .to_encoded_point(true);
        let mut msg = b"dstack-kms-issued:".to_vec();
        msg.extend_from_slice(&APP);
        msg.extend_from_slice(app_pub.as_bytes());
        let sig = Signature::from_slice(&keys.k256_signature[..64]).unwrap();
        let recid = RecoveryId::from_byte(keys.k256_signature[64]).unwrap();
        let recovered =
            VerifyingKey::recover_from_digest(Keccak256::new_with_prefix(&msg), &sig, recid)
                .unwrap();
        assert_eq!(&recovered, r.k256.verifying_key());
    }

    #[test]
    fn env_pubkey_matches_the_env_secret_and_pinned_vector() {
        let r = root();
        let keys = AppKeys::derive(&r, &APP, &INSTANCE).unwrap();
        let pk = EnvEncryptPubKey::derive(&r, &APP, 1_700_000_000).unwrap();
        let from_secret =
            x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(keys.env_crypt_key));
        assert_eq!(pk.public_key, from_secret.to_bytes());
        assert_eq!(hex::encode(pk.public_key), PINNED_ENV_PUB);
        assert_eq!(hex::encode(pk.signature), PINNED_ENV_SIG);
        assert_eq!(hex::encode(pk.signature_v1), PINNED_ENV_SIG_V1);
    }

    #[test]
    fn bootstrap_report_data_matches_pinned_vector() {
        let info = BootstrapInfo::of(&root()).unwrap();
        assert_eq!(info.k256_pubkey.len(), 33);
        assert_eq!(info.ca_pubkey.len(), 91, "P-256 SubjectPublicKeyInfo DER");
        assert_eq!(&info.report_data[32..], &[0u8; 32]);
        assert_eq!(hex::encode(&info.report_data[..32]), PINNED_BOOTSTRAP);
    }

    #[test]
    fn app_ca_key_matches_pinned_vector_and_is_per_app() {
        let r = root();
        let key = app_ca_key(&r, &APP).unwrap();
        let public =
            p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&key.public_key(), true);
        assert_eq!(hex::encode(public.as_bytes()), PINNED_APP_CA_PUB);
        assert_ne!(
            app_ca_key(&r, &[0xab; 20]).unwrap().to_bytes(),
            key.to_bytes()
        );
    }

    /// Big-endian 32-byte form of a decimal integer (EIP-2333 vectors are given in decimal).
    fn decimal_to_be32(dec: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for digit in dec.bytes() {
            let mut carry = u32::from(digit - b'0');
            for byte in out.iter_mut().rev() {
                let v = u32::from(*byte) * 10 + carry;
                *byte = (v & 0xff) as u8;
                carry = v >> 8;
            }
            assert_eq!(carry, 0, "overflow");
        }
        out
    }

    #[test]
    fn eip2333_test_vectors() {
        // (seed, master_SK, child_index, child_SK) from EIP-2333.
        let vectors = [
            (
                "c55257c360c07c72029aebc1b53c05ed0362ada38ead3e3e9efa3708e53495531f09a6987599d18264c1e1c92f2cf141630c7a3c4ab7c81b2f001698e7463b04",
                "6083874454709270928345386274498605044986640685124978867557563392430687146096",
                0,
                "20397789859736650942317412262472558107875392172444076792671091975210932703118",
            ),
            (
                "3141592653589793238462643383279502884197169399375105820974944592",
                "29757020647961307431480504535336562678282505419141012933316116377660817309383",
                3141592653,
                "25457201688850691947727629385191704516744796114925897962676248250929345014287",
            ),
            (
                "0099FF991111002299DD7744EE3355BBDD8844115566CC55663355668888CC00",
                "27580842291869792442942448775674722299803720648445448686099262467207037398656",
                4294967295,
                "29358610794459428860402234341874281240803786294062035874021252734817515685787",
            ),
            (
                "d4e56740f876aef8c010b86a40d5f56745a118d0906a34e69aec8c0db1cb8fa3",
                "19022158461524446591288038168518313374041767046816487870552872741050760015818",
                42,
                "31372231650479070279774297061823572166496564838472787488249775572789064611981",
            ),
        ];
        for (seed, master, index, child) in vectors {
            let seed = hex::decode(seed).unwrap();
            assert_eq!(
                bls_derive_path(&seed, &[]).unwrap().to_bytes(),
                decimal_to_be32(master)
            );
            assert_eq!(
                bls_derive_path(&seed, &[index]).unwrap().to_bytes(),
                decimal_to_be32(child)
            );
        }
    }

    #[test]
    fn app_bls_key_is_per_app_signed_by_root_and_usable() {
        let r = root();
        let a = AppBlsKey::derive(&r, &APP).unwrap();
        let b = AppBlsKey::derive(&r, &[0xab; 20]).unwrap();
        assert_ne!(a.public_key, b.public_key);
        assert_eq!(
            a.public_key,
            AppBlsKey::derive(&r, &APP).unwrap().public_key,
            "deterministic"
        );
        let sk = blst::min_pk::SecretKey::from_bytes(&a.secret_key).unwrap();
        let dst = b"BLS_SIG_BLS12381G2_XMD:SHA-256_SSWU_RO_POP_";
        let sig = sk.sign(b"hello", dst, &[]);
        let pk = blst::min_pk::PublicKey::uncompress(&a.public_key).unwrap();
        assert_eq!(
            sig.verify(true, b"hello", dst, &[], &pk, true),
            blst::BLST_ERROR::BLST_SUCCESS
        );
        let mut msg = b"dstack-kms-issued-bls:".to_vec();
        msg.extend_from_slice(&APP);
        msg.extend_from_slice(&a.public_key);
        let recovered = VerifyingKey::recover_from_digest(
            Keccak256::new_with_prefix(&msg),
            &Signature::from_slice(&a.k256_signature[..64]).unwrap(),
            RecoveryId::from_byte(a.k256_signature[64]).unwrap(),
        )
        .unwrap();
        assert_eq!(&recovered, r.k256.verifying_key());
    }

    const PINNED_DISK: &str = "896d7ed35b68a4349c4c979e0b4eb693f9fb41f69df1a722fb3294411c808f41";
    const PINNED_ENV: &str = "0ec3dffce49a5bebdd1680f3580507428504e3e4edf1247b82c5f8a679daf7b2";
    const PINNED_K256: &str = "14452120e868aef8d579592127292b430c91a7377c51892dca4d659400492753";
    const PINNED_K256_SIG: &str = "9e2deaf8423be054bd3f0b1edbd651a647be5822267366bd0f87eefad0b5ceca13513f11c29746291d0cb989c0261ff722cf7237ce6e1152a4068643e48e46cb00";
    const PINNED_ENV_PUB: &str = "77efd8f13007c4d3915ea1b39fc4dbb1f6ccfd2fffd9fc478581f0d0a6d2fc40";
    const PINNED_ENV_SIG: &str = "80804a164ec8d72ea4119a64fa0c2024f1f7fa49e606235b39d01a7e545c9ff203c12701dbc9048037899b3615629846c7499bf2a33c2d93b11e0b7bce2a3f8800";
    const PINNED_ENV_SIG_V1: &str = "6eb7c9bf4b926b44e16f9f8fbbda6530ee169de1dc4c58c8047dcd61e00ee1626e160ede45bf0e1bc7f16d5764e7879f60943f3291cced605d670c6e13ff996501";
    // Computed independently (HKDF-SHA256 and P-256 from another library), then pinned.
    const PINNED_APP_CA_PUB: &str =
        "03c14223a2e584712b14b7c74dbd99eb9b03e3f31a8157006356a2e3636fbb1270";
    const PINNED_BOOTSTRAP: &str =
        "5d6c9293596499bb5df6256f5800ca0912b49e482b909427dd9f9c2920ac57cf";
}

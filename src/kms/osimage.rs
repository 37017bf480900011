//! Binding the host's `os_image_hash` claim to the measured boot (spec/01 §8).
//!
//! `vm_config` comes from the host, so its `os_image_hash` is a claim. A TDX boot is accepted
//! only when the configured table maps that hash to exactly the MRTD and RTMR0-2 in the verified
//! quote. Skipping the check is the explicit choice `kms.insecure_skip_os_image_check`. Nitro
//! boots are exempt: their OS image hash is derived from the measured PCRs, not claimed.

use serde::{Deserialize, Serialize};

/// One OS image: its hash and the boot measurements it produces.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OsImage {
    /// `os_image_hash` (hex, 32 bytes): sha256 of the image's sha256sum.txt.
    pub hash: String,
    /// Expected MRTD (hex, 48 bytes).
    pub mrtd: String,
    /// Expected RTMR0 (hex, 48 bytes).
    pub rtmr0: String,
    /// Expected RTMR1 (hex, 48 bytes).
    pub rtmr1: String,
    /// Expected RTMR2 (hex, 48 bytes).
    pub rtmr2: String,
}

impl OsImage {
    /// An entry for image `hash` with the given MRTD and RTMR0-2.
    pub fn new(hash: &[u8; 32], mrtd: &[u8; 48], rtmr0_2: &[[u8; 48]; 3]) -> Self {
        Self {
            hash: hex::encode(hash),
            mrtd: hex::encode(mrtd),
            rtmr0: hex::encode(rtmr0_2[0]),
            rtmr1: hex::encode(rtmr0_2[1]),
            rtmr2: hex::encode(rtmr0_2[2]),
        }
    }
}

/// `images` as the value of `KEYWARDEN_KMS__OS_IMAGES` (a TOML inline array of tables).
pub fn env_value(images: &[OsImage]) -> String {
    let entries: Vec<String> = images
        .iter()
        .map(|i| {
            format!(
                "{{hash = \"{}\", mrtd = \"{}\", rtmr0 = \"{}\", rtmr1 = \"{}\", rtmr2 = \"{}\"}}",
                i.hash, i.mrtd, i.rtmr0, i.rtmr1, i.rtmr2
            )
        })
        .collect();
    format!("[{}]", entries.join(", "))
}

/// Why a boot's OS image claim is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OsImageError {
    /// The claimed hash is not in the table.
    #[error("OS image {0} is not known to this KMS (no expected measurements configured)")]
    Unknown(String),
    /// The quote's measurements differ from the image's.
    #[error("OS image {hash}: {register} in the quote differs from the image's")]
    Mismatch {
        /// The claimed image.
        hash: String,
        /// The first register that differs.
        register: &'static str,
    },
    /// A table entry is malformed (caught by config validation).
    #[error("kms.os_images entry {0} is malformed")]
    Malformed(String),
}

/// The expected measurements of known OS images.
#[derive(Debug, Clone, Default)]
pub struct OsImagePolicy {
    images: Vec<(Vec<u8>, [[u8; 48]; 4])>,
    skip: bool,
}

fn hex48(s: &str) -> Option<[u8; 48]> {
    hex::decode(s.trim_start_matches("0x"))
        .ok()?
        .try_into()
        .ok()
}

impl OsImagePolicy {
    /// Builds the policy from the `[kms]` table; `skip` is `insecure_skip_os_image_check`.
    pub fn new(images: &[OsImage], skip: bool) -> Result<Self, OsImageError> {
        let images = images
            .iter()
            .map(|i| {
                let hash = hex::decode(i.hash.trim_start_matches("0x"))
                    .ok()
                    .filter(|h| h.len() == 32)
                    .ok_or_else(|| OsImageError::Malformed(i.hash.clone()))?;
                let regs = [&i.mrtd, &i.rtmr0, &i.rtmr1, &i.rtmr2]
                    .map(|r| hex48(r))
                    .into_iter()
                    .collect::<Option<Vec<_>>>()
                    .and_then(|v| <[[u8; 48]; 4]>::try_from(v).ok())
                    .ok_or_else(|| OsImageError::Malformed(i.hash.clone()))?;
                Ok((hash, regs))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { images, skip })
    }

    /// Checks a TDX boot's claimed `os_image_hash` against its MRTD and RTMR0-2.
    pub fn check_tdx(
        &self,
        os_image_hash: &[u8],
        mr_td: &[u8; 48],
        rtmr: &[[u8; 48]; 4],
    ) -> Result<(), OsImageError> {
        if self.skip {
            return Ok(());
        }
        let hash = hex::encode(os_image_hash);
        let (_, expected) = self
            .images
            .iter()
            .find(|(h, _)| h.as_slice() == os_image_hash)
            .ok_or_else(|| OsImageError::Unknown(hash.clone()))?;
        let actual = [mr_td, &rtmr[0], &rtmr[1], &rtmr[2]];
        for ((name, want), got) in ["MRTD", "RTMR0", "RTMR1", "RTMR2"]
            .iter()
            .zip(expected)
            .zip(actual)
        {
            if want != got {
                return Err(OsImageError::Mismatch {
                    hash,
                    register: name,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> OsImage {
        OsImage {
            hash: "05".repeat(32),
            mrtd: "11".repeat(48),
            rtmr0: "22".repeat(48),
            rtmr1: "33".repeat(48),
            rtmr2: "44".repeat(48),
        }
    }

    #[test]
    fn claimed_image_must_match_the_measured_boot() {
        let p = OsImagePolicy::new(&[image()], false).unwrap();
        let rtmr = [[0x22; 48], [0x33; 48], [0x44; 48], [0x99; 48]];
        assert_eq!(p.check_tdx(&[0x05; 32], &[0x11; 48], &rtmr), Ok(()));
        assert_eq!(
            p.check_tdx(&[0x05; 32], &[0x12; 48], &rtmr),
            Err(OsImageError::Mismatch {
                hash: "05".repeat(32),
                register: "MRTD"
            })
        );
        let other = [[0x22; 48], [0x33; 48], [0x45; 48], [0x99; 48]];
        assert!(matches!(
            p.check_tdx(&[0x05; 32], &[0x11; 48], &other),
            Err(OsImageError::Mismatch {
                register: "RTMR2",
                ..
            })
        ));
        assert!(matches!(
            p.check_tdx(&[0x06; 32], &[0x11; 48], &rtmr),
            Err(OsImageError::Unknown(_))
        ));
        assert!(matches!(
            p.check_tdx(&[], &[0x11; 48], &rtmr),
            Err(OsImageError::Unknown(_))
        ));
    }

    #[test]
    fn skipping_is_explicit() {
        let p = OsImagePolicy::new(&[], true).unwrap();
        assert_eq!(p.check_tdx(&[0x06; 32], &[0; 48], &[[0; 48]; 4]), Ok(()));
    }

    #[test]
    fn malformed_entries_are_refused() {
        let mut bad = image();
        bad.rtmr1 = "zz".into();
        assert!(OsImagePolicy::new(&[bad], false).is_err());
    }
}

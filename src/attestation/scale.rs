//! SCALE (parity-scale-codec) primitives: a bounds-checked reader and a writer, shared by the
//! `VersionedAttestation` V0 format and the SignCert CSR.
//!
//! Compact lengths can never exceed the bytes left, so no input makes the reader allocate more
//! than the input's size; every malformed input is a [`ScaleError`], never a panic.

/// Why SCALE bytes do not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScaleError {
    /// The input ends inside a value.
    #[error("truncated SCALE data")]
    Truncated,
    /// A compact integer uses more than 8 bytes.
    #[error("compact integer too large")]
    CompactTooLarge,
    /// A length prefix exceeds the input left.
    #[error("SCALE length {0} exceeds input")]
    LengthExceedsInput(u64),
    /// A string is not UTF-8.
    #[error("SCALE string is not UTF-8")]
    NotUtf8,
    /// A `bool` byte other than 0 or 1.
    #[error("invalid bool byte {0:#04x}")]
    InvalidBool(u8),
    /// An `Option` tag other than 0 or 1.
    #[error("invalid Option tag {0:#04x}")]
    InvalidOption(u8),
}

type Result<T> = std::result::Result<T, ScaleError>;

/// A bounds-checked SCALE reader over a byte slice.
pub(crate) struct ScaleReader<'a>(pub(crate) &'a [u8]);

impl<'a> ScaleReader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.0.len() {
            return Err(ScaleError::Truncated);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    /// The bytes not read yet (consumes them).
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(crate) fn bool(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(ScaleError::InvalidBool(b)),
        }
    }

    /// An `Option<T>`: tag 0 (None) or 1 followed by the value.
    pub(crate) fn option<T>(
        &mut self,
        read: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<Option<T>> {
        match self.u8()? {
            0 => Ok(None),
            1 => read(self).map(Some),
            b => Err(ScaleError::InvalidOption(b)),
        }
    }

    /// A compact-encoded length, which can never exceed the bytes left.
    pub(crate) fn len(&mut self) -> Result<usize> {
        let b0 = self.u8()?;
        let v: u64 = match b0 & 3 {
            0 => u64::from(b0 >> 2),
            1 => u64::from(u16::from_le_bytes([b0, self.u8()?]) >> 2),
            2 => {
                let rest = self.array::<3>()?;
                u64::from(u32::from_le_bytes([b0, rest[0], rest[1], rest[2]]) >> 2)
            }
            _ => {
                let n = usize::from(b0 >> 2) + 4;
                if n > 8 {
                    return Err(ScaleError::CompactTooLarge);
                }
                let mut buf = [0u8; 8];
                buf[..n].copy_from_slice(self.take(n)?);
                u64::from_le_bytes(buf)
            }
        };
        usize::try_from(v)
            .ok()
            .filter(|v| *v <= self.0.len())
            .ok_or(ScaleError::LengthExceedsInput(v))
    }

    pub(crate) fn bytes(&mut self) -> Result<Vec<u8>> {
        let n = self.len()?;
        Ok(self.take(n)?.to_vec())
    }

    pub(crate) fn string(&mut self) -> Result<String> {
        String::from_utf8(self.bytes()?).map_err(|_| ScaleError::NotUtf8)
    }
}

/// A SCALE writer appending to a byte vector.
pub(crate) struct ScaleWriter(pub(crate) Vec<u8>);

impl ScaleWriter {
    /// A compact integer in its shortest form (the only form parity-scale-codec accepts).
    pub(crate) fn compact(&mut self, n: usize) {
        let n = n as u64;
        if n < 1 << 6 {
            self.0.push((n as u8) << 2);
        } else if n < 1 << 14 {
            self.0
                .extend_from_slice(&(((n as u16) << 2) | 1).to_le_bytes());
        } else if n < 1 << 30 {
            self.0
                .extend_from_slice(&(((n as u32) << 2) | 2).to_le_bytes());
        } else {
            let le = n.to_le_bytes();
            let len = 8 - le.iter().rev().take_while(|b| **b == 0).count();
            self.0.push((((len - 4) as u8) << 2) | 3);
            self.0.extend_from_slice(&le[..len]);
        }
    }

    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.compact(b.len());
        self.0.extend_from_slice(b);
    }

    pub(crate) fn bool(&mut self, b: bool) {
        self.0.push(u8::from(b));
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn option<T>(&mut self, v: Option<T>, write: impl FnOnce(&mut Self, T)) {
        match v {
            None => self.0.push(0),
            Some(v) => {
                self.0.push(1);
                write(self, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_lengths_roundtrip_in_every_mode() {
        for n in [
            0usize,
            1,
            63,
            64,
            16_383,
            16_384,
            (1 << 30) - 1,
            1 << 30,
            1 << 33,
        ] {
            let mut w = ScaleWriter(Vec::new());
            w.compact(n);
            let encoded = w.0.clone();
            // the reader bounds lengths by the input, so pad it
            w.0.resize(encoded.len() + n.min(1 << 16), 0);
            let mut r = ScaleReader(&w.0);
            if n <= 1 << 16 {
                assert_eq!(r.len().unwrap(), n, "{n}");
            } else {
                assert_eq!(r.len(), Err(ScaleError::LengthExceedsInput(n as u64)));
            }
        }
        assert_eq!(ScaleReader(&[0x01]).len(), Err(ScaleError::Truncated));
        assert_eq!(
            ScaleReader(&[0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).len(),
            Err(ScaleError::CompactTooLarge)
        );
    }

    #[test]
    fn bool_and_option_tags_are_strict() {
        assert_eq!(ScaleReader(&[2]).bool(), Err(ScaleError::InvalidBool(2)));
        assert_eq!(
            ScaleReader(&[2]).option(ScaleReader::u64),
            Err(ScaleError::InvalidOption(2))
        );
        let mut w = ScaleWriter(Vec::new());
        w.option(Some(7u64), ScaleWriter::u64);
        w.option(None::<u64>, ScaleWriter::u64);
        let mut r = ScaleReader(&w.0);
        assert_eq!(r.option(ScaleReader::u64), Ok(Some(7)));
        assert_eq!(r.option(ScaleReader::u64), Ok(None));
        assert!(r.rest().is_empty());
    }
}

//! Secret references (`env:VAR`, `file:PATH`) and the resolved values they point at.
//!
//! A config file never holds a secret itself, only where to find it. The resolved value is
//! redacted in `Debug`/`Display` and zeroized when dropped.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

/// Where a secret lives: an environment variable or a file.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// `env:NAME`: the value of environment variable `NAME`.
    Env(String),
    /// `file:PATH`: the contents of the file, without a trailing newline.
    File(PathBuf),
}

/// Why a secret reference could not be parsed or resolved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    /// The text is not `env:VAR` or `file:PATH`.
    #[error(
        "not a secret reference (expected `env:VAR` or `file:PATH`; literal secrets are not accepted)"
    )]
    NotAReference,
    /// The environment variable is not set or not UTF-8.
    #[error("environment variable {0} is not set")]
    EnvMissing(String),
    /// The file could not be read.
    #[error("cannot read secret file {path}: {reason}")]
    FileUnreadable {
        /// The path named by the reference.
        path: String,
        /// The operating system's reason.
        reason: String,
    },
    /// The secret resolved to an empty value.
    #[error("the secret is empty")]
    Empty,
}

impl SecretRef {
    /// Parses `env:VAR` or `file:PATH`.
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        if let Some(var) = text.strip_prefix("env:")
            && !var.is_empty()
        {
            return Ok(Self::Env(var.to_owned()));
        }
        if let Some(path) = text.strip_prefix("file:")
            && !path.is_empty()
        {
            return Ok(Self::File(PathBuf::from(path)));
        }
        Err(SecretError::NotAReference)
    }

    /// Reads the secret now.
    pub fn resolve(&self) -> Result<SecretValue, SecretError> {
        let value = match self {
            Self::Env(var) => Zeroizing::new(
                std::env::var(var).map_err(|_| SecretError::EnvMissing(var.clone()))?,
            ),
            Self::File(path) => {
                let mut text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                    SecretError::FileUnreadable {
                        path: path.display().to_string(),
                        reason: e.kind().to_string(),
                    }
                })?);
                // Files written by editors and `echo` end in a newline that is not part of the secret.
                let trimmed_len = text.trim_end_matches(['\n', '\r']).len();
                text.truncate(trimmed_len);
                text
            }
        };
        if value.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(SecretValue(value))
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Env(var) => write!(f, "env:{var}"),
            Self::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretRef({self})")
    }
}

impl Serialize for SecretRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A resolved secret. Never printed; wiped from memory on drop.
#[derive(Clone)]
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    /// The secret bytes, for hashing or handing to a library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Replaces the password in a URL's user-info with `***`.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(_) => raw.to_owned(),
        Err(_) => match raw.find('@') {
            Some(at) => format!("***{}", &raw[at..]),
            None => raw.to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_secret_is_refused() {
        assert_eq!(SecretRef::parse("hunter2"), Err(SecretError::NotAReference));
        assert_eq!(SecretRef::parse("env:"), Err(SecretError::NotAReference));
        assert_eq!(SecretRef::parse("file:"), Err(SecretError::NotAReference));
    }

    #[test]
    fn file_secret_is_read_without_trailing_newline_and_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let r = SecretRef::parse(&format!("file:{}", path.display())).unwrap();
        let v = r.resolve().unwrap();
        assert_eq!(v.expose(), "s3cret");
        assert_eq!(format!("{v:?}"), "[redacted]");
        assert_eq!(format!("{v}"), "[redacted]");
    }

    #[test]
    fn unreadable_file_names_the_path() {
        let r = SecretRef::parse("file:/nonexistent/keywarden/token").unwrap();
        let err = r.resolve().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/keywarden/token"), "{err}");
    }

    #[test]
    fn missing_env_var_is_named() {
        let r = SecretRef::parse("env:KEYWARDEN_TEST_SURELY_UNSET_VAR").unwrap();
        assert_eq!(
            r.resolve().unwrap_err(),
            SecretError::EnvMissing("KEYWARDEN_TEST_SURELY_UNSET_VAR".into())
        );
    }
}

//! One problem of the configuration and its fix: what every section's `problems()` returns and
//! [`crate::config::ConfigError`] reports, with the checks sections share (URLs, durations). A
//! leaf, so each subsystem's `config.rs` uses it without importing the config tree above them.

use std::time::Duration;

/// One thing wrong with the configuration, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key (`section.key`) or source at fault.
    pub key: String,
    /// What is wrong.
    pub problem: String,
    /// What to do about it.
    pub fix: String,
}

impl Problem {
    /// A problem of `key`.
    pub fn new(key: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} (fix: {})", self.key, self.problem, self.fix)
    }
}

/// The one URL check of the configuration: `raw` must be an `http` or `https` URL. `what` names
/// the value in the problem (`"is"`, `"entry 2 is"`); `fix` says what to write instead.
pub fn http_url(key: &str, what: &str, raw: &str, fix: &str) -> Option<Problem> {
    match url::Url::parse(raw) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => None,
        Ok(u) => Some(Problem::new(
            key,
            format!("{what} a URL with unsupported scheme {:?}", u.scheme()),
            fix,
        )),
        Err(e) => Some(Problem::new(
            key,
            format!("{what} a malformed URL: {e}"),
            fix,
        )),
    }
}

/// `d` must be positive.
pub fn positive(key: &str, d: Duration, example: &str) -> Option<Problem> {
    d.is_zero().then(|| {
        Problem::new(
            key,
            "must be positive",
            format!("use a duration such as \"{example}\""),
        )
    })
}

/// `text` on one line (error messages of parsers span several).
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_url_check_names_scheme_and_syntax_problems() {
        assert_eq!(http_url("k", "is", "https://h/p", "f"), None);
        let p = http_url("k", "entry 1 is", "ftp://h", "f").unwrap();
        assert_eq!(
            p.problem,
            "entry 1 is a URL with unsupported scheme \"ftp\""
        );
        let p = http_url("k", "is", "not a url", "f").unwrap();
        assert!(p.problem.starts_with("is a malformed URL"), "{p}");
        assert!(positive("k", Duration::ZERO, "1s").is_some());
        assert!(positive("k", Duration::from_secs(1), "1s").is_none());
    }
}

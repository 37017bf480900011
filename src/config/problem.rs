//! One problem of the configuration and its fix: what every section's `problems()` returns and
//! [`super::ConfigError`] reports. A leaf, so sections can use it without importing the config
//! tree that holds them.

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

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} (fix: {})", self.key, self.problem, self.fix)
    }
}

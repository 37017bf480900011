//! Where the demo's npm toolchain is (anvil, the Safe and OpenZeppelin artifacts), so that an
//! installed binary or a container image runs the demo from anywhere.
//!
//! Flow: [`node_modules`] is the first complete directory among `KEYWARDEN_NODE_MODULES`,
//! `./node_modules` (the repository) and keywarden's npm cache (`$XDG_CACHE_HOME/keywarden/npm`,
//! else `~/.cache/keywarden/npm`); complete means every package the demo needs is there at the
//! version the repository's `package.json` pins. [`ensure`] installs into the cache with npm
//! when none is, and otherwise says in one line what to install. [`anvil`]: `KEYWARDEN_ANVIL`,
//! else the one in that directory, else `anvil` on `PATH`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository's npm manifest: the one place the versions are pinned.
const MANIFEST: &str = include_str!("../../package.json");

/// The packages the demo needs.
const NEEDED: [&str; 3] = [
    "@foundry-rs/anvil-linux-amd64",
    "@safe-global/safe-contracts",
    "@openzeppelin/contracts",
];

/// anvil inside a `node_modules` directory.
const ANVIL: &str = "@foundry-rs/anvil-linux-amd64/bin/anvil";

/// Why the toolchain is not there.
#[derive(Debug, thiserror::Error)]
pub enum ToolchainError {
    /// Nothing found, and no npm to install with.
    #[error(
        "the demo needs anvil {anvil} and the Safe and OpenZeppelin contract artifacts from npm: install Node.js with npm (the demo then installs them into {cache}), or set KEYWARDEN_NODE_MODULES to a node_modules directory that has them"
    )]
    NoNpm {
        /// The pinned anvil version.
        anvil: String,
        /// Where they would be installed.
        cache: String,
    },
    /// npm ran but the packages are not complete afterwards.
    #[error("npm install into {dir} failed: {detail}")]
    Install {
        /// The cache directory.
        dir: String,
        /// What went wrong.
        detail: String,
    },
    /// The embedded manifest lacks a package (a build error, caught by a test).
    #[error("package.json pins no version of {0}")]
    Manifest(&'static str),
}

/// `name@version` of each needed package, as `package.json` pins it.
pub fn pinned() -> Result<Vec<(&'static str, String)>, ToolchainError> {
    let manifest: serde_json::Value =
        serde_json::from_str(MANIFEST).map_err(|_| ToolchainError::Manifest(NEEDED[0]))?;
    NEEDED
        .iter()
        .map(|name| {
            manifest["devDependencies"][name]
                .as_str()
                .map(|v| (*name, v.to_owned()))
                .ok_or(ToolchainError::Manifest(name))
        })
        .collect()
}

/// Whether `dir` has every needed package at its pinned version.
fn complete(dir: &Path, pins: &[(&'static str, String)]) -> bool {
    pins.iter().all(|(name, version)| {
        std::fs::read_to_string(dir.join(name).join("package.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|p| p["version"].as_str() == Some(version.as_str()))
    }) && dir.join(ANVIL).exists()
}

/// keywarden's npm cache (the prefix npm installs under; packages in its `node_modules`).
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("keywarden").join("npm")
}

/// The first complete `node_modules` directory, if any.
pub fn node_modules() -> Option<PathBuf> {
    let pins = pinned().ok()?;
    std::env::var_os("KEYWARDEN_NODE_MODULES")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            PathBuf::from("node_modules"),
            cache_dir().join("node_modules"),
        ])
        .find(|d| complete(d, &pins))
}

/// A complete `node_modules` directory: found, or installed into the cache with npm.
pub fn ensure() -> Result<PathBuf, ToolchainError> {
    if let Some(dir) = node_modules() {
        return Ok(dir);
    }
    let pins = pinned()?;
    let cache = cache_dir();
    let no_npm = || ToolchainError::NoNpm {
        anvil: pins
            .iter()
            .find(|(n, _)| n.contains("anvil"))
            .map_or_else(String::new, |(_, v)| v.clone()),
        cache: cache.display().to_string(),
    };
    if Command::new("npm").arg("--version").output().is_err() {
        return Err(no_npm());
    }
    let failed = |detail: String| ToolchainError::Install {
        dir: cache.display().to_string(),
        detail,
    };
    std::fs::create_dir_all(&cache).map_err(|e| failed(e.to_string()))?;
    println!(
        "==> installing the demo's npm toolchain into {} (pinned by package.json)",
        cache.display()
    );
    let status = Command::new("npm")
        .arg("install")
        .arg("--prefix")
        .arg(&cache)
        .args([
            "--no-save",
            "--no-package-lock",
            "--legacy-peer-deps",
            "--ignore-scripts",
            "--no-audit",
            "--no-fund",
        ])
        .args(pins.iter().map(|(n, v)| format!("{n}@{v}")))
        .status()
        .map_err(|e| failed(e.to_string()))?;
    let dir = cache.join("node_modules");
    if !status.success() || !complete(&dir, &pins) {
        return Err(failed(format!("npm exited with {status}")));
    }
    Ok(dir)
}

/// The anvil to run: `KEYWARDEN_ANVIL`, else the one in `node_modules`, else `anvil` on `PATH`.
pub fn anvil(node_modules: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("KEYWARDEN_ANVIL") {
        return PathBuf::from(p);
    }
    let bundled = node_modules.join(ANVIL);
    if bundled.exists() {
        return bundled;
    }
    PathBuf::from("anvil")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_s_packages_are_pinned_by_the_repository_manifest() {
        let pins = pinned().unwrap();
        assert_eq!(pins.len(), NEEDED.len());
        assert!(
            pins.iter()
                .all(|(_, v)| v.chars().all(|c| c.is_ascii_digit() || c == '.')),
            "exact versions only: {pins:?}"
        );
    }

    #[test]
    fn a_directory_with_other_versions_is_not_complete() {
        let dir = tempfile::tempdir().unwrap();
        let pins = pinned().unwrap();
        for (name, version) in &pins {
            let p = dir.path().join(name);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(
                p.join("package.json"),
                serde_json::json!({ "version": version }).to_string(),
            )
            .unwrap();
        }
        assert!(!complete(dir.path(), &pins), "anvil's binary is missing");
        std::fs::create_dir_all(dir.path().join(ANVIL).parent().unwrap()).unwrap();
        std::fs::write(dir.path().join(ANVIL), b"").unwrap();
        assert!(complete(dir.path(), &pins));
        let (name, _) = &pins[1];
        std::fs::write(
            dir.path().join(name).join("package.json"),
            r#"{"version":"0.0.1"}"#,
        )
        .unwrap();
        assert!(!complete(dir.path(), &pins));
    }
}

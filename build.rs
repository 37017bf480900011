//! Embeds the git revision so `--version` and `keywarden_build_info` name the exact build, and
//! computes the code identities of our own compiled contracts (`contracts/out/`) so the mirror
//! knows which on-chain code it may answer for locally.

use std::fmt::Write as _;
use std::path::Path;

use sha3::{Digest, Keccak256};

/// Our own contracts whose semantics the mirror reproduces: (artifact, kind).
const KNOWN: [(&str, &str); 3] = [
    ("DstackKms", "DstackKms"),
    ("DstackApp", "DstackApp"),
    ("ERC1967Proxy", "Proxy"),
];

fn main() {
    // A build without the repository (a container build context has no .git) is told its
    // revision through the environment.
    println!("cargo:rerun-if-env-changed=KEYWARDEN_GIT_SHA");
    let given = std::env::var("KEYWARDEN_GIT_SHA")
        .ok()
        .filter(|s| !s.trim().is_empty());
    let sha = given
        .map(|s| s.trim().to_owned())
        .or_else(|| {
            std::process::Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=KEYWARDEN_GIT_SHA={sha}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");

    if let Err(e) = known_code() {
        println!("cargo:warning=contracts/out is unusable: {e}");
        std::process::exit(1);
    }
}

/// Writes `$OUT_DIR/known_code.rs`: per known artifact, the keccak256 of its runtime code as
/// compiled (immutables are zero there) and the offsets of its 32-byte immutables.
fn known_code() -> Result<(), String> {
    let out = std::env::var("OUT_DIR").map_err(|e| e.to_string())?;
    let mut src = String::from("&[\n");
    for (name, kind) in KNOWN {
        let path = format!("contracts/out/{name}.json");
        println!("cargo:rerun-if-changed={path}");
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
        let hex = v["deployedBytecode"]
            .as_str()
            .and_then(|s| s.strip_prefix("0x"))
            .ok_or(format!("{path}: no deployedBytecode"))?;
        let code = decode_hex(hex).ok_or(format!("{path}: deployedBytecode is not hex"))?;
        let mut offsets = Vec::new();
        for r in v["immutableReferences"].as_array().into_iter().flatten() {
            let (start, len) = (r[0].as_u64(), r[1].as_u64());
            match (start, len) {
                (Some(s), Some(32)) => offsets.push(s),
                _ => return Err(format!("{path}: an immutable that is not one 32-byte word")),
            }
        }
        let hash = Keccak256::digest(&code);
        let hash_hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        let _ = writeln!(
            src,
            "    (\"keywarden {name}\", CodeKind::{kind}, alloy::primitives::b256!(\"{hash_hex}\"), &{offsets:?}),"
        );
    }
    src.push(']');
    std::fs::write(Path::new(&out).join("known_code.rs"), src).map_err(|e| e.to_string())
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

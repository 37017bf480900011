//! Attestation benchmarks: times N iterations per operation and prints median and p99.
//! Run with `cargo bench --bench attestation`. Reads the shared fixtures; skips when absent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use keywarden::attestation::eventlog::{self, TdxEvent};
use keywarden::attestation::identity::{self, DstackEvents};
use keywarden::attestation::nitro::NitroVerifier;
use keywarden::attestation::tdx::{self, TdMeasurements};
use keywarden::attestation::{AttestationConfig, Verifier, ratls, versioned};

fn bench(name: &str, iters: usize, mut f: impl FnMut()) {
    for _ in 0..iters.min(20) {
        f();
    }
    let mut samples: Vec<Duration> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    samples.sort();
    let median = samples[samples.len() / 2];
    let p99 = samples[(samples.len() * 99 / 100).min(samples.len() - 1)];
    println!("{name:<44} median {median:>10.1?}  p99 {p99:>10.1?}  (n={iters})");
}

fn main() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    if !dir.is_dir() {
        eprintln!(
            "SKIPPED: attestation fixtures not found at {}",
            dir.display()
        );
        return;
    }
    let read = |p: &str| std::fs::read(dir.join(p)).unwrap();

    // TDX: ours (dcap-qvl + claims + policy) against dcap-qvl's own verify
    let quote = read("tdx/tdx_quote");
    let coll = tdx::parse_collateral(&read("tdx/tdx_quote_collateral.json")).unwrap();
    let now = 1752919234;
    bench("tdx: dcap_qvl::verify::verify (reference)", 500, || {
        dcap_qvl::verify::verify(&quote, &coll, now).unwrap();
    });
    let verifier = Verifier::new(AttestationConfig::default()).unwrap();
    bench("tdx: Verifier::verify_quote", 500, || {
        verifier.verify_quote(&quote, &coll, now).unwrap();
    });
    bench("tdx: parse_quote", 2000, || {
        tdx::parse_quote(&quote).unwrap();
    });

    // Nitro: cold (fresh verifier each time) and warm (cached intermediates)
    let doc = read("nitro/dstack_nsm_qvl_prod.cose");
    let at = 1766668537;
    bench("nitro: verify, cold intermediate cache", 300, || {
        NitroVerifier::new(&Default::default(), false)
            .unwrap()
            .verify(&doc, at, None)
            .unwrap();
    });
    let warm = NitroVerifier::new(&Default::default(), false).unwrap();
    bench("nitro: verify, warm cache (same enclave)", 300, || {
        warm.verify(&doc, at, None).unwrap();
    });
    // another enclave behind the same regional and zonal CAs: its instance CA and leaf are new
    let other = read("nitro/dstack_attest_prod.cose");
    let other_at = 1766678659;
    let mut partial: Vec<Duration> = (0..300)
        .map(|_| {
            let v = NitroVerifier::new(&Default::default(), false).unwrap();
            v.verify(&doc, at, None).unwrap();
            let t = Instant::now();
            v.verify(&other, other_at, None).unwrap();
            t.elapsed()
        })
        .collect();
    partial.sort();
    println!(
        "{:<44} median {:>10.1?}  p99 {:>10.1?}  (n=300)",
        "nitro: verify, zonal CA cached, new enclave", partial[150], partial[297]
    );

    // Event log replay + identity derivation (the simulator's full 33-event log)
    let att = versioned::parse(&read(
        "ra-tls/dstack_simulator_attestation.versioned_attestation.bin",
    ))
    .unwrap();
    let versioned::Platform::Tdx {
        quote: sq,
        event_log,
    } = &att.platform
    else {
        panic!("not TDX")
    };
    let td = TdMeasurements::from_report(&tdx::parse_quote(sq).unwrap().report).unwrap();
    let events: &[TdxEvent] = event_log;
    bench("eventlog: replay + identity derivation", 5000, || {
        eventlog::verify_replay(events, &td.rtmr).unwrap();
        identity::tdx_boot_info(
            &td,
            &DstackEvents::from_tdx_log(events),
            &[1; 16],
            "UpToDate",
            &[],
            &[],
        )
        .unwrap();
    });
    let raw_att = read("ra-tls/dstack_simulator_attestation.versioned_attestation.bin");
    bench("versioned: parse V0 attestation", 5000, || {
        versioned::parse(&raw_att).unwrap();
    });

    // RA-TLS certificate parse + binding check
    let key = ratls::CertBuilder::new_key().unwrap();
    let cert = ratls::CertBuilder::new("guest")
        .usage("app:custom")
        .attestation(&raw_att)
        .self_signed(&key)
        .unwrap();
    bench("ratls: parse cert + binding check", 5000, || {
        let c = ratls::parse_cert(&cert.cert_der).unwrap();
        let a = c.attestation().unwrap();
        let _ = std::hint::black_box(a.report_data == c.expected_report_data());
    });
}

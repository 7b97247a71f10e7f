//! `cargo xtask bench`: how much metaproxy adds to a metadata request.
//!
//! In the end-to-end bed, a job container times sequential
//! connect + GET + close round trips (the way SDKs fetch credentials), to:
//!
//! 1. a minimal HTTP server (hyper, release build) it reaches directly;
//! 2. allow-listed metadata through metaproxy (redirect, attribution,
//!    identity, the cached answer of the real IMDS);
//! 3. its role's credentials through metaproxy (cached after the first).
//!
//! It prints percentiles, the ratios to the baseline, and the daemon's
//! resident memory before and after. Figures, not pass/fail.

use std::process::Command;

use std::time::Duration;

use metaproxy_tests::{
    bed::{E2eBed, ROLE_DEPLOY},
    docker::GATEWAY,
    process::spawn_in,
    wait_for,
};
use serde_json::Value;

const ROUNDS: &str = "5000";

pub fn run() -> anyhow::Result<()> {
    crate::setup::run()?;
    anyhow::ensure!(
        crate::test::is_root(),
        "the benchmark needs root (namespaces, cgroups, BPF, dockerd)"
    );
    let bins = crate::build::bed_binaries(true)?;
    let release = bins.dir.clone();
    crate::clean::run_with(&bins.metaproxy)?;
    metaproxy_tests::use_binaries(bins);

    let bed = E2eBed::start(&[])?;
    let mut hello = Command::new(release.join("mp-hello"));
    hello.arg(format!("{GATEWAY}:8080"));
    let hello = spawn_in(hello, &bed.ns.path(), &bed.cg.child("services/hello")?)?;
    wait_for("the baseline server", Duration::from_secs(10), || {
        let addr: std::net::SocketAddr = format!("{GATEWAY}:8080").parse().ok()?;
        bed.ns
            .run(move || std::net::TcpStream::connect(addr).ok())
            .ok()
            .flatten()
    })?;
    let c = bed.container("bench", bed.base_image(), &[("IAM_ROLE", ROLE_DEPLOY)], &[])?;
    let rss_before = rss_kib(&bed)?;

    let run = |addr: &str, path: &str| -> anyhow::Result<Value> {
        let v = c.exec(&["/mp-client", "latency", addr, path, ROUNDS])?;
        anyhow::ensure!(v["ok"] == true, "{addr}{path}: {v}");
        Ok(v)
    };
    let baseline = run(&format!("{GATEWAY}:8080"), "/latest/meta-data/instance-id")?;
    let metadata = run("169.254.169.254:80", "/latest/meta-data/instance-id")?;
    let creds = run(
        "169.254.169.254:80",
        &format!("/latest/meta-data/iam/security-credentials/{ROLE_DEPLOY}"),
    )?;
    let rss_after = rss_kib(&bed)?;
    drop(hello);

    println!(
        "\nsequential connect + GET + close from a container, {ROUNDS} rounds each (microseconds)"
    );
    println!(
        "{:<44} {:>8} {:>8} {:>8} {:>10}",
        "", "p50", "p90", "p99", "p50 ratio"
    );
    let base = baseline["p50_us"].as_f64().unwrap_or(f64::NAN);
    for (name, v) in [
        ("minimal HTTP server, direct (baseline)", &baseline),
        ("metaproxy: allow-listed metadata", &metadata),
        ("metaproxy: role credentials (cached)", &creds),
    ] {
        let p = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{name:<44} {:>8.0} {:>8.0} {:>8.0} {:>9.2}x",
            p("p50_us"),
            p("p90_us"),
            p("p99_us"),
            p("p50_us") / base
        );
    }
    println!(
        "\ndaemon resident memory: {rss_before} KiB before, {rss_after} KiB after {} requests",
        2 * ROUNDS.parse::<u32>()?
    );
    Ok(())
}

fn rss_kib(bed: &E2eBed) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", bed.daemon.pid()))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for the daemon"))
}

//! `cargo xtask demo`: the whole product in a minute, with no AWS account.
//! Builds everything, starts the test bed (a network namespace with no
//! route out, moto as STS, a fake EC2 metadata service, a private dockerd,
//! the daemon), runs two job containers with the real AWS SDK inside, shows
//! what each got and what `metaproxy connections` saw, and tears it all down.

use std::time::Instant;

use metaproxy_tests::bed::{E2eBed, ROLE_DEPLOY};

pub fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    crate::setup::for_bed()?;
    anyhow::ensure!(
        crate::test::is_root(),
        "the demo needs root (namespaces, cgroups, BPF, dockerd)"
    );
    step("building metaproxy and the demo clients");
    let bins = crate::build::bed_binaries(false)?;
    crate::clean::run_with(&bins.metaproxy)?;
    metaproxy_tests::use_binaries(bins);

    step("starting the bed: netns, moto (STS, auth on), fake IMDS, dockerd, metaproxy");
    let bed = E2eBed::start(&[])?;

    step(&format!(
        "job 1: container with IAM_ROLE={ROLE_DEPLOY}, running the AWS SDK for Rust"
    ));
    let with = bed.sdk_client(
        "job-with-role",
        bed.base_image(),
        &[("IAM_ROLE", ROLE_DEPLOY)],
        &[],
        1,
    )?;
    match with["arns"].get(0).and_then(|a| a.as_str()) {
        Some(arn) => println!("    GetCallerIdentity -> {arn}"),
        None => println!("    no credentials: {}", with["errors"]),
    }

    step("job 2: container without IAM_ROLE");
    let without = bed.sdk_client("job-without-role", bed.base_image(), &[], &[], 1)?;
    match without["arns"].get(0).and_then(|a| a.as_str()) {
        Some(arn) => println!("    GetCallerIdentity -> {arn}   (this must not happen)"),
        None => println!("    no credentials"),
    }

    step("metaproxy connections");
    print!("{}", bed.daemon.admin("connections", &[])?);
    let leaked = bed.container_calls_to_real_imds();
    println!(
        "\n    requests from containers that reached the real IMDS: {}",
        leaked.len()
    );

    let ok = with["arns"][0]
        .as_str()
        .is_some_and(|a| a.contains(&format!(":assumed-role/{ROLE_DEPLOY}/")))
        && without["arns"].as_array().is_some_and(|a| a.is_empty())
        && leaked.is_empty();
    step("tearing down");
    drop(bed);
    println!(
        "done in {:.0?}: {}",
        started.elapsed(),
        if ok {
            "as expected"
        } else {
            "UNEXPECTED RESULT"
        }
    );
    anyhow::ensure!(ok, "the demo did not behave as expected");
    Ok(())
}

fn step(what: &str) {
    println!("==> {what}");
}

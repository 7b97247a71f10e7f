//! End to end on the real parts: the kernel probe, a private dockerd, moto
//! as STS with auth on, the AWS SDK for Rust inside containers. Only EC2's
//! metadata service is faked, and it records every caller: no container may
//! ever reach it. Needs root; run through `cargo xtask test`.
//!
//! A file per feature; the helpers they share are here.

mod builds;
mod claims;
mod container_credentials;
mod controls;
mod dind;
mod doctor;
mod id_token;
mod limits;
mod logs;
mod metrics;
mod podman;
mod policy_file;
mod relay;
mod roles;
mod sts;
mod surface;
mod tokens;

use metaproxy_tests::bed::E2eBed;

const IMDS: &str = "169.254.169.254:80";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

fn is_assumed(role: &str, session: &str, arn: &str) -> bool {
    arn == format!("arn:aws:sts::123456789012:assumed-role/{role}/{session}")
}

/// No container of the bed ever reached the real IMDS (its control is in
/// `controls.rs`).
fn assert_real_imds_untouched(bed: &E2eBed) {
    if let Err(e) = bed.check_real_imds_untouched() {
        panic!("{e}");
    }
}

fn refusals_and_unauthorized(bed: &E2eBed, container: &str) -> Vec<String> {
    bed.daemon
        .connections()
        .unwrap()
        .into_iter()
        .filter(|c| c["container"] == container && c["outcome"] != "served")
        .map(|c| c["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn refusals(bed: &E2eBed, container: &str) -> Vec<String> {
    bed.daemon
        .connections()
        .unwrap()
        .into_iter()
        .filter(|c| c["container"] == container && c["outcome"] == "refused")
        .map(|c| c["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

//! `Policy::decide`: the role a container gets from its environment.
//!
//! Input: the container's `Config.Env`, one `KEY=VALUE` per line, then
//! optionally a 0x00 byte and the image's own `ENV` lines. The policy
//! allows `arn:aws:iam::123456789012:role/ci-*` only, so whatever the
//! environment says, a granted role is a `ci-*` role at the root path of
//! that account, with an external id STS would take.
#![no_main]

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock},
};

use libfuzzer_sys::fuzz_target;
use metaproxy::{
    identity::Container,
    ids::{AccountId, ContainerId},
    policy::{Policy, RoleDecision},
};

const ACCOUNT: &str = "123456789012";

fn lines(bytes: &[u8]) -> Vec<String> {
    if bytes.is_empty() {
        return Vec::new();
    }
    String::from_utf8_lossy(bytes)
        .split('\n')
        .map(str::to_owned)
        .collect()
}

/// Built once: compiling the globs costs far more than a decision.
fn policy() -> &'static Policy {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let account = Arc::new(OnceLock::new());
        account.set(AccountId::parse(ACCOUNT).unwrap()).unwrap();
        let allow = vec![format!("arn:aws:iam::{ACCOUNT}:role/ci-*")];
        Policy::new(&allow, &[], account).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let (env, image_env) = match data.iter().position(|&b| b == 0) {
        Some(nul) => (&data[..nul], &data[nul + 1..]),
        None => (data, &[][..]),
    };
    let container = Container {
        id: ContainerId::parse(&"ab".repeat(32)).unwrap(),
        name: "job".into(),
        labels: HashMap::from([(
            "com.gitlab.gitlab-runner.job.id".to_string(),
            "1".to_string(),
        )]),
        env: lines(env),
        image_env: lines(image_env),
        image_labels: HashMap::new(),
        addresses: None,
        cgroup: None,
    };
    let policy = policy();
    let decision = policy.decide(&container);
    assert_eq!(decision, policy.decide(&container), "not deterministic");
    let RoleDecision::Role(role) = decision else {
        return;
    };
    let arn = &role.arn;
    assert_eq!(arn.account().as_str(), ACCOUNT, "{arn}");
    assert!(arn.name().starts_with("ci-"), "{arn}");
    assert_eq!(arn.path(), "/", "the glob crossed a '/': {arn}");
    if let Some(external_id) = &role.external_id {
        assert!(
            (2..=1224).contains(&external_id.len()),
            "external id of {} bytes",
            external_id.len()
        );
        assert!(
            external_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_+=,.@:/-".contains(c)),
            "external id {external_id:?}"
        );
    }
});

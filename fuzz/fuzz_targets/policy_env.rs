//! `Policy::decide_for`: the role a container gets from its environment.
//!
//! Input: the container's `Config.Env`, one `KEY=VALUE` per line, then
//! optionally a 0x00 byte and the image's own `ENV` lines, then optionally
//! another 0x00 and the container's extra labels (`KEY=VALUE` lines; a
//! line starting with `!` is an image label too). The policy allows
//! `arn:aws:iam::123456789012:role/ci-*` only, and its file lists one
//! runner, so whatever the environment and labels say, a granted role is a
//! `ci-*` role at the root path of that account, with an external id STS
//! would take, for a container whose runner label is that runner's and not
//! its image's, and whose image carries no type label.
#![no_main]

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock},
};

use libfuzzer_sys::fuzz_target;
use metaproxy::{
    model::container::Container,
    model::ids::{AccountId, ContainerId},
    model::id_token::TokenState,
    policy::{Policy, RoleDecision},
    policy::file::PolicyFile,
};

const ACCOUNT: &str = "123456789012";
const RUNNER: &str = "r1";
const RUNNER_LABEL: &str = "com.gitlab.gitlab-runner.runner.id";
const TYPE_LABEL: &str = "com.gitlab.gitlab-runner.type";

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
        let policy = Policy::new(&allow, &[], account).unwrap();
        let file = format!(
            "[[runner]]\nid = \"{RUNNER}\"\nroles = [\"arn:aws:iam::{ACCOUNT}:role/**\"]\n"
        );
        policy.set_file(Some(PolicyFile::parse("fuzz.toml", &file).unwrap()));
        policy
    })
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == 0);
    let env = parts.next().unwrap_or_default();
    let image_env = parts.next().unwrap_or_default();
    let label_lines = lines(parts.next().unwrap_or_default());
    let mut labels = HashMap::from([(
        "com.gitlab.gitlab-runner.job.id".to_string(),
        "1".to_string(),
    )]);
    let mut image_labels = HashMap::new();
    for line in &label_lines {
        let (image, kv) = match line.strip_prefix('!') {
            Some(kv) => (true, kv),
            None => (false, line.as_str()),
        };
        let Some((k, v)) = kv.split_once('=') else {
            continue;
        };
        // A container inherits its image's labels.
        if image {
            image_labels.insert(k.to_string(), v.to_string());
        }
        labels.insert(k.to_string(), v.to_string());
    }
    let container = Container {
        id: ContainerId::parse(&"ab".repeat(32)).unwrap(),
        name: "job".into(),
        labels,
        env: lines(env),
        image_env: lines(image_env),
        image_labels,
        addresses: None,
        cgroup: None,
        wire: Default::default(),
    };
    let policy = policy();
    // No ID token (the runner's facts decide); the token path has its own
    // unit tests.
    let decision = policy.decide_for(&container, &TokenState::Absent);
    assert_eq!(
        decision,
        policy.decide_for(&container, &TokenState::Absent),
        "not deterministic"
    );
    let RoleDecision::Role(role) = decision else {
        return;
    };
    assert_eq!(
        container.labels.get(RUNNER_LABEL).map(String::as_str),
        Some(RUNNER),
        "a runner the file does not list"
    );
    assert!(!container.image_labels.contains_key(RUNNER_LABEL));
    assert!(!container.image_labels.contains_key(TYPE_LABEL));
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

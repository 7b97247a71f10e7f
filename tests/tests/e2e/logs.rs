//! The daemon's logs: no secret, whatever the level.

use metaproxy_tests::bed::{E2eBed, ROLE_DEPLOY};
use serde_json::Value;

use crate::{assert_real_imds_untouched, CREDS};

#[test]
fn trace_logging_never_shows_a_token_or_a_secret() {
    // The admin turns everything up; the AWS SDK's trace output would carry
    // the daemon's own IMDS token.
    let bed = E2eBed::start_with_env(&[], &[("METAPROXY_LOG", "trace")]).expect("bed");
    let c = bed
        .container(
            "traced",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &[],
        )
        .unwrap();
    let token = c.token_header(60);
    let creds = c.imds("GET", &format!("{CREDS}{ROLE_DEPLOY}"), &[&token]);
    assert_eq!(creds["status"], 200, "{creds}");
    let doc: Value = serde_json::from_str(creds["body"].as_str().unwrap()).unwrap();
    let log = bed.daemon.log();
    assert!(log.contains("accepted connection"), "debug logging is on");
    let issued = bed.imds.issued_tokens();
    assert!(
        !issued.is_empty(),
        "the daemon fetched its own credentials with a token"
    );
    for secret in issued.iter().map(String::as_str).chain([
        doc["SecretAccessKey"].as_str().unwrap(),
        doc["Token"].as_str().unwrap(),
        token.split_once(": ").unwrap().1,
    ]) {
        assert!(!log.contains(secret), "the log shows a secret: {secret}");
    }
    assert_real_imds_untouched(&bed);
}

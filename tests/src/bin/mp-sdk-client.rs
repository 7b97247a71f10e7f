//! A real AWS SDK client, run inside job containers: it loads credentials
//! the way any Rust program does (aws-config's default chain, which inside a
//! container ends at IMDS, i.e. at metaproxy) and calls GetCallerIdentity at
//! the STS endpoint in `AWS_ENDPOINT_URL_STS`. Prints one JSON line.
//!
//! `mp-sdk-client [REPEAT]` loads a fresh config REPEAT times (default 1),
//! so every round fetches credentials from IMDS again.

use serde_json::json;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let repeat: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let mut arns = Vec::new();
    let mut keys = Vec::new();
    let mut errors = Vec::new();
    for _ in 0..repeat {
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .load()
            .await;
        let sts = aws_sdk_sts::Client::new(&config);
        match sts.get_caller_identity().send().await {
            Ok(out) => {
                arns.push(out.arn.unwrap_or_default());
                if let Some(provider) = config.credentials_provider() {
                    use aws_credential_types::provider::ProvideCredentials as _;
                    if let Ok(c) = provider.provide_credentials().await {
                        keys.push(c.access_key_id().to_string());
                    }
                }
            }
            Err(e) => errors.push(aws_sdk_sts::error::DisplayErrorContext(e).to_string()),
        }
    }
    println!(
        "{}",
        json!({ "ok": errors.is_empty(), "arns": arns, "access_key_ids": keys, "errors": errors })
    );
}

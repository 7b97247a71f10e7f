//! The documents IMDS answers with, field for field.

use std::time::SystemTime;

use serde::Serialize;

use crate::credentials::Credentials;

/// The credentials document, field for field as IMDS writes it.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct CredentialsDocument<'a> {
    code: &'static str,
    last_updated: String,
    #[serde(rename = "Type")]
    kind: &'static str,
    access_key_id: &'a str,
    secret_access_key: &'a str,
    token: &'a str,
    expiration: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    account_id: Option<String>,
}

impl<'a> CredentialsDocument<'a> {
    pub fn new(c: &'a Credentials, account_id: Option<String>) -> Self {
        Self {
            code: "Success",
            last_updated: imds_time(c.last_updated),
            kind: "AWS-HMAC",
            access_key_id: &c.access_key_id,
            secret_access_key: c.secret_access_key.expose(),
            token: c.session_token.expose(),
            expiration: imds_time(c.expiration),
            account_id,
        }
    }
}

/// The container-credentials endpoint's answer, as the ECS agent and the
/// EKS Pod Identity Agent write it.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ContainerCredentialsDocument<'a> {
    access_key_id: &'a str,
    secret_access_key: &'a str,
    token: &'a str,
    expiration: String,
    account_id: String,
    role_arn: String,
}

impl<'a> ContainerCredentialsDocument<'a> {
    pub fn new(c: &'a Credentials, role: &crate::model::ids::RoleArn) -> Self {
        Self {
            access_key_id: &c.access_key_id,
            secret_access_key: c.secret_access_key.expose(),
            token: c.session_token.expose(),
            expiration: imds_time(c.expiration),
            account_id: role.account().to_string(),
            role_arn: role.to_string(),
        }
    }
}

/// `/latest/meta-data/iam/info` for a container whose role is `role`.
pub fn iam_info(role: &crate::model::ids::RoleArn, now: SystemTime) -> String {
    let body = serde_json::json!({
        "Code": "Success",
        "LastUpdated": imds_time(now),
        "InstanceProfileArn": format!("arn:{}:iam::{}:instance-profile/{}", role.partition(), role.account(), role.name()),
        "InstanceProfileId": "AIPAMETAPROXY",
    });
    serde_json::to_string_pretty(&body).unwrap_or_default()
}

/// `YYYY-MM-DDTHH:MM:SSZ`, as IMDS writes times (no fractions).
pub fn imds_time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    #[test]
    fn times_look_like_imds() {
        let t = UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        assert_eq!(imds_time(t), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn credentials_document_has_the_imds_shape() {
        let c = Credentials {
            access_key_id: "ASIAX".into(),
            secret_access_key: crate::credentials::Secret::new("s".into()),
            session_token: crate::credentials::Secret::new("t".into()),
            expiration: UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
            last_updated: UNIX_EPOCH,
            assumed_role_arn: String::new(),
        };
        let doc: serde_json::Value =
            serde_json::to_value(CredentialsDocument::new(&c, None)).unwrap();
        assert_eq!(doc["Code"], "Success");
        assert_eq!(doc["Type"], "AWS-HMAC");
        assert_eq!(doc["AccessKeyId"], "ASIAX");
        assert_eq!(doc["SecretAccessKey"], "s");
        assert_eq!(doc["Token"], "t");
        assert_eq!(doc["Expiration"], "2023-11-14T22:13:20Z");
        assert!(doc.get("AccountId").is_none());
        let ext: serde_json::Value =
            serde_json::to_value(CredentialsDocument::new(&c, Some("123456789012".into())))
                .unwrap();
        assert_eq!(ext["AccountId"], "123456789012");
    }
}

//! AWS as the running daemon sees it: its own identity, the instance's
//! IMDS mode as it measured it, and for each role of the runner configs
//! whether metaproxy's allow-list and policy file admit it and whether the
//! role's trust policy lets the instance role in (a dry AssumeRole by the
//! daemon: session `metaproxy-doctor`, the shortest duration, the
//! credentials dropped at once).

use std::sync::{Arc, OnceLock};

use super::{runner::RunnerRole, Check, CheckId, Level};
use crate::{
    config::RunConfig,
    model::ids::{AccountId, RoleArn},
    ops::admin::{AwsStatus, Trial},
    policy::{file::PolicyFile, Policy},
};

const AREA: &str = "aws";

/// The daemon's identity and the instance's IMDS mode.
pub fn daemon_aws_checks(aws: &AwsStatus) -> Vec<Check> {
    let identity = match &aws.identity {
        Some(arn) => Check::new(AREA, CheckId::Identity, Level::Ok, format!("the daemon is {arn}")),
        None => Check::new(
            AREA,
            CheckId::Identity,
            Level::Fail,
            "the daemon's own credentials have not worked yet (GetCallerIdentity)",
        )
        .fix("give the instance a profile whose role may call sts:GetCallerIdentity, and check the daemon's log"),
    };
    let imds = match aws.instance_requires_tokens {
        Some(true) => Check::new(AREA, CheckId::ImdsMode, Level::Ok, "the instance requires IMDSv2 tokens"),
        Some(false) => Check::new(
            AREA,
            CheckId::ImdsMode,
            Level::Warn,
            "the instance takes IMDSv1 (tokens optional): a second, independent barrier is off",
        )
        .fix("aws ec2 modify-instance-metadata-options --instance-id $(ec2-metadata -i | cut -d' ' -f2) --http-tokens required --http-put-response-hop-limit 1"),
        None => Check::new(
            AREA,
            CheckId::ImdsMode,
            Level::Skip,
            "not measured: the daemon asks the instance only with --imdsv1 mirror (the default), and has not heard from it yet if it is",
        ),
    };
    vec![identity, imds]
}

/// The role a runner's `IAM_ROLE` names, as metaproxy would take it: `Ok(None)` for no
/// role, `Err` for a check to report.
fn role_of(area: &str, value: &str, account: Option<&AccountId>) -> Result<Option<RoleArn>, Check> {
    let check = |level, found: String| Check::new(area, CheckId::Role, level, found);
    if value.is_empty() {
        return Ok(None);
    }
    if value.starts_with("arn:") {
        return RoleArn::parse(value).map(Some).map_err(|_| {
            check(Level::Fail, format!("IAM_ROLE {value:?} is not a role ARN"))
                .fix("IAM_ROLE=arn:aws:iam::123456789012:role/NAME, or a role name")
        });
    }
    match account {
        Some(account) => RoleArn::from_name(value, account).map(Some).map_err(|_| {
            check(Level::Fail, format!("IAM_ROLE {value:?} is not a role name"))
                .fix("IAM_ROLE=NAME or a role ARN")
        }),
        None => Err(check(
            Level::Skip,
            format!("IAM_ROLE {value:?} names a role of the instance's account, which is not known here"),
        )),
    }
}

/// Whether metaproxy's allow-list and policy file admit each runner's role;
/// the roles worth a dry AssumeRole come back with their runners.
pub fn role_checks(
    roles: &[RunnerRole],
    config: &RunConfig,
    account: Option<&AccountId>,
) -> (Vec<Check>, Vec<(RunnerRole, RoleArn)>) {
    let lock = Arc::new(OnceLock::new());
    if let Some(a) = account {
        let _ = lock.set(a.clone());
    }
    let policy = Policy::new(&config.allow_role, &[], lock).ok();
    let file = config
        .policy_file
        .as_deref()
        .and_then(|p| PolicyFile::load(p).ok());
    let mut checks = Vec::new();
    let mut to_try = Vec::new();
    for runner in roles {
        let (area, value) = (&runner.area, &runner.role);
        let arn = match role_of(area, value, account) {
            Ok(Some(arn)) => arn,
            Ok(None) => {
                checks.push(Check::new(
                    area,
                    CheckId::Role,
                    Level::Ok,
                    "none (IAM_ROLE is empty)",
                ));
                continue;
            }
            Err(check) => {
                checks.push(check);
                continue;
            }
        };
        // Without --allow-role, roles of the instance's account are
        // allowed: unknown offline, so not judged.
        let admitted = policy
            .as_ref()
            .filter(|_| !config.allow_role.is_empty() || account.is_some())
            .map(|p| p.admits(&arn));
        let check = match (admitted, &file) {
            (Some(Err(refusal)), _) => Check::new(
                area,
                CheckId::Role,
                Level::Fail,
                format!("{refusal}: its jobs get nothing"),
            )
            .fix(format!(
                "add {arn} to METAPROXY_ALLOW_ROLE, or change the runner's IAM_ROLE"
            )),
            (_, Some(file)) if !file.names(&arn) => Check::new(
                area,
                CheckId::Role,
                Level::Fail,
                format!(
                    "no entry of {} names {arn}: its jobs get nothing",
                    file.path()
                ),
            )
            .fix(format!(
                "add a [[rule]] (or the runner's [[runner]] roles) for {arn}"
            )),
            _ => {
                to_try.push((runner.clone(), arn.clone()));
                Check::new(area, CheckId::Role, Level::Ok, format!("{arn} is allowed"))
            }
        };
        checks.push(check);
    }
    (checks, to_try)
}

/// A dry AssumeRole's outcome as a check. `identity` is the daemon's own
/// ARN (for the fix), `session` whether tags and SourceIdentity are on.
pub fn trust_check(
    area: &str,
    arn: &RoleArn,
    trial: &Trial,
    identity: Option<&str>,
    tags: bool,
    source_identity: bool,
) -> Check {
    if trial.ok {
        return Check::new(
            area,
            CheckId::TrustPolicy,
            Level::Ok,
            format!("the instance role may assume {arn}"),
        );
    }
    let message = trial.message.clone().unwrap_or_default();
    // STS's code; or, where the SDK could not read it (an error body of
    // an unexpected content type), the code in the body itself.
    let denied = trial.code.as_deref() == Some("AccessDenied")
        || message.contains("<Code>AccessDenied</Code>");
    if !denied {
        return Check::new(
            area,
            CheckId::TrustPolicy,
            Level::Fail,
            format!(
                "AssumeRole {arn}: {}",
                crate::model::id_token::shorten(&message, 300)
            ),
        )
        .fix("check the role exists and STS is reachable from the instance");
    }
    let principal = identity
        .and_then(instance_role_arn)
        .unwrap_or_else(|| "arn:aws:iam::ACCOUNT:role/INSTANCE-ROLE".into());
    let mut actions = vec!["\"sts:AssumeRole\""];
    if tags {
        actions.push("\"sts:TagSession\"");
    }
    if source_identity {
        actions.push("\"sts:SetSourceIdentity\"");
    }
    Check::new(
        area,
        CheckId::TrustPolicy,
        Level::Fail,
        format!("{arn} does not let the instance role assume it: its jobs get nothing"),
    )
    .fix(format!(
        "add to {}'s trust policy: {{\"Effect\": \"Allow\", \"Principal\": {{\"AWS\": \"{principal}\"}}, \"Action\": [{}]}}",
        arn.name(),
        actions.join(", ")
    ))
}

/// `arn:aws:iam::ACCOUNT:role/NAME` of an assumed-role session ARN
/// (`arn:aws:sts::ACCOUNT:assumed-role/NAME/SESSION`).
pub fn instance_role_arn(session: &str) -> Option<String> {
    let rest = session.strip_prefix("arn:")?;
    let (partition, rest) = rest.split_once(":sts::")?;
    let (account, rest) = rest.split_once(":assumed-role/")?;
    let (name, _) = rest.rsplit_once('/')?;
    Some(format!("arn:{partition}:iam::{account}:role/{name}"))
}

//! metaproxy's own configuration as its unit runs it: the unit's
//! `EnvironmentFile` (`/etc/default/metaproxy`) read the way systemd reads
//! it, turned into the flags of `metaproxy run`, and checked exactly as
//! `run` checks them at start, plus what `run` cannot refuse but an admin
//! should hear: an allow-list as wide as the account, metrics on an address
//! containers reach.

use std::{net::SocketAddr, path::Path};

use clap::ArgAction;

use std::sync::{Arc, OnceLock};

use super::{Check, CheckId, Level};
use crate::{
    config::{self, flags::RunArgs, Host, RunConfig},
    model::ids::{AccountId, RoleArn},
    policy::file::PolicyFile,
    policy::Policy,
};

const AREA: &str = "metaproxy";

/// `KEY=VALUE` lines as systemd's `EnvironmentFile=` takes them: blank
/// lines and `#`/`;` comments skipped, one pair of surrounding quotes
/// removed.
pub fn environment_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let unquoted = ['"', '\'']
                .iter()
                .find_map(|q| v.strip_prefix(*q).and_then(|v| v.strip_suffix(*q)))
                .unwrap_or(v);
            (k.trim().to_string(), unquoted.to_string())
        })
        .collect()
}

/// Variables the daemon reads that are no flag's.
const NOT_FLAGS: [&str; 2] = ["METAPROXY_LOG", "METAPROXY_GUARD_TC"];

/// The `metaproxy run` flags `vars` stand for (each flag's `METAPROXY_*`
/// variable), the `METAPROXY_*` variables that are no flag's, and the
/// values `run` would not take (a switch is `true` or `false`, exactly as
/// clap parses it).
pub fn run_flags(vars: &[(String, String)]) -> (Vec<String>, Vec<String>, Vec<String>) {
    let run = RunArgs::command();
    let mut flags = Vec::new();
    let mut bad = Vec::new();
    let mut known: Vec<String> = NOT_FLAGS.iter().map(|v| v.to_string()).collect();
    for arg in run.get_arguments() {
        let (Some(env), Some(long)) = (arg.get_env(), arg.get_long()) else {
            continue;
        };
        let env = env.to_string_lossy();
        known.push(env.to_string());
        let Some((_, value)) = vars.iter().rev().find(|(k, _)| *k == env) else {
            continue;
        };
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            // As clap parses a switch's variable (its BoolValueParser):
            // exactly `true` or `false`, anything else refused.
            match value.as_str() {
                "true" => flags.push(format!("--{long}")),
                "false" => {}
                _ => bad.push(format!("{env}={value}")),
            }
        } else {
            flags.push(format!("--{long}={value}"));
        }
    }
    let unknown = vars
        .iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("METAPROXY_") && !known.contains(k))
        .cloned()
        .collect();
    (flags, unknown, bad)
}

/// What the unit adds to the file: its `Environment=` (which the file
/// overrides, as systemd applies `EnvironmentFile=` after it) and the
/// arguments its `ExecStart` gives `metaproxy run` (which override both).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unit {
    pub environment: Vec<(String, String)>,
    pub args: Vec<String>,
}

/// The unit as `systemctl show -p Environment,ExecStart metaproxy.service`
/// prints it. `None` where it cannot be read (no systemd running).
pub fn unit(show: &str) -> Option<Unit> {
    let mut unit = Unit::default();
    let mut seen = false;
    for line in show.lines() {
        if let Some(env) = line.strip_prefix("Environment=") {
            seen = true;
            unit.environment = env
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                .collect();
        } else if let Some(exec) = line.strip_prefix("ExecStart=") {
            seen = true;
            let argv = exec
                .split(" ; ")
                .find_map(|part| part.trim_start_matches("{ ").strip_prefix("argv[]="))
                .unwrap_or("");
            let mut words = argv.split_whitespace().skip(1);
            if words.next() == Some("run") {
                unit.args = words.map(str::to_string).collect();
            }
        }
    }
    seen.then_some(unit)
}

/// The unit of this host, from systemd.
pub fn this_unit() -> Option<Unit> {
    let out = std::process::Command::new("systemctl")
        .args(["show", "-p", "Environment,ExecStart", "metaproxy.service"])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    unit(&String::from_utf8_lossy(&out.stdout))
}

/// The configuration the unit would start with, and the checks of it.
pub fn settings_checks(
    path: &Path,
    text: Option<&str>,
    unit: Option<&Unit>,
    host: &dyn Host,
) -> (Option<RunConfig>, Vec<Check>) {
    let mut checks = Vec::new();
    let mut vars: Vec<(String, String)> = unit.map(|u| u.environment.clone()).unwrap_or_default();
    vars.extend(text.map(environment_file).unwrap_or_default());
    let (mut flags, unknown, bad) = run_flags(&vars);
    // As clap does: a flag on the command line wins over its variable.
    let unit_args = unit.map(|u| u.args.clone()).unwrap_or_default();
    let name = |f: &str| {
        f.strip_prefix("--")
            .map(|f| f.split('=').next().unwrap_or(f).to_string())
    };
    let given: Vec<String> = unit_args.iter().filter_map(|a| name(a)).collect();
    flags.retain(|f| name(f).is_none_or(|n| !given.contains(&n)));
    flags.extend(unit_args);
    if !bad.is_empty() {
        checks.push(
            Check::new(
                AREA,
                CheckId::Flags,
                Level::Fail,
                format!(
                    "{}: {}: metaproxy would refuse to start (a switch is true or false)",
                    path.display(),
                    bad.join(", ")
                ),
            )
            .fix(format!("write true or false in {}", path.display())),
        );
        return (None, checks);
    }
    if !unknown.is_empty() {
        checks.push(
            Check::new(
                AREA,
                CheckId::Settings,
                Level::Warn,
                format!(
                    "{}: {} set no flag of `metaproxy run` and are ignored",
                    path.display(),
                    unknown.join(", ")
                ),
            )
            .fix("check the names against `metaproxy run --help`"),
        );
    }
    let source = match text {
        Some(_) => path.display().to_string(),
        None => format!("no {} (the unit's defaults)", path.display()),
    };
    let run = match RunArgs::parse_flags(&flags) {
        Ok(run) => run,
        Err(e) => {
            let first = e.to_string();
            let first = first.lines().next().unwrap_or_default().to_string();
            checks.push(
                Check::new(
                    AREA,
                    CheckId::Flags,
                    Level::Fail,
                    format!("{source}: {first}"),
                )
                .fix(format!("correct it in {}", path.display())),
            );
            return (None, checks);
        }
    };
    let config = match RunConfig::from_args_on(&run, host) {
        Ok(config) => config,
        Err(e) => {
            checks.push(
                Check::new(
                    AREA,
                    CheckId::Flags,
                    Level::Fail,
                    format!("{source}: metaproxy would refuse to start: {e}"),
                )
                .fix(format!("correct it in {}", path.display())),
            );
            return (None, checks);
        }
    };
    checks.push(Check::new(
        AREA,
        CheckId::Flags,
        Level::Ok,
        format!(
            "{source}: metaproxy run {}",
            if flags.is_empty() {
                "(no flags)".to_string()
            } else {
                flags.join(" ")
            }
        ),
    ));
    if let Some(file) = &config.policy_file {
        checks.push(policy_file_check(file));
    }
    checks.push(allow_role_check(&config.allow_role));
    checks.push(metrics_check(config.metrics));
    (Some(config), checks)
}

fn policy_file_check(path: &Path) -> Check {
    let loaded = PolicyFile::load(path)
        .map_err(|e| e.to_string())
        .and_then(|f| {
            config::check_policy_file(path)
                .map(|()| f)
                .map_err(|e| e.to_string())
        });
    match loaded {
        Ok(file) => Check::new(
            AREA,
            CheckId::PolicyFile,
            Level::Ok,
            format!(
                "{} loads ({} rules, {} runners)",
                path.display(),
                file.rules(),
                file.runners()
            ),
        ),
        Err(e) => Check::new(AREA, CheckId::PolicyFile, Level::Fail, e).fix(format!(
            "`metaproxy policy check {}` names the line",
            path.display()
        )),
    }
}

/// `--allow-role` must name an account: a glob over accounts admits roles of
/// accounts the admin never meant, and `role/*` every role of one.
pub fn allow_role_check(patterns: &[String]) -> Check {
    if patterns.is_empty() {
        return Check::new(
            AREA,
            CheckId::AllowRole,
            Level::Ok,
            "not set: the policy file's roles in the instance's own account",
        );
    }
    let account_of = |p: &str| -> Option<String> {
        let rest = p.strip_prefix("arn:")?;
        let mut parts = rest.splitn(5, ':');
        let (_partition, service, _region, account) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        (service == "iam").then(|| account.to_string())
    };
    let wide: Vec<&String> = patterns
        .iter()
        .filter(|p| {
            account_of(p).is_none_or(|a| a.len() != 12 || !a.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    if !wide.is_empty() {
        return Check::new(
            AREA,
            CheckId::AllowRole,
            Level::Fail,
            format!(
                "{} {} not name one account: roles of any account the pattern matches are allowed",
                wide.iter()
                    .map(|p| format!("{p:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                if wide.len() == 1 { "does" } else { "do" }
            ),
        )
        .fix("write each as arn:aws:iam::123456789012:role/PREFIX-*");
    }
    // Whatever the glob's shape: does it admit roles no admin names on
    // purpose?
    let whole: Vec<&String> = patterns
        .iter()
        .filter(|p| {
            let Some(account) = account_of(p) else {
                return false;
            };
            let Ok(policy) = Policy::new(&[p.to_string()], &[], Arc::new(OnceLock::new())) else {
                return false;
            };
            ["zz-metaproxy-doctor", "zz/metaproxy/doctor", "admin"]
                .iter()
                .filter_map(|name| AccountId::parse(&account).map(|a| (name, a)))
                .filter_map(|(name, a)| RoleArn::from_name(name, &a).ok())
                .any(|arn| policy.admits(&arn).is_ok())
        })
        .collect();
    if !whole.is_empty() {
        return Check::new(
            AREA,
            CheckId::AllowRole,
            Level::Warn,
            format!(
                "{} {} every role of the account, admin roles too",
                whole
                    .iter()
                    .map(|p| format!("{p:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                if whole.len() == 1 { "allows" } else { "allow" }
            ),
        )
        .fix("narrow it to the jobs' roles, such as arn:aws:iam::123456789012:role/ci-*");
    }
    Check::new(AREA, CheckId::AllowRole, Level::Ok, patterns.join(", "))
}

/// Containers reach every address of the host that is not loopback.
pub fn metrics_check(addr: Option<SocketAddr>) -> Check {
    match addr {
        None => Check::new(AREA, CheckId::Metrics, Level::Ok, "off"),
        Some(a) if a.ip().is_loopback() => {
            Check::new(AREA, CheckId::Metrics, Level::Ok, format!("{a} (loopback)"))
        }
        Some(a) => Check::new(
            AREA,
            CheckId::Metrics,
            Level::Warn,
            format!(
                "{a}: containers reach the host's addresses; they would see what every job does"
            ),
        )
        .fix("METAPROXY_METRICS=127.0.0.1:9169, or firewall the port from the Docker bridges"),
    }
}

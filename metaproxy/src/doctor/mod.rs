//! `metaproxy doctor`: checks a runner host and its gitlab-runner
//! configuration against what keeps metaproxy safe. One line per check
//! (ok, warn, fail, skip) with what was found and the fix; `--json` for
//! the same as objects. Any failure makes the exit code non-zero; warnings
//! alone do not, so an AMI build can gate on it.
//!
//! Everything read here is input, not truth: the runner configuration is
//! parsed with a real TOML parser, and a value it does not understand is a
//! finding, never a crash.

use std::{fmt, path::PathBuf};

use clap::Args;
use serde::Serialize;

use crate::{
    config::{
        self,
        flags::{AdminArgs, PinArgs},
    },
    model::ids::{AccountId, RoleArn},
    ops::{admin::Trial, admin_client},
};

mod aws;
mod docker;
mod host;
mod runner;
mod settings;
mod spec;
mod systemd;

#[cfg(test)]
use host::kernel_check;
use host::{daemon_checks, host_checks};
pub use runner::runner_checks;

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
    /// Not applicable here (another executor, say), with the reason.
    Skip,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Self::Ok => "ok",
            Self::Warn => "warn",
            Self::Fail => "FAIL",
            Self::Skip => "skip",
        })
    }
}

/// Which check a finding is: one name each, printed and in `--json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckId {
    // The host.
    Kernel,
    CgroupV2,
    Bpffs,
    Layer2,
    Redirect,
    PolicyRouting,
    Daemon,
    OwnCgroup,
    PacketGuard,
    Layer2Lock,
    // systemd.
    Systemctl,
    Unit,
    Ordering,
    // metaproxy's settings.
    Flags,
    Settings,
    PolicyFile,
    AllowRole,
    Metrics,
    // Docker.
    Reachable,
    Containers,
    UsernsRemap,
    // The runner config as a whole.
    Readable,
    Parses,
    Runners,
    // A runner or a live container.
    Executor,
    IamRole,
    Privileged,
    DockerSocket,
    HostPaths,
    NetworkMode,
    CapDrop,
    CapAdd,
    ContainerCredentials,
    SlotCgroups,
    AllowHostCgroup,
    // AWS.
    Identity,
    ImdsMode,
    Role,
    TrustPolicy,
    TrustPolicies,
}

impl CheckId {
    pub fn name(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::CgroupV2 => "cgroup v2",
            Self::Bpffs => "bpffs",
            Self::Layer2 => "layer 2",
            Self::Redirect => "redirect",
            Self::PolicyRouting => "policy routing",
            Self::Daemon => "daemon",
            Self::OwnCgroup => "own cgroup",
            Self::PacketGuard => "packet guard",
            Self::Layer2Lock => "layer-2 lock",
            Self::Systemctl => "systemctl",
            Self::Unit => "metaproxy.service",
            Self::Ordering => "ordering",
            Self::Flags => "flags",
            Self::Settings => "settings",
            Self::PolicyFile => "policy file",
            Self::AllowRole => "allow-role",
            Self::Metrics => "metrics",
            Self::Reachable => "reachable",
            Self::Containers => "containers",
            Self::UsernsRemap => "userns-remap",
            Self::Readable => "readable",
            Self::Parses => "parses",
            Self::Runners => "runners",
            Self::Executor => "executor",
            Self::IamRole => "IAM_ROLE",
            Self::Privileged => "privileged",
            Self::DockerSocket => "docker socket",
            Self::HostPaths => "host paths",
            Self::NetworkMode => "network_mode",
            Self::CapDrop => "cap_drop",
            Self::CapAdd => "cap_add",
            Self::ContainerCredentials => "container credentials",
            Self::SlotCgroups => "slot cgroups",
            Self::AllowHostCgroup => "allow-host-cgroup",
            Self::Identity => "identity",
            Self::ImdsMode => "IMDS mode",
            Self::Role => "role",
            Self::TrustPolicy => "trust policy",
            Self::TrustPolicies => "trust policies",
        }
    }
}

impl fmt::Display for CheckId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

impl Serialize for CheckId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// `host` or `runner <name>`.
    pub area: String,
    pub check: CheckId,
    pub level: Level,
    /// What was found.
    pub found: String,
    /// The exact fix, where something is wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn new(area: &str, check: CheckId, level: Level, found: impl Into<String>) -> Self {
        Self {
            area: area.to_string(),
            check,
            level,
            found: found.into(),
            fix: None,
        }
    }

    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

/// `metaproxy doctor`'s flags.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// gitlab-runner's configuration.
    #[arg(long, default_value = "/etc/gitlab-runner/config.toml")]
    pub runner_config: PathBuf,

    /// Print the checks as JSON objects.
    #[arg(long)]
    pub json: bool,

    /// metaproxy's settings, as its unit reads them (EnvironmentFile).
    /// Default: /etc/default/metaproxy (Debian, Ubuntu), or
    /// /etc/sysconfig/metaproxy (Amazon Linux and other RPM distributions)
    /// where only that one exists.
    #[arg(long)]
    pub defaults: Option<PathBuf>,

    /// Skip what needs the network or the running daemon's AWS access
    /// (identity, trust policies); for AMI builds. A Docker that does not
    /// answer is then a warning.
    #[arg(long)]
    pub offline: bool,

    #[command(flatten)]
    pub pins: PinArgs,

    #[command(flatten)]
    pub admin: AdminArgs,
}

pub async fn doctor(args: DoctorArgs) -> anyhow::Result<()> {
    let checks = gather(&args).await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            println!("{}", line(c));
        }
    }
    let failed = checks.iter().filter(|c| c.level == Level::Fail).count();
    anyhow::ensure!(failed == 0, "{failed} check(s) failed");
    Ok(())
}

/// Why jobs can still open packet sockets here: as the running daemon
/// reports it, or, without one, as the kernel says.
fn layer2_gap(status: Option<&crate::ops::admin::Status>) -> Option<String> {
    match status {
        Some(s) if s.layer2.sockets_refused => None,
        Some(s) => Some(
            s.layer2
                .gap
                .clone()
                .unwrap_or_else(|| "the running daemon has no layer-2 lock (upgrade it)".into()),
        ),
        None => {
            let offline = crate::kernel::lsm::bpf_lsm();
            crate::kernel::lsm::layer2_gap(offline.as_ref().map(|_| ()).map_err(String::as_str))
        }
    }
}

/// Where the unit's settings are: `given`, or the file of the
/// distribution's layout that `exists` (the .deb's /etc/default, the
/// .rpm's /etc/sysconfig), the .deb's when neither does.
fn settings_file(
    given: Option<&std::path::Path>,
    exists: impl Fn(&std::path::Path) -> bool,
) -> PathBuf {
    if let Some(given) = given {
        return given.to_path_buf();
    }
    let (deb, rpm) = (
        std::path::Path::new("/etc/default/metaproxy"),
        std::path::Path::new("/etc/sysconfig/metaproxy"),
    );
    if !exists(deb) && exists(rpm) {
        rpm.to_path_buf()
    } else {
        deb.to_path_buf()
    }
}

/// Every check, in the order the README lists them.
async fn gather(args: &DoctorArgs) -> Vec<Check> {
    // metaproxy's settings first: where it pins and listens, unless the
    // command line says otherwise.
    let path = settings_file(args.defaults.as_deref(), |p| p.exists());
    let defaults = std::fs::read_to_string(&path).ok();
    let (config, settings) = settings::settings_checks(
        &path,
        defaults.as_deref(),
        settings::this_unit().as_ref(),
        &config::ThisHost,
    );
    let pin_dir = match &config {
        Some(c)
            if args.pins.pin_dir == std::path::Path::new(crate::config::flags::DEFAULT_PIN_DIR) =>
        {
            c.pin_dir.clone()
        }
        _ => args.pins.pin_dir.clone(),
    };
    let admin_socket = match &config {
        Some(c)
            if args.admin.admin_socket
                == std::path::Path::new(crate::config::flags::DEFAULT_ADMIN_SOCKET) =>
        {
            c.admin_socket.clone()
        }
        _ => args.admin.admin_socket.clone(),
    };
    let mut checks = host_checks(&pin_dir).await;
    let (daemon, status) = daemon_checks(&admin_socket).await;
    checks.extend(daemon);
    if args.offline {
        // At AMI build time nothing runs yet: what only a running daemon
        // has is not a failure.
        for c in checks
            .iter_mut()
            .filter(|c| matches!(c.check, CheckId::Redirect | CheckId::Daemon))
        {
            if c.level == Level::Fail {
                c.level = Level::Skip;
                c.found = format!("--offline: {}", c.found);
            }
        }
    }
    checks.extend(systemd::systemd_checks());
    checks.extend(settings);
    checks.extend(docker::docker_checks(args.offline).await);
    let text = match std::fs::read_to_string(&args.runner_config) {
        Ok(text) => text,
        Err(e) => {
            checks.push(
                Check::new(
                    "runner config",
                    CheckId::Readable,
                    // Runners usually register when the instance boots.
                    if args.offline {
                        Level::Warn
                    } else {
                        Level::Fail
                    },
                    format!("{}: {e}", args.runner_config.display()),
                )
                .fix("pass the runner's config with --runner-config FILE"),
            );
            return checks;
        }
    };
    let context = runner::Context {
        container_credentials: config.as_ref().map(|c| {
            (
                c.container_credentials.clone(),
                c.container_credentials_options.path.clone(),
            )
        }),
        attached: config.as_ref().and_then(attached_below_mount),
        layer2_gap: layer2_gap(status.as_ref()),
        own_dirs: {
            let mut dirs = vec![
                pin_dir.display().to_string(),
                admin_socket
                    .parent()
                    .map_or_else(String::new, |p| p.display().to_string()),
            ];
            if let Some(c) = &config {
                dirs.push(c.state_dir.display().to_string());
            }
            dirs.retain(|d| d.len() > 1);
            dirs
        },
    };
    checks.extend(runner::runner_checks_in(&text, &context));
    let roles = runner::runner_roles(&text);
    let Some(config) = &config else {
        return checks;
    };
    checks.push(runner::host_allow_check(
        &config.allow_host_cgroup,
        &text,
        &runner_cgroups(),
    ));
    if args.offline {
        checks.extend(aws::role_checks(&roles, config, None).0);
        checks.push(Check::new(
            "aws",
            CheckId::TrustPolicies,
            Level::Skip,
            "--offline: identity and trust policies are not checked",
        ));
        return checks;
    }
    let Some(status) = status else {
        checks.push(Check::new(
            "aws",
            CheckId::TrustPolicies,
            Level::Skip,
            "metaproxy is not running: its identity and the roles' trust policies are checked through it",
        ));
        return checks;
    };
    let account = status.aws.account.as_deref().and_then(AccountId::parse);
    let (role_checks, to_try) = aws::role_checks(&roles, config, account.as_ref());
    if config.oidc.as_ref().is_some_and(|o| o.required) {
        // Jobs' roles are assumed with their own tokens: the instance role
        // needs neither credentials nor a place in any trust policy.
        checks.extend(role_checks);
        checks.push(Check::new(
            "aws",
            CheckId::TrustPolicies,
            Level::Skip,
            "--oidc-required: the roles must trust the GitLab instance's OIDC provider, which doctor does not try; the instance role needs no rights",
        ));
        return checks;
    }
    checks.extend(aws::daemon_aws_checks(&status.aws));
    checks.extend(role_checks);
    let mut tried: Vec<(RoleArn, Option<String>, Trial)> = Vec::new();
    for (runner, arn) in to_try {
        let external_id = runner.external_id.clone();
        let known = tried
            .iter()
            .find(|(a, e, _)| *a == arn && *e == external_id)
            .map(|(_, _, t)| t.clone());
        let trial = match known {
            Some(t) => t,
            None => {
                let t = admin_client::try_role(&admin_socket, arn.as_str(), external_id.as_deref())
                    .await
                    .unwrap_or_else(|e| Trial {
                        ok: false,
                        code: None,
                        message: Some(format!("{e:#}")),
                    });
                tried.push((arn.clone(), external_id, t.clone()));
                t
            }
        };
        checks.push(aws::trust_check(
            &runner.area,
            &arn,
            &trial,
            status.aws.identity.as_deref(),
            !config.session.tags.is_empty(),
            config.session.source_identity,
        ));
    }
    checks
}

/// `--cgroup` below the cgroup2 mount (`/` when unset: the mount's root).
/// The cgroups (below the cgroup2 mount) of the gitlab-runner processes
/// running here, or its package's unit where none runs.
fn runner_cgroups() -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            // By its executable's name (gitlab-runner-linux-amd64 too).
            std::fs::read_link(e.path().join("exe")).is_ok_and(|exe| {
                exe.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("gitlab-runner"))
            })
        })
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path().join("cgroup")).ok()?;
            metaproxy_common::mountinfo::own_cgroup2(&text).map(|c| c.to_string())
        })
        .collect();
    found.sort();
    found.dedup();
    if found.is_empty() {
        found.push(runner::RUNNER_SERVICE_CGROUP.into());
    }
    found
}

fn attached_below_mount(config: &config::RunConfig) -> Option<String> {
    let Some(cgroup) = &config.cgroup else {
        return Some("/".into());
    };
    let mount = crate::kernel::cgroup::cgroup2_mount().ok()?;
    let rel = cgroup.strip_prefix(&mount).ok()?;
    Some(format!("/{}", rel.display()).replace("//", "/"))
}

/// `level  area: check: found (fix: ...)`, with nothing a terminal would
/// interpret.
fn line(c: &Check) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|ch| {
                if crate::ops::logging::is_hidden(ch) {
                    '?'
                } else {
                    ch
                }
            })
            .collect()
    };
    let mut out = format!(
        "{:<4}  {}: {}: {}",
        c.level,
        clean(&c.area),
        c.check,
        clean(&c.found)
    );
    if let Some(fix) = &c.fix {
        out.push_str(&format!(" (fix: {})", clean(fix)));
    }
    out
}

#[cfg(test)]
mod tests;

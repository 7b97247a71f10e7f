//! `metaproxy doctor`: checks a runner host and its gitlab-runner
//! configuration against what keeps metaproxy safe. One line per check
//! (ok, warn, fail, skip) with what was found and the fix; `--json` for
//! the same as objects. Any failure makes the exit code non-zero; warnings
//! alone do not, so an AMI build can gate on it.
//!
//! Everything read here is input, not truth: the runner configuration is
//! parsed with a real TOML parser, and a value it does not understand is a
//! finding, never a crash.

use std::{fmt, path::Path};

use serde::Serialize;

use crate::{
    cli::DoctorArgs,
    kernel::{cgroup, probe},
    ops::admin_client,
};

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

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// `host` or `runner <name>`.
    pub area: String,
    pub check: &'static str,
    pub level: Level,
    /// What was found.
    pub found: String,
    /// The exact fix, where something is wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn new(area: &str, check: &'static str, level: Level, found: impl Into<String>) -> Self {
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

pub async fn doctor(args: DoctorArgs) -> anyhow::Result<()> {
    let mut checks = host_checks(&args.pins.pin_dir).await;
    checks.extend(daemon_checks(&args.admin.admin_socket).await);
    checks.extend(match std::fs::read_to_string(&args.runner_config) {
        Ok(text) => runner_checks(&text),
        Err(e) => vec![Check::new(
            "runner config",
            "readable",
            Level::Fail,
            format!("{}: {e}", args.runner_config.display()),
        )
        .fix("pass the runner's config with --runner-config FILE")],
    });
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

async fn host_checks(pin_dir: &Path) -> Vec<Check> {
    let mut checks = Vec::new();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    checks.push(kernel_check(release.trim()));
    checks.push(match cgroup::cgroup2_mount() {
        Ok(mount) => Check::new("host", "cgroup v2", Level::Ok, mount.display().to_string()),
        Err(e) => Check::new("host", "cgroup v2", Level::Fail, e.to_string())
            .fix("boot with the unified cgroup hierarchy (systemd.unified_cgroup_hierarchy=1)"),
    });
    checks.push(match probe::redirect_in_place(pin_dir) {
        Ok(Some(generation)) => Check::new(
            "host",
            "redirect",
            Level::Ok,
            format!("pinned in {} (generation {generation})", pin_dir.display()),
        ),
        Ok(None) => Check::new(
            "host",
            "redirect",
            Level::Fail,
            format!(
                "nothing pinned in {}: containers reach the real IMDS",
                pin_dir.display()
            ),
        )
        .fix("systemctl enable --now metaproxy"),
        Err(e) => Check::new("host", "redirect", Level::Fail, e.to_string())
            .fix("mount bpffs at /sys/fs/bpf and start metaproxy"),
    });
    checks
}

/// The io_uring releases whose bugs let a process bypass cgroup hooks.
fn kernel_check(release: &str) -> Check {
    let numbers: Vec<u32> = release
        .split(|c: char| !c.is_ascii_digit())
        .take(3)
        .filter_map(|n| n.parse().ok())
        .collect();
    let check = |level, found: String| Check::new("host", "kernel", level, found);
    match numbers[..] {
        [5, 10, patch, ..] if patch <= 161 => check(
            Level::Fail,
            format!("{release}: io_uring in 5.10.0-5.10.161 can connect without the hook"),
        )
        .fix("upgrade to 5.10.162 or later, or disable io_uring (sysctl kernel.io_uring_disabled=2 where supported)"),
        [5, 11, ..] => check(
            Level::Fail,
            format!("{release}: io_uring in 5.11 can connect without the hook"),
        )
        .fix("upgrade the kernel"),
        [major, minor, ..] if (major, minor) < (5, 10) => check(
            Level::Fail,
            format!("{release}: older than 5.10, which the probe needs"),
        )
        .fix("upgrade the kernel to 5.10.162 or later"),
        [_, _, ..] => check(Level::Ok, release.to_string()),
        _ => check(Level::Warn, format!("{release:?}: not a version this check reads")),
    }
}

async fn daemon_checks(socket: &Path) -> Vec<Check> {
    let status = match admin_client::status(socket).await {
        Ok(status) => status,
        Err(e) => {
            return vec![Check::new("host", "daemon", Level::Fail, format!("{e:#}"))
                .fix("systemctl enable --now metaproxy")]
        }
    };
    let mut checks = vec![Check::new(
        "host",
        "daemon",
        Level::Ok,
        format!(
            "running (pid {}, generation {})",
            status.pid, status.generation
        ),
    )];
    let unguarded: Vec<&str> = status
        .guard
        .routes
        .iter()
        .filter(|r| !r.guarded)
        .map(|r| r.address.as_str())
        .collect();
    checks.push(if status.guard.interfaces.is_empty() {
        Check::new(
            "host",
            "packet guard",
            Level::Fail,
            "on no interface: raw packets from jobs can reach IMDS",
        )
        .fix("check `metaproxy status` and the daemon's log for the route to 169.254.169.254")
    } else if !unguarded.is_empty() {
        Check::new(
            "host",
            "packet guard",
            Level::Fail,
            format!("routes to {} are not guarded", unguarded.join(", ")),
        )
        .fix(
            "restart metaproxy; if it persists, report the routes (`ip route get 169.254.169.254`)",
        )
    } else {
        let names: Vec<&str> = status
            .guard
            .interfaces
            .iter()
            .map(|i| i.name.as_str())
            .collect();
        Check::new(
            "host",
            "packet guard",
            Level::Ok,
            format!("{} on {}", status.guard.mode, names.join(", ")),
        )
    });
    checks
}

/// Executors whose jobs run in Docker containers on this host.
const DOCKER_EXECUTORS: [&str; 3] = ["docker", "docker-autoscaler", "docker+machine"];

/// Checks each `[[runners]]` entry of gitlab-runner's `config.toml`.
pub fn runner_checks(text: &str) -> Vec<Check> {
    let config: toml::Table = match text.parse::<toml::Table>() {
        Ok(c) => c,
        // The message and line only: the error's own rendering quotes the
        // offending line, which may be a runner's token.
        Err(e) => {
            let line = e
                .span()
                .map_or(0, |span| text[..span.start].matches('\n').count() + 1);
            return vec![Check::new(
                "runner config",
                "parses",
                Level::Fail,
                format!("line {line}: {}", e.message().trim_end()),
            )
            .fix("fix the TOML error at that line")];
        }
    };
    let Some(runners) = config.get("runners").and_then(toml::Value::as_array) else {
        return vec![Check::new(
            "runner config",
            "runners",
            Level::Warn,
            "no [[runners]] entries",
        )];
    };
    runners
        .iter()
        .enumerate()
        .flat_map(|(i, r)| runner(i, r))
        .collect()
}

fn strings(v: Option<&toml::Value>) -> Vec<&str> {
    v.and_then(toml::Value::as_array)
        .map(|a| a.iter().filter_map(toml::Value::as_str).collect())
        .unwrap_or_default()
}

fn runner(index: usize, r: &toml::Value) -> Vec<Check> {
    let name = r
        .get("name")
        .and_then(toml::Value::as_str)
        .map_or_else(|| format!("#{}", index + 1), str::to_string);
    let area = format!("runner {name}");
    let executor = r
        .get("executor")
        .and_then(toml::Value::as_str)
        .unwrap_or("");
    if !DOCKER_EXECUTORS.contains(&executor) {
        return vec![Check::new(
            &area,
            "executor",
            Level::Skip,
            format!("executor {executor:?}: its jobs are not Docker containers on this host"),
        )];
    }
    let docker = r.get("docker");
    let mut checks = Vec::new();
    let role_in = |env: Vec<&str>| env.into_iter().any(|e| e.starts_with("IAM_ROLE="));
    let in_runner = role_in(strings(r.get("environment")));
    let in_docker = role_in(strings(docker.and_then(|d| d.get("environment"))));
    checks.push(match (in_runner, in_docker) {
        (true, _) => Check::new(&area, "IAM_ROLE", Level::Ok, "set in the runner's environment"),
        (false, true) => Check::new(
            &area,
            "IAM_ROLE",
            Level::Fail,
            "only in [runners.docker], where gitlab-runner ignores it: a job's own IAM_ROLE variable would choose its role",
        )
        .fix("move it to the [[runners]] entry: environment = [\"IAM_ROLE=...\"]"),
        (false, false) => Check::new(
            &area,
            "IAM_ROLE",
            Level::Fail,
            "not set: a job's own IAM_ROLE variable cannot be told from the runner's",
        )
        .fix("add environment = [\"IAM_ROLE=\"] (empty: no role) or the role to the [[runners]] entry"),
    });
    let flag = |key: &str| {
        docker
            .and_then(|d| d.get(key))
            .and_then(toml::Value::as_bool)
            .unwrap_or(false)
    };
    checks.push(if flag("privileged") {
        Check::new(
            &area,
            "privileged",
            Level::Fail,
            "privileged = true: a job can detach the probe",
        )
        .fix("privileged = false in [runners.docker]")
    } else {
        Check::new(&area, "privileged", Level::Ok, "not privileged")
    });
    let sockets: Vec<&str> = strings(docker.and_then(|d| d.get("volumes")))
        .into_iter()
        .filter(|v| v.contains("docker.sock") || v.contains("containerd.sock"))
        .collect();
    checks.push(if sockets.is_empty() {
        Check::new(&area, "docker socket", Level::Ok, "not mounted")
    } else {
        Check::new(
            &area,
            "docker socket",
            Level::Fail,
            format!(
                "volumes {}: a job can start containers with any labels, environment or privileges",
                sockets.join(", ")
            ),
        )
        .fix("remove it from volumes; use a rootless or remote builder")
    });
    let network = docker
        .and_then(|d| d.get("network_mode"))
        .and_then(toml::Value::as_str)
        .unwrap_or("");
    checks.push(if network == "host" {
        Check::new(
            &area,
            "network_mode",
            Level::Warn,
            "host: jobs share the host's network namespace (the packet guard's cgroup layer covers it)",
        )
        .fix("drop network_mode = \"host\" unless the jobs need it")
    } else {
        Check::new(&area, "network_mode", Level::Ok, "a network of its own")
    });
    let upper = |v: Vec<&str>| -> Vec<String> {
        v.into_iter()
            .map(|c| c.trim().trim_start_matches("CAP_").to_ascii_uppercase())
            .collect()
    };
    let dropped = upper(strings(docker.and_then(|d| d.get("cap_drop"))));
    checks.push(if dropped.iter().any(|c| c == "NET_RAW" || c == "ALL") {
        Check::new(&area, "cap_drop", Level::Ok, "NET_RAW dropped")
    } else {
        Check::new(
            &area,
            "cap_drop",
            Level::Warn,
            "NET_RAW kept (Docker's default): jobs can ARP-spoof one another on the bridge; the packet guard still keeps them from IMDS",
        )
        .fix("cap_drop = [\"NET_RAW\"] in [runners.docker]")
    });
    let added: Vec<String> = upper(strings(docker.and_then(|d| d.get("cap_add"))))
        .into_iter()
        .filter(|c| ["NET_ADMIN", "SYS_ADMIN", "BPF", "ALL"].contains(&c.as_str()))
        .collect();
    checks.push(if added.is_empty() {
        Check::new(
            &area,
            "cap_add",
            Level::Ok,
            "no capability that reaches the host's network or BPF",
        )
    } else {
        Check::new(
            &area,
            "cap_add",
            Level::Fail,
            format!(
                "cap_add {}: a job can change its own network or BPF programs",
                added.join(", ")
            ),
        )
        .fix("remove them from cap_add")
    });
    checks
}

#[cfg(test)]
mod tests;

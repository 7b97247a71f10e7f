//! systemd: metaproxy's unit enabled, and docker, containerd and
//! gitlab-runner ordered after it (the package's drop-in, or the same
//! ordering by hand), so no container starts before the redirect exists.

use std::process::Command;

use super::{Check, CheckId, Level};

const AREA: &str = "systemd";
/// The units that start containers.
pub const DEPENDENTS: [&str; 3] = [
    "docker.service",
    "containerd.service",
    "gitlab-runner.service",
];

pub fn systemd_checks() -> Vec<Check> {
    let run = |args: &[&str]| {
        Command::new("systemctl").args(args).output().ok().map(|o| {
            (
                o.status.success(),
                String::from_utf8_lossy(&o.stdout).into_owned(),
            )
        })
    };
    let Some((_, enabled)) = run(&["is-enabled", "metaproxy.service"]) else {
        return vec![Check::new(
            AREA,
            CheckId::Systemctl,
            Level::Skip,
            "no systemctl on this host",
        )];
    };
    let show = run(&[
        "show",
        "-p",
        "Id,LoadState,After,Wants,ExecStartPre",
        DEPENDENTS[0],
        DEPENDENTS[1],
        DEPENDENTS[2],
    ]);
    match show {
        Some((true, text)) => {
            let mut checks = vec![enabled_check(enabled.trim())];
            checks.extend(ordering_checks(&text));
            checks
        }
        _ => vec![Check::new(
            AREA,
            CheckId::Systemctl,
            Level::Skip,
            "systemd is not running here (a container or a chroot): the unit and ordering are not checked",
        )],
    }
}

/// `systemctl is-enabled metaproxy.service`'s answer.
pub fn enabled_check(state: &str) -> Check {
    match state {
        "enabled" | "static" | "indirect" | "alias" => {
            Check::new(AREA, CheckId::Unit, Level::Ok, state.to_string())
        }
        other => Check::new(
            AREA,
            CheckId::Unit,
            Level::Fail,
            format!(
                "{}: after a reboot, containers start with no redirect",
                if other.is_empty() {
                    "not installed"
                } else {
                    other
                }
            ),
        )
        .fix("systemctl enable metaproxy.service"),
    }
}

/// One check per unit of `systemctl show -p Id,LoadState,After,Wants,ExecStartPre`
/// output (blocks separated by blank lines).
pub fn ordering_checks(show: &str) -> Vec<Check> {
    show.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let fields = |name: &str| -> Vec<&str> {
                block
                    .lines()
                    .filter_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
                    .collect()
            };
            let field = |name: &str| fields(name).first().copied().unwrap_or("");
            let unit = field("Id");
            if field("LoadState") == "not-found" {
                return Check::new(AREA, CheckId::Ordering, Level::Skip, format!("{unit}: not installed"));
            }
            let after = field("After").split_whitespace().any(|u| u == "metaproxy.service");
            // The gate must stop the unit when the redirect is missing: one
            // whose errors are ignored waits for nothing.
            let waits = fields("ExecStartPre").iter().any(|cmd| {
                cmd.contains("metaproxy status --redirect") && !cmd.contains("ignore_errors=yes")
            });
            match (after, waits) {
                (true, true) => Check::new(
                    AREA,
                    CheckId::Ordering,
                    Level::Ok,
                    format!("{unit} starts after metaproxy and waits for the redirect"),
                ),
                (true, false) => Check::new(
                    AREA,
                    CheckId::Ordering,
                    Level::Warn,
                    format!("{unit} starts after metaproxy.service but not only once the redirect exists: if metaproxy fails to start, it starts anyway"),
                )
                .fix(format!(
                    "add ExecStartPre=/usr/bin/metaproxy status --redirect to {unit}.d/metaproxy.conf (the .deb's drop-in has it)"
                )),
                (false, _) => Check::new(
                    AREA,
                    CheckId::Ordering,
                    Level::Fail,
                    format!("{unit} may start before metaproxy: its first containers would find no redirect"),
                )
                .fix(format!(
                    "install the drop-in: {}.d/metaproxy.conf with [Unit] Wants=metaproxy.service After=metaproxy.service (the .deb ships it), then systemctl daemon-reload",
                    unit
                )),
            }
        })
        .collect()
}

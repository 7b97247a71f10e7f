//! gitlab-runner's `config.toml`, entry by entry: what each Docker-based
//! runner gives its jobs.

use std::net::IpAddr;

use super::{
    spec::{capability, ContainerSpec},
    Check, CheckId, Level,
};
use crate::surface::OPT_IN;

/// What the runner checks compare against: metaproxy's own configuration,
/// where doctor could read it.
#[derive(Debug, Default, Clone)]
pub struct Context {
    /// `--container-credentials` addresses and path.
    pub container_credentials: Option<(Vec<IpAddr>, String)>,
    /// The cgroup the probe is attached to, below the cgroup2 mount
    /// (`/` for its root).
    pub attached: Option<String>,
    /// Why jobs can still open packet sockets on this host (no BPF LSM, or
    /// a daemon without the layer-2 lock); `None` where they cannot.
    pub layer2_gap: Option<String>,
    /// metaproxy's own directories (pins, admin socket, state), where
    /// doctor could read its configuration.
    pub own_dirs: Vec<String>,
}

/// Host paths a job must not have in its `volumes`, and what each gives it.
const SENSITIVE: [(&str, &str); 9] = [
    ("/sys/fs/bpf", "unlinks metaproxy's pins"),
    ("/sys", "reaches /sys/fs/bpf, where metaproxy's pins are"),
    ("/proc", "reaches every host process's root and environment"),
    (
        "/var/lib/docker",
        "reads other containers' environments (their ID tokens and roles) and layers",
    ),
    ("/run/containerd", "drives containerd"),
    (
        "/var/lib/containerd",
        "reads and changes containerd's images and snapshots",
    ),
    ("/var/run", "holds the runtimes' sockets"),
    (
        "/etc/gitlab-runner",
        "reads the runner's tokens and changes its config",
    ),
    ("/var/lib/gitlab-runner", "reads the runner's state"),
];

/// What a volume's host source (`HOST:CONTAINER[:OPTS]`) exposes of
/// `sensitive`: the path itself, a directory above it, or a path inside
/// it.
fn exposes(source: &str, sensitive: &str) -> bool {
    let source = clean(source);
    let source = source.as_str();
    let sensitive = sensitive.trim_end_matches('/');
    source == sensitive
        || source == "/"
        || sensitive.starts_with(&format!("{source}/"))
        || source.starts_with(&format!("{sensitive}/"))
}

/// `path` as Docker takes it: `//`, `/./` and `/../` resolved lexically.
fn clean(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// The host paths a runner's `volumes` hand its jobs that let them undo
/// metaproxy or read other jobs' secrets, with why.
pub fn sensitive_volumes(volumes: &[&str], own_dirs: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for volume in volumes {
        let Some(source) = host_source(volume) else {
            continue;
        };
        if !source.starts_with('/') {
            continue;
        }
        let why = SENSITIVE
            .iter()
            .find(|(p, _)| exposes(source, p))
            .map(|(_, why)| why.to_string())
            .or_else(|| {
                own_dirs
                    .iter()
                    .find(|d| exposes(source, d))
                    .map(|d| format!("reaches metaproxy's {d}"))
            });
        if let Some(why) = why {
            found.push(format!("{source} ({why})"));
        }
    }
    found
}

/// Executors whose jobs run in Docker containers on this host.
const DOCKER_EXECUTORS: [&str; 3] = ["docker", "docker-autoscaler", "docker+machine"];

/// Checks each `[[runners]]` entry of gitlab-runner's `config.toml`.
pub fn runner_checks(text: &str) -> Vec<Check> {
    runner_checks_in(text, &Context::default())
}

/// A runner's role, as it sets it in its own `environment`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerRole {
    pub area: String,
    /// `IAM_ROLE`: a name, an ARN, or empty for none.
    pub role: String,
    pub external_id: Option<String>,
}

/// `IAM_ROLE` (and `IAM_EXTERNAL_ID`) of each Docker-based runner.
pub fn runner_roles(text: &str) -> Vec<RunnerRole> {
    let Ok(config) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    let runners = config
        .get("runners")
        .and_then(toml::Value::as_array)
        .cloned()
        .unwrap_or_default();
    runners
        .iter()
        .enumerate()
        .filter(|(_, r)| DOCKER_EXECUTORS.contains(&executor(r)))
        .filter_map(|(i, r)| {
            let env = strings(r.get("environment"));
            let get = |key: &str| {
                env.iter()
                    .find_map(|e| e.strip_prefix(key))
                    .map(str::to_string)
            };
            Some(RunnerRole {
                area: area(i, r),
                role: get("IAM_ROLE=")?,
                external_id: get("IAM_EXTERNAL_ID=").filter(|e| !e.is_empty()),
            })
        })
        .collect()
}

fn executor(r: &toml::Value) -> &str {
    r.get("executor")
        .and_then(toml::Value::as_str)
        .unwrap_or("")
}

fn area(index: usize, r: &toml::Value) -> String {
    let name = r
        .get("name")
        .and_then(toml::Value::as_str)
        .map_or_else(|| format!("#{}", index + 1), str::to_string);
    format!("runner {name}")
}

/// [`runner_checks`], and the checks that need metaproxy's configuration.
pub fn runner_checks_in(text: &str, context: &Context) -> Vec<Check> {
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
                CheckId::Parses,
                Level::Fail,
                format!("line {line}: {}", e.message().trim_end()),
            )
            .fix("fix the TOML error at that line")];
        }
    };
    let Some(runners) = config.get("runners").and_then(toml::Value::as_array) else {
        return vec![Check::new(
            "runner config",
            CheckId::Runners,
            Level::Warn,
            "no [[runners]] entries",
        )];
    };
    runners
        .iter()
        .enumerate()
        .flat_map(|(i, r)| runner(i, r, context))
        .collect()
}

fn strings(v: Option<&toml::Value>) -> Vec<&str> {
    v.and_then(toml::Value::as_array)
        .map(|a| a.iter().filter_map(toml::Value::as_str).collect())
        .unwrap_or_default()
}

fn runner(index: usize, r: &toml::Value, context: &Context) -> Vec<Check> {
    let area = area(index, r);
    let executor = executor(r);
    if !DOCKER_EXECUTORS.contains(&executor) {
        return vec![Check::new(
            &area,
            CheckId::Executor,
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
        (true, _) => Check::new(&area, CheckId::IamRole, Level::Ok, "set in the runner's environment"),
        (false, true) => Check::new(
            &area,
            CheckId::IamRole,
            Level::Fail,
            "only in [runners.docker], where gitlab-runner ignores it: a job's own IAM_ROLE variable would choose its role",
        )
        .fix("move it to the [[runners]] entry: environment = [\"IAM_ROLE=...\"]"),
        (false, false) => Check::new(
            &area,
            CheckId::IamRole,
            Level::Fail,
            "not set: a job's own IAM_ROLE variable cannot be told from the runner's",
        )
        .fix("add environment = [\"IAM_ROLE=\"] (empty: no role) or the role to the [[runners]] entry"),
    });
    let judged = container_spec(docker).judge(&area);
    checks.push(judged.privileged);
    checks.push(judged.runtime_socket);
    let exposed = sensitive_volumes(
        &strings(docker.and_then(|d| d.get("volumes"))),
        &context.own_dirs,
    );
    checks.push(if exposed.is_empty() {
        Check::new(
            &area,
            CheckId::HostPaths,
            Level::Ok,
            "no host path that undoes metaproxy or reads other jobs",
        )
    } else {
        Check::new(
            &area,
            CheckId::HostPaths,
            Level::Fail,
            format!("volumes {}", exposed.join(", ")),
        )
        .fix("remove them from volumes (bind mounts are recursive: a parent directory counts)")
    });
    let network = docker
        .and_then(|d| d.get("network_mode"))
        .and_then(toml::Value::as_str)
        .unwrap_or("");
    let dropped: Vec<String> = strings(docker.and_then(|d| d.get("cap_drop")))
        .into_iter()
        .map(capability)
        .collect();
    let net_raw_kept = !dropped.iter().any(|c| c == "NET_RAW" || c == "ALL");
    let host_network = network == "host";
    checks.push(match (host_network, net_raw_kept, &context.layer2_gap) {
        (true, true, Some(gap)) => Check::new(
            &area,
            CheckId::NetworkMode,
            Level::Fail,
            format!("host, with NET_RAW kept, and {gap}: a job can read every job's credentials off docker0 and lo with a packet socket"),
        )
        .fix("cap_drop = [\"NET_RAW\"] in [runners.docker], or drop network_mode = \"host\""),
        (true, _, _) => Check::new(
            &area,
            CheckId::NetworkMode,
            Level::Warn,
            "host: jobs share the host's network namespace (the layer-2 lock refuses them packet sockets, the packet guard drops their packets to IMDS)",
        )
        .fix("drop network_mode = \"host\" unless the jobs need it"),
        (false, ..) => Check::new(&area, CheckId::NetworkMode, Level::Ok, "a network of its own"),
    });
    checks.push(match (net_raw_kept, &context.layer2_gap) {
        (false, _) => Check::new(&area, CheckId::CapDrop, Level::Ok, "NET_RAW dropped"),
        (true, Some(gap)) => Check::new(
            &area,
            CheckId::CapDrop,
            Level::Fail,
            format!("NET_RAW kept (Docker's default), and {gap}: a job can ARP-spoof another on the bridge and read its credentials"),
        )
        .fix("cap_drop = [\"NET_RAW\"] in [runners.docker], or boot with bpf in lsm="),
        (true, None) => Check::new(
            &area,
            CheckId::CapDrop,
            Level::Warn,
            "NET_RAW kept (Docker's default): the layer-2 lock refuses jobs packet sockets; dropping it is a second barrier",
        )
        .fix("cap_drop = [\"NET_RAW\"] in [runners.docker]"),
    });
    checks.push(judged.cap_add);
    if let Some((addrs, path)) = &context.container_credentials {
        checks.push(container_credentials_check(&area, r, addrs, path));
    }
    if executor == "docker-autoscaler" {
        checks.push(slot_cgroups_check(&area, r, context.attached.as_deref()));
    }
    checks
}

/// What `[runners.docker]` gives each job's container, for the judgement
/// live containers get too.
pub fn container_spec(docker: Option<&toml::Value>) -> ContainerSpec {
    let flag = |key: &str| {
        docker
            .and_then(|d| d.get(key))
            .and_then(toml::Value::as_bool)
            .unwrap_or(false)
    };
    let list = |key: &str| strings(docker.and_then(|d| d.get(key)));
    ContainerSpec {
        // gitlab-runner honours services_privileged apart from privileged.
        privileged: ["privileged", "services_privileged"]
            .into_iter()
            .filter(|k| flag(k))
            .collect(),
        cap_add: list("cap_add").into_iter().map(str::to_string).collect(),
        host_paths: list("volumes")
            .into_iter()
            .filter_map(host_source)
            .map(str::to_string)
            .collect(),
        daemon_socket: docker
            .and_then(|d| d.get("host"))
            .and_then(toml::Value::as_str)
            .and_then(|h| h.strip_prefix("unix://"))
            .map(str::to_string),
    }
}

/// The host path of a volume (`HOST:CONTAINER[:OPTS]`); `None` for a bare
/// path, which is a volume of the container's own, not the host's.
fn host_source(volume: &str) -> Option<&str> {
    volume.split_once(':').map(|(source, _)| source)
}

/// `AWS_CONTAINER_CREDENTIALS_*` in the runner's environment must point at
/// an endpoint metaproxy serves, at its path: SDKs try that endpoint before
/// IMDS and stop at its error.
fn container_credentials_check(area: &str, r: &toml::Value, addrs: &[IpAddr], path: &str) -> Check {
    let env = strings(r.get("environment"));
    let value = |key: &str| {
        env.iter()
            .find_map(|e| e.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
    };
    let docker_env = strings(r.get("docker").and_then(|d| d.get("environment")));
    let only_in_docker = value("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI").is_none()
        && value("AWS_CONTAINER_CREDENTIALS_FULL_URI").is_none()
        && docker_env
            .iter()
            .any(|e| e.starts_with("AWS_CONTAINER_CREDENTIALS_"));
    let check =
        |level, found: String| Check::new(area, CheckId::ContainerCredentials, level, found);
    if only_in_docker {
        return check(
            Level::Fail,
            "AWS_CONTAINER_CREDENTIALS_* only in [runners.docker], where gitlab-runner ignores it"
                .into(),
        )
        .fix("move it to the [[runners]] entry's environment");
    }
    let served = |ip: IpAddr| addrs.contains(&ip);
    // An empty value is the runner clearing the variable, not setting it.
    let set = |key: &str| value(key).filter(|v| !v.is_empty());
    let (target, uri_path) = if let Some(relative) = set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
        (Some(IpAddr::from([169, 254, 170, 2])), relative.to_string())
    } else if let Some(full) = set("AWS_CONTAINER_CREDENTIALS_FULL_URI") {
        let uri: Option<hyper::Uri> = full.parse().ok();
        // metaproxy serves plain http on port 80.
        let plain = uri.as_ref().is_some_and(|u| {
            u.scheme_str() == Some("http") && u.port_u16().is_none_or(|p| p == 80)
        });
        if !plain {
            return check(
                Level::Fail,
                format!("AWS_CONTAINER_CREDENTIALS_FULL_URI {full:?}: metaproxy serves plain http on port 80 only"),
            )
            .fix(format!("use http://169.254.170.23{path}"));
        }
        let host = uri
            .as_ref()
            .and_then(|u| u.host())
            .map(|h| h.trim_matches(['[', ']']).to_string());
        (
            host.and_then(|h| h.parse().ok()),
            uri.map(|u| u.path().to_string()).unwrap_or_default(),
        )
    } else {
        // Neither is set by the runner, or it cleared only one: a job's own
        // variable is then the only value, and turns the endpoint on (with
        // a token of the job's choosing, past IMDSv2's).
        let cleared = |key: &str| value(key) == Some("");
        return if OPT_IN.iter().all(|key| cleared(key)) {
            check(
                Level::Ok,
                "cleared by the runner: its jobs use IMDS, and a job's own variable is refused"
                    .into(),
            )
        } else {
            check(
                Level::Warn,
                "not cleared: a job's own AWS_CONTAINER_CREDENTIALS_RELATIVE_URI or _FULL_URI variable (with a token of its own) would turn the endpoint on for it, past IMDSv2's token".into(),
            )
            .fix("environment = [\"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=\", \"AWS_CONTAINER_CREDENTIALS_FULL_URI=\", ...] in the [[runners]] entry, as IAM_ROLE=")
        };
    };
    match target {
        Some(ip) if served(ip) && uri_path == path => {
            check(Level::Ok, format!("http://{ip}{path}, which metaproxy serves"))
        }
        Some(ip) if served(ip) => check(
            Level::Fail,
            format!("path {uri_path:?}, but metaproxy serves {path}: the SDK gets 404 and no credentials"),
        )
        .fix(format!("use {path}, or --container-credentials-path {uri_path}")),
        Some(ip) => check(
            Level::Fail,
            format!("{ip} is not an endpoint metaproxy serves (--container-credentials): the SDK tries it first and gets nothing"),
        )
        .fix("turn the endpoint on (METAPROXY_CONTAINER_CREDENTIALS=169.254.170.2,169.254.170.23) or remove the variable"),
        None => check(
            Level::Fail,
            "AWS_CONTAINER_CREDENTIALS_FULL_URI does not name an address".into(),
        )
        .fix("use http://169.254.170.23/v1/credentials"),
    }
}

/// docker-autoscaler's slot cgroups (`use_slot_cgroups`) move job
/// containers to `slot_cgroup_template`'s cgroup: it must lie inside the
/// cgroup the probe is attached to, or their connects are not redirected.
fn slot_cgroups_check(area: &str, r: &toml::Value, attached: Option<&str>) -> Check {
    let on = r
        .get("use_slot_cgroups")
        .and_then(toml::Value::as_bool)
        .unwrap_or(false);
    let check = |level, found: String| Check::new(area, CheckId::SlotCgroups, level, found);
    if !on {
        return check(
            Level::Ok,
            "off: containers go to Docker's cgroup parent".into(),
        );
    }
    let template = r
        .get("slot_cgroup_template")
        .and_then(toml::Value::as_str)
        .unwrap_or("gitlab-runner/slot-${slot}");
    let path = slot_path(template);
    let Some(attached) = attached else {
        return check(
            Level::Skip,
            format!("slot cgroups under {path}; metaproxy's --cgroup is not known here"),
        );
    };
    let inside = attached == "/"
        || path == attached
        || path.starts_with(&format!("{}/", attached.trim_end_matches('/')));
    if inside {
        check(
            Level::Ok,
            format!("{path} is inside the probe's cgroup {attached}"),
        )
    } else {
        check(
            Level::Fail,
            format!("{path} is outside the probe's cgroup {attached}: those jobs' connects to IMDS are not redirected (the guard drops them) and they get no credentials"),
        )
        .fix(format!("attach metaproxy higher (METAPROXY_CGROUP), or put slot_cgroup_template under {attached}"))
    }
}

/// The cgroup a slot template names for slot 0, below the cgroup2 mount: a
/// systemd slice nests by its dashes (`runner-slot-0.slice` is
/// `/runner.slice/runner-slot.slice/runner-slot-0.slice`), anything else is
/// a path.
pub fn slot_path(template: &str) -> String {
    let name = template.replace("${slot}", "0");
    match name.strip_suffix(".slice") {
        Some(stem) if !stem.contains('/') => {
            let parts: Vec<&str> = stem.split('-').collect();
            let mut path = String::new();
            for i in 1..=parts.len() {
                path.push('/');
                path.push_str(&parts[..i].join("-"));
                path.push_str(".slice");
            }
            path
        }
        _ => format!("/{}", name.trim_matches('/')),
    }
}

/// Executors that run jobs' scripts on this host, as gitlab-runner's own
/// child processes: in its cgroup.
const HOST_EXECUTORS: [&str; 2] = ["shell", "custom"];

/// The cgroup of gitlab-runner's service where no process says otherwise
/// (at AMI build time, say): the unit its package installs.
pub const RUNNER_SERVICE_CGROUP: &str = "/system.slice/gitlab-runner.service";

/// `--allow-host-cgroup` against the runners: a glob that matches the
/// cgroup gitlab-runner runs in hands the real IMDS, and the instance's
/// credentials, to every `shell` or `custom` job's script, which runs
/// there. `runner_cgroups`: the cgroups of running gitlab-runner
/// processes (or [`RUNNER_SERVICE_CGROUP`]).
pub fn host_allow_check(globs: &[String], text: &str, runner_cgroups: &[String]) -> Check {
    let check = |level, found: String| Check::new("policy", CheckId::AllowHostCgroup, level, found);
    if globs.is_empty() {
        return check(
            Level::Ok,
            "none: every host process is refused the real IMDS".into(),
        );
    }
    let Ok(config) = text.parse::<toml::Table>() else {
        return check(
            Level::Warn,
            "the runner config does not parse: which runners run jobs on the host is unknown"
                .into(),
        );
    };
    let local: Vec<String> = config
        .get("runners")
        .and_then(toml::Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
        .filter(|(_, r)| HOST_EXECUTORS.contains(&executor(r)))
        .map(|(i, r)| format!("{} ({})", area(i, r), executor(r)))
        .collect();
    let exposed: Vec<&String> = runner_cgroups
        .iter()
        .filter(|cg| crate::policy::allow_listed(globs, cg))
        .collect();
    if !local.is_empty() && !exposed.is_empty() {
        return check(
            Level::Fail,
            format!(
                "{} lets {} through, where {} run their jobs' scripts: those jobs get the real IMDS and the instance's credentials",
                globs.join(", "),
                exposed.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(", "),
                local.join(", ")
            ),
        )
        .fix("allow-list only a unit of its own for what needs the instance's role (the cache, fleeting), or move shell and custom runners to another host");
    }
    let wide: Vec<&String> = globs.iter().filter(|g| g.contains("**")).collect();
    if !wide.is_empty() {
        return check(
            Level::Warn,
            format!(
                "{}: ** spans cgroup levels, so it admits every cgroup made below, later ones included",
                wide.iter().map(|g| g.as_str()).collect::<Vec<_>>().join(", ")
            ),
        )
        .fix("name each cgroup, with * inside one level at most");
    }
    check(
        Level::Ok,
        format!(
            "{}: no runner's jobs run on the host in a cgroup it admits",
            globs.join(", ")
        ),
    )
}

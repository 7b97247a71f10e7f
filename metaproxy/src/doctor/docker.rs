//! Docker as it runs now: reachable, its cgroup driver and version,
//! `userns-remap`, and the live containers that undo metaproxy's promise
//! (privileged, with the Docker socket, or with a capability over the
//! network or BPF) or whose `IAM_ROLE` only their
//! image set, each named.

use std::time::Duration;

use bollard::{
    models::{ContainerInspectResponse, SystemInfo},
    query_parameters::ListContainersOptionsBuilder,
    Docker,
};

use super::{spec::ContainerSpec, Check, CheckId, Level};
use crate::model::gitlab::{single_value, Unclear};

const AREA: &str = "docker";
/// Each Docker call; a stuck dockerd is a finding, not a hang.
const TIMEOUT: Duration = Duration::from_secs(5);

pub async fn docker_checks(offline: bool) -> Vec<Check> {
    let unreachable = |e: String| {
        vec![Check::new(
            AREA,
            CheckId::Reachable,
            if offline { Level::Warn } else { Level::Fail },
            format!("the Docker API does not answer: {e}"),
        )
        .fix("systemctl start docker (metaproxy identifies jobs through it)")]
    };
    let docker = match Docker::connect_with_defaults() {
        Ok(d) => d.with_timeout(TIMEOUT),
        Err(e) => return unreachable(e.to_string()),
    };
    let info = match tokio::time::timeout(TIMEOUT, docker.info()).await {
        Ok(Ok(info)) => info,
        Ok(Err(e)) => return unreachable(e.to_string()),
        Err(_) => return unreachable(format!("no answer within {TIMEOUT:?}")),
    };
    let mut checks = info_checks(&info);
    let options = ListContainersOptionsBuilder::default().all(false).build();
    let listed = match tokio::time::timeout(TIMEOUT, docker.list_containers(Some(options))).await {
        Ok(Ok(listed)) => listed,
        _ => {
            checks.push(Check::new(
                AREA,
                CheckId::Containers,
                Level::Warn,
                "cannot list the running containers",
            ));
            return checks;
        }
    };
    let mut clean = 0;
    for summary in listed {
        let Some(id) = summary.id else { continue };
        let Ok(Ok(c)) = tokio::time::timeout(TIMEOUT, docker.inspect_container(&id, None)).await
        else {
            continue;
        };
        let image_env = match c.image.as_deref() {
            Some(image) => tokio::time::timeout(TIMEOUT, docker.inspect_image(image))
                .await
                .ok()
                .and_then(Result::ok)
                .and_then(|i| i.config)
                .and_then(|c| c.env)
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let found = container_checks(&c, &image_env);
        if found.is_empty() {
            clean += 1;
        }
        checks.extend(found);
    }
    checks.push(Check::new(
        AREA,
        CheckId::Containers,
        Level::Ok,
        format!("{clean} running containers with nothing to report"),
    ));
    checks
}

/// The daemon-wide findings.
pub fn info_checks(info: &SystemInfo) -> Vec<Check> {
    let driver = info
        .cgroup_driver
        .as_ref()
        .map_or_else(|| "unknown".to_string(), |d| d.to_string());
    let version = info
        .cgroup_version
        .as_ref()
        .map_or_else(|| "unknown".to_string(), |v| v.to_string());
    let mut checks = vec![Check::new(
        AREA,
        CheckId::Reachable,
        Level::Ok,
        format!(
            "Docker {} (cgroup driver {driver}, cgroup v{version})",
            info.server_version.as_deref().unwrap_or("?")
        ),
    )];
    let userns = info
        .security_options
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|o| o.split(',').any(|kv| kv == "name=userns"));
    checks.push(if userns {
        Check::new(
            AREA,
            CheckId::UsernsRemap,
            Level::Ok,
            "on: root in a job is not root on the host",
        )
    } else {
        Check::new(
            AREA,
            CheckId::UsernsRemap,
            Level::Warn,
            "off: root in a job container is the host's uid 0, a kernel escape away from the host",
        )
        .fix("set \"userns-remap\": \"default\" in /etc/docker/daemon.json where jobs allow it")
    });
    checks
}

/// What Docker gives a running container, for the judgement runners'
/// `[runners.docker]` get too.
pub fn live_spec(c: &ContainerInspectResponse) -> ContainerSpec {
    let host = c.host_config.as_ref();
    let privileged = host.and_then(|h| h.privileged).unwrap_or(false);
    // The runner's key that made it so: its services have their own.
    let service = c
        .config
        .as_ref()
        .and_then(|c| c.labels.as_ref())
        .and_then(|l| l.get(crate::model::gitlab::TYPE_LABEL))
        .is_some_and(|t| t == "service");
    ContainerSpec {
        privileged: match (privileged, service) {
            (false, _) => Vec::new(),
            (true, false) => vec!["privileged"],
            (true, true) => vec!["services_privileged"],
        },
        cap_add: host.and_then(|h| h.cap_add.clone()).unwrap_or_default(),
        host_paths: c
            .mounts
            .as_deref()
            .unwrap_or_default()
            .iter()
            .filter_map(|m| m.source.clone())
            .collect(),
        daemon_socket: None,
    }
}

/// What a running container does to metaproxy's promise, if anything.
pub fn container_checks(c: &ContainerInspectResponse, image_env: &[String]) -> Vec<Check> {
    let name = c
        .name
        .as_deref()
        .unwrap_or("?")
        .trim_start_matches('/')
        .to_string();
    let area = format!("container {name}");
    let judged = live_spec(c).judge(&area);
    // The runner's fix, once the container is gone.
    let mut checks: Vec<Check> = [judged.privileged, judged.cap_add, judged.runtime_socket]
        .into_iter()
        .filter(|check| check.level != Level::Ok)
        .map(|check| {
            let fix = check.fix.clone().unwrap_or_default();
            check.fix(format!("docker rm -f {name}, and {fix}"))
        })
        .collect();
    // Only jobs are the adversary: a privileged or socket-holding container
    // that is no job's (gitlab-runner itself, a host service) is named,
    // not failed.
    let job = c
        .config
        .as_ref()
        .and_then(|c| c.labels.as_ref())
        .is_some_and(|l| l.contains_key(crate::model::gitlab::JOB_LABEL));
    if !job {
        for check in &mut checks {
            check.level = Level::Warn;
            check.found = format!(
                "not a job container (no gitlab-runner job label): {}",
                check.found
            );
            check.fix = Some("make sure no job can reach it".into());
        }
    }
    let env = c
        .config
        .as_ref()
        .and_then(|c| c.env.clone())
        .unwrap_or_default();
    if let Err(Unclear::FromImage(_)) = single_value(&env, image_env, "IAM_ROLE") {
        checks.push(
            Check::new(
                &area,
                CheckId::IamRole,
                Level::Fail,
                "IAM_ROLE comes only from its image's ENV: metaproxy refuses it, and on a runner without its own IAM_ROLE the image chooses",
            )
            .fix("set IAM_ROLE in the runner's [[runners]] environment (empty for none)"),
        );
    }
    checks
}

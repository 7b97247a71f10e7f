//! Docker-in-Docker in the bed, as a job with a `docker:dind` service has
//! it: a privileged container (the service, carrying the job's labels and
//! variables) runs a dockerd of its own, whose containers sit behind its
//! NAT (MASQUERADE to the service's address). Privileged jobs are outside
//! metaproxy's threat model; this is about what a job's own inner
//! containers get, not about what the job could take.
//!
//! No registry exists here: the inner dockerd runs from the host's /usr,
//! with the vfs driver on a tmpfs, and imports the bed's busybox rootfs as
//! its image. This host mounts cgroup v1 beside v2 (hybrid), where Docker
//! gives a privileged container the host's cgroup namespace; the inner
//! dockerd is told to put its containers below the service's own cgroup,
//! where a private cgroup namespace (cgroup v2 hosts, Docker's default
//! there) would put them.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use serde_json::Value;

use crate::{
    bed::{Container, E2eBed},
    cgroup::{cgroup2_mount, v1_hierarchies},
    docker::{BASE_IMAGE, GATEWAY},
    fake_imds::REGION,
    moto::PORT,
};

/// The inner dockerd's socket, inside the service container.
const INNER_SOCK: &str = "unix:///run/inner-docker.sock";

/// A Docker-in-Docker service container and its dockerd; both go on drop.
#[derive(Debug)]
pub struct Dind {
    /// The service container (privileged).
    pub service: Container,
    /// Its cgroup (below the cgroup2 mount), under which the inner
    /// containers go.
    cgroup: String,
}

impl Dind {
    /// Starts the service container `name` with `env` (the job's
    /// variables: `IAM_ROLE`, say) and `extra` `docker run` options, and
    /// the dockerd in it; returns once that dockerd answers and has the
    /// base image.
    pub fn start(
        bed: &E2eBed,
        name: &str,
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let tar = bed.dockerd.rootfs_tar()?;
        let tar_mount = format!("{}:/rootfs.tar:ro", tar.display());
        // What `--privileged` gives, spelled out: this machine is itself a
        // container whose bounding set lacks CAP_SYS_RESOURCE, which
        // `--privileged` would ask for and fail on.
        let mut options = vec![
            "--cap-add",
            "ALL",
            "--cap-drop",
            "SYS_RESOURCE",
            "--security-opt",
            "seccomp=unconfined",
            "--security-opt",
            "apparmor=unconfined",
            "--security-opt",
            "systempaths=unconfined",
            "--device-cgroup-rule",
            "a *:* rwm",
            "-v",
            "/sys/fs/cgroup:/sys/fs/cgroup:rw",
            "-e",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            // The host's iptables is a Debian alternative.
            "-v",
            "/etc/alternatives:/etc/alternatives:ro",
            "-v",
            &tar_mount,
            "--tmpfs",
            "/var/lib/docker",
            "--tmpfs",
            "/run",
        ];
        options.extend_from_slice(extra);
        let service = bed.container(name, BASE_IMAGE, env, &options)?;
        let cgroup_line = exec_text(&service, &["cat", "/proc/self/cgroup"])?;
        let cgroup = cgroup_line
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("the service container has no cgroup2 line")?
            .trim()
            .to_string();
        let dind = Self { service, cgroup };
        let dockerd = format!(
            "exec dockerd --host {INNER_SOCK} --data-root /var/lib/docker \
             --exec-root /run/docker --pidfile /run/docker.pid --storage-driver vfs \
             --exec-opt native.cgroupdriver=cgroupfs --cgroup-parent {}/dind \
             > /run/dockerd.log 2>&1",
            dind.cgroup
        );
        dind.service.exec_detached(&["sh", "-c", &dockerd])?;
        let ready = crate::wait_for("the inner dockerd", Duration::from_secs(60), || {
            dind.docker(&["version", "--format", "{{.Server.Version}}"])
                .ok()
        });
        if let Err(e) = ready {
            let log = exec_text(&dind.service, &["cat", "/run/dockerd.log"]).unwrap_or_default();
            anyhow::bail!("{e:#}\n--- inner dockerd log ---\n{log}");
        }
        dind.docker(&[
            "import",
            "--change",
            "ENV PATH=/bin",
            "--change",
            "CMD [\"/bin/sh\"]",
            "/rootfs.tar",
            BASE_IMAGE,
        ])?;
        Ok(dind)
    }

    /// `docker args...` against the inner dockerd; stdout, trimmed.
    pub fn docker(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["docker", "-H", INNER_SOCK];
        all.extend_from_slice(args);
        exec_text(&self.service, &all)
    }

    /// Runs the AWS SDK client in an inner container `name` (with the
    /// region and moto as STS, nothing of the job's) and returns its report.
    pub fn sdk_client(&self, name: &str) -> anyhow::Result<Value> {
        let region = format!("AWS_REGION={REGION}");
        let sts = format!("AWS_ENDPOINT_URL_STS=http://{GATEWAY}:{PORT}");
        let mut args = vec!["run", "--rm", "--name", name, "-e", &region, "-e", &sts];
        // The service container has the host's libraries and the client
        // mounted; the inner container gets them from it.
        for dir in ["/usr", "/lib", "/lib64", "/etc/ssl"] {
            if std::path::Path::new(dir).exists() {
                args.extend(["-v", leak(format!("{dir}:{dir}:ro"))]);
            }
        }
        args.extend([
            "-v",
            "/mp-sdk-client:/mp-sdk-client:ro",
            BASE_IMAGE,
            "/mp-sdk-client",
            "1",
        ]);
        let out = self.docker(&args)?;
        serde_json::from_str(out.lines().last().unwrap_or_default())
            .with_context(|| format!("inner container {name}: {out}"))
    }

    /// The inner containers' cgroup parent, in every hierarchy.
    fn parents(&self) -> Vec<PathBuf> {
        let rel = format!("{}/dind", self.cgroup.trim_start_matches('/'));
        cgroup2_mount()
            .into_iter()
            .chain(v1_hierarchies())
            .map(|h| h.join(&rel))
            .collect()
    }
}

/// Runs `args` in `c`; stdout, trimmed, or the error with stderr.
fn exec_text(c: &Container, args: &[&str]) -> anyhow::Result<String> {
    let out = c.exec_output(args)?;
    anyhow::ensure!(
        out.status.success(),
        "exec {args:?} in {}: {}",
        c.name,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A `&'static str` for an argument list built in a loop (test code, a
/// handful of short strings).
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

impl Drop for Dind {
    fn drop(&mut self) {
        // The inner containers and dockerd first, so that they take their
        // cgroups with them; then the parent they were under.
        let _ = exec_text(
            &self.service,
            &[
                "sh",
                "-c",
                "docker -H unix:///run/inner-docker.sock rm -f $(docker -H unix:///run/inner-docker.sock ps -aq) >/dev/null 2>&1; \
                 kill $(cat /run/docker.pid) 2>/dev/null; \
                 i=0; while [ -e /run/docker.pid ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done",
            ],
        );
        for parent in self.parents() {
            crate::cgroup::remove_tree(&parent);
        }
    }
}

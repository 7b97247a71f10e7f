//! The whole end-to-end bed in one value: a namespace with no route out,
//! moto (STS/IAM, auth on), the fake real IMDS serving instance credentials
//! moto accepts, a private dockerd whose containers live under the cgroup
//! the probe is attached to, and the daemon. Dropping it tears everything
//! down in reverse order.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;
use serde_json::Value;

use crate::{
    cgroup::{id_of, path_of, TestCgroup},
    daemon::{Daemon, DaemonSpec},
    docker::{Dockerd, BASE_IMAGE, GATEWAY},
    fake_imds::{FakeImds, FakeImdsConfig, ACCOUNT_ID, REGION},
    gitlab::{FakeGitlab, ISSUER},
    imds_net::ImdsNet,
    moto::{Moto, PORT},
    netns::NetNs,
    process::output_in,
    scratch::ScratchDir,
};

/// Roles moto knows (all in the instance's account, trusting the instance).
pub const ROLE_DEPLOY: &str = "ci-deploy";
pub const ROLE_BUILD: &str = "ci-build";
pub const ROLE_OTHER: &str = "ci-other";
/// A role moto knows whose trust policy does not name the instance role.
pub const ROLE_UNTRUSTING: &str = "ci-untrusting";

/// gitlab-runner's job label, which metaproxy requires of role containers.
pub const JOB_ID_LABEL: &str = "com.gitlab.gitlab-runner.job.id";

/// The `--label` value that puts a container in job `job`.
pub fn job_label(job: impl std::fmt::Display) -> String {
    format!("{JOB_ID_LABEL}={job}")
}

/// A job id for a container that names none of its own.
fn next_job_id() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(100_000);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

pub fn role_arn(role: &str) -> String {
    format!("arn:aws:iam::{ACCOUNT_ID}:role/{role}")
}

/// The role allow-list a bed's daemon gets unless the test names its own
/// (`metaproxy run` refuses to start without one): every role of the test
/// account.
pub const DEFAULT_ALLOW_ROLE: &str = "arn:aws:iam::123456789012:role/*";

/// `args` for `metaproxy run`, with [`DEFAULT_ALLOW_ROLE`] unless they (or
/// `env`) already say which roles jobs may have.
fn with_role_allow_list(args: &[&str], env: &[(&str, &str)]) -> Vec<String> {
    let named = args
        .iter()
        .any(|a| a.starts_with("--allow-role") || a.starts_with("--policy-file"))
        || env
            .iter()
            .any(|(k, _)| *k == "METAPROXY_ALLOW_ROLE" || *k == "METAPROXY_POLICY_FILE");
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    if !named {
        all.extend(["--allow-role".to_string(), DEFAULT_ALLOW_ROLE.to_string()]);
    }
    all
}

/// A bed whose jobs may carry GitLab ID tokens.
#[derive(Debug, Clone, Copy)]
struct IdTokens {
    /// Whether the instance has a role (credentials at the fake IMDS).
    instance_credentials: bool,
}

/// Fields drop top to bottom: daemon, containers and dockerd, moto, the
/// fake IMDS and its namespace, cgroups, the namespace, then the scratch
/// directory.
#[derive(Debug)]
pub struct E2eBed {
    pub daemon: Daemon,
    pub dockerd: Dockerd,
    pub moto: Moto,
    /// The GitLab instance whose ID tokens jobs carry, in beds that have
    /// one.
    pub gitlab: Option<FakeGitlab>,
    pub imds: FakeImds,
    pub imds_net: ImdsNet,
    pub cg: TestCgroup,
    pub ns: NetNs,
    dir: ScratchDir,
}

/// What every bed stands on: a scratch directory, a network namespace with
/// no route out (it plays the EC2 host), the IMDS namespace one routed hop
/// from it, and a cgroup subtree with `attached` (where the probe goes)
/// and, inside it, the daemon's own cgroup: as on a host where the probe is
/// at the cgroup root, the daemon's own connects must still reach the real
/// IMDS.
struct Foundation {
    dir: ScratchDir,
    ns: NetNs,
    imds_net: ImdsNet,
    cg: TestCgroup,
    attached: PathBuf,
    own: PathBuf,
}

impl Foundation {
    fn new() -> anyhow::Result<Self> {
        crate::require_root();
        let dir = ScratchDir::new("mpt")?;
        let ns = NetNs::new("mpt", &[])?;
        let imds_net = ImdsNet::new(&ns)?;
        let cg = TestCgroup::new("mpt")?;
        let attached = cg.child("attached")?;
        let own = cg.child("attached/metaproxy")?;
        Ok(Self {
            dir,
            ns,
            imds_net,
            cg,
            attached,
            own,
        })
    }
}

impl E2eBed {
    /// Builds the bed; `daemon_args` go to `metaproxy run`.
    pub fn start(daemon_args: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_env(daemon_args, &[])
    }

    /// Builds the bed; `daemon_env` is added to the daemon's environment.
    pub fn start_with_env(
        daemon_args: &[&str],
        daemon_env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::start_full(daemon_args, daemon_env, false, None)
    }

    /// Builds a bed with a GitLab instance whose ID tokens the daemon takes
    /// (`--oidc-issuer`), moto seeded to trust them. Without
    /// `instance_credentials` the instance has no role at all: the daemon
    /// has no AWS credentials of its own.
    pub fn start_with_id_tokens(
        daemon_args: &[&str],
        daemon_env: &[(&str, &str)],
        instance_credentials: bool,
    ) -> anyhow::Result<Self> {
        Self::start_full(
            daemon_args,
            daemon_env,
            false,
            Some(IdTokens {
                instance_credentials,
            }),
        )
    }

    /// Builds a bed whose (fake) instance requires IMDSv2
    /// (`HttpTokens=required`).
    pub fn start_requiring_tokens(daemon_args: &[&str]) -> anyhow::Result<Self> {
        Self::start_full(daemon_args, &[], true, None)
    }

    fn start_full(
        daemon_args: &[&str],
        daemon_env: &[(&str, &str)],
        instance_requires_tokens: bool,
        id_tokens: Option<IdTokens>,
    ) -> anyhow::Result<Self> {
        let Foundation {
            dir,
            ns,
            imds_net,
            cg,
            attached,
            own,
        } = Foundation::new()?;

        let moto = Moto::start(&ns, &cg.child("services/moto")?, dir.join("moto"))?;
        let instance = moto.seed_with(
            &ns,
            &cg.child("services/seed")?,
            &[ROLE_DEPLOY, ROLE_BUILD, ROLE_OTHER],
            id_tokens.as_ref().map(|_| ISSUER),
        )?;
        let gitlab = match &id_tokens {
            Some(_) => Some(FakeGitlab::start(
                &ns,
                &cg.child("services/gitlab")?,
                dir.join("gitlab"),
            )?),
            None => None,
        };
        let mut daemon_args: Vec<&str> = daemon_args.to_vec();
        if id_tokens.is_some() {
            daemon_args.extend(["--oidc-issuer", ISSUER]);
        }
        let imds = FakeImds::start(
            &imds_net.ns,
            FakeImdsConfig {
                credentials: match &id_tokens {
                    Some(IdTokens {
                        instance_credentials: false,
                    }) => None,
                    _ => Some(instance),
                },
                allow_v1: !instance_requires_tokens,
                host_netns: Some(ns.path()),
            },
        )?;
        let dockerd = Dockerd::start(
            &ns,
            &cg.child("services/dockerd")?,
            &format!("{}/docker", cg.relative(&attached)),
            dir.join("docker"),
        )?;
        let daemon = Daemon::start(DaemonSpec {
            netns: ns.path(),
            attach_cgroup: attached,
            own_cgroup: own,
            args: with_role_allow_list(&daemon_args, daemon_env),
            env: [
                ("DOCKER_HOST".into(), dockerd.host()),
                (
                    "AWS_ENDPOINT_URL_STS".into(),
                    format!("http://127.0.0.1:{PORT}"),
                ),
                ("AWS_REGION".into(), REGION.into()),
            ]
            .into_iter()
            .chain(
                daemon_env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string())),
            )
            .collect(),
        })?;
        let bed = Self {
            daemon,
            dockerd,
            moto,
            gitlab,
            imds,
            imds_net,
            cg,
            ns,
            dir,
        };
        // The daemon is ready for containers once it knows its account
        // and, with ID tokens, the issuer's keys; without credentials of
        // its own, once it has the keys.
        let (what, line) = match id_tokens {
            Some(IdTokens {
                instance_credentials: false,
            }) => (
                "the daemon to fetch the issuer's keys",
                "issuer keys fetched",
            ),
            _ => ("the daemon to reach STS", "instance credentials work"),
        };
        crate::wait_for(what, std::time::Duration::from_secs(30), || {
            let log = bed.daemon.log();
            let keys = bed.gitlab.is_none() || log.contains("issuer keys fetched");
            (log.contains(line) && keys).then_some(())
        })
        .with_context(|| bed.daemon.log())?;
        Ok(bed)
    }

    /// A scratch directory that goes away with the bed.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// `docker run` options every job container gets: the host binaries,
    /// the region and moto as the STS endpoint.
    pub fn container_args(&self, name: &str, env: &[(&str, &str)]) -> Vec<String> {
        // As gitlab-runner labels its job containers (a test's own
        // `--label` given later wins).
        let mut args = vec![
            "--name".to_string(),
            name.to_string(),
            "--label".to_string(),
            job_label(next_job_id()),
        ];
        let mut all_env = vec![
            ("AWS_REGION".to_string(), REGION.to_string()),
            (
                "AWS_ENDPOINT_URL_STS".to_string(),
                format!("http://{GATEWAY}:{PORT}"),
            ),
        ];
        all_env.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        for (k, v) in all_env {
            args.push("-e".into());
            args.push(format!("{k}={v}"));
        }
        args.extend(Dockerd::host_binary_mounts(&[
            &bin("mp-sdk-client"),
            &bin("mp-client"),
            &bin("mp-attack"),
        ]));
        args
    }

    /// Runs the AWS SDK client in a fresh container and returns its report.
    /// `extra` are more `docker run` options (labels, say).
    pub fn sdk_client(
        &self,
        name: &str,
        image: &str,
        env: &[(&str, &str)],
        extra: &[&str],
        repeat: usize,
    ) -> anyhow::Result<Value> {
        let mut args = self.container_args(name, env);
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend([
            image.to_string(),
            "/mp-sdk-client".to_string(),
            repeat.to_string(),
        ]);
        let out = self.dockerd.run(&args)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line).with_context(|| {
            format!(
                "container {name}: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Runs the SDK client in a container created through the Docker API
    /// with exactly this `env` list, as gitlab-runner does (the docker CLI
    /// would merge repeated variables; the API keeps them).
    pub fn sdk_client_via_api(&self, name: &str, env: &[&str]) -> anyhow::Result<Value> {
        let mut all_env = vec![
            format!("AWS_REGION={REGION}"),
            format!("AWS_ENDPOINT_URL_STS=http://{GATEWAY}:{PORT}"),
        ];
        all_env.extend(env.iter().map(|s| s.to_string()));
        let binds: Vec<String> = Dockerd::host_binary_mounts(&[&bin("mp-sdk-client")])
            .into_iter()
            .filter(|a| a != "-v")
            .collect();
        let body = serde_json::json!({
            "Image": BASE_IMAGE,
            "Cmd": ["/mp-sdk-client"],
            "Env": all_env,
            "Labels": { JOB_ID_LABEL: next_job_id().to_string() },
            "HostConfig": { "Binds": binds },
        });
        self.dockerd
            .api_post(&format!("/containers/create?name={name}"), &body)?;
        let out = self
            .dockerd
            .command()
            .args(["start", "-a", name])
            .output()?;
        let _ = self.dockerd.docker(&["rm", "-f", name]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).with_context(|| {
            format!(
                "container {name}: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Starts a long-running container (`sleep`) to `exec` clients in; it is
    /// removed when the guard drops.
    pub fn container(
        &self,
        name: &str,
        image: &str,
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> anyhow::Result<Container> {
        let mut args = vec!["run".to_string(), "-d".to_string()];
        args.extend(self.container_args(name, env));
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend([image.to_string(), "sleep".to_string(), "3600".to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.dockerd.docker(&args)?;
        Ok(Container {
            docker_host: self.dockerd.host(),
            name: name.to_string(),
        })
    }

    /// The base image name.
    pub fn base_image(&self) -> &'static str {
        BASE_IMAGE
    }

    /// Calls the fake real IMDS received from anyone but the daemon, each
    /// as its address and where it came from: a container's namespace
    /// (forwarded), or a cgroup of the bed's own namespace other than the
    /// daemon's (a `--network host` container, say). The daemon's calls
    /// share the host's address with every process of the namespace, so
    /// they are told apart by their socket's cgroup.
    pub fn container_calls_to_real_imds(&self) -> Vec<String> {
        let daemon = id_of(self.daemon.cgroup());
        self.imds
            .calls()
            .into_iter()
            .filter(|c| c.cgroup_id != Some(daemon))
            .map(|c| match c.cgroup_id {
                Some(id) => format!(
                    "{} from cgroup {}",
                    c.peer,
                    path_of(self.cg.path(), id)
                        .map_or_else(|| format!("id {id}"), |p| self.cg.relative(&p))
                ),
                None => format!(
                    "{} from no socket of the bed's namespace (forwarded from a container's)",
                    c.peer
                ),
            })
            .collect()
    }

    /// No container reached the real IMDS: none was passed through by
    /// the daemon, and no call the fake real IMDS received came from
    /// anyone but the daemon. The error says who did.
    pub fn check_real_imds_untouched(&self) -> Result<(), String> {
        // Every caller here is a container: nothing may be passed through.
        let passed: Vec<_> = self
            .daemon
            .connections()
            .map_err(|e| format!("{e:#}"))?
            .into_iter()
            .filter(|c| c["outcome"] == "passthrough")
            .collect();
        if !passed.is_empty() {
            return Err(format!("container requests passed through: {passed:?}"));
        }
        let calls = self.container_calls_to_real_imds();
        if !calls.is_empty() {
            return Err(format!("containers reached the real IMDS: {calls:?}"));
        }
        Ok(())
    }
}

/// A running container; removed on drop.
#[derive(Debug)]
pub struct Container {
    docker_host: String,
    pub name: String,
}

impl Container {
    fn docker(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new("docker");
        cmd.arg("-H").arg(&self.docker_host);
        cmd
    }

    /// Runs `args` in the container and returns what it printed.
    pub fn exec_output(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Ok(self
            .docker()
            .arg("exec")
            .arg(&self.name)
            .args(args)
            .output()?)
    }

    /// Runs `args` in the container (e.g. `/mp-client raw ...`) and parses
    /// the JSON line it prints.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<Value> {
        let out = self
            .docker()
            .arg("exec")
            .arg(&self.name)
            .args(args)
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).with_context(|| {
            format!(
                "exec {args:?} in {}: {stdout}{}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Starts `args` in the container in the background (`docker exec -d`).
    pub fn exec_detached(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = self
            .docker()
            .arg("exec")
            .arg("-d")
            .arg(&self.name)
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "exec -d {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// An IMDSv2 token for `ttl` seconds, as the header that presents it.
    pub fn token_header(&self, ttl: u32) -> String {
        let ttl = format!("X-aws-ec2-metadata-token-ttl-seconds: {ttl}");
        let put = self.imds("PUT", "/latest/api/token", &[&ttl]);
        assert_eq!(put["status"], 200, "token PUT: {put}");
        format!(
            "X-aws-ec2-metadata-token: {}",
            put["body"].as_str().unwrap_or_default()
        )
    }

    /// `mp-client raw 169.254.169.254:80 METHOD PATH HEADERS...` in the container.
    pub fn imds(&self, method: &str, path: &str, headers: &[&str]) -> Value {
        self.raw("169.254.169.254:80", method, path, headers)
    }

    /// `mp-client raw ADDR METHOD PATH HEADERS...` in the container (the
    /// container-credentials endpoint, say).
    pub fn raw(&self, addr: &str, method: &str, path: &str, headers: &[&str]) -> Value {
        let mut args = vec!["/mp-client", "raw", addr, method, path];
        args.extend_from_slice(headers);
        self.exec(&args).expect("mp-client raw")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.docker().args(["rm", "-f", &self.name]).output();
    }
}

/// A binary of the tests crate (the clients run in containers).
pub fn bin(name: &str) -> PathBuf {
    crate::binaries().dir.join(name)
}

/// The kernel suite's bed: the daemon with no Docker and no STS, and fake
/// IMDS listeners on 169.254.169.254:80 and :81 and [fd00:ec2::254]:80.
/// Fields drop in order: the daemon (detaching the probe) first, the
/// namespace last.
#[derive(Debug)]
pub struct KernelBed {
    pub daemon: Daemon,
    pub fakes: Vec<FakeImds>,
    pub imds_net: ImdsNet,
    pub cg: TestCgroup,
    pub ns: NetNs,
    _dir: ScratchDir,
}

impl KernelBed {
    /// A bed whose daemon passes no host process through (the default), so
    /// that every answer comes from the daemon itself (the clients here are
    /// in no container).
    pub fn new(daemon_args: &[&str]) -> Self {
        Self::with_args(daemon_args, &[])
    }

    /// [`KernelBed::new`] with more environment for the daemon.
    pub fn with_env(daemon_args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::with_args(daemon_args, env)
    }

    /// A bed whose daemon passes host processes in the test cgroup
    /// `attached/a` through to the (fake) real IMDS, as an admin allows the
    /// SSM agent's cgroup.
    pub fn allowing_a(daemon_args: &[&str]) -> Self {
        let mut args = vec!["--allow-host-cgroup", "/mpt-*/attached/a"];
        args.extend_from_slice(daemon_args);
        Self::with_args(&args, &[])
    }

    fn with_args(daemon_args: &[&str], extra_env: &[(&str, &str)]) -> Self {
        // No IMDSv1 check: every call the fake IMDS records must be a leak
        // (or a pass-through the test asked for).
        let daemon_args: Vec<&str> = ["--imdsv1", "allow"]
            .into_iter()
            .chain(daemon_args.iter().copied())
            .collect();
        let Foundation {
            dir,
            ns,
            imds_net,
            cg,
            attached,
            own,
        } = Foundation::new().expect("bed");
        let allow_v1 = FakeImdsConfig {
            allow_v1: true,
            ..Default::default()
        };
        let fakes = vec![
            FakeImds::start(&imds_net.ns, allow_v1.clone()).expect("fake imds"),
            FakeImds::start_at(
                &imds_net.ns,
                "169.254.169.254:81".parse().unwrap(),
                allow_v1.clone(),
            )
            .expect("fake :81"),
            FakeImds::start_at(
                &imds_net.ns,
                "[fd00:ec2::254]:80".parse().unwrap(),
                allow_v1,
            )
            .expect("fake v6"),
        ];
        // No Docker and no STS here: these tests are about the kernel half.
        // The daemon must not call the fake IMDS for its own credentials
        // either, so every call the fake records is a leak.
        let daemon = Daemon::start(DaemonSpec {
            netns: ns.path(),
            attach_cgroup: attached,
            own_cgroup: own,
            args: with_role_allow_list(&daemon_args, extra_env),
            env: vec![
                ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
                ("AWS_REGION".into(), "us-east-1".into()),
                ("AWS_ENDPOINT_URL_STS".into(), "http://127.0.0.1:9".into()),
                (
                    "DOCKER_HOST".into(),
                    "unix:///nonexistent/docker.sock".into(),
                ),
                // Debug, so the kernel programs' own log lines show up.
                ("METAPROXY_LOG".into(), "info,metaproxy=debug".into()),
            ]
            .into_iter()
            .chain(
                extra_env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string())),
            )
            .collect(),
        })
        .expect("daemon");
        Self {
            daemon,
            fakes,
            imds_net,
            cg,
            ns,
            _dir: dir,
        }
    }

    pub fn imds_calls(&self) -> usize {
        self.fakes[0].calls().len()
    }

    pub fn cgroup(&self, rel: &str) -> PathBuf {
        self.cg.child(rel).unwrap()
    }

    /// Runs mp-client in cgroup `rel` and parses its report.
    pub fn client(&self, rel: &str, args: &[&str]) -> Value {
        let mut cmd = Command::new(bin("mp-client"));
        cmd.args(args);
        let out = output_in(cmd, &self.ns.path(), &self.cgroup(rel)).expect("client");
        assert!(
            out.status.success(),
            "mp-client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("client json")
    }

    pub fn connection_by_port(&self, port: u64) -> Vec<Value> {
        self.daemon
            .connections()
            .unwrap()
            .into_iter()
            .filter(|c| {
                c["client"]
                    .as_str()
                    .is_some_and(|a| a.ends_with(&format!(":{port}")))
            })
            .collect()
    }
}

//! `metaproxy run`'s flags (and the pin and admin flags other commands
//! share), as clap reads them; [`super::RunConfig`] checks them.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, ValueEnum};

use crate::ops::logging::LogFormat;

/// The default listen address: link-local, so containers on any Docker
/// bridge reach it through their default route while it is never routed off
/// the host. The daemon adds it to `lo` if no interface has it.
pub const DEFAULT_LISTEN: &str = "169.254.170.254:8169";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/metaproxy";
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/metaproxy/admin.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/metaproxy";

#[derive(Debug, Args)]
pub struct RunArgs {
    /// cgroup v2 directory to intercept (default: the root of the cgroup v2
    /// mount, i.e. every process on the host).
    #[arg(long, env = "METAPROXY_CGROUP")]
    pub cgroup: Option<PathBuf>,

    /// Address the probe sends IMDS connects to and the daemon listens on.
    #[arg(long, env = "METAPROXY_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// IPv6 listen address for connects to [fd00:ec2::254]:80. Without it
    /// those connects are refused.
    #[arg(long, env = "METAPROXY_LISTEN6")]
    pub listen6: Option<SocketAddr>,

    /// Roles containers may assume: a glob on the role ARN, e.g.
    /// `arn:aws:iam::123456789012:role/ci-*` (repeatable). Required unless
    /// `--policy-file` is given: `run` refuses to start without either.
    #[arg(long, env = "METAPROXY_ALLOW_ROLE", value_delimiter = ',')]
    pub allow_role: Vec<String>,

    /// Whether containers may send requests without a session token
    /// (IMDSv1): as the instance does (`mirror`: refused where the instance
    /// requires IMDSv2), always, or never.
    #[arg(long, env = "METAPROXY_IMDSV1", value_enum, default_value_t = Imdsv1::Mirror)]
    pub imdsv1: Imdsv1,

    /// Refuse IMDSv1 from containers, whatever the instance does (the same
    /// as `--imdsv1 refuse`).
    #[arg(long, env = "METAPROXY_REQUIRE_IMDSV2")]
    pub require_imdsv2: bool,

    /// cgroups of host services (in no container) that may reach the real
    /// IMDS through metaproxy, as globs on the cgroup path below the cgroup2
    /// mount, e.g. `/system.slice/amazon-ssm-agent.service` (repeatable;
    /// `*` stays within one path segment, `**` spans them). Every other
    /// process in no container is refused.
    #[arg(long, env = "METAPROXY_ALLOW_HOST_CGROUP", value_delimiter = ',')]
    pub allow_host_cgroup: Vec<String>,

    /// Open connections the daemon keeps at most; more are closed at once.
    #[arg(long, env = "METAPROXY_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// Open connections one container (cgroup) may hold; more are closed at
    /// once, so one job cannot starve the others.
    #[arg(
        long,
        env = "METAPROXY_MAX_CONNECTIONS_PER_CONTAINER",
        default_value_t = 256
    )]
    pub max_connections_per_container: usize,

    /// Directory for what must survive a restart (the token signing key).
    #[arg(long, env = "METAPROXY_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,

    #[command(flatten)]
    pub pins: PinArgs,

    #[command(flatten)]
    pub admin: AdminArgs,

    /// Addresses of the container-credentials endpoint to serve (what SDKs
    /// reach through `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` or
    /// `_FULL_URI`), on port 80: any of 169.254.170.2, 169.254.170.23 and
    /// (with --listen6) fd00:ec2::23; or `off`. An address another service
    /// already serves on this host (the ECS agent) is left alone.
    #[arg(
        long,
        env = "METAPROXY_CONTAINER_CREDENTIALS",
        default_value = "169.254.170.2,169.254.170.23"
    )]
    pub container_credentials: String,

    /// The one path the container-credentials endpoint serves.
    #[arg(
        long,
        env = "METAPROXY_CONTAINER_CREDENTIALS_PATH",
        default_value = "/v1/credentials"
    )]
    pub container_credentials_path: String,

    /// Require the container-credentials endpoint's `Authorization` header
    /// to be the container's own `AWS_CONTAINER_AUTHORIZATION_TOKEN` (set in
    /// the runner's environment), as a guard against request forgery.
    #[arg(long, env = "METAPROXY_CONTAINER_CREDENTIALS_REQUIRE_AUTH")]
    pub container_credentials_require_auth: bool,

    /// A role policy file (TOML): which roles which projects may get on
    /// which refs, default deny. Reloaded on SIGHUP and when it changes; a
    /// broken file keeps the policy in force. See `metaproxy policy check`.
    #[arg(long, env = "METAPROXY_POLICY_FILE")]
    pub policy_file: Option<PathBuf>,

    /// gitlab-runner container types (its `com.gitlab.gitlab-runner.type`
    /// label) that may get roles; its helper is `predefined`.
    #[arg(
        long,
        env = "METAPROXY_ROLE_CONTAINER_TYPES",
        value_delimiter = ',',
        default_value = "build,service"
    )]
    pub role_container_types: Vec<String>,

    /// Send STS session tags from the job with each AssumeRole: project id
    /// and path, pipeline, job, ref, whether the ref is protected, runner
    /// (from gitlab-runner's labels and predefined variables). The roles'
    /// trust policies must allow sts:TagSession.
    #[arg(long, env = "METAPROXY_SESSION_TAGS")]
    pub session_tags: bool,

    /// Rename a session tag: SOURCE=NAME, SOURCE one of project-id,
    /// project-path, pipeline-id, job-id, ref, protected, runner-id
    /// (repeatable; defaults: gitlab-project-id, ...).
    #[arg(long, env = "METAPROXY_SESSION_TAG_NAME", value_delimiter = ',')]
    pub session_tag_name: Vec<String>,

    /// Make the session tags transitive (they follow role chaining).
    #[arg(long, env = "METAPROXY_TRANSITIVE_SESSION_TAGS")]
    pub transitive_session_tags: bool,

    /// Set SourceIdentity to the job (`gitlab-job-<id>`), which CloudTrail
    /// shows on every call made with the credentials and any role chained
    /// from them. The roles' trust policies must allow
    /// sts:SetSourceIdentity.
    #[arg(long, env = "METAPROXY_SOURCE_IDENTITY")]
    pub source_identity: bool,

    /// The GitLab instance whose ID tokens jobs carry (`id_tokens:` in
    /// .gitlab-ci.yml), e.g. https://gitlab.example.com. A job container
    /// with a valid token gets its role with AssumeRoleWithWebIdentity and
    /// the token, never with the instance profile; one whose token fails a
    /// check gets nothing. https only (plain http for a loopback issuer).
    #[arg(long, env = "METAPROXY_OIDC_ISSUER")]
    pub oidc_issuer: Option<String>,

    /// The audience (`aud`) the ID tokens must be for.
    #[arg(
        long,
        env = "METAPROXY_OIDC_AUDIENCE",
        default_value = "sts.amazonaws.com"
    )]
    pub oidc_audience: String,

    /// The job variable that holds the ID token (the name under
    /// `id_tokens:`).
    #[arg(
        long,
        env = "METAPROXY_OIDC_TOKEN_VARIABLE",
        default_value = "AWS_ID_TOKEN"
    )]
    pub oidc_token_variable: String,

    /// Job containers without a valid ID token get no credentials at all:
    /// the instance profile is never used for jobs, so it needs no right to
    /// assume any job role.
    #[arg(long, env = "METAPROXY_OIDC_REQUIRED")]
    pub oidc_required: bool,

    /// Address of the metrics and health listener (`/metrics`, `/healthz`,
    /// `/readyz`), or `off`. It never serves credentials; keep it on
    /// loopback or a private address.
    #[arg(long, env = "METAPROXY_METRICS", default_value = crate::ops::metrics::DEFAULT_ADDR)]
    pub metrics: String,

    /// Start even when other processes share the daemon's cgroup. Every
    /// process in that cgroup bypasses the redirect and reaches the real
    /// IMDS (a daemon run by hand from a login shell shares the session's
    /// cgroup); without this flag `run` refuses to start then.
    #[arg(long, env = "METAPROXY_ALLOW_SHARED_CGROUP")]
    pub allow_shared_cgroup: bool,

    /// Docker API sockets whose containers may get roles (`unix:///PATH`
    /// or `/PATH`; repeatable, or comma-separated), or `off`. Default:
    /// `DOCKER_HOST`, else `/var/run/docker.sock`.
    #[arg(long, env = "METAPROXY_DOCKER_HOST", value_delimiter = ',')]
    pub docker_host: Vec<String>,

    /// Podman API sockets whose containers may get roles (rootful Podman:
    /// `unix:///run/podman/podman.sock`; repeatable, or comma-separated).
    /// Podman's containers are told from Docker's by their cgroup
    /// (`libpod-<id>`).
    #[arg(long, env = "METAPROXY_PODMAN_HOST", value_delimiter = ',')]
    pub podman_host: Vec<String>,

    /// Threads serving requests. 1 (the default) runs everything on one
    /// thread, as nginx's single worker does: no hand-offs between threads
    /// on the request path, which is what the latency is made of. More
    /// threads help only where one core is saturated.
    #[arg(long, env = "METAPROXY_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,

    /// Log format: `text`, or `json` (one object per line).
    #[arg(long, env = "METAPROXY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// `metaproxy run` alone, as clap parses it.
#[derive(Parser)]
#[command(name = "run")]
struct Run {
    #[command(flatten)]
    args: RunArgs,
}

impl RunArgs {
    /// Parses `metaproxy run`'s flags alone (`["--allow-role", "..."]`), as
    /// the command line would (with the `METAPROXY_*` variables): for
    /// doctor's reading of the settings file, and for tests that start the
    /// daemon's wiring.
    pub fn parse_flags<I, T>(flags: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let argv = std::iter::once(std::ffi::OsString::from("run"))
            .chain(flags.into_iter().map(Into::into));
        Run::try_parse_from(argv).map(|r| r.args)
    }

    /// `metaproxy run`'s arguments, as clap describes them.
    pub fn command() -> clap::Command {
        <Run as clap::CommandFactory>::command()
    }
}

#[derive(Debug, Args)]
pub struct PinArgs {
    /// bpffs directory holding the pinned programs and maps.
    #[arg(long, env = "METAPROXY_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Unix socket of the admin API (root only).
    #[arg(long, env = "METAPROXY_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Imdsv1 {
    /// Refuse tokenless requests where the instance itself requires IMDSv2.
    Mirror,
    /// Serve tokenless requests.
    Allow,
    /// Refuse tokenless requests (401).
    Refuse,
}

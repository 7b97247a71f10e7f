//! `metaproxy run`: wire the pipeline from a [`RunConfig`], attach the
//! probe, serve, and stop cleanly on SIGTERM while leaving the redirect in
//! place (fail closed).
//!
//! Every task the daemon spawns is owned by one `JoinSet`: if any of them
//! panics or ends when it should not, the daemon logs it and exits with an
//! error (a supervisor restarts it; the pinned redirect holds meanwhile)
//! rather than limp on without, say, its Docker events.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::Duration,
};

use anyhow::Context as _;
use metaproxy_common::ProbeConfig;
use tokio::{sync::watch, task::JoinSet};

use crate::{
    attribution::Attribution,
    cli::config::{self, RunConfig},
    credentials::{AwsSts, CallerIdentity, CredentialCache, InstrumentedSts, Sts},
    identity::{docker::DockerRuntime, Identities},
    kernel::addrs::ip6_words,
    kernel::cgroup::{self, CgroupPaths},
    kernel::guard::{self, GuardState, RouteTable},
    kernel::netaddr,
    kernel::probe::{Probe, ProbeOptions, TcMode},
    model::ids::AccountId,
    ops::admin::{self, AdminState, StatusSource},
    ops::connlog::ConnLog,
    ops::metrics::{self, Live, LiveSource, Metrics, Readiness, RequestMetrics},
    policy::file::PolicyFile,
    policy::Policy,
    server::{self, ConnectionCount, Pipeline},
    surface::upstream::{HttpUpstream, Upstream},
    surface::{Imdsv1Gate, Surface, SurfaceOptions, TokenKey},
};

/// How many recent connections the admin API keeps.
const RECENT_CONNECTIONS: usize = 4096;

/// Tasks by id, with the name they are logged under and whether they may
/// finish on their own.
#[derive(Default)]
struct Tasks {
    set: JoinSet<()>,
    names: HashMap<tokio::task::Id, (&'static str, bool)>,
}

impl Tasks {
    /// A task that runs as long as the daemon does.
    fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let id = self.set.spawn(task).id();
        self.names.insert(id, (name, false));
    }

    /// A task that finishes once its work is done.
    fn spawn_finite(
        &mut self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        let id = self.set.spawn(task).id();
        self.names.insert(id, (name, true));
    }

    /// Waits for a task to end; `Err` if it should not have.
    async fn next_failure(&mut self) -> anyhow::Error {
        loop {
            let Some(done) = self.set.join_next_with_id().await else {
                return anyhow::anyhow!("no tasks left");
            };
            let (id, panic) = match done {
                Ok((id, ())) => (id, None),
                Err(e) => (e.id(), Some(e.to_string())),
            };
            let (name, finite) = self.names.remove(&id).unwrap_or(("unknown", false));
            match panic {
                None if finite => tracing::debug!(task = name, "task done"),
                None => {
                    tracing::error!(task = name, "task ended unexpectedly");
                    return anyhow::anyhow!("the {name} task ended unexpectedly");
                }
                Some(e) => {
                    tracing::error!(task = name, error = %e, "task failed");
                    return anyhow::anyhow!("the {name} task failed: {e}");
                }
            }
        }
    }
}

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    tracing::debug!(?config, "configuration");
    raise_nofile_limit();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut servers = JoinSet::new();

    // The health endpoints answer from the start: /readyz says what is
    // still missing while the daemon comes up.
    let readiness = Arc::new(Readiness::default());
    let metrics = Arc::new(OnceLock::new());
    if let Some(addr) = config.metrics {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            anyhow::anyhow!(
                "metrics listener {addr}: {e}{}",
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    " (another process has it: set --metrics to another address, or off)"
                } else {
                    ""
                }
            )
        })?;
        servers.spawn(metrics::run(
            listener,
            metrics.clone(),
            readiness.clone(),
            stopped(),
        ));
    }

    let account = Arc::new(OnceLock::new());
    readiness.own_credentials(account.clone());
    let policy = Arc::new(
        Policy::new(
            &config.allow_role,
            &config.allow_host_cgroup,
            account.clone(),
        )?
        .with_session(config.session.clone())
        .with_container_types(config.role_container_types.clone()),
    );
    if let Some(path) = &config.policy_file {
        // Never start on a policy file that does not load: fail with its
        // line rather than serve without the rules the admin wrote. Nor on
        // one that someone other than root could rewrite.
        let file = PolicyFile::load(path).context("--policy-file")?;
        config::check_policy_file(path)?;
        tracing::info!(path = %path.display(), rules = file.rules(), "policy file loaded");
        policy.set_file(Some(file));
    }
    let tokens = TokenKey::load_or_create(&config.state_dir)
        .with_context(|| format!("token key in --state-dir {}", config.state_dir.display()))?;

    let mount = cgroup::cgroup2_mount()?;
    let target = config.cgroup.clone().unwrap_or_else(|| mount.clone());
    cgroup::check_cgroup2_dir(&mount, &target)?;
    let own = cgroup::own_cgroup(&mount)?;
    let self_cgroup_id = cgroup::id_of(&own)?;
    // The probe skips the daemon's cgroup, so whatever else runs in it
    // reaches the real IMDS.
    let companions = cgroup_companions(&own);
    check_shared_cgroup(&own, &companions, config.allow_shared_cgroup)?;
    if own == target {
        tracing::warn!(
            cgroup = %own.display(),
            "the daemon runs in the very cgroup it intercepts: other processes in it reach the real IMDS too; run it in a cgroup of its own"
        );
    }

    // Attach before binding: the previous generation's bind guard admits
    // only the previous daemon's cgroup, and under systemd a restarted unit
    // gets a new cgroup (a new id). Attaching replaces that generation with
    // ours, so our bind is allowed. Connects redirected meanwhile (a few
    // milliseconds) are refused: fail closed.
    let mut config = config;
    config
        .container_credentials
        .retain(|ip| match served_elsewhere(*ip) {
            Some(why) => {
                tracing::warn!(address = %ip, "not serving the container-credentials endpoint at {ip}: {why}; remove it from --container-credentials to silence this");
                false
            }
            None => true,
        });
    let mut tasks = Tasks::default();
    // The packet guard goes on the interfaces that route to IMDS now, in
    // the same step as the redirect; the follower keeps it there.
    let routes_table = RouteTable::open().context("reading the routes to IMDS")?;
    let guarded = guard::guarded_addresses(&config.container_credentials);
    let routes = routes_table.lookup(&guarded).await;
    let attached = Attached {
        cgroup_id: cgroup::id_of(&target)?,
        level: target
            .strip_prefix(&mount)
            .map_or(0, |rel| rel.components().count() as u32),
    };
    let probe = attach_probe(
        &config,
        &target,
        self_cgroup_id,
        attached,
        routes.interfaces(),
        &mut tasks,
    )?;
    readiness.probe_attached();
    let guard_state = Arc::new(GuardState::new(routes));
    {
        let (probe, state) = (probe.clone(), guard_state.clone());
        readiness.guard(Arc::new(move || {
            state.covered_by(&probe.guarded_interfaces().0)
        }));
    }
    tracing::info!(
        interfaces = %guard_state.routes().interfaces().iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(","),
        mode = probe.guarded_interfaces().1.name(),
        "packet guard attached"
    );
    tasks.spawn(
        "packet guard routes",
        guard::follow(probe.clone(), routes_table, guarded, guard_state.clone()),
    );
    let listener = netaddr::bind_listener(SocketAddr::V4(config.listen)).await?;
    let listener6 = match config.listen6 {
        Some(addr) => Some(netaddr::bind_listener(SocketAddr::V6(addr)).await?),
        None => None,
    };
    readiness.listening();
    tracing::debug!(
        cgroup = %target.display(),
        generation = probe.generation(),
        self_cgroup = %own.display(),
        "probe attached"
    );

    let sts = Arc::new(InstrumentedSts::new(Arc::new(AwsSts::from_env().await)));
    let me = Arc::new(OnceLock::new());
    tasks.spawn_finite(
        "account discovery",
        discover_account(sts.clone(), account, me.clone()),
    );
    let credentials = Arc::new(CredentialCache::new(sts.clone()));
    tasks.spawn(
        "credential refresh",
        credentials.clone().refresh_ahead(Duration::from_secs(60)),
    );

    let identities = Arc::new(Identities::new(Arc::new(DockerRuntime::default())));
    let docker = identities.clone();
    readiness.docker(Arc::new(move || docker.reachable()));
    // Subscribe before the events follower starts, so no start is missed.
    tasks.spawn(
        "credential prefetch",
        credentials
            .clone()
            .follow(identities.subscribe(), policy.clone()),
    );
    tasks.spawn("docker events", identities.clone().follow_events());
    tasks.spawn(
        "policy reload",
        follow_policy_file(policy.clone(), config.policy_file.clone()),
    );

    let upstream: Arc<dyn Upstream> = Arc::new(HttpUpstream::from_env());
    let imdsv1 = Arc::new(Imdsv1Gate::new(config.imdsv1));
    imdsv1.check(upstream.as_ref()).await;
    tasks.spawn("imdsv1 mirror", imdsv1.clone().follow(upstream.clone()));

    let connections = Arc::new(ConnLog::new(RECENT_CONNECTIONS));
    let count = Arc::new(ConnectionCount::new(config.limits));
    let requests = RequestMetrics::default();
    let state = Arc::new(DaemonState {
        probe: probe.clone(),
        guard: guard_state.clone(),
        count: count.clone(),
        identities: identities.clone(),
        credentials: credentials.clone(),
        requests: requests.clone(),
    });
    let _ = metrics.set(Metrics::new(
        &requests,
        credentials.metrics(),
        sts.metrics(),
        identities.metrics(),
        state.clone(),
    ));
    let pipeline = Arc::new(Pipeline {
        count,
        attribution: Attribution::new(probe, Arc::new(CgroupPaths::new(mount.clone()))),
        surface: Surface {
            identities,
            policy,
            credentials,
            tokens,
            upstream,
            options: SurfaceOptions {
                imdsv1,
                container_credentials: config.container_credentials_options.clone(),
            },
        },
        connections: connections.clone(),
        metrics: requests,
    });
    let admin_listener = admin::bind(&config.admin_socket)
        .await
        .with_context(|| format!("admin socket {}", config.admin_socket.display()))?;

    servers.spawn(server::run(listener, pipeline.clone(), stopped()));
    if let Some(l6) = listener6 {
        servers.spawn(server::run(l6, pipeline.clone(), stopped()));
    }
    servers.spawn(admin::run(
        admin_listener,
        config.admin_socket.clone(),
        Arc::new(AdminState {
            connections,
            status: state,
            explain: Arc::new(PolicyExplainer {
                identities: pipeline.surface.identities.clone(),
                policy: pipeline.surface.policy.clone(),
            }),
        }),
        stopped(),
    ));

    // Ready only now: the probe is attached and pinned, the listeners and the
    // admin socket are bound. Units ordered after us start containers only
    // once the redirect exists.
    notify(sd_notify::NotifyState::Ready);
    tasks.spawn_finite(
        "startup summary",
        summary(
            Summary {
                config: config.clone(),
                mount,
                target,
                own,
                companions: companions.len(),
                docker: pipeline.surface.identities.clone(),
            },
            readiness,
            me,
        ),
    );

    let result = tokio::select! {
        signal = wait_for_signal() => signal,
        failure = tasks.next_failure() => Err(failure),
        Some(done) = servers.join_next() => Err(match done {
            Ok(()) => anyhow::anyhow!("a listener stopped unexpectedly"),
            Err(e) => anyhow::anyhow!("a listener failed: {e}"),
        }),
    };
    notify(sd_notify::NotifyState::Stopping);
    tracing::info!("stopping; the probe stays attached, so IMDS connects are refused until metaproxy runs again");
    let _ = stop_tx.send(true);
    while servers.join_next().await.is_some() {}
    tasks.set.shutdown().await;
    result
}

/// `metaproxy policy explain`: the daemon's own policy, applied to a
/// container Docker names.
struct PolicyExplainer {
    identities: Arc<Identities>,
    policy: Arc<Policy>,
}

impl admin::Explainer for PolicyExplainer {
    fn explain<'a>(&'a self, container: &'a str) -> futures_util::future::BoxFuture<'a, String> {
        Box::pin(async move {
            match self.identities.find(container).await {
                Ok(Some(c)) => self.policy.explain(&c),
                Ok(None) => format!("no container {container} is known to Docker\n"),
                Err(e) => format!("cannot ask Docker about {container}: {e}\n"),
            }
        })
    }
}

/// How often the policy file is checked for changes.
const POLICY_POLL: Duration = Duration::from_secs(2);

/// Reloads the policy file on SIGHUP and when its contents change. A file
/// that does not load is never applied: the policy in force stays, and the
/// error (with its line) is logged.
async fn follow_policy_file(policy: Arc<Policy>, path: Option<PathBuf>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(hup) => hup,
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGHUP");
            std::future::pending::<()>().await;
            return;
        }
    };
    let read = |p: &PathBuf| std::fs::read(p).ok();
    let mut seen = path.as_ref().and_then(read);
    loop {
        let signalled = tokio::select! {
            _ = hup.recv() => true,
            () = tokio::time::sleep(POLICY_POLL) => false,
        };
        let Some(path) = &path else {
            if signalled {
                tracing::info!("SIGHUP: no --policy-file to reload");
            }
            continue;
        };
        let now = read(path);
        if !signalled && now == seen {
            continue;
        }
        seen = now;
        if let Err(e) = config::check_policy_file(path) {
            tracing::error!(
                error = %e,
                "policy file not reloaded: the previous policy stays in force"
            );
            continue;
        }
        match PolicyFile::load(path) {
            Ok(file) => {
                tracing::info!(path = %path.display(), rules = file.rules(), "policy file reloaded");
                policy.set_file(Some(file));
            }
            Err(e) => tracing::error!(
                error = %e,
                "policy file not reloaded: the previous policy stays in force"
            ),
        }
    }
}

/// What the startup summary reports besides the live checks.
struct Summary {
    config: RunConfig,
    mount: PathBuf,
    target: PathBuf,
    own: PathBuf,
    /// Other processes in the daemon's cgroup at start.
    companions: usize,
    docker: Arc<Identities>,
}

/// How long the summary waits for Docker and STS before it reports them
/// missing.
const SUMMARY_WAIT: Duration = Duration::from_secs(10);

/// One line, once, with everything an admin checks after a start: what is
/// intercepted, where it listens, the policy, who the daemon is to AWS and
/// whether Docker answers. Waits for readiness (at most [`SUMMARY_WAIT`]).
async fn summary(s: Summary, readiness: Arc<Readiness>, me: Arc<OnceLock<CallerIdentity>>) {
    let _ = tokio::time::timeout(SUMMARY_WAIT, async {
        while readiness.check().is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let c = &s.config;
    let aws = me.get().map_or_else(
        || "unknown: GetCallerIdentity has not succeeded yet".to_string(),
        |me| format!("account {} as {}", me.account, me.arn),
    );
    let ready = readiness.check();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        kernel = %kernel,
        cgroup2 = %s.mount.display(),
        attach_point = %s.target.display(),
        own_cgroup = %s.own.display(),
        shared_cgroup = %if s.companions == 0 {
            "no".to_string()
        } else {
            format!("with {} other processes (--allow-shared-cgroup): they bypass the redirect", s.companions)
        },
        listen = %c.listen,
        listen6 = %c.listen6.map_or_else(|| "off".to_string(), |a| a.to_string()),
        container_credentials = %if c.container_credentials.is_empty() {
            "off".to_string()
        } else {
            format!(
                "{} {}",
                c.container_credentials.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                c.container_credentials_options.path
            )
        },
        metrics = %c.metrics.map_or_else(|| "off".to_string(), |a| a.to_string()),
        admin_socket = %c.admin_socket.display(),
        allow_role = %list_or(&c.allow_role, "none: roles of the instance's own account that --policy-file allows"),
        allow_host_cgroup = %list_or(&c.allow_host_cgroup, "none (every host process refused)"),
        imdsv1 = ?c.imdsv1,
        policy_file = %c.policy_file.as_ref().map_or_else(|| "none".to_string(), |p| p.display().to_string()),
        role_container_types = %c.role_container_types.join(","),
        session_tags = %if c.session.tags.is_empty() {
            "off".to_string()
        } else {
            c.session.tags.iter().map(|(_, k)| k.as_str()).collect::<Vec<_>>().join(",")
        },
        source_identity = c.session.source_identity,
        max_connections = c.limits.max_connections,
        max_connections_per_container = c.limits.max_connections_per_cgroup,
        aws_identity = %aws,
        docker = %if s.docker.reachable() { "reachable" } else { "unreachable" },
        ready = %ready.err().unwrap_or("yes"),
        "started"
    );
}

fn list_or(items: &[String], empty: &str) -> String {
    if items.is_empty() {
        empty.to_string()
    } else {
        items.join(",")
    }
}

/// How many of the daemon's cgroup companions an error names.
const COMPANIONS_NAMED: usize = 5;

/// The other processes (pid, comm) in the daemon's own cgroup, kernel
/// threads aside (they make no connects of their own). Unreadable: none
/// (the kernel refuses nothing here to the daemon's capabilities).
fn cgroup_companions(own: &std::path::Path) -> Vec<(u32, String)> {
    let procs = match std::fs::read_to_string(own.join("cgroup.procs")) {
        Ok(procs) => procs,
        Err(e) => {
            tracing::warn!(cgroup = %own.display(), error = %e, "cannot list the processes in the daemon's own cgroup");
            return Vec::new();
        }
    };
    others_in(&procs, std::process::id())
        .into_iter()
        .filter_map(|pid| {
            // Gone meanwhile: not a companion.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            (!is_kernel_thread(&stat)).then(|| (pid, comm_of(&stat)))
        })
        .collect()
}

/// The pids in `cgroup.procs` text other than `me`.
fn others_in(procs: &str, me: u32) -> Vec<u32> {
    procs
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|pid| *pid != me)
        .collect()
}

/// `/proc/PID/stat`'s comm (between the first `(` and the last `)`).
fn comm_of(stat: &str) -> String {
    match (stat.find('('), stat.rfind(')')) {
        (Some(a), Some(b)) if a < b => stat[a + 1..b].to_string(),
        _ => "?".into(),
    }
}

/// Whether `/proc/PID/stat` is a kernel thread's (`PF_KTHREAD` in flags,
/// the ninth field).
fn is_kernel_thread(stat: &str) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    stat.rfind(')')
        .and_then(|end| stat[end + 1..].split_whitespace().nth(6))
        .and_then(|flags| flags.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_KTHREAD != 0)
}

/// Refuses to start while other processes share the daemon's cgroup, unless
/// the admin allowed it (then it warns).
fn check_shared_cgroup(
    own: &std::path::Path,
    companions: &[(u32, String)],
    allowed: bool,
) -> anyhow::Result<()> {
    if companions.is_empty() {
        return Ok(());
    }
    let named = companions
        .iter()
        .take(COMPANIONS_NAMED)
        .map(|(pid, comm)| format!("{pid} {}", crate::ops::logging::Clean(comm)))
        .collect::<Vec<_>>()
        .join(", ");
    let more = companions.len().saturating_sub(COMPANIONS_NAMED);
    let named = if more > 0 {
        format!("{named} and {more} more")
    } else {
        named
    };
    if allowed {
        tracing::warn!(
            cgroup = %own.display(),
            processes = %named,
            "other processes share the daemon's cgroup (--allow-shared-cgroup): they bypass the redirect and reach the real IMDS"
        );
        return Ok(());
    }
    anyhow::bail!(
        "the daemon's cgroup {} holds {} other processes ({named}): every process in it bypasses the redirect and reaches the real IMDS. \
         Run metaproxy in a cgroup of its own (the systemd unit does; by hand, `systemd-run --scope metaproxy run ...`), \
         or pass --allow-shared-cgroup (METAPROXY_ALLOW_SHARED_CGROUP=true) to start anyway",
        own.display(),
        companions.len()
    )
}

/// The cgroup the probe is attached to, as the packet guard checks it.
#[derive(Debug, Clone, Copy)]
struct Attached {
    cgroup_id: u64,
    level: u32,
}

fn attach_probe(
    config: &RunConfig,
    target: &std::path::Path,
    self_cgroup_id: u64,
    attached: Attached,
    guard_interfaces: Vec<crate::kernel::probe::Interface>,
    tasks: &mut Tasks,
) -> anyhow::Result<Arc<Probe>> {
    let (listen_ip6, listen_port6) = match config.listen6 {
        Some(l6) => (ip6_words(l6.ip().octets()), l6.port()),
        None => ([0; 4], 0),
    };
    let mut creds_ip4 = [0u32; 2];
    let mut creds_ip6 = [0u32; 4];
    let v4 = config
        .container_credentials
        .iter()
        .filter_map(|ip| match ip {
            std::net::IpAddr::V4(v4) => Some(u32::from_ne_bytes(v4.octets())),
            std::net::IpAddr::V6(_) => None,
        });
    for (slot, ip) in creds_ip4.iter_mut().zip(v4) {
        *slot = ip;
    }
    if let Some(std::net::IpAddr::V6(v6)) =
        config.container_credentials.iter().find(|ip| ip.is_ipv6())
    {
        creds_ip6 = ip6_words(v6.octets());
    }
    let opts = ProbeOptions {
        cgroup: target.to_path_buf(),
        pin_dir: config.pin_dir.clone(),
        config: ProbeConfig {
            self_cgroup_id,
            listen_ip4: u32::from_ne_bytes(config.listen.ip().octets()),
            listen_port4: config.listen.port(),
            listen_port6,
            listen_ip6,
            creds_ip4,
            creds_ip6,
            attached_cgroup_id: attached.cgroup_id,
            attached_level: attached.level,
            _pad: 0,
        },
        kernel_log_level: kernel_log_level(),
        guard_interfaces,
        tc_mode: TcMode::detect(),
    };
    let (probe, kernel_log) = Probe::attach(&opts).map_err(|e| {
        let hint = if lacks_privilege(&e) {
            " (not permitted: run as root, or with CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON and CAP_DAC_READ_SEARCH as packaging/metaproxy.service grants)"
        } else {
            ""
        };
        anyhow::Error::new(e).context(format!("attaching to {}{hint}", target.display()))
    })?;
    if let Some(kernel_log) = kernel_log {
        tasks.spawn("kernel log", kernel_log.run());
    }
    Ok(Arc::new(probe))
}

/// Why container-credentials address `ip` is someone else's on this host,
/// if it is: assigned to an interface here, or (169.254.170.2) the ECS
/// agent's credentials port is open. Sends no packet off the host.
fn served_elsewhere(ip: std::net::IpAddr) -> Option<String> {
    if std::net::TcpListener::bind((ip, 0)).is_ok() {
        return Some(format!(
            "{ip} is assigned to an interface on this host (another service, such as the ECS agent, serves it)"
        ));
    }
    let ecs_agent: SocketAddr = ([127, 0, 0, 1], 51679).into();
    let is_ecs_address = ip == std::net::IpAddr::from([169, 254, 170, 2]);
    if is_ecs_address
        && std::net::TcpStream::connect_timeout(&ecs_agent, Duration::from_millis(200)).is_ok()
    {
        return Some(format!(
            "the ECS agent's credentials port {ecs_agent} is open: the ECS agent serves {ip} here"
        ));
    }
    None
}

/// Whether `e` comes down to EPERM or EACCES from the kernel.
fn lacks_privilege(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        let errno = c
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .or_else(|| c.downcast_ref::<nix::Error>().map(|e| *e as i32));
        if matches!(errno, Some(libc::EPERM | libc::EACCES)) {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Tells systemd (when `NOTIFY_SOCKET` is set) how we are.
fn notify(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// The daemon's parts that `GET /v1/status` and the metrics read.
struct DaemonState {
    probe: Arc<Probe>,
    guard: Arc<GuardState>,
    count: Arc<ConnectionCount>,
    identities: Arc<Identities>,
    credentials: Arc<CredentialCache>,
    requests: RequestMetrics,
}

impl StatusSource for DaemonState {
    fn status(&self) -> serde_json::Value {
        let (pending, conns) = self.probe.map_sizes();
        let (interfaces, mode) = self.probe.guarded_interfaces();
        let routes = self.guard.routes();
        let dropped: serde_json::Map<String, serde_json::Value> = self
            .probe
            .guard_drops()
            .into_iter()
            .map(|(kind, n)| (kind.name().to_string(), n.into()))
            .collect();
        serde_json::json!({
            "pid": std::process::id(),
            "generation": self.probe.generation(),
            "guard": {
                "mode": mode.name(),
                "interfaces": interfaces,
                "routes": routes.routed.iter().map(|(addr, iface)| serde_json::json!({
                    "address": addr.to_string(),
                    "interface": iface.name,
                    "guarded": interfaces.iter().any(|i| i.index == iface.index),
                })).collect::<Vec<_>>(),
                "unrouted": routes.unrouted.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "dropped": dropped,
            },
            "maps": { "pending": pending, "conns": conns },
            "connections": {
                "open": self.count.open(),
                "largest_per_container": self.count.largest_per_cgroup(),
                "shed": self.requests.shed.get(),
            },
        })
    }
}

impl LiveSource for DaemonState {
    fn live(&self) -> Live {
        let (pending, conns) = self.probe.map_sizes();
        let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
        let mut guard_drops = [0; metaproxy_common::GUARD_DROP_KINDS as usize];
        for (kind, count) in self.probe.guard_drops() {
            guard_drops[kind as usize] = count;
        }
        Live {
            guard_drops,
            guard_interfaces: n(self.probe.guarded_interfaces().0.len()),
            open_connections: n(self.count.open()),
            largest_per_container: n(self.count.largest_per_cgroup()),
            identity_cache: n(self.identities.cached()),
            credential_cache: n(self.credentials.len()),
            map_pending: n(pending),
            map_conns: n(conns),
            probe_generation: self.probe.generation(),
            log_lines_dropped: crate::ops::logging::dropped_lines(),
            docker_reachable: self.identities.reachable(),
        }
    }
}

/// Raises the soft open-files limit to the hard one: under systemd's
/// default soft limit (1024) a busy runner would make accept() fail for
/// every job, and the Docker and STS connections with it.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-files limit"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-files limit"),
    }
}

/// Learns the instance profile's account (role names are taken in it, and
/// by default only its roles are allowed), retrying while STS is down.
async fn discover_account(
    sts: Arc<dyn Sts>,
    account: Arc<OnceLock<AccountId>>,
    me_out: Arc<OnceLock<CallerIdentity>>,
) {
    let mut delay = Duration::from_secs(1);
    loop {
        match sts.caller_identity().await {
            Ok(me) => {
                tracing::info!(account = %me.account, arn = %me.arn, "instance credentials work");
                let _ = account.set(me.account.clone());
                let _ = me_out.set(me);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach STS with the instance credentials; retrying");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// The most verbose kernel log level to compile in, from the tracing filter
/// (aya-log numbering: error 1 .. trace 5).
fn kernel_log_level() -> u8 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::OFF => 0,
        LevelFilter::ERROR => 1,
        LevelFilter::WARN => 2,
        LevelFilter::INFO => 3,
        LevelFilter::DEBUG => 4,
        _ => 5,
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_cgroup_refuses_the_start_unless_allowed() {
        let procs = "1\n4242\n77\n\n";
        assert_eq!(others_in(procs, 4242), [1, 77]);
        let bash = "77 (bash) S 1 77 77 34816 77 4194560 1 2 0 0 0 0";
        let kworker = "3 (kworker/0:0-events) I 2 0 0 0 -1 69238880 0 0 0 0";
        let odd = "78 (a) b) (c) S 1 77 77 34816 77 4194560 1 2";
        assert!(!is_kernel_thread(bash));
        assert!(is_kernel_thread(kworker));
        assert!(!is_kernel_thread(odd));
        assert_eq!(comm_of(bash), "bash");
        assert_eq!(comm_of(odd), "a) b) (c");

        let own = std::path::Path::new("/sys/fs/cgroup/user.slice/session-3.scope");
        assert!(check_shared_cgroup(own, &[], false).is_ok());
        let shell = [(77, "bash".to_string()), (78, "sudo\x1b[2J".to_string())];
        let err = check_shared_cgroup(own, &shell, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("session-3.scope holds 2 other processes (77 bash, 78 sudo\\u{1b}[2J)"),
            "{err}"
        );
        assert!(err.contains("bypasses the redirect"), "{err}");
        assert!(err.contains("--allow-shared-cgroup"), "{err}");
        assert!(err.contains("METAPROXY_ALLOW_SHARED_CGROUP"), "{err}");
        assert!(check_shared_cgroup(own, &shell, true).is_ok());
        let many: Vec<_> = (1..=8).map(|p| (p, "sh".to_string())).collect();
        let err = check_shared_cgroup(own, &many, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("5 sh and 3 more"), "{err}");
        // This test runs with others around (cargo's harness threads are
        // threads, not processes): the listing itself works.
        let mount = cgroup::cgroup2_mount();
        if let Ok(own) = mount.and_then(|m| cgroup::own_cgroup(&m)) {
            assert!(cgroup_companions(&own)
                .iter()
                .all(|(pid, _)| *pid != std::process::id()));
        }
    }
}

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
    sync::{Arc, OnceLock},
    time::Duration,
};

use anyhow::Context as _;
use metaproxy_common::ProbeConfig;
use tokio::{sync::watch, task::JoinSet};

use crate::{
    addrs::ip6_words,
    admin::{self, AdminState, StatusSource},
    attribution::Attribution,
    cgroup::{self, CgroupPaths},
    config::RunConfig,
    connlog::ConnLog,
    credentials::{AwsSts, CredentialCache, Sts},
    identity::{docker::DockerRuntime, Identities},
    ids::AccountId,
    netaddr,
    policy::Policy,
    probe::{Probe, ProbeOptions},
    server::{self, ConnectionCount, Pipeline},
    surface::{Imdsv1Gate, Surface, SurfaceOptions, TokenKey},
    upstream::{HttpUpstream, Upstream},
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
    raise_nofile_limit();
    let account = Arc::new(OnceLock::new());
    let policy = Arc::new(Policy::new(
        &config.allow_role,
        &config.allow_host_cgroup,
        account.clone(),
    )?);
    let tokens = TokenKey::load_or_create(&config.state_dir)
        .with_context(|| format!("token key in --state-dir {}", config.state_dir.display()))?;

    let mount = cgroup::cgroup2_mount()?;
    let target = config.cgroup.clone().unwrap_or_else(|| mount.clone());
    cgroup::check_cgroup2_dir(&mount, &target)?;
    let own = cgroup::own_cgroup(&mount)?;
    let self_cgroup_id = cgroup::id_of(&own)?;
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
    let mut tasks = Tasks::default();
    let probe = attach_probe(&config, &target, self_cgroup_id, &mut tasks)?;
    let listener = netaddr::bind_listener(SocketAddr::V4(config.listen)).await?;
    let listener6 = match config.listen6 {
        Some(addr) => Some(netaddr::bind_listener(SocketAddr::V6(addr)).await?),
        None => None,
    };
    tracing::info!(
        cgroup = %target.display(),
        listen = %config.listen,
        listen6 = ?config.listen6,
        generation = probe.generation(),
        self_cgroup = %own.display(),
        "probe attached"
    );
    tracing::info!(
        allow_role = ?config.allow_role,
        allow_host_cgroup = ?config.allow_host_cgroup,
        imdsv1 = ?config.imdsv1,
        max_connections = config.limits.max_connections,
        max_connections_per_container = config.limits.max_connections_per_cgroup,
        "policy in force (host processes: only the listed cgroups pass; roles: the listed globs, else the instance's account)"
    );

    let sts: Arc<dyn Sts> = Arc::new(AwsSts::from_env().await);
    tasks.spawn_finite("account discovery", discover_account(sts.clone(), account));
    let credentials = Arc::new(CredentialCache::new(sts));
    tasks.spawn(
        "credential refresh",
        credentials.clone().refresh_ahead(Duration::from_secs(60)),
    );

    let identities = Arc::new(Identities::new(Arc::new(DockerRuntime::default())));
    // Subscribe before the events follower starts, so no start is missed.
    tasks.spawn(
        "credential prefetch",
        credentials
            .clone()
            .follow(identities.subscribe(), policy.clone()),
    );
    tasks.spawn("docker events", identities.clone().follow_events());

    let upstream: Arc<dyn Upstream> = Arc::new(HttpUpstream::from_env());
    let imdsv1 = Arc::new(Imdsv1Gate::new(config.imdsv1));
    imdsv1.check(upstream.as_ref()).await;
    tasks.spawn("imdsv1 mirror", imdsv1.clone().follow(upstream.clone()));

    let connections = Arc::new(ConnLog::new(RECENT_CONNECTIONS));
    let count = Arc::new(ConnectionCount::new(config.limits));
    let pipeline = Arc::new(Pipeline {
        count: count.clone(),
        attribution: Attribution::new(probe.clone(), Arc::new(CgroupPaths::new(mount))),
        surface: Surface {
            identities,
            policy,
            credentials,
            tokens,
            upstream,
            options: SurfaceOptions { imdsv1 },
        },
        connections: connections.clone(),
    });
    let admin_listener = admin::bind(&config.admin_socket)
        .await
        .with_context(|| format!("admin socket {}", config.admin_socket.display()))?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut servers = JoinSet::new();
    servers.spawn(server::run(listener, pipeline.clone(), stopped()));
    if let Some(l6) = listener6 {
        servers.spawn(server::run(l6, pipeline.clone(), stopped()));
    }
    servers.spawn(admin::run(
        admin_listener,
        config.admin_socket.clone(),
        Arc::new(AdminState {
            connections,
            status: Arc::new(DaemonStatus { probe, count }),
        }),
        stopped(),
    ));

    // Ready only now: the probe is attached and pinned, the listeners and the
    // admin socket are bound. Units ordered after us start containers only
    // once the redirect exists.
    notify(sd_notify::NotifyState::Ready);
    tracing::info!("ready");

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

fn attach_probe(
    config: &RunConfig,
    target: &std::path::Path,
    self_cgroup_id: u64,
    tasks: &mut Tasks,
) -> anyhow::Result<Arc<Probe>> {
    let (listen_ip6, listen_port6) = match config.listen6 {
        Some(l6) => (ip6_words(l6.ip().octets()), l6.port()),
        None => ([0; 4], 0),
    };
    let opts = ProbeOptions {
        cgroup: target.to_path_buf(),
        pin_dir: config.pin_dir.clone(),
        config: ProbeConfig {
            self_cgroup_id,
            listen_ip4: u32::from_ne_bytes(config.listen.ip().octets()),
            listen_port4: config.listen.port(),
            listen_port6,
            listen_ip6,
        },
        kernel_log_level: kernel_log_level(),
    };
    let (probe, kernel_log) =
        Probe::attach(&opts).with_context(|| format!("attaching to {}", target.display()))?;
    if let Some(kernel_log) = kernel_log {
        tasks.spawn("kernel log", kernel_log.run());
    }
    Ok(Arc::new(probe))
}

/// Tells systemd (when `NOTIFY_SOCKET` is set) how we are.
fn notify(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// `GET /v1/status` on the admin socket.
struct DaemonStatus {
    probe: Arc<Probe>,
    count: Arc<ConnectionCount>,
}

impl StatusSource for DaemonStatus {
    fn status(&self) -> serde_json::Value {
        let (pending, conns) = self.probe.map_sizes();
        serde_json::json!({
            "pid": std::process::id(),
            "generation": self.probe.generation(),
            "maps": { "pending": pending, "conns": conns },
            "connections": {
                "open": self.count.open(),
                "largest_per_container": self.count.largest_per_cgroup(),
                "shed": self.count.shed.load(std::sync::atomic::Ordering::Relaxed),
            },
        })
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
async fn discover_account(sts: Arc<dyn Sts>, account: Arc<OnceLock<AccountId>>) {
    let mut delay = Duration::from_secs(1);
    loop {
        match sts.caller_identity().await {
            Ok(me) => {
                tracing::info!(account = %me.account, arn = %me.arn, "instance credentials work");
                let _ = account.set(me.account);
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

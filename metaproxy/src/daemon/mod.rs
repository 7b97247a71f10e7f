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
    identity::{
        docker::DockerRuntime,
        job_token::{Discovery, JobTokens},
        Identities,
    },
    kernel::addrs::{ip4_word, ip6_words},
    kernel::cgroup::{self, CgroupPaths},
    kernel::guard::{self, GuardState, RouteTable},
    kernel::netaddr,
    kernel::probe::{Probe, ProbeOptions, TcMode},
    kernel::wire::KernelAnswerPath,
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

mod host;
mod layer2;
mod status;
mod tasks;

use host::*;
use status::*;
use tasks::*;

pub use tasks::prefetch_credentials;

/// How many recent connections the admin API keeps.
const RECENT_CONNECTIONS: usize = 4096;

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
        servers.spawn(metrics::run(
            bind_metrics(addr).await?,
            metrics.clone(),
            readiness.clone(),
            stopped(),
        ));
    }

    let account = Arc::new(OnceLock::new());
    // With --oidc-required the daemon needs no AWS credentials of its own:
    // jobs' tokens are all that buys roles.
    if !config.oidc.as_ref().is_some_and(|o| o.required) {
        readiness.own_credentials(account.clone());
    }
    let policy = load_policy(&config, account.clone())?;
    let tokens = TokenKey::load_or_create(&config.state_dir)
        .with_context(|| format!("token key in --state-dir {}", config.state_dir.display()))?;

    let cgroups = Cgroups::find(&config)?;

    // Attach before binding: the previous generation's bind guard admits
    // only the previous daemon's cgroup, and under systemd a restarted unit
    // gets a new cgroup (a new id). Attaching replaces that generation with
    // ours, so our bind is allowed. Connects redirected meanwhile (a few
    // milliseconds) are refused: fail closed.
    let mut config = config;
    config.container_credentials.retain(|ip| servable(*ip));
    let mut tasks = Tasks::default();
    let (probe, guard_state) = attach(&config, &cgroups, &mut tasks, &readiness).await?;
    tasks.spawn(
        "probe watchdog",
        watch_probe(probe.clone(), readiness.clone()),
    );
    let watched = (probe.clone(), readiness.clone());
    let listener = netaddr::bind_listener(SocketAddr::V4(config.listen)).await?;
    let listener6 = match config.listen6 {
        Some(addr) => Some(netaddr::bind_listener(SocketAddr::V6(addr)).await?),
        None => None,
    };
    readiness.listening();
    tracing::debug!(
        cgroup = %cgroups.target.display(),
        generation = probe.generation(),
        self_cgroup = %cgroups.own.display(),
        "probe attached"
    );

    let Wired {
        pipeline,
        state,
        connections,
        me,
        roles,
    } = wire(Parts {
        config: &config,
        tasks: &mut tasks,
        readiness: &readiness,
        account,
        policy,
        tokens,
        probe,
        guard_state,
        mount: cgroups.mount.clone(),
        metrics: &metrics,
    })
    .await?;
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
            roles,
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
                companions: cgroups.companions.len(),
                mount: cgroups.mount,
                target: cgroups.target,
                own: cgroups.own,
                docker: pipeline.surface.identities.clone(),
            },
            readiness,
            me,
        ),
    );

    let result = until_stopped(&mut tasks, &mut servers).await;
    notify(sd_notify::NotifyState::Stopping);
    tracing::info!("stopping; the probe stays attached, so IMDS connects are refused until metaproxy runs again");
    let _ = stop_tx.send(true);
    while servers.join_next().await.is_some() {}
    tasks.set.shutdown().await;
    // A last pass: what a job unpinned must be pinned again before the
    // descriptors that hold it go with the process.
    if !watchdog_off() {
        watch_once(&watched.0, &watched.1).await;
    }
    result
}

/// Runs until a signal, a task that must not end ends, or a listener stops.
async fn until_stopped(tasks: &mut Tasks, servers: &mut JoinSet<()>) -> anyhow::Result<()> {
    tokio::select! {
        signal = wait_for_signal() => signal,
        failure = tasks.next_failure() => Err(failure),
        Some(done) = servers.join_next() => Err(match done {
            Ok(()) => anyhow::anyhow!("a listener stopped unexpectedly"),
            Err(e) => anyhow::anyhow!("a listener failed: {e}"),
        }),
    }
}

/// What the request path is built from.
struct Parts<'a> {
    config: &'a RunConfig,
    tasks: &'a mut Tasks,
    readiness: &'a Readiness,
    account: Arc<OnceLock<AccountId>>,
    policy: Arc<Policy>,
    tokens: TokenKey,
    probe: Arc<Probe>,
    guard_state: Arc<GuardState>,
    mount: PathBuf,
    metrics: &'a OnceLock<Metrics>,
}

/// The request path, and what the admin socket and the summary read.
struct Wired {
    pipeline: Arc<Pipeline>,
    state: Arc<DaemonState>,
    connections: Arc<ConnLog>,
    me: Arc<OnceLock<CallerIdentity>>,
    roles: Arc<RoleTrier>,
}

/// Builds the request path (STS, the credential cache, Docker, the real
/// IMDS, the connection log) and starts the tasks that keep it current.
async fn wire(parts: Parts<'_>) -> anyhow::Result<Wired> {
    let sts = Arc::new(InstrumentedSts::new(Arc::new(AwsSts::from_env().await)));
    let me = Arc::new(OnceLock::new());
    parts.tasks.spawn_finite(
        "account discovery",
        discover_account(sts.clone(), parts.account, me.clone()),
    );
    let credentials = Arc::new(CredentialCache::new(sts.clone()));
    parts.tasks.spawn(
        "credential refresh",
        credentials.clone().refresh_ahead(Duration::from_secs(60)),
    );

    let mut identities = Identities::new(Arc::new(DockerRuntime::default()));
    if let Some(oidc) = &parts.config.oidc {
        let keys =
            Discovery::new(oidc.rules.issuer.clone()).context("--oidc-issuer: the HTTPS client")?;
        let tokens = Arc::new(JobTokens::new(oidc.rules.clone(), Arc::new(keys)));
        let fetched = tokens.clone();
        parts
            .readiness
            .job_tokens(Arc::new(move || fetched.ready()));
        parts
            .tasks
            .spawn("issuer keys", tokens.clone().follow_keys());
        identities = identities.with_job_tokens(tokens);
    }
    let identities = Arc::new(identities);
    let docker = identities.clone();
    parts.readiness.docker(Arc::new(move || docker.reachable()));
    // Subscribe before the events follower starts, so no start is missed.
    parts.tasks.spawn(
        "credential prefetch",
        prefetch_credentials(
            credentials.clone(),
            identities.subscribe(),
            parts.policy.clone(),
            identities.clone(),
        ),
    );
    parts
        .tasks
        .spawn("docker events", identities.clone().follow_events());
    parts.tasks.spawn(
        "layer-2 refusals",
        layer2::log_refusals(parts.probe.clone(), parts.mount.clone(), identities.clone()),
    );
    parts.tasks.spawn(
        "policy reload",
        follow_policy_file(parts.policy.clone(), parts.config.policy_file.clone()),
    );

    let upstream: Arc<dyn Upstream> = Arc::new(HttpUpstream::from_env());
    let imdsv1 = Arc::new(Imdsv1Gate::new(parts.config.imdsv1));
    imdsv1.check(upstream.as_ref()).await;
    parts
        .tasks
        .spawn("imdsv1 mirror", imdsv1.clone().follow(upstream.clone()));

    let connections = Arc::new(ConnLog::new(RECENT_CONNECTIONS));
    let count = Arc::new(ConnectionCount::new(parts.config.limits));
    let requests = RequestMetrics::default();
    let state = Arc::new(DaemonState {
        probe: parts.probe.clone(),
        guard: parts.guard_state,
        count: count.clone(),
        identities: identities.clone(),
        credentials: credentials.clone(),
        requests: requests.clone(),
        me: me.clone(),
        imdsv1: imdsv1.clone(),
    });
    let roles = Arc::new(RoleTrier {
        sts: sts.clone(),
        session: parts.config.session.clone(),
    });
    let _ = parts.metrics.set(Metrics::new(
        &requests,
        credentials.metrics(),
        sts.metrics(),
        identities.metrics(),
        state.clone(),
    ));
    let answers = Arc::new(
        KernelAnswerPath::new(parts.probe.clone()).context("the answer pin's netlink socket")?,
    );
    parts.tasks.spawn(
        "answer pins",
        forget_answer_pins(answers.clone(), identities.subscribe()),
    );
    let pipeline = Arc::new(Pipeline {
        answers,
        count,
        attribution: Attribution::new(parts.probe, Arc::new(CgroupPaths::new(parts.mount))),
        surface: Surface {
            identities,
            policy: parts.policy,
            credentials,
            tokens: parts.tokens,
            upstream,
            options: SurfaceOptions {
                imdsv1,
                container_credentials: parts.config.container_credentials_options.clone(),
            },
        },
        connections: connections.clone(),
        metrics: requests,
    });
    Ok(Wired {
        pipeline,
        state,
        connections,
        me,
        roles,
    })
}

/// The metrics listener's socket, with the fix when the address is taken.
async fn bind_metrics(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "metrics listener {addr}: {e}{}",
            if e.kind() == std::io::ErrorKind::AddrInUse {
                " (another process has it: set --metrics to another address, or off)"
            } else {
                ""
            }
        )
    })
}

/// The role policy from the flags and, if given, the policy file: never
/// started on a file that does not load (fail with its line rather than
/// serve without the rules the admin wrote), nor on one that someone other
/// than root could rewrite.
fn load_policy(
    config: &RunConfig,
    account: Arc<OnceLock<AccountId>>,
) -> anyhow::Result<Arc<Policy>> {
    let policy = Arc::new(
        match &config.oidc {
            Some(oidc) if oidc.required => {
                Policy::new(&config.allow_role, &config.allow_host_cgroup, account)?
                    .with_token_required(oidc.rules.variable)
            }
            _ => Policy::new(&config.allow_role, &config.allow_host_cgroup, account)?,
        }
        .with_session(config.session.clone())
        .with_container_types(config.role_container_types.clone()),
    );
    if let Some(path) = &config.policy_file {
        let file = PolicyFile::load(path).context("--policy-file")?;
        config::check_policy_file(path)?;
        tracing::info!(path = %path.display(), rules = file.rules(), "policy file loaded");
        policy.set_file(Some(file));
    }
    Ok(policy)
}

/// The cgroups the daemon works with, checked.
struct Cgroups {
    /// The cgroup2 mount.
    mount: PathBuf,
    /// Where the probe attaches.
    target: PathBuf,
    /// The daemon's own cgroup, which the probe skips.
    own: PathBuf,
    self_cgroup_id: u64,
    /// Other processes in the daemon's cgroup.
    companions: Vec<(u32, String)>,
}

impl Cgroups {
    fn find(config: &RunConfig) -> anyhow::Result<Self> {
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
        Ok(Self {
            mount,
            target,
            own,
            self_cgroup_id,
            companions,
        })
    }
}

/// Whether the container-credentials endpoint can be served at `ip`: not
/// where something else already answers.
fn servable(ip: std::net::IpAddr) -> bool {
    match served_elsewhere(ip) {
        Some(why) => {
            tracing::warn!(address = %ip, "not serving the container-credentials endpoint at {ip}: {why}; remove it from --container-credentials to silence this");
            false
        }
        None => true,
    }
}

/// Attaches the probe to the target cgroup and the packet guard to the
/// interfaces that route to IMDS, in one step, and keeps the guard there
/// as routes and links change.
async fn attach(
    config: &RunConfig,
    cgroups: &Cgroups,
    tasks: &mut Tasks,
    readiness: &Readiness,
) -> anyhow::Result<(Arc<Probe>, Arc<GuardState>)> {
    // The packet guard goes on the interfaces that route to IMDS now, in
    // the same step as the redirect; the follower keeps it there.
    let routes_table = RouteTable::open().context("reading the routes to IMDS")?;
    let guarded = guard::guarded_addresses(&config.container_credentials);
    let routes = routes_table.lookup(&guarded).await;
    let attached = Attached {
        cgroup_id: cgroup::id_of(&cgroups.target)?,
        level: cgroups
            .target
            .strip_prefix(&cgroups.mount)
            .map_or(0, |rel| rel.components().count() as u32),
    };
    let probe = attach_probe(
        config,
        &cgroups.target,
        cgroups.self_cgroup_id,
        attached,
        // The interfaces IMDS routes through must take the guard for the
        // daemon to start; every other host interface follows at once, one
        // at a time (one can vanish between the look and the attach).
        routes.routed_interfaces(),
        tasks,
    )?;
    if let Err(e) = guard::apply(&probe, &routes) {
        tracing::warn!(error = %e, "the packet guard is not on every host interface yet; trying again as links change");
    }
    readiness.probe_attached();
    match crate::kernel::lsm::layer2_gap(probe.l2_socket_hook()) {
        None => tracing::info!("layer-2 lock attached: jobs get no packet, AF_XDP or raw IPv6 sockets, and no option that forges a source or passes tc egress"),
        Some(why) => {
            let gap = format!("jobs that keep NET_RAW can still open packet sockets (forged ARP and MACs on a shared bridge, sniffing a container's veth with --network host): {why}");
            tracing::warn!("layer-2 lock incomplete: {gap}; the setsockopt half (no PACKET_QDISC_BYPASS, AF_XDP rings, IP_HDRINCL, non-local binds) is attached");
            readiness.gap(format!("layer 2: {gap}"));
        }
    }
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
    Ok((probe, guard_state))
}

/// How often the watchdog checks that every link is attached and pinned.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Keeps the redirect, the guard and the layer-2 lock attached and pinned
/// while the daemon runs (see [`crate::kernel::probe::Probe::repair`]):
/// what went missing is put back, logged as an alert and counted, and
/// `/readyz` is not ready while something could not be.
async fn watch_probe(probe: Arc<Probe>, readiness: Arc<Readiness>) {
    // For the attack tests' controls alone: they detach a part of the
    // probe to show the attack working without it, and it must stay
    // detached. The links are held all the same.
    if watchdog_off() {
        tracing::warn!("the probe's watchdog is off (METAPROXY_WATCHDOG=off): a detached program stays detached");
        return std::future::pending().await;
    }
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !watch_once(&probe, &readiness).await {
            return std::future::pending().await;
        }
    }
}

/// `METAPROXY_WATCHDOG=off`: for the attack tests' controls alone.
fn watchdog_off() -> bool {
    std::env::var("METAPROXY_WATCHDOG").is_ok_and(|v| v == "off")
}

/// One watchdog pass, logged; `false` once a newer daemon took over.
async fn watch_once(probe: &Arc<Probe>, readiness: &Readiness) -> bool {
    let p = probe.clone();
    let repairs = match tokio::task::spawn_blocking(move || p.repair()).await {
        Ok(repairs) => repairs,
        Err(e) => {
            tracing::error!(alert = true, error = %e, "ALERT: the probe's watchdog failed; trying again");
            readiness.probe_intact(false);
            return true;
        }
    };
    if let Some(generation) = repairs.superseded_by {
        tracing::warn!(generation, "a newer metaproxy attached generation {generation}: this daemon's watchdog stands down");
        return false;
    }
    if !repairs.pins_restored.is_empty() {
        tracing::error!(alert = true, restored = %repairs.pins_restored.join(", "), "ALERT: pins of the probe were removed or replaced while the daemon ran (it held the links, so nothing was detached); pinned again");
    }
    if !repairs.links_reattached.is_empty() {
        tracing::error!(alert = true, reattached = %repairs.links_reattached.join(", "), "ALERT: programs of the probe were detached or moved while the daemon ran; attached again");
    }
    if repairs.failed.is_empty() {
        readiness.probe_intact(true);
    } else {
        tracing::error!(alert = true, failed = %repairs.failed.join("; "), "ALERT: a pin or link of the probe is missing and could not be put back; trying again");
        readiness.probe_intact(false);
    }
    true
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
        Some(l6) => (ip6_words(*l6.ip()), l6.port()),
        None => ([0; 4], 0),
    };
    let mut creds_ip4 = [0u32; 2];
    let mut creds_ip6 = [0u32; 4];
    let v4 = config
        .container_credentials
        .iter()
        .filter_map(|ip| match ip {
            std::net::IpAddr::V4(v4) => Some(ip4_word(*v4)),
            std::net::IpAddr::V6(_) => None,
        });
    for (slot, ip) in creds_ip4.iter_mut().zip(v4) {
        *slot = ip;
    }
    if let Some(std::net::IpAddr::V6(v6)) =
        config.container_credentials.iter().find(|ip| ip.is_ipv6())
    {
        creds_ip6 = ip6_words(*v6);
    }
    let opts = ProbeOptions {
        cgroup: target.to_path_buf(),
        pin_dir: config.pin_dir.clone(),
        config: ProbeConfig {
            self_cgroup_id,
            listen_ip4: ip4_word(*config.listen.ip()),
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
        bpf_lsm: crate::kernel::lsm::bpf_lsm(),
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

/// Tells systemd (when `NOTIFY_SOCKET` is set) how we are.
fn notify(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

//! `metaproxy run`: check the configuration, attach the probe, wire the
//! request path on the real world ([`wire`]), serve, and stop cleanly on
//! SIGTERM while leaving the redirect in place (fail closed).
//!
//! Every task the daemon spawns is owned by one `JoinSet`: if any of them
//! panics or ends when it should not, the daemon logs it and exits with an
//! error (a supervisor restarts it; the pinned redirect holds meanwhile)
//! rather than limp on without, say, its Docker events.

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
};

use anyhow::Context as _;
use tokio::{sync::watch, task::JoinSet};

use crate::{
    config::RunConfig,
    kernel::{netaddr, wire::KernelAnswerPath},
    ops::{
        admin::{self, AdminState},
        metrics::{self, Metrics, Readiness},
    },
    server,
};

mod attach;
mod follow;
mod host;
mod layer2;
mod status;
mod tasks;
mod watchdog;
pub mod wire;

use attach::{attach, servable, Cgroups};
use follow::forget_answer_pins;
use host::raise_nofile_limit;
use status::{summary, DaemonState, PolicyExplainer, RoleTrier, Summary};
use watchdog::{sweep_slots, watch_once, watch_probe, watchdog_off};

pub use tasks::Tasks;
pub use wire::{wire, Prepared, Wired, World};

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

    let prepared = Prepared::load(&config, &readiness)?;
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
    tasks.spawn("slot sweep", sweep_slots(probe.clone()));
    let listener = netaddr::bind_listener(SocketAddr::V4(config.listen)).await?;
    // Connects the redirect sent to a slot reach this listener from now on.
    probe
        .steer(&listener)
        .context("steering the redirect's slots to the listener")?;
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

    let answers =
        Arc::new(KernelAnswerPath::new(probe.clone()).context("the answer pin's netlink socket")?);
    let world = World::real(
        &config,
        probe.clone(),
        cgroups.mount.clone(),
        answers.clone(),
    )
    .await?;
    let wired = wire(&config, prepared, world, &mut tasks, &readiness).await?;
    tasks.spawn(
        "answer pins",
        forget_answer_pins(answers, wired.identities.subscribe()),
    );
    tasks.spawn(
        "layer-2 refusals",
        layer2::log_refusals(
            probe.clone(),
            cgroups.mount.clone(),
            wired.identities.clone(),
        ),
    );
    let state = Arc::new(DaemonState {
        probe: probe.clone(),
        guard: guard_state,
        count: wired.count.clone(),
        identities: wired.identities.clone(),
        credentials: wired.credentials.clone(),
        requests: wired.requests.clone(),
        me: wired.me.clone(),
        imdsv1: wired.imdsv1.clone(),
    });
    let _ = metrics.set(Metrics::new(
        &wired.requests,
        wired.credentials.metrics(),
        wired.sts.metrics(),
        wired.identities.metrics(),
        state.clone(),
    ));
    let admin_listener = admin::bind(&config.admin_socket)
        .await
        .with_context(|| format!("admin socket {}", config.admin_socket.display()))?;

    servers.spawn(server::run(listener, wired.pipeline.clone(), stopped()));
    if let Some(l6) = listener6 {
        servers.spawn(server::run(l6, wired.pipeline.clone(), stopped()));
    }
    servers.spawn(admin::run(
        admin_listener,
        config.admin_socket.clone(),
        Arc::new(AdminState {
            connections: wired.connections.clone(),
            status: state,
            explain: Arc::new(PolicyExplainer {
                identities: wired.identities.clone(),
                policy: wired.policy.clone(),
            }),
            roles: Arc::new(RoleTrier {
                sts: wired.sts.clone(),
                session: config.session.clone(),
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
                companions: cgroups.companions.len(),
                mount: cgroups.mount,
                target: cgroups.target,
                own: cgroups.own,
                docker: wired.identities.clone(),
            },
            readiness.clone(),
            wired.me.clone(),
        ),
    );

    let result = until_stopped(&mut tasks, &mut servers).await;
    notify(sd_notify::NotifyState::Stopping);
    tracing::info!("stopping; the probe stays attached, so IMDS connects are refused until metaproxy runs again");
    let _ = stop_tx.send(true);
    while servers.join_next().await.is_some() {}
    tasks.shutdown().await;
    // A last pass: what a job unpinned must be pinned again before the
    // descriptors that hold it go with the process.
    if !watchdog_off() {
        watch_once(&probe, &readiness).await;
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

/// Tells systemd (when `NOTIFY_SOCKET` is set) how we are.
fn notify(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

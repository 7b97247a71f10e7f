//! `metaproxy run`: attach the probe, serve, and stop cleanly on SIGTERM
//! while leaving the redirect in place (fail closed).

use std::{net::IpAddr, sync::Arc};

use anyhow::Context as _;
use metaproxy_common::ProbeConfig;
use tokio::sync::watch;

use crate::{
    admin,
    cgroup::{self, CgroupPaths},
    cli::RunArgs,
    connlog::ConnLog,
    netaddr,
    probe::{self, Probe, ProbeOptions},
    server::{self, State},
};

/// How many recent connections the admin API keeps.
const RECENT_CONNECTIONS: usize = 4096;

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    check_listen(args.listen.ip(), "--listen")?;
    if let Some(l6) = args.listen6 {
        check_listen(l6.ip(), "--listen6")?;
        anyhow::ensure!(l6.is_ipv6(), "--listen6 must be an IPv6 address, got {l6}");
    }
    anyhow::ensure!(
        args.listen.is_ipv4(),
        "--listen must be an IPv4 address, got {}",
        args.listen
    );

    let mount = cgroup::cgroup2_mount()?;
    let target = args.cgroup.clone().unwrap_or_else(|| mount.clone());
    cgroup::check_cgroup2_dir(&mount, &target)?;
    let own = cgroup::own_cgroup(&mount)?;
    let self_cgroup_id = cgroup::id_of(&own)?;
    if own == target {
        tracing::warn!(
            cgroup = %own.display(),
            "the daemon runs in the very cgroup it intercepts: other processes in it reach the real IMDS too; run it in a cgroup of its own"
        );
    }

    // Listen before attaching, so a redirected connect finds a listener.
    let listener = netaddr::bind_listener(args.listen).await?;
    let listener6 = match args.listen6 {
        Some(addr) => Some(netaddr::bind_listener(addr).await?),
        None => None,
    };

    let (mut listen_ip6, mut listen_port6) = ([0; 4], 0);
    if let Some(std::net::SocketAddr::V6(l6)) = args.listen6 {
        listen_ip6 = probe::words(l6.ip().octets());
        listen_port6 = l6.port();
    }
    let std::net::SocketAddr::V4(l4) = args.listen else {
        unreachable!("checked above")
    };
    let config = ProbeConfig {
        self_cgroup_id,
        listen_ip4: u32::from_ne_bytes(l4.ip().octets()),
        listen_port4: l4.port(),
        listen_port6,
        listen_ip6,
    };
    let opts = ProbeOptions {
        cgroup: target.clone(),
        pin_dir: args.pins.pin_dir.clone(),
        config,
        kernel_log_level: kernel_log_level(),
    };
    let (probe, kernel_log) =
        Probe::attach(&opts).with_context(|| format!("attaching to {}", target.display()))?;
    if let Some(kernel_log) = kernel_log {
        tokio::spawn(kernel_log.run());
    }
    tracing::info!(
        cgroup = %target.display(),
        listen = %args.listen,
        listen6 = ?args.listen6,
        generation = probe.generation(),
        self_cgroup = %own.display(),
        "probe attached"
    );

    let state = Arc::new(State {
        probe,
        cgroups: CgroupPaths::new(mount),
        connections: ConnLog::new(RECENT_CONNECTIONS),
    });
    let admin_listener = admin::bind(&args.admin.admin_socket)
        .await
        .with_context(|| format!("admin socket {}", args.admin.admin_socket.display()))?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(server::run(listener, state.clone(), stopped()));
    if let Some(l6) = listener6 {
        tasks.spawn(server::run(l6, state.clone(), stopped()));
    }
    tasks.spawn(admin::run(
        admin_listener,
        args.admin.admin_socket.clone(),
        state.clone(),
        stopped(),
    ));

    wait_for_signal().await?;
    tracing::info!("stopping; the probe stays attached, so IMDS connects are refused until metaproxy runs again");
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

fn check_listen(ip: IpAddr, flag: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !ip.is_unspecified() && !ip.is_loopback() && !ip.is_multicast(),
        "{flag} {ip}: must be a unicast address containers can reach (not loopback or unspecified)"
    );
    anyhow::ensure!(
        ip != IpAddr::from([169, 254, 169, 254]),
        "{flag} cannot be the metadata service itself"
    );
    Ok(())
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

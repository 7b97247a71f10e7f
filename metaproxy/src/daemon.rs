//! `metaproxy run`: attach the probe, serve, and stop cleanly on SIGTERM
//! while leaving the redirect in place (fail closed).

use std::{
    net::IpAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use anyhow::Context as _;
use metaproxy_common::ProbeConfig;
use tokio::sync::watch;

use crate::{
    admin,
    cgroup::{self, CgroupPaths},
    cli::RunArgs,
    connlog::ConnLog,
    credentials::CredentialCache,
    identity::{DockerApi, Identities},
    imds::{Imds, ImdsOptions, TokenKey, Upstream},
    netaddr,
    policy::Policy,
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
    let policy = Policy::new(&args.allow_role)?;
    let tokens = TokenKey::load_or_create(&args.state_dir)
        .with_context(|| format!("token key in --state-dir {}", args.state_dir.display()))?;

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

    // The daemon's own credentials: aws-config's standard chain, so the
    // usual variables (AWS_EC2_METADATA_SERVICE_ENDPOINT, AWS_ENDPOINT_URL_STS,
    // AWS_REGION) work as in any AWS tool. On EC2 that is the instance
    // profile, from the real IMDS.
    let aws = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    // STS down or hanging must not hold requests (or the single flight)
    // forever.
    let timeouts = aws_sdk_sts::config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(2))
        .operation_attempt_timeout(Duration::from_secs(5))
        .operation_timeout(Duration::from_secs(15))
        .build();
    let sts = aws_sdk_sts::Client::from_conf(
        aws_sdk_sts::config::Builder::from(&aws)
            .timeout_config(timeouts)
            .build(),
    );
    let account = Arc::new(OnceLock::new());
    tokio::spawn(discover_account(sts.clone(), account.clone()));
    let credentials = Arc::new(CredentialCache::new(sts));
    tokio::spawn(credentials.clone().refresh_ahead(Duration::from_secs(60)));

    let cgroups = Arc::new(CgroupPaths::new(mount));
    let identities = Arc::new(Identities::new(
        DockerApi::default(),
        cgroups.clone(),
        policy,
        account.clone(),
    ));
    tokio::spawn(identities.clone().follow_events(credentials.clone()));

    let imds = Imds {
        identities,
        credentials,
        tokens,
        upstream: Upstream::from_env(),
        options: ImdsOptions {
            require_imdsv2: args.require_imdsv2,
            host_processes: args.host_processes,
        },
    };
    let state = Arc::new(State {
        probe,
        cgroups,
        connections: ConnLog::new(RECENT_CONNECTIONS),
        imds,
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

/// Learns the instance profile's account (role names are taken in it, and
/// by default only its roles are allowed), retrying while STS is down.
async fn discover_account(sts: aws_sdk_sts::Client, account: Arc<OnceLock<String>>) {
    let mut delay = Duration::from_secs(1);
    loop {
        match sts.get_caller_identity().send().await {
            Ok(out) => {
                if let Some(id) = out.account {
                    tracing::info!(account = %id, arn = out.arn.as_deref().unwrap_or("?"), "instance credentials work");
                    let _ = account.set(id);
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %aws_sdk_sts::error::DisplayErrorContext(&e), "cannot reach STS with the instance credentials; retrying");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
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

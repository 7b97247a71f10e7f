use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, OnceLock,
    },
    time::Duration,
};

use tokio::net::TcpListener;

use super::*;
use crate::model::ids::AccountId;

#[tokio::test]
async fn the_metrics_listener_caps_its_clients_and_cuts_slow_ones() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let defaults = ClientLimits::default();
    assert_eq!(defaults.max_connections, 64);
    assert!(defaults.lifetime <= Duration::from_secs(30));

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = ClientLimits {
        max_connections: 2,
        lifetime: Duration::from_millis(400),
        grace: Duration::from_millis(300),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        listener,
        Arc::new(OnceLock::new()),
        Arc::new(Readiness::default()),
        limits,
        async {
            let _ = stopped.await;
        },
    ));
    let connect = || tokio::net::TcpStream::connect(addr);
    let started = std::time::Instant::now();
    // Two slow clients: one says nothing, one sends half a request.
    let mut idle = connect().await.unwrap();
    let mut loris = connect().await.unwrap();
    loris.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The third waits in the backlog: no answer while the two hold
    // their slots.
    let mut third = connect().await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let early = tokio::time::timeout(Duration::from_millis(200), third.read(&mut buf)).await;
    assert!(early.is_err(), "served over the cap: {early:?}");
    // Both slow clients are cut by lifetime and grace, and the third is
    // served then.
    for slow in [&mut idle, &mut loris] {
        let n = tokio::time::timeout(Duration::from_secs(3), slow.read(&mut buf))
            .await
            .expect("a slow client is cut")
            .unwrap_or(0);
        assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&buf[..n]));
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let n = tokio::time::timeout(Duration::from_secs(3), third.read(&mut buf))
        .await
        .expect("served once a slot is free")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok\n"), "{answer}");
    let _ = stop.send(());
    server.await.unwrap();
}

struct Fixed(Live);
impl LiveSource for Fixed {
    fn live(&self) -> Live {
        self.0
    }
}

#[test]
fn names_follow_prometheus_conventions() {
    let requests = RequestMetrics::default();
    requests.request(RouteLabel::Credentials, Outcome::Served, None);
    requests.request(
        RouteLabel::Credentials,
        Outcome::Refused,
        Some("sts-unavailable"),
    );
    let sts = StsMetrics::default();
    sts.calls
        .get_or_create(&OperationLabels {
            operation: "AssumeRole",
        })
        .inc();
    let m = Metrics::new(
        &requests,
        &CacheMetrics::default(),
        &sts,
        &DockerMetrics::default(),
        Arc::new(Fixed(Live {
            open_connections: 3,
            map_conns: 7,
            map_slots: 0,
            guard_drops: [4, 0, 1, 0, 0],
            l2_refusals: [2, 0, 0, 0, 0, 1, 0, 3, 0],
            l2_sockets_refused: true,
            pins_restored: 5,
            ..Live::default()
        })),
    );
    let text = m.encode();
    for line in [
        "metaproxy_requests_total{route=\"credentials\",outcome=\"served\"} 1",
        "metaproxy_refusals_total{reason=\"sts-unavailable\"} 1",
        "metaproxy_sts_calls_total{operation=\"AssumeRole\"} 1",
        "metaproxy_open_connections 3",
        "metaproxy_probe_map_entries{map=\"conns\"} 7",
        "metaproxy_probe_map_capacity{map=\"conns\"} 65536",
        "metaproxy_log_lines_dropped_total 0",
        "metaproxy_guard_dropped_packets_total{kind=\"forwarded\"} 4",
        "metaproxy_guard_dropped_packets_total{kind=\"subtree_packet_socket\"} 1",
        "metaproxy_guard_dropped_packets_total{kind=\"subtree_socket\"} 0",
        "metaproxy_layer2_refused_total{kind=\"packet_socket\"} 2",
        "metaproxy_layer2_refused_total{kind=\"qdisc_bypass\"} 1",
        "metaproxy_layer2_refused_total{kind=\"xdp_socket\"} 0",
        "metaproxy_layer2_sockets_refused 1",
        "metaproxy_layer2_refused_total{kind=\"spoofed_arp\"} 3",
        "metaproxy_probe_repairs_total{kind=\"pin\"} 5",
        "metaproxy_probe_repairs_total{kind=\"link\"} 0",
        "metaproxy_build_info{version=\"",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    for name in text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
    {
        assert!(name.starts_with("metaproxy_"), "{name}");
    }
}

#[test]
fn readiness_names_the_first_missing_step() {
    let r = Readiness::default();
    assert_eq!(r.check(), Err("the probe is not attached yet"));
    r.probe_attached();
    let guarded = Arc::new(AtomicBool::new(false));
    let on = guarded.clone();
    r.guard(Arc::new(move || on.load(Ordering::Relaxed)));
    assert!(r.check().unwrap_err().contains("packet guard"));
    guarded.store(true, Ordering::Relaxed);
    assert_eq!(r.check(), Err("the IMDS listener is not bound yet"));
    r.listening();
    let up = Arc::new(AtomicBool::new(false));
    let flag = up.clone();
    r.runtimes(Arc::new(move || {
        if flag.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("the Podman API is not reachable")
        }
    }));
    assert_eq!(r.check(), Err("the Podman API is not reachable"));
    up.store(true, Ordering::Relaxed);
    let account = Arc::new(OnceLock::new());
    r.own_credentials(account.clone());
    assert!(r.check().unwrap_err().contains("own AWS credentials"));
    account
        .set(AccountId::parse("123456789012").unwrap())
        .unwrap();
    assert_eq!(r.check(), Ok(()));
    up.store(false, Ordering::Relaxed);
    assert_eq!(r.check(), Err("the Podman API is not reachable"));
    // A route that moves to an unguarded interface makes it unready.
    up.store(true, Ordering::Relaxed);
    guarded.store(false, Ordering::Relaxed);
    assert!(r.check().unwrap_err().contains("packet guard"));
    guarded.store(true, Ordering::Relaxed);
    // A pin or link the watchdog could not put back: not ready until it
    // is.
    r.probe_intact(false);
    assert!(r.check().unwrap_err().contains("could not be put back"));
    r.probe_intact(true);
    assert_eq!(r.check(), Ok(()));
}

#[test]
fn with_id_tokens_readiness_waits_for_the_issuers_keys_and_required_tokens_need_no_credentials() {
    let r = Readiness::default();
    r.probe_attached();
    r.guard(Arc::new(|| true));
    r.listening();
    r.runtimes(Arc::new(|| Ok(())));
    let fetched = Arc::new(AtomicBool::new(false));
    let keys = fetched.clone();
    r.id_tokens(Arc::new(move || keys.load(Ordering::Relaxed)));
    // --oidc-required: own_credentials is never asked for.
    assert!(r.check().unwrap_err().contains("JWKS"));
    fetched.store(true, Ordering::Relaxed);
    assert_eq!(r.check(), Ok(()));
}

#[test]
fn error_codes_are_bounded() {
    assert_eq!(sts_error_code(Some("AccessDenied")), "AccessDenied");
    assert_eq!(sts_error_code(Some("x\ny")), "other");
    assert_eq!(sts_error_code(None), "none");
}

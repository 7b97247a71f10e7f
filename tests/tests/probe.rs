//! The kernel probe against the real kernel: redirect, attribution, fail
//! closed, IPv6, bounded maps. Each test builds its own bed (network
//! namespace with only `lo`, cgroup subtree, daemon, fake IMDS) and tears it
//! down on every exit path. Needs root; run through `cargo xtask test`.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use metaproxy_tests::{
    bed::{bin, KernelBed as Bed},
    cgroup::id_of,
    daemon::{admin_command, sample_value},
    process::{output_in, spawn_in},
    scratch::ScratchDir,
};
use serde_json::Value;

const IMDS: &str = "169.254.169.254:80";
const LISTEN: &str = "169.254.170.254:8169";

#[test]
fn redirected_connect_reaches_the_daemon_with_its_cgroup_and_pid() {
    let bed = Bed::new(&[]);
    let got = bed.client(
        "attached/a",
        &["get", IMDS, "/latest/meta-data/instance-id"],
    );
    // The daemon answered (it refuses host processes here); the fake would
    // have said 200.
    assert_eq!(got["status"], 403, "{got}");
    let conns = bed.connection_by_port(got["local_port"].as_u64().unwrap());
    assert_eq!(conns.len(), 1, "{conns:?}");
    let c = &conns[0];
    assert_eq!(c["cgroup_id"], id_of(&bed.cgroup("attached/a")));
    assert_eq!(c["cgroup"], bed.cg.relative(&bed.cgroup("attached/a")));
    assert_eq!(c["pid"], got["pid"]);
    assert_eq!(c["comm"], "mp-client");
    assert_eq!(c["original_dst"], IMDS);
    assert_eq!(c["request"], "GET /latest/meta-data/instance-id");
    assert_eq!(c["outcome"], "refused");
    assert!(
        c["reason"]
            .as_str()
            .unwrap()
            .contains("is not in --allow-host-cgroup"),
        "{c}"
    );
    assert_eq!(bed.imds_calls(), 0, "the real IMDS was reached");

    // The human table shows the same connection.
    let table = bed.daemon.admin("connections", &[]).unwrap();
    assert!(
        table.lines().next().unwrap().contains("CGROUP ID"),
        "{table}"
    );
    assert!(
        table.contains("mp-client") && table.contains("/attached/a"),
        "{table}"
    );
}

#[test]
fn other_addresses_and_cgroups_are_untouched_and_other_imds_ports_refused() {
    let bed = Bed::new(&[]);
    // Another port on the IMDS address: nothing there is for a job, and
    // the packet guard would drop its packets, so the connect fails at once.
    let other_port = bed.client(
        "attached/a",
        &["get", "169.254.169.254:81", "/latest/meta-data/instance-id"],
    );
    assert_eq!(other_port["errno"], libc::EPERM, "{other_port}");
    assert!(bed.fakes[1].calls().is_empty());
    // The daemon's own cgroup and processes outside the subtree reach it.
    for cgroup in ["attached/metaproxy", "outside"] {
        let got = bed.client(
            cgroup,
            &["get", "169.254.169.254:81", "/latest/meta-data/instance-id"],
        );
        assert_eq!(got["status"], 200, "{cgroup}: {got}");
    }
    assert_eq!(bed.fakes[1].calls().len(), 2);
    // Another address: connection refused by the namespace, not by us.
    let other_addr = bed.client("attached/a", &["get", "127.0.0.1:80"]);
    assert_eq!(other_addr["errno"], libc::ECONNREFUSED, "{other_addr}");
    // A process outside the attached subtree reaches the real IMDS.
    let outside = bed.client("outside", &["get", IMDS, "/latest/meta-data/instance-id"]);
    assert_eq!(outside["status"], 200, "{outside}");
    assert_eq!(bed.imds_calls(), 1);
    // So does a process in the daemon's own cgroup, inside the subtree: the
    // daemon's upstream requests must never loop back to itself.
    let own = bed.client(
        "attached/metaproxy",
        &["get", IMDS, "/latest/meta-data/instance-id"],
    );
    assert_eq!(own["status"], 200, "{own}");
    assert_eq!(bed.imds_calls(), 2);
    assert!(
        bed.daemon.connections().unwrap().is_empty(),
        "none of these should reach the daemon"
    );
}

#[test]
fn concurrent_connections_from_four_cgroups_are_each_attributed_exactly() {
    // These cgroups are in no container: they share the host callers' one
    // budget, which must hold all 400 connections here.
    let bed = Bed::new(&["--max-connections-per-container", "512"]);
    let groups = [
        "attached/a",
        "attached/b",
        "attached/c",
        "attached/nested/d",
    ];
    let children: Vec<_> = groups
        .iter()
        .map(|rel| {
            let mut cmd = Command::new(bin("mp-client"));
            cmd.args(["hold", IMDS, "100"]).stdout(Stdio::piped());
            spawn_in(cmd, &bed.ns.path(), &bed.cgroup(rel)).unwrap()
        })
        .collect();
    let reports: Vec<Value> = children
        .into_iter()
        .map(|mut c| {
            let out = std::mem::take(&mut c.child().stdout).unwrap();
            let report: Value = serde_json::from_reader(out).unwrap();
            assert!(c.child().wait().unwrap().success());
            report
        })
        .collect();
    let conns = bed.daemon.connections().unwrap();
    assert_eq!(conns.len(), 400, "every connection accepted once");
    for (rel, report) in groups.iter().zip(&reports) {
        let want_cgroup = id_of(&bed.cgroup(rel));
        let ports = report["ports"].as_array().unwrap();
        assert_eq!(ports.len(), 100, "{report}");
        assert!(
            report["statuses"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s == 403),
            "{report}"
        );
        for port in ports {
            // All clients share the namespace's address, and a port one
            // client closed may be reused by another: match on both. Each
            // connect goes to a slot of its own, so one client may hold
            // one port for several connections at once.
            let matching: Vec<_> = conns
                .iter()
                .filter(|c| c["client"].as_str().unwrap().ends_with(&format!(":{port}")))
                .filter(|c| c["pid"] == report["pid"])
                .collect();
            let held = ports.iter().filter(|p| *p == port).count();
            assert_eq!(matching.len(), held, "port {port}: {matching:?}");
            for m in matching {
                assert_eq!(m["cgroup_id"], want_cgroup, "port {port} of {rel}");
                assert_eq!(m["request"], "GET /");
            }
        }
    }
    assert_eq!(bed.imds_calls(), 0);
}

#[test]
fn a_direct_connect_to_the_listen_address_has_no_record_and_is_refused() {
    let bed = Bed::new(&[]);
    for rel in ["attached/a", "outside"] {
        let got = bed.client(rel, &["get", LISTEN, "/latest/meta-data/instance-id"]);
        assert_eq!(got["status"], 403, "{rel}: {got}");
        let conns = bed.connection_by_port(got["local_port"].as_u64().unwrap());
        assert_eq!(conns.len(), 1);
        assert_eq!(conns[0]["outcome"], "refused");
        assert!(
            conns[0]["reason"]
                .as_str()
                .unwrap()
                .contains("no probe record"),
            "{conns:?}"
        );
        assert_eq!(conns[0]["cgroup_id"], Value::Null);
    }
    // Counted, by reason.
    let metrics = bed.daemon.metrics_get("/metrics").unwrap().1;
    for (sample, want) in [
        ("metaproxy_probe_records_missing_total", 2.0),
        ("metaproxy_refusals_total{reason=\"no-record\"}", 2.0),
        (
            "metaproxy_requests_total{route=\"unattributed\",outcome=\"refused\"}",
            2.0,
        ),
    ] {
        assert_eq!(sample_value(&metrics, sample), want, "{sample}\n{metrics}");
    }
}

#[test]
fn the_redirect_fails_closed_while_the_daemon_is_down_and_recovers_on_restart() {
    let mut bed = Bed::new(&[]);
    let before = bed.client("attached/a", &["get", IMDS]);
    assert_eq!(before["status"], 403);

    bed.daemon.kill9();
    let down = bed.client(
        "attached/a",
        &["get", IMDS, "/latest/meta-data/instance-id"],
    );
    // The connect is sent to a slot, where nobody is steered now: it is
    // refused.
    assert_eq!(
        down["errno"],
        libc::ECONNREFUSED,
        "with the daemon dead: {down}"
    );
    assert_eq!(
        bed.imds_calls(),
        0,
        "a dead daemon let a container reach the real IMDS"
    );

    bed.daemon.restart().unwrap();
    let again = bed.client("attached/a", &["get", IMDS]);
    assert_eq!(again["status"], 403, "{again}");
    let conns = bed.connection_by_port(again["local_port"].as_u64().unwrap());
    assert_eq!(conns[0]["cgroup_id"], id_of(&bed.cgroup("attached/a")));
    // The restart replaced the old links rather than stacking new ones.
    assert_eq!(bed.daemon.status().unwrap()["generation"], 2);
    let links = std::fs::read_dir(bed.daemon.pin_dir().join("links"))
        .unwrap()
        .count();
    // The layer-2 lock's LSM half only where the kernel runs it.
    let lsm = bed.daemon.status().unwrap()["layer2"]["sockets_refused"] == true;
    assert_eq!(
        links,
        10 + usize::from(lsm),
        "one link per cgroup program, the packet guard's on the uplink and the slot steering"
    );

    // A clean stop keeps the redirect too.
    assert!(bed.daemon.terminate(), "daemon did not stop on SIGTERM");
    let stopped = bed.client("attached/a", &["get", IMDS]);
    assert_eq!(stopped["errno"], libc::ECONNREFUSED, "{stopped}");
    assert_eq!(bed.imds_calls(), 0);
}

#[test]
fn sockets_squatting_the_slots_while_the_daemon_is_down_answer_nobody() {
    use std::io::BufRead as _;
    let mut bed = Bed::new(&[]);
    bed.daemon.kill9();
    // Someone on the host (here, a process of the subtree) listens on
    // every slot port, on every address, and answers 200 to anything.
    let squat = r#"
import resource, selectors, socket
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
sel = selectors.DefaultSelector()
for port in range(16384, 32768):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("0.0.0.0", port))
    except OSError:
        s.close()
        continue
    s.listen(8)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        c, _ = key.fileobj.accept()
        c.setblocking(True)
        c.recv(65536)
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nsquatted")
        c.close()
"#;
    let mut cmd = Command::new("python3");
    cmd.args(["-c", squat]).stdout(Stdio::piped());
    let mut squatter = spawn_in(cmd, &bed.ns.path(), &bed.cgroup("attached/squatter")).unwrap();
    let out = squatter.child().stdout.take().unwrap();
    let mut ready = String::new();
    std::io::BufReader::new(out).read_line(&mut ready).unwrap();
    assert_eq!(ready.trim(), "ready");
    // Control: the squatter answers on those ports elsewhere.
    let control = bed.client("attached/b", &["get", "127.0.0.1:20000"]);
    assert_eq!(control["status"], 200, "{control}");
    // The redirect's connects reach no one of them.
    for _ in 0..20 {
        let got = bed.client("attached/a", &["get", IMDS]);
        assert_eq!(
            got["errno"],
            libc::ECONNREFUSED,
            "a squatter answered the redirect: {got}"
        );
    }
    squatter.terminate(std::time::Duration::from_secs(5));
    assert_eq!(bed.imds_calls(), 0);
}

#[test]
fn detach_removes_the_redirect() {
    let mut bed = Bed::new(&[]);
    // Not under a running daemon: that would fail open behind its back.
    let refused = bed.daemon.detach().unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("stop it first"),
        "{refused:?}"
    );
    assert!(bed.daemon.pin_dir().join("links").exists());
    assert!(bed.daemon.terminate());
    let out = bed.daemon.detach().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!bed.daemon.pin_dir().exists());
    let got = bed.client(
        "attached/a",
        &["get", IMDS, "/latest/meta-data/instance-id"],
    );
    assert_eq!(
        got["status"], 200,
        "after detach the connect goes where it was aimed: {got}"
    );
}

#[test]
fn ipv6_imds_is_refused_without_an_ipv6_listener() {
    let bed = Bed::new(&[]);
    let got = bed.client(
        "attached/a",
        &["get", "[fd00:ec2::254]:80", "/latest/meta-data/instance-id"],
    );
    assert_eq!(got["errno"], libc::EPERM, "{got}");
    assert!(bed.fakes[2].calls().is_empty());
    // The IPv4 service reached through an IPv4-mapped IPv6 address is still
    // redirected (connect4 never sees it).
    let mapped = bed.client("attached/a", &["get", "[::ffff:169.254.169.254]:80"]);
    assert_eq!(mapped["status"], 403, "{mapped}");
    let conns = bed.connection_by_port(mapped["local_port"].as_u64().unwrap());
    assert_eq!(conns[0]["original_dst"], IMDS);
    assert_eq!(bed.imds_calls(), 0);
}

#[test]
fn ipv6_imds_is_redirected_to_an_ipv6_listener() {
    let bed = Bed::new(&["--listen6", "[fd00:e7a::1]:8169"]);
    let got = bed.client(
        "attached/a",
        &["get", "[fd00:ec2::254]:80", "/latest/meta-data/instance-id"],
    );
    assert_eq!(got["status"], 403, "{got}");
    let conns = bed.connection_by_port(got["local_port"].as_u64().unwrap());
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0]["original_dst"], "[fd00:ec2::254]:80");
    assert_eq!(conns[0]["cgroup_id"], id_of(&bed.cgroup("attached/a")));
    assert!(bed.fakes[2].calls().is_empty());
}

#[test]
fn host_processes_are_passed_through_unchanged_token_put_included() {
    let bed = Bed::allowing_a(&[]);
    let got = bed.client("attached/a", &["v2", IMDS, "/latest/meta-data/instance-id"]);
    assert_eq!(got["token_status"], 200, "{got}");
    assert_eq!(got["status"], 200, "{got}");
    assert_eq!(got["body"], "i-0123456789abcdef0");
    // The fake saw both requests, forwarded by the daemon.
    let seen: Vec<_> = bed.fakes[0]
        .calls()
        .into_iter()
        .flat_map(|c| c.requests)
        .collect();
    assert!(
        seen.contains(&("PUT".into(), "/latest/api/token".into(), 200)),
        "{seen:?}"
    );
    assert!(
        seen.contains(&("GET".into(), "/latest/meta-data/instance-id".into(), 200)),
        "{seen:?}"
    );
    let conns = bed.daemon.connections().unwrap();
    assert!(
        conns.iter().all(|c| c["outcome"] == "passthrough"),
        "{conns:?}"
    );
    assert_eq!(conns.len(), 2);
}

#[test]
fn udp_to_imds_is_refused() {
    let bed = Bed::new(&[]);
    for imds in [IMDS, "169.254.169.254:81"] {
        let got = bed.client("attached/a", &["udp", imds]);
        assert_eq!(got["errno"], libc::EPERM, "{imds}: {got}");
    }
    // Other UDP destinations are untouched.
    let other = bed.client("attached/a", &["udp", "169.254.200.2:81"]);
    assert_eq!(other["ok"], true, "{other}");
}

#[test]
fn maps_stay_bounded_over_100k_short_connections() {
    let bed = Bed::new(&[]);
    let got = bed.client("attached/a", &["churn", IMDS, "100000"]);
    assert_eq!(got["succeeded"], 100_000, "{got}");
    let status = bed.daemon.status().unwrap();
    let (pending, conns, slots) = (
        status["maps"]["pending"].as_u64().unwrap(),
        status["maps"]["conns"].as_u64().unwrap(),
        status["maps"]["slots"].as_u64().unwrap(),
    );
    // Closed connections leave nothing behind; without the cleanup the LRU
    // would sit at its capacity (65536), and the slots would run out.
    assert!(
        conns < 64 && pending < 64 && slots < 64,
        "maps grew: {status}"
    );
    assert_eq!(bed.imds_calls(), 0);
}

#[test]
fn connections_follow_streams_and_the_cli_explains_a_missing_daemon() {
    let bed = Bed::new(&[]);
    let mut follow = bed
        .daemon
        .admin_command(&["connections", "--follow", "--json"]);
    follow.stdout(Stdio::piped());
    let mut follow = metaproxy_tests::process::ChildGuard::new(follow.spawn().unwrap());
    let stdout = follow.child().stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    // `--follow` streams what happens after it subscribed, which it may
    // not have done yet: a request a second until one shows.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut ports = Vec::new();
    let line = 'found: loop {
        let got = bed.client(
            "attached/a",
            &["get", IMDS, "/latest/meta-data/instance-id"],
        );
        ports.push(format!(":{}", got["local_port"]));
        let round = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while let Ok(line) =
            rx.recv_timeout(round.saturating_duration_since(std::time::Instant::now()))
        {
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["client"]
                .as_str()
                .is_some_and(|c| ports.iter().any(|p| c.ends_with(p)))
            {
                break 'found v;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "--follow printed nothing for our connections"
        );
    };
    assert_eq!(line["cgroup_id"], id_of(&bed.cgroup("attached/a")));

    let missing = admin_command(Path::new("/nonexistent/admin.sock"), &["connections"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("metaproxy is not running"), "{err}");
}

#[test]
fn the_kernel_programs_log_reaches_the_daemons_log() {
    let bed = Bed::new(&[]);
    let got = bed.client("attached/a", &["get", IMDS]);
    let line = metaproxy_tests::wait_for(
        "the kernel's log line",
        std::time::Duration::from_secs(5),
        || {
            let log = bed.daemon.log();
            log.lines()
                .find(|l| {
                    l.contains("redirected imds connect")
                        && l.contains(&format!("pid {}", got["pid"]))
                })
                .map(str::to_owned)
        },
    )
    .unwrap();
    assert!(
        line.contains(&format!("cgroup {}", id_of(&bed.cgroup("attached/a")))),
        "{line}"
    );
    // Written to a file (as to journald): plain text, no colour codes.
    assert!(
        !bed.daemon.log().contains('\x1b'),
        "escape codes in the log"
    );
}

#[test]
fn container_runtimes_on_the_host_get_no_pass_through() {
    let bed = Bed::allowing_a(&[]);
    // A host process called dockerd: it fetches URLs for Docker API clients
    // (`docker build` with ADD), so it must not reach the real IMDS.
    let dir = ScratchDir::new("mpt").unwrap();
    let fake_dockerd = dir.join("dockerd");
    std::fs::copy(bin("mp-client"), &fake_dockerd).unwrap();
    let mut cmd = Command::new(&fake_dockerd);
    cmd.args(["get", IMDS, "/latest/meta-data/instance-id"]);
    let out = output_in(cmd, &bed.ns.path(), &bed.cgroup("attached/a")).unwrap();
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["status"], 403, "{got}");
    let conns = bed.connection_by_port(got["local_port"].as_u64().unwrap());
    assert!(
        conns[0]["reason"].as_str().unwrap().contains("dockerd"),
        "{conns:?}"
    );
    assert_eq!(bed.imds_calls(), 0);
}

#[test]
fn host_processes_outside_the_allow_list_and_build_steps_get_no_pass_through() {
    let bed = Bed::allowing_a(&[]);
    for (rel, reason) in [
        ("attached/b", "is not in --allow-host-cgroup"),
        // Where BuildKit (cgroupfs driver) runs `docker build` RUN steps.
        (
            "attached/a/buildkit/lq1hn4a0qq7ek6tq8tqmb9p8u",
            "BuildKit build step",
        ),
    ] {
        let got = bed.client(rel, &["get", IMDS, "/latest/meta-data/instance-id"]);
        assert_eq!(got["status"], 403, "{rel}: {got}");
        let conns = bed.connection_by_port(got["local_port"].as_u64().unwrap());
        assert!(
            conns[0]["reason"].as_str().unwrap().contains(reason),
            "{rel}: {conns:?}"
        );
    }
    assert_eq!(bed.imds_calls(), 0, "nothing reached the real IMDS");
}

#[test]
fn only_the_daemon_may_bind_its_listen_address_even_while_it_is_down() {
    let mut bed = Bed::new(&[]);
    bed.daemon.kill9();
    // Whoever bound the listen address (or the wildcard on its port) now
    // would answer every container's IMDS requests.
    for addr in [LISTEN, "0.0.0.0:8169", "[::]:8169"] {
        let got = bed.client("attached/a", &["bind", addr]);
        assert_eq!(got["errno"], libc::EPERM, "bind {addr}: {got}");
    }
    // Other ports and addresses are untouched.
    let other = bed.client("attached/a", &["bind", "169.254.170.254:8170"]);
    assert_eq!(other["ok"], true, "{other}");
    // The restarted daemon gets its address back and serves.
    bed.daemon.restart().unwrap();
    let got = bed.client(
        "attached/a",
        &["get", IMDS, "/latest/meta-data/instance-id"],
    );
    assert_eq!(got["status"], 403, "answered by the daemon: {got}");
    assert_eq!(bed.imds_calls(), 0);
}

/// `metaproxy status --redirect` for this bed: exit status and output.
fn redirect_status(bed: &Bed) -> (bool, String) {
    let out = bed
        .daemon
        .pins_command(&["status", "--redirect"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn ready_comes_only_once_the_redirect_is_pinned_and_status_says_so() {
    use std::os::unix::net::UnixDatagram;
    let dir = ScratchDir::new("mpt").unwrap();
    let path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&path).unwrap();
    notify
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut bed = Bed::with_env(&[], &[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("a notification");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "READY=1");
    let (ok, text) = redirect_status(&bed);
    assert!(ok, "{text}");
    assert!(
        text.contains("redirect in place: generation 1; packet guard on mpimds; daemon running"),
        "{text}"
    );

    assert!(bed.daemon.terminate());
    let n = notify.recv(&mut buf).expect("a notification");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "STOPPING=1");
    // Stopped, the redirect holds, and status says so (exit 0).
    let (ok, text) = redirect_status(&bed);
    assert!(ok, "{text}");
    assert!(text.contains("daemon not running"), "{text}");

    // Detached: exit 1, for units that must not start without it.
    let out = bed.daemon.detach().unwrap();
    assert!(out.status.success(), "{out:?}");
    let (ok, text) = redirect_status(&bed);
    assert!(!ok && text.contains("no redirect"), "{text}");
}

#[test]
fn health_says_what_is_missing_and_json_logs_keep_their_fields() {
    // The kernel bed has no Docker and no STS: alive, attached, not ready.
    let bed = Bed::new(&["--log-format", "json"]);
    assert_eq!(
        bed.daemon.metrics_get("/healthz").unwrap(),
        (200, "ok\n".to_string())
    );
    assert_eq!(
        bed.daemon.metrics_get("/readyz").unwrap(),
        (
            503,
            "not ready: the Docker API is not reachable\n".to_string()
        )
    );
    assert_eq!(bed.daemon.metrics_get("/nope").unwrap().0, 404);

    // A host process outside the allow-list: refused, and counted so.
    let got = bed.client(
        "attached/a",
        &["get", IMDS, "/latest/meta-data/instance-id"],
    );
    assert_eq!(got["status"], 403, "{got}");
    let metrics = bed.daemon.metrics_get("/metrics").unwrap().1;
    for (sample, want) in [
        (
            "metaproxy_requests_total{route=\"passthrough\",outcome=\"refused\"}",
            1.0,
        ),
        ("metaproxy_refusals_total{reason=\"host-not-allowed\"}", 1.0),
        ("metaproxy_probe_generation", 1.0),
        ("metaproxy_docker_reachable", 0.0),
        ("metaproxy_probe_map_capacity{map=\"conns\"}", 65536.0),
        ("metaproxy_log_lines_dropped_total", 0.0),
    ] {
        assert_eq!(sample_value(&metrics, sample), want, "{sample}\n{metrics}");
    }
    assert_eq!(bed.imds_calls(), 0);

    // Every log line is one JSON object with the same top-level fields;
    // the startup summary is one of them, once.
    let summary = metaproxy_tests::wait_for(
        "the startup summary",
        std::time::Duration::from_secs(20),
        || {
            bed.daemon
                .log()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| v["fields"]["message"] == "started")
        },
    )
    .unwrap();
    let log = bed.daemon.log();
    for line in log.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for field in ["timestamp", "level", "target", "fields"] {
            assert!(v.get(field).is_some(), "{field} missing: {line}");
        }
    }
    assert_eq!(log.matches("\"message\":\"started\"").count(), 1);
    let fields = &summary["fields"];
    assert!(!fields["kernel"].as_str().unwrap().is_empty(), "{summary}");
    assert_eq!(fields["docker"], "unreachable", "{summary}");
    assert_eq!(fields["listen"], LISTEN, "{summary}");
    assert_eq!(fields["metrics"], "127.0.0.1:9169", "{summary}");
    assert!(
        fields["aws_identity"]
            .as_str()
            .unwrap()
            .starts_with("unknown"),
        "{summary}"
    );
    assert!(
        fields["attach_point"]
            .as_str()
            .unwrap()
            .ends_with("/attached"),
        "{summary}"
    );
}

#[test]
fn logs_written_to_a_pipe_carry_no_escape_codes_and_errors_say_their_cause_once() {
    let dir = ScratchDir::new("mpt").unwrap();
    let out = admin_command(
        &dir.join("admin.sock"),
        &["run", "--metrics", "off", "--cgroup", "/nonexistent/cgroup"],
    )
    .args(["--allow-role", "arn:aws:iam::123456789012:role/*"])
    .arg("--state-dir")
    .arg(dir.join("state"))
    .arg("--pin-dir")
    .arg(dir.join("pins"))
    // As a terminal would have it: only a terminal gets colour.
    .env("TERM", "xterm-256color")
    .env_remove("NO_COLOR")
    .env("METAPROXY_LOG", "debug")
    .stdin(Stdio::null())
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("DEBUG"), "some log lines: {stderr}");
    assert!(!stderr.contains('\x1b'), "escape codes: {stderr:?}");
    let last = stderr.lines().last().unwrap();
    assert!(last.starts_with("metaproxy: "), "{stderr}");
    assert_eq!(
        last.matches("No such file or directory").count(),
        1,
        "{last}"
    );
}

#[test]
fn a_record_serves_one_connection_and_a_late_accept_is_refused() {
    let bed = Bed::new(&[]);
    // Connections kept open after their answer: each record was consumed
    // by its accept, so none is left for a spoofed SYN from the same
    // address and port to claim, though the client sockets live on.
    let mut cmd = Command::new(bin("mp-client"));
    cmd.args([
        "keepalive",
        IMDS,
        "/latest/meta-data/instance-id",
        "5",
        "20",
    ])
    .stdout(Stdio::null());
    let _holder = spawn_in(cmd, &bed.ns.path(), &bed.cgroup("attached/a")).unwrap();
    metaproxy_tests::wait_for(
        "five answered connections",
        std::time::Duration::from_secs(10),
        || (bed.daemon.connections().ok()?.len() >= 5).then_some(()),
    )
    .unwrap();
    let status = bed.daemon.status().unwrap();
    assert_eq!(status["connections"]["open"], 5, "{status}");
    assert_eq!(status["maps"]["conns"], 0, "{status}");
    assert_eq!(status["maps"]["slots"], 0, "{status}");

    // A record more than a few seconds old at accept is refused: the
    // daemon is stopped while the kernel completes the handshake.
    let pid = nix::unistd::Pid::from_raw(bed.daemon.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let mut cmd = Command::new(bin("mp-client"));
    cmd.args(["get", IMDS, "/latest/meta-data/instance-id"])
        .stdout(Stdio::piped());
    let mut late = spawn_in(cmd, &bed.ns.path(), &bed.cgroup("attached/b")).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(6));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut late.child().stdout.take().unwrap(), &mut out).unwrap();
    let got: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(got["status"], 403, "{got}");
    let port = got["local_port"].as_u64().unwrap();
    let conns = bed.connection_by_port(port);
    // Refused as too old at accept, or its slot already freed as stale by
    // the sweep, whichever ran first once the daemon went on.
    assert!(
        conns[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("old") || r.contains("no probe record")),
        "{conns:?}"
    );
}

#[test]
fn a_redirected_connect_that_never_sent_a_syn_leaves_no_record() {
    let bed = Bed::new(&[]);
    // The hook redirects (and takes a slot for) the connect; the kernel
    // then fails it before any SYN.
    let got = bed.client("attached/a", &["v6only", IMDS]);
    assert_eq!(got["errno"], libc::ENETUNREACH, "{got}");
    // Its pending record and its slot went with the socket.
    metaproxy_tests::wait_for(
        "the maps to empty",
        std::time::Duration::from_secs(5),
        || {
            let status = bed.daemon.status().ok()?;
            let maps = &status["maps"];
            (maps["pending"] == 0 && maps["conns"] == 0 && maps["slots"] == 0).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {}", bed.daemon.status().unwrap()));
}

/// `metaproxy doctor --json` for this bed with `runner_config`: exit status
/// and the checks.
fn doctor(bed: &Bed, runner_config: &str, offline: bool) -> (bool, Vec<Value>) {
    let dir = ScratchDir::new("mpt").unwrap();
    let config = dir.join("config.toml");
    std::fs::write(&config, runner_config).unwrap();
    let defaults = dir.join("metaproxy.default");
    std::fs::write(
        &defaults,
        "METAPROXY_ALLOW_ROLE=arn:aws:iam::123456789012:role/ci-*\n",
    )
    .unwrap();
    // No dockerd and no STS in this bed: --offline (as at AMI build time)
    // makes those warnings and skips.
    let mut cmd = bed.daemon.netns_command(&["doctor", "--json"]);
    if offline {
        cmd.arg("--offline");
    }
    let out = cmd
        .args(bed.daemon.doctor_args(&config, &defaults))
        .output()
        .unwrap();
    let checks: Vec<Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.success(), checks)
}

#[test]
fn doctor_passes_a_safe_runner_host_and_names_what_is_wrong_with_a_careless_runner() {
    let mut bed = Bed::new(&[]);
    let safe = r#"
[[runners]]
  name = "deploy"
  executor = "docker"
  environment = ["IAM_ROLE=ci-deploy"]
  [runners.docker]
    cap_drop = ["NET_RAW"]
"#;
    let (ok, checks) = doctor(&bed, safe, true);
    let level = |checks: &[Value], area: &str, check: &str| {
        checks
            .iter()
            .find(|c| c["area"] == area && c["check"] == check)
            .map(|c| c["level"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("no {area} {check} in {checks:#?}"))
    };
    assert!(ok, "{checks:#?}");
    assert_eq!(level(&checks, "host", "redirect"), "ok");
    assert_eq!(level(&checks, "host", "daemon"), "ok");
    assert_eq!(level(&checks, "host", "packet guard"), "ok");
    let guard = checks
        .iter()
        .find(|c| c["check"] == "packet guard")
        .unwrap();
    assert!(
        guard["found"].as_str().unwrap().contains("mpimds"),
        "{guard}"
    );

    let careless = r#"
[[runners]]
  name = "careless"
  executor = "docker"
  [runners.docker]
    privileged = true
"#;
    let (ok, checks) = doctor(&bed, careless, true);
    assert!(!ok, "a failed check fails the exit status: {checks:#?}");
    assert_eq!(level(&checks, "runner careless", "IAM_ROLE"), "fail");
    assert_eq!(level(&checks, "runner careless", "privileged"), "fail");

    // With the daemon gone, the redirect stays and the doctor says the
    // daemon is not running: at AMI build time (--offline) that is
    // expected, and skipped.
    bed.daemon.kill9();
    let (ok, checks) = doctor(&bed, safe, true);
    assert!(ok, "{checks:#?}");
    assert_eq!(level(&checks, "host", "redirect"), "ok");
    assert_eq!(level(&checks, "host", "daemon"), "skip");
    // On a runner in service, a daemon that is not running fails.
    let (ok, checks) = doctor(&bed, safe, false);
    assert!(!ok);
    assert_eq!(level(&checks, "host", "daemon"), "fail");
}

/// The daemon's user + system time, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Sets `pid`'s soft descriptor limit (the one `EMFILE` follows; the hard
/// one could not be raised again without `CAP_SYS_RESOURCE`) and returns
/// the old one.
fn set_nofile(pid: u32, soft: u64) -> u64 {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: the pointer is to a live rlimit struct.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: as above.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    old.rlim_cur
}

#[test]
fn out_of_descriptors_no_listener_spins_and_each_serves_again() {
    let bed = Bed::new(&[]);
    let pid = bed.daemon.pid();
    // Every listener answers first.
    assert_eq!(bed.daemon.metrics_get("/healthz").unwrap().0, 200);
    bed.daemon.status().unwrap();

    // Ten descriptors left to the daemon; metrics clients take them (each
    // is held until its header timeout, 5 s), and more clients of every
    // listener wait in the backlogs, so each accept() fails with EMFILE
    // for as long as they wait.
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    let old = set_nofile(pid, open + 10);
    let held = bed
        .ns
        .run(|| {
            let metrics: Vec<_> = (0..20)
                .filter_map(|_| std::net::TcpStream::connect("127.0.0.1:9169").ok())
                .collect();
            let imds: Vec<_> = (0..5)
                .filter_map(|_| std::net::TcpStream::connect(LISTEN).ok())
                .collect();
            (metrics, imds)
        })
        .unwrap();
    let admin: Vec<_> = (0..5)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(bed.daemon.admin_socket()).ok())
        .collect();
    assert!(!admin.is_empty() && !held.1.is_empty());
    // Until the daemon has taken every descriptor left to it.
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count() as u64
    };
    metaproxy_tests::wait_for(
        "the daemon out of descriptors",
        std::time::Duration::from_secs(10),
        || (fds() >= open + 9).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}: {} open, limit {}", fds(), open + 10));
    let (t0, started) = (cpu_ticks(pid), std::time::Instant::now());
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let (ticks, secs) = (cpu_ticks(pid) - t0, started.elapsed().as_secs_f64());
    let open_now = fds();
    // A loop that retried at once would burn a core: ~100 ticks a second.
    assert!(
        (ticks as f64) < 10.0 * secs,
        "the daemon used {ticks} ticks of CPU in {secs:.1} s out of descriptors ({open_now} open)"
    );
    assert!(
        open_now >= open + 9,
        "descriptors were not exhausted: {open_now} open, limit {}",
        open + 10
    );
    let log = bed.daemon.log();
    assert!(log.contains("accept failed"), "{log}");

    drop((held, admin));
    set_nofile(pid, old);
    // Each listener serves again.
    metaproxy_tests::wait_for(
        "the metrics listener",
        std::time::Duration::from_secs(15),
        || (bed.daemon.metrics_get("/healthz").ok()?.0 == 200).then_some(()),
    )
    .unwrap();
    bed.daemon.status().unwrap();
    let got = bed.client(
        "attached/a",
        &["get", IMDS, "/latest/meta-data/instance-id"],
    );
    assert_eq!(got["status"], 403, "{got}");
}

/// The file names under the daemon's `links/`, sorted.
fn link_pins(bed: &Bed) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(bed.daemon.pin_dir().join("links"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn pins_unlinked_while_the_daemon_runs_detach_nothing_and_come_back() {
    let bed = Bed::new(&[]);
    let before = link_pins(&bed);
    assert!(
        before.iter().any(|p| p.starts_with("mp_connect4-"))
            && before.iter().any(|p| p.starts_with("mp_guard_tc_if")),
        "{before:?}"
    );
    // A job with /sys/fs/bpf in its volumes: rm links/*.
    for name in &before {
        std::fs::remove_file(bed.daemon.pin_dir().join("links").join(name)).unwrap();
    }
    // At once, before any watchdog pass: still redirected, UDP still
    // refused, the real IMDS never reached.
    let got = bed.client(
        "attached/a",
        &["get", IMDS, "/latest/meta-data/instance-id"],
    );
    assert_eq!(got["status"], 403, "the redirect went with its pins: {got}");
    let udp = bed.client("attached/a", &["udp", IMDS]);
    assert_eq!(udp["errno"], libc::EPERM, "{udp}");
    assert_eq!(bed.imds_calls(), 0, "the real IMDS was reached");
    // And the pins come back, so a daemon restart or crash keeps them.
    metaproxy_tests::wait_for("the pins back", std::time::Duration::from_secs(10), || {
        (link_pins(&bed) == before).then_some(())
    })
    .unwrap();
    assert!(
        bed.daemon
            .log()
            .contains("ALERT: pins of the probe were removed"),
        "{}",
        bed.daemon.log()
    );
    assert_eq!(
        bed.daemon
            .metric("metaproxy_probe_repairs_total{kind=\"pin\"}"),
        before.len() as f64
    );
    // (This bed has no Docker, so /readyz names that; not the probe.)
    let (_, readyz) = bed.daemon.metrics_get("/readyz").unwrap();
    assert!(!readyz.contains("probe"), "{readyz}");

    // Root with CAP_BPF detaching the connect hook outright: it is
    // attached again, under the same pin.
    let connect4 = before
        .iter()
        .find(|p| p.starts_with("mp_connect4-"))
        .unwrap();
    metaproxy_tests::daemon::detach_link(&bed.daemon.pin_dir().join("links").join(connect4));
    metaproxy_tests::wait_for(
        "the redirect attached again",
        std::time::Duration::from_secs(10),
        || {
            (bed.daemon
                .metric("metaproxy_probe_repairs_total{kind=\"link\"}")
                >= 1.0)
                .then_some(())
        },
    )
    .unwrap();
    let again = bed.client(
        "attached/a",
        &["get", IMDS, "/latest/meta-data/instance-id"],
    );
    assert_eq!(again["status"], 403, "{again}");
    assert_eq!(link_pins(&bed), before);
    assert!(bed
        .daemon
        .log()
        .contains("ALERT: programs of the probe were detached"));

    // A pin swapped for a symlink to another link's is seen for what it
    // is: the pin is this link again.
    let links = bed.daemon.pin_dir().join("links");
    let bind4 = before.iter().find(|p| p.starts_with("mp_bind4-")).unwrap();
    std::fs::remove_file(links.join(connect4)).unwrap();
    std::os::unix::fs::symlink(links.join(bind4), links.join(connect4)).unwrap();
    let pins = || {
        bed.daemon
            .metric("metaproxy_probe_repairs_total{kind=\"pin\"}")
    };
    let restored = pins();
    metaproxy_tests::wait_for(
        "the symlink replaced",
        std::time::Duration::from_secs(10),
        || (pins() > restored).then_some(()),
    )
    .unwrap();
    let meta = std::fs::symlink_metadata(links.join(connect4)).unwrap();
    assert!(!meta.file_type().is_symlink());
    assert_eq!(link_pins(&bed), before);
}

#[test]
fn a_job_holding_shed_connections_holds_no_slots() {
    use std::io::BufRead as _;
    // Over the overall cap, connections are shed before they are
    // attributed. Their records must not wait on their slots while the
    // job keeps its sockets: 16384 of them would leave no slot for
    // anyone.
    let bed = Bed::new(&["--max-connections", "64"]);
    let mut cmd = Command::new(bin("mp-client"));
    cmd.args(["linger", IMDS, "600", "30"])
        .stdout(Stdio::piped());
    let mut job = spawn_in(cmd, &bed.ns.path(), &bed.cgroup("attached/a")).unwrap();
    let out = job.child().stdout.take().unwrap();
    let mut first = String::new();
    std::io::BufReader::new(out).read_line(&mut first).unwrap();
    let opened: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(opened["connected"], 600, "{opened}");
    // Well before the sweep of stale records (5 s) could have freed them.
    metaproxy_tests::wait_for(
        "the slots to be free",
        std::time::Duration::from_secs(3),
        || {
            let status = bed.daemon.status().ok()?;
            (status["maps"]["slots"] == 0).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {}", bed.daemon.status().unwrap()["maps"]));
    // A new connect still gets a slot (it is then shed like the rest: the
    // cap is full): no EPERM from the redirect.
    let other = bed.client("attached/b", &["get", IMDS]);
    assert_ne!(other["errno"], libc::EPERM, "{other}");
    job.terminate(std::time::Duration::from_secs(5));
}

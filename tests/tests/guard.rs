//! The packet guard, attacked as a job would attack it: raw frames, raw IP
//! sockets, UDP, NAT inside a namespace the job controls, a nested
//! namespace, a `--network host` job. The fake IMDS sits one routed hop
//! from the containers' host and answers token PUTs with a hop limit of 2,
//! as an AL2023 instance does, so every attack here works against a bed
//! without the guard (checked at the end of the first test), and the
//! packet log in the IMDS namespace says whether anything arrived.
//!
//! Each attack runs with the daemon up and with it killed: the pinned
//! guard must hold either way. The jobs' beds run as a host without the
//! BPF LSM does, where packet sockets still open (see
//! `bed_without_bpf_lsm`). Needs root, Docker and BPF; run through
//! `cargo xtask test`.

use std::net::IpAddr;

use metaproxy_tests::{
    bed::{Container, E2eBed, KernelBed, ROLE_DEPLOY},
    daemon::Daemon,
    imds_net::{PacketLog, UPLINK},
};
use serde_json::Value;

const IMDS: &str = "169.254.169.254:80";

/// The packet guard is the barrier behind the layer-2 lock, and the only
/// one against packet sockets where the BPF LSM is missing: these beds run
/// as such a host does, so the jobs' packet and raw sockets open and the
/// guard alone is tested (tests/layer2.rs tests the lock).
fn bed_without_bpf_lsm() -> E2eBed {
    E2eBed::start_with_env(&[], &[("METAPROXY_BPF_LSM", "off")]).expect("bed")
}

/// The guard's drop counter of `kind`, read from the running daemon.
fn dropped(daemon: &Daemon, kind: &str) -> u64 {
    daemon.metric(&format!(
        "metaproxy_guard_dropped_packets_total{{kind=\"{kind}\"}}"
    )) as u64
}

fn attack(job: &Container, args: &[&str]) -> Value {
    let mut all = vec!["/mp-attack"];
    all.extend_from_slice(args);
    job.exec(&all).expect("mp-attack")
}

/// The AF_PACKET attack: user-space TCP from `spoof`, the IMDSv2 sequence.
fn packet_tcp(job: &Container, spoof: &str) -> Value {
    attack(
        job,
        &[
            "packet-tcp",
            "--iface",
            "eth0",
            "--spoof",
            spoof,
            "--dst",
            IMDS,
        ],
    )
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// What reached the IMDS namespace from `src`, for the failure message.
fn arrived(log: &PacketLog, src: &str) -> Vec<String> {
    log.from(ip(src))
        .into_iter()
        .map(|p| format!("{p:?}"))
        .collect()
}

fn job_ip(bed: &E2eBed, job: &Container) -> String {
    bed.dockerd
        .docker(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", &job.name])
        .expect("inspect")
}

fn assert_got_nothing(got: &Value) {
    assert!(got["put_status"].is_null(), "{got}");
    assert_eq!(got["token"], false, "{got}");
    assert_eq!(got["credentials"], false, "{got}");
}

#[test]
fn a_job_speaking_tcp_over_af_packet_gets_nothing_with_the_daemon_up_or_down() {
    let mut bed = bed_without_bpf_lsm();
    let log = bed.imds_net.record().expect("packet log");
    let job = bed
        .container(
            "raw-job",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &[],
        )
        .expect("container");

    let before = dropped(&bed.daemon, "forwarded");
    let up = packet_tcp(&job, "172.31.213.200");
    assert_got_nothing(&up);
    assert!(
        log.from(ip("172.31.213.200")).is_empty(),
        "reached IMDS: {:?}",
        arrived(&log, "172.31.213.200")
    );
    let sent = up["frames_sent_to_dst"].as_u64().unwrap();
    assert!(sent >= 1, "{up}");
    assert_eq!(dropped(&bed.daemon, "forwarded") - before, sent, "{up}");

    // Where the guard is and what it did, as an admin sees it.
    let status = bed.daemon.status().unwrap();
    let guard = &status["guard"];
    // On the uplink, and on every other interface of the host's namespace
    // but lo and the containers' ports: docker0 too.
    let names: Vec<&str> = guard["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert!(
        names.contains(&UPLINK) && names.contains(&"docker0"),
        "{status}"
    );
    assert!(
        !names.iter().any(|n| n.starts_with("veth") || *n == "lo"),
        "{status}"
    );
    assert!(
        guard["routes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["address"] == "169.254.169.254" && r["guarded"] == true),
        "{status}"
    );
    assert_eq!(guard["dropped"]["forwarded"], before + sent, "{status}");
    assert_eq!(
        bed.daemon.metric("metaproxy_guard_interfaces"),
        names.len() as f64
    );
    let (code, ready) = bed.daemon.metrics_get("/readyz").unwrap();
    assert_eq!(code, 200, "{ready}");
    assert!(
        bed.daemon
            .log()
            .contains("guard dropped a packet to imds: kind forwarded source 172.31.213.200"),
        "the first drop from a source is logged"
    );

    // The daemon killed: the pinned guard holds.
    bed.daemon.kill9();
    let down = packet_tcp(&job, "172.31.213.201");
    assert_got_nothing(&down);
    assert!(
        log.from(ip("172.31.213.201")).is_empty(),
        "reached IMDS with the daemon down: {:?}",
        arrived(&log, "172.31.213.201")
    );
    bed.daemon.restart().unwrap();
    let counted = down["frames_sent_to_dst"].as_u64().unwrap();
    assert_eq!(
        dropped(&bed.daemon, "forwarded") - before,
        sent + counted,
        "the kernel counted while the daemon was down: {down}"
    );

    // The bed models the attack: without the guard the same frames get
    // the instance's credentials, and with a hop limit of 1 the token
    // answer dies at the host.
    assert!(bed.daemon.terminate());
    let out = bed.daemon.detach().unwrap();
    assert!(out.status.success(), "{out:?}");
    let open = packet_tcp(&job, "172.31.213.202");
    assert_eq!(open["credentials"], true, "no guard, hop limit 2: {open}");
    assert!(!log.from(ip("172.31.213.202")).is_empty());
    bed.imds.set_put_hop_limit(1);
    let limited = packet_tcp(&job, "172.31.213.203");
    assert_eq!(limited["connected"], true, "{limited}");
    assert!(limited["put_status"].is_null(), "hop limit 1: {limited}");
}

#[test]
fn raw_ip_sockets_udp_and_nat_inside_a_job_never_reach_imds() {
    let mut bed = bed_without_bpf_lsm();
    let log = bed.imds_net.record().expect("packet log");
    // NET_ADMIN too, as some runners add: it is root in the job's own
    // network namespace, not on the host.
    let job = bed
        .container(
            "nat-job",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &["--cap-add", "NET_ADMIN"],
        )
        .expect("container");
    let own = job_ip(&bed, &job);
    // A harmless-looking address the connect4 hook lets pass, rewritten
    // onto IMDS after it.
    let mut nat = vec!["exec", job.name.as_str()];
    nat.extend([
        // /usr/sbin/iptables is a link into the host's /etc/alternatives,
        // which the job's image lacks.
        "/usr/sbin/iptables-nft",
        "-w",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        "10.255.0.1",
        "--dport",
        "81",
        "-j",
        "DNAT",
        "--to-destination",
        IMDS,
    ]);
    bed.dockerd.docker(&nat).expect("iptables in the job");

    for daemon_up in [true, false] {
        if !daemon_up {
            bed.daemon.kill9();
        }
        let before = if daemon_up {
            dropped(&bed.daemon, "subtree_socket")
        } else {
            0
        };
        let raw = attack(
            &job,
            &["hdrincl", "--src", &own, "--dst", IMDS, "--count", "3"],
        );
        assert_eq!(raw["sent"], 0, "{raw}");
        assert_eq!(
            raw["errnos"],
            serde_json::json!(vec![libc::EPERM; 3]),
            "{raw}"
        );
        let udp = attack(&job, &["udp", "--dst", IMDS, "--count", "2"]);
        assert_eq!(udp["sent"], 0, "{udp}");
        assert_eq!(
            udp["errnos"],
            serde_json::json!(vec![libc::EPERM; 2]),
            "{udp}"
        );
        let natted = attack(
            &job,
            &[
                "tcp-connect",
                "--dst",
                "10.255.0.1:81",
                "--timeout-ms",
                "1500",
            ],
        );
        assert_eq!(natted["connected"], false, "{natted}");
        assert!(
            log.from(ip(&own)).is_empty(),
            "reached IMDS (daemon up: {daemon_up}): {:?}",
            arrived(&log, &own)
        );
        if daemon_up {
            // 3 + 2 datagrams, and at least the NATed SYN.
            assert!(dropped(&bed.daemon, "subtree_socket") - before >= 6);
        }
    }
    bed.daemon.restart().unwrap();
    assert!(dropped(&bed.daemon, "subtree_socket") >= 12);
}

#[test]
fn a_nested_namespace_inside_a_job_and_a_host_network_job_are_dropped() {
    let mut bed = bed_without_bpf_lsm();
    let log = bed.imds_net.record().expect("packet log");
    // What an inner dockerd does for its containers: a namespace of its
    // own behind a veth, forwarded by the job's namespace, then the host's.
    let dind = bed
        .container(
            "dind-job",
            bed.base_image(),
            &[("PATH", "/usr/sbin:/usr/bin:/bin")],
            &[
                "--cap-add",
                "NET_ADMIN",
                "--cap-add",
                "SYS_ADMIN",
                "--sysctl",
                "net.ipv4.ip_forward=1",
            ],
        )
        .expect("container");
    let nested = r#"
        unshare -n sleep 60 & pid=$!
        n=0; while [ "$(readlink /proc/$pid/ns/net)" = "$(readlink /proc/$$/ns/net)" ]; do
            n=$((n + 1)); [ $n -lt 100 ] || { echo "unshare made no namespace in 5 s" >&2; exit 1; }
            sleep 0.05
        done
        ip link add inner0 type veth peer name inner1 netns $pid
        ip addr add 10.98.0.1/29 dev inner0; ip link set inner0 up
        nsenter -t $pid -n sh -c '
            ip link set lo up; ip addr add 10.98.0.2/29 dev inner1; ip link set inner1 up
            ip route add default via 10.98.0.1
            /mp-attack packet-tcp --iface inner1 --spoof 10.98.0.5 --dst 169.254.169.254:80 --timeout-ms 2500'
        kill $pid
    "#;
    let host_net = bed
        .container(
            "host-net-job",
            bed.base_image(),
            &[],
            &["--network", "host"],
        )
        .expect("container");

    for daemon_up in [true, false] {
        if !daemon_up {
            bed.daemon.kill9();
        }
        let forwarded = daemon_up.then(|| dropped(&bed.daemon, "forwarded"));
        let got = dind.exec(&["sh", "-c", nested]).expect("nested attack");
        assert_got_nothing(&got);
        assert!(got["frames_sent_to_dst"].as_u64() >= Some(1), "{got}");
        assert!(
            log.from(ip("10.98.0.5")).is_empty(),
            "reached IMDS (daemon up: {daemon_up}): {:?}",
            arrived(&log, "10.98.0.5")
        );
        if let Some(before) = forwarded {
            assert_eq!(
                dropped(&bed.daemon, "forwarded") - before,
                got["frames_sent_to_dst"].as_u64().unwrap(),
                "{got}"
            );
        }

        // A --network host job shares the host's namespace, but its
        // sockets are still in the attached subtree. (The host's own
        // address is the daemon's too: the raw packets claim another.)
        let raw = attack(
            &host_net,
            &["hdrincl", "--src", "169.254.200.3", "--dst", IMDS],
        );
        assert_eq!(raw["errnos"], serde_json::json!([libc::EPERM]), "{raw}");
        let udp = attack(&host_net, &["udp", "--dst", IMDS]);
        assert_eq!(udp["errnos"], serde_json::json!([libc::EPERM]), "{udp}");
        assert!(log.from(ip("169.254.200.3")).is_empty());
        let udp_arrived = log.seen().into_iter().filter(|p| p.protocol == 17).count();
        assert_eq!(udp_arrived, 0, "a datagram reached IMDS");
    }
}

#[test]
fn the_daemons_own_connections_open_and_close_through_the_guard() {
    let bed = KernelBed::new(&[]);
    // Many connections from the daemon's own cgroup: closed by the server
    // first (CLOSE_WAIT, LAST_ACK here), then by the client first
    // (FIN_WAIT, then TIME_WAIT, whose segments carry no cgroup).
    let got = bed.client(
        "attached/metaproxy",
        &["latency", IMDS, "/latest/meta-data/instance-id", "200"],
    );
    assert_eq!(got["ok"], true, "{got}");
    let got = bed.client(
        "attached/metaproxy",
        &["closefirst", IMDS, "/latest/meta-data/instance-id", "200"],
    );
    assert_eq!(got["ok"], true, "{got}");
    assert_eq!(bed.imds_calls(), 400);
    // Nothing stuck half closed (a dropped FIN or ACK would leave
    // FIN-WAIT, CLOSING or LAST-ACK behind).
    const STUCK: [&str; 4] = ["FIN-WAIT", "CLOSING", "LAST-ACK", "SYN-SENT"];
    let ss = || {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", bed.ns.path().display()))
            .args(["ss", "-Htan", "dst", "169.254.169.254"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Until the last closes have gone through (or time says they never
    // will).
    let states = metaproxy_tests::wait_for(
        "the connections closed",
        std::time::Duration::from_secs(5),
        || {
            let states = ss();
            (!STUCK.iter().any(|s| states.contains(s))).then_some(states)
        },
    )
    .unwrap_or_else(|_| ss());
    for stuck in STUCK {
        assert!(!states.contains(stuck), "{states}");
    }
    let status = bed.daemon.status().unwrap();
    for kind in ["not_full_socket", "subtree_socket", "subtree_packet_socket"] {
        assert_eq!(status["guard"]["dropped"][kind], 0, "{status}");
    }
}

#[test]
fn a_recreated_uplink_is_guarded_again() {
    let bed = KernelBed::new(&[]);
    let first = bed.daemon.status().unwrap()["guard"]["interfaces"][0]["index"].clone();
    bed.imds_net.recreate_link(&bed.ns).expect("recreate");
    let guarded_again = metaproxy_tests::wait_for(
        "the guard on the new interface",
        std::time::Duration::from_secs(15),
        || {
            let status = bed.daemon.status().ok()?;
            let guard = &status["guard"];
            let routes = guard["routes"].as_array()?;
            let on_new = routes
                .iter()
                .any(|r| r["address"] == "169.254.169.254" && r["guarded"] == true)
                && guard["interfaces"]
                    .as_array()?
                    .iter()
                    .all(|i| i["index"] != first);
            on_new.then_some(status)
        },
    );
    let status = guarded_again.unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\n{}",
            bed.daemon.status().unwrap_or_default(),
            bed.daemon.log()
        )
    });
    assert_eq!(status["guard"]["interfaces"][0]["name"], UPLINK, "{status}");
    let pins: Vec<String> = std::fs::read_dir(bed.daemon.pin_dir().join("links"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("mp_guard_tc"))
        .collect();
    assert_eq!(pins.len(), 1, "the dead interface's pin is gone: {pins:?}");
    // (This bed has no Docker, so /readyz names that, not the guard.)
    let (_, body) = bed.daemon.metrics_get("/readyz").unwrap();
    assert!(!body.contains("packet guard"), "{body}");
    // The daemon still reaches IMDS through the new link.
    let own = bed.client(
        "attached/metaproxy",
        &["get", IMDS, "/latest/meta-data/instance-id"],
    );
    assert_eq!(own["status"], 200, "{own}");
}

/// A namespace behind a veth from the bed's, as a container's is: what a
/// process there sends to IMDS is forwarded by the bed's namespace.
struct Neighbour {
    ns: metaproxy_tests::netns::NetNs,
}

impl Neighbour {
    fn new(bed: &KernelBed) -> Self {
        let ns = metaproxy_tests::netns::NetNs::new("mpt", &[]).unwrap();
        bed.ns
            .ip(&[
                "link",
                "add",
                "mpnb0",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name(),
            ])
            .unwrap();
        bed.ns
            .ip(&["addr", "add", "10.97.0.1/30", "dev", "mpnb0"])
            .unwrap();
        bed.ns.ip(&["link", "set", "mpnb0", "up"]).unwrap();
        ns.ip(&["addr", "add", "10.97.0.2/30", "dev", "eth0"])
            .unwrap();
        ns.ip(&["link", "set", "eth0", "up"]).unwrap();
        ns.ip(&["route", "add", "default", "via", "10.97.0.1"])
            .unwrap();
        Self { ns }
    }

    /// `mp-attack udp` from the neighbour (its socket in a cgroup outside
    /// the subtree: at the uplink a forwarded packet has no socket at all).
    fn udp(&self, bed: &KernelBed, count: u32) -> Value {
        let mut cmd = std::process::Command::new(metaproxy_tests::bed::bin("mp-attack"));
        cmd.args(["udp", "--dst", IMDS, "--count", &count.to_string()]);
        let out = metaproxy_tests::process::output_in(cmd, &self.ns.path(), &bed.cgroup("outside"))
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// The guard's classic tc filters on the uplink (`tc filter show`).
fn tc_filters(bed: &KernelBed) -> Vec<String> {
    let out = std::process::Command::new("tc")
        .args([
            "-n",
            bed.ns.name(),
            "filter",
            "show",
            "dev",
            UPLINK,
            "egress",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("mp_guard_tc"))
        .map(str::to_string)
        .collect()
}

fn forwarded_drops(bed: &KernelBed) -> Value {
    bed.daemon.status().unwrap()["guard"]["dropped"]["forwarded"].clone()
}

fn guard_holds_through_restart_kill_and_detach(mode: &str) {
    let env: &[(&str, &str)] = if mode == "clsact" {
        &[("METAPROXY_GUARD_TC", "netlink")]
    } else {
        &[]
    };
    let mut bed = KernelBed::with_env(&[], env);
    let neighbour = Neighbour::new(&bed);
    let log = bed.imds_net.record().unwrap();
    let status = bed.daemon.status().unwrap();
    assert_eq!(status["guard"]["mode"], mode, "{status}");
    if mode == "clsact" {
        assert_eq!(tc_filters(&bed).len(), 1, "{:?}", tc_filters(&bed));
    }

    let sent = neighbour.udp(&bed, 3);
    assert_eq!(
        sent["sent"], 3,
        "the neighbour's own kernel sends them: {sent}"
    );
    assert_eq!(forwarded_drops(&bed), 3);

    // A restart replaces the guard without a gap or a second copy.
    bed.daemon.restart().unwrap();
    assert_eq!(bed.daemon.status().unwrap()["generation"], 2);
    if mode == "clsact" {
        assert_eq!(tc_filters(&bed).len(), 1, "{:?}", tc_filters(&bed));
    }
    bed.daemon.kill9();
    neighbour.udp(&bed, 2);
    bed.daemon.restart().unwrap();
    assert_eq!(forwarded_drops(&bed), 5);
    assert!(
        log.from(ip("10.97.0.2")).is_empty(),
        "reached IMDS: {:?}",
        arrived(&log, "10.97.0.2")
    );

    // Only detach removes it.
    assert!(bed.daemon.terminate());
    assert!(bed.daemon.detach().unwrap().status.success());
    assert_eq!(tc_filters(&bed).len(), 0, "{:?}", tc_filters(&bed));
    neighbour.udp(&bed, 1);
    metaproxy_tests::wait_for("the datagram", std::time::Duration::from_secs(5), || {
        (!log.from(ip("10.97.0.2")).is_empty()).then_some(())
    })
    .expect("without the guard the bed forwards the datagram to IMDS");
}

#[test]
fn the_tcx_guard_holds_through_restart_and_kill_until_detach() {
    guard_holds_through_restart_kill_and_detach("tcx");
}

#[test]
fn the_clsact_guard_of_older_kernels_holds_through_restart_and_kill_until_detach() {
    guard_holds_through_restart_kill_and_detach("clsact");
}

/// Policy routing (`ip rule` by source, mark or incoming interface), ECMP
/// or a bridge can send a packet out of an interface that `ip route get`
/// never names: the guard is on every interface of the host's namespace
/// but `lo` and containers' ports, new ones included.
#[test]
fn every_host_interface_gets_the_guard_new_ones_too() {
    let bed = KernelBed::new(&[]);
    let in_bed = |args: &[&str]| {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", bed.ns.path().display()))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    // A second way out that no route to IMDS names (a policy rule could
    // send a job's packets through it).
    in_bed(&[
        "ip", "link", "add", "mpx0", "type", "veth", "peer", "name", "mpx1",
    ]);
    in_bed(&["ip", "link", "set", "mpx0", "up"]);
    in_bed(&["ip", "link", "set", "mpx1", "up"]);
    let names = || -> Vec<String> {
        bed.daemon.status().unwrap()["guard"]["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i["name"].as_str().map(str::to_string))
            .collect()
    };
    metaproxy_tests::wait_for(
        "the guard on the new interfaces",
        std::time::Duration::from_secs(15),
        || {
            let n = names();
            (n.contains(&"mpx0".to_string()) && n.contains(&"mpx1".to_string())).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", names(), bed.daemon.log()));
    assert!(!names().contains(&"lo".to_string()));
    let (code, ready) = bed.daemon.metrics_get("/readyz").unwrap();
    assert!(!ready.contains("packet guard"), "{code} {ready}");
}

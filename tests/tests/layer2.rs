//! The layer-2 lock, attacked as a job would attack it, with Docker's
//! default capabilities (`NET_RAW` kept, as gitlab-runner leaves it):
//!
//! * ARP poisoning of the host's neighbour entry for another job on the
//!   same bridge, relaying its frames so it notices nothing, and reading
//!   its credentials on the way;
//! * forging the other job's source MAC to take its port on the bridge;
//! * a `--network host` job sniffing the bridge;
//! * a `--network host` job sending past tc egress (and so past the packet
//!   guard) with `PACKET_QDISC_BYPASS` or an AF_XDP socket.
//!
//! Each attack first works in the same bed with the part of the lock it
//! meets detached (`BPF_LINK_DETACH`, the daemon's watchdog off in these
//! beds so it stays detached), then gets nothing with it; the job next to it keeps
//! working, and what the lock did is counted. This project's machines run
//! a kernel that lists the BPF LSM but refuses every program that needs a
//! BPF trampoline, LSM programs included, so the lock's socket half cannot
//! load here: the beds show what holds without it, and that the gap is
//! reported. Needs root, Docker and BPF; run through `cargo xtask test`.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use metaproxy_tests::{
    bed::{Container, E2eBed, ROLE_BUILD, ROLE_DEPLOY},
    daemon::{detach_link, Daemon},
    imds_net::UPLINK,
};
use serde_json::Value;

const IMDS: &str = "169.254.169.254:80";
/// The daemon's watchdog would attach a detached control again.
const NO_WATCHDOG: &[(&str, &str)] = &[("METAPROXY_WATCHDOG", "off")];
/// How long each poisoning runs; the victim fetches in the middle of it.
const ATTACK_SECONDS: &str = "6";

/// The lock's refusal counter of `kind`, read from the running daemon.
fn refused(daemon: &Daemon, kind: &str) -> u64 {
    daemon.metric(&format!(
        "metaproxy_layer2_refused_total{{kind=\"{kind}\"}}"
    )) as u64
}

fn attack(job: &Container, args: &[&str]) -> Value {
    let mut all = vec!["/mp-attack"];
    all.extend_from_slice(args);
    job.exec(&all).expect("mp-attack")
}

fn ip_of(bed: &E2eBed, name: &str) -> String {
    bed.dockerd
        .docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            name,
        ])
        .expect("inspect")
}

/// A job with a role that fetches credentials with the AWS SDK (`repeat`
/// times) while `attacker` runs `args`: (the SDK's report, the attack's).
fn fetch_under_attack(
    victim: &Container,
    attacker: &Container,
    args: &[&str],
    repeat: u32,
) -> (Value, Value) {
    std::thread::scope(|s| {
        let attack = s.spawn(|| attack(attacker, args));
        // The host's neighbour entry takes a forged update only a second
        // (locktime) after its last one.
        std::thread::sleep(Duration::from_millis(2500));
        let sdk = victim
            .exec(&["/mp-sdk-client", &repeat.to_string()])
            .expect("sdk client");
        (sdk, attack.join().expect("attack thread"))
    })
}

fn assert_sdk_got(sdk: &Value, role: &str) {
    assert_eq!(sdk["ok"], true, "the victim's SDK failed: {sdk}");
    assert!(
        sdk["arns"].as_array().unwrap().iter().all(|a| a
            .as_str()
            .unwrap()
            .contains(&format!("assumed-role/{role}/"))),
        "{sdk}"
    );
}

fn keys(v: &Value) -> Vec<String> {
    v["access_key_ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|k| k.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The answer pins of this bed's daemon (one per bridge it answered
/// containers through).
fn deliver_pins(daemon: &Daemon) -> Vec<PathBuf> {
    pins_named(daemon, "mp_l2_deliver_")
}

fn pins_named(daemon: &Daemon, prefix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(daemon.pin_dir().join("links"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect()
}

/// The credentials of `role` through IMDSv2, by a plain client (no STS
/// call of its own, which forged MACs would disturb).
fn imds_credentials(job: &Container, role: &str) -> Value {
    job.exec(&[
        "/mp-client",
        "v2",
        IMDS,
        &format!("/latest/meta-data/iam/security-credentials/{role}"),
    ])
    .expect("mp-client v2")
}

/// What an attack that ran reports when it read nothing of the daemon's.
fn assert_read_nothing(got: &Value) {
    assert!(got["socket_error"].is_null(), "{got}");
    assert_eq!(got["saw_credentials"], false, "{got}");
    assert_eq!(got["saw_token"], false, "{got}");
    assert_eq!(got["access_key_ids"], serde_json::json!([]), "{got}");
}

#[test]
fn arp_poisoning_and_mac_forging_on_the_bridge_get_no_other_jobs_credentials() {
    let mut bed = E2eBed::start_with_env(&[], NO_WATCHDOG).expect("bed");
    let base = bed.base_image();
    let attacker = bed.container("l2-attacker", base, &[], &[]).expect("job");

    // Without the answer pin (its link unpinned after the daemon put it on
    // docker0): the host's answers to the victim go to the attacker, who
    // relays them, so the victim gets its role and the attacker its keys.
    let victim = bed
        .container("l2-victim-a", base, &[("IAM_ROLE", ROLE_DEPLOY)], &[])
        .expect("victim");
    assert_sdk_got(
        &victim.exec(&["/mp-sdk-client", "1"]).expect("sdk"),
        ROLE_DEPLOY,
    );
    let pins = deliver_pins(&bed.daemon);
    assert_eq!(
        pins.len(),
        1,
        "the answer pin is on docker0 alone: {pins:?}"
    );
    detach_link(&pins[0]);
    let victim_ip = ip_of(&bed, &victim.name);
    let mitm = [
        "arp-mitm",
        "--iface",
        "eth0",
        "--victim",
        victim_ip.as_str(),
        "--seconds",
        ATTACK_SECONDS,
    ];
    let (sdk, got) = fetch_under_attack(&victim, &attacker, &mitm, 2);
    assert_sdk_got(&sdk, ROLE_DEPLOY);
    assert_eq!(
        got["saw_credentials"], true,
        "the bed must model the attack: {got}"
    );
    assert!(got["relayed_frames"].as_u64() > Some(0), "{got}");
    assert!(
        keys(&got).iter().any(|k| keys(&sdk).contains(k)),
        "the attacker read the victim's own keys: {got} {sdk}"
    );
    // Forging another victim's source MAC takes its port on the bridge:
    // the daemon's answers to it go to the attacker (the victim, getting
    // nothing, asks again).
    let victim = bed
        .container("l2-victim-m", base, &[("IAM_ROLE", ROLE_DEPLOY)], &[])
        .expect("victim");
    let victim_ip = ip_of(&bed, &victim.name);
    let forge = [
        "arp-mitm",
        "--iface",
        "eth0",
        "--victim",
        victim_ip.as_str(),
        "--mode",
        "mac",
        "--seconds",
        ATTACK_SECONDS,
    ];
    let got = std::thread::scope(|s| {
        let attack = s.spawn(|| attack(&attacker, &forge));
        std::thread::sleep(Duration::from_millis(1500));
        // The victim's own frames take its port back until the next forged
        // one: it asks a few times over the attack, as an SDK retries.
        for _ in 0..8 {
            let _ = imds_credentials(&victim, ROLE_DEPLOY);
            std::thread::sleep(Duration::from_millis(300));
        }
        attack.join().expect("attack thread")
    });
    assert!(
        got["saw_credentials"] == true || got["saw_token"] == true,
        "the bed must model MAC forging (the victim's answers read): {got}"
    );

    // The daemon restarted (so the pin goes back on at its first answer),
    // a victim that was running before it: the same attack reads nothing,
    // the victim notices nothing, and the answers that met the poisoned
    // neighbour entry are counted.
    let victim = bed
        .container("l2-victim-b", base, &[("IAM_ROLE", ROLE_BUILD)], &[])
        .expect("victim");
    bed.daemon.restart().unwrap();
    let victim_ip = ip_of(&bed, &victim.name);
    let mitm = [
        "arp-mitm",
        "--iface",
        "eth0",
        "--victim",
        victim_ip.as_str(),
        "--seconds",
        ATTACK_SECONDS,
    ];
    let (sdk, got) = fetch_under_attack(&victim, &attacker, &mitm, 2);
    assert_sdk_got(&sdk, ROLE_BUILD);
    assert_read_nothing(&got);
    assert!(
        got["poison_frames"].as_u64() > Some(5),
        "it did poison: {got}"
    );
    // Whether the poisoning took in this run (the control above shows it
    // does in this bed): when it did, the answers that met it are counted.
    // After other beds on the same machine it sometimes does not take
    // within the run, so this is reported rather than asserted.
    let misdirected = refused(&bed.daemon, "spoofed_arp");
    if misdirected == 0 && got["relayed_frames"] == 0 {
        eprintln!("note: the poisoning did not take in this run: {got}");
    }
    let status = bed.daemon.status().unwrap();
    assert_eq!(
        status["layer2"]["refused"]["spoofed_arp"], misdirected,
        "{status}"
    );
    assert_eq!(refused(&bed.daemon, "unpinned_answer"), 0);

    // Forging the victim's MAC takes its port on the bridge: the answers
    // still go to the victim's own port.
    let victim = bed
        .container("l2-victim-c", base, &[("IAM_ROLE", ROLE_DEPLOY)], &[])
        .expect("victim");
    let victim_ip = ip_of(&bed, &victim.name);
    let forge = [
        "arp-mitm",
        "--iface",
        "eth0",
        "--victim",
        victim_ip.as_str(),
        "--mode",
        "mac",
        "--seconds",
        ATTACK_SECONDS,
    ];
    let (creds, got) = std::thread::scope(|s| {
        let attack = s.spawn(|| attack(&attacker, &forge));
        std::thread::sleep(Duration::from_millis(1500));
        let creds = imds_credentials(&victim, ROLE_DEPLOY);
        (creds, attack.join().expect("attack thread"))
    });
    assert_eq!(creds["status"], 200, "{creds}");
    assert!(
        creds["body"].as_str().unwrap().contains("SecretAccessKey"),
        "{creds}"
    );
    assert_read_nothing(&got);
    assert!(
        got["poison_frames"].as_u64() > Some(5),
        "it did forge: {got}"
    );

    // Killed and restarted in the middle of an attack: nothing leaks.
    let victim = bed
        .container("l2-victim-d", base, &[("IAM_ROLE", ROLE_BUILD)], &[])
        .expect("victim");
    let victim_ip = ip_of(&bed, &victim.name);
    let mitm = [
        "arp-mitm",
        "--iface",
        "eth0",
        "--victim",
        victim_ip.as_str(),
        "--seconds",
        "8",
    ];
    let got = std::thread::scope(|s| {
        let attack = s.spawn(|| attack(&attacker, &mitm));
        std::thread::sleep(Duration::from_millis(1500));
        bed.daemon.kill9();
        bed.daemon.restart().unwrap();
        assert_sdk_got(
            &victim.exec(&["/mp-sdk-client", "1"]).expect("sdk"),
            ROLE_BUILD,
        );
        attack.join().expect("attack thread")
    });
    assert_read_nothing(&got);
    assert!(
        got["poison_frames"].as_u64() > Some(5),
        "it did poison: {got}"
    );
}

#[test]
fn an_attacker_started_with_its_victim_on_a_user_defined_network_gets_nothing() {
    let bed = E2eBed::start(&[]).expect("bed");
    let base = bed.base_image();
    bed.dockerd
        .docker(&[
            "network",
            "create",
            "--subnet",
            "10.213.77.0/24",
            "--gateway",
            "10.213.77.1",
            "l2net",
        ])
        .expect("network");
    let (victim_ip, attacker_ip) = ("10.213.77.10", "10.213.77.11");
    // Both containers start at once: the attacker's first system call is
    // the packet socket, before any Docker event could reach the daemon.
    let run = |name: &str, ip: &str, env: &[(&str, &str)], cmd: &[&str]| {
        let mut args = bed.container_args(name, env);
        args.extend(
            ["--network", "l2net", "--ip", ip, base]
                .iter()
                .map(|s| s.to_string()),
        );
        args.extend(cmd.iter().map(|s| s.to_string()));
        let out = bed.dockerd.run(&args).expect("docker run");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        serde_json::from_str::<Value>(stdout.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{name}: {e}: {stdout}"))
    };
    let (sdk, got) = std::thread::scope(|s| {
        let attacker = s.spawn(|| {
            run(
                "l2-at-once-attacker",
                attacker_ip,
                &[],
                &[
                    "/mp-attack",
                    "arp-mitm",
                    "--iface",
                    "eth0",
                    "--victim",
                    victim_ip,
                    "--seconds",
                    "6",
                ],
            )
        });
        let sdk = run(
            "l2-at-once-victim",
            victim_ip,
            &[("IAM_ROLE", ROLE_DEPLOY)],
            // Asked once the poisoning has taken (the host's locktime).
            &["sh", "-c", "sleep 3 && /mp-sdk-client 2"],
        );
        (sdk, attacker.join().expect("attacker"))
    });
    assert_sdk_got(&sdk, ROLE_DEPLOY);
    assert_read_nothing(&got);
    assert!(
        got["poison_frames"].as_u64() > Some(5),
        "it did poison: {got}"
    );
    if refused(&bed.daemon, "spoofed_arp") == 0 {
        eprintln!("note: the poisoning did not take in this run: {got}");
    }
    // No container on docker0 asked for anything: the one pin is on the
    // network's own bridge.
    assert_eq!(deliver_pins(&bed.daemon).len(), 1);
    let _ = bed.dockerd.docker(&["network", "rm", "l2net"]);
}

#[test]
fn a_host_network_job_reads_no_answer_off_the_bridge_and_the_gap_is_reported() {
    let bed = E2eBed::start_with_env(&[], NO_WATCHDOG).expect("bed");
    let base = bed.base_image();
    let victim = bed
        .container("l2-sniffed", base, &[("IAM_ROLE", ROLE_DEPLOY)], &[])
        .expect("victim");
    let job = bed
        .container("l2-host-job", base, &[], &["--network", "host"])
        .expect("host job");
    assert_sdk_got(
        &victim.exec(&["/mp-sdk-client", "1"]).expect("sdk"),
        ROLE_DEPLOY,
    );
    let sniff = ["sniff", "--iface", "docker0", "--seconds", ATTACK_SECONDS];

    // Without the answer pin, a packet socket on docker0 reads them.
    let pins = deliver_pins(&bed.daemon);
    detach_link(&pins[0]);
    let (sdk, got) = fetch_under_attack(&victim, &job, &sniff, 1);
    assert_sdk_got(&sdk, ROLE_DEPLOY);
    assert_eq!(
        got["saw_credentials"], true,
        "the bed must model sniffing: {got}"
    );

    // With it, the answers leave docker0 for the container's port before
    // docker0 would show them.
    let victim = bed
        .container("l2-sniffed-b", base, &[("IAM_ROLE", ROLE_BUILD)], &[])
        .expect("victim");
    let mut bed = bed;
    bed.daemon.restart().unwrap();
    let (sdk, got) = fetch_under_attack(&victim, &job, &sniff, 1);
    assert_sdk_got(&sdk, ROLE_BUILD);
    assert_read_nothing(&got);

    // The port itself can still be read where packet sockets open: this
    // kernel runs no BPF LSM program. The daemon says so, and doctor fails
    // a runner whose host-network jobs keep NET_RAW.
    let status = bed.daemon.status().unwrap();
    assert_eq!(status["layer2"]["sockets_refused"], false, "{status}");
    let gap = status["layer2"]["gap"].as_str().unwrap().to_string();
    assert!(gap.contains("BPF LSM"), "{gap}");
    let (code, ready) = bed.daemon.metrics_get("/readyz").unwrap();
    assert_eq!(code, 200, "{ready}");
    assert!(ready.contains("gap: layer 2"), "{ready}");
    let dir = bed.scratch().join("l2-doctor");
    std::fs::create_dir_all(&dir).unwrap();
    let runners = dir.join("config.toml");
    std::fs::write(
        &runners,
        "[[runners]]\n  name = \"hostnet\"\n  executor = \"docker\"\n  environment = [\"IAM_ROLE=\"]\n  [runners.docker]\n    network_mode = \"host\"\n",
    )
    .unwrap();
    let defaults = dir.join("metaproxy.default");
    std::fs::write(
        &defaults,
        "METAPROXY_ALLOW_ROLE=arn:aws:iam::123456789012:role/ci-*\n",
    )
    .unwrap();
    let out = std::process::Command::new(metaproxy_tests::daemon::metaproxy_bin())
        .args(["doctor", "--json"])
        .args(bed.daemon.doctor_args(&runners, &defaults))
        .env("DOCKER_HOST", bed.dockerd.host())
        .output()
        .unwrap();
    let checks: Vec<Value> = serde_json::from_slice(&out.stdout).expect("doctor --json");
    let host_net = checks
        .iter()
        .find(|c| c["area"] == "runner hostnet" && c["check"] == "network_mode")
        .unwrap_or_else(|| panic!("{checks:#?}"));
    assert_eq!(host_net["level"], "fail", "{host_net}");
    assert!(
        host_net["found"].as_str().unwrap().contains(&gap),
        "doctor says why: {host_net}"
    );
    let lock = checks
        .iter()
        .find(|c| c["area"] == "host" && c["check"] == "layer-2 lock")
        .unwrap_or_else(|| panic!("{checks:#?}"));
    assert_eq!(lock["level"], "warn", "{lock}");
}

/// The pin of the lock's setsockopt half, in the daemon's pin directory.
fn sockopt_pins(daemon: &Daemon) -> Vec<PathBuf> {
    pins_named(daemon, "mp_l2_sockopt-")
}

#[test]
fn a_host_network_job_sends_nothing_past_tc_egress_even_without_the_bpf_lsm() {
    // As on every kernel without BPF LSM programs (this one among them):
    // packet and AF_XDP sockets open, and the lock's setsockopt half is
    // what keeps their frames going through tc, and so the guard.
    let bed =
        E2eBed::start_with_env(&[], &[("METAPROXY_BPF_LSM", "off"), NO_WATCHDOG[0]]).expect("bed");
    let log = bed.imds_net.record().expect("packet log");
    let imds_mac = bed.imds_net.imds_mac().expect("imds mac");
    let job = bed
        .container("l2-bypass", bed.base_image(), &[], &["--network", "host"])
        .expect("host job");
    let bypass = |spoof: &str| {
        attack(
            &job,
            &[
                "packet-tcp",
                "--iface",
                UPLINK,
                "--spoof",
                spoof,
                "--dst",
                IMDS,
                "--next-hop-mac",
                &imds_mac,
                "--qdisc-bypass",
                "true",
            ],
        )
    };
    let xdp = |src: &str| {
        attack(
            &job,
            &[
                "xdp",
                "--iface",
                UPLINK,
                "--dst-mac",
                &imds_mac,
                "--src",
                src,
                "--dst",
                IMDS,
                "--count",
                "5",
            ],
        )
    };
    let from = |src: &str| log.from(src.parse::<IpAddr>().unwrap()).len();

    // Status and /readyz say what this host lacks.
    let status = bed.daemon.status().unwrap();
    assert_eq!(status["layer2"]["sockets_refused"], false, "{status}");
    assert!(
        status["layer2"]["gap"]
            .as_str()
            .unwrap()
            .contains("METAPROXY_BPF_LSM=off"),
        "{status}"
    );
    let (code, ready) = bed.daemon.metrics_get("/readyz").unwrap();
    assert_eq!(code, 200, "{ready}");
    assert!(ready.contains("gap: layer 2"), "{ready}");
    assert_eq!(bed.daemon.metric("metaproxy_layer2_sockets_refused"), 0.0);

    let got = bypass("172.31.213.221");
    assert!(
        got["bypass_error"]
            .as_str()
            .unwrap_or_default()
            .contains("EPERM"),
        "{got}"
    );
    assert_eq!(got["credentials"], false, "{got}");
    let got = xdp("172.31.213.222");
    assert!(
        got["setsockopt_error"]
            .as_str()
            .unwrap_or_default()
            .contains("XDP_UMEM_REG"),
        "{got}"
    );
    assert_eq!(got["sent"], 0, "{got}");
    assert_eq!(refused(&bed.daemon, "qdisc_bypass"), 1);
    assert_eq!(refused(&bed.daemon, "xdp_option"), 1);
    assert_eq!(from("172.31.213.221") + from("172.31.213.222"), 0);

    // Without the lock's pin, the same frames pass tc egress, the guard
    // never sees them, and the instance's credentials follow.
    let pins = sockopt_pins(&bed.daemon);
    assert_eq!(pins.len(), 1, "{pins:?}");
    detach_link(&pins[0]);
    let open = bypass("172.31.213.223");
    assert_eq!(
        open["credentials"], true,
        "the bed must model the bypass: {open}"
    );
    assert!(from("172.31.213.223") > 0);
    let open = xdp("172.31.213.224");
    assert!(open["completed"].as_u64() > Some(0), "{open}");
    metaproxy_tests::wait_for("AF_XDP frames at IMDS", Duration::from_secs(5), || {
        (from("172.31.213.224") > 0).then_some(())
    })
    .expect("the bed must model AF_XDP");
}

/// What a job keeps with the lock on: TCP and UDP to another job by its
/// alias (Docker's DNS), ping, and IPv6 where the network has it.
#[test]
fn a_job_keeps_its_ordinary_networking() {
    let bed = E2eBed::start(&[]).expect("bed");
    let base = bed.base_image();
    bed.dockerd
        .docker(&[
            "network",
            "create",
            "--ipv6",
            "--subnet",
            "10.213.78.0/24",
            "--subnet",
            "fd00:213:78::/64",
            "l2keep",
        ])
        .expect("network");
    let server = bed
        .container(
            "l2-keep-server",
            base,
            &[],
            &["--network", "l2keep", "--network-alias", "svc"],
        )
        .expect("server");
    server
        .exec_detached(&[
            "sh",
            "-c",
            "echo hello > /tmp/index.html; httpd -f -p 8080 -h /tmp",
        ])
        .expect("httpd");
    let client = bed
        .container("l2-keep-client", base, &[], &["--network", "l2keep"])
        .expect("client");
    let sh = |script: &str| {
        let out = bed
            .dockerd
            .docker(&["exec", &client.name, "sh", "-c", script])
            .unwrap_or_else(|e| panic!("{script}: {e:#}"));
        out
    };
    // Until httpd listens, asked from its own container.
    metaproxy_tests::wait_for("httpd in l2-keep-server", Duration::from_secs(10), || {
        bed.dockerd
            .docker(&[
                "exec",
                &server.name,
                "sh",
                "-c",
                "wget -q -O - http://127.0.0.1:8080/index.html",
            ])
            .ok()
            .filter(|body| body == "hello")
    })
    .unwrap();
    assert_eq!(sh("wget -q -O - http://svc:8080/index.html"), "hello");
    assert_eq!(sh("ping -c 1 -W 2 svc >/dev/null && echo ok"), "ok");
    assert_eq!(sh("ping -c 1 -W 2 10.213.78.1 >/dev/null && echo ok"), "ok");
    let server_ip = bed
        .dockerd
        .docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &server.name,
        ])
        .unwrap();
    assert!(
        sh("nslookup svc 127.0.0.11").contains(&server_ip),
        "DNS (UDP) through Docker's resolver"
    );
    let server_v6 = bed
        .dockerd
        .docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.GlobalIPv6Address}}{{end}}",
            &server.name,
        ])
        .unwrap();
    assert!(!server_v6.is_empty());
    assert_eq!(
        sh(&format!(
            "wget -q -O - http://[{server_v6}]:8080/index.html"
        )),
        "hello",
        "IPv6 between jobs"
    );
    let _ = bed.dockerd.docker(&["network", "rm", "l2keep"]);
}

//! `cargo xtask bench --traffic`: what a job's ordinary traffic pays for
//! metaproxy, measured side by side in one run.
//!
//! Two job containers of the same image, each on a bridge of its own:
//!
//! * **covered**: in the attached subtree, on `docker0`, having fetched its
//!   credentials once (so the answer pin is on its bridge too): every
//!   program metaproxy has meets its traffic;
//! * **bare**: in a sibling cgroup nothing is attached to
//!   (`--cgroup-parent`), on a second bridge the daemon never answers
//!   through: nothing of metaproxy's meets its traffic.
//!
//! Nothing is detached or restarted between the two. Each row is measured
//! in rounds, each round running both containers in an order shuffled from
//! a seed, so both meet the same moments of a shared machine; the medians
//! over rounds are reported, and the ratio covered / bare:
//!
//! * connect-only (2000 connects, RST on close) to nginx on the host;
//! * connect + GET of 64 bytes + close (1000) against nginx;
//! * bulk from the host: 256 MiB over one connection, and 256 x 1 MiB;
//! * bulk to the host: 256 MiB over one connection, and 256 x 1 MiB;
//! * UDP request/response of 64 bytes (2000, DNS-like) with an echo server.
//!
//! Then, from the kernel's BPF statistics over the whole run, every
//! program's runs and nanoseconds per run, and the packet guard's cost per
//! packet.

use std::{collections::BTreeMap, process::Command, time::Duration};

use metaproxy_tests::{
    bed::{Container, E2eBed, ROLE_DEPLOY},
    docker::GATEWAY,
    process::{spawn_in, ChildGuard},
    wait_for,
};
use serde_json::{json, Value};

use super::{median_of, prog_stats};

const ROUNDS: usize = 5;
const NGINX_PORT: u16 = 8091;
const SINK_PORT: u16 = 8092;
const ECHO_PORT: u16 = 8093;
/// The bare container's bridge.
const BARE_NET: &str = "mp-bench-bare";
const BARE_SUBNET: &str = "172.31.214.0/24";
const BARE_GATEWAY: &str = "172.31.214.1";

/// One row: what runs in a container, and how to read its result.
struct Row {
    name: &'static str,
    /// `mp-client` arguments, with `{host}` for the bridge's gateway.
    args: &'static [&'static str],
    /// `true`: throughput (MiB/s, higher is better); `false`: latency.
    throughput: bool,
}

const ROWS: &[Row] = &[
    Row {
        name: "connect only",
        args: &["connects", "{host}:8091", "2000"],
        throughput: false,
    },
    Row {
        name: "connect + GET 64 B + close",
        args: &["latency", "{host}:8091", "/small", "1000"],
        throughput: false,
    },
    Row {
        name: "from host, 256 MiB, 1 connection",
        args: &["download", "{host}:8091", "/bulk-256m", "1"],
        throughput: true,
    },
    Row {
        name: "from host, 256 x 1 MiB",
        args: &["download", "{host}:8091", "/bulk-1m", "256"],
        throughput: true,
    },
    Row {
        name: "to host, 256 MiB, 1 connection",
        args: &["upload", "{host}:8092", "268435456", "1"],
        throughput: true,
    },
    Row {
        name: "to host, 256 x 1 MiB",
        args: &["upload", "{host}:8092", "268435456", "256"],
        throughput: true,
    },
    Row {
        name: "UDP request/response 64 B",
        args: &["udp-rr", "{host}:8093", "2000"],
        throughput: false,
    },
];

/// The host's servers: nginx (one worker, as the floor elsewhere), a TCP
/// sink and a UDP echo, on both bridges' gateways, outside the attached
/// subtree.
struct Servers {
    _nginx: ChildGuard,
    _sink: ChildGuard,
}

impl Servers {
    fn start(bed: &E2eBed) -> anyhow::Result<Self> {
        let dir = bed.scratch().join("traffic");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("small"), "x".repeat(64))?;
        std::fs::write(dir.join("bulk-1m"), vec![b'y'; 1 << 20])?;
        std::fs::write(dir.join("bulk-256m"), vec![b'z'; 256 << 20])?;
        std::fs::write(
            dir.join("nginx.conf"),
            format!(
                "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 16384; }}\n\
                 http {{ access_log off; keepalive_timeout 5; sendfile on;\n\
                   server {{ listen {GATEWAY}:{NGINX_PORT}; listen {BARE_GATEWAY}:{NGINX_PORT}; root {d}; }} }}\n",
                d = dir.display()
            ),
        )?;
        let mut nginx = Command::new("/usr/sbin/nginx");
        nginx
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(&dir);
        let nginx = spawn_in(nginx, &bed.ns.path(), &bed.cg.child("services/nginx")?)?;
        // A sink that reads each connection to its end, and a UDP echo:
        // both trivially fast next to the kernel paths measured.
        let script = format!(
            r#"
import socket, threading
def sink():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", {SINK_PORT})); s.listen(128)
    while True:
        c, _ = s.accept()
        while c.recv(1 << 20):
            pass
        c.close()
def echo():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("0.0.0.0", {ECHO_PORT}))
    while True:
        d, a = u.recvfrom(2048)
        u.sendto(d, a)
threading.Thread(target=echo, daemon=True).start()
sink()
"#
        );
        let mut sink = Command::new("python3");
        sink.arg("-c").arg(script);
        let sink = spawn_in(sink, &bed.ns.path(), &bed.cg.child("services/sink")?)?;
        for port in [NGINX_PORT, SINK_PORT] {
            wait_for("the traffic servers", Duration::from_secs(10), || {
                let addr: std::net::SocketAddr = format!("{GATEWAY}:{port}").parse().ok()?;
                bed.ns
                    .run(move || std::net::TcpStream::connect(addr).ok())
                    .ok()
                    .flatten()
            })?;
        }
        Ok(Self {
            _nginx: nginx,
            _sink: sink,
        })
    }
}

/// A measured container and the gateway it reaches the host at.
struct Side {
    name: &'static str,
    c: Container,
    host: &'static str,
}

impl Side {
    fn run(&self, row: &Row) -> anyhow::Result<Value> {
        let mut args = vec!["/mp-client".to_string()];
        args.extend(row.args.iter().map(|a| a.replace("{host}", self.host)));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let v = self.c.exec(&args)?;
        anyhow::ensure!(v["ok"] == true, "{} in {}: {v}", row.name, self.name);
        Ok(v)
    }
}

/// Runs the comparison in `bed` and returns its report.
pub fn measure(bed: &E2eBed) -> anyhow::Result<Value> {
    // The bare bridge first: nginx listens on its gateway too.
    bed.dockerd.docker(&[
        "network",
        "create",
        "--subnet",
        BARE_SUBNET,
        "--gateway",
        BARE_GATEWAY,
        BARE_NET,
    ])?;
    let _servers = Servers::start(bed)?;
    let outside = bed.cg.child("bench-bare")?;
    let outside = bed.cg.relative(&outside);
    let covered = Side {
        name: "covered",
        c: bed.container(
            "traffic-covered",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &[],
        )?,
        host: GATEWAY,
    };
    // Its credentials once, as any job with a role: the answer pin goes on
    // its bridge.
    let creds = covered.c.exec(&["/mp-sdk-client", "1"])?;
    anyhow::ensure!(creds["ok"] == true, "covered job's credentials: {creds}");
    let bare = Side {
        name: "bare",
        c: bed.container(
            "traffic-bare",
            bed.base_image(),
            &[],
            &["--cgroup-parent", &outside, "--network", BARE_NET],
        )?,
        host: BARE_GATEWAY,
    };
    let before = prog_stats();
    let mut rows = Vec::new();
    for (i, row) in ROWS.iter().enumerate() {
        let mut figures: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
        for round in 0..ROUNDS {
            let mut order = [&covered, &bare];
            if fastrand::Rng::with_seed((i * ROUNDS + round) as u64).bool() {
                order.reverse();
            }
            for side in order {
                figures.entry(side.name).or_default().push(side.run(row)?);
            }
        }
        let median = |side: &str, key: &str| {
            median_of(
                figures[side]
                    .iter()
                    .filter_map(|v| v[key].as_f64())
                    .collect(),
            )
        };
        rows.push(if row.throughput {
            let (c, b) = (median("covered", "mib_per_s"), median("bare", "mib_per_s"));
            json!({ "name": row.name, "unit": "MiB/s", "covered": c, "bare": b, "ratio": c / b })
        } else {
            let (c50, b50) = (median("covered", "p50_us"), median("bare", "p50_us"));
            let (c99, b99) = (median("covered", "p99_us"), median("bare", "p99_us"));
            json!({
                "name": row.name, "unit": "us",
                "covered_p50": c50, "bare_p50": b50, "ratio": c50 / b50,
                "covered_p99": c99, "bare_p99": b99, "p99_ratio": c99 / b99,
            })
        });
    }
    let after = prog_stats();
    let programs: Vec<Value> = after
        .iter()
        .map(|(name, (t1, n1))| {
            let (t0, n0) = before.get(name).copied().unwrap_or_default();
            let runs = n1.saturating_sub(n0);
            let ns = if runs == 0 {
                0.0
            } else {
                t1.saturating_sub(t0) as f64 / runs as f64
            };
            json!({ "program": name, "runs": runs, "ns_per_run": ns })
        })
        .collect();
    let _ = bed.dockerd.docker(&["rm", "-f", "traffic-bare"]);
    let _ = bed.dockerd.docker(&["network", "rm", BARE_NET]);
    Ok(json!({
        "rounds": ROUNDS,
        "machine": super::machine(),
        "rows": rows,
        "programs": programs,
    }))
}

/// The table for people.
pub fn print(report: &Value) {
    println!("What a job's ordinary traffic pays (covered: every metaproxy program on its path; bare: none), {} rounds, medians", report["rounds"]);
    println!("{}", report["machine"].as_str().unwrap_or_default());
    println!(
        "{:<36} {:>12} {:>12} {:>8} {:>12} {:>12} {:>8}",
        "row", "covered", "bare", "ratio", "covered p99", "bare p99", "ratio"
    );
    for r in report["rows"].as_array().into_iter().flatten() {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        if r["unit"] == "MiB/s" {
            println!(
                "{:<36} {:>8.0} MiB/s {:>6.0} MiB/s {:>8.3}",
                r["name"].as_str().unwrap_or_default(),
                f("covered"),
                f("bare"),
                f("ratio")
            );
        } else {
            println!(
                "{:<36} {:>9.1} us {:>9.1} us {:>8.3} {:>9.1} us {:>9.1} us {:>8.3}",
                r["name"].as_str().unwrap_or_default(),
                f("covered_p50"),
                f("bare_p50"),
                f("ratio"),
                f("covered_p99"),
                f("bare_p99"),
                f("p99_ratio")
            );
        }
    }
    println!("BPF programs over the run (kernel statistics):");
    for p in report["programs"].as_array().into_iter().flatten() {
        println!(
            "  {:<20} {:>10} runs {:>8.0} ns/run",
            p["program"].as_str().unwrap_or_default(),
            p["runs"],
            p["ns_per_run"].as_f64().unwrap_or(0.0)
        );
    }
}

//! `cargo xtask bench --traffic`: what a job's ordinary traffic pays for
//! metaproxy, measured side by side in one run.
//!
//! Three job containers of the same image, on the same bridge (`docker0`):
//!
//! * **covered**: in the attached subtree, having fetched its credentials
//!   once (so the answer pin is on its bridge): every program metaproxy has
//!   meets its traffic;
//! * **bare**: in a sibling cgroup nothing is attached to
//!   (`--cgroup-parent`): of metaproxy's programs only the answer pin's
//!   first test on the bridge meets its traffic (it is per bridge, and its
//!   cost per frame is in the kernel's figures below);
//! * **control**: a second bare container, the method's own resolution:
//!   control / bare would be 1.00x if the machine stood still.
//!
//! Nothing is detached or restarted between them. Each row is measured in
//! rounds, each round running all three in an order shuffled from a seed,
//! so they meet the same moments of a shared machine. Reported: the
//! medians over rounds, and the median over rounds of each round's ratio
//! covered / bare (and control / bare), so that a drift of the machine
//! between rounds cancels; and
//! the verdict against the budget (latency at most 1.05x, throughput at
//! least 0.98x), with the programs' own time over each row as a bound on
//! the direct cost (see [`verdict`]):
//!
//! * connect-only (2000 connects, RST on close) to nginx on the host;
//! * connect + GET of 64 bytes + close (1000) against nginx;
//! * bulk from the host: 1 GiB over one connection, and 1024 x 1 MiB;
//! * bulk to the host: 1 GiB over one connection, and 1024 x 1 MiB;
//! * UDP request/response of 64 bytes (2000, DNS-like) with an echo server.
//!
//! Then, from the kernel's BPF statistics over the whole run, every
//! program's runs and nanoseconds per run, and the packet guard's cost per
//! packet.

use std::{collections::BTreeMap, process::Command, time::Duration};

use metaproxy_tests::{
    bed::{bin, Container, E2eBed, ROLE_DEPLOY},
    docker::GATEWAY,
    process::{spawn_in, ChildGuard},
    wait_for,
};
use serde_json::{json, Value};

use super::{median_of, prog_stats};

const LATENCY_ROUNDS: usize = 41;
const BULK_ROUNDS: usize = 15;
/// The budget: latency ratios at most this, throughput ratios at least
/// [`THROUGHPUT_BUDGET`].
const LATENCY_BUDGET: f64 = 1.05;
const THROUGHPUT_BUDGET: f64 = 0.98;
/// The jobs' clients on one CPU, the host's servers on the other: on a
/// small machine, where the scheduler puts a client and its server
/// otherwise moves the figures by more than what is measured.
const CLIENT_CPU: &str = "--cpuset-cpus=1";
const SERVER_CPU: &str = "0";
const NGINX_PORT: u16 = 8091;
const SINK_PORT: u16 = 8092;
const ECHO_PORT: u16 = 8093;

/// One row: what runs in a container, and how to read its result.
struct Row {
    name: &'static str,
    /// `mp-client` arguments, with `{host}` for the bridge's gateway.
    args: &'static [&'static str],
    /// `true`: throughput (MiB/s, higher is better); `false`: latency.
    throughput: bool,
    /// Rounds: the short latency loops move most from round to round, and
    /// cost least.
    rounds: usize,
}

const ROWS: &[Row] = &[
    Row {
        name: "connect only",
        args: &["connects", "{host}:8091", "2000"],
        throughput: false,
        rounds: LATENCY_ROUNDS,
    },
    Row {
        name: "connect + GET 64 B + close",
        args: &["latency", "{host}:8091", "/small", "1000"],
        throughput: false,
        rounds: LATENCY_ROUNDS,
    },
    Row {
        name: "from host, 1 GiB, 1 connection",
        args: &["download", "{host}:8091", "/bulk-1g", "1"],
        throughput: true,
        rounds: BULK_ROUNDS,
    },
    Row {
        name: "from host, 1024 x 1 MiB",
        args: &["download", "{host}:8091", "/bulk-1m", "1024"],
        throughput: true,
        rounds: BULK_ROUNDS,
    },
    Row {
        name: "to host, 1 GiB, 1 connection",
        args: &["upload", "{host}:8092", "1073741824", "1"],
        throughput: true,
        rounds: BULK_ROUNDS,
    },
    Row {
        name: "to host, 1024 x 1 MiB",
        args: &["upload", "{host}:8092", "1073741824", "1024"],
        throughput: true,
        rounds: BULK_ROUNDS,
    },
    Row {
        name: "UDP request/response 64 B",
        args: &["udp-rr", "{host}:8093", "2000"],
        throughput: false,
        rounds: LATENCY_ROUNDS,
    },
];

/// The host's servers: nginx (one worker, as the floor elsewhere), a TCP
/// sink and a UDP echo, on the bridge's gateway, outside the attached
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
        std::fs::write(dir.join("bulk-1g"), vec![b'z'; 1 << 30])?;
        std::fs::write(
            dir.join("nginx.conf"),
            format!(
                "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 16384; }}\n\
                 http {{ access_log off; keepalive_timeout 5; sendfile on;\n\
                   server {{ listen {GATEWAY}:{NGINX_PORT}; root {d}; }} }}\n",
                d = dir.display()
            ),
        )?;
        let mut nginx = Command::new("taskset");
        nginx
            .args(["-c", SERVER_CPU, "/usr/sbin/nginx"])
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(&dir);
        let nginx = spawn_in(nginx, &bed.ns.path(), &bed.cg.child("services/nginx")?)?;
        // A sink that reads each connection to its end, and a UDP echo:
        // both trivially fast next to the kernel paths measured.
        let mut sink = Command::new("taskset");
        sink.args(["-c", SERVER_CPU]).arg(bin("mp-client")).args([
            "serve",
            &format!("{GATEWAY}:{SINK_PORT}"),
            &format!("{GATEWAY}:{ECHO_PORT}"),
        ]);
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
    let _servers = Servers::start(bed)?;
    let outside = bed.cg.child("bench-bare")?;
    let outside = bed.cg.relative(&outside);
    let covered = Side {
        name: "covered",
        c: bed.container(
            "traffic-covered",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &[CLIENT_CPU],
        )?,
        host: GATEWAY,
    };
    // Its credentials once, as any job with a role: the answer pin goes on
    // its bridge.
    let creds = covered.c.exec(&["/mp-sdk-client", "1"])?;
    anyhow::ensure!(creds["ok"] == true, "covered job's credentials: {creds}");
    let bare_side = |name: &'static str| -> anyhow::Result<Side> {
        Ok(Side {
            name,
            c: bed.container(
                &format!("traffic-{name}"),
                bed.base_image(),
                &[],
                &["--cgroup-parent", &outside, CLIENT_CPU],
            )?,
            host: GATEWAY,
        })
    };
    let sides = [covered, bare_side("bare")?, bare_side("control")?];
    let before = prog_stats();
    let mut rows = Vec::new();
    // `MP_BENCH_ROWS=upload,connect` measures only the rows whose name
    // contains one of those words (to chase one figure).
    let only = std::env::var("MP_BENCH_ROWS").unwrap_or_default();
    // `MP_BENCH_ROUNDS=21`: more rounds, for a finer figure.
    let rounds_override: Option<usize> = std::env::var("MP_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok());
    for (i, row) in ROWS.iter().enumerate() {
        if !only.is_empty() && !only.split(',').any(|w| row.name.contains(w)) {
            continue;
        }
        let rounds = rounds_override.unwrap_or(row.rounds);
        let mut figures: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
        let row_before = prog_stats();
        for round in 0..rounds {
            let mut order: Vec<&Side> = sides.iter().collect();
            fastrand::Rng::with_seed((i * rounds + round) as u64).shuffle(&mut order);
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
        // The programs' own time over the row: an upper bound on
        // metaproxy's direct cost to the covered job. The cgroup programs
        // run for it alone; the answer pin's program runs on the bridge for
        // all three jobs alike (so the side-by-side ratio cannot see it),
        // and a third of its time is the covered job's.
        let row_after = prog_stats();
        let program_ns: f64 = row_after
            .iter()
            .map(|(name, (t1, _))| {
                let ns = t1.saturating_sub(row_before.get(name).map_or(0, |s| s.0)) as f64;
                if name.starts_with("mp_l2_deliver") {
                    ns / sides.len() as f64
                } else {
                    ns
                }
            })
            .sum();
        // Each round's own ratio, then their median: a slow drift of the
        // machine between rounds cancels within a round.
        let paired = |side: &str, key: &str| {
            median_of(
                figures[side]
                    .iter()
                    .zip(&figures["bare"])
                    .filter_map(|(a, b)| Some(a[key].as_f64()? / b[key].as_f64()?))
                    .collect(),
            )
        };
        rows.push(if row.throughput {
            let (c, b, k) = (
                median("covered", "mib_per_s"),
                median("bare", "mib_per_s"),
                median("control", "mib_per_s"),
            );
            let (ratio, control) = (
                paired("covered", "mib_per_s"),
                paired("control", "mib_per_s"),
            );
            let seconds: f64 = figures["covered"]
                .iter()
                .filter_map(|v| v["seconds"].as_f64())
                .sum();
            let direct = 1.0 - program_ns / 1e9 / seconds;
            json!({
                "name": row.name, "unit": "MiB/s", "rounds": rounds, "covered": c, "bare": b, "control": k,
                "ratio": ratio, "control_ratio": control, "direct_ratio": direct,
                "verdict": verdict(ratio, control, direct, |r| r >= THROUGHPUT_BUDGET),
            })
        } else {
            let (c50, b50, k50) = (
                median("covered", "p50_us"),
                median("bare", "p50_us"),
                median("control", "p50_us"),
            );
            let (c99, b99) = (median("covered", "p99_us"), median("bare", "p99_us"));
            let (ratio, control) = (paired("covered", "p50_us"), paired("control", "p50_us"));
            let ops: f64 = row.args.last().and_then(|n| n.parse().ok()).unwrap_or(1.0);
            let direct = 1.0 + program_ns / (rounds as f64 * ops) / (b50 * 1e3);
            json!({
                "name": row.name, "unit": "us", "rounds": rounds,
                "covered_p50": c50, "bare_p50": b50, "control_p50": k50,
                "ratio": ratio, "control_ratio": control, "direct_ratio": direct,
                "covered_p99": c99, "bare_p99": b99, "p99_ratio": paired("covered", "p99_us"),
                "verdict": verdict(ratio, control, direct, |r| r <= LATENCY_BUDGET),
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
    for side in ["bare", "control"] {
        let _ = bed
            .dockerd
            .docker(&["rm", "-f", &format!("traffic-{side}")]);
    }
    Ok(json!({
        "machine": super::machine(),
        "budget": { "latency": LATENCY_BUDGET, "throughput": THROUGHPUT_BUDGET },
        "rows": rows,
        "programs": programs,
    }))
}

/// A row against its budget (`meets`):
/// * `within`: the side-by-side ratio meets it;
/// * `noise`: it does not, but by no more than the control (two bare jobs)
///   strays from 1.00x in the same rounds, and the programs' own time (the
///   direct bound) meets it: this run cannot tell the cost from noise;
/// * `OVER`: anything else.
fn verdict(ratio: f64, control: f64, direct: f64, meets: impl Fn(f64) -> bool) -> &'static str {
    if meets(ratio) {
        "within"
    } else if meets(direct) && (ratio - 1.0).abs() <= (control - 1.0).abs() {
        "noise"
    } else {
        "OVER"
    }
}

/// The table for people.
pub fn print(report: &Value) {
    println!(
        "What a job's ordinary traffic pays (covered: every metaproxy program on its path; \
         bare: none; control: a second bare job, the method's resolution), medians over \
         {LATENCY_ROUNDS} rounds (latency) and {BULK_ROUNDS} (bulk)"
    );
    println!("{}", report["machine"].as_str().unwrap_or_default());
    println!(
        "{:<34} {:>11} {:>11} {:>7} {:>8} {:>8} {:>11} {:>11} {:>7}  budget",
        "row", "covered", "bare", "ratio", "control", "direct", "covered p99", "bare p99", "ratio"
    );
    for r in report["rows"].as_array().into_iter().flatten() {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        let name = r["name"].as_str().unwrap_or_default();
        let verdict = r["verdict"].as_str().unwrap_or_default();
        if r["unit"] == "MiB/s" {
            println!(
                "{name:<34} {:>5.0} MiB/s {:>5.0} MiB/s {:>6.3}x {:>7.3}x {:>7.3}x {:>33}  {verdict}",
                f("covered"),
                f("bare"),
                f("ratio"),
                f("control_ratio"),
                f("direct_ratio"),
                ""
            );
        } else {
            println!(
                "{name:<34} {:>8.1} us {:>8.1} us {:>6.3}x {:>7.3}x {:>7.3}x {:>8.1} us {:>8.1} us {:>6.3}x  {verdict}",
                f("covered_p50"),
                f("bare_p50"),
                f("ratio"),
                f("control_ratio"),
                f("direct_ratio"),
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

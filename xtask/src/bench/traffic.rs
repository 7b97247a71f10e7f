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

use std::{fmt, process::Command, time::Duration};

use metaproxy_tests::{
    bed::{bin, Container, E2eBed, ROLE_DEPLOY},
    docker::GATEWAY,
    process::{spawn_in, ChildGuard},
    wait_for,
};
use serde_json::{json, Value};

use super::{
    answer::{self, Percentiles, Rate},
    median_of, prog_stats,
};

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

/// The three job containers, by what meets their traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Every program metaproxy has.
    Covered,
    /// Of metaproxy's programs, only the answer pin's on the bridge.
    Bare,
    /// A second bare one: the method's own resolution.
    Control,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Covered => "covered",
            Self::Bare => "bare",
            Self::Control => "control",
        }
    }

    /// Its container's name.
    fn container(self) -> String {
        format!("traffic-{}", self.name())
    }
}

/// A measured container and the gateway it reaches the host at.
struct Side {
    kind: Kind,
    c: Container,
    host: &'static str,
}

impl Side {
    fn run(&self, row: &Row) -> anyhow::Result<Value> {
        let mut args = vec!["/mp-client".to_string()];
        args.extend(row.args.iter().map(|a| a.replace("{host}", self.host)));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let v = self.c.exec(&args)?;
        answer::ensure_ok(&v, &format!("{} in {}", row.name, self.kind.name()))?;
        Ok(v)
    }
}

/// What one row measured on each side, one answer per round, read by
/// `read`.
fn rounds_of<T>(
    sides: &[Side],
    row: &Row,
    seed: u64,
    rounds: usize,
    read: impl Fn(&Value) -> anyhow::Result<T>,
) -> anyhow::Result<Sides<T>> {
    let mut figures = Sides([Vec::new(), Vec::new(), Vec::new()]);
    for round in 0..rounds {
        let mut order: Vec<&Side> = sides.iter().collect();
        fastrand::Rng::with_seed(seed + round as u64).shuffle(&mut order);
        for side in order {
            figures.0[side.kind as usize].push(read(&side.run(row)?)?);
        }
    }
    Ok(figures)
}

/// Each side's rounds of a row, by [`Kind`].
struct Sides<T>([Vec<T>; 3]);

impl<T> Sides<T> {
    fn of(&self, kind: Kind) -> &[T] {
        &self.0[kind as usize]
    }

    /// The median over rounds of one side's `pick`.
    fn median(&self, kind: Kind, pick: impl Fn(&T) -> Option<f64>) -> f64 {
        median_of(self.of(kind).iter().filter_map(pick).collect())
    }

    /// Each round's own ratio of `kind` to bare, then their median: a
    /// slow drift of the machine between rounds cancels within a round.
    fn paired(&self, kind: Kind, pick: impl Fn(&T) -> Option<f64>) -> f64 {
        median_of(
            self.of(kind)
                .iter()
                .zip(self.of(Kind::Bare))
                .filter_map(|(a, b)| Some(pick(a)? / pick(b)?))
                .collect(),
        )
    }
}

/// Runs the comparison in `bed` and returns its report.
pub fn measure(bed: &E2eBed) -> anyhow::Result<Report> {
    let _servers = Servers::start(bed)?;
    let outside = bed.cg.child("bench-bare")?;
    let outside = bed.cg.relative(&outside);
    let covered = Side {
        kind: Kind::Covered,
        c: bed.container(
            &Kind::Covered.container(),
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &[CLIENT_CPU],
        )?,
        host: GATEWAY,
    };
    // Its credentials once, as any job with a role: the answer pin goes on
    // its bridge.
    let creds = covered.c.exec(&["/mp-sdk-client", "1"])?;
    answer::ensure_ok(&creds, "covered job's credentials")?;
    let bare_side = |kind: Kind| -> anyhow::Result<Side> {
        Ok(Side {
            kind,
            c: bed.container(
                &kind.container(),
                bed.base_image(),
                &[],
                &["--cgroup-parent", &outside, CLIENT_CPU],
            )?,
            host: GATEWAY,
        })
    };
    let sides = [covered, bare_side(Kind::Bare)?, bare_side(Kind::Control)?];
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
        let seed = (i * rounds) as u64;
        let row_before = prog_stats();
        // Measured before the programs' time is read: the rounds are what
        // it bounds.
        let measured = if row.throughput {
            Measured::Throughput(rounds_of(&sides, row, seed, rounds, Rate::read)?)
        } else {
            Measured::Latency(rounds_of(&sides, row, seed, rounds, Percentiles::read)?)
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
        rows.push(match measured {
            Measured::Throughput(figures) => {
                let mib = |r: &Rate| Some(r.mib_per_s);
                let (ratio, control) = (
                    figures.paired(Kind::Covered, mib),
                    figures.paired(Kind::Control, mib),
                );
                let seconds: f64 = figures.of(Kind::Covered).iter().map(|r| r.seconds).sum();
                let direct = 1.0 - program_ns / 1e9 / seconds;
                RowReport {
                    name: row.name,
                    rounds,
                    ratio,
                    control_ratio: control,
                    direct_ratio: direct,
                    verdict: verdict(ratio, control, direct, |r| r >= THROUGHPUT_BUDGET),
                    figures: RowFigures::Throughput {
                        covered: figures.median(Kind::Covered, mib),
                        bare: figures.median(Kind::Bare, mib),
                        control: figures.median(Kind::Control, mib),
                    },
                }
            }
            Measured::Latency(figures) => {
                let (p50, p99) = (|p: &Percentiles| p.p50_us, |p: &Percentiles| p.p99_us);
                let bare_p50 = figures.median(Kind::Bare, p50);
                let (ratio, control) = (
                    figures.paired(Kind::Covered, p50),
                    figures.paired(Kind::Control, p50),
                );
                let ops: f64 = row.args.last().and_then(|n| n.parse().ok()).unwrap_or(1.0);
                let direct = 1.0 + program_ns / (rounds as f64 * ops) / (bare_p50 * 1e3);
                RowReport {
                    name: row.name,
                    rounds,
                    ratio,
                    control_ratio: control,
                    direct_ratio: direct,
                    verdict: verdict(ratio, control, direct, |r| r <= LATENCY_BUDGET),
                    figures: RowFigures::Latency {
                        covered_p50: figures.median(Kind::Covered, p50),
                        bare_p50,
                        control_p50: figures.median(Kind::Control, p50),
                        covered_p99: figures.median(Kind::Covered, p99),
                        bare_p99: figures.median(Kind::Bare, p99),
                        p99_ratio: figures.paired(Kind::Covered, p99),
                    },
                }
            }
        });
    }
    let after = prog_stats();
    let programs = after
        .iter()
        .map(|(name, (t1, n1))| {
            let (t0, n0) = before.get(name).copied().unwrap_or_default();
            let runs = n1.saturating_sub(n0);
            let ns = if runs == 0 {
                0.0
            } else {
                t1.saturating_sub(t0) as f64 / runs as f64
            };
            Program {
                program: name.clone(),
                runs,
                ns_per_run: ns,
            }
        })
        .collect();
    for kind in [Kind::Bare, Kind::Control] {
        let _ = bed.dockerd.docker(&["rm", "-f", &kind.container()]);
    }
    Ok(Report {
        machine: super::machine(),
        rows,
        programs,
    })
}

/// A row's rounds, as its kind reads them.
enum Measured {
    Throughput(Sides<Rate>),
    Latency(Sides<Percentiles>),
}

/// A row against its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The side-by-side ratio meets it.
    Within,
    /// It does not, but by no more than the control (two bare jobs) strays
    /// from 1.00x in the same rounds, and the programs' own time (the
    /// direct bound) meets it: this run cannot tell the cost from noise.
    Noise,
    /// Anything else.
    Over,
}

impl Verdict {
    fn name(self) -> &'static str {
        match self {
            Self::Within => "within",
            Self::Noise => "noise",
            Self::Over => "OVER",
        }
    }
}

/// A row against its budget (`meets`): see [`Verdict`].
fn verdict(ratio: f64, control: f64, direct: f64, meets: impl Fn(f64) -> bool) -> Verdict {
    if meets(ratio) {
        Verdict::Within
    } else if meets(direct) && (ratio - 1.0).abs() <= (control - 1.0).abs() {
        Verdict::Noise
    } else {
        Verdict::Over
    }
}

/// One row's medians: MiB/s for throughput, microseconds for latency.
enum RowFigures {
    Throughput {
        covered: f64,
        bare: f64,
        control: f64,
    },
    Latency {
        covered_p50: f64,
        bare_p50: f64,
        control_p50: f64,
        covered_p99: f64,
        bare_p99: f64,
        p99_ratio: f64,
    },
}

/// One row of the report.
struct RowReport {
    name: &'static str,
    rounds: usize,
    /// covered / bare, paired by round (throughput, or p50).
    ratio: f64,
    /// control / bare, paired by round.
    control_ratio: f64,
    /// The bound from the programs' own time.
    direct_ratio: f64,
    verdict: Verdict,
    figures: RowFigures,
}

/// One BPF program's runs over the whole comparison.
struct Program {
    program: String,
    runs: u64,
    ns_per_run: f64,
}

/// The comparison: `--json` prints [`Report::to_json`], people its table
/// (`Display`).
pub struct Report {
    machine: String,
    rows: Vec<RowReport>,
    programs: Vec<Program>,
}

impl Report {
    /// What `--json` prints (keys in sorted order, as a JSON object's).
    pub fn to_json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                let (name, rounds, verdict) = (r.name, r.rounds, r.verdict.name());
                let (ratio, control_ratio, direct_ratio) =
                    (r.ratio, r.control_ratio, r.direct_ratio);
                match r.figures {
                    RowFigures::Throughput {
                        covered,
                        bare,
                        control,
                    } => json!({
                        "name": name, "unit": "MiB/s", "rounds": rounds, "covered": covered, "bare": bare, "control": control,
                        "ratio": ratio, "control_ratio": control_ratio, "direct_ratio": direct_ratio,
                        "verdict": verdict,
                    }),
                    RowFigures::Latency {
                        covered_p50,
                        bare_p50,
                        control_p50,
                        covered_p99,
                        bare_p99,
                        p99_ratio,
                    } => json!({
                        "name": name, "unit": "us", "rounds": rounds,
                        "covered_p50": covered_p50, "bare_p50": bare_p50, "control_p50": control_p50,
                        "ratio": ratio, "control_ratio": control_ratio, "direct_ratio": direct_ratio,
                        "covered_p99": covered_p99, "bare_p99": bare_p99, "p99_ratio": p99_ratio,
                        "verdict": verdict,
                    }),
                }
            })
            .collect();
        let programs: Vec<Value> = self
            .programs
            .iter()
            .map(|p| json!({ "program": p.program, "runs": p.runs, "ns_per_run": p.ns_per_run }))
            .collect();
        json!({
            "machine": self.machine,
            "budget": { "latency": LATENCY_BUDGET, "throughput": THROUGHPUT_BUDGET },
            "rows": rows,
            "programs": programs,
        })
    }
}

/// The table for people.
impl fmt::Display for Report {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            out,
            "What a job's ordinary traffic pays (covered: every metaproxy program on its path; \
             bare: none; control: a second bare job, the method's resolution), medians over \
             {LATENCY_ROUNDS} rounds (latency) and {BULK_ROUNDS} (bulk)"
        )?;
        writeln!(out, "{}", self.machine)?;
        writeln!(
            out,
            "{:<34} {:>11} {:>11} {:>7} {:>8} {:>8} {:>11} {:>11} {:>7}  budget",
            "row",
            "covered",
            "bare",
            "ratio",
            "control",
            "direct",
            "covered p99",
            "bare p99",
            "ratio"
        )?;
        for r in &self.rows {
            let (name, verdict) = (r.name, r.verdict.name());
            match r.figures {
                RowFigures::Throughput { covered, bare, .. } => writeln!(
                    out,
                    "{name:<34} {:>5.0} MiB/s {:>5.0} MiB/s {:>6.3}x {:>7.3}x {:>7.3}x {:>31}  {verdict}",
                    covered, bare, r.ratio, r.control_ratio, r.direct_ratio, ""
                )?,
                RowFigures::Latency {
                    covered_p50,
                    bare_p50,
                    covered_p99,
                    bare_p99,
                    p99_ratio,
                    ..
                } => writeln!(
                    out,
                    "{name:<34} {:>8.1} us {:>8.1} us {:>6.3}x {:>7.3}x {:>7.3}x {:>8.1} us {:>8.1} us {:>6.3}x  {verdict}",
                    covered_p50,
                    bare_p50,
                    r.ratio,
                    r.control_ratio,
                    r.direct_ratio,
                    covered_p99,
                    bare_p99,
                    p99_ratio
                )?,
            }
        }
        writeln!(out, "BPF programs over the run (kernel statistics):")?;
        for p in &self.programs {
            writeln!(
                out,
                "  {:<20} {:>10} runs {:>8.0} ns/run",
                p.program, p.runs, p.ns_per_run
            )?;
        }
        Ok(())
    }
}

/// A report of one row of each kind, for tests of its shape.
#[cfg(test)]
pub(super) fn example() -> Report {
    let row = |name, figures| RowReport {
        name,
        rounds: 3,
        ratio: 1.01,
        control_ratio: 0.99,
        direct_ratio: 1.002,
        verdict: Verdict::Within,
        figures,
    };
    Report {
        machine: "machine: 2 CPUs (test), kernel 6.1".into(),
        rows: vec![
            row(
                "connect only",
                RowFigures::Latency {
                    covered_p50: 40.0,
                    bare_p50: 39.5,
                    control_p50: 39.9,
                    covered_p99: 90.0,
                    bare_p99: 88.0,
                    p99_ratio: 1.02,
                },
            ),
            row(
                "from host, 1024 x 1 MiB",
                RowFigures::Throughput {
                    covered: 2000.0,
                    bare: 2010.0,
                    control: 2005.0,
                },
            ),
        ],
        programs: vec![Program {
            program: "mp_connect4".into(),
            runs: 12345,
            ns_per_run: 150.0,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(v: &Value) -> Vec<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    #[test]
    fn the_json_keeps_its_keys_and_the_table_its_columns() {
        let report = example();
        let v = report.to_json();
        assert_eq!(keys(&v), ["budget", "machine", "programs", "rows"]);
        assert_eq!(v["budget"], json!({ "latency": 1.05, "throughput": 0.98 }));
        assert_eq!(
            keys(&v["rows"][0]),
            [
                "bare_p50",
                "bare_p99",
                "control_p50",
                "control_ratio",
                "covered_p50",
                "covered_p99",
                "direct_ratio",
                "name",
                "p99_ratio",
                "ratio",
                "rounds",
                "unit",
                "verdict"
            ]
        );
        assert_eq!(v["rows"][0]["unit"], "us");
        assert_eq!(
            keys(&v["rows"][1]),
            [
                "bare",
                "control",
                "control_ratio",
                "covered",
                "direct_ratio",
                "name",
                "ratio",
                "rounds",
                "unit",
                "verdict"
            ]
        );
        assert_eq!(v["rows"][1]["unit"], "MiB/s");
        assert_eq!(v["rows"][1]["verdict"], "within");
        assert_eq!(keys(&v["programs"][0]), ["ns_per_run", "program", "runs"]);
        let table = report.to_string();
        let lines: Vec<&str> = table.lines().collect();
        // Every row ends its figures where the header's `budget` begins.
        let budget = lines[2].find("  budget").unwrap();
        for line in &lines[3..5] {
            assert_eq!(line.find("  within"), Some(budget), "{table}");
        }
        assert_eq!(
            lines[6],
            "  mp_connect4               12345 runs      150 ns/run"
        );
    }
}

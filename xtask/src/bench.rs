//! `cargo xtask bench [--json] [--latency]`: metaproxy against the floor
//! users compare it with, measured in the same run on the same machine
//! (`--latency`: the credential GET's table alone, for comparing builds).
//!
//! In the end-to-end bed, a job container times sequential connect + GET +
//! close round trips (the way SDKs fetch credentials), each round one
//! request to every one of these in a shuffled order (so all meet the same
//! moment of a shared machine and the same mix of neighbours), in five
//! runs whose percentiles' medians are reported:
//!
//! * nginx (Debian's nginx-light, one worker) serving a static JSON answer
//!   of the credentials document's size, reached directly: the floor;
//! * a minimal hyper server (release build, one thread as metaproxy by
//!   default) answering the same number of bytes, reached directly;
//! * the role's credentials through metaproxy, with an IMDSv2 token (PUT
//!   once) and without one (the tokenless path).
//!
//! Then: throughput with 1, 4 and 16 concurrent clients against nginx and
//! metaproxy, in alternating turns; the daemon's CPU time per request; its
//! RSS idle, with more live containers (real ones, the rest extrapolated
//! and said so), and per connection with 4000 open from one container:
//! silent ones, ones kept alive after a request, and a flood of slow and
//! kept-alive ones (each from a fresh daemon); the probe's cost per connect
//! from the kernel's own BPF statistics and a connect-only loop with the
//! probe attached and detached, in turns; and AssumeRole calls for the
//! role under all that load.
//!
//! A table for people, `--json` for machines. Figures, not pass/fail.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use metaproxy_tests::{
    bed::{Container, E2eBed, ROLE_DEPLOY},
    docker::GATEWAY,
    process::{spawn_in, ChildGuard},
    wait_for,
};
use serde_json::{json, Value};

/// Rounds per latency run (a round is one request to each target), and runs.
const ROUNDS: usize = 1000;
const RUNS: usize = 5;
const IMDS: &str = "169.254.169.254:80";
const NGINX_PORT: u16 = 8081;
const HYPER_PORT: u16 = 8080;
/// Seconds per throughput run, and alternating runs of nginx and metaproxy
/// per client count (the medians are reported).
const THROUGHPUT_SECS: u64 = 2;
const THROUGHPUT_TURNS: usize = 3;
/// Live containers started for the memory figure (1000 would take many
/// minutes on 2 cores; that figure is extrapolated from these).
const LIVE_CONTAINERS: usize = 100;
const FLOOD: usize = 4000;
/// Turns of the connect-only loop with the probe attached, then detached.
const CONNECT_TURNS: usize = 3;
/// The pause before each of those loops.
const SETTLE: Duration = Duration::from_secs(2);

mod answer;
mod traffic;

use answer::{Percentiles, TargetRun};

pub fn run(
    json_out: bool,
    perf: bool,
    traffic_only: bool,
    latency_only: bool,
) -> anyhow::Result<()> {
    let release = prepare()?;
    // The kernel counts run time and runs of every BPF program while this
    // is held.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| anyhow::anyhow!("enabling BPF run-time statistics: {e}"))?;
    if traffic_only {
        let bed = E2eBed::start(&[])?;
        let report = traffic::measure(&bed)?;
        if json_out {
            println!("{}", serde_json::to_string_pretty(&report.to_json())?);
        } else {
            print!("{report}");
        }
        return Ok(());
    }
    let mut bed = E2eBed::start(&[
        "--max-connections",
        "8192",
        "--max-connections-per-container",
        "8192",
    ])?;
    let rss_idle = rss_kib(&bed)?;
    let job = Job::start(&bed)?;
    let floor = Floor::start(&bed, &release, job.doc_len)?;

    let targets = targets(&floor, &job);
    let latency = latency(&bed, &job, &targets)?;
    if latency_only {
        let mut table = machine();
        write_latency(&mut table, &latency_rows(&targets, &latency))?;
        println!(
            "{table}\ndaemon CPU per request: {:.0} us",
            latency.cpu_us_per_request
        );
        return Ok(());
    }
    let throughput = throughput(&bed, &job, &floor, perf)?;
    let assume_role_under_load = assume_role_calls(&bed);
    let probe = probe_cost(&job, &floor)?;
    let live = live_containers(&bed, &job)?;
    let held = held_figures(&mut bed, &job)?;
    let connect_loop = connect_loop(&mut bed, &job, &floor)?;
    let traffic = traffic::measure(&bed)?;

    let report = report(
        &Figures {
            targets: &targets,
            latency: &latency,
            throughput,
            rss_idle,
            live: &live,
            held: &held,
            probe: &probe,
            connect_loop,
            assume_role_under_load,
        },
        traffic,
    );
    if json_out {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{report}");
    }
    Ok(())
}

/// The test bed's prerequisites, root, and release binaries for it: the
/// directory they are in.
fn prepare() -> anyhow::Result<PathBuf> {
    crate::setup::for_bed()?;
    crate::setup::apt_without_starting(&["nginx-light"])?;
    anyhow::ensure!(
        crate::test::is_root(),
        "the benchmark needs root (namespaces, cgroups, BPF, dockerd)"
    );
    let bins = crate::build::bed_binaries(true)?;
    let release = bins.dir.clone();
    crate::clean::run_with(&bins.metaproxy)?;
    metaproxy_tests::use_binaries(bins);
    Ok(release)
}

/// The job container every figure is measured from, with the role's
/// credentials fetched once.
struct Job {
    c: Container,
    /// An IMDSv2 token header for it.
    auth: String,
    creds_path: String,
    /// The size of the credentials document, which the floor serves too.
    doc_len: usize,
}

impl Job {
    fn start(bed: &E2eBed) -> anyhow::Result<Self> {
        let c = bed.container("bench", bed.base_image(), &[("IAM_ROLE", ROLE_DEPLOY)], &[])?;
        let auth = c.token_header(21600);
        let creds_path = format!("/latest/meta-data/iam/security-credentials/{ROLE_DEPLOY}");
        let doc = c.imds("GET", &creds_path, &[&auth]);
        let doc_len = answer::imds_body(&doc, "credentials")?.len();
        Ok(Self {
            c,
            auth,
            creds_path,
            doc_len,
        })
    }
}

/// The floor: nginx, one worker, and a minimal hyper server, both serving
/// the same number of bytes as the credentials document.
struct Floor {
    // Stopped in this order, the reverse of their start.
    _hello: ChildGuard,
    _nginx: ChildGuard,
    nginx_addr: String,
    hyper_addr: String,
}

impl Floor {
    fn start(bed: &E2eBed, release: &Path, doc_len: usize) -> anyhow::Result<Self> {
        let dir = bed.scratch().join("nginx");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("creds.json"), "x".repeat(doc_len))?;
        std::fs::write(
            dir.join("nginx.conf"),
            format!(
                "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 16384; }}\n\
                 http {{ access_log off; keepalive_timeout 5;\n\
                   server {{ listen {GATEWAY}:{NGINX_PORT};\n\
                     location = /creds {{ default_type application/json; alias {d}/creds.json; }} }} }}\n",
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
        let mut hello = Command::new(release.join("mp-hello"));
        hello
            .arg(format!("{GATEWAY}:{HYPER_PORT}"))
            .arg(doc_len.to_string());
        let hello = spawn_in(hello, &bed.ns.path(), &bed.cg.child("services/hello")?)?;
        for port in [NGINX_PORT, HYPER_PORT] {
            wait_for("the floor's servers", Duration::from_secs(10), || {
                let addr: std::net::SocketAddr = format!("{GATEWAY}:{port}").parse().ok()?;
                bed.ns
                    .run(move || std::net::TcpStream::connect(addr).ok())
                    .ok()
                    .flatten()
            })?;
        }
        Ok(Self {
            _hello: hello,
            _nginx: nginx,
            nginx_addr: format!("{GATEWAY}:{NGINX_PORT}"),
            hyper_addr: format!("{GATEWAY}:{HYPER_PORT}"),
        })
    }
}

/// The latency rows: a name, and the `mp-client interleave` target
/// (`addr|path[|header]`).
fn targets(floor: &Floor, job: &Job) -> [(&'static str, String); 4] {
    let (auth, creds_path) = (&job.auth, &job.creds_path);
    [
        ("nginx", format!("{}|/creds", floor.nginx_addr)),
        (
            "metaproxy, IMDSv2 token",
            format!("{IMDS}|{creds_path}|{auth}"),
        ),
        ("metaproxy, tokenless", format!("{IMDS}|{creds_path}")),
        (
            "hyper (ours)",
            format!("{}|/latest/meta-data/instance-id", floor.hyper_addr),
        ),
    ]
}

/// Every latency run's percentiles, by target; and the daemon's CPU time
/// per request over them.
struct Latency {
    runs: BTreeMap<&'static str, Vec<TargetRun>>,
    cpu_us_per_request: f64,
}

impl Latency {
    /// The median over the runs of one target's percentile `pick`.
    fn median(&self, name: &str, pick: impl Fn(&Percentiles) -> Option<f64>) -> f64 {
        median_of(
            self.runs
                .get(name)
                .into_iter()
                .flatten()
                .filter_map(|r| pick(&r.percentiles))
                .collect(),
        )
    }
}

/// Latency. Each round is one request to every target, in an order
/// shuffled per round, so all of them meet the same moment of a shared
/// machine and the same neighbours.
fn latency(bed: &E2eBed, job: &Job, targets: &[(&'static str, String)]) -> anyhow::Result<Latency> {
    let cpu_before = cpu_ticks(bed)?;
    let mut runs: BTreeMap<&str, Vec<TargetRun>> = BTreeMap::new();
    for run in 0..RUNS {
        // A seed per run: five orders, repeatable.
        let (rounds, seed) = (ROUNDS.to_string(), run.to_string());
        let mut args = vec!["/mp-client", "interleave", &rounds, &seed];
        args.extend(targets.iter().map(|(_, t)| t.as_str()));
        let answered = answer::interleave(&job.c.exec(&args)?)?;
        anyhow::ensure!(
            answered.len() == targets.len(),
            "latency: {} targets answered of {}",
            answered.len(),
            targets.len()
        );
        for ((name, _), run) in targets.iter().zip(answered) {
            runs.entry(name).or_default().push(run);
        }
    }
    let cpu_after = cpu_ticks(bed)?;
    let mp_requests = 2 * RUNS * ROUNDS;
    let cpu_us_per_request = (cpu_after - cpu_before) as f64 * 1e6 / clk_tck() / mp_requests as f64;
    Ok(Latency {
        runs,
        cpu_us_per_request,
    })
}

/// Throughput with 1, 4 and 16 clients, nginx and metaproxy in alternating
/// turns (profiled with perf, when asked, at 16 clients).
fn throughput(
    bed: &E2eBed,
    job: &Job,
    floor: &Floor,
    perf: bool,
) -> anyhow::Result<Vec<ThroughputRow>> {
    let (c, auth, creds_path) = (&job.c, job.auth.as_str(), job.creds_path.as_str());
    let mut throughput = Vec::new();
    for clients in [1usize, 4, 16] {
        // Alternating turns, so drift of the shared machine meets both.
        let (mut floor_rates, mut ours) = (Vec::new(), Vec::new());
        for _ in 0..THROUGHPUT_TURNS {
            floor_rates.push(rate(c, clients, &floor.nginx_addr, "/creds", &[])?);
            ours.push(rate(c, clients, IMDS, creds_path, &[auth])?);
        }
        let (floor_rate, ours) = (median_of(floor_rates), median_of(ours));
        throughput.push(ThroughputRow {
            clients,
            nginx_per_s: floor_rate,
            metaproxy_per_s: ours,
            ratio: ours / floor_rate,
        });
        if perf && clients == 16 {
            profile(bed, || rate(c, clients, IMDS, creds_path, &[auth]))?;
        }
    }
    Ok(throughput)
}

/// Requests per second from `clients` concurrent clients in `c`, over
/// [`THROUGHPUT_SECS`].
fn rate(
    c: &Container,
    clients: usize,
    addr: &str,
    path: &str,
    headers: &[&str],
) -> anyhow::Result<f64> {
    let (n, secs) = (clients.to_string(), THROUGHPUT_SECS.to_string());
    let mut args = vec!["/mp-client", "throughput", addr, path, &n, &secs];
    args.extend_from_slice(headers);
    answer::per_second(&c.exec(&args)?, addr)
}

/// An extra throughput run under perf, never a measured one (perf slows
/// it): the daemon's profile goes to target/bench-perf.txt.
fn profile(bed: &E2eBed, run: impl FnOnce() -> anyhow::Result<f64>) -> anyhow::Result<()> {
    let mut p = Command::new("perf")
        .args(["record", "-F", "999", "-g", "-o"])
        .arg(crate::workspace_root().join("target/bench-perf.data"))
        .arg("-p")
        .arg(bed.daemon.pid().to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    run()?;
    // SIGINT: perf writes its data and exits.
    let _ = Command::new("kill")
        .args(["-INT", &p.id().to_string()])
        .status();
    let _ = p.wait();
    let report = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--percent-limit",
            "1",
            "-i",
        ])
        .arg(crate::workspace_root().join("target/bench-perf.data"))
        .output()?;
    let out = crate::workspace_root().join("target/bench-perf.txt");
    std::fs::write(&out, &report.stdout)?;
    eprintln!(
        "perf profile of the daemon at 16 clients: {}",
        out.display()
    );
    Ok(())
}

/// AssumeRole calls for the job's role so far.
fn assume_role_calls(bed: &E2eBed) -> usize {
    let role = metaproxy_tests::bed::role_arn(ROLE_DEPLOY);
    bed.moto
        .assume_role_calls()
        .iter()
        .filter(|(arn, _)| *arn == role)
        .count()
}

/// The probe's cost over one connect-only loop, from the kernel's own
/// statistics.
struct LoopStats {
    /// The loop's percentiles.
    connects: Percentiles,
    /// What the probe's programs took per connect, in ns.
    probe_ns: f64,
    /// ns per run of `mp_connect4`.
    connect4_ns: f64,
    /// Runs of `mp_sock_ops` per connect.
    sock_ops_runs: f64,
}

/// The probe's cost per connect, from the kernel's own statistics: over a
/// connect-only loop to another address (what every connect of a job
/// pays) and one through the redirect (what an IMDS connect pays), against
/// a direct connect.
struct ProbeCost {
    direct: LoopStats,
    redirected: LoopStats,
}

fn probe_cost(job: &Job, floor: &Floor) -> anyhow::Result<ProbeCost> {
    Ok(ProbeCost {
        direct: loop_stats(&job.c, &floor.nginx_addr)?,
        redirected: loop_stats(&job.c, IMDS)?,
    })
}

fn loop_stats(c: &Container, addr: &str) -> anyhow::Result<LoopStats> {
    let before = prog_stats();
    let v = connects(c, addr)?;
    let after = prog_stats();
    let per_run = |name: &str| {
        let (t0, n0) = before.get(name).copied().unwrap_or_default();
        let (t1, n1) = after.get(name).copied().unwrap_or_default();
        let runs = n1.saturating_sub(n0);
        let ns = if runs == 0 {
            0.0
        } else {
            (t1 - t0) as f64 / runs as f64
        };
        (ns, runs as f64 / 2000.0)
    };
    let (c4, c4_per) = per_run("mp_connect4");
    let (so, so_per) = per_run("mp_sock_ops");
    Ok(LoopStats {
        connects: v,
        probe_ns: c4 * c4_per + so * so_per,
        connect4_ns: c4,
        sock_ops_runs: so_per,
    })
}

/// The daemon's RSS before [`LIVE_CONTAINERS`] more live containers, and
/// what each added.
struct Live {
    rss_before_kib: u64,
    per_container_kib: f64,
}

/// Memory: more live containers, each having fetched its credentials.
fn live_containers(bed: &E2eBed, job: &Job) -> anyhow::Result<Live> {
    let rss_before_kib = rss_kib(bed)?;
    let mut live: Vec<Container> = Vec::new();
    for i in 0..LIVE_CONTAINERS {
        let extra = bed.container(
            &format!("live-{i}"),
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &[],
        )?;
        let a = extra.token_header(60);
        let _ = extra.imds("GET", &job.creds_path, &[&a]);
        live.push(extra);
    }
    let rss_with_containers = rss_kib(bed)?;
    let per_container_kib =
        rss_with_containers.saturating_sub(rss_before_kib) as f64 / LIVE_CONTAINERS as f64;
    drop(live);
    Ok(Live {
        rss_before_kib,
        per_container_kib,
    })
}

/// The daemon's memory with [`FLOOD`] connections from one container.
struct HeldFigures {
    /// Connections that send nothing.
    idle: Held,
    /// Connections kept alive after one request.
    kept: Held,
    /// A flood of slow and keep-alive ones.
    slow: Held,
}

fn held_figures(bed: &mut E2eBed, job: &Job) -> anyhow::Result<HeldFigures> {
    let (c, creds_path) = (&job.c, job.creds_path.as_str());
    let flood = FLOOD.to_string();
    let idle = held_connections(bed, c, &["idle", IMDS, &flood, "40"])?;
    let kept = held_connections(bed, c, &["keepalive", IMDS, creds_path, &flood, "40"])?;
    let slow = held_connections(bed, c, &["flood", IMDS, &flood, "40"])?;
    Ok(HeldFigures { idle, kept, slow })
}

/// The connect-only loop's p50 with the probe attached and detached: the
/// medians over [`CONNECT_TURNS`] turns.
struct ConnectLoop {
    attached: f64,
    detached: f64,
}

/// The connect-only loop with the probe attached and detached, in turns
/// (detaching needs the daemon stopped, so they cannot interleave finer),
/// each after a moment for the machine to settle: a daemon stopping or
/// starting, and maps being freed, leave work behind that would land on
/// whichever loop came next.
fn connect_loop(bed: &mut E2eBed, job: &Job, floor: &Floor) -> anyhow::Result<ConnectLoop> {
    let (c, nginx_addr) = (&job.c, floor.nginx_addr.as_str());
    let (mut attached, mut detached) = (Vec::new(), Vec::new());
    for _ in 0..CONNECT_TURNS {
        std::thread::sleep(SETTLE);
        attached.push(connect_p50(c, nginx_addr)?);
        bed.daemon.terminate();
        let out = bed.daemon.detach()?;
        anyhow::ensure!(
            out.status.success(),
            "metaproxy detach failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(SETTLE);
        detached.push(connect_p50(c, nginx_addr)?);
        bed.daemon.restart()?;
    }
    Ok(ConnectLoop {
        attached: median_of(attached),
        detached: median_of(detached),
    })
}

/// Everything measured, for [`report`].
struct Figures<'a> {
    targets: &'a [(&'static str, String)],
    latency: &'a Latency,
    throughput: Vec<ThroughputRow>,
    rss_idle: u64,
    live: &'a Live,
    held: &'a HeldFigures,
    probe: &'a ProbeCost,
    connect_loop: ConnectLoop,
    assume_role_under_load: usize,
}

/// One latency row: the medians over the runs of a target's percentiles,
/// and their ratios to nginx's.
struct LatencyRow {
    name: &'static str,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p50_ratio: f64,
    p99_ratio: f64,
}

/// Requests per second from one number of clients: the medians over the
/// turns.
#[derive(Clone)]
struct ThroughputRow {
    clients: usize,
    nginx_per_s: f64,
    metaproxy_per_s: f64,
    ratio: f64,
}

/// The daemon's memory, in KiB.
struct RssKib {
    idle: u64,
    per_live_container: f64,
    with_100_containers_extrapolated: f64,
    with_1000_containers_extrapolated: f64,
    idle_connections: f64,
    with_idle_connections: u64,
    per_idle_connection: f64,
    keep_alive_connections: f64,
    with_keep_alive_connections: u64,
    per_keep_alive_connection: f64,
    flood_connections: f64,
    under_flood: u64,
    per_flood_connection: f64,
}

/// The probe's cost per connect: an ordinary one (to nginx) and one
/// redirected to metaproxy.
struct ProbeFigures {
    ordinary_connect_ns: f64,
    ordinary_connect4_ns_per_run: f64,
    ordinary_sock_ops_runs_per_connection: f64,
    ordinary_share_of_a_direct_connect: f64,
    redirected_connect_ns: f64,
    redirected_connect4_ns_per_run: f64,
    redirected_sock_ops_runs_per_connection: f64,
    redirected_share_of_a_direct_connect: f64,
    direct_connect_p50_us: f64,
    redirected_connect_p50_us: Option<f64>,
    connect_p50_us_attached: f64,
    connect_p50_us_detached: f64,
}

/// The report: `--json` prints [`Report::to_json`], people its table
/// (`Display`).
struct Report {
    machine: String,
    latency: Vec<LatencyRow>,
    latency_runs: BTreeMap<&'static str, Vec<TargetRun>>,
    throughput: Vec<ThroughputRow>,
    cpu_us_per_request: f64,
    rss_kib: RssKib,
    probe: ProbeFigures,
    assume_role_calls_for_the_role_under_load: usize,
    traffic: traffic::Report,
}

/// The latency table's rows: each target's medians, and their ratios to
/// nginx's.
fn latency_rows(targets: &[(&'static str, String)], latency: &Latency) -> Vec<LatencyRow> {
    let floor_p50 = latency.median("nginx", |p| p.p50_us);
    let floor_p99 = latency.median("nginx", |p| p.p99_us);
    targets
        .iter()
        .map(|&(name, _)| {
            let p50_us = latency.median(name, |p| p.p50_us);
            let p99_us = latency.median(name, |p| p.p99_us);
            LatencyRow {
                name,
                p50_us,
                p90_us: latency.median(name, |p| p.p90_us),
                p99_us,
                p50_ratio: p50_us / floor_p50,
                p99_ratio: p99_us / floor_p99,
            }
        })
        .collect()
}

fn report(f: &Figures<'_>, traffic: traffic::Report) -> Report {
    let latency = f.latency;
    let rows = latency_rows(f.targets, latency);
    let (live, held, probe) = (f.live, f.held, f.probe);
    let (direct, redirected) = (&probe.direct, &probe.redirected);
    let direct_connect_us = direct.connects.p50_us.unwrap_or(f64::NAN);
    Report {
        machine: machine(),
        latency: rows,
        latency_runs: latency.runs.clone(),
        throughput: f.throughput.clone(),
        cpu_us_per_request: latency.cpu_us_per_request,
        rss_kib: RssKib {
            idle: f.rss_idle,
            per_live_container: live.per_container_kib,
            with_100_containers_extrapolated: live.rss_before_kib as f64
                + 100.0 * live.per_container_kib,
            with_1000_containers_extrapolated: live.rss_before_kib as f64
                + 1000.0 * live.per_container_kib,
            idle_connections: held.idle.open,
            with_idle_connections: held.idle.rss_kib,
            per_idle_connection: held.idle.per_connection_kib(),
            keep_alive_connections: held.kept.open,
            with_keep_alive_connections: held.kept.rss_kib,
            per_keep_alive_connection: held.kept.per_connection_kib(),
            flood_connections: held.slow.open,
            under_flood: held.slow.rss_kib,
            per_flood_connection: held.slow.per_connection_kib(),
        },
        probe: ProbeFigures {
            ordinary_connect_ns: direct.probe_ns,
            ordinary_connect4_ns_per_run: direct.connect4_ns,
            ordinary_sock_ops_runs_per_connection: direct.sock_ops_runs,
            ordinary_share_of_a_direct_connect: direct.probe_ns / (direct_connect_us * 1000.0),
            redirected_connect_ns: redirected.probe_ns,
            redirected_connect4_ns_per_run: redirected.connect4_ns,
            redirected_sock_ops_runs_per_connection: redirected.sock_ops_runs,
            redirected_share_of_a_direct_connect: redirected.probe_ns
                / (direct_connect_us * 1000.0),
            direct_connect_p50_us: direct_connect_us,
            redirected_connect_p50_us: redirected.connects.p50_us,
            connect_p50_us_attached: f.connect_loop.attached,
            connect_p50_us_detached: f.connect_loop.detached,
        },
        assume_role_calls_for_the_role_under_load: f.assume_role_under_load,
        traffic,
    }
}

impl Report {
    /// What `--json` prints (keys in sorted order, as a JSON object's).
    fn to_json(&self) -> Value {
        let latency: Vec<Value> = self
            .latency
            .iter()
            .map(|r| {
                json!({
                    "name": r.name,
                    "p50_us": r.p50_us,
                    "p90_us": r.p90_us,
                    "p99_us": r.p99_us,
                    "p50_ratio": r.p50_ratio,
                    "p99_ratio": r.p99_ratio,
                })
            })
            .collect();
        let latency_runs: BTreeMap<&str, Vec<Value>> = self
            .latency_runs
            .iter()
            .map(|(name, runs)| {
                let runs = runs
                    .iter()
                    .map(|r| r.percentiles.to_json(r.failed))
                    .collect();
                (*name, runs)
            })
            .collect();
        let throughput: Vec<Value> = self
            .throughput
            .iter()
            .map(|t| {
                json!({
                    "clients": t.clients,
                    "nginx_per_s": t.nginx_per_s,
                    "metaproxy_per_s": t.metaproxy_per_s,
                    "ratio": t.ratio,
                })
            })
            .collect();
        let (m, p) = (&self.rss_kib, &self.probe);
        json!({
            "machine": self.machine,
            "latency": latency,
            "latency_runs": latency_runs,
            "throughput": throughput,
            "cpu_us_per_request": self.cpu_us_per_request,
            "rss_kib": {
                "idle": m.idle,
                "per_live_container": m.per_live_container,
                "with_100_containers_extrapolated": m.with_100_containers_extrapolated,
                "with_1000_containers_extrapolated": m.with_1000_containers_extrapolated,
                "idle_connections": m.idle_connections,
                "with_idle_connections": m.with_idle_connections,
                "per_idle_connection": m.per_idle_connection,
                "keep_alive_connections": m.keep_alive_connections,
                "with_keep_alive_connections": m.with_keep_alive_connections,
                "per_keep_alive_connection": m.per_keep_alive_connection,
                "flood_connections": m.flood_connections,
                "under_flood": m.under_flood,
                "per_flood_connection": m.per_flood_connection,
            },
            "probe": {
                "ordinary_connect_ns": p.ordinary_connect_ns,
                "ordinary_connect4_ns_per_run": p.ordinary_connect4_ns_per_run,
                "ordinary_sock_ops_runs_per_connection": p.ordinary_sock_ops_runs_per_connection,
                "ordinary_share_of_a_direct_connect": p.ordinary_share_of_a_direct_connect,
                "redirected_connect_ns": p.redirected_connect_ns,
                "redirected_connect4_ns_per_run": p.redirected_connect4_ns_per_run,
                "redirected_sock_ops_runs_per_connection": p.redirected_sock_ops_runs_per_connection,
                "redirected_share_of_a_direct_connect": p.redirected_share_of_a_direct_connect,
                "direct_connect_p50_us": p.direct_connect_p50_us,
                "redirected_connect_p50_us": p.redirected_connect_p50_us,
                "connect_p50_us_attached": p.connect_p50_us_attached,
                "connect_p50_us_detached": p.connect_p50_us_detached,
            },
            "assume_role_calls_for_the_role_under_load": self.assume_role_calls_for_the_role_under_load,
            "traffic": self.traffic.to_json(),
        })
    }
}

/// The tables for people: this report's, then the traffic report's.
/// The credential GET's table.
fn write_latency(out: &mut impl fmt::Write, rows: &[LatencyRow]) -> fmt::Result {
    writeln!(
        out,
        "\ncredential GET from a job container: connect + GET + close; {RUNS} runs of {ROUNDS} rounds, each round one request to every row in a shuffled order (medians of the runs' percentiles, microseconds)"
    )?;
    writeln!(
        out,
        "{:<28} {:>8} {:>8} {:>8} {:>11} {:>11}",
        "", "p50", "p90", "p99", "p50/nginx", "p99/nginx"
    )?;
    for row in rows {
        writeln!(
            out,
            "{:<28} {:>8.0} {:>8.0} {:>8.0} {:>10.2}x {:>10.2}x",
            row.name, row.p50_us, row.p90_us, row.p99_us, row.p50_ratio, row.p99_ratio,
        )?;
    }
    Ok(())
}

impl fmt::Display for Report {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(out, "\n{}", self.machine)?;
        write_latency(out, &self.latency)?;
        writeln!(
            out,
            "\nthroughput, connect + GET + close per request (requests/s)"
        )?;
        writeln!(
            out,
            "{:<10} {:>12} {:>12} {:>8}",
            "clients", "nginx", "metaproxy", "ratio"
        )?;
        for t in &self.throughput {
            writeln!(
                out,
                "{:<10} {:>12.0} {:>12.0} {:>7.2}x",
                t.clients, t.nginx_per_s, t.metaproxy_per_s, t.ratio
            )?;
        }
        let m = &self.rss_kib;
        writeln!(
            out,
            "\ndaemon CPU per request: {:.0} us",
            self.cpu_us_per_request
        )?;
        writeln!(
            out,
            "daemon RSS: idle {} KiB; {:.0} KiB per live container ({LIVE_CONTAINERS} real ones), so about {:.1} MiB with 100 and {:.1} MiB with 1000 (extrapolated)",
            m.idle,
            m.per_live_container,
            m.with_100_containers_extrapolated / 1024.0,
            m.with_1000_containers_extrapolated / 1024.0,
        )?;
        writeln!(
            out,
            "  per open connection: {:.1} KiB if it sends nothing ({:.0} open), {:.1} KiB kept alive after a request ({:.0} open), {:.1} KiB in a flood of half slow headers, half kept alive ({:.0} open, {:.0} KiB)",
            m.per_idle_connection,
            m.idle_connections,
            m.per_keep_alive_connection,
            m.keep_alive_connections,
            m.per_flood_connection,
            m.flood_connections,
            m.under_flood as f64,
        )?;
        let p = &self.probe;
        writeln!(
            out,
            "probe (kernel.bpf_stats), per connect: {:.0} ns for an ordinary one ({:.2}% of a direct connect, {:.1} us p50), {:.0} ns for an IMDS one ({:.1}%)",
            p.ordinary_connect_ns,
            100.0 * p.ordinary_share_of_a_direct_connect,
            p.direct_connect_p50_us,
            p.redirected_connect_ns,
            100.0 * p.redirected_share_of_a_direct_connect,
        )?;
        writeln!(
            out,
            "connect-only loop to nginx, p50 (median of {CONNECT_TURNS} turns, attached then detached): {:.1} us with the probe attached, {:.1} us detached",
            p.connect_p50_us_attached,
            p.connect_p50_us_detached,
        )?;
        writeln!(
            out,
            "AssumeRole calls for the role under all of the above: {}",
            self.assume_role_calls_for_the_role_under_load
        )?;
        writeln!(out)?;
        write!(out, "{}", self.traffic)
    }
}

/// The daemon's RSS with many connections open from one container.
struct Held {
    /// The most connections seen open at once.
    open: f64,
    /// RSS then, and before they were opened.
    rss_kib: u64,
    rss_before_kib: u64,
}

impl Held {
    fn per_connection_kib(&self) -> f64 {
        self.rss_kib.saturating_sub(self.rss_before_kib) as f64 / self.open.max(1.0)
    }
}

/// Runs `mp-client ARGS` in `c` in the background and samples the daemon
/// while its connections open; then waits for the daemon to close them
/// (its idle timeout).
fn held_connections(bed: &mut E2eBed, c: &Container, args: &[&str]) -> anyhow::Result<Held> {
    // A fresh daemon for each figure, warmed by one request: memory freed
    // by the previous figure's connections would otherwise be reused and
    // hide what these cost.
    bed.daemon.restart()?;
    let warm = c.imds(
        "GET",
        &format!("/latest/meta-data/iam/security-credentials/{ROLE_DEPLOY}"),
        &[],
    );
    answer::imds_body(&warm, "warm-up request")?;
    let rss_before_kib = rss_kib(bed)?;
    let mut cmd = vec!["/mp-client"];
    cmd.extend_from_slice(args);
    c.exec_detached(&cmd)?;
    let mut held = Held {
        open: 0.0,
        rss_kib: rss_before_kib,
        rss_before_kib,
    };
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < until && held.open < FLOOD as f64 {
        std::thread::sleep(Duration::from_secs(1));
        let n = bed.daemon.metric("metaproxy_open_connections");
        if n >= held.open {
            held.open = n;
            held.rss_kib = rss_kib(bed)?;
        }
    }
    wait_for(
        "the held connections to go",
        Duration::from_secs(60),
        || (bed.daemon.metric("metaproxy_open_connections") < 10.0).then_some(()),
    )?;
    Ok(held)
}

/// (run time in ns, runs) of our programs, by name.
fn prog_stats() -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    for info in aya::programs::loaded_programs().flatten() {
        if let Some(name) = info.name_as_str() {
            if name.starts_with("mp_") {
                let e = out.entry(name.to_string()).or_insert((0, 0));
                e.0 += info.run_time().as_nanos() as u64;
                e.1 += info.run_count();
            }
        }
    }
    out
}

fn rss_kib(bed: &E2eBed) -> anyhow::Result<u64> {
    metaproxy_tests::process::vm_rss_kib(bed.daemon.pid())
}

/// A connect-only loop of 2000 connects from `c` to `addr`: its percentiles.
fn connects(c: &Container, addr: &str) -> anyhow::Result<Percentiles> {
    Percentiles::read(&c.exec(&["/mp-client", "connects", addr, "2000"])?)
}

/// The p50 of [`connects`].
fn connect_p50(c: &Container, addr: &str) -> anyhow::Result<f64> {
    connects(c, addr)?
        .p50_us
        .ok_or_else(|| anyhow::anyhow!("connect loop to {addr}: no connect succeeded"))
}

fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The daemon's user + system time, in clock ticks.
fn cpu_ticks(bed: &E2eBed) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", bed.daemon.pid()))?;
    // Fields after the parenthesised comm: utime is the 14th field overall.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(n(11) + n(12))
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("machine: {cpus} CPUs ({model}), kernel {}", kernel.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(v: &Value) -> Vec<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    fn example() -> Report {
        let p = Percentiles {
            p50_us: Some(100.0),
            p90_us: Some(120.0),
            p99_us: None,
        };
        Report {
            machine: "machine: 2 CPUs (test), kernel 6.1".into(),
            latency: vec![LatencyRow {
                name: "nginx",
                p50_us: 100.0,
                p90_us: 120.0,
                p99_us: 150.0,
                p50_ratio: 1.0,
                p99_ratio: 1.0,
            }],
            latency_runs: BTreeMap::from([(
                "nginx",
                vec![TargetRun {
                    percentiles: p,
                    failed: 0,
                }],
            )]),
            throughput: vec![
                ThroughputRow {
                    clients: 1,
                    nginx_per_s: 5000.0,
                    metaproxy_per_s: 4500.0,
                    ratio: 0.9,
                },
                ThroughputRow {
                    clients: 16,
                    nginx_per_s: 12000.0,
                    metaproxy_per_s: 11000.0,
                    ratio: 0.92,
                },
            ],
            cpu_us_per_request: 30.0,
            rss_kib: RssKib {
                idle: 9000,
                per_live_container: 2.0,
                with_100_containers_extrapolated: 9200.0,
                with_1000_containers_extrapolated: 11000.0,
                idle_connections: 4000.0,
                with_idle_connections: 20000,
                per_idle_connection: 2.7,
                keep_alive_connections: 4000.0,
                with_keep_alive_connections: 30000,
                per_keep_alive_connection: 5.2,
                flood_connections: 4000.0,
                under_flood: 25000,
                per_flood_connection: 4.0,
            },
            probe: ProbeFigures {
                ordinary_connect_ns: 300.0,
                ordinary_connect4_ns_per_run: 150.0,
                ordinary_sock_ops_runs_per_connection: 2.0,
                ordinary_share_of_a_direct_connect: 0.01,
                redirected_connect_ns: 500.0,
                redirected_connect4_ns_per_run: 250.0,
                redirected_sock_ops_runs_per_connection: 2.0,
                redirected_share_of_a_direct_connect: 0.02,
                direct_connect_p50_us: 30.0,
                redirected_connect_p50_us: None,
                connect_p50_us_attached: 31.0,
                connect_p50_us_detached: 30.5,
            },
            assume_role_calls_for_the_role_under_load: 1,
            traffic: traffic::example(),
        }
    }

    #[test]
    fn the_json_keeps_its_keys_and_the_table_its_columns() {
        let report = example();
        let v = report.to_json();
        assert_eq!(
            keys(&v),
            [
                "assume_role_calls_for_the_role_under_load",
                "cpu_us_per_request",
                "latency",
                "latency_runs",
                "machine",
                "probe",
                "rss_kib",
                "throughput",
                "traffic"
            ]
        );
        assert_eq!(
            keys(&v["latency"][0]),
            [
                "name",
                "p50_ratio",
                "p50_us",
                "p90_us",
                "p99_ratio",
                "p99_us"
            ]
        );
        assert_eq!(
            v["latency_runs"]["nginx"][0],
            json!({ "p50_us": 100.0, "p90_us": 120.0, "p99_us": null, "failed": 0 })
        );
        assert_eq!(
            keys(&v["throughput"][0]),
            ["clients", "metaproxy_per_s", "nginx_per_s", "ratio"]
        );
        assert_eq!(v["throughput"][0]["clients"], 1);
        assert_eq!(keys(&v["rss_kib"]).len(), 13);
        assert_eq!(v["rss_kib"]["under_flood"], 25000);
        assert_eq!(keys(&v["probe"]).len(), 12);
        assert_eq!(v["probe"]["redirected_connect_p50_us"], Value::Null);
        assert_eq!(
            keys(&v["traffic"]),
            ["budget", "machine", "programs", "rows"]
        );
        let table = report.to_string();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "");
        assert_eq!(lines[1], "machine: 2 CPUs (test), kernel 6.1");
        // The throughput rows line up under their header.
        let header = lines.iter().position(|l| l.starts_with("clients")).unwrap();
        let end = |l: &str| l.find("nginx").map(|i| i + "nginx".len());
        let nginx_ends = end(lines[header]).unwrap();
        for (row, figure) in lines[header + 1..header + 3].iter().zip(["5000", "12000"]) {
            assert_eq!(
                row.find(figure).map(|i| i + figure.len()),
                Some(nginx_ends),
                "{table}"
            );
        }
        assert!(table.contains("AssumeRole calls for the role under all of the above: 1\n\nWhat a job's ordinary traffic pays"), "{table}");
    }
}

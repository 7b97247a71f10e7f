//! `cargo xtask`: the project's chores in one binary.
//!
//! * `setup` - install what a fresh machine lacks (quiet when nothing is)
//! * `demo`  - the product end to end in a throwaway bed
//! * `bench` - metaproxy against nginx: latency, throughput, CPU, memory,
//!   the probe's cost
//! * `test`  - unit tests, then the privileged end-to-end tests
//! * `fuzz`  - a short cargo-fuzz pass over each target in `fuzz/`
//! * `lint`  - the import rules between the daemon's rooms, no glob imports
//!   outside tests, every test the threat model names exists
//! * `package` - the Debian package (cargo-deb)
//! * `clean` - remove what a killed test run left behind
mod arm64;
mod bench;
mod build;
mod clean;
mod demo;
mod fuzz;
mod lint;
mod package;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain pieces and packages the build and tests need.
    Setup,
    /// Show it working: two job containers, one with a role, one without.
    Demo,
    /// Measure metaproxy against nginx in the same run (figures, ratios).
    Bench {
        /// One JSON document instead of the table.
        #[arg(long)]
        json: bool,
        /// Profile the daemon with perf at 16 clients
        /// (target/bench-perf.txt).
        #[arg(long)]
        perf: bool,
        /// Only what a job's ordinary traffic pays: a covered and a bare
        /// job side by side.
        #[arg(long)]
        traffic: bool,
        /// Only the credential GET's latency table (a few minutes): for
        /// comparing builds, run in turns.
        #[arg(long)]
        latency: bool,
    },
    /// Run every test: unit tests, then the kernel and end-to-end suites.
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// Remove namespaces, cgroups, pins and processes left by killed runs.
    Clean,
    /// Check the import rules between the daemon's rooms, that no file
    /// outside tests globs its imports, and that every test
    /// docs/threat-model.md names exists.
    Lint,
    /// Build the Debian and RPM packages (target/debian/metaproxy_*.deb,
    /// target/generate-rpm/metaproxy-*.rpm).
    Package {
        /// Cargo profile of the packaged binary (arm64 is always release).
        #[arg(long, default_value = "release")]
        profile: String,
        /// Only this architecture: x86_64-unknown-linux-gnu or
        /// aarch64-unknown-linux-gnu (default: both).
        #[arg(long)]
        target: Option<String>,
    },
    /// Fuzz the request router, tokens, role policy and cgroup paths
    /// (cargo-fuzz, nightly), seeded from fuzz/corpus.
    Fuzz {
        /// How long to fuzz each target.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Only this target (router, token, policy_env, cgroup_path).
        target: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::run(),
        Cmd::Demo => demo::run(),
        Cmd::Bench {
            json,
            perf,
            traffic,
            latency,
        } => bench::run(json, perf, traffic, latency),
        Cmd::Test { filter } => test::run(filter.as_deref()),
        Cmd::Clean => clean::run(),
        Cmd::Lint => lint::run(),
        Cmd::Package { profile, target } => package::run(&profile, target.as_deref()),
        Cmd::Fuzz { seconds, target } => fuzz::run(seconds, target.as_deref()),
    }
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Runs a command, failing with its name if it fails.
pub fn run_cmd(cmd: &mut std::process::Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .map_err(|e| anyhow::anyhow!("running {cmd:?}: {e}"))?;
    anyhow::ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}

/// Whether `cmd` runs and exits 0 (output discarded).
pub fn succeeds(cmd: &mut std::process::Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

//! Command-line interface (clap derive types only). Every flag can also be
//! set through a `METAPROXY_*` environment variable.

pub mod commands;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::{
    config::flags::{AdminArgs, PinArgs, RunArgs},
    doctor::DoctorArgs,
};

#[derive(Debug, Parser)]
#[command(
    name = "metaproxy",
    version,
    about = "Per-container AWS credentials for CI jobs, by cgroup"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the probe and serve intercepted metadata requests.
    Run(Box<RunArgs>),
    /// List intercepted connections (from a running daemon).
    Connections(ConnectionsArgs),
    /// Show the running daemon's status (JSON): pid, probe generation, map
    /// sizes, connections. With `--redirect`: whether the redirect is in
    /// place (exit 0) or not (exit 1), daemon running or not.
    Status(StatusArgs),
    /// Remove the probe for good: containers' IMDS connects pass through
    /// again. Stop the daemon first.
    Detach(DetachArgs),
    /// The role policy file: check one, or explain a running container's
    /// decision rule by rule.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Check this runner host and its gitlab-runner configuration against
    /// what keeps metaproxy safe: one line per check with the fix; exit 1
    /// if any check fails.
    Doctor(DoctorArgs),
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file (exit 0), or print its first error with the
    /// line (exit 1).
    Check {
        /// The TOML file.
        file: PathBuf,
    },
    /// Print the running daemon's decision for a container (name or id),
    /// rule by rule.
    Explain {
        /// Container name or id.
        container: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Args)]
pub struct ConnectionsArgs {
    /// One JSON object per connection, one per line.
    #[arg(long, env = "METAPROXY_JSON")]
    pub json: bool,

    /// Keep printing connections as they arrive.
    #[arg(long, short, env = "METAPROXY_FOLLOW")]
    pub follow: bool,

    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only check that the redirect is pinned in the kernel, for scripts and
    /// for units that must not start before it (exit code 0 or 1).
    #[arg(long)]
    pub redirect: bool,

    #[command(flatten)]
    pub pins: PinArgs,

    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Debug, Args)]
pub struct DetachArgs {
    #[command(flatten)]
    pub pins: PinArgs,

    /// The running daemon's admin socket: detach refuses while it answers.
    #[command(flatten)]
    pub admin: AdminArgs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::flags::{DEFAULT_LISTEN, DEFAULT_PIN_DIR};
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_consistent_and_defaults_parse() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["metaproxy", "run"]).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(run.pins.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert!(run.listen6.is_none());
        assert_eq!(run.metrics, crate::ops::metrics::DEFAULT_ADDR);
    }
}

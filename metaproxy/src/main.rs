//! metaproxy: per-container AWS credentials for CI jobs, attributed by
//! cgroup in the kernel. `main` parses the command line, sets up logging and
//! dispatches; everything else lives in its own module.
#![forbid(unsafe_code)]

mod admin;
mod cgroup;
mod cli;
mod commands;
mod connlog;
mod credentials;
mod daemon;
mod identity;
mod imds;
mod netaddr;
mod policy;
mod probe;
mod server;

use clap::Parser as _;
use cli::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Run(args) => args.log_format,
        _ => LogFormat::Text,
    };
    init_tracing(log_format);
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| {
            runtime.block_on(async {
                match cli.command {
                    Command::Run(args) => daemon::run(args).await,
                    Command::Connections(args) => commands::connections(args).await,
                    Command::Status(args) => commands::status(args).await,
                    Command::Detach(args) => commands::detach(args),
                }
            })
        });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with its causes; no backtrace for an admin's mistake.
            eprintln!("metaproxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr; `METAPROXY_LOG` (or `RUST_LOG`) sets the filter. The
/// kernel programs' aya-log records arrive through the `log` bridge.
fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_env("METAPROXY_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

//! The `metaproxy` binary: parse the command line, set up logging, dispatch.
#![forbid(unsafe_code)]

use clap::Parser as _;
use metaproxy::{
    cli::commands,
    cli::{Cli, Command},
    config::RunConfig,
    daemon,
    ops::logging,
    ops::logging::LogFormat,
};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Run(args) => args.log_format,
        _ => LogFormat::Text,
    };
    let log_writer = logging::init(log_format);
    let threads = match &cli.command {
        Command::Run(args) => args.worker_threads,
        _ => 1,
    };
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let result = builder
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| {
            runtime.block_on(async {
                match cli.command {
                    Command::Run(args) => daemon::run(RunConfig::from_args(&args)?).await,
                    Command::Connections(args) => commands::connections(args).await,
                    Command::Status(args) => commands::status(args).await,
                    Command::Detach(args) => commands::detach(args),
                    Command::Policy(cmd) => commands::policy(cmd).await,
                    Command::Doctor(args) => metaproxy::doctor::doctor(args).await,
                }
            })
        });
    // Flush queued log lines before the final error.
    drop(log_writer);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with its causes; no backtrace for an admin's mistake.
            eprintln!("metaproxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

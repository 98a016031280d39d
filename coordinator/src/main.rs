//! The `guildhall` binary: parses flags, sets up logging, runs a command.
//! Errors end the process with one line on stderr: status 2 for bad flags,
//! 1 for everything else.

use clap::Parser;
use guildhall::cli::{self, Cli, Command, ConfigError};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet = matches!(
        cli.command,
        Command::Submit(_)
            | Command::Status(_)
            | Command::Trace(_)
            | Command::Worker(_)
            | Command::Schedule(_)
            | Command::Cancel(_)
            | Command::RateLimit(_)
            | Command::Scale(_)
            | Command::Healthcheck(_)
    );
    let log_default = if quiet { "warn" } else { "info" };
    guildhall::config::run_binary("guildhall", log_default, run(cli.command))
}

async fn run(command: Command) -> anyhow::Result<String> {
    match command {
        Command::Serve(args) => {
            let (config, listen) = args.coordinator.validate(&args.broker)?;
            let listener = bind(listen).await?;
            guildhall::serve::run(config, listener, shutdown_signal()).await?;
            Ok(String::new())
        }
        Command::Demo(args) => {
            guildhall::demo::run(args, shutdown_signal()).await?;
            Ok(String::new())
        }
        Command::Submit(args) => cli::submit::run(&args, shutdown_signal()).await,
        Command::Status(args) => Ok(cli::client::status(&args).await?),
        Command::Trace(args) => Ok(cli::client::trace(&args).await?),
        Command::Simulate(args) => guildhall::sim::run(&args),
        Command::Worker(args) => Ok(cli::client::worker(&args).await?),
        Command::Schedule(args) => cli::schedule::run(&args).await,
        Command::Cancel(args) => cli::cancel::run(&args).await,
        Command::RateLimit(args) => cli::rate_limit::run(&args).await,
        Command::Scale(args) => cli::scale::run(&args).await,
        Command::Healthcheck(args) => Ok(cli::health::run(&args).await?),
        Command::Bench(_) => Err(ConfigError(
            "`guildhall bench` moved to its own binary: run `guildhall-bench` (same subcommands and flags)".into(),
        )
        .into()),
    }
}

async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}

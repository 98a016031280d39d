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
            | Command::Healthcheck(_)
    );
    init_logging(if quiet { "warn" } else { "info" });
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(run(cli.command)) {
        Ok(output) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    // Error types here carry their cause in their own message: print it once.
    let line = e.to_string().replace('\n', " ");
    eprintln!("guildhall: error: {line}");
    if e.downcast_ref::<ConfigError>().is_some() {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}

fn init_logging(default: &str) {
    // lapin logs expected events (a passive probe's 404, a returned message
    // we handle) as errors; its failures reach us as values anyway, as do
    // the certificate errors rustls-platform-verifier also logs.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            "{default},lapin=off,rustls_platform_verifier=off"
        ))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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

//! `guildhall-agent`: the command-line entry point. Parses and validates the
//! flags (a bad value is one line on stderr and exit status 2), sets up
//! logging, and runs the agent until SIGTERM or SIGINT. A broker that cannot
//! be reached at start, or refuses the set-up in a way no retry can fix, is
//! one line and exit status 1; a broker lost later is reconnected to.

use anyhow::Context;
use clap::Parser;
use clap::error::ErrorKind;
use guildhall_agent::cli::{Cli, clap_error_line};
use guildhall_agent::config::one_line;
use std::process::ExitCode;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err)
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) =>
        {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => return fail(2, &clap_error_line(&err)),
    };
    let json_logs = cli.json_logs;
    let config = match cli.into_config() {
        Ok(config) => config,
        Err(err) => return fail(2, &err.to_string()),
    };
    init_logging(json_logs);
    match serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(1, &describe(&err)),
    }
}

fn serve(config: guildhall_agent::AgentConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let stop = signals().context("cannot install signal handlers")?;
        guildhall_agent::run_until(config, stop).await?;
        Ok(())
    })
}

/// Resolves with the name of the first SIGTERM or SIGINT received.
fn signals() -> std::io::Result<impl Future<Output = String>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{name} received: stopping gracefully");
        name.to_owned()
    })
}

fn init_logging(json: bool) {
    // lapin's own log lines repeat errors that reach the agent as results
    // anyway, and include expected ones (the 404 of a passive probe for a
    // queue that does not exist yet), so they are off unless RUST_LOG asks;
    // so are rustls-platform-verifier's, which repeat a certificate error
    // the connection reports anyway.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,lapin=off,amq_protocol=off,rustls_platform_verifier=off")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The error and its causes, skipping causes its message already quotes
/// (broker errors embed their source's text).
fn describe(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

fn fail(status: u8, message: &str) -> ExitCode {
    eprintln!("guildhall-agent: error: {}", one_line(message));
    ExitCode::from(status)
}

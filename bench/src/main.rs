//! The `guildhall-bench` binary: parses flags, sets up logging, runs one
//! benchmark and prints its report. Errors end the process with one line on
//! stderr: status 2 for bad flags, 1 for everything else.

use clap::Parser;
use guildhall::config::ConfigError;
use guildhall_bench::BenchArgs;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = BenchArgs::parse();
    init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(guildhall_bench::run(&args)) {
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
    eprintln!("guildhall-bench: error: {line}");
    if e.downcast_ref::<ConfigError>().is_some() {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}

fn init_logging() {
    // lapin logs expected events (a passive probe's 404, a returned message
    // we handle) as errors; its failures reach us as values anyway.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,lapin=off,rustls_platform_verifier=off")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

//! The `guildhall-bench` binary: parses flags, sets up logging, runs one
//! benchmark and prints its report. Errors end the process with one line on
//! stderr: status 2 for bad flags, 1 for everything else.

use clap::Parser;
use guildhall_bench::BenchArgs;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = BenchArgs::parse();
    guildhall::config::run_binary("guildhall-bench", "info", async move {
        guildhall_bench::run(&args).await
    })
}

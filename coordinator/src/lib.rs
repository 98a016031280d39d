//! Guildhall's coordinator and command line.
//!
//! # Layout
//!
//! - [`cli`]: the command line's flags and client commands.
//! - [`core`]: the sans-IO state machine (workers, tasks, stages, liveness),
//!   tested on virtual time.
//! - [`serve`]: the runtime around it: stream ingest, queue polling, timers.
//! - [`http`]: the JSON API, `/metrics` and `/healthz`.
//! - [`metrics`]: every exported metric, defined in one place.
//! - [`submit`]: publishing tasks (shared by the API and `guildhall submit`).

pub mod cli;
pub mod core;
pub mod http;
pub mod metrics;
pub mod serve;
pub mod submit;
pub mod demo {
    pub async fn run(
        _a: crate::cli::DemoArgs,
        _s: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        anyhow::bail!("demo: being written")
    }
}

//! Guildhall's coordinator and command line.
//!
//! # Layout
//!
//! - [`capacity`]: forecasting, queueing-theory sizing, HPA-style
//!   stabilisation and rebalancing of stages (pure, sans-IO): the
//!   `guildhall-core` crate's, re-exported.
//! - [`cli`]: the command line's flags and client commands.
//! - [`config`]: the broker flags, `ConfigError` and the defaults, shared
//!   by the command line, [`sim`] and the `guildhall-bench` crate.
//! - [`dead`]: listing and replaying dead-lettered tasks.
//! - [`demo`]: `guildhall demo`, a coordinator and a simulated pipeline in one process.
//! - [`core`]: the sans-IO state machine (workers, tasks, stages, liveness),
//!   tested on virtual time: the `guildhall-core` crate's, re-exported (that
//!   crate has no IO dependencies).
//! - [`serve`]: the runtime around it: stream ingest, queue polling, timers.
//! - [`http`]: the JSON API, `/metrics` and `/healthz`.
//! - [`metrics`]: every exported metric, defined in one place, and the
//!   core's [`core::telemetry::Telemetry`] on the Prometheus registry.
//! - [`sim`]: `guildhall simulate`'s command line; the discrete-event
//!   engine it drives is `guildhall-core`'s.
//! - [`submit`]: publishing tasks (shared by the API and `guildhall submit`).

pub use guildhall_core::{capacity, core};
pub mod cli;
pub mod config;
pub mod dead;
pub mod demo;
pub mod http;
pub mod metrics;
pub mod serve;
pub mod sim;
pub mod submit;

#[cfg(test)]
mod core_metrics_tests;

//! Guildhall's coordinator and command line.
//!
//! # Layout
//!
//! - [`capacity`]: forecasting, queueing-theory sizing, HPA-style
//!   stabilisation and rebalancing of stages (pure, sans-IO).
//! - [`cli`]: the command line's flags and client commands.
//! - [`config`]: the broker flags, `ConfigError` and the defaults, shared
//!   by the command line, [`sim`] and the `guildhall-bench` crate.
//! - [`dead`]: listing and replaying dead-lettered tasks.
//! - [`demo`]: `guildhall demo`, a coordinator and a simulated pipeline in one process.
//! - [`core`]: the sans-IO state machine (workers, tasks, stages, liveness),
//!   tested on virtual time.
//! - [`serve`]: the runtime around it: stream ingest, queue polling, timers.
//! - [`http`]: the JSON API, `/metrics` and `/healthz`.
//! - [`metrics`]: every exported metric, defined in one place.
//! - [`sim`]: `guildhall simulate`, a discrete-event simulation of scaling
//!   policies on arrival traces, driving the same [`capacity`] code.
//! - [`submit`]: publishing tasks (shared by the API and `guildhall submit`).

pub mod capacity;
pub mod cli;
pub mod config;
pub mod core;
pub mod dead;
pub mod demo;
pub mod http;
pub mod metrics;
pub mod serve;
pub mod sim;
pub mod submit;

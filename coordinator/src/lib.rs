//! Guildhall's coordinator and command line.
//!
//! # Layout
//!
//! - [`bench`]: `guildhall bench`: ingest, fleet and memory benchmarks on
//!   the real broker, and the simulated agents they share.
//! - [`capacity`]: forecasting, queueing-theory sizing, HPA-style
//!   stabilisation and rebalancing of stages (pure, sans-IO).
//! - [`cli`]: the command line's flags and client commands.
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

pub mod bench;
pub mod capacity;
pub mod cli;
pub mod core;
pub mod dead;
pub mod demo;
pub mod http;
pub mod metrics;
pub mod serve;
pub mod sim;
pub mod submit;

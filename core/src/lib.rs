//! Guildhall's coordinator core: everything the coordinator decides, with no
//! IO and no clock of its own.
//!
//! This crate has no tokio, lapin, axum, hyper, reqwest, prometheus or clap
//! among its dependencies (`tests/no_io.rs` refuses them), so the "no IO,
//! no clock" rule is enforced by the compiler rather than by habit. The
//! runtime around it (the `guildhall` crate) owns the broker connections,
//! the timers, the HTTP server and the Prometheus registry; the core hands
//! it notices, deadlines, views, snapshot bytes and its metrics as data
//! ([`core::telemetry`]).
//!
//! # Layout
//!
//! - [`core`]: the sans-IO state machine (workers, tasks, stages, liveness,
//!   planning, snapshots), tested on virtual time;
//! - [`capacity`]: forecasting, queueing-theory sizing, HPA-style
//!   stabilisation and rebalancing of stages;
//! - [`sim`]: the engine of `guildhall simulate`, a discrete-event
//!   simulation of scaling policies on arrival traces, driving the same
//!   [`capacity`] code (its command line stays in the `guildhall` crate).

pub mod capacity;
pub mod core;
pub mod sim;

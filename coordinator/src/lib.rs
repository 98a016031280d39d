//! Guildhall's coordinator and command line.
//!
//! # Layout
//!
//! - [`core`]: the sans-IO state machine (workers, tasks, stages, liveness).
//! - [`metrics`]: every exported metric, defined in one place.

pub mod core;
pub mod metrics;

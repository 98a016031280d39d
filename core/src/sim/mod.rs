//! The engine of `guildhall simulate`: a discrete-event simulation of a
//! pipeline under an arrival trace, comparing scaling policies. The
//! `predictive` policy is the coordinator's own [`crate::capacity::Planner`],
//! fed what the core feeds it; `reactive` is KEDA's RabbitMQ `QueueLength`
//! rule through the HPA; `static` provisions for the trace's peak. Runs are
//! deterministic for a seed. The flags and their checks are the `guildhall`
//! crate's (`guildhall::sim`).
//!
//! # Layout
//!
//! - [`trace`]: the trace format, its parser and the generators;
//! - [`spec`]: `--stages` and service-time distributions;
//! - [`engine`]: the event loop, workers, accounting;
//! - [`policy`]: static, reactive and predictive;
//! - [`report`]: results, the table and JSON;
//! - [`rng`]: the seeded random-number generator.

pub mod engine;
pub mod policy;
pub mod report;
pub mod rng;
pub mod spec;
pub mod trace;

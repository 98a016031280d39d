//! Guildhall's wire protocol: what agents, submitters and the coordinator say
//! to each other through RabbitMQ.
//!
//! **This crate does no IO and reads no clock.** It defines data and how it
//! is encoded; the `broker`, `agent` and `coordinator` crates move it.
//!
//! # Layout
//!
//! - [`ids`]: validated identifiers (namespace, stage, task id, agent id).
//! - [`event`]: the events agents publish (heartbeats, task stage changes, ...).
//! - [`envelope`]: the versioned postcard envelope that batches events, and
//!   its never-panicking decoder.
//! - [`command`]: commands to agents on the control exchange, and replies.
//! - [`names`]: every broker name, derived from the namespace.
//! - [`headers`]: AMQP headers on task messages, HTTP headers and environment
//!   variables of the worker hand-off.
//! - [`schedule`]: priorities and their bands, the delay ladder's
//!   arithmetic, rate limits, the missed-tick policy of cron schedules.
//! - [`flow`]: dependencies, fan-out and joins: policies, limits, child ids.
//! - [`trace`]: W3C `traceparent` values carried from stage to stage.

mod bounded;
pub mod command;
pub mod envelope;
pub mod event;
pub mod flow;
pub mod headers;
pub mod ids;
pub mod names;
pub mod schedule;
pub mod trace;

pub use command::{Command, CommandMessage, CommandReply};
pub use envelope::{DecodeError, Decoded, EncodeError, Envelope, EnvelopeBuilder, decode};
pub use event::*;
pub use ids::{AgentId, InvalidId, Namespace, Stage, TaskId};
pub use names::Names;
pub use schedule::{Band, Missed, Priority, Rate};

/// Longest error message carried in an event; longer ones are cut.
pub const MAX_ERROR_LEN: usize = 1024;

/// Cuts `error` to at most [`MAX_ERROR_LEN`] bytes on a character boundary.
pub fn truncate_error(mut error: String) -> String {
    if error.len() > MAX_ERROR_LEN {
        let mut end = MAX_ERROR_LEN;
        while !error.is_char_boundary(end) {
            end -= 1;
        }
        error.truncate(end);
    }
    error
}

#[cfg(test)]
mod tests;

//! Commands from the coordinator (or an operator) to agents, and their replies.
//!
//! Commands travel on the topic exchange `<ns>.control` with the routing keys
//! from [`crate::names::Names::control_key_agent`] and friends; replies go to
//! the message's `reply_to` queue. Both are postcard behind a version number,
//! like events.

use crate::envelope::{
    DecodeError, EncodeError, MAX_ENVELOPE_BYTES, PROTOCOL_VERSION, check_version,
};
use crate::ids::{AgentId, Stage, TaskId};
use crate::schedule::Rate;
use serde::{Deserialize, Serialize};

/// What an agent is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Stop consuming; finish the tasks in hand.
    Pause,
    /// Consume again after a pause.
    Resume,
    /// Stop consuming, finish the tasks in hand, then exit.
    Drain,
    /// Restart the supervised worker process (its tasks go back to the queue).
    RestartWorker,
    /// Process this many tasks at once (also the prefetch).
    SetConcurrency {
        /// New concurrency, at least 1.
        concurrency: u32,
    },
    /// Switch to consuming another stage this agent can serve.
    Assign {
        /// The stage to serve.
        stage: Stage,
        /// Why, in words (kept in the agent's `Reassigned` event).
        #[serde(deserialize_with = "crate::bounded::text")]
        reason: String,
    },
    /// Set the consumer prefetch without changing concurrency.
    SetPrefetch {
        /// New prefetch, at least 1.
        prefetch: u32,
    },
    /// Send back the last lines of the supervised worker's output.
    Logs {
        /// How many lines at most.
        lines: u32,
    },
    /// These tasks are cancelled: drop them if they arrive, stop them if
    /// they run. An agent holds each id for `hold_ms` (bounded by the agent).
    Cancel {
        /// The tasks, at most [`MAX_CANCEL_BATCH`].
        #[serde(deserialize_with = "crate::bounded::vec")]
        task_ids: Vec<TaskId>,
        /// How long to remember them.
        hold_ms: u64,
    },
    /// Start at most this many tasks per second (this agent's share of its
    /// stage's limit); `None` lifts the limit. Kept while the coordinator is
    /// away.
    SetRateLimit {
        /// This agent's share.
        limit: Option<Rate>,
    },
}

/// Most task ids in one [`Command::Cancel`].
pub const MAX_CANCEL_BATCH: usize = 1000;

impl Command {
    /// A short, stable name for logs and labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Drain => "drain",
            Command::RestartWorker => "restart",
            Command::SetConcurrency { .. } => "concurrency",
            Command::Assign { .. } => "assign",
            Command::SetPrefetch { .. } => "prefetch",
            Command::Logs { .. } => "logs",
            Command::Cancel { .. } => "cancel",
            Command::SetRateLimit { .. } => "rate_limit",
        }
    }
}

/// A command on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandMessage {
    /// Correlates the reply with the request.
    pub id: u64,
    /// When it was sent; agents ignore commands older than their start.
    pub sent_at_ms: u64,
    /// What to do.
    pub command: Command,
}

/// An agent's answer to a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandReply {
    /// The command's id.
    pub id: u64,
    /// Who answers.
    pub agent: AgentId,
    /// Whether the command was carried out.
    pub ok: bool,
    /// What happened, in words.
    #[serde(deserialize_with = "crate::bounded::text")]
    pub message: String,
    /// Log lines, for [`Command::Logs`].
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub lines: Vec<String>,
}

/// Encodes a control-plane value (command or reply) behind the version.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, EncodeError> {
    let map = |e: postcard::Error| EncodeError::Postcard(e.to_string());
    let out = postcard::to_extend(&PROTOCOL_VERSION, Vec::new()).map_err(map)?;
    let out = postcard::to_extend(value, out).map_err(map)?;
    if out.len() > MAX_ENVELOPE_BYTES {
        return Err(EncodeError::TooLarge(out.len()));
    }
    Ok(out)
}

/// Decodes a control-plane value written by [`encode`]. Never panics.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, DecodeError> {
    let rest = check_version(bytes)?;
    let (value, rest) =
        postcard::take_from_bytes::<T>(rest).map_err(|_| DecodeError::Malformed("bad body"))?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed("trailing bytes"));
    }
    Ok(value)
}

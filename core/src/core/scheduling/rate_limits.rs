//! Per-stage rate limits and their split among live agents.

use serde::{Deserialize, Serialize};

/// Per-stage rate limits and their split among live agents.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RateLimits {}

use crate::core::Core;
use guildhall_proto::{AgentId, RateLimitSet};

impl Core {
    /// Applies a coordinator's `RateLimitSet`.
    pub(crate) fn apply_rate_limit_set(
        &mut self,
        _now_ms: u64,
        _sender: &AgentId,
        _e: RateLimitSet,
    ) {
    }
}

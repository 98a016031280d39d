//! The agent's share of its stage's rate limit: a token bucket on the
//! core's virtual time that gates when the next task may start.

use super::AgentCore;
use super::commands::Verdict;
use guildhall_proto::Rate;

impl AgentCore {
    /// Applies `Command::SetRateLimit`.
    pub fn handle_rate_limit(&mut self, _now: u64, _limit: Option<Rate>) -> Verdict {
        Verdict::refused("this agent does not support rate limits yet")
    }
}

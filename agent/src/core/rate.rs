//! The agent's share of its stage's rate limit: a token bucket on the
//! core's virtual time that gates when the next task may start.
//!
//! The bucket holds at most about one second of the rate (at least one
//! token) and starts with one, so a fresh agent starts its first task at
//! once and a long idle spell allows a burst of one second's worth. Each
//! task started (a `TaskStarted`) takes a token; while fewer than one is
//! left the driver takes no delivery ([`AgentCore::can_take`]), and
//! [`AgentCore::poll_timeout`] includes when the next token is due, so the
//! driver wakes then. Which queue a delivery came from (a priority band,
//! the intake) does not matter: the gate is on starts.
//!
//! The limit in force is the coordinator's share (`Command::SetRateLimit`)
//! once it sent one, else the agent's own `--rate-limit`. A share is kept
//! while the coordinator is away (nothing expires); `SetRateLimit` with
//! `None` drops the share, and the agent's own limit (if any) applies again.

use super::AgentCore;
use super::commands::Verdict;
use guildhall_proto::Rate;

/// A token bucket of task starts.
#[derive(Debug, Clone)]
pub struct RateGate {
    /// The agent's own limit (`--rate-limit`), in force while the
    /// coordinator has sent no share.
    own: Option<Rate>,
    /// The coordinator's share of the stage's limit, once sent.
    share: Option<Rate>,
    /// Starts available now; below 1 the next start waits.
    tokens: f64,
    /// When `tokens` was last brought up to date (`None`: never).
    last_ms: Option<u64>,
}

impl RateGate {
    /// A gate with the agent's own limit, if any.
    pub fn new(own: Option<Rate>) -> Self {
        Self {
            own,
            share: None,
            tokens: 1.0,
            last_ms: None,
        }
    }

    /// The limit in force: the coordinator's share, else the agent's own.
    pub fn limit(&self) -> Option<Rate> {
        self.share.or(self.own)
    }

    /// The most tokens held: one second of the rate, at least one.
    fn capacity(&self) -> f64 {
        self.limit().map_or(1.0, |r| r.per_sec().max(1.0))
    }

    /// Adds the tokens earned since the last update.
    pub fn refill(&mut self, now: u64) {
        if let (Some(rate), Some(last)) = (self.limit(), self.last_ms) {
            let earned = now.saturating_sub(last) as f64 * rate.per_sec() / 1000.0;
            self.tokens = (self.tokens + earned).min(self.capacity());
        }
        self.last_ms = Some(self.last_ms.map_or(now, |l| l.max(now)));
    }

    /// Whether a task may start now (as of the last refill).
    pub fn may_start(&self) -> bool {
        self.limit().is_none() || self.tokens >= 1.0 - 1e-9
    }

    /// A task started at `now`: it takes a token.
    pub fn started(&mut self, now: u64) {
        self.refill(now);
        if self.limit().is_some() {
            self.tokens -= 1.0;
        }
    }

    /// When the next token is due, if a start waits for one.
    pub fn next_token_at(&self) -> Option<u64> {
        let rate = self.limit()?;
        if self.may_start() {
            return None;
        }
        let per_ms = rate.per_sec() / 1000.0;
        let wait = ((1.0 - self.tokens) / per_ms).ceil();
        // The slowest rate (a millionth of a task an hour) waits years,
        // never past the end of time.
        let wait = if wait.is_finite() && wait < 1e15 {
            (wait as u64).max(1)
        } else {
            1_000_000_000_000_000
        };
        Some(self.last_ms.unwrap_or(0).saturating_add(wait))
    }

    /// The coordinator's share changed at `now` (`None`: it lifted it).
    pub fn set_share(&mut self, now: u64, share: Option<Rate>) {
        self.refill(now);
        self.share = share;
        self.tokens = self.tokens.min(self.capacity());
    }

    /// The agent's own limit changed (at start-up).
    pub fn set_own(&mut self, now: u64, own: Option<Rate>) {
        self.refill(now);
        self.own = own;
        self.tokens = self.tokens.min(self.capacity());
    }
}

impl AgentCore {
    /// Applies `Command::SetRateLimit`: the coordinator's share of the
    /// stage's limit (`None` lifts it; the agent's own `--rate-limit`, if
    /// any, applies again).
    pub fn handle_rate_limit(&mut self, now: u64, limit: Option<Rate>) -> Verdict {
        self.rate.set_share(now, limit);
        match (limit, self.rate.limit()) {
            (Some(share), _) => {
                tracing::info!(%share, "rate limit: the coordinator's share");
                Verdict::ok(format!("starting at most {share}"))
            }
            (None, Some(own)) => {
                tracing::info!(%own, "rate limit: the coordinator lifted its share; the agent's own applies");
                Verdict::ok(format!("share lifted; the agent's own limit {own} applies"))
            }
            (None, None) => {
                tracing::info!("rate limit lifted");
                Verdict::ok("rate limit lifted")
            }
        }
    }

    /// Sets the agent's own limit (`--rate-limit`), in force until the
    /// coordinator sends a share.
    pub fn set_own_rate_limit(&mut self, now: u64, limit: Option<Rate>) {
        self.rate.set_own(now, limit);
    }

    /// The limit in force (the coordinator's share, else the agent's own).
    pub fn rate_limit(&self) -> Option<Rate> {
        self.rate.limit()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{config, task as delivery};
    use super::super::{AgentCore, CoreConfig, Delivery};
    use guildhall_proto::{Command, Rate};

    fn rate(s: &str) -> Rate {
        s.parse().expect("a valid rate")
    }

    /// A core with room for many tasks at once (the limit, not the
    /// concurrency, is what is tested), start-up actions drained.
    fn core() -> AgentCore {
        let mut core = AgentCore::new(CoreConfig {
            concurrency: 1000,
            ..config(false)
        });
        while core.poll_action().is_some() {}
        core
    }

    fn task(n: u64) -> Delivery {
        delivery(&format!("t{n}"), 1)
    }

    /// Drives the core as the runner does, with an endless backlog, from
    /// `from` to `to`: the start times.
    fn run(core: &mut AgentCore, from: u64, to: u64, n: &mut u64) -> Vec<u64> {
        let mut now = from;
        let mut starts = Vec::new();
        loop {
            while core.can_take() {
                *n += 1;
                core.handle_delivery(now, task(*n));
                starts.push(now);
            }
            while core.poll_action().is_some() {}
            match core.poll_timeout() {
                Some(at) if at <= to => {
                    now = now.max(at);
                    core.handle_timeout(now);
                }
                _ => return starts,
            }
        }
    }

    #[test]
    fn without_a_limit_the_concurrency_alone_gates() {
        let mut core = core();
        let starts = run(&mut core, 0, 10_000, &mut 0);
        assert_eq!(starts.len(), 1000);
    }

    #[test]
    fn the_coordinator_s_share_gates_starts_at_its_rate() {
        let mut core = core();
        let v = core.handle_command(
            0,
            &Command::SetRateLimit {
                limit: Some(rate("20/s")),
            },
        );
        assert!(
            matches!(v, super::super::Step::Done(ref v) if v.ok),
            "{v:?}"
        );
        let starts = run(&mut core, 0, 10_000, &mut 0);
        // One at once, then one every 50 ms: 20 a second.
        assert_eq!(starts.len(), 201, "{:?}", &starts[..10]);
        assert_eq!(&starts[..3], &[0, 50, 100]);
        // The driver is woken when the next token is due.
        assert_eq!(core.poll_timeout(), Some(10_050));
    }

    #[test]
    fn an_idle_spell_allows_a_burst_of_one_second_at_most() {
        let mut core = core();
        core.set_own_rate_limit(0, Some(rate("10/s")));
        let mut n = 0;
        let first = run(&mut core, 0, 0, &mut n);
        assert_eq!(first, vec![0]);
        // Idle for 5 s (no delivery taken meanwhile).
        core.handle_timeout(5_000);
        let burst = run(&mut core, 5_000, 5_000, &mut n);
        assert_eq!(burst.len(), 10, "one second's worth");
        let slow = run(&mut core, 5_000, 6_000, &mut n);
        assert_eq!(slow.len(), 10, "then 10 a second");
    }

    #[test]
    fn the_own_limit_applies_until_a_share_and_again_when_it_is_lifted() {
        let mut core = core();
        core.set_own_rate_limit(0, Some(rate("5/s")));
        assert_eq!(core.rate_limit(), Some(rate("5/s")));
        let mut n = 0;
        assert_eq!(run(&mut core, 0, 1_999, &mut n).len(), 10);
        core.handle_rate_limit(2_000, Some(rate("50/s")));
        assert_eq!(core.rate_limit(), Some(rate("50/s")));
        // The share is kept however long nothing more is heard.
        let fast = run(&mut core, 2_000, 12_000, &mut n);
        assert!((500..=502).contains(&fast.len()), "{}", fast.len());
        core.handle_rate_limit(12_000, None);
        assert_eq!(core.rate_limit(), Some(rate("5/s")));
        let slow = run(&mut core, 12_001, 22_000, &mut n);
        assert!((49..=51).contains(&slow.len()), "{}", slow.len());
    }

    #[test]
    fn a_lower_share_drops_the_tokens_above_its_burst() {
        let mut core = core();
        core.handle_rate_limit(0, Some(rate("100/s")));
        core.handle_timeout(10_000);
        core.handle_rate_limit(10_000, Some(rate("2/s")));
        let starts = run(&mut core, 10_000, 10_000, &mut 0);
        assert_eq!(starts.len(), 2, "the burst of the new share, not the old");
    }
}

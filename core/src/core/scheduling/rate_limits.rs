//! Per-stage rate limits and their split among live agents.
//!
//! A stage's limit caps how many tasks the whole stage starts per second,
//! across all its agents. The limits come from `RateLimitSet` events
//! written by a coordinator (a `--rate-limit` flag at start, or the API),
//! so they survive restarts: the stream holds them, and the snapshot too.
//! An event from any other sender is forged: counted and dropped.
//!
//! # The split
//!
//! Each agent enforces a share of its stage's limit locally (a token bucket
//! in `agent/src/core/rate.rs`). The share of an agent is the limit times
//! its concurrency over the summed concurrency of the stage's live agents
//! (alive or suspect, not paused, not draining): an agent with more slots
//! takes more of the budget. The shares add up to at most the limit.
//!
//! The split is recomputed when the set of agents may have changed (a
//! Hello, a stop, a move, a death or a return, a new limit) and at every
//! housekeeping tick (a concurrency change, a pause), and every agent
//! whose share differs from the one last sent gets a
//! [`Notice::SetRateLimit`], in stage then agent order. Shares are sent
//! only once the core has caught up with the stream; a restarted
//! coordinator sends every share again (what it sent is not saved). An
//! agent that moved to a stage without a limit, or whose stage's limit was
//! lifted, is sent `None`; a dead, stopped, paused or draining one is sent
//! nothing then, but is remembered as holding its share, and is sent `None`
//! once it is alive on a stage without a limit (so a limit lifted while an
//! agent was paused still reaches it when it resumes).

use crate::core::{Core, Notice, push_notice};
use guildhall_proto::{AgentId, AgentState, Rate, RateLimitSet, Stage};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// Seconds of TaskStarted counts kept per limited stage for its achieved
/// start rate.
pub const ACHIEVED_WINDOW_S: u64 = 10;

/// One stage's limit, as the last coordinator event set it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageLimit {
    /// Tasks per second (or minute, hour) the whole stage may start.
    pub limit: Rate,
    /// Who set it (`flag`, `api`, a user), for the API.
    pub by: String,
    /// When it was set, for the API.
    pub at_ms: u64,
}

/// Starts of one limited stage per second, for its achieved rate.
#[derive(Debug, Clone, Default)]
pub struct StartWindow {
    /// `(second, starts in it)`, oldest first, at most
    /// [`ACHIEVED_WINDOW_S`] + 1 entries.
    seconds: VecDeque<(u64, u64)>,
}

impl StartWindow {
    /// Counts a start at `at_ms`.
    fn add(&mut self, at_ms: u64) {
        let sec = at_ms / 1000;
        if let Some(slot) = self.seconds.iter_mut().find(|(s, _)| *s == sec) {
            slot.1 += 1;
        } else if self.seconds.back().is_none_or(|(s, _)| *s < sec) {
            self.seconds.push_back((sec, 1));
        } else if self.seconds.front().is_some_and(|(s, _)| *s < sec) {
            // Late (another agent's clock): inserted in order.
            let at = self.seconds.iter().position(|(s, _)| *s > sec).unwrap_or(0);
            self.seconds.insert(at, (sec, 1));
        }
        while self.seconds.len() as u64 > ACHIEVED_WINDOW_S + 1 {
            self.seconds.pop_front();
        }
    }

    /// Starts per second over the last [`ACHIEVED_WINDOW_S`] whole seconds
    /// before `now_ms`.
    fn rate(&self, now_ms: u64) -> f64 {
        let now = now_ms / 1000;
        let from = now.saturating_sub(ACHIEVED_WINDOW_S);
        let n: u64 = self
            .seconds
            .iter()
            .filter(|(s, _)| *s >= from && *s < now)
            .map(|(_, n)| n)
            .sum();
        n as f64 / ACHIEVED_WINDOW_S as f64
    }
}

/// Per-stage rate limits and their split among live agents.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RateLimits {
    /// The limit of every stage that has one (saved in the snapshot).
    pub limits: BTreeMap<Stage, StageLimit>,
    /// The share last sent to each agent, and its stage: what changed is
    /// sent again. Not saved: a restarted coordinator sends every share.
    #[serde(skip)]
    sent: BTreeMap<AgentId, (Stage, Option<Rate>)>,
    /// Agents left out of the split (dead, paused, draining) that still
    /// hold a share we sent: each is sent `None` once it is alive on a
    /// stage without a limit, or dropped from here when it rejoins a split
    /// or says Hello. Not saved, like `sent`.
    #[serde(skip)]
    held: BTreeMap<AgentId, Stage>,
    /// Whether the split must be recomputed at the end of this input.
    #[serde(skip)]
    dirty: bool,
    /// Recent starts of each limited stage (the achieved rate for the API).
    #[serde(skip)]
    starts: BTreeMap<Stage, StartWindow>,
    /// `RateLimitSet` events from a sender that is not a coordinator.
    #[serde(skip)]
    pub forged: u64,
}

/// A stage's limit with its split, for the API.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RateLimitView {
    /// The stage.
    pub stage: Stage,
    /// The limit (`50/s`).
    pub limit: String,
    /// The limit in tasks per second.
    pub limit_per_second: f64,
    /// Who set it.
    pub by: String,
    /// When.
    pub at_ms: u64,
    /// Tasks started per second over the last 10 s.
    pub achieved_per_second: f64,
    /// Each live agent's share, in agent order.
    pub shares: Vec<ShareView>,
}

/// One agent's share, for the API.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShareView {
    /// The agent.
    pub agent: AgentId,
    /// Its share in tasks per second.
    pub per_second: f64,
}

impl RateLimits {
    /// The split must be recomputed (an agent came, went or moved).
    pub fn touch(&mut self) {
        self.dirty = true;
    }

    /// `agent` said Hello (`hello`: a new process, which has no share
    /// yet), stopped or moved: the split must be recomputed.
    pub fn agent_changed(&mut self, agent: &AgentId, hello: bool) {
        if hello {
            self.sent.remove(agent);
            self.held.remove(agent);
        }
        self.dirty = true;
    }

    /// Counts a task started at `at_ms` on `stage` (only limited stages
    /// are counted).
    pub fn started(&mut self, stage: &Stage, at_ms: u64) {
        if self.limits.contains_key(stage) {
            self.starts.entry(stage.clone()).or_default().add(at_ms);
        }
    }

    /// The stage's limit, if it has one.
    pub fn limit(&self, stage: &Stage) -> Option<Rate> {
        self.limits.get(stage).map(|l| l.limit)
    }

    /// Starts per second of `stage` over the last 10 s (0 if unlimited).
    pub fn achieved(&self, stage: &Stage, now_ms: u64) -> f64 {
        self.starts.get(stage).map_or(0.0, |w| w.rate(now_ms))
    }
}

/// An agent's claim on its stage's budget: its slots.
struct Member {
    /// The agent.
    id: AgentId,
    /// Its concurrency (at least 1).
    weight: u64,
}

impl Core {
    /// Applies a coordinator's `RateLimitSet`; one from any other sender is
    /// counted and dropped.
    pub(crate) fn apply_rate_limit_set(&mut self, now_ms: u64, sender: &AgentId, e: RateLimitSet) {
        if !self.sent_by_coordinator(sender, "forged_control") {
            self.scheduling.rate_limits.forged += 1;
            return;
        }
        let mut stage = e.stage;
        let limits = &mut self.scheduling.rate_limits;
        match e.limit {
            Some(limit) => {
                if !limits.limits.contains_key(&stage) && !self.known_stage(now_ms, &mut stage) {
                    return;
                }
                let limits = &mut self.scheduling.rate_limits;
                limits.limits.insert(
                    stage,
                    StageLimit {
                        limit,
                        by: e.by,
                        at_ms: e.at_ms,
                    },
                );
            }
            None => {
                limits.limits.remove(&stage);
                limits.starts.remove(&stage);
            }
        }
        self.scheduling.rate_limits.dirty = true;
    }

    /// Every limited stage's limit and split, in stage order.
    pub fn rate_limits_view(&self, now_ms: u64) -> Vec<RateLimitView> {
        let split = self.rate_split();
        let rl = &self.scheduling.rate_limits;
        rl.limits
            .iter()
            .map(|(stage, l)| RateLimitView {
                stage: stage.clone(),
                limit: l.limit.to_string(),
                limit_per_second: l.limit.per_sec(),
                by: l.by.clone(),
                at_ms: l.at_ms,
                achieved_per_second: rl.achieved(stage, now_ms),
                shares: split
                    .iter()
                    .filter(|(_, (s, _))| s == stage)
                    .filter_map(|(id, (_, r))| {
                        r.map(|r| ShareView {
                            agent: id.clone(),
                            per_second: r.per_sec(),
                        })
                    })
                    .collect(),
            })
            .collect()
    }

    /// A stage's limit, if it has one.
    pub fn stage_rate_limit(&self, stage: &Stage) -> Option<Rate> {
        self.scheduling.rate_limits.limit(stage)
    }

    /// The share every live agent of a limited stage should have now.
    fn rate_split(&self) -> BTreeMap<AgentId, (Stage, Option<Rate>)> {
        let limits = &self.scheduling.rate_limits.limits;
        let mut out = BTreeMap::new();
        if limits.is_empty() {
            return out;
        }
        let mut members: BTreeMap<&Stage, Vec<Member>> = BTreeMap::new();
        for w in self.workers.values() {
            if !limits.contains_key(&w.stage)
                || !w.is_alive()
                || matches!(w.reported, AgentState::Paused | AgentState::Draining)
            {
                continue;
            }
            members.entry(&w.stage).or_default().push(Member {
                id: w.id.clone(),
                weight: u64::from(w.concurrency.max(1)),
            });
        }
        for (stage, list) in members {
            let Some(l) = limits.get(stage) else {
                continue;
            };
            let total: u64 = list.iter().map(|m| m.weight).sum();
            for m in list {
                out.insert(m.id, (stage.clone(), Some(l.limit.share(m.weight, total))));
            }
        }
        out
    }

    /// Every agent's share is to be sent again (a coordinator took the
    /// lead: what its core took as sent, as a follower, was not; issue 20).
    pub fn resend_rate_shares(&mut self) {
        self.scheduling.rate_limits.sent.clear();
        self.resplit_rate_limits(true);
    }

    /// Re-splits the limits if something changed (or `force`), and notices
    /// every agent whose share changed. Nothing is sent before the core has
    /// caught up.
    pub(crate) fn resplit_rate_limits(&mut self, force: bool) {
        let rl = &self.scheduling.rate_limits;
        if !self.caught_up
            || !(rl.dirty || force)
            || (rl.limits.is_empty() && rl.sent.is_empty() && rl.held.is_empty())
        {
            return;
        }
        self.scheduling.rate_limits.dirty = false;
        let want = self.rate_split();
        let sent = std::mem::take(&mut self.scheduling.rate_limits.sent);
        let mut held = std::mem::take(&mut self.scheduling.rate_limits.held);
        let mut changes: Vec<(AgentId, Stage, Option<Rate>)> = Vec::new();
        let mut kept = BTreeMap::new();
        for (id, (stage, share)) in &want {
            if sent.get(id) != Some(&(stage.clone(), *share)) {
                changes.push((id.clone(), stage.clone(), *share));
            }
            kept.insert(id.clone(), (stage.clone(), *share));
        }
        for (id, (stage, share)) in sent {
            if want.contains_key(&id) || share.is_none() {
                continue;
            }
            // Had a share, has none now. A dead, stopped, paused or
            // draining one is sent nothing: it starts nothing now, and is
            // remembered as holding its share (below).
            held.insert(id, stage);
        }
        // Lifted, for an agent holding a share that is alive on a stage
        // without a limit (the limit was lifted, or it moved); back in the
        // split, it was sent its share above; gone from the table, forgotten.
        held.retain(|id, _| {
            if want.contains_key(id) {
                return false;
            }
            let Some(w) = self.workers.get(id) else {
                return false;
            };
            if w.is_alive() && !self.scheduling.rate_limits.limits.contains_key(&w.stage) {
                changes.push((id.clone(), w.stage.clone(), None));
                return false;
            }
            true
        });
        changes.sort_by(|a, b| (&a.1, &a.0).cmp(&(&b.1, &b.0)));
        self.scheduling.rate_limits.sent = kept;
        self.scheduling.rate_limits.held = held;
        for (worker, stage, limit) in changes {
            push_notice(
                &mut self.notices,
                Notice::SetRateLimit {
                    worker,
                    stage,
                    limit,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::test_support::{Sim, st};
    use guildhall_proto::{AgentStopping, Event};

    fn rate(s: &str) -> Rate {
        s.parse().expect("a valid rate")
    }

    fn hello(sim: &Sim, stage: &str, concurrency: u32) -> Event {
        sim.hello(stage, &[stage], concurrency)
    }

    fn set(sim: &Sim, stage: &str, limit: Option<&str>) -> Event {
        Event::RateLimitSet(RateLimitSet {
            at_ms: sim.now,
            stage: st(stage),
            limit: limit.map(rate),
            by: "test".into(),
        })
    }

    /// The rate-limit notices waiting, as `(agent, share per second)`.
    fn shares(sim: &mut Sim) -> Vec<(String, Option<f64>)> {
        sim.all_notices()
            .into_iter()
            .filter_map(|n| match n {
                Notice::SetRateLimit { worker, limit, .. } => {
                    Some((worker.to_string(), limit.map(Rate::per_sec)))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_limit_is_split_by_concurrency_and_resplit_as_agents_come_and_go() {
        let mut sim = Sim::new();
        let h = hello(&sim, "s", 1);
        sim.send("a1", vec![h]);
        sim.send("coordinator-1", vec![set(&sim, "s", Some("60/s"))]);
        assert_eq!(shares(&mut sim), vec![("a1".into(), Some(60.0))]);

        // A new agent gets its share at once, the other its new one.
        let h = hello(&sim, "s", 2);
        sim.send("a2", vec![h]);
        assert_eq!(
            shares(&mut sim),
            vec![("a1".into(), Some(20.0)), ("a2".into(), Some(40.0))]
        );

        // A stop gives its share back.
        let stop = Event::AgentStopping(AgentStopping {
            at_ms: sim.now,
            reason: "drain".into(),
        });
        sim.send("a2", vec![stop]);
        assert_eq!(shares(&mut sim), vec![("a1".into(), Some(60.0))]);

        // Lifting the limit lifts every share.
        sim.send("coordinator-1", vec![set(&sim, "s", None)]);
        assert_eq!(shares(&mut sim), vec![("a1".into(), None)]);
        assert!(sim.core.rate_limits_view(sim.now).is_empty());
    }

    #[test]
    fn a_dead_agent_s_share_goes_to_the_others_and_comes_back_with_it() {
        let mut sim = Sim::new();
        for a in ["a1", "a2", "a3"] {
            let h = hello(&sim, "s", 1);
            sim.send(a, vec![h]);
        }
        sim.send("coordinator-1", vec![set(&sim, "s", Some("30/s"))]);
        assert_eq!(
            shares(&mut sim),
            vec![
                ("a1".into(), Some(10.0)),
                ("a2".into(), Some(10.0)),
                ("a3".into(), Some(10.0)),
            ]
        );
        // a3 goes silent; a1 and a2 beat every second.
        for _ in 0..6 {
            sim.advance(1000);
            for a in ["a1", "a2"] {
                let hb = sim.heartbeat("s", AgentState::Idle, &[]);
                sim.send(a, vec![hb]);
            }
        }
        assert_eq!(
            shares(&mut sim),
            vec![("a1".into(), Some(15.0)), ("a2".into(), Some(15.0))]
        );
        // It returns: the split is three ways again.
        let hb = sim.heartbeat("s", AgentState::Idle, &[]);
        sim.send("a3", vec![hb]);
        assert_eq!(
            shares(&mut sim),
            vec![
                ("a1".into(), Some(10.0)),
                ("a2".into(), Some(10.0)),
                ("a3".into(), Some(10.0)),
            ]
        );
    }

    #[test]
    fn a_limit_lifted_while_an_agent_was_paused_is_lifted_when_it_resumes() {
        let mut sim = Sim::new();
        let h = hello(&sim, "s", 1);
        sim.send("a1", vec![h]);
        sim.send("coordinator-1", vec![set(&sim, "s", Some("60/s"))]);
        assert_eq!(shares(&mut sim), vec![("a1".into(), Some(60.0))]);
        // Paused: out of the split, sent nothing, keeps its share.
        sim.advance(1_000);
        let hb = sim.heartbeat("s", AgentState::Paused, &[]);
        sim.send("a1", vec![hb]);
        sim.advance(2_000);
        let hb = sim.heartbeat("s", AgentState::Paused, &[]);
        sim.send("a1", vec![hb]);
        assert!(shares(&mut sim).is_empty());
        // The limit is lifted while it is paused, then it resumes.
        sim.send("coordinator-1", vec![set(&sim, "s", None)]);
        sim.advance(1_000);
        let hb = sim.heartbeat("s", AgentState::Idle, &[]);
        sim.send("a1", vec![hb]);
        sim.advance(2_000);
        let hb = sim.heartbeat("s", AgentState::Idle, &[]);
        sim.send("a1", vec![hb]);
        assert_eq!(shares(&mut sim), vec![("a1".into(), None)]);
        // Once: nothing more afterwards.
        sim.advance(2_000);
        let hb = sim.heartbeat("s", AgentState::Idle, &[]);
        sim.send("a1", vec![hb]);
        assert!(shares(&mut sim).is_empty());
    }

    #[test]
    fn a_forged_limit_is_counted_and_dropped() {
        let mut sim = Sim::new();
        let h = hello(&sim, "s", 1);
        sim.send("a1", vec![h]);
        sim.send("a1", vec![set(&sim, "s", Some("1/h"))]);
        assert!(shares(&mut sim).is_empty());
        assert_eq!(sim.core.stage_rate_limit(&st("s")), None);
        assert_eq!(sim.core.scheduling.rate_limits.forged, 1);
        let malformed = crate::core::telemetry::Count::Malformed {
            reason: "forged_control",
        };
        assert_eq!(sim.recorder.count_of(malformed), 1);
    }

    #[test]
    fn shares_are_sent_only_once_caught_up_and_again_after_a_restart() {
        let mut sim = Sim::replaying(crate::core::CoreConfig::default());
        let h = hello(&sim, "s", 1);
        sim.send("a1", vec![h]);
        sim.send("coordinator-1", vec![set(&sim, "s", Some("5/s"))]);
        assert!(shares(&mut sim).is_empty(), "nothing while replaying");
        sim.core.set_caught_up(sim.now);
        assert_eq!(shares(&mut sim), vec![("a1".into(), Some(5.0))]);
        // An agent restarted (a Hello again) is sent its share again.
        let h = hello(&sim, "s", 1);
        sim.send("a1", vec![h]);
        assert_eq!(shares(&mut sim), vec![("a1".into(), Some(5.0))]);
        // Nothing changes, nothing is sent, housekeeping or not.
        sim.advance(2_000);
        let hb = sim.heartbeat("s", AgentState::Idle, &[]);
        sim.send("a1", vec![hb]);
        assert!(shares(&mut sim).is_empty());
    }

    #[test]
    fn the_limit_survives_a_snapshot_and_the_achieved_rate_is_counted() {
        let mut sim = Sim::new();
        let h = hello(&sim, "s", 1);
        sim.send("a1", vec![h]);
        sim.send("coordinator-1", vec![set(&sim, "s", Some("2/s"))]);
        for i in 0..20 {
            let e = sim.started(&format!("t{i}"), "s", 1, sim.now);
            sim.send("a1", vec![e]);
            sim.advance(500);
        }
        let view = sim.core.rate_limits_view(sim.now);
        assert_eq!(view.len(), 1);
        assert_eq!(view[0].limit, "2/s");
        assert!((view[0].achieved_per_second - 2.0).abs() < 0.25, "{view:?}");
        let core = sim.resume(crate::core::CoreConfig::default()).core;
        assert_eq!(core.stage_rate_limit(&st("s")), Some(rate("2/s")));
    }
}

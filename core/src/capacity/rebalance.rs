//! Moving multi-stage agents to where they help most, and sizing prefetch.
//!
//! # Greedy marginal allocation
//!
//! The cost of a stage with c servers is its total expected wait per second,
//! λ·Wq (Allen-Cunneen, see [`super::queueing`]), in "milliseconds of waiting
//! per second": 2 tasks/s each waiting 500 ms cost 1,000. An unstable stage
//! (load ≥ servers) has an unbounded wait; it is ranked by its overload
//! a − c first, so an unstable stage always wins capacity, the most
//! overloaded first.
//!
//! 1. Agents that moved less than `min_dwell_ms` ago stay where they are
//!    and count as fixed capacity, with each stage's `fixed_slots` (agents
//!    that cannot move).
//! 2. The others are handed out one at a time (Fox's marginal allocation):
//!    each round, the stage whose cost falls most when one more agent joins
//!    it gets one; an agent already on that stage is taken first, so agents
//!    are never swapped for nothing.
//! 3. **Hysteresis**: an agent leaves its stage only if joining the other
//!    one lowers the cost clearly more than staying would: it removes more
//!    overload, or it saves more than [`MIN_GAIN_MS_PER_S`] *and* more than
//!    [`MIN_GAIN_RATIO`] times what staying saves. Otherwise it stays.
//!    Balanced stages therefore see no moves, and a move is not undone by
//!    the next call (the same inputs give the same answer).
//! 4. The moves are checked one by one, biggest gain first, against the
//!    current placement: a move that would not lower the cost there is
//!    dropped. `gain_ms` is that decrease of Σ λ·Wq, counting an unstable
//!    stage's wait as [`UNSTABLE_WAIT_MS`] (it has no finite value).

use super::queueing::expected_wait_ms;
use guildhall_proto::{AgentId, Stage};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Smallest wait saving (ms of waiting per second) worth a move.
pub const MIN_GAIN_MS_PER_S: f64 = 100.0;
/// A move must save this many times what staying would.
pub const MIN_GAIN_RATIO: f64 = 1.1;
/// The wait an unstable stage is counted with in `gain_ms` (one hour).
pub const UNSTABLE_WAIT_MS: f64 = 3_600_000.0;

/// What one stage needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageDemand {
    /// The stage.
    pub stage: Stage,
    /// Tasks arriving per second.
    pub arrival_rate: f64,
    /// Mean service time, ms.
    pub service_mean_ms: f64,
    /// Squared coefficient of variation of service times (1 = exponential).
    pub service_scv: f64,
    /// Squared coefficient of variation of inter-arrival times (1 = Poisson).
    pub arrival_scv: f64,
    /// Servers (slots) of agents that cannot move away from this stage.
    pub fixed_slots: u32,
}

/// An agent that can serve several stages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlexibleAgent {
    /// The agent.
    pub id: AgentId,
    /// The stage it consumes now.
    pub stage: Stage,
    /// Every stage it can consume (its current one is always allowed).
    pub can_serve: Vec<Stage>,
    /// Its concurrency: servers it adds to a stage.
    pub slots: u32,
    /// When it was last moved, if ever (for the dwell time).
    pub last_move_ms: Option<u64>,
}

/// An agent to move.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Move {
    /// The agent.
    pub agent: AgentId,
    /// Where it is.
    pub from: Stage,
    /// Where it should go.
    pub to: Stage,
    /// Why, for a person: both stages' utilisation and wait before and after.
    pub reason: String,
    /// Decrease of Σ λ·Wq (ms of waiting per second) the move brings.
    pub gain_ms: f64,
}

/// A stage's cost: overload first, then the finite wait cost.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Cost {
    /// a − c when unstable (a tiny positive number at a = c), else 0.
    overload: f64,
    /// λ·Wq in ms/s when stable, else λ·[`UNSTABLE_WAIT_MS`].
    wait: f64,
}

/// A gain (cost before − cost after), compared overload first.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Gain {
    overload: f64,
    wait: f64,
}

const EPS: f64 = 1e-9;

impl Gain {
    fn between(before: Cost, after: Cost) -> Self {
        Self {
            overload: before.overload - after.overload,
            // Between two unstable states the finite part says nothing.
            wait: if after.overload > 0.0 {
                0.0
            } else {
                before.wait - after.wait
            },
        }
    }

    fn better_than(self, other: Gain) -> bool {
        if (self.overload - other.overload).abs() > EPS {
            return self.overload > other.overload;
        }
        self.wait > other.wait + EPS
    }

    /// Whether moving (gain `self`) is clearly better than staying (`stay`).
    fn worth_moving_from(self, stay: Gain) -> bool {
        if (self.overload - stay.overload).abs() > EPS {
            return self.overload > stay.overload;
        }
        self.wait - stay.wait > MIN_GAIN_MS_PER_S && self.wait > MIN_GAIN_RATIO * stay.wait
    }
}

/// One stage in the allocation.
#[derive(Debug, Clone)]
struct Slot {
    demand: StageDemand,
    servers: u32,
}

impl Slot {
    fn load(&self) -> f64 {
        self.demand.arrival_rate * self.demand.service_mean_ms / 1000.0
    }

    fn cost_at(&self, servers: u32) -> Cost {
        let d = &self.demand;
        let wait = expected_wait_ms(
            d.arrival_rate,
            d.service_mean_ms,
            d.arrival_scv,
            d.service_scv,
            servers,
        );
        match wait {
            Some(w) => Cost {
                overload: 0.0,
                wait: d.arrival_rate.max(0.0) * w,
            },
            None => Cost {
                overload: (self.load() - f64::from(servers)).max(0.0) + EPS,
                wait: d.arrival_rate.max(0.0) * UNSTABLE_WAIT_MS,
            },
        }
    }

    fn gain_adding(&self, slots: u32) -> Gain {
        Gain::between(
            self.cost_at(self.servers),
            self.cost_at(self.servers.saturating_add(slots)),
        )
    }

    /// "build: utilisation 1.30 → 0.81, expected wait unbounded → 2.1 s".
    fn describe(&self, before: u32, after: u32) -> String {
        let d = &self.demand;
        let util = |c: u32| {
            if c == 0 {
                "no servers".to_string()
            } else {
                format!("{:.2}", self.load() / f64::from(c))
            }
        };
        let wait = |c: u32| match expected_wait_ms(
            d.arrival_rate,
            d.service_mean_ms,
            d.arrival_scv,
            d.service_scv,
            c,
        ) {
            Some(w) => format_wait(w),
            None => "unbounded".to_string(),
        };
        format!(
            "{}: utilisation {} → {}, expected wait {} → {}",
            d.stage,
            util(before),
            util(after),
            wait(before),
            wait(after)
        )
    }
}

/// A wait for people: "350 ms", "2.1 s", "41 s", "12.5 min".
pub fn format_wait(ms: f64) -> String {
    if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else if ms < 10_000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else if ms < 600_000.0 {
        format!("{:.0} s", ms / 1000.0)
    } else {
        format!("{:.1} min", ms / 60_000.0)
    }
}

/// The stages known to the allocation: every demand, plus agents' current
/// stages without one (no demand: nothing gained there, they may stay).
fn stage_table(demands: &[StageDemand], agents: &[FlexibleAgent]) -> BTreeMap<Stage, Slot> {
    let mut table: BTreeMap<Stage, Slot> = demands
        .iter()
        .map(|d| {
            (
                d.stage.clone(),
                Slot {
                    demand: d.clone(),
                    servers: 0,
                },
            )
        })
        .collect();
    for a in agents {
        table.entry(a.stage.clone()).or_insert_with(|| Slot {
            demand: StageDemand {
                stage: a.stage.clone(),
                arrival_rate: 0.0,
                service_mean_ms: 0.0,
                service_scv: 1.0,
                arrival_scv: 1.0,
                fixed_slots: 0,
            },
            servers: 0,
        });
    }
    for slot in table.values_mut() {
        slot.servers = slot.demand.fixed_slots;
    }
    table
}

/// Where each flexible agent should be: the moves to make (see the module
/// notes). Deterministic for the same inputs.
pub fn rebalance(
    demands: &[StageDemand],
    agents: &[FlexibleAgent],
    now_ms: u64,
    min_dwell_ms: u64,
) -> Vec<Move> {
    let mut table = stage_table(demands, agents);
    let dwelling = |a: &FlexibleAgent| {
        a.last_move_ms
            .is_some_and(|t| now_ms.saturating_sub(t) < min_dwell_ms)
    };
    let mut free: Vec<&FlexibleAgent> = Vec::new();
    for a in agents {
        if dwelling(a) {
            if let Some(s) = table.get_mut(&a.stage) {
                s.servers = s.servers.saturating_add(a.slots);
            }
        } else {
            free.push(a);
        }
    }
    // Larger agents first, then by id: deterministic.
    free.sort_by(|a, b| b.slots.cmp(&a.slots).then_with(|| a.id.cmp(&b.id)));
    let serves = |a: &FlexibleAgent, s: &Stage| a.stage == *s || a.can_serve.contains(s);

    let mut assigned: Vec<(usize, Stage)> = Vec::new();
    let mut left: Vec<usize> = (0..free.len()).collect();
    while !left.is_empty() {
        // Each stage's candidate: an unassigned agent already there, else
        // the first unassigned agent able to serve it.
        let mut best: Option<(Gain, usize, Stage)> = None;
        for (stage, slot) in &table {
            if slot.demand.arrival_rate <= 0.0 && slot.demand.service_mean_ms <= 0.0 {
                // Unknown demand: only agents already there are placed here.
                if !left.iter().any(|&i| free[i].stage == *stage) {
                    continue;
                }
            }
            let local = left.iter().copied().find(|&i| free[i].stage == *stage);
            let Some(candidate) =
                local.or_else(|| left.iter().copied().find(|&i| serves(free[i], stage)))
            else {
                continue;
            };
            let gain = slot.gain_adding(free[candidate].slots);
            if best.as_ref().is_none_or(|(g, _, _)| gain.better_than(*g)) {
                best = Some((gain, candidate, stage.clone()));
            }
        }
        let Some((gain, i, mut stage)) = best else {
            break;
        };
        let agent = free[i];
        if stage != agent.stage
            && let Some(home) = table.get(&agent.stage)
        {
            let stay = home.gain_adding(agent.slots);
            if !gain.worth_moving_from(stay) {
                stage = agent.stage.clone();
            }
        }
        if let Some(slot) = table.get_mut(&stage) {
            slot.servers = slot.servers.saturating_add(agent.slots);
        }
        left.retain(|&j| j != i);
        assigned.push((i, stage));
    }

    let candidates: Vec<(usize, Stage)> = assigned
        .into_iter()
        .filter(|(i, to)| free[*i].stage != *to)
        .collect();
    realise(demands, agents, &free, candidates)
}

/// Checks the chosen moves against the current placement, biggest gain
/// first, and words them.
fn realise(
    demands: &[StageDemand],
    agents: &[FlexibleAgent],
    free: &[&FlexibleAgent],
    candidates: Vec<(usize, Stage)>,
) -> Vec<Move> {
    // The current placement: every agent where it is.
    let mut now = stage_table(demands, agents);
    for a in agents {
        if let Some(s) = now.get_mut(&a.stage) {
            s.servers = s.servers.saturating_add(a.slots);
        }
    }
    let delta = |table: &BTreeMap<Stage, Slot>, a: &FlexibleAgent, to: &Stage| -> Option<Gain> {
        let from = table.get(&a.stage)?;
        let dest = table.get(to)?;
        let before = (from.cost_at(from.servers), dest.cost_at(dest.servers));
        let after = (
            from.cost_at(from.servers.saturating_sub(a.slots)),
            dest.cost_at(dest.servers.saturating_add(a.slots)),
        );
        Some(Gain {
            overload: before.0.overload + before.1.overload - after.0.overload - after.1.overload,
            wait: before.0.wait + before.1.wait - after.0.wait - after.1.wait,
        })
    };
    let mut order: Vec<(usize, Stage, Gain)> = candidates
        .into_iter()
        .filter_map(|(i, to)| {
            let g = delta(&now, free[i], &to)?;
            Some((i, to, g))
        })
        .collect();
    order.sort_by(|a, b| {
        if a.2.better_than(b.2) {
            std::cmp::Ordering::Less
        } else if b.2.better_than(a.2) {
            std::cmp::Ordering::Greater
        } else {
            free[a.0].id.cmp(&free[b.0].id)
        }
    });
    let mut moves = Vec::new();
    for (i, to, _) in order {
        let a = free[i];
        let Some(g) = delta(&now, a, &to) else {
            continue;
        };
        let improves = g.overload > EPS || (g.overload.abs() <= EPS && g.wait > EPS);
        if !improves {
            continue;
        }
        let (from_before, to_before) = match (now.get(&a.stage), now.get(&to)) {
            (Some(f), Some(t)) => (f.servers, t.servers),
            _ => continue,
        };
        let from_after = from_before.saturating_sub(a.slots);
        let to_after = to_before.saturating_add(a.slots);
        let reason = match (now.get(&to), now.get(&a.stage)) {
            (Some(t), Some(f)) => format!(
                "{}; {}",
                t.describe(to_before, to_after),
                f.describe(from_before, from_after)
            ),
            _ => continue,
        };
        if let Some(s) = now.get_mut(&a.stage) {
            s.servers = from_after;
        }
        if let Some(s) = now.get_mut(&to) {
            s.servers = to_after;
        }
        moves.push(Move {
            agent: a.id.clone(),
            from: a.stage.clone(),
            to,
            reason,
            gain_ms: g.wait,
        });
    }
    moves
}

/// Prefetch for an agent: enough deliveries in hand to cover the broker
/// round trip, ≈ concurrency × (1 + ⌈rtt / service⌉), at most `cap` but
/// never below `concurrency` (every slot needs a message), at least 1.
pub fn prefetch_for(concurrency: u32, rtt_ms: f64, service_ms: f64, cap: u32) -> u32 {
    let concurrency = concurrency.max(1);
    let per_slot = if !rtt_ms.is_finite() || rtt_ms <= 0.0 {
        1.0
    } else if !service_ms.is_finite() || service_ms <= 0.0 {
        f64::from(u32::MAX)
    } else {
        1.0 + (rtt_ms / service_ms).ceil()
    };
    let want = (f64::from(concurrency) * per_slot).min(f64::from(u32::MAX)) as u32;
    want.min(cap).max(concurrency)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(s: &str) -> Stage {
        s.parse().unwrap()
    }

    fn demand(stage: &str, rate: f64, service_ms: f64, fixed: u32) -> StageDemand {
        StageDemand {
            stage: st(stage),
            arrival_rate: rate,
            service_mean_ms: service_ms,
            service_scv: 1.0,
            arrival_scv: 1.0,
            fixed_slots: fixed,
        }
    }

    fn agent(id: &str, stage: &str, last_move_ms: Option<u64>) -> FlexibleAgent {
        FlexibleAgent {
            id: id.parse().unwrap(),
            stage: st(stage),
            can_serve: vec![st("build"), st("report")],
            slots: 1,
            last_move_ms,
        }
    }

    #[test]
    fn the_overloaded_stage_gets_the_flexible_agent() {
        // build: 2.6/s × 1 s = 2.6 Erlangs on 2 fixed servers (unstable);
        // report: 0.5/s × 1 s on 2 fixed servers plus a flexible agent.
        let demands = [
            demand("build", 2.6, 1000.0, 2),
            demand("report", 0.5, 1000.0, 2),
        ];
        let agents = [agent("flex-1", "report", None)];
        let moves = rebalance(&demands, &agents, 1_000_000, 60_000);
        assert_eq!(moves.len(), 1, "{moves:?}");
        let m = &moves[0];
        assert_eq!((m.from.as_str(), m.to.as_str()), ("report", "build"));
        assert!(m.gain_ms > 0.0);
        assert!(
            m.reason
                .starts_with("build: utilisation 1.30 → 0.87, expected wait unbounded → "),
            "{}",
            m.reason
        );
        assert!(
            m.reason.contains("report: utilisation 0.17 → 0.25"),
            "{}",
            m.reason
        );
    }

    #[test]
    fn the_dwell_time_is_respected() {
        let demands = [
            demand("build", 2.6, 1000.0, 2),
            demand("report", 0.5, 1000.0, 2),
        ];
        // Moved 10 s ago, dwell 60 s: it stays, whatever the imbalance.
        let agents = [agent("flex-1", "report", Some(990_000))];
        assert!(rebalance(&demands, &agents, 1_000_000, 60_000).is_empty());
        // Once the dwell time is over it moves.
        assert_eq!(rebalance(&demands, &agents, 1_050_000, 60_000).len(), 1);
        // A dwelling agent still counts where it is: with two flexible
        // agents on report, one dwelling, the other moves to build.
        let agents = [
            agent("flex-1", "report", Some(990_000)),
            agent("flex-2", "report", None),
        ];
        let moves = rebalance(&demands, &agents, 1_000_000, 60_000);
        assert_eq!(moves.len(), 1);
        assert_eq!(moves[0].agent.as_str(), "flex-2");
    }

    #[test]
    fn balanced_stages_do_not_flap() {
        // Two equal stages, two flexible agents each: nothing to gain.
        let demands = [
            demand("build", 2.0, 1000.0, 1),
            demand("report", 2.0, 1000.0, 1),
        ];
        let agents = [
            agent("a", "build", None),
            agent("b", "build", None),
            agent("c", "report", None),
            agent("d", "report", None),
        ];
        assert!(rebalance(&demands, &agents, 0, 0).is_empty());
        // Slightly unequal: a move would save little, so nobody moves.
        let demands = [
            demand("build", 2.1, 1000.0, 1),
            demand("report", 1.9, 1000.0, 1),
        ];
        assert!(rebalance(&demands, &agents, 0, 0).is_empty());
        // After a real move, asking again gives no move back.
        let demands = [
            demand("build", 3.5, 1000.0, 1),
            demand("report", 0.5, 1000.0, 1),
        ];
        let moves = rebalance(&demands, &agents, 0, 0);
        assert!(!moves.is_empty());
        assert!(moves.iter().all(|m| m.to.as_str() == "build"), "{moves:?}");
        let moved: Vec<FlexibleAgent> = agents
            .iter()
            .map(|a| {
                let mut a = a.clone();
                if let Some(m) = moves.iter().find(|m| m.agent == a.id) {
                    a.stage = m.to.clone();
                }
                a
            })
            .collect();
        assert!(rebalance(&demands, &moved, 0, 0).is_empty());
    }

    #[test]
    fn agents_are_not_swapped_for_nothing() {
        // A at report, B at build, build needs both flexible agents less
        // than report... one each is right: no moves, not a swap.
        let demands = [
            demand("build", 1.5, 1000.0, 1),
            demand("report", 1.5, 1000.0, 1),
        ];
        let agents = [agent("a", "report", None), agent("b", "build", None)];
        assert!(rebalance(&demands, &agents, 0, 0).is_empty());
    }

    #[test]
    fn prefetch_covers_the_round_trip() {
        assert_eq!(prefetch_for(4, 5.0, 100.0, 1000), 8); // 4 × (1 + 1)
        assert_eq!(prefetch_for(2, 50.0, 10.0, 1000), 12); // 2 × (1 + 5)
        assert_eq!(prefetch_for(2, 50.0, 10.0, 8), 8); // capped
        assert_eq!(prefetch_for(16, 50.0, 10.0, 8), 16); // never below concurrency
        assert_eq!(prefetch_for(0, 0.0, 10.0, 8), 1);
        assert_eq!(prefetch_for(3, 10.0, 0.0, 64), 64); // unknown service: the cap
        assert_eq!(prefetch_for(3, 0.0, 0.0, 64), 3); // no round trip known
    }

    #[test]
    fn wait_formatting() {
        assert_eq!(format_wait(350.0), "350 ms");
        assert_eq!(format_wait(2_100.0), "2.1 s");
        assert_eq!(format_wait(41_000.0), "41 s");
        assert_eq!(format_wait(750_000.0), "12.5 min");
    }
}

//! Re-planning, every sync period: the capacity [`Planner`] sizes each
//! stage, and the core turns its plans into notices for the runtime: a new
//! recommended worker count (for the scaling actuators), agents that can
//! serve several stages moved where they lower the total expected wait, and
//! prefetch sized to each agent's broker round trip.
//!
//! Nothing here runs while the stream's history is replayed: decisions are
//! taken on live state only.
//!
//! [`Planner`]: crate::capacity::Planner

use super::telemetry::Gauge;
use super::views::{ScalingStage, ScalingView};
use super::{Core, Notice, push_notice};
use crate::capacity::{FlexibleAgent, StageDemand, StagePlan, prefetch_for, rebalance};
use guildhall_proto::{AgentId, Stage};
use serde::Serialize;
use std::collections::BTreeMap;

/// Rebalancing moves remembered for the API.
const MAX_MOVES: usize = 100;

/// A rebalancing move the coordinator asked for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MoveRecord {
    /// When it was decided.
    pub at_ms: u64,
    /// The agent.
    pub worker: String,
    /// Where it was.
    pub from: String,
    /// Where it was sent.
    pub to: String,
    /// Why.
    pub reason: String,
}

impl Core {
    /// Re-plans every stage and turns the plans into notices.
    pub(super) fn replan(&mut self, now_ms: u64) {
        self.hint_planner(now_ms);
        let plans = self.planner.plan(now_ms);
        for p in &plans {
            self.export_plan(p);
            if p.changed {
                push_notice(
                    &mut self.notices,
                    Notice::Scale {
                        stage: p.stage.clone(),
                        from: p.current_workers,
                        to: p.recommended_workers,
                        reason: p.reason.clone(),
                    },
                );
            }
        }
        if self.config.rebalance {
            self.rebalance(&plans, now_ms);
        }
        self.size_prefetch();
    }

    /// Tells the planner, per stage, which priority bands have traffic and
    /// how many scheduled tasks fall due within the lead time.
    fn hint_planner(&mut self, now_ms: u64) {
        let until = now_ms.saturating_add(self.planner.config().lead_time_ms);
        let counts = super::eta::BandCounts::of(self.tasks.iter(), now_ms, until);
        for (name, s) in &self.stages {
            let c = counts.get(name).copied().unwrap_or_default();
            let hints = crate::capacity::StageHints {
                traffic: s.bands.traffic(now_ms, c.queued),
                due_soon: c.due_by as u64,
            };
            self.planner.set_hints(name, hints);
        }
    }

    fn export_plan(&mut self, p: &StagePlan) {
        let stage = p.stage.as_str();
        self.telemetry.set(Gauge::RecommendedWorkers {
            stage,
            n: i64::from(p.recommended_workers),
        });
        for (bound, rate) in [
            ("point", p.forecast.rate),
            ("lower", p.forecast.lower),
            ("upper", p.forecast.upper),
        ] {
            self.telemetry
                .set(Gauge::ForecastArrivalRate { stage, bound, rate });
        }
    }

    /// Moves agents that can serve several stages where they lower the total
    /// expected wait most (greedy marginal allocation), respecting the dwell
    /// time.
    fn rebalance(&mut self, plans: &[StagePlan], now_ms: u64) {
        let flexible: Vec<FlexibleAgent> = self
            .workers
            .values()
            .filter(|w| w.is_flexible() && w.is_consuming())
            .map(|w| FlexibleAgent {
                id: w.id.clone(),
                stage: w.stage.clone(),
                can_serve: w.stages.clone(),
                slots: w.concurrency,
                last_move_ms: w.last_move_ms,
            })
            .collect();
        if flexible.is_empty() {
            return;
        }
        // In id order, not the workers table's (a `HashMap`): ties between
        // agents resolve the same way on every run.
        let mut flexible = flexible;
        flexible.sort_by(|a, b| a.id.cmp(&b.id));
        let mut fixed: BTreeMap<&Stage, u32> = BTreeMap::new();
        for w in self.workers.values() {
            if w.is_consuming() && !w.is_flexible() {
                *fixed.entry(&w.stage).or_default() += w.concurrency;
            }
        }
        let demands: Vec<StageDemand> = plans
            .iter()
            .filter_map(|p| {
                Some(StageDemand {
                    stage: p.stage.clone(),
                    arrival_rate: p.sizing_rate.max(p.arrival_rate),
                    service_mean_ms: p.service_mean_ms?,
                    service_scv: p.service_scv.unwrap_or(1.0),
                    arrival_scv: p.arrival_scv,
                    fixed_slots: fixed.get(&p.stage).copied().unwrap_or(0),
                })
            })
            .collect();
        for mv in rebalance(&demands, &flexible, now_ms, self.config.min_dwell_ms) {
            if let Some(w) = self.workers.get_mut(&mv.agent) {
                // Counts as moved now, so it is not asked again before it answers.
                w.last_move_ms = Some(now_ms);
            }
            tracing::info!(worker = %mv.agent, from = %mv.from, to = %mv.to, reason = %mv.reason, "rebalancing");
            if self.moves.len() >= MAX_MOVES {
                self.moves.pop_front();
            }
            self.moves.push_back(MoveRecord {
                at_ms: now_ms,
                worker: mv.agent.to_string(),
                from: mv.from.to_string(),
                to: mv.to.to_string(),
                reason: mv.reason.clone(),
            });
            push_notice(
                &mut self.notices,
                Notice::Assign {
                    worker: mv.agent,
                    from: mv.from,
                    to: mv.to,
                    reason: mv.reason,
                },
            );
        }
    }

    /// Asks each agent for a prefetch of about its round trip over its
    /// stage's service time, per slot, when that changed.
    fn size_prefetch(&mut self) {
        let cap = self.config.prefetch_cap;
        let mut asks: Vec<(AgentId, u32)> = Vec::new();
        for w in self.workers.values_mut() {
            if !w.is_consuming() {
                continue;
            }
            let (Some(rtt), Some(service)) = (
                w.rtt_ms,
                self.stages.get(&w.stage).and_then(|s| s.durations.mean()),
            ) else {
                continue;
            };
            let prefetch = prefetch_for(w.concurrency, f64::from(rtt), service, cap);
            if w.prefetch_sent != Some(prefetch) {
                w.prefetch_sent = Some(prefetch);
                asks.push((w.id.clone(), prefetch));
            }
        }
        // The workers table is a `HashMap`: the asks go out in id order, so
        // the same inputs give the same notices in the same order.
        asks.sort_unstable();
        for (worker, prefetch) in asks {
            push_notice(&mut self.notices, Notice::SetPrefetch { worker, prefetch });
        }
    }

    /// Recent rebalancing moves, oldest first.
    pub fn moves(&self) -> impl Iterator<Item = &MoveRecord> {
        self.moves.iter()
    }

    /// The last plan of every stage.
    pub fn plans(&self) -> impl Iterator<Item = &StagePlan> {
        self.stages.keys().filter_map(|s| self.planner.stage(s))
    }

    /// The capacity settings.
    pub fn capacity(&self) -> &crate::capacity::CapacityConfig {
        self.planner.config()
    }

    /// `GET /api/scaling`: every stage's sizing and the recent moves.
    pub fn scaling_view(&self, now_ms: u64) -> ScalingView {
        let bottleneck = super::stages::bottleneck(&self.stage_loads(now_ms)).map(|(s, _)| s);
        let config = self.planner.config();
        ScalingView {
            stages: self
                .plans()
                .map(|p| ScalingStage {
                    bottleneck: bottleneck.as_ref() == Some(&p.stage),
                    plan: p.clone(),
                })
                .collect(),
            moves: self.moves.iter().cloned().collect(),
            wait_target_ms: config.wait_target_ms,
            wait_quantile: config.wait_quantile,
            lead_time_ms: config.lead_time_ms,
        }
    }
}

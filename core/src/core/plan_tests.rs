//! Re-planning on virtual time: scale decisions, rebalancing moves and
//! prefetch, as notices.

use super::stages::QueueStats;
use super::telemetry::Count;
use super::test_support::{Sim, st};
use super::*;
use guildhall_proto::*;

struct AgentSpec<'a> {
    id: &'a str,
    stage: &'a str,
    stages: &'a [&'a str],
    concurrency: u32,
    rtt_ms: Option<u32>,
}

/// A caught-up core re-planning every 15 s, moves dwelling 60 s.
fn fleet() -> Sim {
    Sim::with(CoreConfig {
        sync_period_ms: 15_000,
        min_dwell_ms: 60_000,
        ..CoreConfig::default()
    })
}

/// The agents and load of this file's scenarios, on the shared driver.
trait Agents {
    fn hello_and_heartbeat(&mut self, a: &AgentSpec<'_>);
    fn beat(&mut self, a: &AgentSpec<'_>);
    fn second(&mut self, stage: &str, agent: &str, rate: u32, service_ms: u64, backlog: u64);
}

impl Agents for Sim {
    fn hello_and_heartbeat(&mut self, a: &AgentSpec<'_>) {
        let hello = self.hello(a.stage, a.stages, a.concurrency);
        self.send(a.id, vec![hello]);
        self.beat(a);
    }

    fn beat(&mut self, a: &AgentSpec<'_>) {
        let stage = self
            .core
            .worker_view(a.id, self.now)
            .map(|w| w.stage)
            .unwrap_or_else(|| a.stage.to_owned());
        let hb = Event::Heartbeat(Box::new(Heartbeat {
            at_ms: self.now,
            version: "v".into(),
            stage: st(&stage),
            next: None,
            state: AgentState::Idle,
            concurrency: a.concurrency,
            heartbeat_ms: 1000,
            in_hand: vec![],
            done: 0,
            failed: 0,
            worker: None,
            agent: None,
            hostname: "h".into(),
            worker_restarts: 0,
            rtt_ms: a.rtt_ms,
        }));
        self.send(a.id, vec![hb]);
    }

    /// One second of `rate` tasks/s through `stage`, each taking `service_ms`
    /// at `agent`; the broker reports `backlog` ready.
    fn second(&mut self, stage: &str, agent: &str, rate: u32, service_ms: u64, backlog: u64) {
        let mut events = Vec::new();
        for i in 0..rate {
            let id = self.next_task();
            let at = self.now + u64::from(i) * 1000 / u64::from(rate.max(1));
            events.push(Event::TaskSubmitted(TaskSubmitted {
                at_ms: at,
                task_id: id.clone(),
                stage: st(stage),
                payload_bytes: 0,
            }));
            self.send("producer", std::mem::take(&mut events));
            events.push(Event::TaskStarted(TaskStarted {
                at_ms: at,
                task_id: id.clone(),
                stage: st(stage),
                attempt: 1,
                enqueued_at_ms: Some(at),
                submitted_at_ms: Some(at),
                redelivered: false,
            }));
            events.push(Event::TaskSucceeded(TaskSucceeded {
                at_ms: at + service_ms,
                task_id: id,
                stage: st(stage),
                attempt: 1,
                started_at_ms: at,
                next: None,
                submitted_at_ms: Some(at),
            }));
            self.send(agent, std::mem::take(&mut events));
        }
        self.core.handle_queue_stats(
            self.now,
            &st(stage),
            QueueStats {
                ready: backlog,
                unacked: Some(0),
                consumers: 1,
            },
        );
    }
}

#[test]
fn a_growing_load_raises_the_recommendation_and_says_so() {
    let mut f = fleet();
    let a = AgentSpec {
        id: "w1",
        stage: "build",
        stages: &["build"],
        concurrency: 1,
        rtt_ms: None,
    };
    f.hello_and_heartbeat(&a);
    // 1 task/s of 500 ms on one slot: fine. Then 8/s: far too much.
    for second in 0..120 {
        let rate = if second < 60 { 1 } else { 8 };
        f.beat(&a);
        f.second("build", "w1", rate, 500, if second < 60 { 0 } else { 50 });
        f.advance(1_000);
    }
    let scales: Vec<(u32, u32)> = f
        .all_notices()
        .into_iter()
        .filter_map(|n| match n {
            Notice::Scale { from, to, .. } => Some((from, to)),
            _ => None,
        })
        .collect();
    let &(from, to) = scales.last().expect("a scale decision");
    assert_eq!(from, 1, "{scales:?}");
    assert!(
        to >= 5,
        "8/s of 500 ms needs at least 4 slots, and more for the wait target: {scales:?}"
    );
    let view = f.core.scaling_view(f.now);
    let plan = &view.stages[0];
    assert_eq!(plan.plan.recommended_workers, to);
    assert!(plan.bottleneck);
    assert!(!plan.plan.reason.is_empty());
    let gauges = f.recorder.recorded().gauges;
    assert_eq!(
        gauges["RecommendedWorkers { stage: \"build\""],
        format!("RecommendedWorkers {{ stage: \"build\", n: {to} }}"),
        "{gauges:?}"
    );
    assert!(
        gauges.contains_key("ForecastArrivalRate { stage: \"build\", bound: \"upper\""),
        "{gauges:?}"
    );
}

#[test]
fn a_flexible_agent_moves_to_the_overloaded_stage_and_then_dwells() {
    let mut f = fleet();
    let fixed_a = AgentSpec {
        id: "a1",
        stage: "a",
        stages: &["a"],
        concurrency: 2,
        rtt_ms: None,
    };
    let fixed_b = AgentSpec {
        id: "b1",
        stage: "b",
        stages: &["b"],
        concurrency: 1,
        rtt_ms: None,
    };
    let flex = AgentSpec {
        id: "flex",
        stage: "a",
        stages: &["a", "b"],
        concurrency: 2,
        rtt_ms: None,
    };
    for a in [&fixed_a, &fixed_b, &flex] {
        f.hello_and_heartbeat(a);
    }
    // a: 1/s of 100 ms on 4 slots (idle); b: 3/s of 500 ms on 1 slot (unstable).
    for _ in 0..30 {
        for a in [&fixed_a, &fixed_b, &flex] {
            f.beat(a);
        }
        f.second("a", "a1", 1, 100, 0);
        f.second("b", "b1", 3, 500, 40);
        f.advance(1_000);
    }
    let moves: Vec<(AgentId, Stage, Stage, String)> = f
        .all_notices()
        .into_iter()
        .filter_map(|n| match n {
            Notice::Assign {
                worker,
                from,
                to,
                reason,
            } => Some((worker, from, to, reason)),
            _ => None,
        })
        .collect();
    assert_eq!(moves.len(), 1, "{moves:?}");
    let (worker, from, to, reason) = &moves[0];
    assert_eq!(
        (worker.as_str(), from.as_str(), to.as_str()),
        ("flex", "a", "b")
    );
    assert!(reason.contains('b'), "{reason}");
    let view = f.core.scaling_view(f.now);
    assert_eq!(view.moves.len(), 1);
    assert_eq!(view.moves[0].to, "b");
    // The agent has not confirmed yet, but it is not asked again meanwhile.
    for _ in 0..30 {
        for a in [&fixed_a, &fixed_b, &flex] {
            f.beat(a);
        }
        f.second("b", "b1", 3, 500, 40);
        f.advance(1_000);
    }
    assert!(
        !f.all_notices()
            .iter()
            .any(|n| matches!(n, Notice::Assign { .. })),
        "inside its dwell time"
    );
    // Its move, as the agent reports it.
    f.send(
        "flex",
        vec![Event::Reassigned(Reassigned {
            at_ms: f.now,
            from: st("a"),
            to: st("b"),
            reason: reason.clone(),
        })],
    );
    assert_eq!(f.core.worker_view("flex", f.now).unwrap().stage, "b");
    assert_eq!(
        f.recorder
            .count_of(Count::WorkerMove { from: "a", to: "b" }),
        1
    );
}

#[test]
fn prefetch_follows_round_trip_over_service_time_and_is_asked_once() {
    let mut f = fleet();
    let a = AgentSpec {
        id: "w1",
        stage: "fast",
        stages: &["fast"],
        concurrency: 2,
        rtt_ms: Some(10),
    };
    f.hello_and_heartbeat(&a);
    for _ in 0..40 {
        f.beat(&a);
        f.second("fast", "w1", 5, 5, 0);
        f.advance(1_000);
    }
    let asks: Vec<u32> = f
        .all_notices()
        .into_iter()
        .filter_map(|n| match n {
            Notice::SetPrefetch { worker, prefetch } if worker.as_str() == "w1" => Some(prefetch),
            _ => None,
        })
        .collect();
    // 2 slots x (1 + ceil(10 ms / 5 ms)) = 6, asked once.
    assert_eq!(asks, [6]);
}

#[test]
fn nothing_is_decided_while_the_history_is_replayed() {
    let config = CoreConfig {
        marker_nonce: Some(7),
        ..CoreConfig::default()
    };
    let mut f = Sim::replaying(config);
    let a = AgentSpec {
        id: "w1",
        stage: "build",
        stages: &["build", "other"],
        concurrency: 1,
        rtt_ms: Some(50),
    };
    f.hello_and_heartbeat(&a);
    for _ in 0..60 {
        f.beat(&a);
        f.second("build", "w1", 8, 500, 50);
        f.advance(1_000);
    }
    assert!(f.all_notices().is_empty());
    assert!(f.core.scaling_view(f.now).stages.is_empty());
}

//! The core on virtual time: no broker, no clock, no sleeps.

use super::query::TaskFilter;
use super::stages::QueueStats;
use super::tasks::TaskStatus;
use super::test_support::{T0, aid, st, tid};
use super::*;
use crate::metrics::Metrics;
use guildhall_proto::*;

/// A core plus a virtual clock and per-sender sequence numbers.
pub(super) struct Sim {
    pub(super) core: Core,
    pub(super) now: u64,
    pub(super) seqs: HashMap<String, u64>,
    /// The incarnation every envelope is sent with (a restarted agent
    /// draws a new one).
    pub(super) incarnation: u64,
}

impl Sim {
    pub(super) fn new() -> Self {
        Self::with(CoreConfig::default())
    }

    pub(super) fn with(config: CoreConfig) -> Self {
        let mut core = Core::new(config, Metrics::new(true), T0);
        core.set_caught_up(T0);
        Self {
            core,
            now: T0,
            seqs: HashMap::new(),
            incarnation: 1,
        }
    }

    /// Advances the clock, running every timeout on the way like the runtime would.
    pub(super) fn advance(&mut self, ms: u64) {
        let end = self.now + ms;
        while let Some(deadline) = self.core.poll_timeout() {
            if deadline > end {
                break;
            }
            self.now = self.now.max(deadline);
            self.core.handle_timeout(self.now);
        }
        self.now = end;
        self.core.handle_timeout(self.now);
    }

    pub(super) fn send_at(&mut self, sender: &str, sent_at: u64, events: Vec<Event>) {
        let seq = self.seqs.entry(sender.into()).or_insert(0);
        *seq += 1;
        let env = Envelope {
            sender: aid(sender),
            incarnation: self.incarnation,
            seq: *seq,
            sent_at_ms: sent_at,
            events,
        };
        self.core.handle_envelope(
            self.now,
            Decoded {
                envelope: env,
                skipped: 0,
            },
            Some(*seq),
        );
    }

    pub(super) fn send(&mut self, sender: &str, events: Vec<Event>) {
        self.send_at(sender, self.now, events);
    }

    pub(super) fn heartbeat(&self, stage: &str, state: AgentState, in_hand: &[&str]) -> Event {
        Event::Heartbeat(Box::new(Heartbeat {
            at_ms: self.now,
            version: "0.1.0".into(),
            stage: st(stage),
            next: None,
            state,
            concurrency: 1,
            heartbeat_ms: 1000,
            in_hand: in_hand
                .iter()
                .map(|t| TaskInHand {
                    task_id: tid(t),
                    attempt: 1,
                    started_at_ms: self.now,
                })
                .collect(),
            done: 0,
            failed: 0,
            worker: Some(ProcStats {
                pid: 9,
                cpu_ratio: 0.25,
                rss_bytes: 1 << 20,
            }),
            agent: None,
            hostname: "h".into(),
            worker_restarts: 0,
            rtt_ms: None,
        }))
    }

    pub(super) fn hb_next(&self, stage: &str, next: Option<&str>) -> Event {
        let mut e = self.heartbeat(stage, AgentState::Idle, &[]);
        if let Event::Heartbeat(h) = &mut e {
            h.next = next.map(st);
        }
        e
    }

    pub(super) fn submitted(&self, task: &str, stage: &str) -> Event {
        Event::TaskSubmitted(TaskSubmitted {
            at_ms: self.now,
            task_id: tid(task),
            stage: st(stage),
            payload_bytes: 1,
        })
    }

    pub(super) fn started(&self, task: &str, stage: &str, attempt: u32, enqueued: u64) -> Event {
        Event::TaskStarted(TaskStarted {
            at_ms: self.now,
            task_id: tid(task),
            stage: st(stage),
            attempt,
            enqueued_at_ms: Some(enqueued),
            submitted_at_ms: Some(T0),
            redelivered: false,
        })
    }

    pub(super) fn succeeded(
        &self,
        task: &str,
        stage: &str,
        attempt: u32,
        started: u64,
        next: Option<&str>,
    ) -> Event {
        Event::TaskSucceeded(TaskSucceeded {
            at_ms: self.now,
            task_id: tid(task),
            stage: st(stage),
            attempt,
            started_at_ms: started,
            next: next.map(st),
            submitted_at_ms: Some(T0),
        })
    }

    pub(super) fn failed(
        &self,
        task: &str,
        stage: &str,
        attempt: u32,
        started: u64,
        retryable: bool,
    ) -> Event {
        Event::TaskFailed(TaskFailed {
            at_ms: self.now,
            task_id: tid(task),
            stage: st(stage),
            attempt,
            started_at_ms: started,
            error: "HTTP 503: busy".into(),
            error_class: "http_503".into(),
            retryable,
        })
    }

    pub(super) fn worker(&self, id: &str) -> views::WorkerView {
        self.core.worker_view(id, self.now).expect("worker tracked")
    }

    /// Notices, but error tracking's (new and rising error classes, tested
    /// in `errors_tests.rs`).
    pub(super) fn notices(&mut self) -> Vec<Notice> {
        std::iter::from_fn(|| self.core.poll_notice())
            .filter(|n| {
                !matches!(
                    n,
                    Notice::ErrorClassNew { .. } | Notice::ErrorClassRising { .. }
                )
            })
            .collect()
    }

    pub(super) fn metrics(&self) -> String {
        self.core.metrics_text(self.now)
    }
}

#[test]
fn a_worker_is_dead_after_exactly_three_missed_heartbeats() {
    let mut sim = Sim::new();
    let hb = sim.heartbeat("build", AgentState::Processing, &["T1"]);
    sim.send("w1", vec![hb]);
    assert_eq!(sim.worker("w1").status, "processing");
    assert_eq!(
        sim.core.poll_timeout(),
        Some(T0 + 1_000),
        "housekeeping first"
    );
    sim.advance(1_999);
    assert_eq!(sim.worker("w1").status, "processing");
    sim.advance(1);
    assert_eq!(
        sim.worker("w1").status,
        "suspect",
        "two intervals of silence"
    );
    assert_eq!(sim.worker("w1").suspect_since_ms, Some(T0 + 2_000));
    sim.advance(999);
    assert_eq!(sim.worker("w1").status, "suspect");
    assert!(sim.notices().is_empty());
    sim.advance(1);
    assert_eq!(
        sim.worker("w1").status,
        "dead",
        "three intervals of silence"
    );
    assert_eq!(
        sim.notices(),
        vec![Notice::WorkerDead {
            worker: aid("w1"),
            stage: st("build"),
            last_seen_ms: T0,
            tasks_requeued: vec![tid("T1")],
        }]
    );
    // It comes back: alive again, and the return is noticed.
    sim.advance(2_000);
    let hb = sim.heartbeat("build", AgentState::Idle, &[]);
    sim.send("w1", vec![hb]);
    assert_eq!(sim.worker("w1").status, "idle");
    assert_eq!(
        sim.notices(),
        vec![Notice::WorkerReturned {
            worker: aid("w1"),
            stage: st("build"),
            dead_for_ms: 2_000,
        }]
    );
}

#[test]
fn the_reported_state_shows_unless_the_worker_is_dead() {
    let mut sim = Sim::new();
    for (state, in_hand, want) in [
        (AgentState::Paused, &["T1"][..], "paused"),
        (AgentState::Draining, &["T1"][..], "draining"),
        (AgentState::Starting, &[][..], "starting"),
        (AgentState::Idle, &[][..], "idle"),
        (AgentState::Idle, &["T1"][..], "processing"),
    ] {
        let hb = sim.heartbeat("build", state, in_hand);
        sim.send("w1", vec![hb]);
        assert_eq!(sim.worker("w1").status, want, "{state:?}");
    }
    let hb = sim.heartbeat("build", AgentState::Paused, &[]);
    sim.send("w1", vec![hb]);
    sim.advance(3_000);
    assert_eq!(
        sim.worker("w1").status,
        "dead",
        "a paused worker still heartbeats"
    );
}

#[test]
fn regular_heartbeats_keep_a_worker_alive_with_one_pending_deadline() {
    let mut sim = Sim::new();
    for _ in 0..100 {
        let hb = sim.heartbeat("build", AgentState::Idle, &[]);
        sim.send("w1", vec![hb]);
        sim.advance(1_000);
    }
    assert_eq!(sim.worker("w1").status, "idle");
    assert!(
        sim.core.deadlines.len() <= 1,
        "{}",
        sim.core.deadlines.len()
    );
}

#[test]
fn the_heartbeat_interval_is_the_workers_own() {
    let mut sim = Sim::new();
    let mut hb = sim.heartbeat("build", AgentState::Idle, &[]);
    if let Event::Heartbeat(h) = &mut hb {
        h.heartbeat_ms = 200;
    }
    sim.send("fast", vec![hb]);
    sim.advance(399);
    assert_eq!(sim.worker("fast").status, "idle");
    sim.advance(1);
    assert_eq!(sim.worker("fast").status, "suspect");
    sim.advance(199);
    assert_eq!(sim.worker("fast").status, "suspect");
    sim.advance(1);
    assert_eq!(sim.worker("fast").status, "dead");
}

#[test]
fn nobody_is_judged_dead_while_replaying_history() {
    let mut core = Core::new(
        CoreConfig {
            marker_nonce: Some(42),
            ..CoreConfig::default()
        },
        Metrics::new(true),
        T0,
    );
    let now = T0 + 3_600_000;
    let hb = |stage: &str, at: u64| {
        Event::Heartbeat(Box::new(Heartbeat {
            at_ms: at,
            version: "v".into(),
            stage: st(stage),
            next: None,
            state: AgentState::Idle,
            concurrency: 1,
            heartbeat_ms: 1000,
            in_hand: vec![],
            done: 0,
            failed: 0,
            worker: None,
            agent: None,
            hostname: "h".into(),
            worker_restarts: 0,
            rtt_ms: None,
        }))
    };
    let env = |sender: &str, at: u64, events: Vec<Event>| Decoded {
        envelope: Envelope {
            sender: aid(sender),
            incarnation: 1,
            seq: 1,
            sent_at_ms: at,
            events,
        },
        skipped: 0,
    };
    // History: "old" last spoke an hour ago, "recent" a moment ago.
    core.handle_envelope(now, env("old", T0, vec![hb("a", T0)]), Some(0));
    core.handle_envelope(
        now,
        env("recent", now - 500, vec![hb("a", now - 500)]),
        Some(1),
    );
    core.handle_timeout(now);
    assert!(!core.is_caught_up());
    assert_eq!(
        core.worker_view("old", now).unwrap().status,
        "idle",
        "no verdict during replay"
    );
    // Our own marker comes back: we are live.
    let marker = Event::Marker(Marker {
        at_ms: now,
        nonce: 42,
    });
    core.handle_envelope(
        now,
        env("guildhall-coordinator", now, vec![marker]),
        Some(2),
    );
    assert!(core.is_caught_up());
    assert_eq!(core.worker_view("old", now).unwrap().status, "dead");
    assert_eq!(core.worker_view("recent", now).unwrap().status, "idle");
    assert_eq!(
        core.worker_view("recent", now).unwrap().last_seen_at_ms,
        now - 500
    );
    // Another coordinator's marker changes nothing.
    let mut other = Core::new(CoreConfig::default(), Metrics::new(true), T0);
    other.handle_envelope(
        now,
        env(
            "x",
            now,
            vec![Event::Marker(Marker {
                at_ms: now,
                nonce: 42,
            })],
        ),
        None,
    );
    assert!(!other.is_caught_up());
}

#[test]
fn a_stopping_agent_is_stopped_not_dead_and_is_forgotten_after_retention() {
    let mut sim = Sim::with(CoreConfig {
        worker_retention_ms: 60_000,
        ..CoreConfig::default()
    });
    let hb = sim.heartbeat("build", AgentState::Idle, &[]);
    sim.send("w1", vec![hb]);
    sim.metrics();
    assert!(
        sim.metrics()
            .contains("guildhall_worker_up{stage=\"build\",worker=\"w1\"} 1")
    );
    sim.send(
        "w1",
        vec![Event::AgentStopping(AgentStopping {
            at_ms: sim.now,
            reason: "drain".into(),
        })],
    );
    sim.advance(10_000);
    let w = sim.worker("w1");
    assert_eq!(w.status, "stopped");
    assert_eq!(w.stopped_reason.as_deref(), Some("drain"));
    assert!(sim.notices().is_empty(), "a clean stop is not a death");
    sim.advance(60_000);
    assert!(sim.core.worker_view("w1", sim.now).is_none());
    assert!(
        !sim.metrics().contains("worker=\"w1\""),
        "its series are removed"
    );
}

#[test]
fn worker_view_carries_current_tasks_times_rates_and_resources() {
    let mut sim = Sim::new();
    let hb = sim.heartbeat("build", AgentState::Idle, &[]);
    sim.send("w1", vec![hb]);
    sim.core.handle_queue_stats(
        sim.now,
        &st("build"),
        QueueStats {
            ready: 7,
            unacked: Some(1),
            consumers: 1,
        },
    );
    for i in 0..10u64 {
        let start = sim.now;
        let e = sim.started(&format!("T{i}"), "build", 1, start - 50);
        sim.send("w1", vec![e]);
        if i == 9 {
            break;
        }
        sim.advance(100 + i * 10);
        let e = sim.succeeded(&format!("T{i}"), "build", 1, start, None);
        sim.send("w1", vec![e]);
    }
    sim.advance(40);
    let w = sim.worker("w1");
    assert_eq!(w.status, "processing");
    assert_eq!(w.current_tasks.len(), 1);
    assert_eq!(w.current_tasks[0].task_id, "T9");
    assert_eq!(w.current_tasks[0].running_ms, 40);
    assert_eq!(w.queue_size, Some(7));
    assert_eq!(w.queue_unacked, Some(1));
    assert_eq!(w.avg_processing_ms, Some(140.0));
    assert_eq!(w.p95_processing_ms, Some(180));
    assert_eq!(w.last_completed_ago_ms, Some(40));
    assert!(w.throughput_per_s > 0.0);
    assert_eq!(w.cpu_ratio, Some(0.25));
    assert_eq!(w.memory_bytes, Some(1 << 20));
    assert_eq!(w.mode, None);
}

#[test]
fn a_task_through_three_stages_has_one_row_per_attempt_and_matching_metrics() {
    let mut sim = Sim::new();
    let e = sim.submitted("T1", "intake");
    sim.send("cli", vec![e]);
    sim.advance(100);
    let e = sim.started("T1", "intake", 1, T0);
    sim.send("wa", vec![e]);
    let s = sim.now;
    sim.advance(200);
    let e = sim.succeeded("T1", "intake", 1, s, Some("build"));
    sim.send("wa", vec![e]);
    sim.advance(50);
    let e = sim.started("T1", "build", 1, sim.now - 50);
    sim.send("wb", vec![e]);
    let s = sim.now;
    sim.advance(300);
    let f = sim.failed("T1", "build", 1, s, true);
    let r = Event::TaskRetrying(TaskRetrying {
        at_ms: sim.now,
        task_id: tid("T1"),
        stage: st("build"),
        attempt: 1,
        delay_ms: 1_000,
    });
    sim.send("wb", vec![f, r]);
    assert_eq!(
        sim.core.task_view("T1", sim.now).unwrap().status,
        "retrying"
    );
    sim.advance(1_000);
    assert_eq!(
        sim.core.task_view("T1", sim.now).unwrap().status,
        "queued",
        "the delay is over"
    );
    sim.advance(10);
    let e = sim.started("T1", "build", 2, sim.now - 10);
    sim.send("wb2", vec![e]);
    let s = sim.now;
    sim.advance(100);
    let e = sim.succeeded("T1", "build", 2, s, Some("report"));
    sim.send("wb2", vec![e]);
    let e = sim.started("T1", "report", 1, sim.now);
    sim.send("wc", vec![e]);
    let s = sim.now;
    sim.advance(40);
    let e = sim.succeeded("T1", "report", 1, s, None);
    sim.send("wc", vec![e]);

    let t = sim.core.task_view("T1", sim.now).unwrap();
    assert_eq!(t.status, "succeeded");
    assert_eq!(t.duration_ms, Some(1_800));
    let rows: Vec<_> = t
        .attempts
        .iter()
        .map(|a| {
            (
                a.stage.as_str(),
                a.attempt,
                a.worker.as_deref(),
                a.outcome,
                a.duration_ms,
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("intake", 1, Some("wa"), "succeeded", Some(200)),
            ("build", 1, Some("wb"), "retried", Some(300)),
            ("build", 2, Some("wb2"), "succeeded", Some(100)),
            ("report", 1, Some("wc"), "succeeded", Some(40)),
        ]
    );
    assert_eq!(t.attempts[0].wait_ms, Some(100));
    assert_eq!(t.attempts[1].error.as_deref(), Some("HTTP 503: busy"));
    assert_eq!(t.attempts[1].error_class.as_deref(), Some("http_503"));

    let text = sim.metrics();
    for line in [
        "guildhall_tasks_total{outcome=\"succeeded\",stage=\"intake\"} 1",
        "guildhall_tasks_total{outcome=\"retried\",stage=\"build\"} 1",
        "guildhall_tasks_total{outcome=\"succeeded\",stage=\"build\"} 1",
        "guildhall_tasks_submitted_total{stage=\"intake\"} 1",
        "guildhall_tasks_started_total{stage=\"build\"} 2",
        "guildhall_tasks_completed_total 1",
        "guildhall_pipeline_duration_seconds_count 1",
        "guildhall_pipeline_duration_seconds_sum 1.8",
        "guildhall_task_duration_seconds_count{stage=\"build\"} 2",
        "guildhall_task_queue_wait_seconds_count{stage=\"intake\"} 1",
        "guildhall_events_ingested_total{kind=\"task_started\"} 4",
        "guildhall_tasks_tracked{state=\"completed\"} 1",
    ] {
        assert!(text.contains(line), "missing {line}\n{text}");
    }
}

#[test]
fn rows_share_the_stage_and_worker_names_instead_of_copying_each_events() {
    // Every event below is decoded afresh (its own copy of each name); the
    // rows keep the stage table's and the worker table's copies.
    let mut sim = Sim::new();
    let hb = sim.heartbeat("intake", AgentState::Idle, &[]);
    sim.send("wa", vec![hb]);
    for task in ["T1", "T2"] {
        let e = sim.started(task, "intake", 1, T0);
        sim.send("wa", vec![e]);
        let e = sim.succeeded(task, "intake", 1, sim.now, Some("build"));
        sim.send("wa", vec![e]);
    }
    let t1 = sim.core.tasks.get("T1").unwrap();
    let t2 = sim.core.tasks.get("T2").unwrap();
    let (r1, r2) = (&t1.rows[0], &t2.rows[0]);
    assert_eq!(r1.stage, st("intake"));
    assert!(r1.stage.shares_text_with(&r2.stage));
    let (w1, w2) = (r1.worker.as_ref().unwrap(), r2.worker.as_ref().unwrap());
    assert!(w1.shares_text_with(w2));
    // The next stage, named only in `next`, is shared too.
    assert!(t1.rows[1].stage.shares_text_with(&t2.rows[1].stage));
    assert!(t1.stage.shares_text_with(&t1.rows[1].stage));
    // And a fresh copy of an equal name is not.
    assert!(!r1.stage.shares_text_with(&st("intake")));
}

#[test]
fn a_dead_lettered_task_is_finished_and_noticed() {
    let mut sim = Sim::new();
    let e = sim.started("T1", "build", 1, T0);
    sim.send("w", vec![e]);
    let f = sim.failed("T1", "build", 1, T0, false);
    let d = Event::TaskDeadLettered(TaskDeadLettered {
        at_ms: sim.now,
        task_id: tid("T1"),
        stage: st("build"),
        attempt: 1,
        error: "HTTP 400: bad input".into(),
    });
    sim.send("w", vec![f, d]);
    let t = sim.core.task_view("T1", sim.now).unwrap();
    assert_eq!(t.status, "dead_lettered");
    assert_eq!(t.attempts[0].outcome, "dead_lettered");
    assert_eq!(
        sim.notices(),
        vec![Notice::TaskDeadLettered {
            task: tid("T1"),
            stage: st("build"),
            error: "HTTP 400: bad input".into(),
        }]
    );
    assert!(
        sim.metrics()
            .contains("guildhall_tasks_total{outcome=\"dead_lettered\",stage=\"build\"} 1")
    );
}

#[test]
fn the_slow_stage_is_the_bottleneck_and_workers_are_counted_by_status() {
    let mut sim = Sim::new();
    for (w, stage) in [("a1", "a"), ("b1", "b")] {
        let hb = sim.hb_next(stage, if stage == "a" { Some("b") } else { None });
        sim.send(w, vec![hb]);
    }
    // 1 task/s through both; a takes 100 ms, b 800 ms.
    for i in 0..20 {
        let t = format!("T{i}");
        let e = sim.started(&t, "a", 1, sim.now);
        sim.send("a1", vec![e]);
        let s = sim.now;
        sim.advance(100);
        let e = sim.succeeded(&t, "a", 1, s, Some("b"));
        sim.send("a1", vec![e]);
        let e = sim.started(&t, "b", 1, sim.now);
        sim.send("b1", vec![e]);
        let s = sim.now;
        sim.advance(800);
        let e = sim.succeeded(&t, "b", 1, s, None);
        sim.send("b1", vec![e]);
        sim.advance(100);
        for (w, stage) in [("a1", "a"), ("b1", "b")] {
            let hb = sim.hb_next(stage, if stage == "a" { Some("b") } else { None });
            sim.send(w, vec![hb]);
        }
    }
    let view = sim.core.stages_view(sim.now);
    let b = view.bottleneck.expect("a bottleneck");
    assert_eq!(b.stage, "b");
    assert!(b.reason.contains("utilisation"), "{}", b.reason);
    let sb = view.stages.iter().find(|s| s.name == "b").unwrap();
    assert!(sb.bottleneck);
    let u = sb.utilisation.unwrap();
    assert!((0.7..0.9).contains(&u), "{u}");
    assert_eq!(sb.processing_ms.as_ref().unwrap().p50, 800);
    assert_eq!(sb.success_rate, Some(1.0));
    assert_eq!(view.stages[0].next.as_deref(), Some("b"));
    let text = sim.metrics();
    assert!(
        text.contains("guildhall_stage_bottleneck{stage=\"b\"} 1"),
        "{text}"
    );
    assert!(text.contains("guildhall_workers{stage=\"a\",status=\"idle\"} 1"));
    assert!(text.contains("guildhall_workers{stage=\"a\",status=\"dead\"} 0"));
}

#[test]
fn a_backlog_with_no_consumer_is_the_bottleneck() {
    let mut sim = Sim::new();
    assert!(sim.core.ensure_stage(sim.now, &st("orphan")));
    sim.core.handle_queue_stats(
        sim.now,
        &st("orphan"),
        QueueStats {
            ready: 12,
            unacked: Some(0),
            consumers: 0,
        },
    );
    let e = sim.submitted("O1", "orphan");
    sim.send("cli", vec![e]);
    sim.advance(2_500);
    let view = sim.core.stages_view(sim.now);
    assert_eq!(view.bottleneck.unwrap().stage, "orphan");
    assert_eq!(view.stages[0].backlog_age_ms, Some(2_500));
    assert!(
        sim.metrics()
            .contains("guildhall_stage_backlog_age_seconds{stage=\"orphan\"} 2.5")
    );
}

#[test]
fn eta_sums_the_rest_of_the_pipeline() {
    let mut sim = Sim::new();
    for (w, stage, next) in [("a1", "a", Some("b")), ("b1", "b", None)] {
        let hb = sim.hb_next(stage, next);
        sim.send(w, vec![hb]);
    }
    // Teach the stages their service times: a = 200 ms, b = 500 ms.
    for (stage, w, ms) in [("a", "a1", 200), ("b", "b1", 500)] {
        let e = sim.started("warm", stage, 1, sim.now);
        sim.send(w, vec![e]);
        let s = sim.now;
        sim.advance(ms);
        let e = sim.succeeded("warm", stage, 1, s, None);
        sim.send(w, vec![e]);
    }
    // The broker counts 4 ready at a (T among them, as a poll after its
    // submission would): the 3 the coordinator has not seen are taken to be
    // ahead of it; one worker of concurrency 1.
    sim.core.handle_queue_stats(
        sim.now,
        &st("a"),
        QueueStats {
            ready: 4,
            unacked: Some(0),
            consumers: 1,
        },
    );
    let e = sim.submitted("T", "a");
    sim.send("cli", vec![e]);
    let t = sim.core.task_view("T", sim.now).unwrap();
    // wait 3 x 200 + service 200 at a, then wait 0 + service 500 at b.
    assert_eq!(t.eta_in_ms, Some(1_300));
    assert_eq!(t.eta_at_ms, Some(sim.now + 1_300));
    // Running at a for 150 ms: 50 left there, then 500 at b.
    let e = sim.started("T", "a", 1, sim.now);
    sim.send("a1", vec![e]);
    sim.advance(150);
    let t = sim.core.task_view("T", sim.now).unwrap();
    assert_eq!(t.eta_in_ms, Some(550));
    let listed = sim.core.tasks_view(
        &TaskFilter {
            status: Some(TaskStatus::Running),
            stage: None,
            limit: 10,
        },
        sim.now,
    );
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].eta_at_ms, Some(sim.now + 550));
    assert_eq!(listed[0].worker.as_deref(), Some("a1"));
}

#[test]
fn task_list_filters_by_status_and_stage_newest_first() {
    let mut sim = Sim::new();
    for i in 0..5 {
        let e = sim.submitted(&format!("T{i}"), if i % 2 == 0 { "a" } else { "b" });
        sim.send("cli", vec![e]);
        sim.advance(10);
    }
    let e = sim.started("T4", "a", 1, T0);
    sim.send("w", vec![e]);
    let all = sim.core.tasks_view(
        &TaskFilter {
            limit: 3,
            ..TaskFilter::default()
        },
        sim.now,
    );
    let ids: Vec<_> = all.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["T4", "T3", "T2"]);
    let queued_a = sim.core.tasks_view(
        &TaskFilter {
            status: Some(TaskStatus::Queued),
            stage: Some(st("a")),
            limit: 100,
        },
        sim.now,
    );
    let ids: Vec<_> = queued_a.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["T2", "T0"]);
}

#[test]
fn finished_tasks_are_evicted_by_count_and_age_in_flight_ones_never() {
    let mut sim = Sim::with(CoreConfig {
        completed_limit: 10,
        completed_max_age_ms: 60_000,
        ..CoreConfig::default()
    });
    let e = sim.started("keep", "a", 1, T0);
    sim.send("w", vec![e]);
    for i in 0..50 {
        let e = sim.succeeded(&format!("done{i}"), "a", 1, sim.now, None);
        sim.send("w", vec![e]);
    }
    sim.advance(1_000);
    let o = sim.core.overview();
    assert_eq!(o.tasks_finished, 10);
    assert!(sim.core.task_view("done49", sim.now).is_some());
    assert!(sim.core.task_view("done0", sim.now).is_none());
    sim.advance(120_000);
    let o = sim.core.overview();
    assert_eq!(o.tasks_finished, 0);
    assert_eq!(o.tasks_in_flight, 1);
    assert!(sim.core.task_view("keep", sim.now).is_some());
}

#[test]
fn unreadable_input_and_limits_are_counted_not_fatal() {
    let mut sim = Sim::with(CoreConfig {
        max_stages: 2,
        max_workers: 1,
        ..CoreConfig::default()
    });
    sim.core.handle_malformed("malformed");
    sim.core.handle_envelope(
        sim.now,
        Decoded {
            envelope: Envelope {
                sender: aid("w1"),
                incarnation: 1,
                seq: 1,
                sent_at_ms: sim.now,
                events: vec![],
            },
            skipped: 2,
        },
        None,
    );
    for s in ["a", "b", "c"] {
        let e = sim.submitted("T", s);
        sim.send("cli", vec![e]);
    }
    let hb = sim.heartbeat("a", AgentState::Idle, &[]);
    sim.send("w1", vec![hb.clone()]);
    sim.send("w2", vec![hb]);
    assert_eq!(sim.core.stage_names().count(), 2);
    assert_eq!(sim.core.workers_view(sim.now).len(), 1);
    let text = sim.metrics();
    for line in [
        "guildhall_events_malformed_total{reason=\"malformed\"} 1",
        "guildhall_events_malformed_total{reason=\"unknown_event\"} 2",
        "guildhall_events_malformed_total{reason=\"stage_limit\"} 1",
        "guildhall_events_malformed_total{reason=\"worker_limit\"} 1",
    ] {
        assert!(text.contains(line), "missing {line}\n{text}");
    }
    assert_eq!(sim.core.overview().malformed, 5);
}

#[test]
fn gaps_in_a_senders_sequence_are_counted() {
    let mut sim = Sim::new();
    let hb = sim.heartbeat("a", AgentState::Idle, &[]);
    sim.send("w1", vec![hb.clone()]);
    sim.send("w1", vec![hb.clone()]);
    sim.seqs.insert("w1".into(), 5); // batches 3..=5 do not arrive (yet)
    sim.send("w1", vec![hb.clone()]);
    let e = sim.started("T-late", "a", 1, T0);
    // Batch 4 comes late, after 6: it is applied, not taken for a repeat.
    let mut late = Envelope {
        sender: aid("w1"),
        incarnation: 1,
        seq: 4,
        sent_at_ms: sim.now,
        events: vec![e],
    };
    sim.core.handle_envelope(
        sim.now,
        Decoded {
            envelope: late.clone(),
            skipped: 0,
        },
        None,
    );
    assert!(sim.core.task_view("T-late", sim.now).is_some());
    late.events.clear();
    sim.core.handle_envelope(
        sim.now,
        Decoded {
            envelope: late,
            skipped: 0,
        },
        None,
    );
    // 3 and 5 never come: they are missing once 64 later batches pushed
    // them out of the window.
    for _ in 0..64 {
        sim.send("w1", vec![hb.clone()]);
    }
    let text = sim.metrics();
    assert!(
        text.contains("guildhall_event_batches_missing_total 2"),
        "{text}"
    );
    assert!(
        text.contains("guildhall_event_batches_duplicate_total 1"),
        "{text}"
    );
}

#[test]
fn a_redelivered_task_shows_the_lost_attempt_and_the_new_holder() {
    let mut sim = Sim::new();
    let e = sim.started("T", "a", 1, T0);
    sim.send("w1", vec![e]);
    sim.advance(500);
    let mut e = sim.started("T", "a", 1, T0);
    if let Event::TaskStarted(s) = &mut e {
        s.redelivered = true;
    }
    sim.send("w2", vec![e]);
    let t = sim.core.task_view("T", sim.now).unwrap();
    let rows: Vec<_> = t
        .attempts
        .iter()
        .map(|a| (a.worker.as_deref(), a.outcome, a.redelivered))
        .collect();
    assert_eq!(
        rows,
        vec![(Some("w1"), "lost", false), (Some("w2"), "running", true)]
    );
}

#[test]
fn per_worker_counters_follow_the_agents_own_counts() {
    let mut sim = Sim::new();
    let mut hb = sim.heartbeat("a", AgentState::Idle, &[]);
    for (done, failed) in [(5, 1), (9, 2)] {
        if let Event::Heartbeat(h) = &mut hb {
            h.done = done;
            h.failed = failed;
        }
        sim.send("w1", vec![hb.clone()]);
        sim.core.export_worker_counters();
    }
    let text = sim.metrics();
    assert!(
        text.contains(
            "guildhall_worker_tasks_total{outcome=\"succeeded\",stage=\"a\",worker=\"w1\"} 9"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "guildhall_worker_tasks_total{outcome=\"failed\",stage=\"a\",worker=\"w1\"} 2"
        )
    );
    assert_eq!(sim.worker("w1").success_rate, Some(9.0 / 11.0));
}

#[test]
fn per_worker_series_can_be_switched_off() {
    let mut core = Core::new(CoreConfig::default(), Metrics::new(false), T0);
    core.set_caught_up(T0);
    let sim_hb = Sim::new().heartbeat("a", AgentState::Idle, &[]);
    core.handle_envelope(
        T0,
        Decoded {
            envelope: Envelope {
                sender: aid("w1"),
                incarnation: 1,
                seq: 1,
                sent_at_ms: T0,
                events: vec![sim_hb],
            },
            skipped: 0,
        },
        None,
    );
    core.export_worker_counters();
    let text = core.metrics_text(T0);
    assert!(!text.contains("worker=\"w1\""));
    assert!(text.contains("guildhall_workers{stage=\"a\",status=\"idle\"} 1"));
}

#[test]
fn a_suspect_worker_that_speaks_again_is_simply_alive() {
    let mut sim = Sim::new();
    let hb = sim.heartbeat("build", AgentState::Idle, &[]);
    sim.send("w1", vec![hb.clone()]);
    sim.advance(2_500);
    assert_eq!(sim.worker("w1").status, "suspect");
    sim.send("w1", vec![hb]);
    assert_eq!(sim.worker("w1").status, "idle");
    sim.advance(1_999);
    assert_eq!(
        sim.worker("w1").status,
        "idle",
        "its clock restarted at the heartbeat"
    );
    assert!(sim.notices().is_empty(), "doubt is not death");
}

#[test]
fn a_dead_workers_tasks_are_requeued_and_its_late_results_are_stale() {
    let mut sim = Sim::new();
    let e = sim.started("T1", "build", 1, T0);
    let hb = sim.heartbeat("build", AgentState::Processing, &["T1"]);
    sim.send("frozen", vec![e, hb]);
    sim.advance(3_000);
    assert_eq!(sim.worker("frozen").status, "dead");
    assert!(sim.worker("frozen").current_tasks.is_empty());
    let t = sim.core.task_view("T1", sim.now).unwrap();
    assert_eq!(t.status, "queued");
    assert_eq!(t.attempts[0].outcome, "requeued");
    assert_eq!(t.attempts[0].error_class.as_deref(), Some("worker_dead"));
    let reason = t.attempts[0].error.clone().unwrap_or_default();
    assert!(reason.contains("declared dead after 3000 ms"), "{reason}");
    // The broker redelivers; another worker finishes it.
    sim.advance(100);
    let mut e = sim.started("T1", "build", 1, T0);
    if let Event::TaskStarted(s) = &mut e {
        s.redelivered = true;
    }
    sim.send("w2", vec![e]);
    let start = sim.now;
    sim.advance(200);
    let e = sim.succeeded("T1", "build", 1, start, None);
    sim.send("w2", vec![e]);
    // The frozen one wakes up and reports its own, late, success.
    sim.advance(5_000);
    let late = sim.succeeded("T1", "build", 1, T0, None);
    let hb = sim.heartbeat("build", AgentState::Idle, &[]);
    sim.send("frozen", vec![late, hb]);
    let t = sim.core.task_view("T1", sim.now).unwrap();
    assert_eq!(t.status, "succeeded");
    let rows: Vec<_> = t
        .attempts
        .iter()
        .map(|a| (a.worker.as_deref(), a.outcome, a.stale_result))
        .collect();
    assert_eq!(
        rows,
        vec![
            (Some("frozen"), "requeued", Some("succeeded")),
            (Some("w2"), "succeeded", None)
        ]
    );
    let text = sim.metrics();
    for line in [
        "guildhall_tasks_total{outcome=\"succeeded\",stage=\"build\"} 1",
        "guildhall_tasks_total{outcome=\"requeued\",stage=\"build\"} 1",
        "guildhall_task_results_stale_total{stage=\"build\"} 1",
        // w2 never heartbeats here, so it went silent for good too.
        "guildhall_worker_deaths_total{stage=\"build\"} 2",
        "guildhall_tasks_completed_total 1",
    ] {
        assert!(text.contains(line), "missing {line}\n{text}");
    }
    assert_eq!(sim.worker("frozen").status, "idle", "and it is back");
}

fn abandoned(sim: &Sim, task: &str, result: WorkerResult) -> Event {
    Event::TaskAbandoned(TaskAbandoned {
        at_ms: sim.now,
        task_id: tid(task),
        stage: st("build"),
        attempt: 1,
        started_at_ms: T0,
        reason: "connection lost".into(),
        result,
    })
}

#[test]
fn an_abandoned_attempt_puts_the_task_back_in_the_queue() {
    let mut sim = Sim::new();
    let e = sim.started("T1", "build", 1, T0);
    sim.send("w1", vec![e]);
    sim.advance(100);
    let e = abandoned(&sim, "T1", WorkerResult::Succeeded);
    sim.send("w1", vec![e]);
    let t = sim.core.task_view("T1", sim.now).unwrap();
    assert_eq!(t.status, "queued");
    assert_eq!(t.attempts[0].outcome, "abandoned");
    assert_eq!(t.attempts[0].error.as_deref(), Some("connection lost"));
    assert_eq!(
        t.attempts[0].stale_result,
        Some("succeeded"),
        "the discarded result is on record"
    );
    assert!(sim.worker("w1").current_tasks.is_empty());
    assert!(
        sim.metrics()
            .contains("guildhall_tasks_total{outcome=\"abandoned\",stage=\"build\"} 1")
    );
    // An abandonment reported after someone else already took the task over.
    let e = sim.started("T2", "build", 1, T0);
    sim.send("w1", vec![e]);
    let mut e = sim.started("T2", "build", 1, T0);
    if let Event::TaskStarted(s) = &mut e {
        s.redelivered = true;
    }
    sim.send("w2", vec![e]);
    let e = abandoned(&sim, "T2", WorkerResult::Unfinished);
    sim.send("w1", vec![e]);
    let t = sim.core.task_view("T2", sim.now).unwrap();
    assert_eq!(t.status, "running", "w2 has it");
    assert_eq!(t.attempts[0].outcome, "lost");
}

#[test]
fn a_batch_sent_twice_is_applied_once_and_a_restart_starts_over() {
    let mut sim = Sim::new();
    let e = sim.started("T1", "build", 1, T0);
    let hb = sim.heartbeat("build", AgentState::Processing, &["T1"]);
    sim.send("w1", vec![hb]);
    sim.send("w1", vec![e.clone()]);
    // The agent lost the confirm of batch 2 and resends it.
    sim.seqs.insert("w1".into(), 1);
    sim.send("w1", vec![e]);
    let text = sim.metrics();
    assert!(
        text.contains("guildhall_event_batches_duplicate_total 1"),
        "{text}"
    );
    assert!(text.contains("guildhall_tasks_started_total{stage=\"build\"} 1"));
    // The agent restarts with the same id: a new incarnation, sequence 1
    // again, with a Hello.
    sim.seqs.insert("w1".into(), 0);
    sim.incarnation = 2;
    let hello = Event::Hello(Box::new(Hello {
        at_ms: sim.now,
        version: "v".into(),
        stage: st("build"),
        next: None,
        stages: vec![st("build")],
        concurrency: 1,
        heartbeat_ms: 1000,
        hostname: "h".into(),
        pid: 1,
        mode: WorkerMode::Simulated,
        supervised: false,
    }));
    let e = sim.started("T2", "build", 1, T0);
    sim.send("w1", vec![hello, e]);
    assert!(
        sim.metrics()
            .contains("guildhall_tasks_started_total{stage=\"build\"} 2")
    );
}

#[test]
fn a_heartbeat_sent_before_the_ack_does_not_resurrect_a_finished_attempt() {
    let mut sim = Sim::new();
    // T1 succeeds; the agent, still waiting to ack it, sends a heartbeat
    // listing it in hand; then the agent freezes.
    let e = sim.started("T1", "build", 1, T0);
    let t2 = sim.started("T2", "build", 1, T0);
    sim.send("w1", vec![e, t2]);
    sim.advance(50);
    let done = sim.succeeded("T1", "build", 1, T0, None);
    let hb = sim.heartbeat("build", AgentState::Processing, &["T1", "T2"]);
    sim.send("w1", vec![done, hb]);
    let held: Vec<_> = sim
        .worker("w1")
        .current_tasks
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    assert_eq!(held, ["T2"]);
    sim.advance(3_000);
    let notices = sim.notices();
    assert!(
        matches!(&notices[..], [Notice::WorkerDead { tasks_requeued, .. }] if tasks_requeued == &[tid("T2")]),
        "{notices:?}"
    );
    assert_eq!(
        sim.core.task_view("T1", sim.now).unwrap().attempts[0].outcome,
        "succeeded"
    );
    // A task known only from a heartbeat is requeued too, with a row of its own.
    let hb = sim.heartbeat("build", AgentState::Processing, &["T3"]);
    sim.send("w2", vec![hb]);
    sim.advance(3_000);
    let t3 = sim.core.task_view("T3", sim.now).unwrap();
    assert_eq!((t3.status, t3.attempts[0].outcome), ("queued", "requeued"));
    assert_eq!(t3.attempts[0].worker.as_deref(), Some("w2"));
}

#[test]
fn a_task_arrives_at_a_stage_once_whoever_reports_it_first() {
    let mut sim = Sim::new();
    let created = sim.now;
    // At a: announced by a producer (S), published by a producer outside
    // Guildhall with no TaskSubmitted (X), and started before the
    // producer's TaskSubmitted reached the stream (O).
    for i in 0..4 {
        let (s, x, o) = (format!("S{i}"), format!("X{i}"), format!("O{i}"));
        let e = sim.submitted(&s, "a");
        sim.send("producer", vec![e]);
        let e = sim.started(&s, "a", 1, sim.now);
        sim.send("a1", vec![e]);
        let e = sim.started(&x, "a", 1, sim.now);
        sim.send("a1", vec![e]);
        let e = sim.started(&o, "a", 1, sim.now);
        sim.send("a1", vec![e]);
        let e = sim.submitted(&o, "a");
        sim.send("producer", vec![e]);
    }
    // At b: forwarded by a before b starts them (S), and started at b
    // before a's TaskSucceeded reached the stream (X).
    for i in 0..3 {
        let (s, x) = (format!("S{i}"), format!("X{i}"));
        let started = sim.now;
        sim.advance(10);
        let e = sim.succeeded(&s, "a", 1, started, Some("b"));
        sim.send("a1", vec![e]);
        let e = sim.started(&s, "b", 1, sim.now);
        sim.send("b1", vec![e]);
        let e = sim.started(&x, "b", 1, sim.now);
        sim.send("b1", vec![e]);
        let e = sim.succeeded(&x, "a", 1, started, Some("b"));
        sim.send("a1", vec![e]);
    }
    sim.advance(10_000);
    let span_s = (sim.now - created) as f64 / 1000.0;
    let view = sim.core.stages_view(sim.now);
    let arrived = |name: &str| {
        let s = view.stages.iter().find(|s| s.name == name).unwrap();
        (s.arrival_rate * span_s).round() as u64
    };
    assert_eq!(
        arrived("a"),
        12,
        "4 announced + 4 unannounced + 4 overtaken"
    );
    assert_eq!(arrived("b"), 6, "3 forwarded + 3 overtaken");
}

//! The core on virtual time: no broker, no clock, no sleeps.

use super::query::TaskFilter;
use super::stages::QueueStats;
use super::tasks::TaskStatus;
use super::test_support::{Sim, T0, aid, st, tid};
use super::*;
use guildhall_proto::*;

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
fn a_late_envelope_sent_before_a_death_does_not_bring_the_worker_back() {
    // Issue 20: a broker node fails over; an envelope the agent sent just
    // before the node died is read after the coordinator declared the
    // agent dead. The agent's clock runs 7 s behind the coordinator's:
    // only durations on one clock are compared.
    let skew = 7_000;
    let mut sim = Sim::new();
    sim.advance(1_000); // the agent clock stays positive
    let hb = sim.heartbeat("build", AgentState::Processing, &["T1"]);
    let first = sim.now - skew;
    sim.send_at("w1", first, vec![hb]);
    sim.advance(3_000);
    assert_eq!(sim.worker("w1").status, "dead");
    assert!(matches!(sim.notices()[..], [Notice::WorkerDead { .. }]));
    // Sent 500 ms after its last heartbeat (agent clock), read now.
    sim.advance(1_000);
    let late = sim.heartbeat("build", AgentState::Processing, &["T1"]);
    sim.send_at("w1", first + 500, vec![late]);
    assert_eq!(
        sim.worker("w1").status,
        "dead",
        "a late envelope is no sign of life"
    );
    assert!(sim.notices().is_empty(), "no false 'returned'");
    assert_eq!(sim.core.ingest_stats().late_after_death, 1);
    // The agent really comes back: sent after its death on its own clock.
    let back = sim.heartbeat("build", AgentState::Idle, &[]);
    sim.send_at("w1", sim.now - skew, vec![back]);
    assert_eq!(sim.worker("w1").status, "idle");
    assert!(matches!(
        sim.notices()[..],
        [Notice::WorkerReturned {
            dead_for_ms: 1_000,
            ..
        }]
    ));
}

#[test]
fn a_new_run_of_a_dead_worker_brings_it_back_whatever_its_clock() {
    let mut sim = Sim::new();
    let hb = sim.heartbeat("build", AgentState::Idle, &[]);
    sim.send("w1", vec![hb]);
    sim.advance(3_000);
    assert_eq!(sim.worker("w1").status, "dead");
    let _ = sim.notices();
    // Restarted: its Hello opens a new run, sent "earlier" by a clock
    // that was set back.
    sim.incarnation += 1;
    let hello = sim.hello("build", &["build"], 1);
    let hb = sim.heartbeat("build", AgentState::Idle, &[]);
    sim.send_at("w1", T0 + 10, vec![hello, hb]);
    assert_eq!(sim.worker("w1").status, "idle");
    assert!(matches!(sim.notices()[..], [Notice::WorkerReturned { .. }]));
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
        telemetry::Recorder::new(true),
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
    let mut other = Core::new(CoreConfig::default(), telemetry::Recorder::new(true), T0);
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

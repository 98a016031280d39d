//! The core's behaviour with the runtime's real metrics: what a fleet
//! does shows in the `/metrics` text as the coordinator exports it (the
//! core's own tests, in `guildhall-core`, look at the data it hands over).

use super::{metered, metrics_of};
use crate::core::CoreConfig;
use crate::core::stages::QueueStats;
use crate::core::test_support::{Sim, T0, aid, st, tid};
use crate::core::{Core, Notice};
use crate::metrics::Metrics;
use guildhall_proto::*;

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
fn a_stopping_agent_is_stopped_not_dead_and_is_forgotten_after_retention() {
    let (mut sim, m) = metered(CoreConfig {
        worker_retention_ms: 60_000,
        ..CoreConfig::default()
    });
    let hb = sim.heartbeat("build", AgentState::Idle, &[]);
    sim.send("w1", vec![hb]);
    metrics_of(&mut sim, &m);
    assert!(
        metrics_of(&mut sim, &m).contains("guildhall_worker_up{stage=\"build\",worker=\"w1\"} 1")
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
        !metrics_of(&mut sim, &m).contains("worker=\"w1\""),
        "its series are removed"
    );
}

#[test]
fn a_task_through_three_stages_has_one_row_per_attempt_and_matching_metrics() {
    let (mut sim, m) = metered(CoreConfig::default());
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

    let text = metrics_of(&mut sim, &m);
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
fn a_dead_lettered_task_is_finished_and_noticed() {
    let (mut sim, m) = metered(CoreConfig::default());
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
        metrics_of(&mut sim, &m)
            .contains("guildhall_tasks_total{outcome=\"dead_lettered\",stage=\"build\"} 1")
    );
}

#[test]
fn the_slow_stage_is_the_bottleneck_and_workers_are_counted_by_status() {
    let (mut sim, m) = metered(CoreConfig::default());
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
    let text = metrics_of(&mut sim, &m);
    assert!(
        text.contains("guildhall_stage_bottleneck{stage=\"b\"} 1"),
        "{text}"
    );
    assert!(text.contains("guildhall_workers{stage=\"a\",status=\"idle\"} 1"));
    assert!(text.contains("guildhall_workers{stage=\"a\",status=\"dead\"} 0"));
}

#[test]
fn a_backlog_with_no_consumer_is_the_bottleneck() {
    let (mut sim, m) = metered(CoreConfig::default());
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
        metrics_of(&mut sim, &m)
            .contains("guildhall_stage_backlog_age_seconds{stage=\"orphan\"} 2.5")
    );
}

#[test]
fn unreadable_input_and_limits_are_counted_not_fatal() {
    let (mut sim, m) = metered(CoreConfig {
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
    let text = metrics_of(&mut sim, &m);
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
    let (mut sim, m) = metered(CoreConfig::default());
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
    let text = metrics_of(&mut sim, &m);
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
fn per_worker_counters_follow_the_agents_own_counts() {
    let (mut sim, m) = metered(CoreConfig::default());
    let mut hb = sim.heartbeat("a", AgentState::Idle, &[]);
    for (done, failed) in [(5, 1), (9, 2)] {
        if let Event::Heartbeat(h) = &mut hb {
            h.done = done;
            h.failed = failed;
        }
        sim.send("w1", vec![hb.clone()]);
        sim.core.export_worker_counters();
    }
    let text = metrics_of(&mut sim, &m);
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
    let m = Metrics::new(false);
    let mut core = Core::new(CoreConfig::default(), m.clone(), T0);
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
    let text = m.text_of(&mut core, T0);
    assert!(!text.contains("worker=\"w1\""));
    assert!(text.contains("guildhall_workers{stage=\"a\",status=\"idle\"} 1"));
}

#[test]
fn a_dead_workers_tasks_are_requeued_and_its_late_results_are_stale() {
    let (mut sim, m) = metered(CoreConfig::default());
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
    let text = metrics_of(&mut sim, &m);
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

#[test]
fn an_abandoned_attempt_puts_the_task_back_in_the_queue() {
    let (mut sim, m) = metered(CoreConfig::default());
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
        metrics_of(&mut sim, &m)
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
    let (mut sim, m) = metered(CoreConfig::default());
    let e = sim.started("T1", "build", 1, T0);
    let hb = sim.heartbeat("build", AgentState::Processing, &["T1"]);
    sim.send("w1", vec![hb]);
    sim.send("w1", vec![e.clone()]);
    // The agent lost the confirm of batch 2 and resends it.
    sim.seqs.insert("w1".into(), 1);
    sim.send("w1", vec![e]);
    let text = metrics_of(&mut sim, &m);
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
    assert!(metrics_of(&mut sim, &m).contains("guildhall_tasks_started_total{stage=\"build\"} 2"));
}

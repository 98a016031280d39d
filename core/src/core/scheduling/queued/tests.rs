//! Priorities and scheduled tasks as the core sees them, on virtual time.

use crate::capacity::CapacityConfig;
use crate::core::CoreConfig;
use crate::core::query::TaskFilter;
use crate::core::scheduling::queued::StageQueues;
use crate::core::stages::QueueStats;
use crate::core::tasks::TaskStatus;
use crate::core::telemetry::Count;
use crate::core::test_support::{Sim, T0, st};
use guildhall_proto::Event;
use guildhall_proto::schedule::{Band, MAX_DELAY_MS};

fn stage<'a>(
    v: &'a crate::core::views::StagesView,
    name: &str,
) -> &'a crate::core::views::StageView {
    v.stages
        .iter()
        .find(|s| s.name == name)
        .expect("stage listed")
}

#[test]
fn a_delayed_task_is_scheduled_until_its_due_time_then_queued_then_running() {
    let mut sim = Sim::new();
    let due = T0 + 10_000;
    sim.send(
        "submitter",
        vec![
            sim.submitted("D", "build"),
            sim.queued("D", "build", 5, Some(due)),
        ],
    );
    let v = sim.core.task_view("D", sim.now).unwrap();
    assert_eq!(v.status, "scheduled");
    assert_eq!(v.due_at_ms, Some(due));
    assert_eq!((v.priority, v.band), (5, "4-6"));
    // The trace shows the attempt it waits for as scheduled, with its time.
    let last = v.attempts.last().unwrap();
    assert_eq!((last.outcome, last.due_at_ms), ("scheduled", Some(due)));
    let stages = sim.core.stages_view(sim.now);
    assert_eq!(stage(&stages, "build").scheduled, 1);
    assert_eq!(stage(&stages, "build").next_due_at_ms, Some(due));
    // Nothing queued in any band: it is not in a queue yet.
    assert!(stage(&stages, "build").bands.iter().all(|b| b.queued == 0));
    let filter = TaskFilter {
        status: Some(TaskStatus::Scheduled),
        limit: 10,
        ..TaskFilter::default()
    };
    assert_eq!(sim.core.tasks_view(&filter, sim.now).len(), 1);
    assert_eq!(
        sim.core.tasks_view(&filter, sim.now)[0].due_at_ms,
        Some(due)
    );

    // The due time passes: queued, in its band.
    sim.advance_to(due + 1);
    let v = sim.core.task_view("D", sim.now).unwrap();
    assert_eq!(v.status, "queued");
    assert_eq!(v.attempts.last().unwrap().outcome, "queued");
    let stages = sim.core.stages_view(sim.now);
    assert_eq!(stage(&stages, "build").scheduled, 0);
    assert_eq!(stage(&stages, "build").bands[Band::Mid.index()].queued, 1);
    assert!(sim.core.tasks_view(&filter, sim.now).is_empty());

    // It starts 500 ms after it fell due: its wait counts from the due time.
    sim.advance(499);
    sim.send("w1", vec![sim.started("D", "build", 1, T0)]);
    let v = sim.core.task_view("D", sim.now).unwrap();
    assert_eq!(v.status, "running");
    assert_eq!(v.attempts.last().unwrap().wait_ms, Some(sim.now - T0));
    let stages = sim.core.stages_view(sim.now);
    let mid = &stage(&stages, "build").bands[Band::Mid.index()];
    assert_eq!(mid.wait_ms.as_ref().map(|p| p.p50), Some(500));
}

#[test]
fn a_scheduled_task_that_starts_early_is_running_and_no_longer_counted() {
    let mut sim = Sim::new();
    sim.send(
        "agent",
        vec![sim.queued("E", "build", 0, Some(T0 + 60_000))],
    );
    assert_eq!(
        sim.core.task_view("E", sim.now).unwrap().status,
        "scheduled"
    );
    sim.advance(1_000);
    sim.send("w1", vec![sim.started("E", "build", 1, T0)]);
    assert_eq!(sim.core.task_view("E", sim.now).unwrap().status, "running");
    assert_eq!(stage(&sim.core.stages_view(sim.now), "build").scheduled, 0);
}

#[test]
fn a_task_started_before_its_due_time_is_queued_not_scheduled_at_its_next_stage() {
    let mut sim = Sim::new();
    let due = T0 + 60_000;
    sim.send(
        "submitter",
        vec![
            sim.submitted("E", "build"),
            sim.queued("E", "build", 5, Some(due)),
        ],
    );
    // It starts early (clock skew, the ladder a little early) and goes on
    // to the next stage well before its old due time; a TaskQueued read
    // after the start (another sender) does not bring the due time back.
    sim.advance(1_000);
    sim.send("w1", vec![sim.started("E", "build", 1, T0)]);
    sim.send("submitter", vec![sim.queued("E", "build", 5, Some(due))]);
    sim.advance(1_000);
    let done = sim.succeeded("E", "build", 1, T0 + 1_000, Some("test"));
    sim.send("w1", vec![done, sim.queued("E", "test", 5, None)]);
    let v = sim.core.task_view("E", sim.now).unwrap();
    assert_eq!(v.status, "queued");
    let stages = sim.core.stages_view(sim.now);
    let test = stage(&stages, "test");
    assert_eq!(test.scheduled, 0);
    assert_eq!(test.bands[Band::Mid.index()].queued, 1);
    // Its wait at the next stage counts from now, not from the old due time.
    sim.advance(500);
    sim.send("w2", vec![sim.started("E", "test", 1, sim.now - 500)]);
    let stages = sim.core.stages_view(sim.now);
    let mid = &stage(&stages, "test").bands[Band::Mid.index()];
    assert_eq!(mid.wait_ms.as_ref().map(|p| p.p50), Some(500));
}

#[test]
fn bands_count_queued_tasks_and_waits_and_an_unknown_band_is_low() {
    let mut sim = Sim::new();
    // Two high, one mid, and two with no TaskQueued at all (band 0-3).
    sim.send(
        "submitter",
        vec![
            sim.submitted("H1", "s"),
            sim.queued("H1", "s", 9, None),
            sim.submitted("H2", "s"),
            sim.queued("H2", "s", 7, None),
            sim.submitted("M1", "s"),
            sim.queued("M1", "s", 4, None),
            sim.submitted("L1", "s"),
            sim.submitted("L2", "s"),
        ],
    );
    let v = sim.core.stages_view(sim.now);
    let bands = &stage(&v, "s").bands;
    assert_eq!(
        bands
            .iter()
            .map(|b| (b.priority, b.queued))
            .collect::<Vec<_>>(),
        vec![("7-9", 2), ("4-6", 1), ("0-3", 2)]
    );
    // Band waits come from TaskStarted, by the task's band.
    sim.advance(200);
    sim.send("w1", vec![sim.started("H1", "s", 1, T0)]);
    sim.advance(800);
    sim.send("w1", vec![sim.started("L1", "s", 1, T0)]);
    let v = sim.core.stages_view(sim.now);
    let bands = &stage(&v, "s").bands;
    assert_eq!(bands[Band::High.index()].wait_ms.as_ref().unwrap().p50, 200);
    assert_eq!(
        bands[Band::Low.index()].wait_ms.as_ref().unwrap().p50,
        1_000
    );
    assert!(bands[Band::Mid.index()].wait_ms.is_none());
    assert!(bands.iter().all(|b| b.active));
    // The broker's counts per band, and the intake apart.
    let q = |ready| {
        Some(QueueStats {
            ready,
            unacked: Some(1),
            consumers: 2,
        })
    };
    sim.core.handle_stage_queues(
        sim.now,
        &st("s"),
        StageQueues {
            intake: q(4),
            bands: [q(1), q(2), q(3)],
        },
    );
    let v = sim.core.stages_view(sim.now);
    let s = stage(&v, "s");
    assert_eq!(
        s.queue.as_ref().map(|q| (q.ready, q.unacked, q.consumers)),
        Some((10, Some(4), 2))
    );
    assert_eq!(s.intake.as_ref().map(|q| q.ready), Some(4));
    assert_eq!(
        s.bands
            .iter()
            .map(|b| b.queue.as_ref().unwrap().ready)
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // Metrics: depth per band, scheduled count, wait quantiles per band.
    sim.core.refresh_metrics(sim.now);
    let g = sim.recorder.recorded().gauges;
    assert!(
        g.values()
            .any(|v| v == "BandQueueMessages { stage: \"s\", priority: \"4-6\", n: 2 }"),
        "{g:#?}"
    );
    assert!(
        g.values()
            .any(|v| v == "ScheduledTasks { stage: \"s\", n: 0 }")
    );
    assert!(g.values().any(|v| v.starts_with(
        "BandQueueWait { stage: \"s\", priority: \"7-9\", quantile: \"0.99\", seconds: 0.2"
    )));
}

/// A stage with one worker of concurrency 1 and a known service time of
/// 100 ms, so queued tasks get ETAs.
fn served() -> Sim {
    let mut sim = Sim::new();
    sim.send(
        "w1",
        vec![sim.heartbeat("s", guildhall_proto::AgentState::Idle, &[])],
    );
    for i in 0..5 {
        let t = format!("warm{i}");
        sim.send("p", vec![sim.submitted(&t, "s")]);
        sim.send("w1", vec![sim.started(&t, "s", 1, sim.now)]);
        let start = sim.now;
        sim.advance(100);
        sim.send("w1", vec![sim.succeeded(&t, "s", 1, start, None)]);
    }
    sim
}

#[test]
fn a_queued_tasks_eta_counts_only_the_work_ahead_of_it() {
    let mut sim = served();
    // Ten low tasks queued first, then one high one.
    for i in 0..10 {
        let t = format!("L{i}");
        sim.send("p", vec![sim.submitted(&t, "s")]);
        sim.advance(1);
    }
    sim.send(
        "p",
        vec![sim.submitted("H", "s"), sim.queued("H", "s", 9, None)],
    );
    let eta = |sim: &Sim, id: &str| sim.core.task_view(id, sim.now).unwrap().eta_in_ms.unwrap();
    // The one slot is free: the first in line starts at once. Nothing is
    // ahead of the high task; every low one waits for it too.
    assert_eq!(eta(&sim, "H"), 100);
    assert_eq!(eta(&sim, "L0"), 100 + 100);
    assert_eq!(eta(&sim, "L9"), 10 * 100 + 100);
    // A mid task queued last overtakes the low ones only.
    sim.send(
        "p",
        vec![sim.submitted("M", "s"), sim.queued("M", "s", 5, None)],
    );
    assert_eq!(eta(&sim, "M"), 100 + 100);
    assert_eq!(eta(&sim, "L0"), 2 * 100 + 100);
    // A scheduled high task: its due time, then what its band has queued.
    let due = sim.now + 5_000;
    sim.send("p", vec![sim.queued("S", "s", 8, Some(due))]);
    assert_eq!(eta(&sim, "S"), 5_000 + 100 + 100);
    // ... and it is not ahead of anyone until it falls due.
    assert_eq!(eta(&sim, "L0"), 2 * 100 + 100);
}

#[test]
fn the_planner_sizes_for_the_strictest_band_with_traffic() {
    let mut capacity = CapacityConfig::default();
    capacity.band_wait_targets.insert(Band::High, 2_000);
    let mut sim = Sim::with(CoreConfig {
        capacity,
        ..CoreConfig::default()
    });
    sim.send("p", vec![sim.submitted("L", "s")]);
    sim.core
        .handle_queue_stats(sim.now, &st("s"), QueueStats::default());
    sim.advance(15_000);
    let target = |sim: &Sim| {
        sim.core
            .plans()
            .find(|p| p.stage == st("s"))
            .unwrap()
            .clone()
            .wait_target_ms
    };
    assert_eq!(target(&sim), 30_000, "only the low band has traffic");
    let v = sim.core.stages_view(sim.now);
    let bands = &stage(&v, "s").bands;
    assert_eq!(bands[Band::High.index()].wait_target_ms, 2_000);
    assert_eq!(bands[Band::Low.index()].wait_target_ms, 30_000);
    sim.send(
        "p",
        vec![sim.submitted("H", "s"), sim.queued("H", "s", 9, None)],
    );
    sim.advance(15_000);
    assert_eq!(target(&sim), 2_000, "a high task is queued");
}

#[test]
fn the_planner_sees_scheduled_work_coming_within_its_lead_time() {
    let mut sim = Sim::new();
    sim.send(
        "w1",
        vec![sim.heartbeat("s", guildhall_proto::AgentState::Idle, &[])],
    );
    sim.core
        .handle_queue_stats(sim.now, &st("s"), QueueStats::default());
    sim.advance(15_000);
    let before = sim
        .core
        .plans()
        .find(|p| p.stage == st("s"))
        .unwrap()
        .sizing_rate;
    // 600 tasks due in 30 s (inside the 60 s lead time), 600 in 2 h.
    let soon = sim.now + 30_000;
    let later = sim.now + 7_200_000;
    let mut events = Vec::new();
    for i in 0..600 {
        events.push(sim.queued(&format!("a{i}"), "s", 0, Some(soon)));
        events.push(sim.queued(&format!("b{i}"), "s", 0, Some(later)));
    }
    sim.send("p", events);
    sim.advance(15_000);
    let plan = sim
        .core
        .plans()
        .find(|p| p.stage == st("s"))
        .unwrap()
        .clone();
    // 600 over the 60 s lead time: 10/s on top of the forecast (which
    // only falls while nothing arrives).
    assert!(
        plan.sizing_rate >= 10.0 && plan.sizing_rate <= before + 10.0 + 1e-9,
        "{before} -> {}",
        plan.sizing_rate
    );
    assert!(
        plan.reason.contains("600 scheduled task(s) due within"),
        "{}",
        plan.reason
    );
    assert_eq!(stage(&sim.core.stages_view(sim.now), "s").scheduled, 1_200);
}

#[test]
fn hostile_task_queued_events_are_clamped_or_dropped_and_nothing_panics() {
    let mut sim = Sim::with(CoreConfig {
        max_stages: 2,
        ..CoreConfig::default()
    });
    // A due time absurdly far ahead: clamped to the ladder's longest delay.
    sim.send("p", vec![sim.queued("far", "a", 3, Some(u64::MAX))]);
    let v = sim.core.task_view("far", sim.now).unwrap();
    assert_eq!(v.due_at_ms, Some(sim.now + MAX_DELAY_MS));
    assert_eq!(v.status, "scheduled");
    assert!(v.eta_in_ms.is_none(), "no one serves stage a");
    assert_eq!(sim.recorder.count_of(Count::Clamped { field: "time" }), 1);
    // A due time in the past: queued now.
    sim.send("p", vec![sim.queued("past", "a", 3, Some(1))]);
    assert_eq!(
        sim.core.task_view("past", sim.now).unwrap().status,
        "queued"
    );
    // A priority byte past 9 (only a forged message carries one).
    let mut e = sim.queued("big", "a", 9, None);
    if let Event::TaskQueued(q) = &mut e {
        q.priority = postcard::from_bytes(&[200]).unwrap();
    }
    sim.send("p", vec![e]);
    let v = sim.core.task_view("big", sim.now).unwrap();
    assert_eq!((v.priority, v.band), (9, "7-9"));
    assert_eq!(sim.recorder.count_of(Count::Clamped { field: "time" }), 2);
    // A priority for a task no one announced: a record queued there.
    sim.send("p", vec![sim.queued("stranger", "b", 7, None)]);
    assert_eq!(
        sim.core.task_view("stranger", sim.now).unwrap().status,
        "queued"
    );
    // A stage over the limit: dropped and counted, nothing made.
    sim.send("p", vec![sim.queued("x", "c", 1, Some(sim.now + 5_000))]);
    assert!(sim.core.task_view("x", sim.now).is_none());
    assert!(!sim.core.knows_stage("c"));
    assert_eq!(
        sim.recorder.count_of(Count::Malformed {
            reason: "stage_limit"
        }),
        1
    );
    // A TaskQueued for a task that already started does not move it back.
    sim.send("w", vec![sim.started("stranger", "b", 1, sim.now)]);
    sim.send(
        "p",
        vec![sim.queued("stranger", "b", 2, Some(sim.now + 9_000))],
    );
    assert_eq!(
        sim.core.task_view("stranger", sim.now).unwrap().status,
        "running"
    );
    sim.core.refresh_metrics(sim.now);
}

#[test]
fn priorities_due_times_and_band_waits_survive_a_snapshot() {
    let mut sim = Sim::new();
    let due = T0 + 3_600_000;
    sim.send(
        "p",
        vec![sim.submitted("D", "s"), sim.queued("D", "s", 8, Some(due))],
    );
    sim.send(
        "p",
        vec![sim.submitted("Q", "s"), sim.queued("Q", "s", 5, None)],
    );
    sim.advance(250);
    sim.send("w", vec![sim.started("Q", "s", 1, T0)]);
    let core = sim.resume(CoreConfig::default()).core;
    let v = core.task_view("D", sim.now).unwrap();
    assert_eq!(
        (v.status, v.priority, v.due_at_ms),
        ("scheduled", 8, Some(due))
    );
    assert_eq!(core.task_view("Q", sim.now).unwrap().priority, 5);
    let stages = core.stages_view(sim.now);
    let s = stage(&stages, "s");
    assert_eq!(s.scheduled, 1);
    assert_eq!(
        s.bands[Band::Mid.index()].wait_ms.as_ref().unwrap().p50,
        250
    );
}

#[test]
fn band_wait_targets_fall_back_to_the_stage_and_zero_is_refused() {
    let mut c = CapacityConfig::default();
    c.stage_wait_targets.insert(st("fast"), 5_000);
    c.band_wait_targets.insert(Band::High, 1_000);
    assert_eq!(c.band_wait_target_for(&st("fast"), Band::High), 1_000);
    assert_eq!(c.band_wait_target_for(&st("fast"), Band::Low), 5_000);
    assert_eq!(c.band_wait_target_for(&st("other"), Band::Mid), 30_000);
    // The strictest band with traffic; none: the stage's own.
    assert_eq!(c.sizing_target_for(&st("fast"), [false, true, true]), 5_000);
    assert_eq!(c.sizing_target_for(&st("fast"), [true, false, true]), 1_000);
    assert_eq!(c.sizing_target_for(&st("other"), [false; 3]), 30_000);
    assert!(c.validate().is_ok());
    c.band_wait_targets.insert(Band::Mid, 0);
    assert_eq!(
        c.validate().unwrap_err().to_string(),
        "wait target of priority band 4-6 must be more than 0"
    );
}

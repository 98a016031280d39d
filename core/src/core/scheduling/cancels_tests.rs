//! Cancel rules on virtual time: who may request, how a request settles,
//! races with completion, bounds and the snapshot.

use super::*;
use crate::core::tasks::AttemptOutcome;
use crate::core::test_support::{Sim, T0, st, tid};
use guildhall_proto::Event;

/// The coordinator's sender in these tests.
const COORD: &str = "coordinator-1";

fn request(sim: &Sim, task: &str, by: &str) -> Event {
    Event::TaskCancelRequested(TaskCancelRequested {
        at_ms: sim.now,
        task_id: tid(task),
        by: by.into(),
    })
}

fn cancelled(sim: &Sim, task: &str, attempt: u32, point: CancelPoint) -> Event {
    Event::TaskCancelled(TaskCancelled {
        at_ms: sim.now,
        task_id: tid(task),
        stage: st("build"),
        attempt,
        point,
    })
}

fn status(sim: &Sim, task: &str) -> TaskStatus {
    sim.core.tasks.get(task).expect("task known").status
}

#[test]
fn a_queued_task_is_requested_then_cancelled_with_who_and_where_in_its_row() {
    let mut sim = Sim::new();
    sim.send("submitter", vec![sim.submitted("t1", "build")]);
    let out = sim.core.cancel(sim.now, &[tid("t1")]);
    assert_eq!(
        out,
        vec![CancelOutcome::Requested {
            status: TaskStatus::Queued
        }]
    );
    // Nothing changes until the event is read back.
    assert_eq!(sim.core.cancels().live_count(), 0);
    sim.advance(10);
    sim.send(COORD, vec![request(&sim, "t1", "alice")]);
    assert_eq!(sim.core.live_cancels(sim.now), vec![tid("t1")]);
    let r = sim.core.cancels().get("t1").expect("request kept");
    assert_eq!(
        (r.by.as_str(), r.at_ms, r.state),
        ("alice", T0 + 10, CancelState::Live)
    );
    // Asked again while live: broadcast again, nothing new to write.
    assert_eq!(
        sim.core.cancel(sim.now, &[tid("t1")]),
        vec![CancelOutcome::AlreadyRequested]
    );

    sim.advance(5);
    sim.send("w1", vec![cancelled(&sim, "t1", 1, CancelPoint::Queued)]);
    assert_eq!(status(&sim, "t1"), TaskStatus::Cancelled);
    let rec = sim.core.tasks.get("t1").expect("task");
    let row = rec.current_row().expect("row");
    assert_eq!(row.outcome, AttemptOutcome::Cancelled);
    assert_eq!(row.finished_at_ms, Some(T0 + 15));
    assert_eq!(
        row.error.as_deref(),
        Some("cancelled by alice while queued")
    );
    assert_eq!(rec.finished_at_ms, Some(T0 + 15));
    assert!(sim.core.live_cancels(sim.now).is_empty());
    assert_eq!(
        sim.core.cancels().get("t1").map(|r| r.state),
        Some(CancelState::Cancelled {
            point: CancelPoint::Queued,
            at_ms: T0 + 15
        })
    );
    // A cancelled task is finished: a second cancel is refused so.
    assert_eq!(
        sim.core.cancel(sim.now, &[tid("t1")]),
        vec![CancelOutcome::AlreadyFinished {
            status: TaskStatus::Cancelled
        }]
    );
}

#[test]
fn a_running_task_stopped_by_its_agent_is_final_and_leaves_its_hands() {
    let mut sim = Sim::new();
    sim.send("submitter", vec![sim.submitted("t1", "build")]);
    sim.send("w1", vec![sim.started("t1", "build", 1, T0)]);
    assert_eq!(
        sim.core.cancel(sim.now, &[tid("t1")]),
        vec![CancelOutcome::Requested {
            status: TaskStatus::Running
        }]
    );
    sim.send(COORD, vec![request(&sim, "t1", "cli")]);
    sim.advance(100);
    sim.send("w1", vec![cancelled(&sim, "t1", 1, CancelPoint::Running)]);
    assert_eq!(status(&sim, "t1"), TaskStatus::Cancelled);
    let rec = sim.core.tasks.get("t1").expect("task");
    let row = rec.current_row().expect("row");
    assert_eq!(row.worker.as_ref().map(|w| w.as_str()), Some("w1"));
    assert_eq!(row.error.as_deref(), Some("cancelled by cli while running"));
    assert!(
        sim.core
            .workers
            .get(&guildhall_proto::AgentId::new("w1").expect("valid"))
            .expect("known")
            .in_hand
            .is_empty()
    );
    // A heartbeat listing it before the ack does not bring it back.
    let hb = sim.heartbeat("build", guildhall_proto::AgentState::Processing, &["t1"]);
    sim.send("w1", vec![hb]);
    assert_eq!(status(&sim, "t1"), TaskStatus::Cancelled);
}

#[test]
fn a_completion_that_races_the_cancel_is_already_finished() {
    let mut sim = Sim::new();
    sim.send("submitter", vec![sim.submitted("t1", "build")]);
    sim.send("w1", vec![sim.started("t1", "build", 1, T0)]);
    sim.send(COORD, vec![request(&sim, "t1", "alice")]);
    sim.advance(50);
    sim.send("w1", vec![sim.succeeded("t1", "build", 1, T0, None)]);
    assert_eq!(status(&sim, "t1"), TaskStatus::Succeeded);
    assert_eq!(
        sim.core.cancels().get("t1").map(|r| r.state),
        Some(CancelState::AlreadyFinished { at_ms: T0 + 50 })
    );
    assert!(sim.core.live_cancels(sim.now).is_empty());
    assert_eq!(
        sim.core.cancel(sim.now, &[tid("t1")]),
        vec![CancelOutcome::AlreadyFinished {
            status: TaskStatus::Succeeded
        }]
    );
}

#[test]
fn a_stage_that_succeeds_into_the_next_keeps_the_cancel_live() {
    let mut sim = Sim::new();
    sim.send("submitter", vec![sim.submitted("t1", "build")]);
    sim.send("w1", vec![sim.started("t1", "build", 1, T0)]);
    sim.send(COORD, vec![request(&sim, "t1", "alice")]);
    sim.send(
        "w1",
        vec![sim.succeeded("t1", "build", 1, T0, Some("test"))],
    );
    assert_eq!(sim.core.live_cancels(sim.now), vec![tid("t1")]);
}

#[test]
fn a_request_arriving_after_the_task_finished_settles_at_once() {
    let mut sim = Sim::new();
    sim.send("submitter", vec![sim.submitted("t1", "build")]);
    sim.send("w1", vec![sim.started("t1", "build", 1, T0)]);
    sim.send("w1", vec![sim.succeeded("t1", "build", 1, T0, None)]);
    sim.send(COORD, vec![request(&sim, "t1", "alice")]);
    assert!(sim.core.live_cancels(sim.now).is_empty());
    assert_eq!(
        sim.core.cancels().get("t1").map(|r| r.state.as_str()),
        Some("already_finished")
    );
}

#[test]
fn unknown_ids_are_unknown_and_forged_requests_are_counted_and_dropped() {
    let mut sim = Sim::new();
    assert_eq!(
        sim.core.cancel(sim.now, &[tid("nope")]),
        vec![CancelOutcome::Unknown]
    );
    sim.send("submitter", vec![sim.submitted("t1", "build")]);
    sim.send("w1", vec![request(&sim, "t1", "mallory")]);
    sim.send("submitter", vec![request(&sim, "t1", "mallory")]);
    assert_eq!(sim.core.cancels().forged, 2);
    let malformed = crate::core::telemetry::Count::Malformed {
        reason: "forged_control",
    };
    assert_eq!(sim.recorder.count_of(malformed), 2);
    assert!(sim.core.live_cancels(sim.now).is_empty());
    assert_eq!(status(&sim, "t1"), TaskStatus::Queued);
}

#[test]
fn bulk_filters_match_unfinished_tasks_by_stage_status_and_prefix() {
    let mut sim = Sim::new();
    for t in ["a-1", "a-2", "b-1"] {
        sim.send("submitter", vec![sim.submitted(t, "build")]);
    }
    sim.send("submitter", vec![sim.submitted("a-3", "test")]);
    sim.send("w1", vec![sim.started("a-2", "build", 1, T0)]);
    sim.send("submitter", vec![sim.submitted("a-4", "build")]);
    sim.send("w1", vec![sim.started("a-4", "build", 1, T0)]);
    sim.send("w1", vec![sim.succeeded("a-4", "build", 1, T0, None)]);

    let all = sim
        .core
        .cancel_matching(&CancelFilter::default(), 10, sim.now);
    assert_eq!(all.count, 4, "finished a-4 is not matched");
    let f = CancelFilter {
        stage: Some(st("build")),
        status: Some(TaskStatus::Queued),
        id_prefix: Some("a-".into()),
        ..CancelFilter::default()
    };
    let m = sim.core.cancel_matching(&f, 10, sim.now);
    assert_eq!((m.count, m.ids), (1, vec![tid("a-1")]));
    let m = sim
        .core
        .cancel_matching(&CancelFilter::default(), 2, sim.now);
    assert_eq!((m.count, m.ids), (4, vec![tid("a-1"), tid("a-2")]));
    let high = CancelFilter {
        priority: Some(Priority::new(9).expect("valid")),
        ..CancelFilter::default()
    };
    assert_eq!(sim.core.cancel_matching(&high, 10, sim.now).count, 0);
}

#[test]
fn live_cancels_are_bounded_and_refused_past_the_bound() {
    let mut sim = Sim::new();
    sim.send("submitter", vec![sim.submitted("extra", "build")]);
    let cancels = &mut sim.core.scheduling.cancels;
    for i in 0..MAX_LIVE_CANCELS {
        cancels.insert_live(tid(&format!("x{i}")), "bulk".into(), T0);
    }
    assert_eq!(
        sim.core.cancel(sim.now, &[tid("extra")]),
        vec![CancelOutcome::TooMany]
    );
    // A replay past the bound forgets the oldest, never grows.
    sim.send(COORD, vec![request(&sim, "extra", "bulk")]);
    assert_eq!(sim.core.cancels().live_count(), MAX_LIVE_CANCELS);
    // Live requests expire after the longest delay.
    sim.advance(MAX_LIVE_MS + 1);
    assert!(sim.core.live_cancels(sim.now).is_empty());
}

#[test]
fn settled_requests_are_remembered_up_to_the_bound() {
    let mut sim = Sim::new();
    let cancels = &mut sim.core.scheduling.cancels;
    for i in 0..MAX_SETTLED + 10 {
        let id = tid(&format!("s{i}"));
        cancels.insert_live(id.clone(), "bulk".into(), T0);
        cancels.settle(&id, CancelState::AlreadyFinished { at_ms: T0 });
    }
    assert_eq!(cancels.requests.len(), MAX_SETTLED);
    assert!(cancels.get("s0").is_none());
    assert_eq!(cancels.live_count(), 0);
}

#[test]
fn live_cancels_survive_a_snapshot() {
    let mut sim = Sim::new();
    sim.send("submitter", vec![sim.submitted("t1", "build")]);
    sim.send(COORD, vec![request(&sim, "t1", "alice")]);
    let mut sim2 = sim.resume(crate::core::CoreConfig::default());
    assert_eq!(sim2.core.live_cancels(sim2.now), vec![tid("t1")]);
    assert_eq!(
        sim2.core.cancels().get("t1").map(|r| r.by.as_str()),
        Some("alice")
    );
}

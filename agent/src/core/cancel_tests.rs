//! Cancel rules on virtual time: a held id's delivery is dropped (confirmed
//! before the ack), a running task is stopped and not retried, holds are
//! bounded in count and time.

use super::super::tests::{abandoned, core, drain, events, start, success, task};
use super::*;
use crate::core::{Action, Confirm};
use guildhall_proto::{Command, TaskId};

fn tid(s: &str) -> TaskId {
    s.parse().expect("valid id")
}

fn cancel_cmd(ids: &[&str], hold_ms: u64) -> Command {
    Command::Cancel {
        task_ids: ids.iter().map(|s| tid(s)).collect(),
        hold_ms,
    }
}

fn point(actions: &[Action]) -> Option<CancelPoint> {
    actions.iter().find_map(|a| match a {
        Action::EmitConfirmed { events, .. } => events.iter().find_map(|e| match e {
            Event::TaskCancelled(c) => Some(c.point),
            _ => None,
        }),
        _ => None,
    })
}

#[test]
fn a_cancelled_delivery_never_reaches_the_worker_and_is_acked_after_its_event() {
    let mut core = core(false);
    let step = core.handle_command(1_000, &cancel_cmd(&["t1"], 60_000));
    assert!(matches!(step, crate::core::Step::Done(v) if v.ok));
    let key = core.handle_delivery(2_000, task("t1", 1));
    let actions = drain(&mut core);
    assert_eq!(events(&actions), ["task_cancelled"], "no task_started");
    assert_eq!(point(&actions), Some(CancelPoint::Queued));
    assert!(!actions.iter().any(|a| matches!(a, Action::Work(_))));
    assert!(
        !actions.contains(&Action::Ack(key)),
        "not before the confirm"
    );
    core.handle_confirm(2_010, key, Confirm::Confirmed);
    assert_eq!(drain(&mut core), [Action::Ack(key)]);
    assert_eq!(core.in_hand(), 0);
    // Other tasks still run.
    start(&mut core, 2_020, "t2");
}

#[test]
fn a_failed_confirm_gives_the_cancelled_delivery_back_to_be_dropped_again() {
    let mut core = core(false);
    core.handle_cancel(0, &[tid("t1")], 60_000);
    let key = core.handle_delivery(10, task("t1", 1));
    drain(&mut core);
    core.handle_confirm(20, key, Confirm::Failed("nack".into()));
    let actions = drain(&mut core);
    assert!(actions.contains(&Action::Requeue(key)), "{actions:?}");
    let again = core.handle_delivery(30, task("t1", 1));
    assert_eq!(events(&drain(&mut core)), ["task_cancelled"]);
    core.handle_confirm(40, again, Confirm::Confirmed);
    assert_eq!(drain(&mut core), [Action::Ack(again)]);
}

#[test]
fn a_running_task_is_stopped_not_retried_and_its_late_outcome_ignored() {
    let mut core = core(false);
    let key = start(&mut core, 0, "t1");
    let other = start(&mut core, 0, "t2");
    core.handle_cancel(100, &[tid("t1")], 60_000);
    let actions = drain(&mut core);
    assert_eq!(actions.first(), Some(&Action::CancelWork(key)));
    assert_eq!(point(&actions), Some(CancelPoint::Running));
    assert!(
        abandoned(&actions).is_empty(),
        "not given back: not retried"
    );
    // The worker's answer (the call was cancelled) changes nothing.
    core.handle_outcome(110, key, success());
    assert!(drain(&mut core).is_empty());
    core.handle_confirm(120, key, Confirm::Confirmed);
    assert_eq!(drain(&mut core), [Action::Ack(key)]);
    assert_eq!(core.counts().done, 0);
    // The other task is untouched.
    core.handle_outcome(130, other, success());
    assert!(!drain(&mut core).is_empty());
}

#[test]
fn a_task_whose_worker_already_answered_is_left_to_finish() {
    let mut core = core(false);
    let key = start(&mut core, 0, "t1");
    core.handle_outcome(10, key, success());
    drain(&mut core);
    core.handle_cancel(20, &[tid("t1")], 60_000);
    let actions = drain(&mut core);
    assert!(actions.is_empty(), "{actions:?}");
}

#[test]
fn a_running_task_on_a_lost_link_is_given_up_and_dropped_when_redelivered() {
    let mut core = core(false);
    let key = start(&mut core, 0, "t1");
    core.handle_connection_lost(10);
    drain(&mut core);
    core.handle_cancel(20, &[tid("t1")], 60_000);
    let actions = drain(&mut core);
    assert!(actions.contains(&Action::CancelWork(key)));
    assert!(actions.contains(&Action::Forget(key)));
    core.handle_connected(30);
    drain(&mut core);
    core.handle_delivery(40, task("t1", 1));
    assert_eq!(events(&drain(&mut core)), ["task_cancelled"]);
}

#[test]
fn holds_run_out_and_are_capped_in_time() {
    let mut set = CancelSet::default();
    set.hold(0, &tid("a"), 1_000);
    assert!(set.holds(999, &tid("a")));
    assert!(!set.holds(1_000, &tid("a")));
    set.hold(0, &tid("b"), u64::MAX);
    assert!(set.holds(MAX_HOLD_MS - 1, &tid("b")));
    assert!(!set.holds(MAX_HOLD_MS, &tid("b")));
    // Held again: the later end counts.
    set.hold(500, &tid("a"), 1_000);
    assert!(set.holds(1_200, &tid("a")));
    // A later hold purges what ran out.
    set.hold(MAX_HOLD_MS + 10, &tid("c"), 1_000);
    assert_eq!(set.len(), 1);
}

#[test]
fn holds_are_bounded_in_count_oldest_first() {
    let mut set = CancelSet::default();
    for i in 0..MAX_HELD + 5 {
        set.hold(0, &tid(&format!("t{i}")), 60_000);
    }
    assert_eq!(set.len(), MAX_HELD);
    assert!(!set.holds(1, &tid("t0")));
    assert!(set.holds(1, &tid(&format!("t{}", MAX_HELD + 4))));
    // Held again and again (re-broadcasts): the queue stays bounded.
    for round in 0..5 {
        for i in 0..MAX_HELD {
            set.hold(round, &tid(&format!("t{i}")), 60_000);
        }
    }
    assert!(set.order.len() <= 4 * MAX_HELD + 1);
    assert_eq!(set.len(), MAX_HELD);
}

//! The agent's rules on virtual time, with no broker: each test is the
//! unit counterpart of a broker test in `agent/tests/broker.rs`.

use super::worker::{Ended, WORKER_EXITED, WORKER_HUNG};
use super::*;
use crate::handoff::{Failure, NextStage, Outcome};
use guildhall_proto::{Command, WorkerResult};

fn stage(s: &str) -> Stage {
    s.parse().unwrap()
}

fn route(s: &str, next: Option<&str>) -> StageRoute {
    StageRoute {
        stage: stage(s),
        next: next.map(stage),
    }
}

pub(super) fn config(supervised: bool) -> CoreConfig {
    let routes = vec![route("a", Some("b")), route("c", None)];
    CoreConfig {
        agent: "agent-1".parse().unwrap(),
        names: Names::new("ns".parse().unwrap()),
        next_stages: NextStages::new(&routes, false),
        fan_out: settle::FanOutRules::default(),
        route: routes[0].clone(),
        routes,
        concurrency: 2,
        retry: RetryPolicy::default(),
        shutdown_timeout: Duration::from_secs(30),
        worker: supervised.then_some(WorkerStatus {
            generation: 1,
            pid: Some(10),
            ready: true,
            ended: None,
        }),
    }
}

/// A core with its start-up actions drained.
pub(super) fn core(supervised: bool) -> AgentCore {
    let mut core = AgentCore::new(config(supervised));
    let start = drain(&mut core);
    assert_eq!(
        start,
        [
            Action::SetPrefetch(2),
            Action::Consume(stage("a")),
            Action::State(AgentState::Idle)
        ]
    );
    core
}

pub(super) fn drain(core: &mut AgentCore) -> Vec<Action> {
    std::iter::from_fn(|| core.poll_action()).collect()
}

pub(super) fn task(id: &str, attempt: u32) -> Delivery {
    Delivery {
        meta: Ok(TaskMeta {
            id: id.parse().unwrap(),
            attempt,
            enqueued_at_ms: Some(1),
            submitted_at_ms: Some(1),
            traceparent: None,
            priority: Default::default(),
            parent: None,
            joined: false,
        }),
        redelivered: false,
        span: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
    }
}

pub(super) fn success() -> Outcome {
    Outcome::Success {
        payload: b"out".to_vec(),
        next: NextStage::Default,
        priority: None,
    }
}

/// The kinds of the events among `actions`, confirmed or not.
pub(super) fn events(actions: &[Action]) -> Vec<&'static str> {
    actions
        .iter()
        .flat_map(|a| match a {
            Action::Emit(e) => vec![e.kind()],
            Action::EmitConfirmed { events, .. } => events.iter().map(Event::kind).collect(),
            _ => vec![],
        })
        .collect()
}

pub(super) fn abandoned(actions: &[Action]) -> Vec<(String, WorkerResult)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Emit(Event::TaskAbandoned(e)) => Some((e.reason.clone(), e.result)),
            _ => None,
        })
        .collect()
}

/// Delivers a task and checks it goes to the worker.
pub(super) fn start(core: &mut AgentCore, now: u64, id: &str) -> TaskKey {
    let key = core.handle_delivery(now, task(id, 1));
    let actions = drain(core);
    assert_eq!(events(&actions), ["task_started"]);
    assert!(actions.contains(&Action::Work(key)));
    key
}

#[test]
fn nothing_is_acked_before_the_next_stage_and_the_events_are_confirmed() {
    let mut core = core(false);
    let key = start(&mut core, 1_000, "t1");
    core.handle_outcome(1_500, key, success());
    let actions = drain(&mut core);
    let [Action::Publish { publish, .. }] = &actions[..] else {
        panic!("{actions:?}");
    };
    assert!(matches!(&publish.target, Target::Next { stage: s, .. } if *s == stage("b")));
    core.handle_confirm(1_510, key, Confirm::Confirmed);
    let actions = drain(&mut core);
    assert_eq!(events(&actions), ["task_succeeded"]);
    assert!(
        !actions.contains(&Action::Ack(key)),
        "not before the events"
    );
    core.handle_confirm(1_520, key, Confirm::Confirmed);
    assert_eq!(drain(&mut core), [Action::Ack(key)]);
    assert_eq!(core.counts().done, 1);
    assert_eq!(core.in_hand(), 0);
}

#[test]
fn a_retryable_failure_goes_to_the_retry_queue_then_both_events_then_the_ack() {
    let mut core = core(false);
    let key = start(&mut core, 0, "t1");
    core.handle_outcome(10, key, Outcome::Failure(Failure::retryable("e", "boom")));
    let actions = drain(&mut core);
    assert!(matches!(
        &actions[..],
        [Action::Publish { publish: Publish { target: Target::Retry { meta, .. }, body: Body::Input }, .. }] if meta.attempt == 2
    ));
    core.handle_confirm(20, key, Confirm::Confirmed);
    let actions = drain(&mut core);
    assert_eq!(events(&actions), ["task_failed", "task_retrying"]);
    core.handle_confirm(30, key, Confirm::Confirmed);
    assert_eq!(drain(&mut core), [Action::Ack(key)]);
    assert_eq!(core.counts().failed, 1);
}

#[test]
fn permanent_failures_and_used_up_attempts_are_dead_lettered() {
    let mut core = core(false);
    let max = RetryPolicy::default().max_attempts;
    for (delivery, failure) in [
        (task("p", 1), Failure::permanent("bad", "no")),
        (task("r", max), Failure::retryable("e", "boom")),
    ] {
        let key = core.handle_delivery(0, delivery);
        drain(&mut core);
        core.handle_outcome(10, key, Outcome::Failure(failure));
        let actions = drain(&mut core);
        assert!(matches!(
            &actions[..],
            [Action::Publish {
                publish: Publish {
                    target: Target::Dead { .. },
                    ..
                },
                ..
            }]
        ));
        core.handle_confirm(42, key, Confirm::Confirmed);
        let actions = drain(&mut core);
        assert_eq!(events(&actions), ["task_failed", "task_dead_lettered"]);
        let Action::EmitConfirmed { events, .. } = &actions[0] else {
            panic!("{actions:?}");
        };
        let Event::TaskDeadLettered(dead) = &events[1] else {
            panic!("{events:?}");
        };
        assert_eq!(dead.at_ms, 42, "the time of the dead letter's confirm");
        core.handle_confirm(50, key, Confirm::Confirmed);
        assert_eq!(drain(&mut core), [Action::Ack(key)]);
    }
}

#[test]
fn a_next_stage_that_does_not_exist_dead_letters_the_task() {
    let mut core = core(false);
    let key = start(&mut core, 0, "t1");
    let named = Outcome::Success {
        payload: vec![],
        next: NextStage::Stage(stage("nowhere")),
        priority: None,
    };
    core.handle_outcome(10, key, named);
    let actions = drain(&mut core);
    assert!(matches!(
        &actions[..],
        [Action::Publish {
            publish: Publish {
                target: Target::Next { declare: false, .. },
                ..
            },
            ..
        }]
    ));
    core.handle_confirm(20, key, Confirm::NoSuchStage(stage("nowhere")));
    let actions = drain(&mut core);
    assert!(matches!(
        &actions[..],
        [Action::Publish { publish: Publish { target: Target::Dead { class, .. }, .. }, .. }] if class == "unknown_stage"
    ));
}

#[test]
fn an_invalid_message_id_is_dead_lettered_or_rejected_never_requeued() {
    let mut core = core(false);
    for (confirm, then, dead_lettered) in [
        (
            Confirm::Confirmed,
            Action::Ack as fn(TaskKey) -> Action,
            true,
        ),
        (Confirm::Failed("nacked".into()), Action::Reject, false),
    ] {
        let delivery = Delivery {
            meta: Err((RejectReason::InvalidMessageId, "bad id".into())),
            redelivered: false,
            span: String::new(),
        };
        let key = core.handle_delivery(0, delivery);
        let actions = drain(&mut core);
        assert!(matches!(
            &actions[..],
            [Action::Publish {
                publish: Publish {
                    target: Target::Dead { .. },
                    body: Body::Input
                },
                ..
            }]
        ));
        core.handle_confirm(5, key, confirm);
        let actions = drain(&mut core);
        assert_eq!(actions[0], then(key));
        let [_, Action::Emit(Event::DeliveryRejected(rejected))] = &actions[..] else {
            panic!("{actions:?}");
        };
        assert_eq!(rejected.dead_lettered, dead_lettered);
        assert!(!actions.iter().any(|a| matches!(a, Action::Requeue(_))));
    }
    assert_eq!(core.counts().rejected, 2);
    assert_eq!(core.counts().requeued, 0);
}

#[test]
fn pause_stops_consumption_resume_restarts_it_and_drain_stops_the_agent() {
    let mut core = core(false);
    let key = start(&mut core, 0, "t1");
    let Step::Done(verdict) = core.handle_command(1, &Command::Pause) else {
        panic!()
    };
    assert!(verdict.ok, "{verdict:?}");
    assert_eq!(
        drain(&mut core),
        [Action::CancelConsume, Action::State(AgentState::Paused)]
    );
    assert!(!core.can_take());
    core.handle_command(2, &Command::Resume);
    assert_eq!(
        drain(&mut core),
        [
            Action::SetPrefetch(2),
            Action::Consume(stage("a")),
            Action::State(AgentState::Idle)
        ]
    );
    core.handle_command(3, &Command::Drain);
    assert_eq!(
        drain(&mut core),
        [Action::CancelConsume, Action::State(AgentState::Draining)]
    );
    assert!(!core.is_finished(4), "a task is in hand");
    let Step::Done(verdict) = core.handle_command(4, &Command::Resume) else {
        panic!()
    };
    assert!(!verdict.ok, "no resume while stopping");
    core.handle_outcome(
        5,
        key,
        Outcome::Success {
            payload: vec![],
            next: NextStage::End,
            priority: None,
        },
    );
    drain(&mut core);
    core.handle_confirm(6, key, Confirm::Confirmed);
    assert_eq!(drain(&mut core), [Action::Ack(key)]);
    assert!(core.is_finished(7));
    assert_eq!(core.stopping(), Some(("drain", 3)));
}

#[test]
fn a_stop_timeout_gives_the_task_at_the_worker_back_to_the_queue() {
    let mut core = core(false);
    let key = start(&mut core, 0, "t1");
    core.handle_stop(1_000, "SIGTERM".into());
    drain(&mut core);
    assert_eq!(core.poll_timeout(), Some(31_000));
    core.handle_timeout(30_999);
    assert!(drain(&mut core).is_empty(), "not before the timeout");
    core.handle_timeout(31_000);
    let actions = drain(&mut core);
    assert_eq!(
        abandoned(&actions),
        [(STOP_TIMEOUT.to_owned(), WorkerResult::Unfinished)]
    );
    assert!(actions.contains(&Action::CancelWork(key)));
    assert!(actions.contains(&Action::Requeue(key)));
    assert!(core.is_finished(31_000));
    assert_eq!(core.counts().requeued, 1);
    // A late outcome changes nothing.
    core.handle_outcome(31_001, key, success());
    assert!(drain(&mut core).is_empty());
}

#[test]
fn tasks_go_back_to_the_queue_when_the_supervised_worker_exits() {
    let mut core = core(true);
    let key = start(&mut core, 0, "t1");
    let exited = WorkerStatus {
        generation: 1,
        pid: None,
        ready: false,
        ended: Some(Ended {
            generation: 1,
            reason: WORKER_EXITED,
        }),
    };
    core.handle_worker_status(10, exited);
    let actions = drain(&mut core);
    assert_eq!(
        abandoned(&actions),
        [(WORKER_EXITED.to_owned(), WorkerResult::Unfinished)]
    );
    assert!(actions.contains(&Action::Requeue(key)));
    assert!(
        actions.contains(&Action::CancelConsume),
        "not ready: no consuming"
    );
    assert!(actions.contains(&Action::State(AgentState::Starting)));
    let restarted = WorkerStatus {
        generation: 2,
        pid: Some(11),
        ready: true,
        ended: exited.ended,
    };
    core.handle_worker_status(20, restarted);
    let actions = drain(&mut core);
    assert!(actions.contains(&Action::Consume(stage("a"))));
}

#[test]
fn a_task_timeout_on_a_supervised_worker_restarts_it_instead_of_retrying() {
    let mut core = core(true);
    let key = start(&mut core, 0, "t1");
    core.handle_outcome(10, key, Outcome::Failure(Failure::timeout("no answer")));
    assert_eq!(drain(&mut core), [Action::WorkerHung(1)]);
    let hung = WorkerStatus {
        generation: 1,
        pid: Some(10),
        ready: false,
        ended: Some(Ended {
            generation: 1,
            reason: WORKER_HUNG,
        }),
    };
    core.handle_worker_status(20, hung);
    let actions = drain(&mut core);
    assert_eq!(
        abandoned(&actions),
        [(WORKER_HUNG.to_owned(), WorkerResult::Unfinished)]
    );
    assert!(actions.contains(&Action::Requeue(key)));
    // Without a supervisor, a timeout is a retryable failure.
    let mut core = self::core(false);
    let key = start(&mut core, 0, "t2");
    core.handle_outcome(10, key, Outcome::Failure(Failure::timeout("no answer")));
    assert!(matches!(
        &drain(&mut core)[..],
        [Action::Publish {
            publish: Publish {
                target: Target::Retry { .. },
                ..
            },
            ..
        }]
    ));
}

#[test]
fn a_hung_worker_that_is_not_restarted_in_time_still_gives_the_task_back() {
    let mut core = core(true);
    let key = start(&mut core, 0, "t1");
    core.handle_outcome(10, key, Outcome::Failure(Failure::timeout("no answer")));
    drain(&mut core);
    assert_eq!(
        core.poll_timeout(),
        Some(10 + task::HUNG_GRACE.as_millis() as u64)
    );
    core.handle_timeout(5_010);
    assert_eq!(
        abandoned(&drain(&mut core)),
        [(WORKER_HUNG.to_owned(), WorkerResult::Unfinished)]
    );
}

#[test]
fn set_concurrency_keeps_the_tasks_in_hand_and_the_prefetch_follows() {
    let mut core = core(false);
    let key = start(&mut core, 0, "t1");
    let Step::Done(verdict) = core.handle_command(1, &Command::SetConcurrency { concurrency: 4 })
    else {
        panic!()
    };
    assert_eq!(verdict.message, "concurrency 2 -> 4, prefetch 2 -> 4");
    assert_eq!(
        drain(&mut core),
        [
            Action::CancelConsume,
            Action::SetPrefetch(4),
            Action::Consume(stage("a")),
            Action::Heartbeat
        ]
    );
    assert_eq!(core.in_hand(), 1);
    let Step::Done(refused) = core.handle_command(1, &Command::SetConcurrency { concurrency: 0 })
    else {
        panic!()
    };
    assert!(!refused.ok);
    core.handle_outcome(
        2,
        key,
        Outcome::Success {
            payload: vec![],
            next: NextStage::End,
            priority: None,
        },
    );
    assert_eq!(events(&drain(&mut core)), ["task_succeeded"]);
}

#[test]
fn set_prefetch_lets_the_agent_hold_more_tasks_than_its_concurrency() {
    let mut core = core(false);
    core.handle_command(0, &Command::SetPrefetch { prefetch: 10 });
    assert_eq!(
        drain(&mut core),
        [
            Action::CancelConsume,
            Action::SetPrefetch(10),
            Action::Consume(stage("a"))
        ]
    );
    start(&mut core, 1, "t1");
    assert!(core.can_take());
    start(&mut core, 2, "t2");
    assert!(!core.can_take(), "the concurrency bounds the tasks in hand");
    let Step::Done(verdict) = core.handle_command(3, &Command::SetPrefetch { prefetch: 1 }) else {
        panic!()
    };
    assert_eq!(
        verdict.message,
        "prefetch 10 -> 2 (1 asked, never below the concurrency)"
    );
}

#[test]
fn a_lost_connection_gives_the_task_back_after_a_grace_and_the_agent_consumes_again() {
    let mut core = core(false);
    let key = start(&mut core, 0, "t1");
    core.handle_connection_lost(100);
    assert!(!core.can_take());
    assert!(drain(&mut core).is_empty());
    assert_eq!(core.poll_timeout(), Some(1_100));
    core.handle_timeout(1_100);
    let actions = drain(&mut core);
    assert_eq!(
        abandoned(&actions),
        [(CONNECTION_LOST.to_owned(), WorkerResult::Unfinished)]
    );
    assert!(
        actions.contains(&Action::Forget(key)),
        "the broker requeued it"
    );
    assert!(!actions.contains(&Action::Requeue(key)));
    core.handle_connected(2_000);
    assert_eq!(
        drain(&mut core),
        [Action::SetPrefetch(2), Action::Consume(stage("a"))]
    );
}

#[test]
fn a_frozen_agent_gives_up_the_task_its_worker_finished_and_carries_on() {
    let mut core = core(false);
    let key = start(&mut core, 0, "t1");
    core.handle_connection_lost(100);
    core.handle_outcome(150, key, success());
    let actions = drain(&mut core);
    assert_eq!(
        abandoned(&actions),
        [(CONNECTION_LOST.to_owned(), WorkerResult::Succeeded)]
    );
    assert!(!actions.iter().any(|a| matches!(a, Action::Publish { .. })));
    assert!(actions.contains(&Action::Forget(key)));
    // A task settling when the link goes is given up when its confirm fails.
    core.handle_connected(200);
    drain(&mut core);
    let key = start(&mut core, 300, "t2");
    core.handle_outcome(310, key, success());
    drain(&mut core);
    core.handle_connection_lost(320);
    core.handle_confirm(330, key, Confirm::Failed("channel closed".into()));
    let actions = drain(&mut core);
    assert_eq!(
        abandoned(&actions),
        [(CONNECTION_LOST.to_owned(), WorkerResult::Succeeded)]
    );
    assert!(actions.contains(&Action::Forget(key)));
}

#[test]
fn a_settle_that_is_not_confirmed_gives_the_task_back() {
    let mut core = core(false);
    let key = start(&mut core, 0, "t1");
    core.handle_outcome(10, key, success());
    drain(&mut core);
    core.handle_confirm(20, key, Confirm::Failed("unroutable".into()));
    let actions = drain(&mut core);
    assert_eq!(
        abandoned(&actions),
        [(SETTLE_FAILED.to_owned(), WorkerResult::Succeeded)]
    );
    assert!(actions.contains(&Action::Requeue(key)));
    assert!(!actions.contains(&Action::Ack(key)));
}

#[test]
fn an_agent_moved_between_stages_settles_its_tasks_as_tasks_of_their_stage() {
    let mut core = core(false);
    let key = start(&mut core, 0, "t1");
    let assign = Command::Assign {
        stage: stage("c"),
        reason: "rebalance".into(),
    };
    let Step::Declare { route: to, reason } = core.handle_command(1, &assign) else {
        panic!("the stages are declared first");
    };
    let verdict = core.assign(2, to, &reason);
    assert!(verdict.ok, "{verdict:?}");
    let actions = drain(&mut core);
    assert_eq!(
        actions[..5],
        [
            Action::Route(route("c", None)),
            Action::Rebind {
                from: stage("a"),
                to: stage("c")
            },
            Action::CancelConsume,
            Action::SetPrefetch(2),
            Action::Consume(stage("c")),
        ]
    );
    assert_eq!(events(&actions), ["reassigned"]);
    // The task of stage a still goes to a's next stage.
    core.handle_outcome(3, key, success());
    let actions = drain(&mut core);
    assert!(matches!(
        &actions[..],
        [Action::Publish { publish: Publish { target: Target::Next { stage: s, .. }, .. }, .. }] if *s == stage("b")
    ));
    let unknown = Command::Assign {
        stage: stage("zz"),
        reason: String::new(),
    };
    assert!(matches!(core.handle_command(4, &unknown), Step::Done(v) if !v.ok));
    let same = Command::Assign {
        stage: stage("c"),
        reason: String::new(),
    };
    assert!(matches!(core.handle_command(4, &same), Step::Done(v) if v.ok));
}

#[test]
fn the_broker_cancelling_the_consumer_makes_the_agent_consume_again() {
    let mut core = core(false);
    core.handle_consumer_ended(0);
    assert_eq!(
        drain(&mut core),
        [Action::SetPrefetch(2), Action::Consume(stage("a"))]
    );
}

#[test]
fn a_stop_while_the_broker_is_away_waits_for_it_a_little_with_nothing_in_hand() {
    let mut core = core(false);
    core.handle_connection_lost(0);
    core.handle_stop(10, "SIGTERM".into());
    assert!(!core.is_finished(20), "the last events need the broker");
    core.handle_connected(30);
    assert!(core.is_finished(40));
    core.handle_connection_lost(50);
    // Nothing in hand (issue 20): not the whole 30 s shutdown timeout, a
    // few seconds, and the core wakes the driver for it.
    let wait = STOP_WAIT_FOR_BROKER.as_millis() as u64;
    assert!(!core.is_finished(10 + wait - 1));
    assert_eq!(core.poll_timeout(), Some(10 + wait));
    assert!(core.is_finished(10 + wait), "waited long enough");
    // Never past a shorter shutdown timeout.
    let mut quick = AgentCore::new(CoreConfig {
        shutdown_timeout: Duration::from_millis(500),
        ..config(false)
    });
    quick.handle_connected(0);
    quick.handle_connection_lost(1);
    quick.handle_stop(10, "SIGTERM".into());
    assert!(quick.is_finished(510));
}

//! The settle table, row by row.

use super::settle::{self, Body, Plan, SettleCtx, Settled, Target, Then};
use crate::config::{RetryPolicy, StageRoute};
use crate::declare::NextStages;
use crate::handoff::{Failure, NextStage, Outcome};
use guildhall_broker::TaskMeta;
use guildhall_proto::{Event, Names, RejectReason};

fn stage(s: &str) -> guildhall_proto::Stage {
    s.parse().unwrap()
}

fn meta(attempt: u32) -> TaskMeta {
    TaskMeta {
        id: "t-1".parse().unwrap(),
        attempt,
        enqueued_at_ms: Some(10),
        submitted_at_ms: Some(5),
        traceparent: None,
        priority: Default::default(),
        parent: None,
        joined: false,
    }
}

/// A row of the table: target, body, events, what it counts as, then.
type Row = (String, &'static str, Vec<&'static str>, Settled, Then);

/// The target's kind and stage, the body, the events' kinds, what it counts as.
fn row(plan: &Plan) -> Row {
    let target = match plan.publish.as_ref().map(|p| &p.target) {
        None => "-".to_owned(),
        Some(Target::Next { stage, declare, .. }) => format!("next {stage} declare={declare}"),
        Some(Target::Retry {
            stage, delay_ms, ..
        }) => format!("retry {stage} {delay_ms}"),
        Some(Target::Dead { stage, class, .. }) => format!("dead {stage} {class}"),
        Some(Target::Result { meta }) => format!("result {}", meta.id),
    };
    let body = match plan.publish.as_ref().map(|p| &p.body) {
        None => "-",
        Some(Body::Output(_)) => "output",
        Some(Body::Input) => "input",
    };
    let events = plan.events.iter().map(Event::kind).collect();
    (target, body, events, plan.settled, plan.then)
}

#[test]
fn every_row_of_the_settle_table() {
    let names = Names::new("ns".parse().unwrap());
    let route = StageRoute {
        stage: stage("a"),
        next: Some(stage("b")),
    };
    let last = StageRoute {
        stage: stage("b"),
        next: None,
    };
    let routes = [route.clone(), last.clone()];
    let next_stages = NextStages::new(&routes, false);
    let retry = RetryPolicy::default();
    let (m1, m_last) = (meta(1), meta(retry.max_attempts));
    let ctx = |route: &'static StageRoute, meta: &'static TaskMeta| SettleCtx {
        names: Box::leak(Box::new(names.clone())),
        route,
        meta,
        span: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        started_at_ms: 100,
        finished_at_ms: 200,
        retry: Box::leak(Box::new(retry)),
        next_stages: Box::leak(Box::new(next_stages.clone())),
        fan_out: Box::leak(Box::new(settle::FanOutRules::default())),
    };
    let route: &'static StageRoute = Box::leak(Box::new(route));
    let last: &'static StageRoute = Box::leak(Box::new(last));
    let m1: &'static TaskMeta = Box::leak(Box::new(m1));
    let m_last: &'static TaskMeta = Box::leak(Box::new(m_last));
    let success = |next| Outcome::Success {
        payload: b"out".to_vec(),
        next,
        priority: None,
    };
    let delay = retry.delay(1).as_millis();
    let rows: Vec<(&str, Plan, Row)> = vec![
        (
            "success with a next stage",
            settle::plan(success(NextStage::Default), &ctx(route, m1)),
            (
                "next b declare=true".into(),
                "output",
                vec!["task_succeeded"],
                Settled::Done,
                Then::Ack,
            ),
        ),
        (
            "success, pipeline ends (no next stage)",
            settle::plan(success(NextStage::Default), &ctx(last, m1)),
            (
                "-".into(),
                "-",
                vec!["task_succeeded"],
                Settled::Done,
                Then::Ack,
            ),
        ),
        (
            "success, the worker ends the pipeline",
            settle::plan(success(NextStage::End), &ctx(route, m1)),
            (
                "-".into(),
                "-",
                vec!["task_succeeded"],
                Settled::Done,
                Then::Ack,
            ),
        ),
        (
            "success naming a stage the agent does not declare",
            settle::plan(success(NextStage::Stage(stage("x"))), &ctx(route, m1)),
            (
                "next x declare=false".into(),
                "output",
                vec!["task_succeeded"],
                Settled::Done,
                Then::Ack,
            ),
        ),
        (
            "retryable failure, attempts left",
            settle::plan(
                Outcome::Failure(Failure::retryable("e", "boom")),
                &ctx(route, m1),
            ),
            (
                format!("retry a {delay}"),
                "input",
                vec!["task_failed", "task_retrying"],
                Settled::Failed,
                Then::Ack,
            ),
        ),
        (
            "retryable failure, attempts used up",
            settle::plan(
                Outcome::Failure(Failure::retryable("e", "boom")),
                &ctx(route, m_last),
            ),
            (
                "dead a e".into(),
                "input",
                vec!["task_failed", "task_dead_lettered"],
                Settled::Failed,
                Then::Ack,
            ),
        ),
        (
            "permanent failure",
            settle::plan(
                Outcome::Failure(Failure::permanent("bad", "no")),
                &ctx(route, m1),
            ),
            (
                "dead a bad".into(),
                "input",
                vec!["task_failed", "task_dead_lettered"],
                Settled::Failed,
                Then::Ack,
            ),
        ),
        (
            "success naming a next stage that does not exist",
            settle::unknown_stage(&stage("x"), &ctx(route, m1)),
            (
                "dead a unknown_stage".into(),
                "input",
                vec!["task_failed", "task_dead_lettered"],
                Settled::Failed,
                Then::Ack,
            ),
        ),
        (
            "invalid message id",
            settle::unreadable(
                &stage("a"),
                RejectReason::InvalidMessageId,
                "bad id".into(),
                300,
            ),
            (
                "dead a invalid_message_id".into(),
                "input",
                vec!["delivery_rejected"],
                Settled::Rejected,
                Then::AckOrReject,
            ),
        ),
    ];
    for (name, plan, want) in rows {
        assert_eq!(row(&plan), want, "{name}");
    }
    // One time for the hand-off: the next message's enqueue time and the events'.
    let plan = settle::plan(success(NextStage::Default), &ctx(route, m1));
    let Some(Target::Next { meta, .. }) = plan.publish.map(|p| p.target) else {
        panic!("no next stage");
    };
    assert_eq!(meta.enqueued_at_ms, Some(200));
    assert_eq!(meta.attempt, 1);
    assert!(meta.traceparent.is_some());
    let Event::TaskSucceeded(succeeded) = &plan.events[0] else {
        panic!("not TaskSucceeded");
    };
    assert_eq!(
        (succeeded.at_ms, succeeded.next.clone()),
        (200, Some(stage("b")))
    );
    // A retry is the next attempt of the same stage.
    let plan = settle::plan(
        Outcome::Failure(Failure::retryable("e", "boom")),
        &ctx(route, m1),
    );
    let Some(Target::Retry { meta, .. }) = plan.publish.map(|p| p.target) else {
        panic!("no retry");
    };
    assert_eq!(meta.attempt, 2);
}

#[test]
fn a_priority_travels_to_the_next_stage_unless_the_worker_sets_another() {
    let names = Names::new("ns".parse().unwrap());
    let route = StageRoute {
        stage: stage("a"),
        next: Some(stage("b")),
    };
    let next_stages = NextStages::new(std::slice::from_ref(&route), false);
    let retry = RetryPolicy::default();
    let high = meta(1).with_priority(guildhall_proto::Priority::new(8).unwrap());
    let ctx = SettleCtx {
        names: &names,
        route: &route,
        meta: &high,
        span: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        started_at_ms: 100,
        finished_at_ms: 200,
        retry: &retry,
        next_stages: &next_stages,
        fan_out: &settle::FanOutRules::default(),
    };
    let next_priority = |worker: Option<u8>| {
        let plan = settle::plan(
            Outcome::Success {
                payload: vec![],
                next: NextStage::Default,
                priority: worker.map(|p| guildhall_proto::Priority::new(p).unwrap()),
            },
            &ctx,
        );
        let Some(Target::Next { meta, .. }) = plan.publish.map(|p| p.target) else {
            panic!("no next stage");
        };
        let queued = plan.events.iter().any(|e| e.kind() == "task_queued");
        (meta.priority.get(), queued)
    };
    assert_eq!(next_priority(None), (8, true));
    assert_eq!(next_priority(Some(3)), (3, true));
    assert_eq!(next_priority(Some(0)), (0, false));
}

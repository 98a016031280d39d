//! Flows (issue 19) in the agent's core, on virtual time: the settle plan
//! of a fan-out and every reason to refuse one, the order of its hand-off
//! (children confirmed, then the events, then the ack), and `TaskResult`
//! for a child whose pipeline ends.

use super::settle::{self, FanOutRules, Plan, SettleCtx, Settled, Target};
use super::tests::{core, drain, events, start};
use super::*;
use crate::handoff::fanout::{Child, FanOut, INVALID_FAN_OUT_CLASS, Join};
use crate::handoff::{NextStage, Outcome};
use guildhall_proto::flow::{ChildPolicy, MAX_INLINE_RESULT};
use guildhall_proto::{Priority, TaskId, WorkerResult};
use sha2::Digest;

const SPAN: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

fn stage(s: &str) -> Stage {
    s.parse().unwrap()
}

fn meta(id: &str) -> TaskMeta {
    TaskMeta::submission(id.parse().unwrap(), 5, None).with_priority(Priority::new(6).unwrap())
}

fn child(payload: &str, stage_name: Option<&str>) -> Child {
    Child {
        payload: payload.as_bytes().to_vec(),
        stage: stage_name.map(stage),
    }
}

fn fan(children: Vec<Child>, next: NextStage, join: Join) -> Outcome {
    Outcome::FanOut(FanOut {
        children,
        next,
        join,
        on_child_failure: ChildPolicy::Continue,
    })
}

/// Everything a settle context borrows, owned.
struct Setup {
    names: Names,
    route: StageRoute,
    retry: RetryPolicy,
    next_stages: NextStages,
    rules: FanOutRules,
}

impl Setup {
    /// Stage `a` with next stage `b`, `--join merge`, at most 5 children;
    /// `kids` exists only if a worker may name it (not the agent's own).
    fn new() -> Self {
        let route = StageRoute {
            stage: stage("a"),
            next: Some(stage("b")),
        };
        let rules = FanOutRules {
            join: Some(stage("merge")),
            max_children: 5,
        };
        Self {
            names: Names::new("ns".parse().unwrap()),
            next_stages: NextStages::new(std::slice::from_ref(&route), false)
                .with_join(rules.join.as_ref()),
            route,
            retry: RetryPolicy::default(),
            rules,
        }
    }

    fn ctx<'a>(&'a self, meta: &'a TaskMeta) -> SettleCtx<'a> {
        SettleCtx {
            names: &self.names,
            route: &self.route,
            meta,
            span: SPAN,
            started_at_ms: 100,
            finished_at_ms: 200,
            retry: &self.retry,
            next_stages: &self.next_stages,
            fan_out: &self.rules,
        }
    }
}

/// The dead letter's class and error of a refused fan-out.
fn refused(plan: &Plan) -> (String, String) {
    assert_eq!(events_of(plan), ["task_failed", "task_dead_lettered"]);
    assert!(plan.children.is_none());
    match plan.publish.as_ref().map(|p| &p.target) {
        Some(Target::Dead { class, error, .. }) => (class.clone(), error.clone()),
        other => panic!("not a dead letter: {other:?}"),
    }
}

fn events_of(plan: &Plan) -> Vec<&'static str> {
    plan.events.iter().map(Event::kind).collect()
}

#[test]
fn a_fan_out_publishes_every_child_then_its_events_in_order() {
    let setup = Setup::new();
    let parent = meta("P-1");
    let plan = settle::plan(
        fan(
            vec![
                child("zero", None),
                child("one", Some("kids")),
                child("two", Some("b")),
            ],
            NextStage::Default,
            Join::Default,
        ),
        &setup.ctx(&parent),
    );
    assert!(plan.publish.is_none());
    assert_eq!(plan.settled, Settled::Done);
    let children = plan.children.as_ref().expect("children");
    // Each stage once, then the join: the agent's own declared, others checked.
    assert_eq!(
        children.stages,
        [
            (stage("b"), true),
            (stage("kids"), false),
            (stage("merge"), true)
        ]
    );
    let ids: Vec<&str> = children
        .messages
        .iter()
        .map(|m| m.meta.id.as_str())
        .collect();
    assert_eq!(ids, ["P-1:0", "P-1:1", "P-1:2"]);
    let stages: Vec<&str> = children.messages.iter().map(|m| m.stage.as_str()).collect();
    assert_eq!(stages, ["b", "kids", "b"]);
    for (m, payload) in children.messages.iter().zip(["zero", "one", "two"]) {
        assert_eq!(m.payload, payload.as_bytes());
        assert_eq!(m.meta.parent.as_ref().map(TaskId::as_str), Some("P-1"));
        assert_eq!(m.meta.priority.get(), 6, "the parent's priority");
        assert_eq!(m.meta.attempt, 1);
        assert_eq!(m.meta.enqueued_at_ms, Some(200));
        assert_eq!(m.meta.submitted_at_ms, Some(200));
        assert_eq!(m.meta.traceparent.as_deref(), Some(SPAN));
        assert!(!m.meta.joined);
    }
    assert_eq!(
        events_of(&plan),
        [
            "task_submitted",
            "task_submitted",
            "task_submitted",
            "task_fanned_out",
            "task_succeeded"
        ]
    );
    let Event::TaskSubmitted(s) = &plan.events[1] else {
        panic!()
    };
    assert_eq!(
        (s.task_id.as_str(), s.stage.as_str(), s.payload_bytes),
        ("P-1:1", "kids", 3)
    );
    let Event::TaskFannedOut(f) = &plan.events[3] else {
        panic!()
    };
    assert_eq!(f.task_id.as_str(), "P-1");
    assert_eq!((f.stage.as_str(), f.attempt, f.children), ("a", 1, 3));
    assert_eq!(f.join, Some(stage("merge")));
    assert_eq!(f.on_child_failure, ChildPolicy::Continue);
    assert_eq!((f.priority.get(), f.at_ms), (6, 200));
    let Event::TaskSucceeded(s) = &plan.events[4] else {
        panic!()
    };
    assert_eq!(
        (s.task_id.as_str(), s.next.clone(), s.at_ms),
        ("P-1", None, 200)
    );
}

#[test]
fn the_join_and_the_childrens_stage_come_from_the_answer_else_the_agent() {
    let setup = Setup::new();
    let parent = meta("P-1");
    let plan_with = |next, join| {
        let plan = settle::plan(fan(vec![child("x", None)], next, join), &setup.ctx(&parent));
        let children = plan.children.clone().expect("children");
        let join = plan.events.iter().find_map(|e| match e {
            Event::TaskFannedOut(f) => Some(f.join.clone()),
            _ => None,
        });
        (
            children.messages[0].stage.clone(),
            join.flatten(),
            children.stages,
        )
    };
    let (s, join, stages) = plan_with(NextStage::Stage(stage("other")), Join::None);
    assert_eq!((s, join), (stage("other"), None));
    assert_eq!(stages, [(stage("other"), false)]);
    let (s, join, _) = plan_with(NextStage::Default, Join::Stage(stage("j2")));
    assert_eq!((s, join), (stage("b"), Some(stage("j2"))));
    let (_, join, stages) = plan_with(NextStage::Default, Join::Stage(stage("b")));
    assert_eq!(join, Some(stage("b")));
    assert_eq!(stages, [(stage("b"), true)], "a stage is checked once");
}

#[test]
fn every_refused_fan_out_is_a_dead_letter_with_the_reason() {
    let setup = Setup::new();
    let parent = meta("P-1");
    let joined = TaskMeta {
        joined: true,
        ..parent.clone()
    };
    let long = meta(&"x".repeat(127));
    let one = || vec![child("x", None)];
    let many = |n| (0..n).map(|_| child("x", None)).collect::<Vec<_>>();
    let cases: Vec<(&str, &TaskMeta, Outcome, &str)> = vec![
        (
            "a joined task",
            &joined,
            fan(one(), NextStage::Default, Join::Default),
            "already fanned out once (x-guildhall-joined is set)",
        ),
        (
            "no child",
            &parent,
            fan(vec![], NextStage::Default, Join::Default),
            "lists no child",
        ),
        (
            "more than --max-children",
            &parent,
            fan(many(6), NextStage::Default, Join::Default),
            "lists 6 children, more than this agent's --max-children 5",
        ),
        (
            "an id too long for child ids",
            &long,
            fan(one(), NextStage::Default, Join::Default),
            "too long for its children's",
        ),
        (
            "a child with no stage and the pipeline ended",
            &parent,
            fan(
                vec![child("x", Some("b")), child("y", None)],
                NextStage::End,
                Join::Default,
            ),
            "child 1 names no stage",
        ),
    ];
    for (name, meta, outcome, why) in cases {
        let plan = settle::plan(outcome, &setup.ctx(meta));
        let (class, error) = refused(&plan);
        assert_eq!(class, INVALID_FAN_OUT_CLASS, "{name}");
        assert!(error.contains(why), "{name}: {error:?} should say {why:?}");
    }
    // The longest id that still has children: `<126 bytes>:0` is 128.
    let fits = meta(&"x".repeat(126));
    let plan = settle::plan(
        fan(one(), NextStage::Default, Join::Default),
        &setup.ctx(&fits),
    );
    assert!(plan.children.is_some());
    // Exactly --max-children is fine.
    let plan = settle::plan(
        fan(many(5), NextStage::Default, Join::Default),
        &setup.ctx(&parent),
    );
    assert_eq!(plan.children.map(|c| c.messages.len()), Some(5));
    // An agent without --next: a child with no stage cannot go anywhere.
    let mut no_next = Setup::new();
    no_next.route.next = None;
    let plan = settle::plan(
        fan(one(), NextStage::Default, Join::Default),
        &no_next.ctx(&parent),
    );
    assert!(refused(&plan).1.contains("child 0 names no stage"));
}

/// A core whose task `P-1` (stage `a`) answered with a fan-out of two
/// children; the actions asked for so far are drained.
fn fanned_out() -> (AgentCore, TaskKey) {
    let mut core = core(false);
    let key = start(&mut core, 1_000, "P-1");
    core.handle_outcome(
        1_500,
        key,
        fan(
            vec![child("x", None), child("y", None)],
            NextStage::Default,
            Join::Stage(stage("merge")),
        ),
    );
    (core, key)
}

#[test]
fn children_are_confirmed_then_the_events_then_the_parent_is_acked() {
    let (mut core, key) = fanned_out();
    let actions = drain(&mut core);
    let [Action::PublishChildren { children, .. }] = &actions[..] else {
        panic!("only the children first: {actions:?}");
    };
    assert_eq!(children.messages.len(), 2);
    assert!(events(&actions).is_empty(), "no event before the children");
    core.handle_confirm(1_510, key, Confirm::Confirmed);
    let actions = drain(&mut core);
    assert_eq!(
        events(&actions),
        [
            "task_submitted",
            "task_submitted",
            "task_fanned_out",
            "task_succeeded"
        ]
    );
    assert!(
        matches!(&actions[..], [Action::EmitConfirmed { .. }]),
        "{actions:?}"
    );
    core.handle_confirm(1_520, key, Confirm::Confirmed);
    assert_eq!(drain(&mut core), [Action::Ack(key)]);
    assert_eq!(core.counts().done, 1);
    assert_eq!(core.in_hand(), 0);
}

#[test]
fn a_failed_child_publish_gives_the_parent_back_and_emits_nothing_of_it() {
    let (mut core, key) = fanned_out();
    drain(&mut core);
    core.handle_confirm(1_510, key, Confirm::Failed("nacked".into()));
    let actions = drain(&mut core);
    assert!(actions.contains(&Action::Requeue(key)), "{actions:?}");
    assert_eq!(events(&actions), ["task_abandoned"]);
    let abandoned = super::tests::abandoned(&actions);
    assert_eq!(
        abandoned,
        [(SETTLE_FAILED.to_owned(), WorkerResult::Succeeded)]
    );
    assert_eq!(core.counts().done, 0);
    // The events failing after the children were confirmed: given back too
    // (a redelivery publishes the same child ids again).
    let (mut core, key) = fanned_out();
    drain(&mut core);
    core.handle_confirm(1_510, key, Confirm::Confirmed);
    drain(&mut core);
    core.handle_confirm(1_520, key, Confirm::Failed("events".into()));
    let actions = drain(&mut core);
    assert!(actions.contains(&Action::Requeue(key)), "{actions:?}");
    assert!(!actions.contains(&Action::Ack(key)));
}

#[test]
fn a_missing_child_or_join_stage_dead_letters_the_parent() {
    for (missing, what) in [("merge", "join stage"), ("b", "child stage")] {
        let (mut core, key) = fanned_out();
        drain(&mut core);
        core.handle_confirm(1_510, key, Confirm::NoSuchStage(stage(missing)));
        let actions = drain(&mut core);
        let [Action::Publish { publish, .. }] = &actions[..] else {
            panic!("{actions:?}");
        };
        let Target::Dead { class, error, .. } = &publish.target else {
            panic!("{publish:?}");
        };
        assert_eq!(class, INVALID_FAN_OUT_CLASS);
        assert!(error.contains(&format!("{what} \"{missing}\"")), "{error}");
        core.handle_confirm(1_520, key, Confirm::Confirmed);
        assert_eq!(
            events(&drain(&mut core)),
            ["task_failed", "task_dead_lettered"]
        );
        core.handle_confirm(1_530, key, Confirm::Confirmed);
        assert_eq!(drain(&mut core), [Action::Ack(key)]);
        assert_eq!(core.counts().failed, 1);
    }
}

#[test]
fn a_child_at_its_pipeline_end_reports_its_result_before_its_success() {
    let mut setup = Setup::new();
    setup.route.next = None;
    let parent = meta("P-1");
    let kid = parent.child("P-1:4".parse().unwrap(), 50, None);
    let success = |payload: Vec<u8>, next| Outcome::Success {
        payload,
        next,
        priority: None,
    };
    let plan = settle::plan(
        success(b"out".to_vec(), NextStage::Default),
        &setup.ctx(&kid),
    );
    assert_eq!(events_of(&plan), ["task_result", "task_succeeded"]);
    assert!(plan.publish.is_none());
    let Event::TaskResult(r) = &plan.events[0] else {
        panic!()
    };
    assert_eq!((r.task_id.as_str(), r.parent.as_str()), ("P-1:4", "P-1"));
    assert_eq!((r.stage.as_str(), r.attempt, r.at_ms), ("a", 1, 200));
    assert_eq!(
        (r.result.as_deref(), r.result_bytes),
        (Some(&b"out"[..]), 3)
    );
    assert_eq!(r.stored_sha256, None);
    // Too large to carry: stored in the results stream first (confirmed
    // before the events), the event carrying its size and SHA-256.
    let big = vec![b'x'; MAX_INLINE_RESULT + 1];
    let plan = settle::plan(success(big.clone(), NextStage::Default), &setup.ctx(&kid));
    let Event::TaskResult(r) = &plan.events[0] else {
        panic!()
    };
    assert_eq!((r.result.as_ref(), r.result_bytes), (None, 65_537));
    let digest: [u8; 32] = sha2::Sha256::digest(&big).into();
    assert_eq!(r.stored_sha256, Some(digest));
    assert_eq!(events_of(&plan), ["task_result", "task_succeeded"]);
    let Some(settle::Publish {
        target: Target::Result { meta },
        body: settle::Body::Output(stored),
    }) = &plan.publish
    else {
        panic!(
            "the result is not stored: {:?}",
            plan.publish.map(|p| p.target)
        )
    };
    assert_eq!((meta.id.as_str(), stored.len()), ("P-1:4", 65_537));
    assert_eq!(plan.then, settle::Then::Ack);
    let plan = settle::plan(
        success(vec![b'x'; MAX_INLINE_RESULT], NextStage::Default),
        &setup.ctx(&kid),
    );
    assert!(
        matches!(&plan.events[0], Event::TaskResult(r) if r.result.is_some() && r.stored_sha256.is_none())
    );
    assert!(plan.publish.is_none());
    // The worker ends the pipeline early: the result is reported too.
    let with_next = Setup::new();
    let plan = settle::plan(success(b"o".to_vec(), NextStage::End), &with_next.ctx(&kid));
    assert_eq!(events_of(&plan), ["task_result", "task_succeeded"]);
    // Not at the end: the result goes on, no TaskResult (the child's parent
    // header travels with it).
    let plan = settle::plan(
        success(b"o".to_vec(), NextStage::Default),
        &with_next.ctx(&kid),
    );
    assert_eq!(events_of(&plan), ["task_succeeded", "task_queued"]);
    let Some(Target::Next { meta, .. }) = plan.publish.map(|p| p.target) else {
        panic!("no next stage")
    };
    assert_eq!(meta.parent.as_ref().map(TaskId::as_str), Some("P-1"));
    // A task with no parent: no TaskResult.
    let plan = settle::plan(
        success(b"o".to_vec(), NextStage::Default),
        &setup.ctx(&parent),
    );
    assert_eq!(events_of(&plan), ["task_succeeded"]);
    // A child fanning out: TaskFannedOut, never TaskResult.
    let plan = settle::plan(
        fan(vec![child("g", Some("b"))], NextStage::Default, Join::None),
        &setup.ctx(&kid),
    );
    assert_eq!(
        events_of(&plan),
        ["task_submitted", "task_fanned_out", "task_succeeded"]
    );
    let grandchild = &plan.children.unwrap().messages[0].meta;
    assert_eq!(grandchild.id.as_str(), "P-1:4:0");
    assert_eq!(
        grandchild.parent.as_ref().map(TaskId::as_str),
        Some("P-1:4")
    );
}

//! Flows on virtual time: dependencies, joins, failures, restarts.

use super::*;
use crate::core::CoreConfig;
use crate::core::test_support::{Sim, T0, tid};
use guildhall_proto::Event;
use guildhall_proto::flow::{ChildPolicy as Child, DependencyPolicy as Dep, HoldReason};

const COORD: &str = "coordinator-1";

/// A sim that records what it sent, so a fresh core can replay it.
struct Rec {
    sim: Sim,
    log: Vec<(String, u64, Vec<Event>)>,
}

impl Rec {
    fn new() -> Self {
        Self {
            sim: Sim::new(),
            log: Vec::new(),
        }
    }

    fn send(&mut self, sender: &str, events: Vec<Event>) {
        self.log.push((sender.into(), self.sim.now, events.clone()));
        self.sim.send(sender, events);
    }

    /// Every release handed over now, carried out as the runtime does:
    /// `TaskReleased` written back.
    fn release_all(&mut self) -> Vec<Release> {
        let mut out = Vec::new();
        while let Some(r) = self.sim.core.poll_release() {
            out.push(r);
        }
        for r in &out {
            let e = self.sim.released(
                r.task_id.as_str(),
                r.stage.as_str(),
                r.reason,
                r.dead_letter.as_deref(),
            );
            self.send(COORD, vec![e]);
        }
        out
    }

    /// A fresh core that replays everything sent (no snapshot), then
    /// catches up.
    fn replayed(&self) -> Sim {
        let mut fresh = Sim::replaying(CoreConfig::default());
        fresh.now = self.sim.now;
        for (sender, at, events) in &self.log {
            fresh.send_at(sender, *at, events.clone());
        }
        assert!(
            fresh.core.poll_release().is_none(),
            "nothing is released while replaying"
        );
        fresh.core.set_caught_up(fresh.now);
        fresh
    }
}

fn status(sim: &Sim, id: &str) -> TaskStatus {
    sim.core.tasks.get_ref(id).expect("a known task").status()
}

fn ids(rs: &[Release]) -> Vec<&str> {
    rs.iter().map(|r| r.task_id.as_str()).collect()
}

#[test]
fn a_dependent_is_released_when_its_last_dependency_succeeds_and_only_then() {
    let mut r = Rec::new();
    let s = r.sim.submitted("A", "build");
    let s2 = r.sim.submitted("B", "build");
    r.send("submitter", vec![s, s2]);
    let h = r
        .sim
        .held("D", "deploy", &["A", "B"], Dep::Fail, b"payload-d");
    r.send(COORD, vec![h]);
    assert_eq!(status(&r.sim, "D"), TaskStatus::Held);
    assert!(r.release_all().is_empty());
    let run = r.sim.run("A", "build", None);
    r.send("agent-1", run);
    assert!(r.release_all().is_empty(), "B has not finished");
    r.sim.advance(10);
    let run = r.sim.run("B", "build", None);
    r.send("agent-1", run);
    let rs = r.release_all();
    assert_eq!(ids(&rs), ["D"]);
    assert_eq!(&*rs[0].payload, b"payload-d");
    assert_eq!(rs[0].stage.as_str(), "deploy");
    assert_eq!(rs[0].dead_letter, None);
    assert_eq!(status(&r.sim, "D"), TaskStatus::Queued);
    assert!(r.release_all().is_empty(), "released once");
    let [(_, dep), (_, join)] = r.sim.core.flows().held_counts();
    assert_eq!((dep, join), (0, 0));
    let released = crate::core::telemetry::Count::FlowReleased {
        reason: HoldReason::Dependency,
        dead_lettered: false,
    };
    assert_eq!(r.sim.recorder.count_of(released), 1);
}

#[test]
fn a_dependency_already_finished_counts_at_once() {
    let mut r = Rec::new();
    let run = r.sim.run("A", "build", None);
    r.send("agent-1", run);
    let h = r.sim.held("D", "deploy", &["A"], Dep::Fail, b"x");
    r.send(COORD, vec![h]);
    assert_eq!(ids(&r.release_all()), ["D"]);
}

#[test]
fn a_failed_dependency_dead_letters_the_dependent_unless_it_runs_anyway() {
    let mut r = Rec::new();
    let s = r.sim.submitted("A", "build");
    r.send("submitter", vec![s]);
    let h1 = r.sim.held("D1", "deploy", &["A"], Dep::Fail, b"1");
    let h2 = r.sim.held("D2", "deploy", &["A"], Dep::Run, b"2");
    r.send(COORD, vec![h1, h2]);
    let dl = r.sim.dead_lettered("A", "build", 1, "boom");
    r.send("agent-1", vec![dl]);
    let rs = r.release_all();
    assert_eq!(ids(&rs), ["D1", "D2"]);
    let why = rs[0].dead_letter.as_deref().expect("dead-lettered");
    assert!(
        why.contains("dependency A") && why.contains("boom"),
        "{why}"
    );
    assert_eq!(rs[1].dead_letter, None, "run anyway");
    assert_eq!(status(&r.sim, "D1"), TaskStatus::DeadLettered);
    // The dead-lettered dependent fails its own dependents in turn.
    let h3 = r.sim.held("D3", "deploy", &["D1"], Dep::Fail, b"3");
    r.send(COORD, vec![h3]);
    let rs = r.release_all();
    assert_eq!(ids(&rs), ["D3"]);
    let why = rs[0].dead_letter.as_deref().expect("dead-lettered");
    assert!(
        why.starts_with(
            "dependency D1 dead-lettered at deploy: dependency A dead-lettered at build: boom"
        ),
        "the same words as when the end is read live: {why}"
    );
}

#[test]
fn an_unknown_dependency_gets_a_grace_then_the_dependent_is_dead_lettered() {
    let mut r = Rec::new();
    let h = r.sim.held("D", "deploy", &["LATE"], Dep::Fail, b"x");
    let h2 = r.sim.held("E", "deploy", &["NEVER"], Dep::Fail, b"x");
    r.send(COORD, vec![h, h2]);
    r.sim.advance(1_000);
    let s = r.sim.submitted("LATE", "build");
    r.send("submitter", vec![s]);
    r.sim.advance(UNKNOWN_GRACE_MS);
    let rs = r.release_all();
    assert_eq!(ids(&rs), ["E"]);
    let why = rs[0].dead_letter.as_deref().expect("dead-lettered");
    assert!(why.contains("unknown dependency NEVER"), "{why}");
    assert_eq!(
        r.sim.core.flows().held("D").map(|h| h.decision.clone()),
        Some(None),
        "a dependency that appeared is waited for"
    );
    assert_eq!(r.sim.core.poll_timeout().map(|t| t > r.sim.now), Some(true));
}

#[test]
fn a_cycle_is_dead_lettered_at_once() {
    let mut r = Rec::new();
    let s = r.sim.submitted("X", "build");
    r.send("submitter", vec![s]);
    let a = r.sim.held("A", "s", &["B"], Dep::Fail, b"a");
    let b = r.sim.held("B", "s", &["A"], Dep::Fail, b"b");
    r.send(COORD, vec![a, b]);
    let rs = r.release_all();
    assert_eq!(ids(&rs), ["B"]);
    let why = rs[0].dead_letter.as_deref().expect("dead-lettered");
    assert!(why.contains("cycle: B -> A -> B"), "{why}");
    // ... and A, which waited for B, fails with it.
    let rs = r.release_all();
    assert_eq!(ids(&rs), ["A"]);
    assert!(rs[0].dead_letter.is_some());
    let id = tid("C");
    assert!(matches!(
        r.sim.core.check_hold(&id, &[tid("C")]),
        Err(HoldError::Cycle(_))
    ));
    assert!(matches!(
        r.sim.core.check_hold(&tid("X"), &[]),
        Err(HoldError::Exists(_))
    ));
    assert!(matches!(
        r.sim.core.check_hold(&id, &[tid("nobody")]),
        Err(HoldError::Unknown(_))
    ));
    assert_eq!(r.sim.core.check_hold(&id, &[tid("X")]), Ok(()));
    // A held task waits for an id nobody knows yet: holding that id after
    // it would close a cycle, and is refused before it is written.
    let h = r.sim.held("H", "s", &["Z"], Dep::Fail, b"h");
    r.send("agent-s", vec![h]);
    assert_eq!(
        r.sim.core.check_hold(&tid("Z"), &[tid("H")]),
        Err(HoldError::Cycle("Z -> H -> Z".into()))
    );
    assert_eq!(r.sim.core.check_hold(&tid("Z"), &[tid("X")]), Ok(()));
}

/// Parent P runs at `split`, fans out 3 children to `work`, joins at `merge`.
fn fan_out(r: &mut Rec, policy: ChildPolicy) {
    let s = r.sim.submitted("P", "split");
    r.send("submitter", vec![s]);
    let st = r.sim.started("P", "split", 1, T0);
    let fo = r.sim.fanned_out("P", "split", 3, Some("merge"), policy);
    let ok = r.sim.succeeded("P", "split", 1, r.sim.now, None);
    let mut subs: Vec<Event> = (0..3)
        .map(|i| r.sim.submitted(&format!("P:{i}"), "work"))
        .collect();
    subs.push(st);
    subs.push(fo);
    subs.push(ok);
    r.send("agent-split", subs);
}

fn child_done(r: &mut Rec, i: u32, result: &str) {
    let id = format!("P:{i}");
    let mut ev = vec![r.sim.started(&id, "work", 1, r.sim.now)];
    ev.push(r.sim.result(&id, "P", "work", result.as_bytes()));
    ev.push(r.sim.succeeded(&id, "work", 1, r.sim.now, None));
    r.send("agent-work", ev);
}

#[test]
fn a_join_waits_for_every_child_counts_each_once_and_keeps_child_order() {
    let mut r = Rec::new();
    fan_out(&mut r, Child::Fail);
    assert_eq!(status(&r.sim, "P"), TaskStatus::Waiting);
    child_done(&mut r, 2, "\"two\"");
    child_done(&mut r, 0, "{\"n\":0}");
    child_done(&mut r, 0, "{\"n\":\"again\"}"); // redelivered: counted once
    assert!(r.release_all().is_empty());
    r.sim.advance(250);
    child_done(&mut r, 1, "one");
    let rs = r.release_all();
    assert_eq!(ids(&rs), ["P"]);
    assert_eq!(rs[0].stage.as_str(), "merge");
    assert!(rs[0].joined);
    assert_eq!(rs[0].reason, HoldReason::Join);
    let v: serde_json::Value = serde_json::from_slice(&rs[0].payload).expect("JSON");
    let c = v["children"].as_array().expect("children");
    assert_eq!(c[0]["result"]["n"], 0);
    assert_eq!(c[1]["result_text"], "one");
    assert_eq!(c[2]["result"], "two");
    assert_eq!(status(&r.sim, "P"), TaskStatus::Queued);
    assert_eq!(r.sim.recorder.buffered(None, "join_wait"), 1);
    // The parent goes on at its join stage and finishes there.
    let run = r.sim.run("P", "merge", None);
    r.send("agent-merge", run);
    assert_eq!(status(&r.sim, "P"), TaskStatus::Succeeded);
    // The task list says which tasks are in a flow, and its root.
    let list = r.sim.core.tasks_view(
        &crate::core::query::TaskFilter {
            limit: 100,
            ..Default::default()
        },
        r.sim.now,
    );
    let root = |id: &str| {
        list.iter()
            .find(|t| t.id == id)
            .and_then(|t| t.flow_root.clone())
    };
    assert_eq!(root("P:1").as_deref(), Some("P"));
    assert_eq!(root("P").as_deref(), Some("P"));
    let view = r
        .sim
        .core
        .task_flow_view(&tid("P"), r.sim.now)
        .expect("in a flow");
    let children = view.children.expect("fanned out");
    assert_eq!((children.total, children.state), (3, "released"));
    assert_eq!(children.ended.get("succeeded"), Some(&3));
}

#[test]
fn children_that_finish_before_their_parents_report_are_counted() {
    let mut r = Rec::new();
    let s = r.sim.submitted("P", "split");
    r.send("submitter", vec![s]);
    child_done(&mut r, 0, "0");
    child_done(&mut r, 1, "1");
    child_done(&mut r, 2, "2");
    assert!(r.release_all().is_empty(), "the count is not known yet");
    let fo = r
        .sim
        .fanned_out("P", "split", 3, Some("merge"), Child::Fail);
    let ok = r.sim.succeeded("P", "split", 1, r.sim.now, None);
    r.send("agent-split", vec![fo, ok]);
    assert_eq!(ids(&r.release_all()), ["P"]);
}

#[test]
fn a_failed_child_fails_the_join_or_the_join_goes_on_without_it() {
    for (policy, dead) in [(Child::Fail, true), (Child::Continue, false)] {
        let mut r = Rec::new();
        fan_out(&mut r, policy);
        child_done(&mut r, 0, "0");
        let dl = r.sim.dead_lettered("P:1", "work", 3, "bad input");
        r.send("agent-work", vec![dl]);
        child_done(&mut r, 2, "2");
        let rs = r.release_all();
        assert_eq!(ids(&rs), ["P"]);
        assert_eq!(rs[0].dead_letter.is_some(), dead, "{policy:?}");
        let v: serde_json::Value = serde_json::from_slice(&rs[0].payload).expect("JSON");
        assert_eq!(v["children"][1]["status"], "dead_lettered");
        if dead {
            assert!(
                rs[0]
                    .dead_letter
                    .as_deref()
                    .is_some_and(|w| w.contains("P:1"))
            );
            assert_eq!(status(&r.sim, "P"), TaskStatus::DeadLettered);
        }
    }
}

#[test]
fn a_nested_fan_out_without_a_join_finishes_with_its_children_and_feeds_the_outer_join() {
    let mut r = Rec::new();
    fan_out(&mut r, Child::Fail);
    child_done(&mut r, 0, "0");
    child_done(&mut r, 2, "2");
    // P:1 fans out into two grandchildren, no join of its own.
    let fo = r.sim.fanned_out("P:1", "work", 2, None, Child::Fail);
    let ok = r.sim.succeeded("P:1", "work", 1, r.sim.now, None);
    r.send("agent-work", vec![fo, ok]);
    assert_eq!(status(&r.sim, "P:1"), TaskStatus::Waiting);
    assert!(r.release_all().is_empty());
    for i in 0..2 {
        let id = format!("P:1:{i}");
        let res = r.sim.result(&id, "P:1", "leaf", format!("{i}").as_bytes());
        let ok = r.sim.succeeded(&id, "leaf", 1, r.sim.now, None);
        r.send("agent-leaf", vec![res, ok]);
    }
    assert_eq!(status(&r.sim, "P:1"), TaskStatus::Succeeded);
    let rs = r.release_all();
    assert_eq!(ids(&rs), ["P"]);
    let v: serde_json::Value = serde_json::from_slice(&rs[0].payload).expect("JSON");
    assert_eq!(v["children"][1]["result"]["children"][1]["result"], 1);
    assert_eq!(r.sim.core.flow_root(&tid("P:1:0")).as_str(), "P");
    let flow = r
        .sim
        .core
        .flow_view(&tid("P:1:1"), r.sim.now)
        .expect("known");
    assert_eq!(flow.root, "P");
    assert_eq!(flow.total, 6);
    assert_eq!(flow.edges.len(), 5);
}

#[test]
fn nothing_is_released_while_replaying_and_a_restart_without_snapshot_releases_again() {
    let mut r = Rec::new();
    let s = r.sim.submitted("A", "build");
    r.send("submitter", vec![s]);
    let h = r.sim.held("D", "deploy", &["A"], Dep::Fail, b"d");
    r.send(COORD, vec![h]);
    let run = r.sim.run("A", "build", None);
    r.send("agent-1", run);
    // The coordinator decided and died before its TaskReleased was written.
    let rs: Vec<Release> = std::iter::from_fn(|| r.sim.core.poll_release()).collect();
    assert_eq!(ids(&rs), ["D"]);
    let mut fresh = r.replayed();
    let again = fresh
        .core
        .poll_release()
        .expect("released again after the restart");
    assert_eq!(again.task_id.as_str(), "D");
    assert_eq!(&*again.payload, b"d");
    // Once `TaskReleased` is in the stream, a restart releases nothing.
    let e = r.sim.released("D", "deploy", HoldReason::Dependency, None);
    r.send(COORD, vec![e]);
    let mut fresh = r.replayed();
    assert!(fresh.core.poll_release().is_none());
    assert_eq!(status(&fresh, "D"), TaskStatus::Queued);
}

#[test]
fn a_start_at_its_stage_retires_a_release_whose_event_was_lost() {
    let mut r = Rec::new();
    let h = r.sim.held("D", "deploy", &["A"], Dep::Fail, b"d");
    let run = r.sim.run("A", "build", None);
    r.send(COORD, vec![h]);
    r.send("agent-1", run);
    let mut fresh = r.replayed();
    // The restarted core reads the task's start before it was handed over.
    let started = fresh.started("D", "deploy", 1, fresh.now);
    fresh.send("agent-2", vec![started]);
    assert!(fresh.core.poll_release().is_none());
    // Counted once, whichever of its start and its TaskReleased comes first.
    let e = fresh.released("D", "deploy", HoldReason::Dependency, None);
    fresh.send(COORD, vec![e]);
    let released = crate::core::telemetry::Count::FlowReleased {
        reason: HoldReason::Dependency,
        dead_lettered: false,
    };
    assert_eq!(fresh.recorder.count_of(released), 1);
}

#[test]
fn held_tasks_and_joins_survive_a_snapshot() {
    let mut r = Rec::new();
    let s = r.sim.submitted("A", "build");
    r.send("submitter", vec![s]);
    let h = r.sim.held("D", "deploy", &["A"], Dep::Fail, b"payload");
    r.send(COORD, vec![h]);
    fan_out(&mut r, Child::Fail);
    child_done(&mut r, 0, "\"zero\"");
    let mut back = r.sim.resume(CoreConfig::default());
    back.core.set_caught_up(back.now);
    let run = back.run("A", "build", None);
    back.send("agent-1", run);
    for i in 1..3 {
        let id = format!("P:{i}");
        let res = back.result(&id, "P", "work", b"1");
        let ok = back.succeeded(&id, "work", 1, back.now, None);
        back.send("agent-work", vec![res, ok]);
    }
    let rs: Vec<Release> = std::iter::from_fn(|| back.core.poll_release()).collect();
    assert_eq!(ids(&rs), ["D", "P"]);
    assert_eq!(&*rs[0].payload, b"payload");
    let v: serde_json::Value = serde_json::from_slice(&rs[1].payload).expect("JSON");
    assert_eq!(v["children"][0]["result"], "zero");
}

#[test]
fn a_stored_result_reaches_the_join_as_a_reference_and_survives_a_replay() {
    let mut r = Rec::new();
    fan_out(&mut r, Child::Fail);
    child_done(&mut r, 0, "0");
    child_done(&mut r, 2, "2");
    let digest = [7u8; 32];
    let mut ev = vec![r.sim.started("P:1", "work", 1, r.sim.now)];
    ev.push(r.sim.stored_result("P:1", "P", "work", 1 << 20, digest));
    ev.push(r.sim.succeeded("P:1", "work", 1, r.sim.now, None));
    r.send("agent-work", ev);
    // What the route reads: the digest, no bytes.
    let known = r.sim.core.child_result(&tid("P:1")).expect("known");
    assert_eq!(
        (known.sha256, known.bytes, known.inline),
        (Some(digest), 1 << 20, None)
    );
    assert_eq!(
        r.sim
            .core
            .child_result(&tid("P:0"))
            .and_then(|c| c.inline)
            .as_deref(),
        Some(&b"0"[..])
    );
    assert_eq!(r.sim.core.child_result(&tid("P:9")), None);
    assert_eq!(r.sim.core.child_result(&tid("Q:1")), None);
    let replayed = r.replayed();
    let rs = r.release_all();
    assert_eq!(ids(&rs), ["P"]);
    let v: serde_json::Value = serde_json::from_slice(&rs[0].payload).expect("JSON");
    let entry = &v["children"][1];
    assert_eq!(entry["result_bytes"], 1 << 20);
    assert_eq!(entry["result_ref"]["stream"], "guildhall.results");
    assert_eq!(entry["result_ref"]["sha256"], "07".repeat(32));
    assert_eq!(v["children"][0]["result"], 0);
    // A core rebuilt from the stream alone decides the same payload.
    let mut replayed = replayed;
    let again = replayed
        .core
        .poll_release()
        .expect("released after a replay");
    assert_eq!(again.payload, rs[0].payload);
    // Handed on: the inline bytes are dropped, the digest is kept.
    assert_eq!(
        r.sim.core.child_result(&tid("P:0")).map(|c| c.inline),
        Some(None)
    );
    assert_eq!(
        r.sim.core.child_result(&tid("P:1")).and_then(|c| c.sha256),
        Some(digest)
    );
}

#[test]
fn a_join_seen_running_before_its_release_is_read_drops_the_inline_results() {
    let mut r = Rec::new();
    fan_out(&mut r, Child::Fail);
    for i in 0..3 {
        child_done(&mut r, i, "\"r\"");
    }
    assert!(r.sim.core.poll_release().is_some());
    assert!(
        r.sim
            .core
            .child_result(&tid("P:0"))
            .and_then(|c| c.inline)
            .is_some()
    );
    // The join's agent reports it before the `TaskReleased` is read.
    let st = r.sim.started("P", "merge", 1, r.sim.now);
    r.send("agent-merge", vec![st]);
    for i in 0..3 {
        let c = r
            .sim
            .core
            .child_result(&tid(&format!("P:{i}")))
            .expect("known");
        assert_eq!((c.inline, c.bytes), (None, 3), "P:{i}");
    }
}

#[test]
fn a_result_both_carried_and_stored_is_refused() {
    let mut r = Rec::new();
    fan_out(&mut r, Child::Fail);
    let Event::TaskResult(mut forged) = r.sim.result("P:0", "P", "work", b"x") else {
        unreachable!()
    };
    forged.stored_sha256 = Some([1; 32]);
    r.send("agent-work", vec![Event::TaskResult(forged)]);
    assert_eq!(r.sim.core.flows().refused, 1);
    assert_eq!(r.sim.core.child_result(&tid("P:0")), None);
}

#[test]
fn a_release_from_a_sender_that_is_not_a_coordinator_is_refused() {
    let mut r = Rec::new();
    let h = r.sim.held("D", "deploy", &["A"], Dep::Fail, b"d");
    r.send(COORD, vec![h]);
    let forged = r.sim.released("D", "deploy", HoldReason::Dependency, None);
    r.send("agent-evil", vec![forged]);
    assert_eq!(status(&r.sim, "D"), TaskStatus::Held);
    assert_eq!(r.sim.core.flows().refused, 1);
    // A forged result for a task that is not that parent's child.
    let res = r.sim.result("Q:1", "P", "work", b"x");
    r.send("agent-evil", vec![res]);
    assert_eq!(r.sim.core.flows().refused, 2);
}

#[test]
fn cancelling_a_held_task_settles_it_and_fails_its_dependents() {
    let mut r = Rec::new();
    let s = r.sim.submitted("A", "build");
    r.send("submitter", vec![s]);
    let h = r.sim.held("D", "deploy", &["A"], Dep::Fail, b"d");
    let h2 = r.sim.held("E", "deploy", &["D"], Dep::Fail, b"e");
    r.send(COORD, vec![h, h2]);
    let c = Event::TaskCancelRequested(guildhall_proto::TaskCancelRequested {
        at_ms: r.sim.now,
        task_id: tid("D"),
        by: "ops".into(),
    });
    r.send(COORD, vec![c]);
    assert_eq!(status(&r.sim, "D"), TaskStatus::Cancelled);
    let rs = r.release_all();
    assert_eq!(ids(&rs), ["E"]);
    assert!(
        rs[0]
            .dead_letter
            .as_deref()
            .is_some_and(|w| w.contains("cancelled"))
    );
    let run = r.sim.run("A", "build", None);
    r.send("agent-1", run);
    assert!(
        r.release_all().is_empty(),
        "a cancelled task is never released"
    );
}

#[test]
fn cancelling_a_parent_cancels_its_open_children() {
    let mut r = Rec::new();
    fan_out(&mut r, Child::Fail);
    child_done(&mut r, 0, "0");
    let all = r.sim.core.with_flow_descendants(&[tid("P")], 100);
    let names: Vec<&str> = all.iter().map(TaskId::as_str).collect();
    assert_eq!(names, ["P", "P:1", "P:2"]);
}

#[test]
fn the_eta_of_a_dependent_is_its_slowest_dependency_then_its_own_path() {
    let mut sim = Sim::new();
    for stage in ["build", "deploy"] {
        let hello = sim.hello(stage, &[stage], 1);
        sim.send(&format!("agent-{stage}"), vec![hello]);
    }
    // Teach both stages a 1 s service time.
    for i in 0..20 {
        for stage in ["build", "deploy"] {
            let id = format!("warm-{stage}-{i}");
            let st = sim.started(&id, stage, 1, sim.now);
            sim.send(&format!("agent-{stage}"), vec![st]);
            sim.advance(1_000);
            let ok = sim.succeeded(&id, stage, 1, sim.now - 1_000, None);
            sim.send(&format!("agent-{stage}"), vec![ok]);
        }
    }
    let st = sim.started("A", "build", 1, sim.now);
    sim.send("agent-build", vec![st]);
    let h = sim.held("D", "deploy", &["A"], Dep::Fail, b"d");
    sim.send(COORD, vec![h]);
    let view = sim.core.task_view("D", sim.now).expect("known");
    assert_eq!(view.status, "held");
    let eta = view.eta_in_ms.expect("an ETA");
    assert!((1_900..=3_500).contains(&eta), "{eta}");
    let flow = view.flow.expect("in a flow");
    assert_eq!(flow.waiting_for, ["dependency A"]);
    assert_eq!(flow.after[0].status, "running");
}

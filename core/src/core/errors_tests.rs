//! Error tracking on virtual time: classification, the per-stage cap, the
//! bounded samples, new and rising classes (never during the replay), crash
//! and dead-worker classes, and the tracker across a snapshot.

use super::errors::{self, ErrorTracker, Failure, MINUTE_MS, Rise, classify};
use super::telemetry::Count;
use super::test_support::{Sim, T0, st, tid};
use super::views::ErrorsView;
use super::*;
use guildhall_proto::*;

/// The first minute boundary after `T0`, so tests count in whole minutes.
const M0: u64 = (T0 / MINUTE_MS + 1) * MINUTE_MS;

/// A core that has caught up with the stream.
fn live(config: CoreConfig) -> Sim {
    Sim::with(config)
}

/// Events and views of this file's scenarios, on the shared driver.
trait Failures {
    fn start(&self, task: &TaskId, stage: &str) -> Event;
    fn failure(&self, task: &TaskId, stage: &str, class: &str, error: &str) -> Event;
    fn failed_at(&self, at_ms: u64, task: &TaskId, stage: &str, class: &str, error: &str) -> Event;
    fn fail(&mut self, stage: &str, class: &str, error: &str) -> TaskId;
    fn fail_at(&mut self, at_ms: u64, stage: &str, class: &str, error: &str) -> TaskId;
    fn holding(&self, stage: &str, in_hand: &[&TaskId]) -> Event;
    fn view(&self) -> ErrorsView;
    fn counts(&self) -> Vec<(String, String, u64)>;
    fn metric(&self, stage: &str, class: &str) -> Option<u64>;
}

impl Failures for Sim {
    fn start(&self, task: &TaskId, stage: &str) -> Event {
        Event::TaskStarted(TaskStarted {
            at_ms: self.now,
            task_id: task.clone(),
            stage: st(stage),
            attempt: 1,
            enqueued_at_ms: Some(self.now),
            submitted_at_ms: Some(T0),
            redelivered: false,
        })
    }

    fn failure(&self, task: &TaskId, stage: &str, class: &str, error: &str) -> Event {
        self.failed_at(self.now, task, stage, class, error)
    }

    fn failed_at(&self, at_ms: u64, task: &TaskId, stage: &str, class: &str, error: &str) -> Event {
        Event::TaskFailed(TaskFailed {
            at_ms,
            task_id: task.clone(),
            stage: st(stage),
            attempt: 1,
            started_at_ms: self.now,
            error: error.into(),
            error_class: class.into(),
            retryable: true,
        })
    }

    /// A new task fails at `stage` (worker `w`) with this class and error.
    fn fail(&mut self, stage: &str, class: &str, error: &str) -> TaskId {
        self.fail_at(self.now, stage, class, error)
    }

    /// The same, the failure happening at `at_ms` (agent clock).
    fn fail_at(&mut self, at_ms: u64, stage: &str, class: &str, error: &str) -> TaskId {
        let task = self.next_task();
        let events = vec![
            self.start(&task, stage),
            self.failed_at(at_ms, &task, stage, class, error),
        ];
        self.send("w", events);
        task
    }

    fn holding(&self, stage: &str, in_hand: &[&TaskId]) -> Event {
        Event::Heartbeat(Box::new(Heartbeat {
            at_ms: self.now,
            version: "0.1.0".into(),
            stage: st(stage),
            next: None,
            state: AgentState::Processing,
            concurrency: 1,
            heartbeat_ms: 1000,
            in_hand: in_hand
                .iter()
                .map(|t| TaskInHand {
                    task_id: (*t).clone(),
                    attempt: 1,
                    started_at_ms: self.now,
                })
                .collect(),
            done: 0,
            failed: 0,
            worker: None,
            agent: None,
            hostname: "h".into(),
            worker_restarts: 0,
            rtt_ms: None,
        }))
    }

    fn view(&self) -> ErrorsView {
        self.core.errors_view(self.now)
    }

    /// `(stage, class, count)` of every class, in view order.
    fn counts(&self) -> Vec<(String, String, u64)> {
        self.view()
            .classes
            .into_iter()
            .map(|c| (c.stage, c.error_class, c.count))
            .collect()
    }

    /// The count of `stage`'s failures of `class` handed to the telemetry
    /// (`guildhall_task_errors_total{stage,error_class}` in the runtime).
    fn metric(&self, stage: &str, class: &str) -> Option<u64> {
        let n = self.recorder.count_of(Count::TaskError { stage, class });
        (n > 0).then_some(n)
    }
}

fn new_notice(stage: &str, class: &str, sample: &str, task: &TaskId) -> Notice {
    Notice::ErrorClassNew {
        stage: st(stage),
        error_class: class.into(),
        message_sample: sample.into(),
        task_id: task.clone(),
    }
}

#[test]
fn classes_come_from_the_worker_or_else_the_message() {
    for (class, message, want) in [
        ("http_503", "HTTP 500: whatever", "http_503"),
        ("db_timeout", "", "db_timeout"),
        ("  Exit_3 ", "", "exit_3"),
        ("Bad Class!", "", "bad_class_"),
        ("", "HTTP 503: busy", "http_503"),
        ("", "upstream said http 429 too many", "http_429"),
        ("", "HTTP 504: gateway timeout", "http_504"),
        ("", "HTTP 5031", "unknown"),
        ("", "exit code 3", "exit_3"),
        ("", "process: exit status 127", "exit_127"),
        ("", "exited with code 65: bad input", "exit_65"),
        ("", "killed by signal 9", "signal_9"),
        ("", "request timed out after 30 s", "timeout"),
        ("", "Timeout", "timeout"),
        ("", "exit code -1", "unknown"),
        ("", "something broke", "unknown"),
        ("", "", "unknown"),
        ("   ", "exit code 2", "exit_2"),
    ] {
        assert_eq!(classify(class, message), want, "{class:?} {message:?}");
    }
    let long = "x".repeat(100);
    assert_eq!(classify(&long, "").len(), errors::MAX_CLASS_LEN);
    assert_eq!(classify("ÉCHEC", ""), "_chec");
    assert_eq!(errors::abandon_class("worker exited"), Some("crash"));
    assert_eq!(errors::abandon_class("worker unhealthy"), Some("crash"));
    assert_eq!(
        errors::abandon_class("worker hung: task timeout"),
        Some("timeout")
    );
    for reason in [
        "connection lost",
        "stop timeout",
        "settle failed",
        "worker restarted",
    ] {
        assert_eq!(errors::abandon_class(reason), None, "{reason}");
    }
}

#[test]
fn the_21st_class_of_a_stage_counts_as_other() {
    let mut sim = live(CoreConfig::default());
    for i in 0..20 {
        sim.fail("a", &format!("class_{i:02}"), "boom");
    }
    assert_eq!(sim.error_notices().len(), 20);
    let t21 = sim.fail("a", "class_20", "the 21st");
    let t22 = sim.fail("a", "class_21", "the 22nd");
    sim.fail("a", "class_00", "known");
    // Another stage has its own cap.
    sim.fail("b", "class_20", "elsewhere");
    let notices = sim.error_notices();
    assert_eq!(notices.len(), 2, "{notices:?}");
    assert_eq!(notices[0], new_notice("a", "other", "the 21st", &t21));
    assert!(
        matches!(&notices[1], Notice::ErrorClassNew { stage, error_class, .. }
        if stage.as_str() == "b" && error_class == "class_20")
    );
    let counts = sim.counts();
    assert_eq!(counts.len(), 22);
    assert_eq!(counts[0], ("a".into(), "class_00".into(), 2));
    assert_eq!(counts[1], ("a".into(), "other".into(), 2));
    assert!(!counts.iter().any(|c| c.1 == "class_20" && c.0 == "a"));
    let other = &sim.view().classes[1];
    let tasks: Vec<&str> = other.samples.iter().map(|s| s.task_id.as_str()).collect();
    assert_eq!(tasks, [t22.as_str(), t21.as_str()], "newest first");
    assert_eq!(sim.metric("a", "other"), Some(2));
    assert_eq!(sim.metric("a", "class_00"), Some(2));
    assert_eq!(sim.metric("a", "class_20"), None);
    assert_eq!(sim.metric("b", "class_20"), Some(1));
    // A worker's own `other` is that same bucket, and takes no slot.
    let mut sim = live(CoreConfig {
        max_error_classes_per_stage: 1,
        ..CoreConfig::default()
    });
    sim.fail("a", "other", "x");
    sim.fail("a", "first", "x");
    sim.fail("a", "second", "x");
    assert_eq!(
        sim.counts(),
        [
            ("a".into(), "other".into(), 2),
            ("a".into(), "first".into(), 1)
        ]
    );
}

#[test]
fn samples_are_bounded_and_messages_cut() {
    let mut sim = live(CoreConfig::default());
    let mut tasks = Vec::new();
    for i in 0..8 {
        tasks.push(sim.fail("a", "http_503", &format!("HTTP 503: try {i}")));
        sim.advance_to(sim.now + 10);
    }
    let long = "é".repeat(2_000);
    let last = sim.fail("a", "http_503", &long);
    let view = sim.view();
    let c = &view.classes[0];
    assert_eq!(c.count, 9);
    assert_eq!(c.samples.len(), errors::SAMPLES_PER_CLASS);
    assert_eq!(c.samples[0].task_id, last.as_str());
    assert_eq!(c.samples[0].message.chars().count(), 501);
    assert!(c.samples[0].message.ends_with("é…"));
    assert_eq!(c.samples[0].attempt, 1);
    assert_eq!(c.samples[0].at_ms, sim.now);
    let older: Vec<&str> = c.samples[1..].iter().map(|s| s.message.as_str()).collect();
    assert_eq!(
        older,
        [
            "HTTP 503: try 7",
            "HTTP 503: try 6",
            "HTTP 503: try 5",
            "HTTP 503: try 4"
        ]
    );
    assert_eq!(c.first_seen_ms, T0);
    assert_eq!(c.last_seen_ms, sim.now);
    let short = "x".repeat(500);
    assert_eq!(errors::truncate_sample(&short), short);
}

#[test]
fn messages_are_stored_verbatim() {
    let mut sim = live(CoreConfig::default());
    let message = "<script>alert('x')</script> & \"quotes\"";
    let task = sim.fail("a", "", message);
    assert_eq!(
        sim.error_notices(),
        [new_notice("a", "unknown", message, &task)]
    );
    assert_eq!(sim.view().classes[0].samples[0].message, message);
}

#[test]
fn a_new_class_is_noticed_once_and_not_during_the_replay() {
    let mut sim = Sim::replaying(CoreConfig::default());
    // History read back now: bursts of http_503 an hour ago and a minute ago.
    sim.advance_to(T0 + 2 * 3_600_000);
    for ago in [3_600_000, 60_000] {
        for _ in 0..20 {
            sim.fail_at(sim.now - ago, "a", "http_503", "HTTP 503: busy");
        }
    }
    assert_eq!(sim.error_notices(), []);
    let view = sim.view();
    assert_eq!(view.classes[0].first_seen_ms, sim.now - 3_600_000);
    assert_eq!(view.classes[0].last_seen_ms, sim.now - 60_000);
    assert!((view.classes[0].rate_per_min - 4.0).abs() < 1e-9);
    assert_eq!(
        sim.metric("a", "http_503"),
        Some(40),
        "counted all the same"
    );
    sim.core.set_caught_up(sim.now);
    sim.fail("a", "http_503", "HTTP 503: again");
    // Seen during the replay: not new. Rising now (21 in the last 5
    // minutes, none before), so that is said once caught up.
    assert!(
        matches!(
            &sim.error_notices()[..],
            [Notice::ErrorClassRising { last_5m: 21, .. }]
        ),
        "seen during the replay: not new"
    );
    let task = sim.fail("a", "timeout", "timed out");
    sim.fail("a", "timeout", "timed out again");
    assert_eq!(
        sim.error_notices(),
        [new_notice("a", "timeout", "timed out", &task)]
    );
    let view = sim.view();
    let new: Vec<(&str, bool)> = view
        .classes
        .iter()
        .map(|c| (c.error_class.as_str(), c.new))
        .collect();
    assert_eq!(new, [("http_503", false), ("timeout", true)]);
    // Ten minutes later it is not new any more.
    sim.advance_to(sim.now + 10 * MINUTE_MS);
    assert!(!sim.view().classes[1].new);
}

/// The rising notices taken from the core, as `(minute since M0, class,
/// last_5m, previous_rate_per_min)`.
fn take(sim: &mut Sim, rises: &mut Vec<(u64, String, u64, f64)>) {
    for n in sim.error_notices() {
        if let Notice::ErrorClassRising {
            error_class,
            last_5m,
            previous_rate_per_min,
            ..
        } = n
        {
            rises.push((
                (sim.now - M0) / MINUTE_MS,
                error_class,
                last_5m,
                previous_rate_per_min,
            ));
        }
    }
}

#[test]
fn a_rising_class_is_noticed_once_per_rise() {
    let mut sim = live(CoreConfig::default());
    let mut rises = Vec::new();
    // One failure a minute: a young class rises from nothing once it has 5
    // in 5 minutes, then hovers at the thresholds (out of the window at each
    // minute's start, back in with its failure) without alerting again, and
    // settles once its own baseline catches up (minute 8).
    for m in 0..15 {
        sim.advance_to(M0 + m * MINUTE_MS);
        sim.fail("a", "flaky", "HTTP 500");
        take(&mut sim, &mut rises);
    }
    let view = sim.view();
    assert!(!view.classes[0].rising);
    assert!((view.classes[0].rate_per_min - 1.0).abs() < 1e-9);
    // A burst: 3 times the baseline (1/min) once 15 fall in the last 5 min.
    sim.advance_to(M0 + 15 * MINUTE_MS);
    for _ in 0..13 {
        sim.fail("a", "flaky", "HTTP 500");
        take(&mut sim, &mut rises);
    }
    assert!(sim.view().classes[0].rising);
    assert_eq!(
        rises,
        [(4, "flaky".into(), 5, 0.0), (15, "flaky".into(), 15, 1.0)]
    );
    // Still rising: no second notice. It stops rising at minute 19 and is
    // re-armed 5 calm minutes later.
    sim.advance_to(M0 + 16 * MINUTE_MS);
    sim.fail("a", "flaky", "HTTP 500");
    take(&mut sim, &mut rises);
    assert_eq!(rises.len(), 2);
    sim.advance_to(M0 + 19 * MINUTE_MS);
    assert!(!sim.view().classes[0].rising);
    sim.advance_to(M0 + 25 * MINUTE_MS);
    assert_eq!(sim.view().classes[0].rate_per_min, 0.0);
    for _ in 0..40 {
        sim.fail("a", "flaky", "HTTP 500");
        take(&mut sim, &mut rises);
    }
    // Baseline, minutes 11..20: 4 + 13 + 1 failures, 1.8/min; 27 in the
    // last 5 minutes is 5.4/min, three times that.
    assert_eq!(rises.len(), 3, "{rises:?}");
    assert_eq!((rises[2].0, rises[2].2), (25, 27));
    assert!((rises[2].3 - 1.8).abs() < 1e-9, "{rises:?}");
}

#[test]
fn the_tracker_alone_rises_and_rearms() {
    let stage = st("a");
    let task = tid("T");
    let mut t = ErrorTracker::new(20, 256);
    let fail = |at_ms| Failure {
        stage: &stage,
        class: "x",
        task_id: &task,
        message: "m",
        at_ms,
        attempt: 1,
    };
    let first = t.record(M0, fail(M0), true).unwrap();
    assert!(first.new && first.rising.is_none());
    for _ in 0..3 {
        assert_eq!(t.record(M0, fail(M0), true).unwrap().rising, None);
    }
    let fifth = t.record(M0, fail(M0), true).unwrap();
    assert!(!fifth.new);
    assert_eq!(
        fifth.rising,
        Some(Rise {
            last_5m: 5,
            previous_rate_per_min: 0.0
        })
    );
    assert_eq!(t.record(M0, fail(M0), true).unwrap().rising, None);
    // Events from the future count as now; from before the window, not in
    // the rate (but in the count).
    t.record(M0, fail(M0 + 3_600_000), true).unwrap();
    t.record(M0, fail(M0 - 3_600_000), true).unwrap();
    let view = t.view(M0);
    assert_eq!(view.classes[0].count, 8);
    assert_eq!(view.classes[0].last_seen_ms, M0);
    assert_eq!(view.classes[0].first_seen_ms, M0 - 3_600_000);
    assert!((view.classes[0].rate_per_min - 7.0 / 5.0).abs() < 1e-9);
    t.rearm(M0 + 4 * MINUTE_MS);
    assert_eq!(
        t.record(M0 + 4 * MINUTE_MS, fail(M0 + 4 * MINUTE_MS), true)
            .unwrap()
            .rising,
        None,
        "still rising, already reported"
    );
    // Calm from minute 5 (1 failure in minutes 1..5); a rise within the
    // next 5 minutes is the same one.
    t.rearm(M0 + 5 * MINUTE_MS);
    let at = M0 + 6 * MINUTE_MS;
    for _ in 0..15 {
        assert_eq!(t.record(at, fail(at), true).unwrap().rising, None);
    }
    // Calm again from minute 11 (nothing since 6), re-armed at 16: the next
    // rise (3 x 1.6/min over minutes 2..11) is reported, once.
    for m in [11, 15, 16] {
        t.rearm(M0 + m * MINUTE_MS);
    }
    let at = M0 + 16 * MINUTE_MS;
    let rises = (0..30)
        .filter_map(|_| t.record(at, fail(at), true).unwrap().rising)
        .collect::<Vec<_>>();
    assert_eq!(rises.len(), 1, "re-armed once the first rise was over");
    // Replaying: counted, never reported.
    let mut quiet = ErrorTracker::new(20, 256);
    for _ in 0..10 {
        let r = quiet.record(M0, fail(M0), false).unwrap();
        assert!(!r.new && r.rising.is_none());
    }
    // The stage limit.
    let mut small = ErrorTracker::new(20, 1);
    assert!(small.record(M0, fail(M0), true).is_some());
    let other_stage = st("b");
    let f = Failure {
        stage: &other_stage,
        ..fail(M0)
    };
    assert_eq!(small.record(M0, f, true), None);
    assert_eq!(small.len(), 1);
}

#[test]
fn crashes_dead_workers_and_dead_letters_have_their_classes() {
    let mut sim = live(CoreConfig::default());
    // A worker process exit gives the task back: crash. A lost connection
    // does not count.
    for (task, reason) in [("C1", "worker exited"), ("C2", "connection lost")] {
        let ev = vec![
            sim.start(&tid(task), "a"),
            Event::TaskAbandoned(TaskAbandoned {
                at_ms: sim.now,
                task_id: tid(task),
                stage: st("a"),
                attempt: 1,
                started_at_ms: sim.now,
                reason: reason.into(),
                result: WorkerResult::Unfinished,
            }),
            Event::WorkerExited(WorkerExited {
                at_ms: sim.now,
                pid: 7,
                code: Some(1),
                signal: None,
                restarts: 1,
                restart_in_ms: Some(100),
            }),
        ];
        sim.send("w", ev);
    }
    // A failure then its dead-lettering: one failure. A dead-lettering
    // nobody reported a failure for: one, classified from its error.
    let d1 = tid("D1");
    let ev = vec![
        sim.start(&d1, "a"),
        sim.failure(&d1, "a", "http_422", "HTTP 422: bad"),
        Event::TaskDeadLettered(TaskDeadLettered {
            at_ms: sim.now,
            task_id: d1.clone(),
            stage: st("a"),
            attempt: 1,
            error: "HTTP 422: bad".into(),
        }),
    ];
    sim.send("w", ev);
    sim.send(
        "w",
        vec![Event::TaskDeadLettered(TaskDeadLettered {
            at_ms: sim.now,
            task_id: tid("D2"),
            stage: st("a"),
            attempt: 20,
            error: "exit code 3".into(),
        })],
    );
    // A worker holding G falls silent and is declared dead: worker_dead.
    let g = tid("G");
    let ev = vec![sim.start(&g, "a"), sim.holding("a", &[&g])];
    sim.send("gone", ev);
    sim.advance_to(sim.now + 3_000);
    let notices: Vec<Notice> = std::iter::from_fn(|| sim.core.poll_notice()).collect();
    let dead_at = notices
        .iter()
        .position(|n| matches!(n, Notice::WorkerDead { .. }))
        .expect("declared dead");
    assert!(
        matches!(&notices[dead_at + 1], Notice::ErrorClassNew { error_class, task_id, message_sample, .. }
            if error_class == "worker_dead" && task_id == &g && message_sample.contains("declared dead")),
        "{notices:?}"
    );
    let mut counts = sim.counts();
    counts.sort();
    let counts: Vec<(&str, u64)> = counts.iter().map(|c| (c.1.as_str(), c.2)).collect();
    assert_eq!(
        counts,
        [
            ("crash", 1),
            ("exit_3", 1),
            ("http_422", 1),
            ("worker_dead", 1)
        ]
    );
    assert_eq!(sim.metric("a", "crash"), Some(1));
    assert_eq!(sim.metric("a", "worker_dead"), Some(1));
    let view = sim.view();
    let crash = view
        .classes
        .iter()
        .find(|c| c.error_class == "crash")
        .unwrap();
    assert_eq!(crash.samples[0].task_id, "C1");
    assert_eq!(crash.samples[0].message, "worker exited");
}

#[test]
fn the_tracker_survives_a_snapshot() {
    let mut sim = live(CoreConfig::default());
    sim.advance_to(M0);
    for _ in 0..6 {
        sim.fail("a", "http_503", "HTTP 503: <b>busy</b>");
    }
    sim.fail("b", "", "exit code 2");
    let notices = sim.error_notices();
    assert!(
        notices
            .iter()
            .any(|n| matches!(n, Notice::ErrorClassRising { .. })),
        "{notices:?}"
    );
    let mut restored = sim.resume(CoreConfig::default());
    assert_eq!(restored.core.errors_view(sim.now), sim.view());
    assert_eq!(restored.core.errors_view(sim.now).classes.len(), 2);
    assert_eq!(restored.metric("a", "http_503"), Some(6));
    assert_eq!(restored.metric("b", "exit_2"), Some(1));
    restored.core.set_caught_up(restored.now);
    // Known classes are not new again; the rise was reported already.
    restored.fail("a", "http_503", "HTTP 503");
    restored.fail("b", "exit_2", "exit code 2");
    assert_eq!(restored.error_notices(), []);
    assert_eq!(restored.metric("a", "http_503"), Some(7));
    // The restoring core's cap applies to classes not seen yet.
    let config = CoreConfig {
        max_error_classes_per_stage: 1,
        ..CoreConfig::default()
    };
    let mut capped = sim.resume(config);
    capped.core.set_caught_up(capped.now);
    capped.fail("a", "timeout", "timed out");
    assert_eq!(capped.metric("a", "other"), Some(1));
}

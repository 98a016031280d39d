//! Snapshots on virtual time: a busy core survives encode, decode and
//! restore with the same views and counters, keeps working afterwards, and
//! corrupt bytes are refused without a panic.

use crate::core::query::TaskFilter;
use crate::core::snapshot::{self, FORMAT_VERSION, MAGIC, SnapshotError, SnapshotHeader};
use crate::core::stages::QueueStats;
use crate::core::test_support::{Sim, T0, st, tid};
use crate::core::{Core, CoreConfig, Notice};
use crate::metrics::Metrics;
use guildhall_proto::*;
use proptest::prelude::*;

fn ns() -> Namespace {
    Namespace::new("snap").unwrap()
}

/// The `/metrics` text of `f`'s core on `m`, per-worker counters exported
/// first, as a scrape does.
fn metrics(f: &mut Sim, m: &Metrics) -> String {
    f.core.export_worker_counters();
    m.text_of(&mut f.core, f.now)
}

/// A heartbeat of an agent at concurrency 2 that reports its own counts.
fn heartbeat(f: &Sim, stage: &str, next: Option<&str>, in_hand: &[(&str, u32)]) -> Event {
    Event::Heartbeat(Box::new(Heartbeat {
        at_ms: f.now,
        version: "0.1.0".into(),
        stage: st(stage),
        next: next.map(st),
        state: AgentState::Processing,
        concurrency: 2,
        heartbeat_ms: 1000,
        in_hand: in_hand
            .iter()
            .map(|(t, attempt)| TaskInHand {
                task_id: tid(t),
                attempt: *attempt,
                started_at_ms: f.now,
            })
            .collect(),
        done: 7,
        failed: 2,
        worker: Some(ProcStats {
            pid: 9,
            cpu_ratio: 0.25,
            rss_bytes: 1 << 20,
        }),
        agent: None,
        hostname: "h".into(),
        worker_restarts: 1,
        rtt_ms: None,
    }))
}

fn started(f: &Sim, task: &str, stage: &str, attempt: u32) -> Event {
    Event::TaskStarted(TaskStarted {
        at_ms: f.now,
        task_id: tid(task),
        stage: st(stage),
        attempt,
        enqueued_at_ms: Some(f.now - 20),
        submitted_at_ms: Some(T0),
        redelivered: false,
    })
}

fn succeeded(f: &Sim, task: &str, stage: &str, attempt: u32, next: Option<&str>) -> Event {
    Event::TaskSucceeded(TaskSucceeded {
        at_ms: f.now,
        task_id: tid(task),
        stage: st(stage),
        attempt,
        started_at_ms: f.now - 50,
        next: next.map(st),
        submitted_at_ms: Some(T0),
    })
}

fn failed(f: &Sim, task: &str, stage: &str, attempt: u32) -> Event {
    Event::TaskFailed(TaskFailed {
        at_ms: f.now,
        task_id: tid(task),
        stage: st(stage),
        attempt,
        started_at_ms: f.now - 30,
        error: "HTTP 503: busy".into(),
        error_class: "http_503".into(),
        retryable: true,
    })
}

/// A core with live, stopped and dead workers on two stages, and tasks
/// finished, retried, dead-lettered, requeued, running and queued.
fn busy(per_worker: bool) -> (Sim, Metrics) {
    let fm = Metrics::new(per_worker);
    let mut f = Sim::with_telemetry(CoreConfig::default(), fm.clone(), true);
    let (hb_a, hb_b) = (
        heartbeat(&f, "a", Some("b"), &[]),
        heartbeat(&f, "b", None, &[]),
    );
    f.send("wa", vec![hb_a.clone()]);
    f.send("wb", vec![hb_b]);
    f.send("gone", vec![hb_a.clone()]);
    f.send("quitter", vec![hb_a]);
    for i in 0..5 {
        let t = format!("T{i}");
        let ev = vec![Event::TaskSubmitted(TaskSubmitted {
            at_ms: f.now,
            task_id: tid(&t),
            stage: st("a"),
            payload_bytes: 3,
        })];
        f.send("submitter", ev);
        let ev = vec![started(&f, &t, "a", 1)];
        f.send("wa", ev);
        f.advance(60);
        let ev = vec![succeeded(&f, &t, "a", 1, Some("b"))];
        f.send("wa", ev);
        let ev = vec![started(&f, &t, "b", 1)];
        f.send("wb", ev);
        f.advance(60);
        let ev = vec![succeeded(&f, &t, "b", 1, None)];
        f.send("wb", ev);
    }
    // R: fails once at a, retried, succeeds, now running at b.
    let ev = vec![started(&f, "R", "a", 1)];
    f.send("wa", ev);
    f.advance(40);
    let ev = vec![
        failed(&f, "R", "a", 1),
        Event::TaskRetrying(TaskRetrying {
            at_ms: f.now,
            task_id: tid("R"),
            stage: st("a"),
            attempt: 1,
            delay_ms: 100,
        }),
    ];
    f.send("wa", ev);
    f.advance(150);
    let ev = vec![started(&f, "R", "a", 2)];
    f.send("wa", ev);
    f.advance(60);
    let ev = vec![succeeded(&f, "R", "a", 2, Some("b"))];
    f.send("wa", ev);
    let ev = vec![started(&f, "R", "b", 1)];
    f.send("wb", ev);
    // D: dead-lettered at a.
    let ev = vec![started(&f, "D", "a", 1)];
    f.send("wa", ev);
    f.advance(40);
    let ev = vec![
        failed(&f, "D", "a", 1),
        Event::TaskDeadLettered(TaskDeadLettered {
            at_ms: f.now,
            task_id: tid("D"),
            stage: st("a"),
            attempt: 1,
            error: "bad input".into(),
        }),
    ];
    f.send("wa", ev);
    // Q: queued. G: held by "gone", which falls silent and is declared dead.
    f.send(
        "submitter",
        vec![Event::TaskSubmitted(TaskSubmitted {
            at_ms: f.now,
            task_id: tid("Q"),
            stage: st("a"),
            payload_bytes: 1,
        })],
    );
    let ev = vec![
        started(&f, "G", "a", 1),
        heartbeat(&f, "a", Some("b"), &[("G", 1)]),
    ];
    f.send("gone", ev);
    f.send(
        "quitter",
        vec![Event::AgentStopping(AgentStopping {
            at_ms: f.now,
            reason: "drain".into(),
        })],
    );
    f.core.handle_malformed("unknown_event");
    for _ in 0..4 {
        f.advance(1_000);
        let ev = vec![heartbeat(&f, "a", Some("b"), &[])];
        f.send("wa", ev);
        let ev = vec![heartbeat(&f, "b", None, &[("R", 1)])];
        f.send("wb", ev);
    }
    for (stage, ready) in [("a", 3), ("b", 0)] {
        let q = QueueStats {
            ready,
            unacked: Some(1),
            consumers: 2,
        };
        f.core.handle_queue_stats(f.now, &st(stage), q);
    }
    let _ = f.all_notices();
    (f, fm)
}

/// Encode, decode and restore `f`'s core (on fresh metrics).
fn restored(f: &Sim, per_worker: bool) -> (Core, Metrics) {
    let bytes = f.core.encode_snapshot(&ns(), f.now).unwrap();
    let snap = snapshot::decode(&bytes, &ns()).unwrap();
    assert_eq!(snap.header.offset, Some(f.offset));
    assert_eq!(snap.header.written_at_ms, f.now);
    let m = Metrics::new(per_worker);
    let core = Core::restore(snap, CoreConfig::default(), m.clone(), f.now);
    (core, m)
}

/// The exposition without histogram series (they restart at zero).
fn without_histograms(text: &str) -> Vec<&str> {
    let histograms = [
        "guildhall_task_duration_seconds",
        "guildhall_task_queue_wait_seconds",
        "guildhall_pipeline_duration_seconds",
        "guildhall_event_lag_seconds",
    ];
    text.lines()
        .filter(|l| !histograms.iter().any(|h| l.contains(h)))
        .collect()
}

#[test]
fn a_restored_core_shows_the_same_views_and_counters() {
    let (mut f, fm) = busy(true);
    let before = metrics(&mut f, &fm);
    let (mut core, cm) = restored(&f, true);
    let now = f.now;
    let statuses: Vec<_> = f.core.workers_view(now).iter().map(|w| w.status).collect();
    assert_eq!(statuses, ["dead", "stopped", "idle", "processing"]);
    assert_eq!(core.workers_view(now), f.core.workers_view(now));
    assert_eq!(core.stages_view(now), f.core.stages_view(now));
    assert_eq!(core.errors_view(now), f.core.errors_view(now));
    let errors: Vec<_> = core
        .errors_view(now)
        .classes
        .into_iter()
        .map(|c| (c.stage, c.error_class, c.count))
        .collect();
    assert_eq!(
        errors,
        [
            ("a".into(), "http_503".into(), 2),
            ("a".into(), "worker_dead".into(), 1)
        ]
    );
    let stages = core.stages_view(now);
    let a = stages.stages.iter().find(|s| s.name == "a").unwrap();
    assert_eq!(
        (a.succeeded, a.failed, a.retried, a.dead_lettered),
        (6, 2, 1, 1)
    );
    for id in ["T0", "T4", "R", "D", "Q", "G"] {
        let view = core.task_view(id, now);
        assert!(view.is_some(), "{id}");
        assert_eq!(view, f.core.task_view(id, now), "{id}");
    }
    let all = TaskFilter {
        status: None,
        stage: None,
        limit: 1000,
    };
    assert_eq!(core.tasks_view(&all, now), f.core.tasks_view(&all, now));
    assert_eq!(core.tasks_view(&all, now).len(), 9);
    assert!(!core.is_caught_up(), "a restored core replays first");
    core.set_caught_up(now);
    assert_eq!(core.overview(), f.core.overview());
    core.export_worker_counters();
    let after = cm.text_of(&mut core, now);
    assert_eq!(without_histograms(&after), without_histograms(&before));
    for needle in [
        "guildhall_tasks_completed_total 5",
        "guildhall_tasks_total{outcome=\"succeeded\",stage=\"a\"} 6",
        "guildhall_tasks_total{outcome=\"dead_lettered\",stage=\"a\"} 1",
        "guildhall_tasks_total{outcome=\"requeued\",stage=\"a\"} 1",
        "guildhall_worker_deaths_total{stage=\"a\"} 1",
        "guildhall_task_errors_total{error_class=\"http_503\",stage=\"a\"} 2",
        "guildhall_task_errors_total{error_class=\"worker_dead\",stage=\"a\"} 1",
        "guildhall_events_malformed_total{reason=\"unknown_event\"} 1",
        "guildhall_worker_tasks_total{outcome=\"succeeded\",stage=\"a\",worker=\"wa\"} 7",
    ] {
        assert!(after.contains(needle), "{needle} missing:\n{after}");
    }
}

#[test]
fn a_restored_core_keeps_working() {
    let (f, _) = busy(true);
    let (core, gm) = restored(&f, true);
    let mut g = Sim::around(core, f.now);
    g.seqs = f.seqs.clone();
    g.offset = f.offset;
    // Replay goes on from the snapshot: a batch seen before is a duplicate.
    let seq = g.seqs["wb"];
    g.core.handle_envelope(
        g.now,
        Decoded {
            envelope: Envelope {
                sender: "wb".parse().unwrap(),
                incarnation: 1,
                seq,
                sent_at_ms: g.now,
                events: vec![succeeded(&g, "R", "b", 1, None)],
            },
            skipped: 0,
        },
        Some(g.offset + 1),
    );
    assert_eq!(g.core.task_view("R", g.now).unwrap().status, "running");
    g.core.set_caught_up(g.now);
    let ev = vec![succeeded(&g, "R", "b", 1, None)];
    g.send("wb", ev);
    assert_eq!(g.core.task_view("R", g.now).unwrap().status, "succeeded");
    assert!(metrics(&mut g, &gm).contains("guildhall_tasks_completed_total 6"));
    assert_eq!(g.core.snapshot_offset(), Some(g.offset));
    // wb goes on heartbeating; wa falls silent and dies on the virtual clock.
    let last_wa = g.core.worker_view("wa", g.now).unwrap().last_seen_at_ms;
    for _ in 0..3 {
        g.advance(1_000);
        let ev = vec![heartbeat(&g, "b", None, &[])];
        g.send("wb", ev);
    }
    assert_eq!(g.core.worker_view("wb", g.now).unwrap().status, "idle");
    assert_eq!(g.core.worker_view("wa", g.now).unwrap().status, "dead");
    let notices: Vec<Notice> = std::iter::from_fn(|| g.core.poll_notice()).collect();
    assert!(
        matches!(&notices[..], [Notice::WorkerDead { worker, last_seen_ms, .. }]
            if worker.as_str() == "wa" && *last_seen_ms == last_wa),
        "{notices:?}"
    );
    assert!(metrics(&mut g, &gm).contains("guildhall_worker_deaths_total{stage=\"a\"} 2"));
}

#[test]
fn per_worker_counters_are_not_restored_when_switched_off() {
    let (f, _) = busy(true);
    let (mut core, cm) = restored(&f, false);
    let text = cm.text_of(&mut core, f.now);
    assert!(!text.contains("worker=\""), "{text}");
    assert!(text.contains("guildhall_tasks_completed_total 5"));
}

/// A snapshot of a small core: one worker, one task, whose attempt failed
/// (so an error class is saved too, and its layout pinned). One of each,
/// though maps are now written in key order.
fn small() -> Vec<u8> {
    let mut f = Sim::with_telemetry(CoreConfig::default(), Metrics::new(true), true);
    let ev = vec![
        heartbeat(&f, "a", None, &[]),
        started(&f, "T", "a", 1),
        failed(&f, "T", "a", 1),
    ];
    f.send("w", ev);
    // A held task and a join with one child's result inline and one
    // stored (formats 7 and 8).
    let flows = vec![
        f.held(
            "H",
            "a",
            &["T"],
            guildhall_proto::flow::DependencyPolicy::Fail,
            b"p",
        ),
        f.fanned_out(
            "T",
            "a",
            2,
            Some("a"),
            guildhall_proto::flow::ChildPolicy::Fail,
        ),
        f.result("T:0", "T", "a", b"r"),
        f.stored_result("T:1", "T", "a", 1 << 20, [9; 32]),
    ];
    f.send("coordinator-x", flows);
    f.core.encode_snapshot(&ns(), f.now).unwrap()
}

/// Frames `payload` as a snapshot with a valid checksum.
fn frame(format: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&format.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn payload(bytes: &[u8]) -> &[u8] {
    &bytes[20..bytes.len() - 4]
}

#[test]
fn corrupt_snapshots_are_refused() {
    let good = small();
    assert!(snapshot::decode(&good, &ns()).is_ok());
    for len in 0..good.len() {
        let err = snapshot::decode(&good[..len], &ns()).err();
        assert!(
            matches!(err, Some(SnapshotError::Truncated { .. })),
            "{len}: {err:?}"
        );
    }
    for i in 0..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0x5a;
        assert!(snapshot::decode(&bad, &ns()).is_err(), "byte {i} flipped");
    }
    let mut longer = good.clone();
    longer.push(0);
    assert!(matches!(
        snapshot::decode(&longer, &ns()),
        Err(SnapshotError::TrailingBytes { .. })
    ));
    let mut magic = good.clone();
    magic[0] = b'X';
    assert!(matches!(
        snapshot::decode(&magic, &ns()),
        Err(SnapshotError::BadMagic)
    ));
    assert!(matches!(
        snapshot::decode(b"{\"json\": true}", &ns()),
        Err(SnapshotError::BadMagic)
    ));
    let other_format = frame(FORMAT_VERSION + 1, payload(&good));
    let err = snapshot::decode(&other_format, &ns()).err().unwrap();
    assert!(matches!(err, SnapshotError::Format { .. }));
    assert_eq!(
        err.to_string(),
        format!(
            "snapshot format version {}; this coordinator reads version {FORMAT_VERSION}",
            FORMAT_VERSION + 1
        )
    );
    let err = snapshot::decode(&good, &Namespace::new("other").unwrap())
        .err()
        .unwrap();
    assert_eq!(err.to_string(), "snapshot of namespace 'snap', not 'other'");
    // A valid frame around a payload that is not a snapshot.
    let garbage = frame(FORMAT_VERSION, &[0xff; 64]);
    assert!(matches!(
        snapshot::decode(&garbage, &ns()),
        Err(SnapshotError::Header(_))
    ));
    let (header, body) = postcard::take_from_bytes::<SnapshotHeader>(payload(&good)).unwrap();
    let mut p = postcard::to_stdvec(&header).unwrap();
    p.extend_from_slice(&body[..body.len() / 2]);
    assert!(matches!(
        snapshot::decode(&frame(FORMAT_VERSION, &p), &ns()),
        Err(SnapshotError::Body(_))
    ));
}

/// postcard is not self-describing: an old file of the same format version
/// would decode into nonsense. So the body's layout is pinned here.
#[test]
fn the_body_layout_is_pinned() {
    let good = small();
    let (_, body) = postcard::take_from_bytes::<SnapshotHeader>(payload(&good)).unwrap();
    assert_eq!(
        (body.len(), crc32fast::hash(body)),
        (3306, 1197114342),
        "the layout of a saved type changed: bump FORMAT_VERSION in core/src/core/snapshot.rs, then update this test"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random damage to a real snapshot: refused or (rarely) accepted, never a panic.
    #[test]
    fn random_damage_never_panics(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut bytes = small();
        for (i, b) in edits {
            let n = bytes.len();
            bytes[i % n] = b;
        }
        bytes.truncate(bytes.len() - cut % 3);
        if let Ok(s) = snapshot::decode(&bytes, &ns()) {
            let core = Core::restore(s, CoreConfig::default(), Metrics::new(true), T0);
            let _ = core.workers_view(T0);
        }
    }

    /// Random payloads behind a valid frame and checksum reach the decoder
    /// itself: refused, or restored into a core whose views work.
    #[test]
    fn random_payloads_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
        let good = small();
        let (header, _) =
            postcard::take_from_bytes::<SnapshotHeader>(payload(&good)).unwrap();
        let mut p = postcard::to_stdvec(&header).unwrap();
        p.extend_from_slice(&tail);
        if let Ok(s) = snapshot::decode(&frame(FORMAT_VERSION, &p), &ns()) {
            let mut core = Core::restore(s, CoreConfig::default(), Metrics::new(true), T0);
            core.set_caught_up(T0 + 60_000);
            core.refresh_metrics(T0 + 60_000);
            let _ = core.stages_view(T0 + 60_000);
            let _ = core.tasks_view(&TaskFilter { status: None, stage: None, limit: 10 }, T0);
        }
    }
}

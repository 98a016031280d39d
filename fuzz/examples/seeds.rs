//! Writes the seed corpora in `seeds/<target>/`: a handful of valid inputs
//! made by Guildhall's own encoders, so the fuzzer starts from messages that
//! get past the version and header checks. Deterministic: running it again
//! rewrites the same files (`--check` only compares, and fails if a seed
//! is missing or differs, e.g. after a wire format change).
//!
//! ```sh
//! cd fuzz && cargo +nightly run --example seeds [-- --check]
//! ```

use guildhall_broker::task::{TaskMeta, with_text_header};
use guildhall_proto::command::{self, Command, CommandMessage, CommandReply};
use guildhall_proto::event::*;
use guildhall_proto::headers::amqp as h;
use guildhall_proto::{Envelope, Stage, TaskId};
use lapin::BasicProperties;
use lapin::protocol::basic::gen_properties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use std::path::Path;

fn stage(s: &str) -> Stage {
    s.parse().expect("a valid stage")
}

fn task(s: &str) -> TaskId {
    s.parse().expect("a valid task id")
}

fn envelope(seq: u64, events: Vec<Event>) -> Vec<u8> {
    Envelope {
        sender: "agent-1".parse().expect("a valid agent id"),
        incarnation: 0x5eed,
        seq,
        sent_at_ms: 1_700_000_000_000,
        events,
    }
    .encode()
    .expect("a seed envelope encodes")
}

fn envelopes() -> Vec<(&'static str, Vec<u8>)> {
    let (t, s, n) = (task("CODE-1"), stage("build"), Some(stage("report")));
    let proc_stats = Some(ProcStats {
        pid: 7,
        cpu_ratio: 0.5,
        rss_bytes: 1 << 20,
    });
    let hello = Event::Hello(Box::new(Hello {
        at_ms: 1,
        version: "0.1.0".into(),
        stage: s.clone(),
        next: n.clone(),
        stages: vec![s.clone(), stage("report")],
        concurrency: 4,
        heartbeat_ms: 1000,
        hostname: "host".into(),
        pid: 42,
        mode: WorkerMode::Http {
            url: "http://127.0.0.1:9000/".into(),
        },
        supervised: true,
    }));
    let heartbeat = Event::Heartbeat(Box::new(Heartbeat {
        at_ms: 2,
        version: "0.1.0".into(),
        stage: s.clone(),
        next: None,
        state: AgentState::Processing,
        concurrency: 2,
        heartbeat_ms: 1000,
        in_hand: vec![TaskInHand {
            task_id: t.clone(),
            attempt: 1,
            started_at_ms: 2,
        }],
        done: 10,
        failed: 1,
        worker: proc_stats,
        agent: proc_stats,
        hostname: "host".into(),
        worker_restarts: 0,
        rtt_ms: Some(3),
    }));
    let lifecycle = vec![
        Event::TaskSubmitted(TaskSubmitted {
            at_ms: 3,
            task_id: t.clone(),
            stage: s.clone(),
            payload_bytes: 100,
        }),
        Event::TaskStarted(TaskStarted {
            at_ms: 4,
            task_id: t.clone(),
            stage: s.clone(),
            attempt: 1,
            enqueued_at_ms: Some(3),
            submitted_at_ms: Some(3),
            redelivered: false,
        }),
        Event::TaskProgress(TaskProgress {
            at_ms: 5,
            task_id: t.clone(),
            stage: s.clone(),
            attempt: 1,
            fraction: Some(0.5),
            message: Some("half".into()),
        }),
        Event::TaskFailed(TaskFailed {
            at_ms: 6,
            task_id: t.clone(),
            stage: s.clone(),
            attempt: 1,
            started_at_ms: 4,
            error: "HTTP 503: busy".into(),
            error_class: "http_503".into(),
            retryable: true,
        }),
        Event::TaskRetrying(TaskRetrying {
            at_ms: 6,
            task_id: t.clone(),
            stage: s.clone(),
            attempt: 1,
            delay_ms: 1000,
        }),
        Event::TaskSucceeded(TaskSucceeded {
            at_ms: 8,
            task_id: t.clone(),
            stage: s.clone(),
            attempt: 2,
            started_at_ms: 7,
            next: n.clone(),
            submitted_at_ms: Some(3),
        }),
    ];
    let ends = vec![
        Event::TaskDeadLettered(TaskDeadLettered {
            at_ms: 9,
            task_id: task("CODE-2"),
            stage: s.clone(),
            attempt: 3,
            error: "HTTP 400: bad input".into(),
        }),
        Event::TaskAbandoned(TaskAbandoned {
            at_ms: 10,
            task_id: task("CODE-3"),
            stage: s.clone(),
            attempt: 1,
            started_at_ms: 9,
            reason: "connection lost".into(),
            result: WorkerResult::Unfinished,
        }),
        Event::WorkerExited(WorkerExited {
            at_ms: 11,
            pid: 42,
            code: None,
            signal: Some(9),
            restarts: 1,
            restart_in_ms: Some(500),
        }),
        Event::Reassigned(Reassigned {
            at_ms: 12,
            from: s.clone(),
            to: stage("report"),
            reason: "planner".into(),
        }),
        Event::AgentStopping(AgentStopping {
            at_ms: 13,
            reason: "drain".into(),
        }),
        Event::Marker(Marker {
            at_ms: 14,
            nonce: 99,
        }),
        Event::DeliveryRejected(DeliveryRejected {
            at_ms: 15,
            stage: s.clone(),
            reason: RejectReason::InvalidMessageId,
            detail: "message_id is not a valid task id".into(),
            dead_lettered: true,
        }),
    ];
    // Version 1 (still read): no incarnation. The same bytes as version 2
    // with incarnation 0, less that 0 (right after the sender id "agent-1").
    let mut v1 = Envelope {
        sender: "agent-1".parse().expect("a valid agent id"),
        incarnation: 0,
        seq: 5,
        sent_at_ms: 1_700_000_000_000,
        events: vec![Event::Marker(Marker { at_ms: 1, nonce: 2 })],
    }
    .encode()
    .expect("a seed envelope encodes");
    assert_eq!(v1[0], 2, "the envelope version this was written for");
    v1[0] = 1;
    v1.remove(1 + 1 + "agent-1".len());
    vec![
        ("empty", envelope(1, vec![])),
        ("hello_heartbeat", envelope(2, vec![hello, heartbeat])),
        ("task_lifecycle", envelope(3, lifecycle)),
        ("ends_and_agent_events", envelope(4, ends)),
        ("version_1", v1),
    ]
}

fn commands() -> Vec<(&'static str, Vec<u8>)> {
    let message = |id, command| {
        command::encode(&CommandMessage {
            id,
            sent_at_ms: 1_700_000_000_000,
            command,
        })
        .expect("a seed command encodes")
    };
    vec![
        ("pause", message(1, Command::Pause)),
        ("resume", message(2, Command::Resume)),
        ("drain", message(3, Command::Drain)),
        ("restart", message(4, Command::RestartWorker)),
        (
            "concurrency",
            message(5, Command::SetConcurrency { concurrency: 8 }),
        ),
        (
            "assign",
            message(
                6,
                Command::Assign {
                    stage: stage("report"),
                    reason: "planner".into(),
                },
            ),
        ),
        (
            "prefetch",
            message(7, Command::SetPrefetch { prefetch: 16 }),
        ),
        ("logs", message(8, Command::Logs { lines: 100 })),
        (
            "reply",
            command::encode(&CommandReply {
                id: 8,
                agent: "agent-1".parse().expect("a valid agent id"),
                ok: true,
                message: "2 lines".into(),
                lines: vec!["started".into(), "listening on 9000".into()],
            })
            .expect("a seed reply encodes"),
        ),
    ]
}

fn properties(props: &BasicProperties) -> Vec<u8> {
    cookie_factory::gen_simple(gen_properties(props), Vec::new())
        .expect("seed properties write out")
}

fn task_headers() -> Vec<(&'static str, Vec<u8>)> {
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let submitted =
        TaskMeta::submission(task("CODE-1"), 1_700_000_000_123, Some(traceparent.into()));
    let retried = submitted
        .next_stage(1_700_000_001_000, None)
        .retry(1_700_000_002_000, 500);
    let dead = with_text_header(
        with_text_header(retried.properties(), h::LAST_ERROR, "HTTP 400: bad input"),
        h::ERROR_CLASS,
        "http_400",
    );
    // A message from a producer outside Guildhall: no id, a timestamp in
    // seconds, numbers of other integer types or as text.
    let mut headers = FieldTable::default();
    headers.insert(h::ATTEMPT.into(), AMQPValue::ShortShortUInt(2));
    headers.insert(
        h::SUBMITTED_AT.into(),
        AMQPValue::LongString(LongString::from("1700000000000")),
    );
    headers.insert(h::DELIVERY_COUNT.into(), AMQPValue::LongInt(1));
    let foreign = BasicProperties::default()
        .with_timestamp(1_700_000_000)
        .with_content_type("application/json".into())
        .with_headers(headers);
    // A message_id that is not UTF-8 (Guildhall issue 16, reproduction 1):
    // the flags say "message_id only", then a short string [0xc3, 0x28].
    let mut not_utf8 = properties(&BasicProperties::default().with_message_id("xx".into()));
    let at = not_utf8.len() - 2;
    not_utf8[at..].copy_from_slice(&[0xc3, 0x28]);
    // Header values nested past amq-protocol's limit (vendor/README.md).
    let mut deep = AMQPValue::LongInt(7);
    for _ in 0..70 {
        deep = AMQPValue::FieldArray(vec![deep].into());
    }
    let mut headers = FieldTable::default();
    headers.insert("x-deep".into(), deep);
    let nested = BasicProperties::default()
        .with_message_id("CODE-4".into())
        .with_headers(headers);
    // Flows (issue 19): a child (parent header), a parent at its join, and
    // a parent header that is not a task id.
    let child = submitted.child(task("CODE-1:3"), 1_700_000_003_000, None);
    let joined = TaskMeta {
        joined: true,
        ..submitted.clone()
    };
    let bad_parent = with_text_header(submitted.properties(), h::PARENT, "not an id");
    vec![
        ("child", properties(&child.properties())),
        ("joined", properties(&joined.properties())),
        ("bad_parent", properties(&bad_parent)),
        ("nested_headers", properties(&nested)),
        ("submitted", properties(&submitted.properties())),
        ("retried", properties(&retried.properties())),
        ("dead_lettered", properties(&dead)),
        ("foreign", properties(&foreign)),
        ("message_id_not_utf8", not_utf8),
    ]
}

/// `status: u16 LE | next | class | priority | body`, see
/// `fuzz_targets/worker_response.rs`.
fn response(
    status: u16,
    next: Option<&str>,
    class: Option<&str>,
    priority: Option<&str>,
    body: &[u8],
) -> Vec<u8> {
    let mut out = status.to_le_bytes().to_vec();
    for field in [next, class, priority] {
        match field {
            Some(v) => {
                out.push(u8::try_from(v.len()).expect("a seed header under 255 bytes"));
                out.extend_from_slice(v.as_bytes());
            }
            None => out.push(255),
        }
    }
    out.extend_from_slice(body);
    out
}

fn worker_responses() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("ok", response(200, None, None, None, b"{\"done\":true}")),
        (
            "ok_next_stage",
            response(200, Some("report"), None, None, b"x"),
        ),
        ("ok_end", response(204, Some("-"), None, None, b"")),
        ("ok_priority", response(200, None, None, Some("9"), b"x")),
        ("bad_priority", response(200, None, None, Some("10"), b"x")),
        (
            "retry_class",
            response(503, None, Some("db_timeout"), None, b"busy"),
        ),
        (
            "bad_input",
            response(422, None, None, None, b"no such field"),
        ),
        (
            "too_many",
            response(429, None, Some("Not A Class"), None, b""),
        ),
    ]
}

/// A worker's output as `fuzz_targets/fan_out.rs` reads it.
fn fan_outs() -> Vec<(&'static str, Vec<u8>)> {
    let lines = "{\"payload\":\"a\"}\n\n{\"payload\":{\"k\":[1,2]},\"stage\":\"report\"}\r\n\
                 {\"payload_base64\":\"AAEC\",\"stage\":null}\n";
    vec![
        ("ndjson", lines.as_bytes().to_vec()),
        (
            "exec",
            format!("#guildhall-fan-out join=merge on-child-failure=continue\n{lines}").into_bytes(),
        ),
        ("exec_no_join", b"#guildhall-fan-out join=-\n{\"payload\":1}".to_vec()),
        ("bad_line", b"#guildhall-fan-out\n{\"payload\":1}\n{\"stgae\":\"x\"}\n".to_vec()),
        ("not_a_fan_out", b"ordinary output\n".to_vec()),
    ]
}

fn main() {
    let check = std::env::args().any(|a| a == "--check");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let mut stale = Vec::new();
    for (target, seeds) in [
        ("envelope", envelopes()),
        ("command", commands()),
        ("task_headers", task_headers()),
        ("worker_response", worker_responses()),
        ("fan_out", fan_outs()),
    ] {
        let dir = root.join(target);
        if !check {
            std::fs::create_dir_all(&dir).expect("cannot create the seeds directory");
        }
        for (name, bytes) in seeds {
            let path = dir.join(name);
            if check {
                if std::fs::read(&path).ok().as_deref() != Some(&bytes[..]) {
                    stale.push(path.display().to_string());
                }
            } else {
                std::fs::write(&path, &bytes).expect("cannot write a seed");
            }
        }
    }
    if !stale.is_empty() {
        eprintln!(
            "stale or missing seeds (regenerate: cd fuzz && cargo +nightly run --example seeds):\n  {}",
            stale.join("\n  ")
        );
        std::process::exit(1);
    }
}

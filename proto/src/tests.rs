//! Envelope and command tests: examples, then properties over generated
//! events and arbitrary bytes.

use crate::Envelope;
use crate::command::{self, Command, CommandMessage, CommandReply};
use crate::envelope::{DecodeError, EnvelopeBuilder, MAX_ENVELOPE_BYTES, decode};
use crate::event::*;
use crate::ids::{AgentId, InvalidId, Stage, TaskId};
use proptest::prelude::*;

fn stage(s: &str) -> Stage {
    s.parse().unwrap()
}

fn task(s: &str) -> TaskId {
    s.parse().unwrap()
}

fn sample_events() -> Vec<Event> {
    vec![
        Event::Hello(Box::new(Hello {
            at_ms: 1,
            version: "0.1.0".into(),
            stage: stage("build"),
            next: Some(stage("report")),
            stages: vec![stage("build")],
            concurrency: 4,
            heartbeat_ms: 1000,
            hostname: "h".into(),
            pid: 42,
            mode: WorkerMode::Http {
                url: "http://127.0.0.1:9000/".into(),
            },
            supervised: true,
        })),
        Event::Heartbeat(Box::new(Heartbeat {
            at_ms: 2,
            version: "0.1.0".into(),
            stage: stage("build"),
            next: None,
            state: AgentState::Processing,
            concurrency: 2,
            heartbeat_ms: 1000,
            in_hand: vec![TaskInHand {
                task_id: task("CODE-1"),
                attempt: 1,
                started_at_ms: 2,
            }],
            done: 10,
            failed: 1,
            worker: Some(ProcStats {
                pid: 7,
                cpu_ratio: 0.5,
                rss_bytes: 1 << 20,
            }),
            agent: None,
            hostname: "h".into(),
            worker_restarts: 0,
            rtt_ms: Some(3),
        })),
        Event::TaskSucceeded(TaskSucceeded {
            at_ms: 3,
            task_id: task("CODE-1"),
            stage: stage("build"),
            attempt: 1,
            started_at_ms: 2,
            next: Some(stage("report")),
            submitted_at_ms: Some(1),
        }),
        Event::TaskFailed(TaskFailed {
            at_ms: 4,
            task_id: task("CODE-2"),
            stage: stage("build"),
            attempt: 2,
            started_at_ms: 3,
            error: "boom".into(),
            error_class: "http_503".into(),
            retryable: true,
        }),
    ]
}

fn envelope(events: Vec<Event>) -> Envelope {
    Envelope {
        sender: "agent-1".parse().unwrap(),
        incarnation: 0xfeed_beef,
        seq: 9,
        sent_at_ms: 1_700_000_000_000,
        events,
    }
}

#[test]
fn an_event_stays_small() {
    // Decoding moves each event two or three times and the coordinator
    // applies millions a second: the rare, large ones (Hello, Heartbeat)
    // are boxed so that every event is not as large as they are.
    assert!(
        std::mem::size_of::<Event>() <= 112,
        "{}",
        std::mem::size_of::<Event>()
    );
}

#[test]
fn envelope_round_trips() {
    let env = envelope(sample_events());
    let bytes = env.encode().unwrap();
    let decoded = decode(&bytes).unwrap();
    assert_eq!(decoded.skipped, 0);
    assert_eq!(decoded.envelope, env);
}

#[test]
fn builder_resets_after_finish() {
    let mut b = EnvelopeBuilder::default();
    for e in sample_events() {
        b.push(&e).unwrap();
    }
    assert_eq!(b.len(), 4);
    let sender: AgentId = "a".parse().unwrap();
    let first = b.finish(&sender, 7, 1, 5).unwrap();
    assert!(b.is_empty());
    assert_eq!(b.encoded_len(), 0);
    let second = b.finish(&sender, 7, 2, 6).unwrap();
    assert_eq!(decode(&first).unwrap().envelope.events.len(), 4);
    assert!(decode(&second).unwrap().envelope.events.is_empty());
}

#[test]
fn unknown_version_is_refused_before_anything_else() {
    let mut bytes = envelope(sample_events()).encode().unwrap();
    assert_eq!(bytes[0], 2, "version 2 is written");
    bytes[0] = 3;
    assert_eq!(decode(&bytes), Err(DecodeError::UnknownVersion(3)));
    assert_eq!(DecodeError::UnknownVersion(3).reason(), "version");
}

#[test]
fn a_version_1_envelope_still_decodes_with_an_unknown_incarnation() {
    // Written as agents before the incarnation wrote it.
    let mut bytes = postcard::to_allocvec(&1u16).unwrap();
    bytes.extend(postcard::to_allocvec(&("agent-1", 9u64, 1_700_000_000_000u64)).unwrap());
    let events = sample_events();
    bytes.extend(postcard::to_allocvec(&(events.len() as u32)).unwrap());
    for e in &events {
        let frame = postcard::to_allocvec(e).unwrap();
        bytes.extend(postcard::to_allocvec(&(frame.len() as u32)).unwrap());
        bytes.extend(frame);
    }
    let decoded = decode(&bytes).unwrap();
    assert_eq!(
        decoded.envelope,
        Envelope {
            incarnation: 0,
            ..envelope(events)
        }
    );
}

#[test]
fn text_from_the_wire_is_cut_to_its_limit_at_decode() {
    // A forged heartbeat with a 1 MB hostname and version, and a failure
    // with a 1 MB error: what a reader keeps is bounded in bytes.
    let big = "é".repeat(400_000);
    let hb = Heartbeat {
        at_ms: 1,
        version: big.clone(),
        stage: stage("s"),
        next: None,
        state: AgentState::Idle,
        concurrency: 1,
        heartbeat_ms: 1000,
        in_hand: Vec::new(),
        done: 0,
        failed: 0,
        worker: None,
        agent: None,
        hostname: big.clone(),
        worker_restarts: 0,
        rtt_ms: None,
    };
    let failed = TaskFailed {
        at_ms: 5,
        task_id: task("t"),
        stage: stage("s"),
        attempt: 1,
        started_at_ms: 4,
        error: big.clone(),
        error_class: big.clone(),
        retryable: true,
    };
    for event in [Event::Heartbeat(Box::new(hb)), Event::TaskFailed(failed)] {
        let bytes = postcard::to_allocvec(&event).unwrap();
        let back: Event = postcard::from_bytes(&bytes).unwrap();
        let texts: Vec<&str> = match &back {
            Event::Heartbeat(h) => vec![&h.version, &h.hostname],
            Event::TaskFailed(f) => vec![&f.error_class, &f.error],
            _ => unreachable!(),
        };
        let limits = match &back {
            Event::Heartbeat(_) => [255, 255],
            _ => [255, crate::MAX_ERROR_LEN],
        };
        for (text, limit) in texts.into_iter().zip(limits) {
            // Cut on a character boundary: "é" is 2 bytes.
            assert_eq!(text.len(), limit - limit % 2, "{limit}");
            assert!(big.starts_with(text));
        }
    }
}

#[test]
fn long_lists_from_the_wire_keep_their_first_entries_and_the_rest_still_decodes() {
    let in_hand: Vec<TaskInHand> = (0..5000)
        .map(|i| TaskInHand {
            task_id: task(&format!("t{i}")),
            attempt: 1,
            started_at_ms: 0,
        })
        .collect();
    let hb = Heartbeat {
        at_ms: 1,
        version: "v".into(),
        stage: stage("s"),
        next: None,
        state: AgentState::Processing,
        concurrency: 1,
        heartbeat_ms: 1000,
        in_hand: in_hand.clone(),
        done: 7,
        failed: 0,
        worker: None,
        agent: None,
        hostname: "h".into(),
        worker_restarts: 3,
        rtt_ms: Some(2),
    };
    let bytes = postcard::to_allocvec(&Event::Heartbeat(Box::new(hb))).unwrap();
    let Event::Heartbeat(back) = postcard::from_bytes::<Event>(&bytes).unwrap() else {
        panic!("not a heartbeat");
    };
    assert_eq!(back.in_hand, in_hand[..crate::bounded::MAX_LIST_LEN]);
    assert_eq!(
        (back.done, back.worker_restarts, back.rtt_ms),
        (7, 3, Some(2))
    );
}

#[test]
fn oversized_input_is_refused() {
    let bytes = vec![1u8; MAX_ENVELOPE_BYTES + 1];
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::Oversized(MAX_ENVELOPE_BYTES + 1))
    );
}

#[test]
fn an_unknown_event_kind_is_skipped_and_the_rest_kept() {
    // A newer sender's event: variant index 200, which this Event lacks.
    let known = sample_events().remove(2);
    let known_body = postcard::to_allocvec(&known).unwrap();
    let unknown_body = postcard::to_allocvec(&200u32).unwrap();
    let mut bytes = postcard::to_allocvec(&1u16).unwrap();
    bytes.extend(postcard::to_allocvec(&("agent-1", 9u64, 5u64, 2u32)).unwrap());
    for body in [&unknown_body, &known_body] {
        bytes.extend(postcard::to_allocvec(&(body.len() as u32)).unwrap());
        bytes.extend_from_slice(body);
    }
    let decoded = decode(&bytes).unwrap();
    assert_eq!(decoded.skipped, 1);
    assert_eq!(decoded.envelope.events, vec![known]);
}

#[test]
fn trailing_bytes_are_malformed() {
    let mut bytes = envelope(sample_events()).encode().unwrap();
    bytes.push(0);
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::Malformed("trailing bytes"))
    );
}

#[test]
fn a_lying_event_count_is_refused_without_allocating_for_it() {
    let mut bytes = postcard::to_allocvec(&1u16).unwrap();
    bytes.extend(postcard::to_allocvec(&("a", 1u64, 2u64)).unwrap());
    bytes.extend(postcard::to_allocvec(&u32::MAX).unwrap());
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::Malformed("event count exceeds input"))
    );
}

#[test]
fn a_bad_sender_id_is_malformed() {
    let mut bytes = postcard::to_allocvec(&1u16).unwrap();
    bytes.extend(postcard::to_allocvec(&("no spaces allowed", 1u64, 2u64, 0u32)).unwrap());
    assert_eq!(decode(&bytes), Err(DecodeError::Malformed("bad sender id")));
}

#[test]
fn commands_round_trip_and_check_their_version() {
    let msg = CommandMessage {
        id: 7,
        sent_at_ms: 1,
        command: Command::SetConcurrency { concurrency: 3 },
    };
    let bytes = command::encode(&msg).unwrap();
    assert_eq!(command::decode::<CommandMessage>(&bytes).unwrap(), msg);
    let mut wrong = bytes.clone();
    wrong[0] = 9;
    assert_eq!(
        command::decode::<CommandMessage>(&wrong),
        Err(DecodeError::UnknownVersion(9))
    );
    let reply = CommandReply {
        id: 7,
        agent: "a".parse().unwrap(),
        ok: true,
        message: "done".into(),
        lines: vec!["x".into()],
    };
    let bytes = command::encode(&reply).unwrap();
    assert_eq!(command::decode::<CommandReply>(&bytes).unwrap(), reply);
}

// ---- properties ----

fn arb_stage() -> impl Strategy<Value = Stage> {
    "[a-z][a-z0-9_-]{0,20}".prop_map(|s| s.parse().unwrap())
}

fn arb_task() -> impl Strategy<Value = TaskId> {
    "[A-Za-z0-9][A-Za-z0-9_.:@-]{0,40}".prop_map(|s| s.parse().unwrap())
}

fn arb_event() -> impl Strategy<Value = Event> {
    let started = (
        any::<u64>(),
        arb_task(),
        arb_stage(),
        1u32..20,
        any::<Option<u64>>(),
        any::<bool>(),
    )
        .prop_map(|(at_ms, task_id, stage, attempt, enq, redelivered)| {
            Event::TaskStarted(TaskStarted {
                at_ms,
                task_id,
                stage,
                attempt,
                enqueued_at_ms: enq,
                submitted_at_ms: enq.map(|e| e / 2),
                redelivered,
            })
        });
    let succeeded = (
        any::<u64>(),
        arb_task(),
        arb_stage(),
        proptest::option::of(arb_stage()),
    )
        .prop_map(|(at_ms, task_id, stage, next)| {
            Event::TaskSucceeded(TaskSucceeded {
                at_ms,
                task_id,
                stage,
                attempt: 1,
                started_at_ms: at_ms / 2,
                next,
                submitted_at_ms: None,
            })
        });
    let failed = (
        arb_task(),
        arb_stage(),
        ".{0,50}",
        "[a-z_0-9]{1,12}",
        any::<bool>(),
    )
        .prop_map(|(task_id, stage, error, error_class, retryable)| {
            Event::TaskFailed(TaskFailed {
                at_ms: 5,
                task_id,
                stage,
                attempt: 3,
                started_at_ms: 4,
                error,
                error_class,
                retryable,
            })
        });
    let heartbeat = (
        arb_stage(),
        proptest::collection::vec(arb_task(), 0..5),
        0u64..1000,
    )
        .prop_map(|(stage, tasks, done)| {
            Event::Heartbeat(Box::new(Heartbeat {
                at_ms: 1,
                version: "v".into(),
                stage,
                next: None,
                state: AgentState::Idle,
                concurrency: 1,
                heartbeat_ms: 1000,
                in_hand: tasks
                    .into_iter()
                    .map(|task_id| TaskInHand {
                        task_id,
                        attempt: 1,
                        started_at_ms: 0,
                    })
                    .collect(),
                done,
                failed: 0,
                worker: None,
                agent: Some(ProcStats {
                    pid: 1,
                    cpu_ratio: 0.25,
                    rss_bytes: 3,
                }),
                hostname: "h".into(),
                worker_restarts: 0,
                rtt_ms: None,
            }))
        });
    let other = prop_oneof![
        (arb_task(), arb_stage(), any::<u32>()).prop_map(|(task_id, stage, n)| {
            Event::TaskSubmitted(TaskSubmitted {
                at_ms: 1,
                task_id,
                stage,
                payload_bytes: n,
            })
        }),
        (arb_task(), arb_stage(), any::<u64>()).prop_map(|(task_id, stage, delay_ms)| {
            Event::TaskRetrying(TaskRetrying {
                at_ms: 1,
                task_id,
                stage,
                attempt: 1,
                delay_ms,
            })
        }),
        (any::<Option<i32>>(), any::<Option<i32>>()).prop_map(|(code, signal)| {
            Event::WorkerExited(WorkerExited {
                at_ms: 1,
                pid: 2,
                code,
                signal,
                restarts: 3,
                restart_in_ms: Some(100),
            })
        }),
        any::<u64>().prop_map(|nonce| Event::Marker(Marker { at_ms: 1, nonce })),
        (
            arb_stage(),
            ".{0,30}",
            any::<bool>(),
            0..RejectReason::ALL.len(),
        )
            .prop_map(|(stage, detail, dead_lettered, reason)| {
                Event::DeliveryRejected(DeliveryRejected {
                    at_ms: 1,
                    stage,
                    reason: RejectReason::ALL[reason],
                    detail,
                    dead_lettered,
                })
            }),
        (arb_task(), arb_stage(), ".{0,30}").prop_map(|(task_id, stage, reason)| {
            Event::TaskAbandoned(TaskAbandoned {
                at_ms: 1,
                task_id,
                stage,
                attempt: 2,
                started_at_ms: 0,
                reason,
                result: WorkerResult::Succeeded,
            })
        }),
    ];
    prop_oneof![started, succeeded, failed, heartbeat, other]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode(&bytes);
        let _ = command::decode::<CommandMessage>(&bytes);
    }

    #[test]
    fn decoding_bytes_behind_a_valid_version_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut input = vec![1u8];
        input.extend(bytes);
        let _ = decode(&input);
        let _ = command::decode::<CommandReply>(&input);
    }

    #[test]
    fn envelopes_round_trip(events in proptest::collection::vec(arb_event(), 0..40), seq in any::<u64>()) {
        let mut env = envelope(events);
        env.seq = seq;
        let bytes = env.encode().unwrap();
        let decoded = decode(&bytes).unwrap();
        prop_assert_eq!(decoded.skipped, 0);
        prop_assert_eq!(decoded.envelope, env);
    }

    #[test]
    fn every_truncation_of_a_valid_envelope_is_an_error(events in proptest::collection::vec(arb_event(), 1..10), cut in any::<prop::sample::Index>()) {
        let bytes = envelope(events).encode().unwrap();
        let cut = cut.index(bytes.len());
        prop_assert!(decode(&bytes[..cut]).is_err());
    }

    #[test]
    fn corrupting_one_byte_never_panics(events in proptest::collection::vec(arb_event(), 1..10), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = envelope(events).encode().unwrap();
        let at = at.index(bytes.len());
        bytes[at] = byte;
        let _ = decode(&bytes);
    }
}

// ---- identifiers: the byte rule against the original char rule ----

/// The rule as first written (chars, through a function pointer), kept to
/// check that the byte-table rule accepts and refuses exactly the same.
mod old_rule {
    use crate::ids::InvalidId;

    fn check(
        kind: &'static str,
        value: &str,
        max: usize,
        allowed: fn(char) -> bool,
        rule: &'static str,
    ) -> Result<(), InvalidId> {
        let ok = !value.is_empty()
            && value.len() <= max
            && value
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric())
            && value.chars().all(allowed);
        if ok {
            Ok(())
        } else {
            Err(InvalidId {
                kind,
                value: value.chars().take(80).collect(),
                rule,
            })
        }
    }

    fn name_char(c: char) -> bool {
        c.is_ascii_alphanumeric() || c == '_' || c == '-'
    }

    fn id_char(c: char) -> bool {
        c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '@')
    }

    const NAME_RULE: &str = "1-64 characters of A-Z a-z 0-9 _ -, starting with a letter or digit";
    const ID_RULE: &str =
        "1-128 characters of A-Z a-z 0-9 _ - . : @, starting with a letter or digit";

    pub fn namespace(v: &str) -> Result<(), InvalidId> {
        check("namespace", v, 64, name_char, NAME_RULE)
    }
    pub fn stage(v: &str) -> Result<(), InvalidId> {
        check("stage", v, 64, name_char, NAME_RULE)
    }
    pub fn task_id(v: &str) -> Result<(), InvalidId> {
        check("task id", v, 128, id_char, ID_RULE)
    }
    pub fn agent_id(v: &str) -> Result<(), InvalidId> {
        check("agent id", v, 128, id_char, ID_RULE)
    }
}

/// Checks one identifier type against the old rule on `value`, through
/// every way in: `new`, `FromStr`, `TryFrom<String>`, postcard, and serde's
/// str, string, bytes and wrong-type paths (errors compared as well).
fn same_as_old_rule<T>(value: &str, old: fn(&str) -> Result<(), InvalidId>)
where
    T: std::str::FromStr<Err = InvalidId>
        + TryFrom<String, Error = InvalidId>
        + serde::Serialize
        + serde::de::DeserializeOwned
        + AsRef<str>
        + std::fmt::Debug,
{
    use serde::de::{Deserialize, Error as _, IntoDeserializer, value};
    type E = value::Error;
    /// What `#[serde(try_from = "String")]` did: a `String`, then `TryFrom`.
    fn before<
        'de,
        T: TryFrom<String, Error = InvalidId>,
        D: serde::Deserializer<'de, Error = E>,
    >(
        d: D,
    ) -> Result<String, E> {
        let s = String::deserialize(d)?;
        T::try_from(s.clone()).map_err(E::custom)?;
        Ok(s)
    }
    let expected = old(value);
    let parsed = value.parse::<T>();
    assert_eq!(parsed.as_ref().err(), expected.as_ref().err(), "{value:?}");
    if let Ok(id) = &parsed {
        assert_eq!(id.as_ref(), value);
        // Encoded exactly as the plain string it wraps.
        assert_eq!(
            postcard::to_allocvec(id).unwrap(),
            postcard::to_allocvec(value).unwrap()
        );
    }
    assert_eq!(
        T::try_from(value.to_owned()).err(),
        expected.clone().err(),
        "{value:?}"
    );

    let bytes = postcard::to_allocvec(value).unwrap();
    let decoded = postcard::from_bytes::<T>(&bytes);
    let old_decoded = postcard::from_bytes::<String>(&bytes)
        .and_then(|s| T::try_from(s).map_err(|_| postcard::Error::SerdeDeCustom));
    assert_eq!(
        decoded.as_ref().map(|t| t.as_ref()).map_err(|e| e.clone()),
        old_decoded
            .as_ref()
            .map(|t| t.as_ref())
            .map_err(|e| e.clone()),
        "{value:?}"
    );

    let new_str = T::deserialize(IntoDeserializer::<E>::into_deserializer(value));
    let old_str = before::<T, _>(IntoDeserializer::<E>::into_deserializer(value));
    assert_eq!(new_str.map(|t| t.as_ref().to_owned()), old_str, "{value:?}");
    let new_string = T::deserialize(IntoDeserializer::<E>::into_deserializer(value.to_owned()));
    let old_string = before::<T, _>(IntoDeserializer::<E>::into_deserializer(value.to_owned()));
    assert_eq!(
        new_string.map(|t| t.as_ref().to_owned()),
        old_string,
        "{value:?}"
    );
    let new_bytes = T::deserialize(value::BytesDeserializer::<E>::new(value.as_bytes()));
    let old_bytes = before::<T, _>(value::BytesDeserializer::<E>::new(value.as_bytes()));
    assert_eq!(
        new_bytes.map(|t| t.as_ref().to_owned()),
        old_bytes,
        "{value:?}"
    );
}

fn all_kinds_same_as_old_rule(value: &str) {
    same_as_old_rule::<crate::ids::Namespace>(value, old_rule::namespace);
    same_as_old_rule::<Stage>(value, old_rule::stage);
    same_as_old_rule::<TaskId>(value, old_rule::task_id);
    same_as_old_rule::<AgentId>(value, old_rule::agent_id);
}

#[test]
fn ids_match_the_old_rule_on_every_character() {
    // Every ASCII character and a span of others, alone, first, inside,
    // last, and at the length limits.
    let chars = (0u32..0x800)
        .chain([0xfffd, 0x1f600, 0x10ffff])
        .filter_map(char::from_u32);
    for c in chars {
        for value in [
            c.to_string(),
            format!("{c}a"),
            format!("a{c}"),
            format!("a{c}b"),
            format!("a{c}{}", "b".repeat(20)),
            format!("a{}{c}{}", "b".repeat(16), "b".repeat(20)),
            format!("{}{c}", "a".repeat(63)),
            format!("{}{c}", "a".repeat(127)),
        ] {
            all_kinds_same_as_old_rule(&value);
        }
    }
    for len in [0, 1, 63, 64, 65, 127, 128, 129, 300] {
        all_kinds_same_as_old_rule(&"x".repeat(len));
        all_kinds_same_as_old_rule(&"é".repeat(len));
    }
}

#[test]
fn ids_refuse_bytes_that_are_not_utf8_as_strings_do() {
    use serde::de::{Deserialize, value};
    for bytes in [&b"\xff"[..], b"a\xc3", b"ab\x80cd", b"\xed\xa0\x80"] {
        let new = Stage::deserialize(value::BytesDeserializer::<value::Error>::new(bytes));
        let old = String::deserialize(value::BytesDeserializer::<value::Error>::new(bytes));
        assert_eq!(new.unwrap_err(), old.unwrap_err());
        // postcard refuses them before any identifier rule is applied.
        let mut framed = postcard::to_allocvec(&(bytes.len() as u32)).unwrap();
        framed.extend_from_slice(bytes);
        assert_eq!(
            postcard::from_bytes::<TaskId>(&framed).unwrap_err(),
            postcard::Error::DeserializeBadUtf8
        );
    }
    let wrong = Stage::deserialize(value::U32Deserializer::<value::Error>::new(5));
    let old = String::deserialize(value::U32Deserializer::<value::Error>::new(5));
    assert_eq!(wrong.unwrap_err(), old.unwrap_err());
}

/// Strings that are often near-valid identifiers: mostly allowed
/// characters with a sprinkling of neighbours of the allowed ranges,
/// controls and non-ASCII.
fn arb_id_like() -> impl Strategy<Value = String> {
    let ch = prop_oneof![
        8 => proptest::char::range('0', '9'),
        8 => proptest::char::range('a', 'z'),
        4 => proptest::char::range('A', 'Z'),
        4 => prop::sample::select(vec!['_', '-', '.', ':', '@']),
        2 => prop::sample::select(vec![
            '/', '`', '[', '{', '^', ' ', '#', '*', '\0', '\x7f', '?', '<', ';', '=', '\\',
        ]),
        1 => any::<char>(),
    ];
    proptest::collection::vec(ch, 0..140).prop_map(|cs| cs.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn ids_match_the_old_rule_on_id_like_strings(value in arb_id_like()) {
        all_kinds_same_as_old_rule(&value);
    }

    #[test]
    fn ids_match_the_old_rule_on_arbitrary_strings(value in any::<String>()) {
        all_kinds_same_as_old_rule(&value);
    }
}

#[test]
fn every_reject_reason_has_its_own_name() {
    let names: std::collections::HashSet<&str> =
        RejectReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(names.len(), RejectReason::ALL.len());
    assert!(names.contains("invalid_after") && names.contains("payload_too_large"));
}

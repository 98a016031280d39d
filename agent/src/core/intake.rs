//! Sorting a stage's intake: where a message a producer published to
//! `<ns>.stage.<stage>` goes next. A pure function of what the message says
//! (its AMQP `priority`, its `x-delay`, `x-guildhall-due-at`,
//! `x-guildhall-after` and `x-guildhall-on-dependency-failure` headers, its
//! id and its size) and the time; the driver ([`crate::intake`]) reads the
//! message, publishes it where this says (or, for a held task, emits
//! `TaskHeld`), waits for the confirm and only then acks it.
//!
//! | message | goes to |
//! |---|---|
//! | no `priority` (or 0-9), not delayed | its band's queue (`<stage>.p<band>` on the task exchange) |
//! | delayed (`x-delay` ms, or a future `x-guildhall-due-at`) | the delay ladder, keyed to its band, due-at set |
//! | `priority` above 9 | the stage's dead-letter queue, class `invalid_priority` |
//! | `x-delay` negative, not a number, or over [`MAX_DELAY_MS`] | dead-letter queue, class `invalid_delay` |
//! | `x-guildhall-after` (task ids separated by commas, or an AMQP array of them), valid | nowhere: held by the coordinator, which publishes it once its dependencies finished; the agent writes a `TaskHeld` event (payload included, confirmed) |
//! | `x-guildhall-after` not a list of 1 to 64 task ids, `x-guildhall-on-dependency-failure` neither `fail` nor `run`, or `x-guildhall-after` with `x-delay` (or `x-guildhall-due-at`) | dead-letter queue, class `invalid_after` (nothing is dropped silently: a held task with a delay is not supported) |
//! | `x-guildhall-after`, payload over [`MAX_HELD_PAYLOAD`] | dead-letter queue, class `payload_too_large` |
//! | `x-guildhall-after`, `message_id` not a task id | dead-letter queue, class `invalid_message_id` |
//!
//! The priority is checked first. `x-guildhall-on-dependency-failure`
//! without `x-guildhall-after` is ignored.//!
//! `x-guildhall-due-at` (ms since the epoch) is Guildhall's own header: when
//! a message carries one, it wins over `x-delay` (the delay was already
//! counted from the time it was first sorted), and a due time in the past
//! goes straight to the band.

use guildhall_proto::flow::{self, DependencyPolicy, MAX_HELD_PAYLOAD};
use guildhall_proto::headers::amqp as h;
use guildhall_proto::schedule::{MAX_DELAY_MS, delay_routing_key, ladder_seconds};
use guildhall_proto::{Band, Names, Priority, RejectReason, Stage, TaskId};

/// The error class of a dead letter for a priority outside 0-9.
pub const INVALID_PRIORITY_CLASS: &str = "invalid_priority";

/// The error class of a dead letter for an `x-delay` that is not a delay.
pub const INVALID_DELAY_CLASS: &str = "invalid_delay";

/// An `x-delay` header as the producer typed it.
#[derive(Debug, Clone, PartialEq)]
pub enum RawDelay {
    /// An integer AMQP type.
    Int(i128),
    /// A floating-point AMQP type.
    Float(f64),
    /// Text (`"1500"`, `"1500.5"`).
    Text(String),
    /// Any other AMQP type (a table, an array, a boolean...): its name.
    Other(&'static str),
}

/// An `x-guildhall-after` header as the producer typed it (issue 19).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawAfter {
    /// Text: task ids separated by commas.
    Text(String),
    /// An AMQP array of text values.
    List(Vec<String>),
    /// Any other AMQP type (or an array with an element that is not
    /// text): its name.
    Other(&'static str),
}

/// What the sorter reads of an intake message.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct IntakeMessage {
    /// The AMQP `priority` property, if set.
    pub priority: Option<u8>,
    /// The `x-delay` header, if any.
    pub delay: Option<RawDelay>,
    /// The `x-guildhall-due-at` header, if it is a number.
    pub due_at_ms: Option<u64>,
    /// The `x-guildhall-after` header, if any.
    pub after: Option<RawAfter>,
    /// The `x-guildhall-on-dependency-failure` header, if any: its text, or
    /// the name of its AMQP type if it is not text.
    pub on_dependency_failure: Option<Result<String, &'static str>>,
    /// The `message_id` property, if set.
    pub message_id: Option<String>,
    /// The payload's size in bytes.
    pub payload_bytes: usize,
}

/// Where an intake message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sorted {
    /// To its band now: routing key on the task exchange.
    Band {
        /// Its priority.
        priority: Priority,
        /// The band's routing key.
        key: String,
    },
    /// Into the delay ladder: routing key on [`Names::delay_entry`].
    Delay {
        /// Its priority.
        priority: Priority,
        /// When it is due (ms since the epoch): set as `x-guildhall-due-at`.
        due_at_ms: u64,
        /// The ladder's routing key, ending in the band's key.
        key: String,
    },
    /// Held until its dependencies have finished (issue 19): reported in
    /// a `TaskHeld` event, the message itself acked and not moved.
    Hold {
        /// Its id: the `message_id`, or `None` for a new one.
        task_id: Option<TaskId>,
        /// Its priority.
        priority: Priority,
        /// The tasks it waits for.
        after: Vec<TaskId>,
        /// What it does when one of them fails.
        on_dependency_failure: DependencyPolicy,
    },
    /// To the stage's dead-letter queue with this reason.
    Dead {
        /// Why (its `as_str` is the error class: `invalid_priority`,
        /// `invalid_delay`, `invalid_after`, `payload_too_large`,
        /// `invalid_message_id`).
        reason: RejectReason,
        /// The reason, one line.
        error: String,
    },
}

impl Sorted {
    /// Whether the move is worth a `TaskQueued` event (a priority other
    /// than the default, or a delay), with its due time.
    pub fn queued(&self) -> Option<(Priority, Option<u64>)> {
        match self {
            Sorted::Band { priority, .. } if *priority != Priority::DEFAULT => {
                Some((*priority, None))
            }
            Sorted::Delay {
                priority,
                due_at_ms,
                ..
            } => Some((*priority, Some(*due_at_ms))),
            _ => None,
        }
    }
}

/// Reads an `x-delay` as whole milliseconds (decimals are rounded).
pub fn parse_delay(raw: &RawDelay) -> Result<u64, String> {
    let too_long = |ms: String| {
        format!("x-delay {ms} ms is over the longest delay, {MAX_DELAY_MS} ms (about 97 days)")
    };
    match raw {
        RawDelay::Int(v) if *v < 0 => Err(format!("x-delay {v} is negative")),
        RawDelay::Int(v) => match u64::try_from(*v) {
            Ok(ms) if ms <= MAX_DELAY_MS => Ok(ms),
            _ => Err(too_long(v.to_string())),
        },
        RawDelay::Float(f) if !f.is_finite() => Err(format!("x-delay {f} is not a number")),
        RawDelay::Float(f) if *f < 0.0 => Err(format!("x-delay {f} is negative")),
        RawDelay::Float(f) if f.round() > MAX_DELAY_MS as f64 => Err(too_long(f.to_string())),
        RawDelay::Float(f) => Ok(f.round() as u64),
        RawDelay::Text(s) => {
            let shown: String = s.chars().take(40).collect();
            let t = s.trim();
            let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
            let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
            if t.starts_with('-') && t.len() > 1 && digits(whole[1..].trim_start()) {
                return Err(format!("x-delay {shown:?} is negative"));
            }
            if whole.is_empty() || !digits(whole) || !digits(frac) {
                return Err(format!("x-delay {shown:?} is not a number of milliseconds"));
            }
            let ms: u64 = whole.parse().map_err(|_| too_long(shown.clone()))?;
            let round_up = frac.as_bytes().first().is_some_and(|b| *b >= b'5');
            let ms = ms.saturating_add(u64::from(round_up));
            if ms > MAX_DELAY_MS {
                return Err(too_long(shown));
            }
            Ok(ms)
        }
        RawDelay::Other(kind) => Err(format!("x-delay is a {kind}, not a number of milliseconds")),
    }
}

/// The text of a producer's value in an error: at most 40 characters.
fn shown(value: &str) -> String {
    format!("{:?}", value.chars().take(40).collect::<String>())
}

/// Reads `x-guildhall-after` and `x-guildhall-on-dependency-failure` of a
/// message to hold, or says why they are refused.
pub fn parse_hold(
    after: &RawAfter,
    policy: Option<&Result<String, &'static str>>,
) -> Result<(Vec<TaskId>, DependencyPolicy), String> {
    let after = match after {
        RawAfter::Text(text) => flow::parse_after(text),
        RawAfter::List(ids) => flow::after_list(ids.iter().map(String::as_str)),
        RawAfter::Other(kind) => {
            return Err(format!(
                "{} is a {kind}, not task ids separated by commas",
                h::AFTER
            ));
        }
    }
    .map_err(|e| format!("{}: {e}", h::AFTER))?;
    let policy = match policy {
        None => DependencyPolicy::default(),
        Some(Ok(text)) => DependencyPolicy::parse(text).ok_or_else(|| {
            format!(
                "{} {} is neither `fail` nor `run`",
                h::ON_DEPENDENCY_FAILURE,
                shown(text)
            )
        })?,
        Some(Err(kind)) => {
            return Err(format!(
                "{} is a {kind}, not `fail` or `run`",
                h::ON_DEPENDENCY_FAILURE
            ));
        }
    };
    Ok((after, policy))
}

/// Where `message`, taken from `stage`'s intake at `now_ms`, goes.
pub fn sort(stage: &Stage, message: &IntakeMessage, now_ms: u64) -> Sorted {
    let priority = match message.priority {
        None => Priority::DEFAULT,
        Some(p) => match Priority::new(p) {
            Ok(p) => p,
            Err(_) => {
                return Sorted::Dead {
                    reason: RejectReason::InvalidPriority,
                    error: format!(
                        "priority {p} is outside 0-9 (the AMQP priority property; higher first)"
                    ),
                };
            }
        },
    };
    if let Some(after) = &message.after {
        return hold(priority, after, message);
    }
    let band_key = Names::band_key(stage, Band::of(priority));
    let due_at_ms = match (message.due_at_ms, &message.delay) {
        (Some(due), _) => Some(due),
        (None, Some(raw)) => match parse_delay(raw) {
            Ok(ms) => Some(now_ms.saturating_add(ms)),
            Err(error) => {
                return Sorted::Dead {
                    reason: RejectReason::InvalidDelay,
                    error,
                };
            }
        },
        (None, None) => None,
    };
    match due_at_ms {
        Some(due) if ladder_seconds(due.saturating_sub(now_ms)) > 0 => Sorted::Delay {
            priority,
            due_at_ms: due,
            key: delay_routing_key(ladder_seconds(due - now_ms), &band_key),
        },
        _ => Sorted::Band {
            priority,
            key: band_key,
        },
    }
}

/// The sorting of a message with `x-guildhall-after` (see the table).
fn hold(priority: Priority, after: &RawAfter, message: &IntakeMessage) -> Sorted {
    let dead = |reason, error| Sorted::Dead { reason, error };
    if message.delay.is_some() || message.due_at_ms.is_some() {
        return dead(
            RejectReason::InvalidAfter,
            format!(
                "{} and {} (or {}) together are not supported: a held task runs when its \
                 dependencies have finished",
                h::AFTER,
                h::DELAY,
                h::DUE_AT
            ),
        );
    }
    let (after, on_dependency_failure) =
        match parse_hold(after, message.on_dependency_failure.as_ref()) {
            Ok(parsed) => parsed,
            Err(error) => return dead(RejectReason::InvalidAfter, error),
        };
    if message.payload_bytes > MAX_HELD_PAYLOAD {
        return dead(
            RejectReason::PayloadTooLarge,
            format!(
                "a task held with {} carries its payload in the events stream: {} bytes is \
                 over {MAX_HELD_PAYLOAD}",
                h::AFTER,
                message.payload_bytes
            ),
        );
    }
    let task_id = match message.message_id.as_deref().map(TaskId::new) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(e)) => {
            return dead(
                RejectReason::InvalidMessageId,
                format!("message_id is not a valid task id: {e}"),
            );
        }
    };
    Sorted::Hold {
        task_id,
        priority,
        after,
        on_dependency_failure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn msg(priority: Option<u8>, delay: Option<RawDelay>) -> IntakeMessage {
        IntakeMessage {
            priority,
            delay,
            ..IntakeMessage::default()
        }
    }

    #[test]
    fn priorities_go_to_their_band() {
        let stage: Stage = "build".parse().unwrap();
        let table = [
            (None, "build.p0-3"),
            (Some(0), "build.p0-3"),
            (Some(3), "build.p0-3"),
            (Some(4), "build.p4-6"),
            (Some(6), "build.p4-6"),
            (Some(7), "build.p7-9"),
            (Some(9), "build.p7-9"),
        ];
        for (p, key) in table {
            match sort(&stage, &msg(p, None), NOW) {
                Sorted::Band { key: k, priority } => {
                    assert_eq!(k, key, "{p:?}");
                    assert_eq!(priority.get(), p.unwrap_or(0));
                }
                other => panic!("{p:?}: {other:?}"),
            }
        }
        assert_eq!(sort(&stage, &msg(None, None), NOW).queued(), None);
        assert!(sort(&stage, &msg(Some(9), None), NOW).queued().is_some());
    }

    #[test]
    fn bad_priorities_are_dead_letters_with_the_reason() {
        let stage: Stage = "s".parse().unwrap();
        for p in [10, 11, 255] {
            match sort(&stage, &msg(Some(p), None), NOW) {
                Sorted::Dead { reason, error } => {
                    assert_eq!(reason.as_str(), INVALID_PRIORITY_CLASS);
                    assert!(error.contains(&p.to_string()), "{error}");
                }
                other => panic!("{p}: {other:?}"),
            }
        }
    }

    #[test]
    fn delays_parse_or_say_why_not() {
        let ok = [
            (RawDelay::Int(0), 0),
            (RawDelay::Int(1500), 1500),
            (RawDelay::Text("1500".into()), 1500),
            (RawDelay::Text(" 90000 ".into()), 90000),
            (RawDelay::Text("1500.5".into()), 1501),
            (RawDelay::Text("1500.4".into()), 1500),
            (RawDelay::Float(2500.0), 2500),
            (RawDelay::Int(MAX_DELAY_MS.into()), MAX_DELAY_MS),
        ];
        for (raw, ms) in ok {
            assert_eq!(parse_delay(&raw), Ok(ms), "{raw:?}");
        }
        let bad = [
            (RawDelay::Int(-1), "negative"),
            (RawDelay::Text("-5".into()), "negative"),
            (RawDelay::Text("soon".into()), "not a number"),
            (RawDelay::Text("".into()), "not a number"),
            (RawDelay::Text("1e3".into()), "not a number"),
            (RawDelay::Text("1.2.3".into()), "not a number"),
            (RawDelay::Text("99999999999999999999999".into()), "longest"),
            (RawDelay::Int(i128::from(MAX_DELAY_MS) + 1), "longest"),
            (RawDelay::Float(f64::NAN), "not a number"),
            (RawDelay::Float(-1.0), "negative"),
            (RawDelay::Float(1e30), "longest"),
            (RawDelay::Other("table"), "table"),
        ];
        for (raw, why) in bad {
            let err = parse_delay(&raw).unwrap_err();
            assert!(err.contains(why), "{raw:?}: {err}");
        }
    }

    #[test]
    fn delayed_messages_enter_the_ladder_keyed_to_their_band() {
        let stage: Stage = "s".parse().unwrap();
        match sort(&stage, &msg(Some(8), Some(RawDelay::Int(5_000))), NOW) {
            Sorted::Delay {
                priority,
                due_at_ms,
                key,
            } => {
                assert_eq!(priority.get(), 8);
                assert_eq!(due_at_ms, NOW + 5_000);
                assert_eq!(key, delay_routing_key(5, "s.p7-9"));
            }
            other => panic!("{other:?}"),
        }
        // Under half a second: straight to the band.
        assert!(matches!(
            sort(&stage, &msg(None, Some(RawDelay::Int(400))), NOW),
            Sorted::Band { .. }
        ));
        match sort(&stage, &msg(None, Some(RawDelay::Text("x".into()))), NOW) {
            Sorted::Dead { reason, .. } => assert_eq!(reason.as_str(), INVALID_DELAY_CLASS),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_due_time_wins_over_the_delay_and_a_past_one_is_due_now() {
        let stage: Stage = "s".parse().unwrap();
        let mut m = msg(None, Some(RawDelay::Int(60_000)));
        m.due_at_ms = Some(NOW + 3_000);
        match sort(&stage, &m, NOW) {
            Sorted::Delay { due_at_ms, key, .. } => {
                assert_eq!(due_at_ms, NOW + 3_000);
                assert_eq!(key, delay_routing_key(3, "s.p0-3"));
            }
            other => panic!("{other:?}"),
        }
        m.due_at_ms = Some(NOW - 10_000);
        assert!(matches!(sort(&stage, &m, NOW), Sorted::Band { .. }));
    }

    fn after(text: &str) -> IntakeMessage {
        IntakeMessage {
            after: Some(RawAfter::Text(text.into())),
            message_id: Some("D-1".into()),
            payload_bytes: 10,
            ..IntakeMessage::default()
        }
    }

    fn dead(sorted: Sorted) -> (RejectReason, String) {
        match sorted {
            Sorted::Dead { reason, error } => (reason, error),
            other => panic!("not a dead letter: {other:?}"),
        }
    }

    #[test]
    fn a_message_with_after_is_held_with_its_dependencies_and_policy() {
        let stage: Stage = "s".parse().unwrap();
        let mut m = after("A-1, B-2,A-1");
        m.priority = Some(8);
        match sort(&stage, &m, NOW) {
            Sorted::Hold {
                task_id,
                priority,
                after,
                on_dependency_failure,
            } => {
                assert_eq!(task_id.as_ref().map(TaskId::as_str), Some("D-1"));
                assert_eq!(priority.get(), 8);
                let after: Vec<&str> = after.iter().map(TaskId::as_str).collect();
                assert_eq!(after, ["A-1", "B-2"]);
                assert_eq!(on_dependency_failure, DependencyPolicy::Fail);
            }
            other => panic!("{other:?}"),
        }
        let mut m = after("A");
        m.after = Some(RawAfter::List(vec!["X".into(), "Y".into()]));
        m.on_dependency_failure = Some(Ok(" run ".into()));
        m.message_id = None;
        m.payload_bytes = MAX_HELD_PAYLOAD;
        match sort(&stage, &m, NOW) {
            Sorted::Hold {
                task_id,
                after,
                on_dependency_failure,
                ..
            } => {
                assert_eq!(task_id, None, "a new id is the mover's");
                assert_eq!(after.len(), 2);
                assert_eq!(on_dependency_failure, DependencyPolicy::Run);
            }
            other => panic!("{other:?}"),
        }
        // The policy alone changes nothing.
        let mut m = msg(None, None);
        m.on_dependency_failure = Some(Ok("whatever".into()));
        assert!(matches!(sort(&stage, &m, NOW), Sorted::Band { .. }));
    }

    #[test]
    fn a_bad_after_is_a_dead_letter_with_the_reason() {
        let stage: Stage = "s".parse().unwrap();
        let many = (0..=flow::MAX_AFTER)
            .map(|i| format!("t{i}"))
            .collect::<Vec<_>>()
            .join(",");
        let with = |f: &dyn Fn(&mut IntakeMessage)| {
            let mut m = after("A-1");
            f(&mut m);
            m
        };
        let cases: Vec<(IntakeMessage, RejectReason, &str)> = vec![
            (
                after(""),
                RejectReason::InvalidAfter,
                "x-guildhall-after: dependency",
            ),
            (
                after("A-1,,B"),
                RejectReason::InvalidAfter,
                "x-guildhall-after: dependency",
            ),
            (
                after("a b"),
                RejectReason::InvalidAfter,
                "x-guildhall-after: dependency",
            ),
            (
                after(&many),
                RejectReason::InvalidAfter,
                "more than 64 dependencies",
            ),
            (
                with(&|m| m.after = Some(RawAfter::List(vec![]))),
                RejectReason::InvalidAfter,
                "no dependency named",
            ),
            (
                with(&|m| m.after = Some(RawAfter::Other("table"))),
                RejectReason::InvalidAfter,
                "x-guildhall-after is a table",
            ),
            (
                with(&|m| m.on_dependency_failure = Some(Ok("maybe".into()))),
                RejectReason::InvalidAfter,
                "x-guildhall-on-dependency-failure \"maybe\" is neither",
            ),
            (
                with(&|m| m.on_dependency_failure = Some(Err("long int"))),
                RejectReason::InvalidAfter,
                "is a long int",
            ),
            (
                with(&|m| m.delay = Some(RawDelay::Int(5_000))),
                RejectReason::InvalidAfter,
                "together are not supported",
            ),
            (
                with(&|m| m.due_at_ms = Some(NOW + 5_000)),
                RejectReason::InvalidAfter,
                "together are not supported",
            ),
            (
                with(&|m| m.payload_bytes = MAX_HELD_PAYLOAD + 1),
                RejectReason::PayloadTooLarge,
                "262145 bytes is over 262144",
            ),
            (
                with(&|m| m.message_id = Some("has space".into())),
                RejectReason::InvalidMessageId,
                "message_id is not a valid task id",
            ),
            (
                with(&|m| m.priority = Some(12)),
                RejectReason::InvalidPriority,
                "outside 0-9",
            ),
        ];
        for (m, want, why) in cases {
            let (reason, error) = dead(sort(&stage, &m, NOW));
            assert_eq!(reason, want, "{m:?}: {error}");
            assert!(error.contains(why), "{m:?}: {error:?} should say {why:?}");
            assert!(error.len() < 400, "{error}");
        }
    }
}

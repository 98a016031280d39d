//! Sorting a stage's intake: where a message a producer published to
//! `<ns>.stage.<stage>` goes next. A pure function of what the message says
//! (its AMQP `priority`, its `x-delay` and `x-guildhall-due-at` headers) and
//! the time; the driver ([`crate::intake`]) reads the message, publishes it
//! where this says, waits for the confirm and only then acks it.
//!
//! | message | goes to |
//! |---|---|
//! | no `priority` (or 0-9), not delayed | its band's queue (`<stage>.p<band>` on the task exchange) |
//! | delayed (`x-delay` ms, or a future `x-guildhall-due-at`) | the delay ladder, keyed to its band, due-at set |
//! | `priority` above 9 | the stage's dead-letter queue, class `invalid_priority` |
//! | `x-delay` negative, not a number, or over [`MAX_DELAY_MS`] | dead-letter queue, class `invalid_delay` |
//!
//! `x-guildhall-due-at` (ms since the epoch) is Guildhall's own header: when
//! a message carries one, it wins over `x-delay` (the delay was already
//! counted from the time it was first sorted), and a due time in the past
//! goes straight to the band.

use guildhall_proto::schedule::{MAX_DELAY_MS, delay_routing_key, ladder_seconds};
use guildhall_proto::{Band, Names, Priority, Stage};

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

/// What the sorter reads of an intake message.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct IntakeMessage {
    /// The AMQP `priority` property, if set.
    pub priority: Option<u8>,
    /// The `x-delay` header, if any.
    pub delay: Option<RawDelay>,
    /// The `x-guildhall-due-at` header, if it is a number.
    pub due_at_ms: Option<u64>,
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
    /// To the stage's dead-letter queue with this reason.
    Dead {
        /// The error class (`invalid_priority`, `invalid_delay`).
        class: &'static str,
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

/// Where `message`, taken from `stage`'s intake at `now_ms`, goes.
pub fn sort(stage: &Stage, message: &IntakeMessage, now_ms: u64) -> Sorted {
    let priority = match message.priority {
        None => Priority::DEFAULT,
        Some(p) => match Priority::new(p) {
            Ok(p) => p,
            Err(_) => {
                return Sorted::Dead {
                    class: INVALID_PRIORITY_CLASS,
                    error: format!(
                        "priority {p} is outside 0-9 (the AMQP priority property; higher first)"
                    ),
                };
            }
        },
    };
    let band_key = Names::band_key(stage, Band::of(priority));
    let due_at_ms = match (message.due_at_ms, &message.delay) {
        (Some(due), _) => Some(due),
        (None, Some(raw)) => match parse_delay(raw) {
            Ok(ms) => Some(now_ms.saturating_add(ms)),
            Err(error) => {
                return Sorted::Dead {
                    class: INVALID_DELAY_CLASS,
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

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn msg(priority: Option<u8>, delay: Option<RawDelay>) -> IntakeMessage {
        IntakeMessage {
            priority,
            delay,
            due_at_ms: None,
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
                Sorted::Dead { class, error } => {
                    assert_eq!(class, INVALID_PRIORITY_CLASS);
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
            Sorted::Dead { class, .. } => assert_eq!(class, INVALID_DELAY_CLASS),
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
}

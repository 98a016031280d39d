//! The AMQP form of a task message: everything but the payload, which is
//! opaque bytes and never re-encoded.
//!
//! Whatever a producer put in the properties is read without trust: an
//! attempt header of any type or none gives attempt 1, a traceparent longer
//! than [`MAX_TRACEPARENT_BYTES`] is ignored, and a time that cannot be a
//! task's (before [`EARLIEST_PLAUSIBLE_MS`], or more than
//! [`FUTURE_TOLERANCE_MS`] ahead of the reader's clock; an AMQP `timestamp`
//! whose milliseconds do not fit 64 bits) is read as absent and reported by
//! [`TaskMeta::read`], so no wait or latency is computed from it.
//!
//! Flows (issue 19): a child task carries its parent's id
//! (`x-guildhall-parent`) and a parent published to its join stage carries
//! `x-guildhall-joined`; both travel with the task to every later stage. A
//! parent header that is not a valid task id is read as absent
//! ([`malformed_parent`] says why, for the reader to count and log). The
//! joined header counts as set unless it says no (`false`, `0`, empty text):
//! written as a boolean `true`.

use guildhall_proto::headers::amqp as h;
use guildhall_proto::{InvalidId, Priority, TaskId};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// 2000-01-01T00:00:00Z in ms since the epoch: no task time is older.
pub const EARLIEST_PLAUSIBLE_MS: u64 = 946_684_800_000;

/// How far in the future (by the reader's clock) a task time may be: clocks
/// of different hosts disagree a little, and a retry's enqueue time is when
/// its delay ends. One hour.
pub const FUTURE_TOLERANCE_MS: u64 = 3_600_000;

/// Longest `traceparent` header kept (a W3C version-00 one is 55 bytes).
pub const MAX_TRACEPARENT_BYTES: usize = 512;

/// Whether `t_ms` can be a task's enqueue or submit time when read at
/// `now_ms`: not before 2000, not more than [`FUTURE_TOLERANCE_MS`] ahead.
pub fn plausible_time(t_ms: u64, now_ms: u64) -> bool {
    t_ms >= EARLIEST_PLAUSIBLE_MS && t_ms <= now_ms.saturating_add(FUTURE_TOLERANCE_MS)
}

/// A time in a message's properties that was read as absent because it
/// cannot be right (see [`plausible_time`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImplausibleTime {
    /// Where it was: `x-guildhall-enqueued-at`, `x-guildhall-submitted-at`
    /// or `timestamp` (the AMQP property, in seconds).
    pub field: &'static str,
    /// The value in ms (saturated at `u64::MAX` for a `timestamp` whose
    /// milliseconds overflow).
    pub value_ms: u64,
}

/// What travels with a task's payload from stage to stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMeta {
    /// The task's id, the AMQP `message_id`; the same at every stage.
    pub id: TaskId,
    /// Attempt number at the current stage, from 1.
    pub attempt: u32,
    /// When the message was put on its current stage's queue.
    pub enqueued_at_ms: Option<u64>,
    /// When the task entered the pipeline.
    pub submitted_at_ms: Option<u64>,
    /// W3C trace context, if any.
    pub traceparent: Option<String>,
    /// The AMQP `priority` property (0-9; absent is 0): kept from stage to
    /// stage, and the band the task is queued in.
    pub priority: Priority,
    /// On a child task (issue 19): its parent's id (`x-guildhall-parent`),
    /// kept from stage to stage.
    pub parent: Option<TaskId>,
    /// On a parent published to its join stage (`x-guildhall-joined`): it
    /// fanned out once and may not again. Kept from stage to stage.
    pub joined: bool,
}

/// Why a delivered message cannot be treated as a task.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskMetaError {
    /// The `message_id` property is not a valid task id.
    #[error("message_id is not a valid task id: {0}")]
    InvalidId(#[from] InvalidId),
}

/// A fresh task id: a UUIDv7, so ids sort by creation time.
pub fn new_task_id() -> TaskId {
    TaskId::new(uuid::Uuid::now_v7().to_string()).expect("a UUID's text form is a valid task id")
}

impl TaskMeta {
    /// Metadata for a task entering the pipeline now.
    pub fn submission(id: TaskId, now_ms: u64, traceparent: Option<String>) -> Self {
        Self {
            id,
            attempt: 1,
            enqueued_at_ms: Some(now_ms),
            submitted_at_ms: Some(now_ms),
            traceparent,
            priority: Priority::DEFAULT,
            parent: None,
            joined: false,
        }
    }

    /// A child of a fan-out (issue 19): `id` (`<parent>:<n>`) entering the
    /// pipeline now, attempt 1, with its parent's priority, the parent's id
    /// and the parent's stage attempt's span as its trace.
    pub fn child(&self, id: TaskId, now_ms: u64, traceparent: Option<String>) -> Self {
        Self {
            id,
            attempt: 1,
            enqueued_at_ms: Some(now_ms),
            submitted_at_ms: Some(now_ms),
            traceparent: traceparent.or_else(|| self.traceparent.clone()),
            priority: self.priority,
            parent: Some(self.id.clone()),
            joined: false,
        }
    }

    /// The same metadata with priority `priority`.
    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// The same task handed on to another stage (attempt 1 there), enqueued now.
    pub fn next_stage(&self, now_ms: u64, traceparent: Option<String>) -> Self {
        Self {
            id: self.id.clone(),
            attempt: 1,
            enqueued_at_ms: Some(now_ms),
            submitted_at_ms: self.submitted_at_ms,
            traceparent: traceparent.or_else(|| self.traceparent.clone()),
            priority: self.priority,
            parent: self.parent.clone(),
            joined: self.joined,
        }
    }

    /// The same task's next attempt at the same stage, which reaches the
    /// stage queue again after `delay_ms` (its `enqueued_at` is then, so queue
    /// wait does not count the retry delay).
    pub fn retry(&self, now_ms: u64, delay_ms: u64) -> Self {
        Self {
            attempt: self.attempt.saturating_add(1),
            enqueued_at_ms: Some(now_ms.saturating_add(delay_ms)),
            ..self.clone()
        }
    }

    /// The message properties: persistent, id, timestamp and headers.
    pub fn properties(&self) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(
            h::ATTEMPT.into(),
            AMQPValue::LongLongInt(self.attempt.into()),
        );
        if let Some(t) = self.enqueued_at_ms {
            headers.insert(h::ENQUEUED_AT.into(), AMQPValue::LongLongInt(clamp(t)));
        }
        if let Some(t) = self.submitted_at_ms {
            headers.insert(h::SUBMITTED_AT.into(), AMQPValue::LongLongInt(clamp(t)));
        }
        if let Some(tp) = &self.traceparent {
            headers.insert(
                h::TRACEPARENT.into(),
                AMQPValue::LongString(LongString::from(tp.as_str())),
            );
        }
        if let Some(parent) = &self.parent {
            headers.insert(
                h::PARENT.into(),
                AMQPValue::LongString(LongString::from(parent.as_str())),
            );
        }
        if self.joined {
            headers.insert(h::JOINED.into(), AMQPValue::Boolean(true));
        }
        let mut props = BasicProperties::default()
            .with_message_id(ShortString::from(self.id.as_str()))
            .with_delivery_mode(2)
            .with_content_type("application/octet-stream".into())
            .with_headers(headers);
        if let Some(t) = self.enqueued_at_ms {
            props = props.with_timestamp(t / 1000);
        }
        if self.priority != Priority::DEFAULT {
            props = props.with_priority(self.priority.get());
        }
        props
    }

    /// [`TaskMeta::properties`] for a message sent into the delay ladder:
    /// with `x-guildhall-due-at`, `due_at_ms`.
    pub fn delayed_properties(&self, due_at_ms: u64) -> BasicProperties {
        let props = self.properties();
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(h::DUE_AT.into(), AMQPValue::LongLongInt(clamp(due_at_ms)));
        props.with_headers(headers)
    }

    /// Reads a delivered message's metadata. A missing `message_id` gets a
    /// fresh id (producers outside Guildhall may not set one); an invalid one
    /// is an error, so the message can be dead-lettered with that reason.
    ///
    /// Implausible times are read as absent; [`TaskMeta::read`] also says
    /// which.
    pub fn from_properties(props: &BasicProperties) -> Result<Self, TaskMetaError> {
        Self::read(props, crate::now_ms()).map(|(meta, _)| meta)
    }

    /// [`TaskMeta::from_properties`] at the reader's time `now_ms`, with the
    /// times that were dropped as implausible (usually none: the list is
    /// then empty and allocates nothing).
    pub fn read(
        props: &BasicProperties,
        now_ms: u64,
    ) -> Result<(Self, Vec<ImplausibleTime>), TaskMetaError> {
        let id = match props.message_id() {
            Some(id) => TaskId::new(id.as_str())?,
            None => new_task_id(),
        };
        let headers = props.headers().as_ref();
        let get = |key: &str| headers.and_then(|t| header_u64(t, key));
        let attempt = get(h::ATTEMPT)
            .and_then(|a| u32::try_from(a).ok())
            .filter(|a| *a >= 1)
            .unwrap_or(1);
        let mut dropped = Vec::new();
        let mut plausible = |field: &'static str, value_ms: Option<u64>| {
            let value_ms = value_ms?;
            if plausible_time(value_ms, now_ms) {
                return Some(value_ms);
            }
            dropped.push(ImplausibleTime { field, value_ms });
            None
        };
        // The header is the precise one; the `timestamp` property (whole
        // seconds, set by many producers) stands in only when it is missing.
        let enqueued_at_ms = match get(h::ENQUEUED_AT) {
            Some(ms) => plausible(h::ENQUEUED_AT, Some(ms)),
            None => plausible(
                "timestamp",
                props.timestamp().map(|s| s.saturating_mul(1000)),
            ),
        };
        let submitted_at_ms = plausible(h::SUBMITTED_AT, get(h::SUBMITTED_AT));
        let traceparent = headers
            .and_then(|t| t.inner().get(h::TRACEPARENT))
            .and_then(value_str)
            .filter(|tp| tp.len() <= MAX_TRACEPARENT_BYTES);
        // Sorted into a band by an agent, which dead-letters a priority
        // outside 0-9 at the intake; one published straight to a band by a
        // third party is capped at 9.
        let priority = Priority::new(props.priority().unwrap_or(0).min(9)).unwrap_or_default();
        let parent = headers.and_then(|t| read_parent(t).ok().flatten());
        let joined = headers.is_some_and(read_joined);
        let meta = Self {
            id,
            attempt,
            enqueued_at_ms,
            submitted_at_ms,
            traceparent,
            priority,
            parent,
            joined,
        };
        Ok((meta, dropped))
    }
}

/// The `x-guildhall-parent` header: `Ok(None)` without one, an error (one
/// line) when it is there but not a valid task id (or not text).
fn read_parent(table: &FieldTable) -> Result<Option<TaskId>, String> {
    let Some(value) = table.inner().get(h::PARENT) else {
        return Ok(None);
    };
    let Some(text) = value_str(value) else {
        return Err(format!("{} is not text", h::PARENT));
    };
    TaskId::new(text)
        .map(Some)
        .map_err(|e| format!("{} is not a task id: {e}", h::PARENT))
}

/// Why a message's `x-guildhall-parent` header was read as absent (it is
/// there, but not text or not a valid task id); `None` when it is absent
/// or valid. [`TaskMeta::read`] ignores such a header; the reader counts
/// and logs it.
pub fn malformed_parent(props: &BasicProperties) -> Option<String> {
    read_parent(props.headers().as_ref()?).err()
}

/// Whether `x-guildhall-joined` is set: present and not saying no (a
/// boolean `false`, a number 0, text `false`, `0` or empty).
fn read_joined(table: &FieldTable) -> bool {
    match table.inner().get(h::JOINED) {
        None | Some(AMQPValue::Void) => false,
        Some(AMQPValue::Boolean(b)) => *b,
        Some(value) => match value_str(value) {
            Some(text) => !matches!(text.trim(), "" | "0" | "false"),
            None => header_u64(table, h::JOINED) != Some(0),
        },
    }
}

fn clamp(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

/// Reads a header as an unsigned number, whatever integer type (or decimal
/// string) the producer used.
pub fn header_u64(table: &FieldTable, key: &str) -> Option<u64> {
    match table.inner().get(key)? {
        AMQPValue::ShortShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortShortUInt(v) => Some((*v).into()),
        AMQPValue::ShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortUInt(v) => Some((*v).into()),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some((*v).into()),
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::Timestamp(v) => Some(*v),
        other => value_str(other)?.trim().parse().ok(),
    }
}

/// Reads a header as text.
pub fn header_str(table: &FieldTable, key: &str) -> Option<String> {
    value_str(table.inner().get(key)?)
}

fn value_str(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Adds a text header to properties (dead-letter reasons and the like).
pub fn with_text_header(props: BasicProperties, key: &str, value: &str) -> BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(key.into(), AMQPValue::LongString(LongString::from(value)));
    props.with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_round_trip() {
        let meta = TaskMeta::submission("CODE-1".parse().unwrap(), 1_700_000_000_123, None);
        let back = TaskMeta::from_properties(&meta.properties()).unwrap();
        assert_eq!(back, meta);
        let next = back.next_stage(1_700_000_001_000, Some("00-x".into()));
        assert_eq!(next.attempt, 1);
        assert_eq!(next.submitted_at_ms, meta.submitted_at_ms);
        let retry = next.retry(1_700_000_002_000, 1000);
        assert_eq!(retry.enqueued_at_ms, Some(1_700_000_003_000));
        assert_eq!(retry.attempt, 2);
        assert_eq!(
            TaskMeta::from_properties(&retry.properties()).unwrap(),
            retry
        );
    }

    #[test]
    fn foreign_messages_get_defaults() {
        let props = BasicProperties::default().with_timestamp(1_700_000_000);
        let meta = TaskMeta::from_properties(&props).unwrap();
        assert_eq!(meta.attempt, 1);
        assert_eq!(meta.enqueued_at_ms, Some(1_700_000_000_000));
        assert!(uuid::Uuid::parse_str(meta.id.as_str()).is_ok());
        let bad = BasicProperties::default().with_message_id("has space".into());
        assert!(TaskMeta::from_properties(&bad).is_err());
    }

    const NOW: u64 = 1_700_000_000_000;

    #[test]
    fn times_before_2000_or_over_an_hour_ahead_are_implausible() {
        assert!(plausible_time(EARLIEST_PLAUSIBLE_MS, NOW));
        assert!(!plausible_time(EARLIEST_PLAUSIBLE_MS - 1, NOW));
        assert!(!plausible_time(0, NOW));
        assert!(plausible_time(NOW, NOW));
        assert!(plausible_time(NOW + FUTURE_TOLERANCE_MS, NOW));
        assert!(!plausible_time(NOW + FUTURE_TOLERANCE_MS + 1, NOW));
        assert!(!plausible_time(u64::MAX, NOW));
        assert!(
            plausible_time(u64::MAX - 1, u64::MAX),
            "no overflow at the top"
        );
    }

    #[test]
    fn a_timestamp_whose_milliseconds_overflow_is_absent_not_wrapped() {
        // 2^62 s: `* 1000` wraps in u64 (to a plausible-looking value, or a
        // wait of 4294967295 ms once subtracted).
        let props = BasicProperties::default().with_timestamp(1 << 62);
        let (meta, dropped) = TaskMeta::read(&props, NOW).unwrap();
        assert_eq!(meta.enqueued_at_ms, None);
        assert_eq!(
            dropped,
            [ImplausibleTime {
                field: "timestamp",
                value_ms: u64::MAX
            }]
        );
        // u64::MAX seconds, and a timestamp in the year 1970.
        for s in [u64::MAX, 5] {
            let props = BasicProperties::default().with_timestamp(s);
            let (meta, dropped) = TaskMeta::read(&props, NOW).unwrap();
            assert_eq!((meta.enqueued_at_ms, dropped.len()), (None, 1), "{s}");
        }
        let props = BasicProperties::default().with_timestamp(NOW / 1000);
        let (meta, dropped) = TaskMeta::read(&props, NOW).unwrap();
        assert_eq!(meta.enqueued_at_ms, Some(NOW));
        assert!(dropped.is_empty());
    }

    #[test]
    fn implausible_header_times_are_absent_and_reported() {
        let mut t = FieldTable::default();
        t.insert(h::ENQUEUED_AT.into(), AMQPValue::LongLongInt(i64::MAX));
        t.insert(h::SUBMITTED_AT.into(), AMQPValue::LongString("12".into()));
        // Even with a sane `timestamp`, the header was given: it is not
        // replaced by the property.
        let props = BasicProperties::default()
            .with_headers(t)
            .with_timestamp(NOW / 1000);
        let (meta, dropped) = TaskMeta::read(&props, NOW).unwrap();
        assert_eq!((meta.enqueued_at_ms, meta.submitted_at_ms), (None, None));
        let fields: Vec<_> = dropped.iter().map(|d| d.field).collect();
        assert_eq!(fields, [h::ENQUEUED_AT, h::SUBMITTED_AT]);
        // A retry's enqueue time is a little ahead: fine.
        let meta = TaskMeta::submission("T-1".parse().unwrap(), NOW, None).retry(NOW, 60_000);
        let (back, dropped) = TaskMeta::read(&meta.properties(), NOW).unwrap();
        assert_eq!(back, meta);
        assert!(dropped.is_empty());
    }

    #[test]
    fn odd_headers_give_defaults_never_an_error() {
        let mut t = FieldTable::default();
        t.insert(h::ATTEMPT.into(), AMQPValue::Double(2.5));
        t.insert(
            h::TRACEPARENT.into(),
            AMQPValue::LongString("x".repeat(10_000).into()),
        );
        t.insert(h::SUBMITTED_AT.into(), AMQPValue::Boolean(true));
        t.insert("\u{fffd}(".into(), AMQPValue::Void);
        let props = BasicProperties::default()
            .with_message_id("T-1".into())
            .with_headers(t);
        let (meta, dropped) = TaskMeta::read(&props, NOW).unwrap();
        assert_eq!(meta.attempt, 1);
        assert_eq!(meta.traceparent, None);
        assert_eq!(meta.submitted_at_ms, None);
        assert!(dropped.is_empty());
        for attempt in [
            AMQPValue::LongLongInt(-3),
            AMQPValue::LongLongInt(i64::MAX),
            AMQPValue::LongString("many".into()),
            AMQPValue::LongInt(0),
        ] {
            let mut t = FieldTable::default();
            t.insert(h::ATTEMPT.into(), attempt.clone());
            let props = BasicProperties::default().with_headers(t);
            assert_eq!(
                TaskMeta::from_properties(&props).unwrap().attempt,
                1,
                "{attempt:?}"
            );
        }
    }

    #[test]
    fn headers_of_any_integer_type_or_text_are_read() {
        let mut t = FieldTable::default();
        t.insert("a".into(), AMQPValue::LongInt(3));
        t.insert("b".into(), AMQPValue::LongString("42".into()));
        t.insert("c".into(), AMQPValue::LongInt(-1));
        assert_eq!(header_u64(&t, "a"), Some(3));
        assert_eq!(header_u64(&t, "b"), Some(42));
        assert_eq!(header_u64(&t, "c"), None);
        assert_eq!(header_u64(&t, "missing"), None);
    }

    #[test]
    fn delayed_properties_add_the_due_time_to_the_properties() {
        let meta = TaskMeta::submission(TaskId::new("T-1").unwrap(), 5, None);
        let props = meta.delayed_properties(42);
        let t = props.headers().as_ref().unwrap();
        assert_eq!(header_u64(t, h::DUE_AT), Some(42));
        assert_eq!(header_u64(t, h::ENQUEUED_AT), Some(5));
        assert_eq!(props.message_id(), meta.properties().message_id());
    }

    #[test]
    fn parent_and_joined_travel_to_the_next_stage_and_retries() {
        let parent = TaskMeta::submission(TaskId::new("P-1").unwrap(), NOW, None)
            .with_priority(Priority::new(7).unwrap());
        let child = parent.child(TaskId::new("P-1:3").unwrap(), NOW + 5, Some("00-t".into()));
        assert_eq!(child.parent.as_ref().map(TaskId::as_str), Some("P-1"));
        assert_eq!((child.attempt, child.priority.get()), (1, 7));
        assert_eq!(child.submitted_at_ms, Some(NOW + 5));
        let (back, _) = TaskMeta::read(&child.properties(), NOW).unwrap();
        assert_eq!(back, child);
        let next = back.next_stage(NOW + 10, None);
        assert_eq!(next.parent, child.parent);
        let joined = TaskMeta {
            joined: true,
            ..parent.clone()
        };
        let (back, _) = TaskMeta::read(&joined.retry(NOW, 10).properties(), NOW).unwrap();
        assert!(back.joined);
        assert!(back.next_stage(NOW, None).joined);
        let (back, _) = TaskMeta::read(&parent.properties(), NOW).unwrap();
        assert!(!back.joined && back.parent.is_none());
    }

    #[test]
    fn a_malformed_parent_is_ignored_and_said_why() {
        for (value, why) in [
            (AMQPValue::LongString("has space".into()), "not a task id"),
            (AMQPValue::LongString("".into()), "not a task id"),
            (AMQPValue::LongInt(5), "not text"),
            (
                AMQPValue::LongString("x".repeat(500).into()),
                "not a task id",
            ),
        ] {
            let props = BasicProperties::default().with_headers({
                let mut t = FieldTable::default();
                t.insert(h::PARENT.into(), value.clone());
                t
            });
            let (meta, _) = TaskMeta::read(&props, NOW).unwrap();
            assert_eq!(meta.parent, None, "{value:?}");
            let err = malformed_parent(&props).unwrap();
            assert!(err.contains(why), "{value:?}: {err}");
        }
        assert_eq!(malformed_parent(&BasicProperties::default()), None);
        let ok = TaskMeta::submission(TaskId::new("P").unwrap(), NOW, None).child(
            TaskId::new("P:0").unwrap(),
            NOW,
            None,
        );
        assert_eq!(malformed_parent(&ok.properties()), None);
    }

    #[test]
    fn joined_is_set_unless_the_header_says_no() {
        let read = |value: AMQPValue| {
            let mut t = FieldTable::default();
            t.insert(h::JOINED.into(), value);
            let props = BasicProperties::default().with_headers(t);
            TaskMeta::read(&props, NOW).unwrap().0.joined
        };
        for yes in [
            AMQPValue::Boolean(true),
            AMQPValue::LongString("true".into()),
            AMQPValue::LongString("1".into()),
            AMQPValue::LongInt(1),
            AMQPValue::ShortShortUInt(2),
        ] {
            assert!(read(yes.clone()), "{yes:?}");
        }
        for no in [
            AMQPValue::Boolean(false),
            AMQPValue::LongString("false".into()),
            AMQPValue::LongString(" 0 ".into()),
            AMQPValue::LongString("".into()),
            AMQPValue::LongInt(0),
            AMQPValue::Void,
        ] {
            assert!(!read(no.clone()), "{no:?}");
        }
    }
}

//! The AMQP form of a task message: everything but the payload, which is
//! opaque bytes and never re-encoded.

use guildhall_proto::headers::amqp as h;
use guildhall_proto::{InvalidId, TaskId};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

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
        }
    }

    /// The same task handed on to another stage (attempt 1 there), enqueued now.
    pub fn next_stage(&self, now_ms: u64, traceparent: Option<String>) -> Self {
        Self {
            id: self.id.clone(),
            attempt: 1,
            enqueued_at_ms: Some(now_ms),
            submitted_at_ms: self.submitted_at_ms,
            traceparent: traceparent.or_else(|| self.traceparent.clone()),
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
        let mut props = BasicProperties::default()
            .with_message_id(ShortString::from(self.id.as_str()))
            .with_delivery_mode(2)
            .with_content_type("application/octet-stream".into())
            .with_headers(headers);
        if let Some(t) = self.enqueued_at_ms {
            props = props.with_timestamp(t / 1000);
        }
        props
    }

    /// Reads a delivered message's metadata. A missing `message_id` gets a
    /// fresh id (producers outside Guildhall may not set one); an invalid one
    /// is an error, so the message can be dead-lettered with that reason.
    pub fn from_properties(props: &BasicProperties) -> Result<Self, TaskMetaError> {
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
        let enqueued_at_ms = get(h::ENQUEUED_AT).or_else(|| props.timestamp().map(|s| s * 1000));
        let traceparent = headers
            .and_then(|t| t.inner().get(h::TRACEPARENT))
            .and_then(value_str);
        Ok(Self {
            id,
            attempt,
            enqueued_at_ms,
            submitted_at_ms: get(h::SUBMITTED_AT),
            traceparent,
        })
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
        let retry = next.retry(5, 1000);
        assert_eq!(retry.enqueued_at_ms, Some(1005));
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
}

//! Dead letters: the message a failed task becomes in `<ns>.dead.<stage>`,
//! and what happens to a delivery that cannot be a task at all.
//!
//! # Reason headers within a frame
//!
//! A dead letter is the original message (payload and properties) with the
//! reason headers added: `x-guildhall-last-error`, `x-guildhall-error-class`,
//! `x-guildhall-dead-stage`, `x-guildhall-dead-by`. AMQP carries all the
//! properties of a message in one frame, and a frame over the connection's
//! `frame_max` makes the broker close the connection. A producer may have
//! filled its header table up to that limit, so before publishing,
//! [`dead_letter_properties`] measures the result and, if it would not fit,
//! drops the producer's headers (keeping the reasons), and if even that does
//! not fit, the other properties too but the `message_id` (a last resort:
//! every property at its longest and the longest reasons fit together in the
//! protocol's smallest frame, 4096 bytes).
//!
//! Two properties of the original are not carried over: `user_id`, which
//! the broker checks against the publishing connection's user (a producer's
//! own would make the broker close the agent's channel, and the agent's
//! link with it), and `expiration`, which would let the dead letter expire
//! from the dead-letter queue.
//!
//! # Deliveries that cannot be tasks
//!
//! A message on a stage queue whose `message_id` is not a valid task id
//! (not UTF-8: the patched AMQP parser hands its bytes over with U+FFFD in
//! place of what is not UTF-8; bad characters; too long) has no task id to
//! be reported under. The core ([`crate::core::settle::unreadable`]) and the
//! driver:
//!
//! 1. publishes it to the stage's dead-letter queue with the reason headers
//!    (class `invalid_message_id`) and waits for the confirm;
//! 2. acks it once that is confirmed; if the dead letter was refused
//!    (nacked, unroutable), rejects it **without requeue**: the stage queue
//!    dead-letters it itself (without the reason headers) or drops it. It
//!    is never requeued, so it cannot loop;
//! 3. emits `DeliveryRejected` (counted by the coordinator in
//!    `guildhall_deliveries_rejected_total{stage,reason}`), counts it in
//!    the agent, and logs one line with its delivery tag (at most 10 lines
//!    in 10 s: a producer may send any number of them).
//!
//! If the link is lost meanwhile, nothing can be acked or rejected: the
//! broker requeues the delivery with the dead channel and the next delivery
//! of it goes through the same steps. The connection and the agent's other
//! tasks are never affected.

use crate::ratelog::RateLimited;
use guildhall_proto::headers::amqp as h;
use guildhall_proto::{AgentId, DeliveryRejected, Stage};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use std::time::Duration;

/// Log lines about rejected deliveries: at most [`REJECTED_LOG_BURST`] per
/// this interval.
pub(crate) const REJECTED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// See [`REJECTED_LOG_INTERVAL`].
pub(crate) const REJECTED_LOG_BURST: u32 = 10;

/// Bytes of a content header frame besides the properties: frame type,
/// channel, size and end octet (8), class, weight and body size (12), and
/// the property flags (2), rounded up.
const HEADER_FRAME_OVERHEAD: usize = 32;

/// Why a task is dead-lettered, as its reason headers say.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reasons<'a> {
    /// `x-guildhall-last-error` (already truncated).
    pub error: &'a str,
    /// `x-guildhall-error-class`.
    pub class: &'a str,
    /// `x-guildhall-dead-stage`.
    pub stage: &'a Stage,
    /// `x-guildhall-dead-by`.
    pub agent: &'a AgentId,
}

/// What [`dead_letter_properties`] had to leave out to fit a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trimmed {
    /// Nothing: the original properties with the reasons added.
    Nothing,
    /// The producer's headers (this many), replaced by the reasons alone.
    Headers(usize),
    /// Every property but the `message_id` and the persistence.
    Properties,
}

/// The dead letter's properties: `original` with the reason headers, cut
/// down (see the module docs) so that they fit a frame of `frame_max`
/// bytes (0: no limit).
pub(crate) fn dead_letter_properties(
    original: &BasicProperties,
    reasons: Reasons<'_>,
    frame_max: u32,
) -> (BasicProperties, Trimmed) {
    let limit = match frame_max {
        0 => usize::MAX,
        n => n as usize,
    };
    let fits = |props: &BasicProperties| properties_size(props) + HEADER_FRAME_OVERHEAD <= limit;
    let original = &republishable(original);
    let mut headers = original.headers().clone().unwrap_or_default();
    let original_count = headers.inner().len();
    add_reasons(&mut headers, reasons);
    let full = original.clone().with_headers(headers);
    if fits(&full) {
        return (full, Trimmed::Nothing);
    }
    let mut headers = FieldTable::default();
    add_reasons(&mut headers, reasons);
    let lean = original.clone().with_headers(headers.clone());
    if fits(&lean) {
        return (lean, Trimmed::Headers(original_count));
    }
    let mut bare = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(id) = original.message_id() {
        bare = bare.with_message_id(id.clone());
    }
    (bare, Trimmed::Properties)
}

/// `original` without the properties a dead letter must not carry (see
/// the module docs): `user_id` and `expiration`.
pub(crate) fn republishable(original: &BasicProperties) -> BasicProperties {
    let mut props = BasicProperties::default();
    macro_rules! copy {
        ($($get:ident => $set:ident),* $(,)?) => {
            $(if let Some(v) = original.$get() {
                props = props.$set(v.clone());
            })*
        };
    }
    copy!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        headers => with_headers,
        delivery_mode => with_delivery_mode,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );
    props
}

fn add_reasons(headers: &mut FieldTable, reasons: Reasons<'_>) {
    for (key, value) in [
        (h::LAST_ERROR, reasons.error),
        (h::ERROR_CLASS, reasons.class),
        (h::DEAD_STAGE, reasons.stage.as_str()),
        (h::DEAD_BY, reasons.agent.as_str()),
    ] {
        headers.insert(key.into(), AMQPValue::LongString(LongString::from(value)));
    }
}

/// Encoded size of `props` (the property list of a content header), in
/// bytes: exact for what lapin writes, an upper bound otherwise.
pub(crate) fn properties_size(props: &BasicProperties) -> usize {
    let short = |s: &Option<ShortString>| s.as_ref().map_or(0, |s| 1 + s.as_str().len());
    short(props.content_type())
        + short(props.content_encoding())
        + props.headers().as_ref().map_or(0, table_size)
        + props.delivery_mode().map_or(0, |_| 1)
        + props.priority().map_or(0, |_| 1)
        + short(props.correlation_id())
        + short(props.reply_to())
        + short(props.expiration())
        + short(props.message_id())
        + props.timestamp().map_or(0, |_| 8)
        + short(props.kind())
        + short(props.user_id())
        + short(props.app_id())
        + short(props.cluster_id())
}

/// Encoded size of a field table: its length, then each name and value.
fn table_size(table: &FieldTable) -> usize {
    4 + table
        .inner()
        .iter()
        .map(|(name, value)| 1 + name.as_str().len() + 1 + value_size(value))
        .sum::<usize>()
}

/// Encoded size of a value, without its type octet.
fn value_size(value: &AMQPValue) -> usize {
    match value {
        AMQPValue::Void => 0,
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
        AMQPValue::FieldArray(a) => {
            4 + a
                .as_slice()
                .iter()
                .map(|v| 1 + value_size(v))
                .sum::<usize>()
        }
        AMQPValue::FieldTable(t) => table_size(t),
    }
}

/// Logs that a dead letter had to be cut down to fit a frame.
pub(crate) fn log_trimmed(trimmed: Trimmed, what: &str) {
    match trimmed {
        Trimmed::Nothing => {}
        Trimmed::Headers(n) => tracing::warn!(
            headers = n,
            "{what}: its headers would not fit a frame with the reason headers; dead-lettered without them"
        ),
        Trimmed::Properties => tracing::warn!(
            "{what}: its properties would not fit a frame with the reason headers; dead-lettered with its id and the reasons only"
        ),
    }
}

/// Logs a delivery that could not be a task (at most
/// [`REJECTED_LOG_BURST`] lines per [`REJECTED_LOG_INTERVAL`]: a producer
/// may send any number of them).
pub(crate) fn log_rejected(log: &RateLimited, rejected: &DeliveryRejected, delivery_tag: u64) {
    if let Some(held_back) = log.hit() {
        let outcome = if rejected.dead_lettered {
            "dead-lettered"
        } else {
            "rejected without requeue (its dead letter was refused)"
        };
        tracing::warn!(
            delivery_tag,
            stage = %rejected.stage,
            reason = rejected.reason.as_str(),
            more_since_last_line = held_back,
            "a delivery that cannot be a task was {outcome}: {}",
            rejected.detail
        );
    }
}

/// A fresh limiter for [`log_rejected`].
pub(crate) fn rejected_log() -> RateLimited {
    RateLimited::new(REJECTED_LOG_INTERVAL, REJECTED_LOG_BURST)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{ByteArray, DecimalValue, FieldArray};

    fn reasons<'a>(stage: &'a Stage, agent: &'a AgentId) -> Reasons<'a> {
        Reasons {
            error: "bad id",
            class: "invalid_message_id",
            stage,
            agent,
        }
    }

    /// What lapin writes for `props`, measured with the real encoder.
    fn encoded_size(props: &BasicProperties) -> usize {
        use lapin::protocol::basic::gen_properties;
        let mut buf = vec![0u8; 1 << 20];
        let (_, written) =
            cookie_factory::r#gen(gen_properties(props), std::io::Cursor::new(&mut buf[..]))
                .unwrap();
        written as usize - 2 // the property flags
    }

    #[test]
    fn sizes_match_the_encoder() {
        let mut inner = FieldTable::default();
        inner.insert("n".into(), AMQPValue::LongLongInt(1));
        let mut t = FieldTable::default();
        t.insert("a".into(), AMQPValue::Boolean(true));
        t.insert("b".into(), AMQPValue::ShortInt(-2));
        t.insert("c".into(), AMQPValue::LongUInt(3));
        t.insert("d".into(), AMQPValue::Double(4.0));
        t.insert(
            "e".into(),
            AMQPValue::DecimalValue(DecimalValue { scale: 1, value: 5 }),
        );
        t.insert("f".into(), AMQPValue::LongString("six".into()));
        t.insert(
            "g".into(),
            AMQPValue::ByteArray(ByteArray::from(vec![7u8; 7])),
        );
        t.insert(
            "h".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::Void,
                AMQPValue::Timestamp(8),
            ])),
        );
        t.insert("i".into(), AMQPValue::FieldTable(inner));
        t.insert("\u{fffd}(".into(), AMQPValue::ShortShortUInt(9));
        let props = BasicProperties::default()
            .with_message_id("\u{fffd}(".into())
            .with_content_type("application/octet-stream".into())
            .with_delivery_mode(2)
            .with_priority(1)
            .with_timestamp(1 << 62)
            .with_app_id("app".into())
            .with_headers(t);
        assert_eq!(properties_size(&props), encoded_size(&props));
        assert_eq!(properties_size(&BasicProperties::default()), 0);
    }

    #[test]
    fn reasons_are_added_to_the_original_properties_when_they_fit() {
        let (stage, agent) = ("p1".parse().unwrap(), "a-1".parse().unwrap());
        let mut t = FieldTable::default();
        t.insert("mine".into(), AMQPValue::LongString("kept".into()));
        let original = BasicProperties::default()
            .with_message_id("T-1".into())
            .with_headers(t);
        let (props, trimmed) = dead_letter_properties(&original, reasons(&stage, &agent), 131_072);
        assert_eq!(trimmed, Trimmed::Nothing);
        let headers = props.headers().clone().unwrap();
        for key in [
            "mine",
            h::LAST_ERROR,
            h::ERROR_CLASS,
            h::DEAD_STAGE,
            h::DEAD_BY,
        ] {
            assert!(headers.inner().contains_key(key), "{key}");
        }
        assert_eq!(props.message_id().as_ref().unwrap().as_str(), "T-1");
    }

    #[test]
    fn the_user_id_and_the_expiration_are_not_carried_over() {
        let (stage, agent) = ("p1".parse().unwrap(), "a-1".parse().unwrap());
        let original = BasicProperties::default()
            .with_message_id("T-1".into())
            .with_user_id("someone-else".into())
            .with_expiration("1".into())
            .with_content_type("text/plain".into())
            .with_correlation_id("c".into())
            .with_reply_to("r".into())
            .with_content_encoding("gzip".into())
            .with_delivery_mode(2)
            .with_priority(3)
            .with_timestamp(1_700_000_000)
            .with_type("t".into())
            .with_app_id("app".into())
            .with_cluster_id("cl".into());
        let (props, trimmed) = dead_letter_properties(&original, reasons(&stage, &agent), 131_072);
        assert_eq!(trimmed, Trimmed::Nothing);
        assert_eq!(props.user_id(), &None);
        assert_eq!(props.expiration(), &None);
        let mut expected = original.clone();
        expected = expected.with_headers(props.headers().clone().unwrap());
        // Everything else as it was.
        let same = |p: &BasicProperties| {
            (
                p.content_type().clone(),
                p.content_encoding().clone(),
                *p.delivery_mode(),
                *p.priority(),
                p.correlation_id().clone(),
                p.reply_to().clone(),
                p.message_id().clone(),
                *p.timestamp(),
                p.kind().clone(),
                p.app_id().clone(),
                p.cluster_id().clone(),
            )
        };
        assert_eq!(same(&props), same(&expected));
    }

    #[test]
    fn a_header_table_that_fills_the_frame_is_dropped_for_the_reasons() {
        let (stage, agent) = ("p1".parse().unwrap(), "a-1".parse().unwrap());
        let frame_max = 131_072;
        let mut t = FieldTable::default();
        // Fits a frame on its own (the broker delivered it), not with the reasons.
        t.insert(
            "big".into(),
            AMQPValue::LongString(vec![b'x'; frame_max - 64].into()),
        );
        let original = BasicProperties::default()
            .with_message_id("T-1".into())
            .with_headers(t);
        assert!(properties_size(&original) + HEADER_FRAME_OVERHEAD <= frame_max);
        let (props, trimmed) =
            dead_letter_properties(&original, reasons(&stage, &agent), frame_max as u32);
        assert_eq!(trimmed, Trimmed::Headers(1));
        assert!(properties_size(&props) + HEADER_FRAME_OVERHEAD <= frame_max);
        let headers = props.headers().clone().unwrap();
        assert!(!headers.inner().contains_key("big"));
        assert!(headers.inner().contains_key(h::LAST_ERROR));
        assert_eq!(props.message_id().as_ref().unwrap().as_str(), "T-1");
    }

    #[test]
    fn at_worst_only_the_id_and_the_reasons_stay() {
        let stage: Stage = "s".repeat(Stage::MAX_LEN).parse().unwrap();
        let agent: AgentId = "a".repeat(AgentId::MAX_LEN).parse().unwrap();
        let long = "x".repeat(255);
        let error = "e".repeat(1024);
        let original = BasicProperties::default()
            .with_message_id(long.as_str().into())
            .with_content_type(long.as_str().into())
            .with_content_encoding(long.as_str().into())
            .with_correlation_id(long.as_str().into())
            .with_reply_to(long.as_str().into())
            .with_expiration(long.as_str().into())
            .with_type(long.as_str().into())
            .with_user_id(long.as_str().into())
            .with_app_id(long.as_str().into())
            .with_cluster_id(long.as_str().into());
        let reasons = Reasons {
            error: &error,
            ..reasons(&stage, &agent)
        };
        // Every property at its longest fits the protocol's smallest frame
        // (4096) with the longest reasons; a smaller limit shows the last resort.
        let (_, trimmed) = dead_letter_properties(&original, reasons, 4096);
        assert_eq!(trimmed, Trimmed::Nothing);
        let (props, trimmed) = dead_letter_properties(&original, reasons, 3000);
        assert_eq!(trimmed, Trimmed::Properties);
        assert!(properties_size(&props) + HEADER_FRAME_OVERHEAD <= 3000);
        assert_eq!(props.message_id().as_ref().unwrap().as_str(), long);
        assert_eq!(props.content_type(), &None);
        assert_eq!(props.delivery_mode(), &Some(2));
    }
}

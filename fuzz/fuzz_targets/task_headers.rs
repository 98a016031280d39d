//! What an agent reads off every delivery, from the raw bytes on up: the
//! AMQP basic properties (amq-protocol's own parser, as lapin runs it on a
//! content header frame, with the workspace's patched `amq-protocol-types`:
//! short strings that are not UTF-8 are read lossily), then `TaskMeta::read`
//! (at a fixed "now", so a run is repeatable), `header_u64` / `header_str`
//! on every header, and the `traceparent` the agent continues.
//!
//! Properties:
//!
//! - nothing panics, whatever the bytes;
//! - properties that parse write out and parse back to the same bytes
//!   (compared as bytes: a `NaN` float header is not `==` to itself), so a
//!   lossily read short string stays within the 255-byte limit, and a
//!   header nested past the parser's depth limit reads as empty rather
//!   than overflowing the stack (both patches in vendor/README.md);
//! - a time read as absent is one `plausible_time` refuses, and is reported;
//! - the metadata an agent writes for a task it read (the same attempt,
//!   the next stage, a retry) travels through the wire format and reads back
//!   as written (a time `TaskMeta::properties` clamps to `i64::MAX` ms, or
//!   that is implausible, reads back as absent);
//! - a `traceparent` that parses prints as one that parses the same;
//! - a parent header (issue 19) is kept only if it is a valid task id (else
//!   `malformed_parent` says why), and a child the agent makes of the task
//!   travels as written too.

#![no_main]

use guildhall_broker::task::{
    TaskMeta, header_str, header_u64, malformed_parent, plausible_time,
};
use guildhall_proto::trace::TraceParent;
use guildhall_proto::headers::amqp as h;
use lapin::BasicProperties;
use lapin::protocol::basic::{gen_properties, parse_properties};
use libfuzzer_sys::fuzz_target;

/// The properties as the wire carries them (the content header's tail).
fn write(props: &BasicProperties) -> Vec<u8> {
    cookie_factory::gen_simple(gen_properties(props), Vec::new())
        .expect("parsed properties write out")
}

/// Parses what [`write`] wrote: all of it, and without error.
fn read(bytes: &[u8]) -> BasicProperties {
    match parse_properties(bytes) {
        Ok(([], props)) => props,
        Ok((rest, _)) => panic!("{} bytes left after re-reading properties", rest.len()),
        Err(e) => panic!("written properties do not parse: {e:?}"),
    }
}

/// The reader's clock for the whole run (2027-01-15).
const NOW_MS: u64 = 1_800_000_000_000;

/// `meta` as the next reader gets it: what it reads back is `meta`, with
/// times clamped to what the header's signed 64-bit integer holds, and
/// those that are then implausible absent.
fn check_travels(meta: &TaskMeta) {
    let (back, _) = TaskMeta::read(&read(&write(&meta.properties())), NOW_MS)
        .expect("metadata the agent wrote reads back");
    let clamp = |t: Option<u64>| {
        t.map(|t| t.min(i64::MAX as u64))
            .filter(|t| plausible_time(*t, NOW_MS))
    };
    let expected = TaskMeta {
        enqueued_at_ms: clamp(meta.enqueued_at_ms),
        submitted_at_ms: clamp(meta.submitted_at_ms),
        ..meta.clone()
    };
    assert_eq!(back, expected);
}

fuzz_target!(|data: &[u8]| {
    let Ok((_rest, props)) = parse_properties(data) else {
        return;
    };
    let bytes = write(&props);
    assert_eq!(write(&read(&bytes)), bytes, "properties do not round-trip");

    if let Some(headers) = props.headers() {
        for key in headers.inner().keys() {
            let _ = header_u64(headers, key.as_str());
            let _ = header_str(headers, key.as_str());
        }
    }

    let Ok((meta, dropped)) = TaskMeta::read(&props, NOW_MS) else {
        // Only an invalid id is refused (a missing one gets a fresh id).
        assert!(props.message_id().is_some());
        return;
    };
    assert!(meta.attempt >= 1);
    for time in [meta.enqueued_at_ms, meta.submitted_at_ms]
        .into_iter()
        .flatten()
    {
        assert!(plausible_time(time, NOW_MS), "{time} kept");
    }
    for time in &dropped {
        assert!(!plausible_time(time.value_ms, NOW_MS), "{time:?} dropped");
    }
    if let Some(parent) = meta.traceparent.as_deref().and_then(TraceParent::parse) {
        assert_eq!(TraceParent::parse(&parent.to_string()), Some(parent));
    }
    assert_eq!(
        meta.parent.is_some(),
        props
            .headers()
            .as_ref()
            .is_some_and(|t| t.inner().contains_key(h::PARENT))
            && malformed_parent(&props).is_none()
    );
    check_travels(&meta);
    if let Ok(id) = guildhall_proto::flow::child_id(&meta.id, 9_999) {
        check_travels(&meta.child(id, NOW_MS, None));
    }
    check_travels(&meta.next_stage(NOW_MS, None));
    check_travels(&meta.retry(NOW_MS, 1000));
    // A retry whose delay ends past the clamp: written as i64::MAX ms,
    // read back as absent (implausible), not as a wrapped time.
    check_travels(&meta.retry(u64::MAX - 5, 1000));
});

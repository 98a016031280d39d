//! `guildhall_agent::handoff::fanout`: how an agent reads a worker's
//! fan-out (issue 19): an exec worker's stdout (`from_exec`: a
//! `#guildhall-fan-out` marker line, then child lines) and an HTTP
//! worker's ndjson body (`parse_children`, the reader both share).
//!
//! The input is the worker's output as it is.
//!
//! Properties: nothing panics; `from_exec` answers exactly for output that
//! starts with the marker followed by the end, a line end or a blank; its
//! answer is a fan-out (at most `MAX_CHILDREN` children, the same as
//! `parse_children` reads after the marker line) or a permanent failure of
//! class `invalid_fan_out` with a bounded error; no child's payload is
//! longer than the input.

#![no_main]

use guildhall_agent::handoff::Outcome;
use guildhall_agent::handoff::fanout::{INVALID_FAN_OUT_CLASS, from_exec, parse_children};
use guildhall_proto::flow::MAX_CHILDREN;
use guildhall_proto::headers::FAN_OUT_LINE;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let children = parse_children(data, 1);
    if let Ok(children) = &children {
        assert!(children.len() <= MAX_CHILDREN as usize);
        for child in children {
            assert!(child.payload.len() <= data.len());
        }
    }
    let marked = data.strip_prefix(FAN_OUT_LINE.as_bytes());
    let is_marker = marked.is_some_and(|rest| rest.first().is_none_or(|b| b.is_ascii_whitespace()));
    match from_exec(data) {
        None => assert!(!is_marker),
        Some(outcome) => {
            assert!(is_marker);
            match outcome {
                Outcome::FanOut(f) => {
                    assert!(f.children.len() <= MAX_CHILDREN as usize);
                    let rest = marked.unwrap_or_default();
                    let body = rest
                        .iter()
                        .position(|b| *b == b'\n')
                        .map_or(&[][..], |nl| &rest[nl + 1..]);
                    assert_eq!(parse_children(body, 2).ok(), Some(f.children));
                }
                Outcome::Failure(failure) => {
                    assert_eq!(failure.class, INVALID_FAN_OUT_CLASS);
                    assert!(!failure.retryable && !failure.timed_out);
                    assert!(failure.error.len() < 1024, "{}", failure.error);
                }
                Outcome::Success { .. } => panic!("a marked output is a fan-out or refused"),
            }
        }
    }
});

//! `guildhall_agent::handoff::http::map_response_with_priority`: how an
//! agent reads an HTTP worker's answer (status, `x-guildhall-next-stage`,
//! `x-guildhall-error-class`, `x-guildhall-priority`, body) into an outcome.
//!
//! Input layout (so seeds are easy to write by hand, see `examples/seeds.rs`):
//! `status: u16 LE | next: field | class: field | priority: field | body: rest`, where a field
//! is a length byte then that many bytes, and the length 255 means "header
//! absent". A header is read lossily, as the agent reads one (bytes that are
//! not UTF-8 become U+FFFD, which no stage name or class accepts).
//!
//! Properties: it never panics; a 2xx is a success carrying the body and
//! the priority it names, unless that priority is not 0-9 (a permanent
//! failure, class `invalid_priority`) or it names a next stage that is not a
//! valid stage name (a permanent failure, class `invalid_next_stage`); any other status is a failure whose class is a valid class,
//! retryable exactly for 408, 429 and 5xx, and whose error quotes a bounded
//! part of the body.

#![no_main]

use guildhall_agent::handoff::http::{INVALID_PRIORITY_CLASS, map_response_with_priority};
use guildhall_agent::handoff::{NextStage, Outcome, valid_error_class};
use guildhall_proto::Priority;
use libfuzzer_sys::fuzz_target;

/// A field of the input: `None` for an absent header.
fn field(data: &mut &[u8]) -> Option<Option<String>> {
    let (&len, rest) = data.split_first()?;
    if len == 255 {
        *data = rest;
        return Some(None);
    }
    let (value, rest) = rest.split_at_checked(len.into())?;
    *data = rest;
    Some(Some(String::from_utf8_lossy(value).into_owned()))
}

fuzz_target!(|data: &[u8]| {
    let Some((status, mut rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let status = u16::from_le_bytes(*status);
    let (Some(next), Some(class), Some(priority)) =
        (field(&mut rest), field(&mut rest), field(&mut rest))
    else {
        return;
    };
    let body = rest.to_vec();
    let named_priority = priority.as_deref().map(str::parse::<Priority>);
    match map_response_with_priority(
        status,
        next.as_deref(),
        class.as_deref(),
        priority.as_deref(),
        body.clone(),
    ) {
        Outcome::Success {
            payload,
            next: to,
            priority: got,
        } => {
            assert!((200..300).contains(&status));
            assert_eq!(payload, body);
            match named_priority {
                None => assert_eq!(got, None),
                Some(Ok(p)) => assert_eq!(got, Some(p)),
                Some(Err(_)) => panic!("an invalid priority made a success"),
            }
            let named = next.as_deref().map(str::trim).unwrap_or("");
            match to {
                NextStage::Default => assert_eq!(named, ""),
                NextStage::End => assert_eq!(named, "-"),
                NextStage::Stage(stage) => assert_eq!(stage.as_str(), named),
            }
        }
        Outcome::FanOut(_) => panic!("a fan-out without its header"),
        Outcome::Failure(failure) => {
            assert!(valid_error_class(&failure.class), "{:?}", failure.class);
            assert!(!failure.timed_out);
            if (200..300).contains(&status) {
                if matches!(named_priority, Some(Err(_))) {
                    assert_eq!(failure.class, INVALID_PRIORITY_CLASS);
                } else {
                    assert_eq!(failure.class, "invalid_next_stage");
                }
                assert!(!failure.retryable);
            } else {
                let retryable = status >= 500 || status == 408 || status == 429;
                assert_eq!(failure.retryable, retryable);
                // `HTTP <status>: ` and at most 1 KiB of body, each byte
                // that is not UTF-8 becoming a 3-byte U+FFFD.
                assert!(
                    failure.error.len() <= 12 + 3 * 1024,
                    "{}",
                    failure.error.len()
                );
            }
        }
    }
});

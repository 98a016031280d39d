//! A join's payload: its children's results, in child order, as JSON.
//!
//! ```json
//! {"parent":"P","children":[
//!   {"id":"P:0","index":0,"status":"succeeded","result":{"any":"json"},"result_bytes":14},
//!   {"id":"P:1","index":1,"status":"succeeded","result_text":"not json","result_bytes":8},
//!   {"id":"P:2","index":2,"status":"dead_lettered","error":"..."}]}
//! ```
//!
//! A result that is JSON is embedded as it is; UTF-8 text that is not JSON
//! is `result_text`; other bytes are `result_base64`. A result that was
//! not carried (over `flow::MAX_INLINE_RESULT`), or that would take the
//! payload past `flow::MAX_JOIN_PAYLOAD`, is left out with
//! `"result_omitted":true` and its size. Deterministic: the same join gives
//! the same bytes.

use super::{Join, Slot};
use base64::Engine;
use guildhall_proto::TaskId;
use guildhall_proto::flow::MAX_JOIN_PAYLOAD;

/// The payload the parent gets at its join stage (or that its dead letter
/// carries).
pub(super) fn payload(parent: &TaskId, j: &Join) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + j.slots.len() * 64);
    out.extend_from_slice(b"{\"parent\":");
    push_str(&mut out, parent.as_str());
    out.extend_from_slice(b",\"children\":[");
    for i in 0..j.children {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"id\":");
        push_str(&mut out, &format!("{parent}:{i}"));
        out.extend_from_slice(format!(",\"index\":{i},\"status\":").as_bytes());
        match j.slots.get(&i) {
            None => push_str(&mut out, "missing"),
            Some(Slot::Failed { status, error }) => {
                push_str(&mut out, status.as_str());
                out.extend_from_slice(b",\"error\":");
                push_str(&mut out, error);
            }
            Some(Slot::Succeeded { result, bytes }) => {
                push_str(&mut out, "succeeded");
                match result {
                    Some(r) if out.len() + r.len() + 64 <= MAX_JOIN_PAYLOAD => {
                        push_result(&mut out, r)
                    }
                    _ => out.extend_from_slice(b",\"result_omitted\":true"),
                }
                out.extend_from_slice(format!(",\"result_bytes\":{bytes}").as_bytes());
            }
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

fn push_result(out: &mut Vec<u8>, r: &[u8]) {
    let trimmed = r.trim_ascii();
    if !trimmed.is_empty() && serde_json::from_slice::<serde::de::IgnoredAny>(trimmed).is_ok() {
        out.extend_from_slice(b",\"result\":");
        out.extend_from_slice(trimmed);
    } else if let Ok(text) = std::str::from_utf8(r) {
        out.extend_from_slice(b",\"result_text\":");
        push_str(out, text);
    } else {
        out.extend_from_slice(b",\"result_base64\":");
        push_str(out, &base64::engine::general_purpose::STANDARD.encode(r));
    }
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    // Serializing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::tasks::TaskStatus;
    use std::sync::Arc;

    #[test]
    fn results_are_embedded_as_json_text_or_base64_in_child_order() {
        let mut j = Join::new(0);
        j.children = 4;
        let ok = |b: &[u8]| Slot::Succeeded {
            result: Some(Arc::from(b)),
            bytes: b.len() as u64,
        };
        j.slots.insert(2, ok(&[0xff, 0x00]));
        j.slots.insert(0, ok(b" {\"n\": 1} "));
        j.slots.insert(1, ok(b"plain \"text\""));
        j.slots.insert(
            3,
            Slot::Failed {
                status: TaskStatus::DeadLettered,
                error: "boom".into(),
            },
        );
        let p = payload(&TaskId::new("P").unwrap(), &j);
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(v["parent"], "P");
        let c = v["children"].as_array().unwrap();
        assert_eq!(c.len(), 4);
        assert_eq!(c[0]["result"]["n"], 1);
        assert_eq!(c[0]["id"], "P:0");
        assert_eq!(c[1]["result_text"], "plain \"text\"");
        assert_eq!(c[2]["result_base64"], "/wA=");
        assert_eq!(c[3]["status"], "dead_lettered");
        assert_eq!(c[3]["error"], "boom");
    }

    #[test]
    fn results_not_carried_are_marked_omitted_with_their_size() {
        let mut j = Join::new(0);
        j.children = 1;
        j.slots.insert(
            0,
            Slot::Succeeded {
                result: None,
                bytes: 1 << 20,
            },
        );
        let v: serde_json::Value =
            serde_json::from_slice(&payload(&TaskId::new("P").unwrap(), &j)).unwrap();
        assert_eq!(v["children"][0]["result_omitted"], true);
        assert_eq!(v["children"][0]["result_bytes"], 1 << 20);
    }
}

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
//! is `result_text`; other bytes are `result_base64`. A result over
//! `flow::MAX_INLINE_RESULT` was stored by its agent in the results stream;
//! its entry refers to it:
//!
//! ```json
//! {"id":"P:3","index":3,"status":"succeeded","result_bytes":1048576,
//!  "result_ref":{"stream":"<ns>.results","message_id":"P:3","sha256":"<hex>",
//!                "url":"/api/results/P:3?sha256=<hex>"}}
//! ```
//!
//! (`url` is the coordinator API's route that returns the bytes; a reader
//! of the stream finds the message by its id and checks the digest). An
//! inline result that would take the payload past `flow::MAX_JOIN_PAYLOAD`,
//! or one a child reported without either, is left out with
//! `"result_omitted":true` and its size. Deterministic: the same join gives
//! the same bytes.

use super::{Join, Slot};
use base64::Engine;
use guildhall_proto::TaskId;
use guildhall_proto::flow::{self, MAX_JOIN_PAYLOAD};

/// The payload the parent gets at its join stage (or that its dead letter
/// carries).
/// `results_stream` is the stream named in references to stored results.
pub(super) fn payload(parent: &TaskId, j: &Join, results_stream: &str) -> Vec<u8> {
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
            Some(Slot::Succeeded {
                result,
                bytes,
                stored,
            }) => {
                push_str(&mut out, "succeeded");
                match (result, stored) {
                    (Some(r), _) if out.len() + r.len() + 64 <= MAX_JOIN_PAYLOAD => {
                        push_result(&mut out, r)
                    }
                    (None, Some(digest)) => match TaskId::new(format!("{parent}:{i}")) {
                        Ok(child) => push_ref(&mut out, results_stream, &child, digest),
                        Err(_) => out.extend_from_slice(b",\"result_omitted\":true"),
                    },
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

/// A stored result's reference (see the module docs).
fn push_ref(out: &mut Vec<u8>, stream: &str, child: &TaskId, digest: &[u8; 32]) {
    let hex = flow::digest_hex(digest);
    out.extend_from_slice(b",\"result_ref\":{\"stream\":");
    push_str(out, stream);
    out.extend_from_slice(b",\"message_id\":");
    push_str(out, child.as_str());
    out.extend_from_slice(b",\"sha256\":");
    push_str(out, &hex);
    out.extend_from_slice(b",\"url\":");
    push_str(out, &flow::result_url(child, digest));
    out.push(b'}');
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
            stored: None,
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
        let p = payload(&TaskId::new("P").unwrap(), &j, "ns.results");
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
                stored: None,
            },
        );
        let v: serde_json::Value =
            serde_json::from_slice(&payload(&TaskId::new("P").unwrap(), &j, "ns.results")).unwrap();
        assert_eq!(v["children"][0]["result_omitted"], true);
        assert_eq!(v["children"][0]["result_bytes"], 1 << 20);
        assert!(v["children"][0].get("result_ref").is_none());
    }

    #[test]
    fn stored_results_are_referred_to_by_stream_id_digest_and_url() {
        let mut j = Join::new(0);
        j.children = 2;
        let digest = [0xab; 32];
        j.slots.insert(
            1,
            Slot::Succeeded {
                result: None,
                bytes: 1 << 20,
                stored: Some(digest),
            },
        );
        j.slots.insert(
            0,
            Slot::Succeeded {
                result: Some(Arc::from(&b"7"[..])),
                bytes: 1,
                stored: None,
            },
        );
        let p = payload(&TaskId::new("P").unwrap(), &j, "ns.results");
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        let c = &v["children"];
        assert_eq!(c[0]["result"], 7);
        assert!(c[0].get("result_ref").is_none());
        let r = &c[1]["result_ref"];
        let hex = "ab".repeat(32);
        assert_eq!(r["stream"], "ns.results");
        assert_eq!(r["message_id"], "P:1");
        assert_eq!(r["sha256"], hex.as_str());
        assert_eq!(r["url"], format!("/api/results/P:1?sha256={hex}"));
        assert_eq!(c[1]["result_bytes"], 1 << 20);
        assert!(c[1].get("result_omitted").is_none());
    }

    #[test]
    fn inline_results_past_the_join_limit_are_omitted_in_child_order() {
        let mut j = Join::new(0);
        j.children = 3;
        let mut big = vec![b'x'; MAX_JOIN_PAYLOAD / 2];
        big[0] = b'"';
        *big.last_mut().unwrap() = b'"';
        for i in 0..3 {
            j.slots.insert(
                i,
                Slot::Succeeded {
                    result: Some(Arc::from(&big[..])),
                    bytes: big.len() as u64,
                    stored: None,
                },
            );
        }
        let p = payload(&TaskId::new("P").unwrap(), &j, "ns.results");
        assert!(p.len() <= MAX_JOIN_PAYLOAD);
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        let c = &v["children"];
        assert!(c[0].get("result").is_some());
        assert_eq!(c[1]["result_omitted"], true);
        assert_eq!(c[2]["result_omitted"], true);
    }
}

//! Fan-out (issue 19): a worker's success that lists child tasks instead of
//! one result. One reader of the child lines, shared by both worker modes:
//!
//! - **HTTP**: a 2xx with `x-guildhall-fan-out: ndjson` and `Content-Type:
//!   application/x-ndjson`; `x-guildhall-join: STAGE` (`-` for none; absent:
//!   the agent's `--join`), `x-guildhall-on-child-failure: fail|continue`
//!   (default `fail`), and `x-guildhall-next-stage` as the stage of children
//!   that name none ([`from_http`]).
//! - **exec**: stdout's first line is `#guildhall-fan-out`, optionally
//!   followed by ` join=STAGE` and ` on-child-failure=fail|continue`
//!   ([`from_exec`]).
//!
//! Each further line is one child ([`parse_line`]): a JSON object with
//! `payload` (any JSON value: a string is the payload's text, anything else
//! its compact JSON, as written: keys keep their order) or `payload_base64`
//! (standard base64, padded or not), and optionally `stage` (the child's
//! first stage; `null` is none). Other fields are refused (a typo such as
//! `stgae` must not send a child to the default stage). Empty lines are
//! ignored.
//!
//! Whatever is wrong with a fan-out answer is a permanent failure of class
//! [`INVALID_FAN_OUT_CLASS`] whose error says why (for a child line, its
//! line number): the task is dead-lettered with it. What depends on the
//! agent (its `--max-children`, its `--join`, its default next stage, which
//! stages exist, whether the task already fanned out) is decided by the
//! settle table ([`crate::core::settle`]); here only the answer itself is
//! read, and at most [`MAX_CHILDREN`] children are kept.

use super::{Failure, NextStage, Outcome};
use base64::Engine;
use guildhall_proto::Stage;
use guildhall_proto::flow::{ChildPolicy, MAX_CHILDREN};
use guildhall_proto::headers::{self, END_OF_PIPELINE, FAN_OUT_LINE, http as h};
use serde_json::value::RawValue;
use std::collections::BTreeMap;

/// The error class of a fan-out the agent refuses (dead-lettered).
pub const INVALID_FAN_OUT_CLASS: &str = "invalid_fan_out";

/// Longest part of a worker-written value quoted in an error.
const QUOTED: usize = 40;

/// One child task a worker listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Child {
    /// Its payload.
    pub payload: Vec<u8>,
    /// Its first stage, if the line named one (else the fan-out's next
    /// stage, else the agent's `--next`).
    pub stage: Option<Stage>,
}

/// Where the parent continues once every child has finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Join {
    /// The agent's `--join` (or none if it has none).
    Default,
    /// This stage.
    Stage(Stage),
    /// None (`-`): the parent is finished when its children are.
    None,
}

/// A worker's fan-out, as it answered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FanOut {
    /// The children, in line order (child `i` gets id `<parent>:<i>`).
    pub children: Vec<Child>,
    /// The stage of children whose line names none
    /// (`x-guildhall-next-stage`; an exec worker cannot name one).
    pub next: NextStage,
    /// The join.
    pub join: Join,
    /// What a dead-lettered or cancelled child does to the join.
    pub on_child_failure: ChildPolicy,
}

/// A fan-out refused: the permanent failure, class `invalid_fan_out`.
pub fn invalid(error: impl Into<String>) -> Outcome {
    Outcome::Failure(Failure::permanent(INVALID_FAN_OUT_CLASS, error))
}

/// `value` cut to [`QUOTED`] characters, for an error.
fn quoted(value: &str) -> String {
    let cut: String = value.chars().take(QUOTED).collect();
    if cut.len() < value.len() {
        format!("{cut:?}...")
    } else {
        format!("{cut:?}")
    }
}

/// Reads one child line (a JSON object, see the module docs).
pub fn parse_line(line: &[u8]) -> Result<Child, String> {
    let text = std::str::from_utf8(line).map_err(|_| "not UTF-8".to_owned())?;
    let fields: BTreeMap<String, &RawValue> = serde_json::from_str(text).map_err(|e| {
        if text.trim_start().starts_with('{') {
            format!("not a JSON object: {e}")
        } else {
            "not a JSON object".to_owned()
        }
    })?;
    let mut payload = None;
    let mut stage = None;
    for (name, value) in &fields {
        match name.as_str() {
            "payload" => {
                let raw = value.get();
                payload = Some(if raw.starts_with('"') {
                    serde_json::from_str::<String>(raw)
                        .map_err(|e| format!("payload: {e}"))?
                        .into_bytes()
                } else {
                    compact(raw)
                });
            }
            "payload_base64" => {
                let text: String = serde_json::from_str(value.get())
                    .map_err(|_| "payload_base64 is not a string".to_owned())?;
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(text.trim())
                    .or_else(|_| {
                        base64::engine::general_purpose::STANDARD_NO_PAD.decode(text.trim())
                    })
                    .map_err(|e| format!("payload_base64 is not base64: {e}"))?;
                payload = Some(decoded);
            }
            "stage" => {
                let name: Option<String> = serde_json::from_str(value.get())
                    .map_err(|_| "stage is not a string".to_owned())?;
                stage = match name {
                    None => None,
                    Some(name) => Some(
                        Stage::new(name.as_str())
                            .map_err(|e| format!("stage {}: {e}", quoted(&name)))?,
                    ),
                };
            }
            other => return Err(format!("unknown field {}", quoted(other))),
        }
    }
    if fields.contains_key("payload") && fields.contains_key("payload_base64") {
        return Err("both payload and payload_base64".to_owned());
    }
    let payload = payload.ok_or_else(|| "no payload (or payload_base64)".to_owned())?;
    Ok(Child { payload, stage })
}

/// JSON text without the whitespace between its tokens (the text is valid
/// JSON: strings are copied as they are, escapes included).
fn compact(json: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for b in json.bytes() {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            in_string = b == b'"';
            out.push(b);
        }
    }
    out
}

/// Reads the child lines of `body`, the first being line `first_line` of
/// the answer (for errors). Empty lines are skipped; more than
/// [`MAX_CHILDREN`] children is an error (reading stops there).
pub fn parse_children(body: &[u8], first_line: usize) -> Result<Vec<Child>, String> {
    let mut children = Vec::new();
    for (i, line) in body.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if children.len() == MAX_CHILDREN as usize {
            return Err(format!("more than {MAX_CHILDREN} children"));
        }
        let child = parse_line(line).map_err(|e| format!("line {}: {e}", first_line + i))?;
        children.push(child);
    }
    Ok(children)
}

/// Reads a join header or marker value: empty for the default, `-` for none.
pub fn parse_join(value: &str) -> Result<Join, String> {
    match value.trim() {
        "" => Ok(Join::Default),
        END_OF_PIPELINE => Ok(Join::None),
        name => Stage::new(name)
            .map(Join::Stage)
            .map_err(|e| format!("join stage {}: {e}", quoted(name))),
    }
}

/// Reads an on-child-failure value (`fail`, `continue`).
pub fn parse_policy(value: &str) -> Result<ChildPolicy, String> {
    ChildPolicy::parse(value).ok_or_else(|| {
        format!(
            "on-child-failure {} is neither `fail` nor `continue`",
            quoted(value.trim())
        )
    })
}

/// The outcome of a 2xx answer with `x-guildhall-fan-out` (`fan_out`), its
/// `Content-Type`, `x-guildhall-join`, `x-guildhall-on-child-failure` and
/// `x-guildhall-next-stage` headers and body.
pub fn from_http(
    fan_out: &str,
    content_type: Option<&str>,
    join: Option<&str>,
    on_child_failure: Option<&str>,
    next: NextStage,
    body: &[u8],
) -> Outcome {
    if !fan_out.trim().eq_ignore_ascii_case(headers::FAN_OUT_NDJSON) {
        return invalid(format!(
            "worker answered {}: {}, but only `{}` is understood",
            h::FAN_OUT,
            quoted(fan_out),
            headers::FAN_OUT_NDJSON
        ));
    }
    let media = content_type
        .and_then(|c| c.split(';').next())
        .map(str::trim)
        .unwrap_or("");
    if !media.eq_ignore_ascii_case(headers::NDJSON_CONTENT_TYPE) {
        return invalid(format!(
            "a fan-out's Content-Type must be {}, not {}",
            headers::NDJSON_CONTENT_TYPE,
            quoted(media)
        ));
    }
    let join = match join.map(parse_join).transpose() {
        Ok(join) => join.unwrap_or(Join::Default),
        Err(e) => return invalid(format!("worker answered {}: {e}", h::JOIN)),
    };
    let on_child_failure = match on_child_failure.map(parse_policy).transpose() {
        Ok(policy) => policy.unwrap_or_default(),
        Err(e) => return invalid(format!("worker answered {}: {e}", h::ON_CHILD_FAILURE)),
    };
    match parse_children(body, 1) {
        Ok(children) => Outcome::FanOut(FanOut {
            children,
            next,
            join,
            on_child_failure,
        }),
        Err(e) => invalid(format!("fan-out {e}")),
    }
}

/// The outcome of an exec worker's stdout after exit 0, if it is a fan-out
/// (its first line is [`FAN_OUT_LINE`]); `None` for an ordinary result.
pub fn from_exec(stdout: &[u8]) -> Option<Outcome> {
    let rest = stdout.strip_prefix(FAN_OUT_LINE.as_bytes())?;
    let (marker, body) = match rest.iter().position(|b| *b == b'\n') {
        Some(nl) => (&rest[..nl], &rest[nl + 1..]),
        None => (rest, &[][..]),
    };
    let marker = marker.strip_suffix(b"\r").unwrap_or(marker);
    if marker.first().is_some_and(|b| !b.is_ascii_whitespace()) {
        return None; // `#guildhall-fan-outs...`: not the marker
    }
    let Ok(marker) = std::str::from_utf8(marker) else {
        return Some(invalid(format!("the {FAN_OUT_LINE} line is not UTF-8")));
    };
    let (mut join, mut on_child_failure) = (Join::Default, ChildPolicy::default());
    for word in marker.split_whitespace() {
        let parsed = match word.split_once('=') {
            Some(("join", v)) => parse_join(v).map(|j| join = j),
            Some(("on-child-failure", v)) => parse_policy(v).map(|p| on_child_failure = p),
            _ => Err(format!(
                "unknown word {} (join=STAGE or on-child-failure=fail|continue)",
                quoted(word)
            )),
        };
        if let Err(e) = parsed {
            return Some(invalid(format!("the {FAN_OUT_LINE} line: {e}")));
        }
    }
    Some(match parse_children(body, 2) {
        Ok(children) => Outcome::FanOut(FanOut {
            children,
            next: NextStage::Default,
            join,
            on_child_failure,
        }),
        Err(e) => invalid(format!("fan-out {e}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(s: &str) -> Stage {
        s.parse().unwrap()
    }

    fn error(outcome: Outcome) -> String {
        match outcome {
            Outcome::Failure(f) => {
                assert_eq!(f.class, INVALID_FAN_OUT_CLASS);
                assert!(!f.retryable);
                f.error
            }
            other => panic!("expected an invalid fan-out, got {other:?}"),
        }
    }

    fn fan_out(outcome: Outcome) -> FanOut {
        match outcome {
            Outcome::FanOut(f) => f,
            other => panic!("expected a fan-out, got {other:?}"),
        }
    }

    #[test]
    fn a_line_is_a_payload_and_maybe_a_stage() {
        let cases: [(&str, &[u8], Option<&str>); 9] = [
            (r#"{"payload":"text"}"#, b"text", None),
            (
                r#"{"payload":"caf\u00e9 \"q\""}"#,
                "café \"q\"".as_bytes(),
                None,
            ),
            (
                r#"{"payload": {"b": 1, "a": [1, 2.50, "x y"]}}"#,
                br#"{"b":1,"a":[1,2.50,"x y"]}"#,
                None,
            ),
            (r#"{"payload":12}"#, b"12", None),
            (r#"{"payload":null,"stage":"s2"}"#, b"null", Some("s2")),
            (r#"{"payload_base64":"AAEC/w=="}"#, &[0, 1, 2, 255], None),
            (r#"{"payload_base64":"AAEC/w"}"#, &[0, 1, 2, 255], None),
            (r#"{"stage":null,"payload":"x"}"#, b"x", None),
            (r#"  {"payload":"x","stage":"s-1"}  "#, b"x", Some("s-1")),
        ];
        for (line, payload, stage_name) in cases {
            let child = parse_line(line.as_bytes()).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(child.payload, payload, "{line}");
            assert_eq!(child.stage, stage_name.map(stage), "{line}");
        }
    }

    #[test]
    fn every_malformed_line_says_why() {
        let long = format!(r#"{{"payload":"x","{}":1}}"#, "k".repeat(5000));
        let cases: [(&[u8], &str); 15] = [
            (b"not json", "not a JSON object"),
            (b"[1,2]", "not a JSON object"),
            (b"\"payload\"", "not a JSON object"),
            (b"{\"payload\":", "not a JSON object: EOF"),
            (
                b"{\"payload\":\"x\"} trailing",
                "not a JSON object: trailing",
            ),
            (b"{}", "no payload"),
            (br#"{"stage":"s"}"#, "no payload"),
            (
                br#"{"payload":"x","payload_base64":"eA=="}"#,
                "both payload and payload_base64",
            ),
            (br#"{"payload_base64":"***"}"#, "not base64"),
            (br#"{"payload_base64":5}"#, "payload_base64 is not a string"),
            (br#"{"payload":"x","stage":5}"#, "stage is not a string"),
            (
                br#"{"payload":"x","stage":"no such/stage"}"#,
                "stage \"no such/stage\"",
            ),
            (br#"{"payload":"x","stgae":"s"}"#, "unknown field \"stgae\""),
            (
                long.as_bytes(),
                "unknown field \"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk\"...",
            ),
            (b"{\"payload\":\"\xff\"}", "not UTF-8"),
        ];
        for (line, why) in cases {
            let err = parse_line(line).unwrap_err();
            assert!(
                err.contains(why),
                "{}: {err:?} should say {why:?}",
                String::from_utf8_lossy(line)
            );
            assert!(err.len() < 200, "{err}");
        }
    }

    #[test]
    fn lines_are_numbered_empty_ones_skipped_and_children_bounded() {
        let body = b"{\"payload\":\"a\"}\r\n\n   \n{\"payload\":\"b\"}\n";
        let children = parse_children(body, 1).unwrap();
        assert_eq!(children.len(), 2);
        assert_eq!(children[1].payload, b"b");
        let err = parse_children(b"{\"payload\":1}\n\n{\"payload\"\n", 1).unwrap_err();
        assert!(err.starts_with("line 3: "), "{err}");
        let err = parse_children(b"x", 2).unwrap_err();
        assert!(err.starts_with("line 2: "), "{err}");
        assert_eq!(parse_children(b"", 1).unwrap(), []);
        let max = "{\"payload\":1}\n".repeat(MAX_CHILDREN as usize);
        assert_eq!(parse_children(max.as_bytes(), 1).unwrap().len(), 10_000);
        let over = format!("{max}{{\"payload\":1}}");
        let err = parse_children(over.as_bytes(), 1).unwrap_err();
        assert_eq!(err, "more than 10000 children");
    }

    #[test]
    fn an_http_fan_out_reads_its_headers() {
        let body = b"{\"payload\":\"a\"}\n{\"payload\":\"b\",\"stage\":\"other\"}\n";
        let f = fan_out(from_http(
            "ndjson",
            Some("application/x-ndjson; charset=utf-8"),
            Some("merge"),
            Some("continue"),
            NextStage::Stage(stage("kids")),
            body,
        ));
        assert_eq!(f.children.len(), 2);
        assert_eq!(f.join, Join::Stage(stage("merge")));
        assert_eq!(f.on_child_failure, ChildPolicy::Continue);
        assert_eq!(f.next, NextStage::Stage(stage("kids")));
        let f = fan_out(from_http(
            "NDJSON",
            Some("Application/X-NDJSON"),
            None,
            None,
            NextStage::Default,
            body,
        ));
        assert_eq!(
            (f.join, f.on_child_failure),
            (Join::Default, ChildPolicy::Fail)
        );
        let f = fan_out(from_http(
            "ndjson",
            Some(headers::NDJSON_CONTENT_TYPE),
            Some("-"),
            None,
            NextStage::Default,
            body,
        ));
        assert_eq!(f.join, Join::None);
    }

    #[test]
    fn a_bad_http_fan_out_is_invalid_with_the_reason() {
        let ok = b"{\"payload\":\"a\"}".as_slice();
        let ct = Some(headers::NDJSON_CONTENT_TYPE);
        let cases = [
            ("json", ct, None, None, ok, "only `ndjson`"),
            (
                "ndjson",
                None,
                None,
                None,
                ok,
                "Content-Type must be application/x-ndjson",
            ),
            (
                "ndjson",
                Some("text/plain"),
                None,
                None,
                ok,
                "not \"text/plain\"",
            ),
            (
                "ndjson",
                ct,
                Some("bad stage"),
                None,
                ok,
                "x-guildhall-join: join stage \"bad stage\"",
            ),
            (
                "ndjson",
                ct,
                None,
                Some("maybe"),
                ok,
                "x-guildhall-on-child-failure: on-child-failure \"maybe\"",
            ),
            (
                "ndjson",
                ct,
                None,
                None,
                b"{\"payload\":\"a\"}\nnope".as_slice(),
                "fan-out line 2: not a JSON object",
            ),
        ];
        for (fan, ctype, join, policy, body, why) in cases {
            let err = error(from_http(
                fan,
                ctype,
                join,
                policy,
                NextStage::Default,
                body,
            ));
            assert!(err.contains(why), "{err:?} should say {why:?}");
        }
    }

    #[test]
    fn an_exec_fan_out_is_its_marker_line_then_children() {
        assert_eq!(from_exec(b"ordinary output"), None);
        assert_eq!(from_exec(b"#guildhall-fan-outs\n{}"), None);
        assert_eq!(from_exec(b" #guildhall-fan-out\n{}"), None);
        let f = fan_out(from_exec(b"#guildhall-fan-out\n{\"payload\":\"a\"}\n").unwrap());
        assert_eq!(f.children.len(), 1);
        assert_eq!((f.join, f.next), (Join::Default, NextStage::Default));
        let f = fan_out(
            from_exec(b"#guildhall-fan-out join=merge on-child-failure=continue\r\n{\"payload\":1}\n{\"payload\":2}")
                .unwrap(),
        );
        assert_eq!(f.children.len(), 2);
        assert_eq!(f.join, Join::Stage(stage("merge")));
        assert_eq!(f.on_child_failure, ChildPolicy::Continue);
        let f = fan_out(from_exec(b"#guildhall-fan-out join=-").unwrap());
        assert_eq!((f.join, f.children.len()), (Join::None, 0));
        for (out, why) in [
            (
                &b"#guildhall-fan-out next=x\n"[..],
                "unknown word \"next=x\"",
            ),
            (b"#guildhall-fan-out join=a/b\n", "join stage \"a/b\""),
            (
                b"#guildhall-fan-out on-child-failure=never\n",
                "\"never\" is neither",
            ),
            (b"#guildhall-fan-out \xff\n", "not UTF-8"),
            (
                b"#guildhall-fan-out\n{\"payload\":1}\n{\"payload\":1,\"x\":2}\n",
                "fan-out line 3: unknown field \"x\"",
            ),
        ] {
            let err = error(from_exec(out).unwrap());
            assert!(err.contains(why), "{err:?} should say {why:?}");
        }
    }

    #[test]
    fn compact_keeps_strings_as_they_are() {
        assert_eq!(
            compact(r#" { "a b" : "x\" y" , "c":[ 1 , 2 ] } "#),
            br#"{"a b":"x\" y","c":[1,2]}"#
        );
    }
}

//! A worker for the integration tests, in two modes:
//!
//! - `guildhall-test-worker http [--listen ADDR]`: an HTTP worker; prints
//!   `listening on http://ADDR` once bound; `GET /calls` returns how many
//!   times each `task/stage/attempt` was processed, `GET /inputs` the last
//!   payload each `task/stage/attempt` was given (a join's input, say).
//! - `guildhall-test-worker exec`: one task per process, payload on stdin.
//!
//! Behaviour is planted in the payload as words `[stage:]key=value`:
//! `fail=permanent` (4xx / exit 65), `fail=always` (5xx / exit 1),
//! `fail=once` (fails on attempt 1 only), `fail=permanent-first` (HTTP only:
//! a permanent failure the first time this worker process sees the task at
//! that stage, success afterwards, as after a fix and a dead-letter replay),
//! `sleep=MS`, `class=NAME` (error class header), `say=TEXT` (appended to a
//! failure's message), `pidfile=PATH` (exec: the process's pid is written
//! there). A word with a `stage:` prefix applies only at that stage.
//! The output is the input with ` @<stage>` appended, so the last stage's
//! output shows the path the task took (a join stage's input is the
//! coordinator's JSON of its children's results: its output is that JSON
//! with ` @<stage>` appended).
//!
//! Fan-outs (issue 19), HTTP (an ndjson body with `x-guildhall-fan-out`)
//! and exec (a `#guildhall-fan-out` first line): `fanout=N` answers with N
//! children instead of a result; child `i`'s payload is the input's words
//! that start with `child:` (that prefix stripped) and ` n=i` (so
//! `child:kid:fail=permanent` plants `fail=permanent` at stage `kid` in
//! every child). `fanstage=S` names each child's stage (else the agent's
//! default), `join=S` the join (`-` for none; else the agent's `--join`),
//! `onchild=continue` the policy; `fanbad=I` replaces child `I`'s line by
//! one that is not JSON (a hostile worker).
//!
//! `pad=N` appends ` ` and N bytes of `x` to the output (a large result);
//! `padonly=I` restricts it to the task whose payload has `n=I` (one child
//! of a fan-out).

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the payload asks this stage attempt to do.
#[derive(Debug, Default, PartialEq)]
struct Plan {
    fail: Option<String>,
    sleep_ms: u64,
    class: Option<String>,
    /// Appended to a failure's message (`say=TEXT`, no spaces).
    say: Option<String>,
    /// `fanout=N`: answer with N children.
    fanout: Option<u32>,
    /// `fanstage=S`: the children's stage.
    fanstage: Option<String>,
    /// `join=S`: the join stage (`-` for none).
    join: Option<String>,
    /// `onchild=continue`: the on-child-failure policy.
    onchild: Option<String>,
    /// `fanbad=I`: child I's line is not JSON.
    fanbad: Option<u32>,
    /// `pad=N`: N bytes of padding appended to the output.
    pad: usize,
    /// `padonly=I`: pad only the task whose payload has `n=I`.
    padonly: Option<u32>,
    /// `n=I`: the child index `fanout` wrote into a child's payload.
    n: Option<u32>,
}

fn plan(payload: &str, stage: &str) -> Plan {
    let mut plan = Plan::default();
    for word in payload.split_whitespace() {
        let word = match word.split_once(':') {
            Some((s, rest)) if s == stage => rest,
            Some(_) => continue,
            None => word,
        };
        match word.split_once('=') {
            Some(("fail", v)) => plan.fail = Some(v.to_owned()),
            Some(("sleep", v)) => plan.sleep_ms = v.parse().unwrap_or(0),
            Some(("class", v)) => plan.class = Some(v.to_owned()),
            Some(("say", v)) => plan.say = Some(v.to_owned()),
            Some(("fanout", v)) => plan.fanout = v.parse().ok(),
            Some(("fanstage", v)) => plan.fanstage = Some(v.to_owned()),
            Some(("join", v)) => plan.join = Some(v.to_owned()),
            Some(("onchild", v)) => plan.onchild = Some(v.to_owned()),
            Some(("fanbad", v)) => plan.fanbad = v.parse().ok(),
            Some(("pad", v)) => plan.pad = v.parse().unwrap_or(0),
            Some(("padonly", v)) => plan.padonly = v.parse().ok(),
            Some(("n", v)) => plan.n = v.parse().ok(),
            _ => {}
        }
    }
    plan
}

enum Outcome {
    Ok(String),
    /// The child lines of a fan-out (one JSON object per line).
    FanOut(Vec<String>),
    Permanent(String),
    Transient(String),
}

/// The child lines `fanout=N` asks for (see the module docs).
fn child_lines(payload: &str, p: &Plan, n: u32) -> Vec<String> {
    let words: Vec<&str> = payload
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("child:"))
        .collect();
    (0..n)
        .map(|i| {
            if p.fanbad == Some(i) {
                return "{\"payload\": not json".to_owned();
            }
            let payload = format!("{} n={i}", words.join(" ")).trim_start().to_owned();
            let mut line = serde_json::json!({ "payload": payload });
            if let Some(stage) = &p.fanstage {
                line["stage"] = serde_json::Value::from(stage.as_str());
            }
            line.to_string()
        })
        .collect()
}

/// `seen_before`: whether this worker already processed the task at this
/// stage (any attempt), for `fail=permanent-first`.
fn decide(payload: &str, stage: &str, attempt: u32, seen_before: bool) -> (Outcome, Plan) {
    let p = plan(payload, stage);
    let outcome = match p.fail.as_deref() {
        Some("permanent") => Outcome::Permanent(format!("permanent failure requested at {stage}")),
        Some("permanent-first") if !seen_before => Outcome::Permanent(format!(
            "permanent failure requested at {stage} (first time only)"
        )),
        Some("always") => Outcome::Transient(format!("transient failure requested at {stage}")),
        Some("once") if attempt <= 1 => {
            Outcome::Transient(format!("first attempt fails at {stage}"))
        }
        _ => match p.fanout {
            Some(n) => Outcome::FanOut(child_lines(payload, &p, n)),
            None if p.pad > 0 && p.padonly.is_none_or(|i| p.n == Some(i)) => {
                Outcome::Ok(format!("{payload} @{stage} {}", "x".repeat(p.pad)))
            }
            None => Outcome::Ok(format!("{payload} @{stage}")),
        },
    };
    let outcome = match (outcome, &p.say) {
        (Outcome::Permanent(m), Some(say)) => Outcome::Permanent(format!("{m}: {say}")),
        (Outcome::Transient(m), Some(say)) => Outcome::Transient(format!("{m}: {say}")),
        (o, _) => o,
    };
    (outcome, p)
}

type Calls = Arc<Mutex<HashMap<String, u32>>>;

/// What the HTTP worker remembers: calls per `task/stage/attempt`, and the
/// last payload of each.
#[derive(Clone, Default)]
struct Shared {
    calls: Calls,
    inputs: Arc<Mutex<HashMap<String, String>>>,
}

async fn handle(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let calls = &shared.calls;
    let h = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let (task, stage) = (h("x-guildhall-task-id"), h("x-guildhall-stage"));
    let attempt: u32 = h("x-guildhall-attempt").parse().unwrap_or(1);
    let seen_before = {
        let mut calls = calls.lock().unwrap_or_else(|e| e.into_inner());
        let prefix = format!("{task}/{stage}/");
        let seen = calls.keys().any(|k| k.starts_with(&prefix));
        *calls
            .entry(format!("{task}/{stage}/{attempt}"))
            .or_default() += 1;
        seen
    };
    let payload = String::from_utf8_lossy(&body).into_owned();
    shared
        .inputs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(format!("{task}/{stage}/{attempt}"), payload.clone());
    let (outcome, p) = decide(&payload, &stage, attempt, seen_before);
    if p.sleep_ms > 0 {
        tokio::time::sleep(Duration::from_millis(p.sleep_ms)).await;
    }
    let class = p.class.unwrap_or_default();
    let with_class = |status: StatusCode, msg: String| {
        let mut r = (status, msg).into_response();
        if let Ok(v) = class.parse()
            && !class.is_empty()
        {
            r.headers_mut().insert("x-guildhall-error-class", v);
        }
        r
    };
    match outcome {
        Outcome::Ok(out) => (StatusCode::OK, out).into_response(),
        Outcome::FanOut(lines) => {
            let mut r = (StatusCode::OK, lines.join("\n")).into_response();
            let h = r.headers_mut();
            h.insert("content-type", "application/x-ndjson".parse().unwrap());
            h.insert("x-guildhall-fan-out", "ndjson".parse().unwrap());
            if let Some(join) = p.join.as_deref().and_then(|j| j.parse().ok()) {
                h.insert("x-guildhall-join", join);
            }
            if let Some(policy) = p.onchild.as_deref().and_then(|j| j.parse().ok()) {
                h.insert("x-guildhall-on-child-failure", policy);
            }
            r
        }
        Outcome::Permanent(msg) => with_class(StatusCode::UNPROCESSABLE_ENTITY, msg),
        Outcome::Transient(msg) => with_class(StatusCode::SERVICE_UNAVAILABLE, msg),
    }
}

async fn calls(State(shared): State<Shared>) -> Response {
    let map = shared
        .calls
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    axum::Json(map).into_response()
}

async fn inputs(State(shared): State<Shared>) -> Response {
    let map = shared
        .inputs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    axum::Json(map).into_response()
}

async fn http_mode(listen: &str) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let state = Shared::default();
    let app = Router::new()
        .route("/", post(handle))
        .route("/calls", get(calls))
        .route("/inputs", get(inputs))
        .with_state(state);
    axum::serve(listener, app).await
}

fn exec_mode() -> i32 {
    let mut input = Vec::new();
    if std::io::stdin().read_to_end(&mut input).is_err() {
        return 1;
    }
    let payload = String::from_utf8_lossy(&input).into_owned();
    let stage = std::env::var("GUILDHALL_STAGE").unwrap_or_default();
    let attempt = std::env::var("GUILDHALL_ATTEMPT")
        .ok()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    let (outcome, p) = decide(&payload, &stage, attempt, false);
    // `pidfile=PATH` (exec only): the process writes its pid there first,
    // so a test can see it killed (a cancelled task).
    if let Some(path) = payload
        .split_whitespace()
        .find_map(|w| w.strip_prefix("pidfile="))
    {
        let _ = std::fs::write(path, std::process::id().to_string());
    }
    if p.sleep_ms > 0 {
        std::thread::sleep(Duration::from_millis(p.sleep_ms));
    }
    match outcome {
        Outcome::Ok(out) => {
            print!("{out}");
            0
        }
        Outcome::FanOut(lines) => {
            let mut marker = "#guildhall-fan-out".to_owned();
            if let Some(join) = &p.join {
                marker.push_str(&format!(" join={join}"));
            }
            if let Some(policy) = &p.onchild {
                marker.push_str(&format!(" on-child-failure={policy}"));
            }
            println!("{marker}");
            for line in lines {
                println!("{line}");
            }
            0
        }
        Outcome::Permanent(msg) => {
            eprintln!("{msg}");
            65
        }
        Outcome::Transient(msg) => {
            eprintln!("{msg}");
            1
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("exec") => std::process::exit(exec_mode()),
        Some("http") => {
            let listen = match (args.get(2).map(String::as_str), args.get(3)) {
                (Some("--listen"), Some(addr)) => addr.clone(),
                _ => "127.0.0.1:0".to_owned(),
            };
            let rt = tokio::runtime::Runtime::new().expect("a runtime");
            if let Err(e) = rt.block_on(http_mode(&listen)) {
                eprintln!("test worker: {e}");
                std::process::exit(1);
            }
        }
        _ => {
            eprintln!("usage: guildhall-test-worker http [--listen ADDR] | exec");
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_apply_to_their_stage_only() {
        assert_eq!(
            plan("x build:fail=permanent", "build").fail.as_deref(),
            Some("permanent")
        );
        assert_eq!(plan("x build:fail=permanent", "intake").fail, None);
        assert_eq!(plan("sleep=30 fail=once", "any").sleep_ms, 30);
        assert!(matches!(
            decide("fail=once", "s", 2, false).0,
            Outcome::Ok(_)
        ));
        assert!(matches!(
            decide("fail=once", "s", 1, false).0,
            Outcome::Transient(_)
        ));
        assert!(matches!(
            decide("fail=permanent-first", "s", 1, false).0,
            Outcome::Permanent(_)
        ));
        assert!(matches!(
            decide("fail=permanent-first", "s", 1, true).0,
            Outcome::Ok(_)
        ));
    }

    #[test]
    fn pad_makes_a_large_output_for_the_child_it_names() {
        let Outcome::Ok(out) = decide("pad=10 padonly=1 n=1", "s", 1, false).0 else {
            panic!("not a success")
        };
        assert_eq!(out, format!("pad=10 padonly=1 n=1 @s {}", "x".repeat(10)));
        let Outcome::Ok(out) = decide("pad=10 padonly=1 n=2", "s", 1, false).0 else {
            panic!("not a success")
        };
        assert_eq!(out, "pad=10 padonly=1 n=2 @s");
    }

    #[test]
    fn fanout_lists_children_with_the_child_words() {
        let (outcome, p) = decide(
            "work:fanout=3 fanstage=kid join=merge child:kid:sleep=5 child:x",
            "work",
            1,
            false,
        );
        let Outcome::FanOut(lines) = outcome else {
            panic!("not a fan-out")
        };
        assert_eq!(p.join.as_deref(), Some("merge"));
        assert_eq!(
            lines,
            [
                r#"{"payload":"kid:sleep=5 x n=0","stage":"kid"}"#,
                r#"{"payload":"kid:sleep=5 x n=1","stage":"kid"}"#,
                r#"{"payload":"kid:sleep=5 x n=2","stage":"kid"}"#,
            ]
        );
        // Not at another stage; a child's own payload does not fan out.
        assert!(matches!(
            decide("work:fanout=3", "kid", 1, false).0,
            Outcome::Ok(_)
        ));
        let Outcome::FanOut(lines) = decide("fanout=2 fanbad=1", "s", 1, false).0 else {
            panic!("not a fan-out")
        };
        assert_eq!(lines[0], r#"{"payload":"n=0"}"#);
        assert!(serde_json::from_str::<serde_json::Value>(&lines[1]).is_err());
    }
}

//! JSON request bodies: every POST that takes one goes through
//! [`json_body`] first, which answers, each with a JSON message:
//!
//! - 415 unless `Content-Type: application/json` (a cross-site form or a
//!   `text/plain` fetch cannot send that without the browser asking first);
//! - 413 for a body over the route's limit, from its `Content-Length` before
//!   reading anything, or as soon as the bytes read pass it;
//! - 408 for a body that has not fully arrived within `--http-body-timeout`
//!   (a slow upload holds a connection and a buffer).
//!
//! The body is then handed on, read, to the handler, which reads it with
//! [`parse`] (a body the extractor refused answers with its status; JSON
//! that does not fit, 400 `invalid JSON body: ...`).

use super::error::ApiError;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_lite::StreamExt;
use guildhall_proto::Priority;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::time::Duration;

/// A handler's JSON body: the extractor's refusal with its status, or the
/// body read as a `T` (400 `invalid JSON body: ...` if it is not one).
pub fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    parse_bytes(&body)
}

/// `body` read as a `T` (400 `invalid JSON body: ...` if it is not one).
pub fn parse_bytes<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// A priority given in a JSON body: a whole number from 0 to 9 (the caller
/// words the refusal).
pub fn priority(v: &Value) -> Option<Priority> {
    v.as_u64()
        .and_then(|n| u8::try_from(n).ok())
        .and_then(|n| Priority::new(n).ok())
}

/// The body rule of one route.
#[derive(Debug, Clone, Copy)]
pub struct JsonBody {
    /// Largest body, in bytes.
    pub limit: usize,
    /// Longest the body may take to arrive.
    pub timeout: Duration,
}

/// Whether `Content-Type` says JSON (`application/json`, parameters allowed).
pub fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

/// `limit` for a person: `1 KiB`, `24 MiB`.
fn size(limit: usize) -> String {
    match limit {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} bytes"),
    }
}

fn too_large(path: &str, limit: usize) -> Response {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the body is too large: {path} takes at most {}",
            size(limit)
        ),
    )
    .into_response()
}

/// Why a body could not be read.
enum ReadError {
    /// It passed the limit.
    TooLarge,
    /// The connection failed while it arrived.
    Broken(String),
}

async fn read(body: Body, limit: usize) -> Result<Vec<u8>, ReadError> {
    let mut stream = body.into_data_stream();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ReadError::Broken(e.to_string()))?;
        if out.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Middleware of a route taking a JSON body (see the module's text).
pub async fn json_body(State(rule): State<JsonBody>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    if !is_json(req.headers()) {
        return ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("{path} takes a JSON body: send it with Content-Type: application/json"),
        )
        .into_response();
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > rule.limit as u64) {
        return too_large(&path, rule.limit);
    }
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(rule.timeout, read(body, rule.limit)).await {
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} (--http-body-timeout)",
                humantime::format_duration(rule.timeout)
            ),
        )
        .into_response(),
        Ok(Err(ReadError::TooLarge)) => too_large(&path, rule.limit),
        Ok(Err(ReadError::Broken(e))) => {
            ApiError::bad_request(format!("cannot read the request body: {e}")).into_response()
        }
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ct(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, v.parse().unwrap());
        h
    }

    #[test]
    fn only_json_is_json() {
        for ok in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            " application/json ;charset=UTF-8",
        ] {
            assert!(is_json(&ct(ok)), "{ok}");
        }
        for not in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonp",
            "text/json",
            "",
        ] {
            assert!(!is_json(&ct(not)), "{not}");
        }
        assert!(!is_json(&HeaderMap::new()));
    }

    #[test]
    fn limits_read_well() {
        assert_eq!(size(1024), "1 KiB");
        assert_eq!(size(24 << 20), "24 MiB");
        assert_eq!(size(1000), "1000 bytes");
    }
}

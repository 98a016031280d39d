//! Writing coordinator events to the events stream for a request (a
//! schedule change, a rate limit, a cancel): 503 when the broker link or the
//! publish fails, 504 when the broker has not confirmed within
//! `--broker-timeout` (the event may or may not be in the stream); then
//! waiting for the core to read it back and apply it.

use super::error::ApiError;
use crate::core::Core;
use crate::serve::App;
use axum::http::StatusCode;
use std::future::Future;
use std::time::Duration;

/// Runs `write` (events written with [`App::write_events`]) within the
/// broker time-out: its error is a 503 `"{failed}: {error}"` (the error
/// alone if `failed` is empty); running out of time a 504 `timed_out`.
pub async fn confirmed(
    app: &App,
    write: impl Future<Output = Result<(), String>>,
    failed: &str,
    timed_out: &str,
) -> Result<(), ApiError> {
    match tokio::time::timeout(app.http.config.broker_timeout, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if failed.is_empty() => Err(ApiError::unavailable(e)),
        Ok(Err(e)) => Err(ApiError::unavailable(format!("{failed}: {e}"))),
        Err(_) => Err(ApiError::new(StatusCode::GATEWAY_TIMEOUT, timed_out)),
    }
}

/// Waits until the core has applied a change read back from the events
/// stream (`applied` says, polled every 20 ms), for up to `wait`: whether it
/// has (the caller answers with its own status if not).
pub async fn applied(app: &App, wait: Duration, mut applied: impl FnMut(&Core) -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if applied(&app.core()) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

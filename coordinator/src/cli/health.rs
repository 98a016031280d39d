//! `guildhall healthcheck`: GET a URL and exit 0 on a 2xx answer, 1 with one
//! line otherwise. It is the image's HEALTHCHECK (the coordinator's
//! `/healthz`, an agent's `/readyz`), so the runtime image needs no curl.

use super::HealthcheckArgs;
use guildhall_broker::{error_chain, one_line};

/// Most bytes of a failing answer quoted in the error.
const QUOTE_BYTES: usize = 200;

/// Why the check failed.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// The URL is not an http(s) URL.
    #[error("--url {url:?}: {reason}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Nothing answered in time.
    #[error("GET {url}: {reason}")]
    Unreachable {
        /// The URL.
        url: String,
        /// The transport error, one line.
        reason: String,
    },
    /// An answer other than 2xx.
    #[error("GET {url}: HTTP {status}: {body}")]
    Unhealthy {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
        /// The start of the body, one line.
        body: String,
    },
}

/// Runs the check; the line to print when healthy.
pub async fn run(args: &HealthcheckArgs) -> Result<String, HealthError> {
    let url = reqwest::Url::parse(&args.url).map_err(|e| HealthError::BadUrl {
        url: args.url.clone(),
        reason: e.to_string(),
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(HealthError::BadUrl {
            url: args.url.clone(),
            reason: "must be http:// or https://".into(),
        });
    }
    let unreachable = |e: reqwest::Error| HealthError::Unreachable {
        url: args.url.clone(),
        reason: one_line(&error_chain(&e)),
    };
    let client = reqwest::Client::builder()
        .timeout(args.timeout)
        .no_proxy()
        .build()
        .map_err(unreachable)?;
    let response = client.get(url).send().await.map_err(unreachable)?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    let mut quoted: String = one_line(&body);
    if quoted.len() > QUOTE_BYTES {
        let cut = (0..=QUOTE_BYTES)
            .rev()
            .find(|&i| quoted.is_char_boundary(i))
            .unwrap_or(0);
        quoted.truncate(cut);
        quoted.push('…');
    }
    if status.is_success() {
        Ok(format!("healthy: HTTP {} {quoted}\n", status.as_u16()))
    } else {
        Err(HealthError::Unhealthy {
            url: args.url.clone(),
            status: status.as_u16(),
            body: quoted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn args(url: &str) -> HealthcheckArgs {
        HealthcheckArgs {
            url: url.into(),
            timeout: Duration::from_secs(2),
        }
    }

    async fn serve(status: u16, body: &'static str) -> String {
        let app = axum::Router::new().route(
            "/healthz",
            axum::routing::get(move || async move {
                (axum::http::StatusCode::from_u16(status).unwrap(), body)
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/healthz")
    }

    #[tokio::test]
    async fn two_hundred_is_healthy() {
        let url = serve(200, "{\"status\":\"ok\"}").await;
        let line = run(&args(&url)).await.unwrap();
        assert!(line.starts_with("healthy: HTTP 200"), "{line}");
    }

    #[tokio::test]
    async fn an_error_status_is_one_line_with_the_body() {
        let url = serve(
            503,
            "{\"status\":\"unavailable\",\n\"reason\":\"no broker\"}",
        )
        .await;
        let err = run(&args(&url)).await.unwrap_err().to_string();
        assert!(err.contains("HTTP 503"), "{err}");
        assert!(err.contains("no broker"), "{err}");
        assert!(!err.contains('\n'));
    }

    #[tokio::test]
    async fn nothing_listening_and_bad_urls_fail() {
        let err = run(&args("http://127.0.0.1:1/healthz")).await.unwrap_err();
        assert!(matches!(err, HealthError::Unreachable { .. }), "{err}");
        let err = run(&args("ftp://x/")).await.unwrap_err();
        assert!(matches!(err, HealthError::BadUrl { .. }), "{err}");
        let err = run(&args("not a url")).await.unwrap_err();
        assert!(matches!(err, HealthError::BadUrl { .. }), "{err}");
    }
}

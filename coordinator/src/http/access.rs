//! Access control: with `--api-token`, every control endpoint needs
//! `Authorization: Bearer TOKEN`; with `--protect-reads` every read does
//! too. `/healthz`, `/livez` and the dashboard's static files stay open (the page asks
//! for the token). Tokens are compared in constant time.
//!
//! `EventSource` cannot send headers, so a GET may carry the token as the
//! `access_token` query parameter instead (RFC 6750 §2.3).

use super::error::ApiError;
use crate::serve::App;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// Who may do what.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// The bearer token; `None`: everything is open.
    pub token: Option<String>,
    /// Whether reads need the token too.
    pub protect_reads: bool,
}

impl Access {
    /// Whether the request carries the token (always true without one).
    pub fn allows(&self, method: &Method, headers: &HeaderMap, query: Option<&str>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let from_header = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            });
        let from_query = (method == Method::GET)
            .then(|| {
                query?
                    .split('&')
                    .find_map(|pair| pair.strip_prefix("access_token="))
            })
            .flatten();
        let presented = from_header.or(from_query).unwrap_or("");
        bool::from(presented.as_bytes().ct_eq(token.as_bytes()))
    }
}

fn unauthorized() -> Response {
    let mut response = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "this endpoint needs `Authorization: Bearer <token>` (the coordinator's --api-token)",
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

/// Middleware of the control routes.
pub async fn require_control(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if app
        .access
        .allows(req.method(), req.headers(), req.uri().query())
    {
        next.run(req).await
    } else {
        unauthorized()
    }
}

/// Middleware of the read routes: open unless `--protect-reads`.
pub async fn require_read(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if !app.access.protect_reads
        || app
            .access
            .allows(req.method(), req.headers(), req.uri().query())
    {
        next.run(req).await
    } else {
        unauthorized()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, auth.parse().unwrap());
        h
    }

    #[test]
    fn the_token_is_needed_only_when_set() {
        let open = Access::default();
        assert!(open.allows(&Method::POST, &HeaderMap::new(), None));
        let a = Access {
            token: Some("s3cret-token".into()),
            protect_reads: false,
        };
        assert!(!a.allows(&Method::POST, &HeaderMap::new(), None));
        assert!(a.allows(&Method::POST, &headers("Bearer s3cret-token"), None));
        assert!(a.allows(&Method::POST, &headers("bearer s3cret-token"), None));
        assert!(!a.allows(&Method::POST, &headers("Bearer s3cret"), None));
        assert!(!a.allows(&Method::POST, &headers("Basic s3cret-token"), None));
        assert!(!a.allows(&Method::POST, &headers("s3cret-token"), None));
        // The query parameter is for EventSource: GET only.
        let q = Some("x=1&access_token=s3cret-token");
        assert!(a.allows(&Method::GET, &HeaderMap::new(), q));
        assert!(!a.allows(&Method::POST, &HeaderMap::new(), q));
        assert!(!a.allows(&Method::GET, &HeaderMap::new(), Some("access_token=no")));
    }
}

//! Access control: with `--api-token`, every control endpoint needs
//! `Authorization: Bearer TOKEN`; with `--protect-reads` every read does
//! too. `/healthz`, `/livez` and the dashboard's static files stay open (the page asks
//! for the token). Tokens are compared in constant time.
//!
//! `EventSource` cannot send headers, so a GET may carry the token as the
//! `access_token` query parameter instead (RFC 6750 §2.3), form-encoded
//! (`%XX`, `+` for a space), on every route that checks it. The parameter
//! is taken out of the URI before the handler sees it.
//!
//! Reads also learn whether the reader presented the token
//! ([`super::redact::ReadScope`]): without it, worker-written text is withheld.

use super::error::ApiError;
use super::redact::ReadScope;
use crate::serve::App;
use axum::extract::{Request, State};
use axum::http::uri::PathAndQuery;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::borrow::Cow;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// The query parameter that may carry the token.
const QUERY_KEY: &str = "access_token";

/// Who may do what.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// The bearer token; `None`: everything is open.
    pub token: Option<String>,
    /// Whether reads need the token too.
    pub protect_reads: bool,
}

/// The `access_token` query parameter, decoded; `None` if absent.
pub fn query_token(query: &str) -> Option<Cow<'_, str>> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == QUERY_KEY)
        .map(|(_, v)| v)
}

/// `query` without its `access_token` parameters (the others kept as sent);
/// `None` if nothing is left.
pub fn strip_token(query: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let key = pair.split('=').next().unwrap_or("");
            !pair.is_empty()
                && form_urlencoded::parse(key.as_bytes())
                    .next()
                    .is_none_or(|(k, _)| k != QUERY_KEY)
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
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
            .then(|| query_token(query?))
            .flatten();
        let presented = match (from_header, &from_query) {
            (Some(h), _) => h,
            (None, Some(q)) => q.as_ref(),
            (None, None) => "",
        };
        bool::from(presented.as_bytes().ct_eq(token.as_bytes()))
    }
}

/// Takes `access_token` out of the request's URI, so no handler sees it (nor
/// refuses it as an unknown parameter) and no log shows it.
fn remove_query_token(req: &mut Request) {
    let Some(query) = req.uri().query() else {
        return;
    };
    if query_token(query).is_none() {
        return;
    }
    let path_and_query = match strip_token(query) {
        Some(rest) => format!("{}?{rest}", req.uri().path()),
        None => req.uri().path().to_owned(),
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = PathAndQuery::try_from(path_and_query).ok();
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
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
pub async fn require_control(
    State(app): State<Arc<App>>,
    mut req: Request,
    next: Next,
) -> Response {
    if app
        .access
        .allows(req.method(), req.headers(), req.uri().query())
    {
        remove_query_token(&mut req);
        req.extensions_mut().insert(ReadScope { full: true });
        next.run(req).await
    } else {
        unauthorized()
    }
}

/// Middleware of the read routes: open unless `--protect-reads`; tells the
/// handler whether the reader may see worker-written text.
pub async fn require_read(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let allowed = app
        .access
        .allows(req.method(), req.headers(), req.uri().query());
    if app.access.protect_reads && !allowed {
        return unauthorized();
    }
    remove_query_token(&mut req);
    req.extensions_mut().insert(ReadScope { full: allowed });
    next.run(req).await
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

    #[test]
    fn the_query_token_is_form_decoded() {
        let token = "a/b+c=d%e f-0123456789";
        let a = Access {
            token: Some(token.into()),
            protect_reads: true,
        };
        let get = |q: &str| a.allows(&Method::GET, &HeaderMap::new(), Some(q));
        // As `encodeURIComponent` writes it, and with `+` for the space.
        assert!(get("access_token=a%2Fb%2Bc%3Dd%25e%20f-0123456789"));
        assert!(get("limit=5&access_token=a%2Fb%2Bc%3Dd%25e+f-0123456789"));
        // Sent raw, `+` is a space and `%e ` no escape: refused, not a crash.
        assert!(!get("access_token=a/b+c=d%e f-0123456789"));
        assert!(!get("access_token=a%2Fb%2Bc%3Dd%25e%20f"));
        assert!(!get("access_token=%ZZ"));
        assert_eq!(
            query_token("x=1&access_token=%2B+%20").as_deref(),
            Some("+  ")
        );
        assert_eq!(query_token("x=1"), None);
    }

    #[test]
    fn the_query_token_is_stripped_and_the_rest_kept() {
        assert_eq!(strip_token("access_token=x"), None);
        assert_eq!(
            strip_token("limit=5&access_token=x&stage=a%20b").as_deref(),
            Some("limit=5&stage=a%20b")
        );
        assert_eq!(
            strip_token("access%5Ftoken=x&limit=1").as_deref(),
            Some("limit=1")
        );
        assert_eq!(strip_token("limit=1&&").as_deref(), Some("limit=1"));
    }
}

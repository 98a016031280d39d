//! The browser dashboard: three static files (`dashboard/index.html`,
//! `dashboard/app.css`, `dashboard/app.js`) embedded in the binary with
//! `include_str!`. No build step, nothing fetched from outside at run time.
//!
//! Routes (the router in `http/mod.rs` adds them, outside the access-control
//! layers: the page itself is open and asks for the token when an API call
//! answers 401):
//!
//! - `GET /` -> [`index`]
//! - `GET /dashboard/app.css` -> [`css`]
//! - `GET /dashboard/app.js` -> [`js`]
//!
//! The page is served with a strict Content-Security-Policy
//! ([`CONTENT_SECURITY_POLICY`]): no inline script or style, everything from
//! this origin. The script builds every node from server data as text, never
//! as markup. Every file is `Cache-Control: no-cache`, so a new binary's page
//! is picked up at the next load.

use axum::http::header;
use axum::response::IntoResponse;

/// The page.
const INDEX_HTML: &str = include_str!("dashboard/index.html");
/// Its stylesheet.
const APP_CSS: &str = include_str!("dashboard/app.css");
/// Its script.
const APP_JS: &str = include_str!("dashboard/app.js");

/// The page's Content-Security-Policy.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'";

/// `GET /`: the dashboard page.
pub async fn index() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        INDEX_HTML,
    )
}

/// `GET /dashboard/app.css`.
pub async fn css() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        APP_CSS,
    )
}

/// `GET /dashboard/app.js`.
pub async fn js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "application/javascript"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        APP_JS,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::Response;

    /// Every `<script ...>` tag of `html` with what stands between it and its
    /// `</script>`.
    fn script_tags(html: &str) -> Vec<(String, String)> {
        let lower = html.to_ascii_lowercase();
        let mut found = Vec::new();
        let mut from = 0;
        while let Some(start) = lower[from..].find("<script") {
            let start = from + start;
            let open_end = start + lower[start..].find('>').expect("unclosed <script tag") + 1;
            let close = open_end
                + lower[open_end..]
                    .find("</script>")
                    .expect("<script> without </script>");
            found.push((
                html[start..open_end].to_string(),
                html[open_end..close].to_string(),
            ));
            from = close;
        }
        found
    }

    /// Whether `html` has an attribute like ` onclick=`.
    fn has_event_handler(html: &str) -> bool {
        html.match_indices(" on").any(|(at, _)| {
            let rest = &html[at + 3..];
            let name_len = rest
                .find(|c: char| !c.is_ascii_alphabetic())
                .unwrap_or(rest.len());
            name_len > 0 && rest[name_len..].trim_start().starts_with('=')
        })
    }

    #[test]
    fn the_files_are_embedded() {
        assert!(!INDEX_HTML.trim().is_empty());
        assert!(!APP_CSS.trim().is_empty());
        assert!(!APP_JS.trim().is_empty());
        assert!(INDEX_HTML.contains("\"/dashboard/app.js\""));
        assert!(INDEX_HTML.contains("\"/dashboard/app.css\""));
    }

    #[test]
    fn the_page_has_no_inline_script_or_style() {
        let scripts = script_tags(INDEX_HTML);
        assert!(!scripts.is_empty(), "the page loads no script");
        for (tag, body) in &scripts {
            assert!(tag.contains("src="), "inline script: {tag}");
            assert!(body.trim().is_empty(), "inline script body: {body}");
        }
        let lower = INDEX_HTML.to_ascii_lowercase();
        assert!(!lower.contains("style="), "a style attribute");
        assert!(!lower.contains("<style"), "a <style> element");
        assert!(!has_event_handler(&lower), "an inline event handler");
        // The script never sets markup or styles from strings either.
        for banned in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!APP_JS.contains(banned), "app.js uses {banned}");
        }
        assert!(!APP_JS.contains("setAttribute('style'"));
    }

    #[test]
    fn nothing_is_fetched_from_elsewhere() {
        // The SVG namespace is a name, not an address that is fetched.
        let js = APP_JS.replace("http://www.w3.org/2000/svg", "");
        for (name, text) in [
            ("index.html", INDEX_HTML),
            ("app.css", APP_CSS),
            ("app.js", &js),
        ] {
            let lower = text.to_ascii_lowercase();
            assert!(
                !lower.contains("http://"),
                "{name} names an http:// address"
            );
            assert!(
                !lower.contains("https://"),
                "{name} names an https:// address"
            );
            assert!(!lower.contains("@import"), "{name} imports a stylesheet");
            assert!(!lower.contains("//cdn"), "{name} names a CDN");
        }
    }

    fn header(response: &Response, name: header::HeaderName) -> &str {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    #[tokio::test]
    async fn the_files_are_served_with_their_headers() {
        let page = index().await.into_response();
        assert_eq!(
            header(&page, header::CONTENT_TYPE),
            "text/html; charset=utf-8"
        );
        assert_eq!(header(&page, header::CACHE_CONTROL), "no-cache");
        assert_eq!(
            header(&page, header::CONTENT_SECURITY_POLICY),
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; frame-ancestors 'none'"
        );
        let css = css().await.into_response();
        assert_eq!(header(&css, header::CONTENT_TYPE), "text/css");
        assert_eq!(header(&css, header::CACHE_CONTROL), "no-cache");
        let js = js().await.into_response();
        assert_eq!(header(&js, header::CONTENT_TYPE), "application/javascript");
        assert_eq!(header(&js, header::CACHE_CONTROL), "no-cache");
    }
}

//! Which `Host` names the coordinator answers (`--allowed-hosts`), and
//! which origins may send it control requests: against DNS rebinding (a page
//! whose own name is made to resolve to the coordinator) and cross-site
//! request forgery, which both come from a browser.
//!
//! - A `Host` that is an IP address (with any port) is always served: DNS
//!   rebinding needs a name, and a page at an IP address is the
//!   coordinator's own origin. So are `localhost` and whatever
//!   `--allowed-hosts` lists (`name` for any port, `name:port`, `*.domain`
//!   for its subdomains), or everything with `*`.
//! - Any other `Host` gets 421 Misdirected Request with a JSON message: this
//!   server does not serve that name (it is not a question of rights, which
//!   a 403 would suggest); a request without `Host` gets 400.
//! - A POST with an `Origin` (browsers send it on every cross-origin POST)
//!   is accepted only from the request's own host or a name listed in
//!   `--allowed-hosts` (not `*`); else 403.

use super::error::ApiError;
use crate::serve::App;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::IpAddr;
use std::sync::Arc;

/// One entry of `--allowed-hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    /// `*`: any host.
    Any,
    /// `name` (any port) or `name:port`.
    Exact(String, Option<u16>),
    /// `*.domain` (any port) or `*.domain:port`: subdomains of `domain`.
    Suffix(String, Option<u16>),
}

/// The hosts served, beyond IP addresses and `localhost`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedHosts {
    /// The listed entries.
    rules: Vec<Rule>,
}

/// A `Host` value split in its name (lower case, without a trailing dot;
/// an IPv6 address without its brackets) and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// The name or address.
    pub host: String,
    /// The port, if given.
    pub port: Option<u16>,
}

/// Parses `name`, `name:port`, `1.2.3.4:80`, `[::1]:80`; `None` if it is
/// not a host (empty, stray characters, a bad port).
pub fn parse_host(value: &str) -> Option<HostPort> {
    let (host, port, bracketed) = if let Some(rest) = value.strip_prefix('[') {
        let (addr, after) = rest.split_once(']')?;
        addr.parse::<std::net::Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (addr.to_owned(), port, true)
    } else {
        match value.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p), false),
            None => (value.to_owned(), None, false),
        }
    };
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => Some(p.parse().ok()?),
        Some(_) => return None,
    };
    let host = host.strip_suffix('.').unwrap_or(&host).to_ascii_lowercase();
    let valid = bracketed
        || !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    valid.then_some(HostPort { host, port })
}

impl AllowedHosts {
    /// Parses `--allowed-hosts`: entries separated by commas (or given one
    /// by one); empty entries are skipped.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        let mut rules = Vec::new();
        for entry in entries.iter().flat_map(|e| e.as_ref().split(',')) {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            if entry == "*" {
                rules.push(Rule::Any);
                continue;
            }
            let (wild, rest) = match entry.strip_prefix("*.") {
                Some(rest) => (true, rest),
                None => (false, entry),
            };
            let hp = parse_host(rest)
                .filter(|hp| !wild || !hp.host.is_empty())
                .ok_or_else(|| {
                    format!(
                        "--allowed-hosts: '{entry}' is not a host name, name:port, *.domain or *"
                    )
                })?;
            rules.push(if wild {
                Rule::Suffix(format!(".{}", hp.host), hp.port)
            } else {
                Rule::Exact(hp.host, hp.port)
            });
        }
        Ok(Self { rules })
    }

    /// Whether `*` is listed.
    pub fn any(&self) -> bool {
        self.rules.contains(&Rule::Any)
    }

    /// Whether a listed entry (not `*`) names this host.
    fn listed(&self, hp: &HostPort) -> bool {
        let port_ok = |p: &Option<u16>| p.is_none() || *p == hp.port;
        self.rules.iter().any(|r| match r {
            Rule::Any => false,
            Rule::Exact(h, p) => *h == hp.host && port_ok(p),
            Rule::Suffix(s, p) => hp.host.ends_with(s.as_str()) && port_ok(p),
        })
    }

    /// Whether requests for `Host: value` are served.
    pub fn allows(&self, value: &str) -> bool {
        if self.any() {
            return true;
        }
        let Some(hp) = parse_host(value) else {
            return false;
        };
        hp.host.parse::<IpAddr>().is_ok() || hp.host == "localhost" || self.listed(&hp)
    }

    /// Whether a POST for `Host: host` may come from a page at `origin`
    /// (`scheme://host[:port]`): the same host and port, or a listed name.
    pub fn origin_allowed(&self, origin: &str, host: &str) -> bool {
        let Some((scheme, authority)) = origin.split_once("://") else {
            return false; // `null` (a sandboxed or file page) and garbage
        };
        let default_port = match scheme.to_ascii_lowercase().as_str() {
            "http" => 80,
            "https" => 443,
            _ => return false,
        };
        let (Some(from), Some(to)) = (parse_host(authority), parse_host(host)) else {
            return false;
        };
        let same_host = from.host == to.host
            && from.port.unwrap_or(default_port) == to.port.unwrap_or(default_port);
        same_host || self.listed(&from)
    }
}

/// The host a request is for: its absolute URI's authority, else `Host`.
fn request_host<'a>(uri: &'a axum::http::Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(header::HOST)?.to_str().ok())
}

/// Middleware of every route: refuses hosts not served, and cross-origin POSTs.
pub async fn check(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let hosts = &app.http.config.allowed_hosts;
    let Some(host) = request_host(req.uri(), req.headers()) else {
        return ApiError::bad_request("the request has no Host header").into_response();
    };
    if !hosts.allows(host) {
        return ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "this coordinator does not serve the host name '{}': it answers IP addresses, localhost and the names in --allowed-hosts (GUILDHALL_ALLOWED_HOSTS)",
                host.chars().take(100).collect::<String>()
            ),
        )
        .into_response();
    }
    if req.method() == Method::POST
        && let Some(origin) = req.headers().get(header::ORIGIN)
    {
        let origin = origin.to_str().unwrap_or("");
        if !hosts.origin_allowed(origin, host) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "cross-origin request refused: a page at '{}' may not send commands to this coordinator (list its name in --allowed-hosts if it should)",
                    origin.chars().take(100).collect::<String>()
                ),
            )
            .into_response();
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(entries: &[&str]) -> AllowedHosts {
        AllowedHosts::parse(entries).unwrap()
    }

    #[test]
    fn hosts_are_parsed_with_their_port() {
        let hp = |h: &str, p: Option<u16>| {
            Some(HostPort {
                host: h.into(),
                port: p,
            })
        };
        assert_eq!(parse_host("Example.COM."), hp("example.com", None));
        assert_eq!(parse_host("a.b:8080"), hp("a.b", Some(8080)));
        assert_eq!(parse_host("127.0.0.1:80"), hp("127.0.0.1", Some(80)));
        assert_eq!(parse_host("[::1]:8080"), hp("::1", Some(8080)));
        assert_eq!(parse_host("[::1]"), hp("::1", None));
        for bad in [
            "", ":80", "a:", "a:x", "a:99999", "[::1", "[zz]:1", "[::1]x", "a b", "a/b", "a@b",
            "::1",
        ] {
            assert_eq!(parse_host(bad), None, "{bad}");
        }
    }

    #[test]
    fn ip_addresses_and_localhost_are_always_served_other_names_when_listed() {
        let none = AllowedHosts::default();
        for ok in [
            "127.0.0.1:8080",
            "10.1.2.3:8080",
            "10.1.2.3",
            "[::1]:8080",
            "localhost:8080",
            "LOCALHOST",
        ] {
            assert!(none.allows(ok), "{ok}");
        }
        for refused in [
            "evil.example:8080",
            "coordinator:8080",
            "localhost.evil.example",
            "127.0.0.1.nip.io:8080",
            "",
            "a b",
        ] {
            assert!(!none.allows(refused), "{refused}");
        }
        let some = allowed(&[
            "coordinator, guildhall.example.com:443",
            "*.svc.cluster.local",
        ]);
        assert!(some.allows("coordinator:8080"));
        assert!(some.allows("coordinator"));
        assert!(some.allows("guildhall.example.com:443"));
        assert!(!some.allows("guildhall.example.com:8443"));
        assert!(some.allows("guildhall.ns.svc.cluster.local:8080"));
        assert!(!some.allows("svc.cluster.local"));
        assert!(!some.allows("evil.example"));
        assert!(allowed(&["*"]).allows("anything.example:1"));
    }

    #[test]
    fn bad_entries_are_refused_with_the_flag_named() {
        for bad in ["a b", "x:port", "*.", "http://x", "[::1"] {
            let err = AllowedHosts::parse(&[bad]).unwrap_err();
            assert!(err.starts_with("--allowed-hosts: "), "{err}");
        }
        assert_eq!(allowed(&["", " , "]), AllowedHosts::default());
    }

    #[test]
    fn a_post_may_come_from_its_own_origin_or_a_listed_one() {
        let none = AllowedHosts::default();
        assert!(none.origin_allowed("http://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(none.origin_allowed("https://g.example.com", "g.example.com"));
        assert!(none.origin_allowed("http://g.example.com", "g.example.com:80"));
        // Another port of the same host is another origin (Grafana at :3000).
        assert!(!none.origin_allowed("http://127.0.0.1:3000", "127.0.0.1:8080"));
        assert!(!none.origin_allowed("http://evil.example", "127.0.0.1:8080"));
        assert!(!none.origin_allowed("null", "127.0.0.1:8080"));
        assert!(!none.origin_allowed("file://", "127.0.0.1:8080"));
        // A proxy that rewrites Host: the public name is listed.
        let listed = allowed(&["g.example.com"]);
        assert!(listed.origin_allowed("https://g.example.com", "coordinator:8080"));
        // `*` serves any host but does not let any origin send commands.
        assert!(!allowed(&["*"]).origin_allowed("http://evil.example", "127.0.0.1:8080"));
    }
}

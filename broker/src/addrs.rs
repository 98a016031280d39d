//! Several broker addresses (the nodes of one RabbitMQ cluster) and the
//! choice among them: [`AmqpUrls`], read from `--amqp-url` given several
//! times and from comma-separated lists (`AMQP_URL` likewise), and
//! [`connect_any`], which tries them in a random order so that a fleet
//! spreads over the nodes, and returns the first that answers.
//!
//! # The list rule
//!
//! Entries are separated by commas; spaces around an entry are dropped.
//! A comma is never part of an `amqp://` URL's authority as Guildhall uses
//! them (host names, addresses and ports hold none), so the only place one
//! could appear is a user name or password, or a query value (a TLS file
//! path): there it must be percent-encoded, `%2C`. In a list of several,
//! an entry that does not start with `amqp://` or `amqps://` is refused
//! with that advice, and without showing the entry (it may be the tail of
//! a password); a single entry gets [`AmqpUrl::parse`]'s own error. Empty
//! entries (a stray comma) are refused too. Every entry must name the same
//! virtual host and the same user: they are the nodes of one cluster, and
//! an agent's events carry the user as `user_id`, which the broker checks.
//!
//! No error or log line shows a password: addresses are shown with
//! [`crate::connect::redact`].

use crate::BrokerError;
use crate::connect::{AmqpUrl, connect};
use crate::tls::{CaBundle, TlsError, TlsFiles};
use lapin::Connection;
use rand::seq::SliceRandom;
use std::time::Duration;

/// Most addresses a list may hold: far more than any cluster has nodes,
/// few enough that one connect round stays bounded.
pub const MAX_ADDRESSES: usize = 256;

/// A non-empty list of broker addresses: the nodes of one cluster, in the
/// order given. `Debug` and [`AmqpUrls::redacted`] show no password.
#[derive(Clone)]
pub struct AmqpUrls {
    /// The addresses, at least one, all with the same virtual host and user.
    urls: Vec<AmqpUrl>,
}

impl std::fmt::Debug for AmqpUrls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.urls).finish()
    }
}

impl From<AmqpUrl> for AmqpUrls {
    fn from(url: AmqpUrl) -> Self {
        Self { urls: vec![url] }
    }
}

/// A list-level error (no entry shown, so no password either).
fn list_error(reason: String) -> BrokerError {
    BrokerError::InvalidUrlList(reason)
}

/// The entries of `values` (each a flag's value or a comma list), trimmed,
/// checked for emptiness and for a scheme; nothing of an entry is shown.
pub fn split_list<S: AsRef<str>>(values: &[S]) -> Result<Vec<&str>, BrokerError> {
    let entries: Vec<&str> = values
        .iter()
        .flat_map(|v| v.as_ref().split(','))
        .map(str::trim)
        .collect();
    let total = entries.len();
    if entries.iter().all(|e| e.is_empty()) {
        return Err(list_error("no address given".into()));
    }
    if total > MAX_ADDRESSES {
        return Err(list_error(format!(
            "{total} addresses, at most {MAX_ADDRESSES}"
        )));
    }
    for (i, entry) in entries.iter().enumerate() {
        let n = i + 1;
        if entry.is_empty() {
            return Err(list_error(format!(
                "entry {n} of {total} is empty: separate addresses with single commas"
            )));
        }
        // One entry: [`AmqpUrl::parse`] says what is wrong with it, as it
        // always did. Several: an entry without a scheme may be the tail of
        // a password cut at a comma, so none of the list is parsed.
        let lower = entry.get(..8).unwrap_or(entry).to_ascii_lowercase();
        if total > 1 && !lower.starts_with("amqp://") && !lower.starts_with("amqps://") {
            return Err(list_error(format!(
                "entry {n} of {total} does not start with amqp:// or amqps:// \
                 (entries are separated by commas: write a comma inside a user name or password as %2C)"
            )));
        }
    }
    Ok(entries)
}

/// A list of addresses as given (one, or comma-separated), each without
/// its password, for `Debug` forms of configurations that keep the raw
/// string. A list whose shape is wrong (an entry without a scheme: maybe a
/// password cut at a comma) is not shown at all.
pub fn redact_list(raw: &str) -> String {
    match split_list(&[raw]) {
        Ok(entries) => entries
            .iter()
            .map(|e| crate::connect::redact(e))
            .collect::<Vec<_>>()
            .join(","),
        Err(_) => "(not a valid list of addresses)".into(),
    }
}

impl AmqpUrls {
    /// Parses a comma-separated list (see the module's rule); each entry as
    /// [`AmqpUrl::parse`] does.
    pub fn parse(raw: &str) -> Result<Self, BrokerError> {
        Self::from_values(&[raw])
    }

    /// Parses the values of a repeated flag, each a single address or a
    /// comma-separated list; entries are numbered across all values.
    pub fn from_values<S: AsRef<str>>(values: &[S]) -> Result<Self, BrokerError> {
        let entries = split_list(values)?;
        let total = entries.len();
        let mut urls = Vec::with_capacity(total);
        for (i, entry) in entries.iter().enumerate() {
            let url = AmqpUrl::parse(entry).map_err(|e| match e {
                BrokerError::InvalidUrl { url, reason } if total > 1 => BrokerError::InvalidUrl {
                    url,
                    reason: format!("(entry {} of {total}) {reason}", i + 1),
                },
                other => other,
            })?;
            urls.push(url);
        }
        Self::new(urls)
    }

    /// A list of parsed addresses: at least one, all with the first's
    /// virtual host and user.
    pub fn new(urls: Vec<AmqpUrl>) -> Result<Self, BrokerError> {
        let Some(first) = urls.first() else {
            return Err(list_error("no address given".into()));
        };
        let total = urls.len();
        for (i, url) in urls.iter().enumerate().skip(1) {
            if url.vhost() != first.vhost() {
                return Err(list_error(format!(
                    "entry {} of {total} names virtual host {:?}, entry 1 {:?}: \
                     every address must be a node of the same cluster and virtual host",
                    i + 1,
                    url.vhost(),
                    first.vhost()
                )));
            }
            if url.user_id() != first.user_id() {
                return Err(list_error(format!(
                    "entry {} of {total} logs in as {:?}, entry 1 as {:?}: \
                     every address must use the same user",
                    i + 1,
                    url.user_id().unwrap_or("(none)"),
                    first.user_id().unwrap_or("(none)")
                )));
            }
        }
        Ok(Self { urls })
    }

    /// Every address with an AMQP heartbeat of `seconds` (see
    /// [`AmqpUrl::with_heartbeat`]).
    pub fn with_heartbeat(&self, seconds: u16) -> Self {
        Self {
            urls: self
                .urls
                .iter()
                .map(|u| u.clone().with_heartbeat(seconds))
                .collect(),
        }
    }

    /// Every address with the TLS files given by flags (see
    /// [`AmqpUrl::with_tls_files`]).
    pub fn with_tls_files(self, files: &TlsFiles) -> Result<Self, TlsError> {
        let urls = self
            .urls
            .into_iter()
            .map(|u| u.with_tls_files(files))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { urls })
    }

    /// The first address given: its virtual host, user and CA are every
    /// address's.
    pub fn first(&self) -> &AmqpUrl {
        // `urls` is never empty (checked by `new`).
        &self.urls[0]
    }

    /// The addresses, in the order given.
    pub fn iter(&self) -> std::slice::Iter<'_, AmqpUrl> {
        self.urls.iter()
    }

    /// How many addresses.
    pub fn len(&self) -> usize {
        self.urls.len()
    }

    /// Always false: a list holds at least one address.
    pub fn is_empty(&self) -> bool {
        self.urls.is_empty()
    }

    /// The list as a comma-separated string, each address as
    /// [`AmqpUrl::raw`]: what to hand to an agent or a child process.
    /// **Holds the passwords**: never log it.
    pub fn raw(&self) -> String {
        self.urls
            .iter()
            .map(AmqpUrl::raw)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The list without passwords, for log lines and errors.
    pub fn redacted(&self) -> String {
        self.urls
            .iter()
            .map(AmqpUrl::redacted)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The virtual host (every address's).
    pub fn vhost(&self) -> &str {
        self.first().vhost()
    }

    /// The user the broker knows connections by (see [`AmqpUrl::user_id`]).
    pub fn user_id(&self) -> Option<&str> {
        self.first().user_id()
    }

    /// The user name (the first address's).
    pub fn username(&self) -> &str {
        self.first().username()
    }

    /// The first address's extra CA certificates (see [`AmqpUrl::ca`]).
    pub fn ca(&self) -> Option<&CaBundle> {
        self.first().ca()
    }

    /// The first address's host.
    pub fn host(&self) -> &str {
        self.first().host()
    }

    /// The order to try the addresses in: shuffled, with `last` (the one
    /// connected to before, whose connection was lost) at the end.
    pub fn order(&self, last: Option<usize>) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.urls.len()).collect();
        order.shuffle(&mut rand::rng());
        if let Some(last) = last
            && let Some(pos) = order.iter().position(|&i| i == last)
        {
            order.remove(pos);
            order.push(last);
        }
        order
    }
}

/// How long one connection attempt may take, handshake included: the
/// URL's `connection_timeout` (which the client applies to the TCP connect
/// only), so a node that accepts connections but does not answer (a frozen
/// process) does not hold up the others.
fn attempt_timeout(url: &AmqpUrl) -> Duration {
    Duration::from_millis(url.connect_timeout_ms())
}

/// Opens a connection named `name` to one of `urls`, trying each once in
/// the order of [`AmqpUrls::order`] (`last`: the address of a connection
/// just lost, tried last); each attempt is bounded by the URL's connect
/// timeout. Returns the connection and the index of the address that
/// answered. With one address, its error as [`connect`] gives it; with
/// several, one error listing every address (redacted) and what it said.
pub async fn connect_any(
    urls: &AmqpUrls,
    name: &str,
    last: Option<usize>,
) -> Result<(Connection, usize), BrokerError> {
    let mut failures = Vec::new();
    let mut skipped = Vec::new();
    for index in urls.order(last) {
        let url = &urls.urls[index];
        let attempt = tokio::time::timeout(attempt_timeout(url), connect(url, name)).await;
        let err = match attempt {
            Ok(Ok(conn)) => {
                if !skipped.is_empty() {
                    tracing::info!(
                        broker = %url.redacted(),
                        "connected as {name}; no answer from {}",
                        skipped.join(", ")
                    );
                }
                return Ok((conn, index));
            }
            Ok(Err(err)) => err,
            Err(_) => BrokerError::ConnectTimeout {
                url: url.redacted(),
                ms: attempt_timeout(url).as_millis() as u64,
            },
        };
        if urls.len() > 1 {
            tracing::debug!("{name}: {err}");
        }
        skipped.push(url.redacted());
        failures.push(err);
    }
    if failures.len() == 1 {
        return Err(failures.remove(0));
    }
    Err(BrokerError::ConnectAny(failures))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const SECRET: &str = "s3cr3t";

    fn url(host: &str) -> String {
        format!("amqp://guest:{SECRET}@{host}:5672/%2f")
    }

    #[test]
    fn a_comma_list_and_repeated_values_give_every_address_in_order() {
        let urls = AmqpUrls::parse(&format!("{}, {} ,{}", url("a"), url("b"), url("c"))).unwrap();
        let hosts: Vec<&str> = urls.iter().map(AmqpUrl::host).collect();
        assert_eq!(hosts, ["a", "b", "c"]);
        let urls =
            AmqpUrls::from_values(&[url("a"), format!("{},{}", url("b"), url("c"))]).unwrap();
        let hosts: Vec<&str> = urls.iter().map(AmqpUrl::host).collect();
        assert_eq!(hosts, ["a", "b", "c"]);
        assert_eq!(urls.len(), 3);
        assert_eq!(urls.vhost(), "/");
        assert_eq!(urls.user_id(), Some("guest"));
        // raw() round-trips; it is the only form with passwords.
        let again = AmqpUrls::parse(&urls.raw()).unwrap();
        assert_eq!(again.raw(), urls.raw());
        // One address: as before.
        let one = AmqpUrls::parse(&url("a")).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one.raw(), url("a"));
    }

    #[test]
    fn empty_entries_are_refused_in_one_line() {
        for raw in [
            String::new(),
            " ".into(),
            ",".into(),
            format!("{},", url("a")),
            format!(",{}", url("a")),
            format!("{},,{}", url("a"), url("b")),
            format!("{}, ,{}", url("a"), url("b")),
        ] {
            let err = AmqpUrls::parse(&raw).unwrap_err().to_string();
            assert!(
                err.contains("empty") || err.contains("no address"),
                "{raw}: {err}"
            );
            assert!(!err.contains('\n'), "{err}");
            assert!(!err.contains(SECRET), "{err}");
        }
        let err = AmqpUrls::from_values(&[url("a"), String::new()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("entry 2 of 2 is empty"), "{err}");
    }

    #[test]
    fn a_single_bad_url_keeps_its_own_error() {
        let err = AmqpUrls::parse(&format!("http://guest:{SECRET}@h/"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("invalid AMQP URL "), "{err}");
        assert!(!err.contains("entry"), "{err}");
        assert!(!err.contains(SECRET), "{err}");
    }

    #[test]
    fn display_and_debug_hide_every_password() {
        let urls = AmqpUrls::parse(&format!("{},{}", url("a"), url("b"))).unwrap();
        for shown in [urls.redacted(), format!("{urls:?}")] {
            assert!(!shown.contains(SECRET), "{shown}");
            assert!(shown.contains("guest:***@a"), "{shown}");
            assert!(shown.contains("guest:***@b"), "{shown}");
        }
        assert!(urls.raw().contains(SECRET));
    }

    #[test]
    fn a_bad_second_address_is_named_without_any_password() {
        for second in [
            format!("http://guest:{SECRET}@b/"),
            format!("amqp://guest:{SECRET}@b:notaport/%2f"),
            format!("amqp://guest:{SECRET}@b/%2f?cacertfile=/etc/ca.pem"),
            format!("amqps://guest:{SECRET}@b/%2f?verify=verify_none"),
            format!("amqps://guest:{SECRET}@b/%2f?cacertfile=/nonexistent/ca.pem"),
            format!("amqp://guest:{SECRET}@b/other"),
            format!("amqp://other:{SECRET}@b/%2f"),
        ] {
            let err = AmqpUrls::parse(&format!("{},{second}", url("a")))
                .unwrap_err()
                .to_string();
            assert!(!err.contains(SECRET), "{second}: {err}");
            assert!(!err.contains('\n'), "{err}");
            assert!(err.contains("entry 2 of 2"), "{second}: {err}");
        }
    }

    #[test]
    fn redact_list_hides_every_password_of_a_raw_list() {
        let raw = format!("{},{}", url("a"), url("b"));
        // What a single-URL redaction made of it: the second password shown.
        assert!(crate::connect::redact(&raw).contains(SECRET));
        let shown = redact_list(&raw);
        assert_eq!(
            shown,
            "amqp://guest:***@a:5672/%2f,amqp://guest:***@b:5672/%2f"
        );
        let shown = redact_list("amqp://guest:pa,ss@h:5672/%2f");
        assert!(!shown.contains("pa") && !shown.contains("ss@"), "{shown}");
    }

    #[test]
    fn a_comma_in_a_password_is_refused_with_the_percent_encoding_to_use() {
        let raw = "amqp://guest:pa,ss@h:5672/%2f";
        let err = AmqpUrls::parse(raw).unwrap_err().to_string();
        assert!(err.contains("%2C"), "{err}");
        assert!(err.contains("entry 2 of 2"), "{err}");
        assert!(!err.contains("guest:pa") && !err.contains("ss@h"), "{err}");
        // Encoded, it is one address with the password `pa,ss`.
        let urls = AmqpUrls::parse("amqp://guest:pa%2Css@h:5672/%2f").unwrap();
        assert_eq!(urls.len(), 1);
        assert_eq!(urls.first().password(), "pa,ss");
        assert!(!urls.redacted().contains("pa"), "{}", urls.redacted());
    }

    #[test]
    fn hostile_lists() {
        // A hundred addresses: accepted, and the order covers them all.
        let many: Vec<String> = (0..100).map(|i| url(&format!("n{i}"))).collect();
        let urls = AmqpUrls::parse(&many.join(",")).unwrap();
        assert_eq!(urls.len(), 100);
        let order = urls.order(Some(7));
        assert_eq!(order.iter().copied().collect::<HashSet<_>>().len(), 100);
        assert_eq!(order.last(), Some(&7));
        // Too many: refused without listing them.
        let too_many: Vec<String> = (0..=MAX_ADDRESSES).map(|i| url(&format!("n{i}"))).collect();
        let err = AmqpUrls::parse(&too_many.join(","))
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most"), "{err}");
        assert!(!err.contains(SECRET), "{err}");
        // Garbage of every kind: an error, never a panic or a password.
        for raw in [
            "amqp://",
            "amqp://,amqp://",
            "amqp://guest:s3cr3t@",
            "AMQP://guest:s3cr3t@h/%2f,amqp://guest:s3cr3t@[::1",
            "amqp://guest:s3cr3t@h/%2f,amqps://guest:s3cr3t@h:99999/%2f",
            "amqp://guest:s3cr3t@h/%2f,\u{0}",
            "amqp://guest:s3cr3t@h/%2f,ámqp://x",
        ] {
            if let Err(e) = AmqpUrls::parse(raw) {
                let e = e.to_string();
                assert!(!e.contains(SECRET), "{raw}: {e}");
            }
        }
    }

    #[test]
    fn the_order_is_shuffled_and_covers_every_address() {
        let urls = AmqpUrls::parse(&format!("{},{},{}", url("a"), url("b"), url("c"))).unwrap();
        let mut firsts = HashSet::new();
        for _ in 0..200 {
            let order = urls.order(None);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, [0, 1, 2]);
            firsts.insert(order[0]);
            assert_eq!(urls.order(Some(1))[2], 1);
        }
        assert_eq!(firsts.len(), 3, "every address comes first sometimes");
    }

    #[tokio::test]
    async fn connect_any_lists_every_refusal_without_passwords() {
        // Ports nobody listens on (1 and 9, refused at once on loopback).
        let urls = AmqpUrls::parse(&format!(
            "amqp://guest:{SECRET}@127.0.0.1:1/%2f,amqp://guest:{SECRET}@127.0.0.1:9/%2f"
        ))
        .unwrap();
        let err = connect_any(&urls, "test", None).await.unwrap_err();
        assert!(matches!(&err, BrokerError::ConnectAny(f) if f.len() == 2));
        let text = err.to_string();
        assert!(!text.contains(SECRET), "{text}");
        assert!(
            text.contains("127.0.0.1:1") && text.contains("127.0.0.1:9"),
            "{text}"
        );
        assert!(
            text.starts_with("cannot reach RabbitMQ at any of 2 addresses"),
            "{text}"
        );
        // One address: the error as it always was.
        let one = AmqpUrls::parse(&format!("amqp://guest:{SECRET}@127.0.0.1:1/%2f")).unwrap();
        let err = connect_any(&one, "test", None).await.unwrap_err();
        assert!(matches!(err, BrokerError::Connect { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_node_that_accepts_but_never_answers_is_given_up_after_the_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let urls = AmqpUrls::parse(&format!(
            "amqp://guest:{SECRET}@127.0.0.1:{port}/%2f?connection_timeout=300"
        ))
        .unwrap();
        let started = std::time::Instant::now();
        let err = connect_any(&urls, "test", None).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3), "{err}");
        assert!(matches!(err, BrokerError::ConnectTimeout { .. }), "{err}");
        drop(listener);
    }
}

//! A small client for the RabbitMQ management HTTP API: the only source of
//! unacked counts, and the way to close a frozen agent's connection.
//!
//! Plain HTTP calls rather than `rabbitmq_http_client`, whose types target
//! 3.13/4.x and lack `messages_ready` on 3.10. Over `https://`, the
//! certificate is verified against the system's roots plus an optional CA
//! bundle ([`Management::with_ca`]).

use reqwest::{Client, StatusCode, Url};
use serde::Deserialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Errors from the management API.
#[derive(Debug, thiserror::Error)]
pub enum ManagementError {
    /// The management URL is not a valid `http(s)://` URL.
    #[error("invalid management URL: {0}")]
    InvalidUrl(String),
    /// The CA bundle cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// No answer (plugin disabled, wrong port, network, a certificate not
    /// trusted): the message carries reqwest's causes, which say which.
    #[error("management API unreachable at {url}: {}", crate::one_line(&crate::error_chain(source)))]
    Unreachable {
        /// The URL without credentials.
        url: String,
        /// The HTTP client's error.
        source: reqwest::Error,
    },
    /// An answer other than success (401 wrong credentials, 404 ...).
    #[error("management API answered {status} for {what}")]
    Status {
        /// HTTP status.
        status: StatusCode,
        /// What was asked.
        what: String,
    },
    /// An answer that is not the expected JSON.
    #[error("management API sent unexpected JSON for {what}: {source}")]
    Decode {
        /// What was asked.
        what: String,
        /// The parse error.
        source: reqwest::Error,
    },
}

/// Counts the broker keeps for a queue (refreshed every 5 s by default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct QueueInfo {
    /// Queue name.
    pub name: String,
    /// Ready messages.
    #[serde(default)]
    pub messages_ready: u64,
    /// Delivered, not yet acknowledged.
    #[serde(default)]
    pub messages_unacknowledged: u64,
    /// Consumers attached.
    #[serde(default)]
    pub consumers: u64,
}

/// A connection as the management API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ConnectionInfo {
    /// The broker's name for it, `"ip:port -> ip:port"`: what `DELETE` takes.
    pub name: String,
    /// The name the client gave (`guildhall-agent/<namespace>/<id>`), if any.
    #[serde(default)]
    pub user_provided_name: Option<String>,
}

#[derive(Deserialize)]
struct Named {
    name: String,
}

/// One management API address.
#[derive(Debug, Clone)]
struct Endpoint {
    /// Base URL without credentials.
    base: Url,
    /// User name for basic auth.
    user: String,
    /// Password for basic auth.
    password: String,
}

impl Endpoint {
    /// One `http(s)://` URL, its credentials taken apart (`guest` when
    /// absent); the error names no credential.
    fn parse(url: &str) -> Result<Self, String> {
        let mut base = Url::parse(url).map_err(|e| e.to_string())?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(format!("{}: expected http:// or https://", base.scheme()));
        }
        let user = percent_decode(base.username());
        let password = percent_decode(base.password().unwrap_or(""));
        let _ = base.set_username("");
        let _ = base.set_password(None);
        let or_guest = |s: String| if s.is_empty() { "guest".into() } else { s };
        Ok(Self {
            base,
            user: or_guest(user),
            password: or_guest(password),
        })
    }

    /// `/api/<segments...>` under this base, each segment percent-encoded.
    fn url_for(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty();
            path.push("api");
            path.extend(segments);
        }
        url
    }
}

/// Management API client for one broker (or the nodes of one cluster,
/// each with its own management listener) and virtual host.
///
/// Given several URLs (comma-separated), a call goes to the one that
/// answered last and, when it gives no HTTP answer at all, to the others
/// in turn: any answer, an error status included, ends the call.
#[derive(Debug, Clone)]
pub struct Management {
    /// The addresses, at least one, in the order given.
    endpoints: Arc<Vec<Endpoint>>,
    /// Index of the address that answered last, tried first.
    current: Arc<AtomicUsize>,
    /// The virtual host everything is looked up in.
    vhost: String,
    /// HTTP client with a short timeout: callers poll, they must not hang.
    http: Client,
}

impl Management {
    /// A client for `url` (`http://user:pass@host:15672`, or several such
    /// separated by commas: the nodes of a cluster), scoped to `vhost`.
    pub fn new(url: &str, vhost: &str) -> Result<Self, ManagementError> {
        Self::with_ca(url, vhost, None)
    }

    /// A client for `url` (one or a comma-separated list) that also trusts
    /// the certificates of `ca` (for `https://` with a private CA; unused
    /// over `http://`). A comma inside a user name or password must be
    /// written `%2C`.
    pub fn with_ca(
        url: &str,
        vhost: &str,
        ca: Option<&crate::tls::CaBundle>,
    ) -> Result<Self, ManagementError> {
        let entries: Vec<&str> = url.split(',').map(str::trim).collect();
        let total = entries.len();
        let which = |i: usize| {
            if total > 1 {
                format!("entry {} of {total}: ", i + 1)
            } else {
                String::new()
            }
        };
        // The list's shape first, so that the head of a password cut at a
        // comma is not parsed (and named) as an address of its own.
        for (i, entry) in entries.iter().enumerate() {
            if total == 1 {
                break;
            }
            if entry.is_empty() {
                return Err(ManagementError::InvalidUrl(format!(
                    "{}empty: separate addresses with single commas",
                    which(i)
                )));
            }
            let lower = entry.get(..8).unwrap_or(entry).to_ascii_lowercase();
            if !lower.starts_with("http://") && !lower.starts_with("https://") {
                return Err(ManagementError::InvalidUrl(format!(
                    "{}does not start with http:// or https:// \
                     (entries are separated by commas: write a comma inside a user name or password as %2C)",
                    which(i)
                )));
            }
        }
        let mut endpoints = Vec::with_capacity(total);
        for (i, entry) in entries.iter().enumerate() {
            endpoints.push(
                Endpoint::parse(entry)
                    .map_err(|e| ManagementError::InvalidUrl(format!("{}{e}", which(i))))?,
            );
        }
        let mut builder = Client::builder().timeout(Duration::from_secs(5));
        if let Some(ca) = ca {
            builder = builder.tls_certs_merge(ca.reqwest_certificates()?);
        }
        let http = builder
            .build()
            .map_err(|e| ManagementError::InvalidUrl(crate::error_chain(&e)))?;
        Ok(Self {
            endpoints: Arc::new(endpoints),
            current: Arc::new(AtomicUsize::new(0)),
            vhost: vhost.to_owned(),
            http,
        })
    }

    /// The address calls go to first (the one that answered last).
    fn endpoint(&self) -> &Endpoint {
        let i = self.current.load(Ordering::Relaxed) % self.endpoints.len();
        &self.endpoints[i]
    }

    /// An authenticated request to `/api/<segments...>` (each segment
    /// percent-encoded) at the address that answered last, for calls this
    /// client has no method of its own for (tests, admin tooling).
    pub fn request(&self, method: reqwest::Method, segments: &[&str]) -> reqwest::RequestBuilder {
        let endpoint = self.endpoint();
        self.http
            .request(method, endpoint.url_for(segments))
            .basic_auth(&endpoint.user, Some(&endpoint.password))
    }

    /// The base URL of the address that answered last, without credentials.
    pub fn url(&self) -> String {
        self.endpoint().base.to_string()
    }

    /// Every base URL, without credentials, comma-separated.
    pub fn urls(&self) -> String {
        self.endpoints
            .iter()
            .map(|e| e.base.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Sends `method` to `/api/<segments...>`, at the address that answered
    /// last, then at each other one while none gives an HTTP answer.
    async fn send(
        &self,
        method: reqwest::Method,
        segments: &[&str],
        query: Option<&str>,
        reason: Option<&str>,
    ) -> Result<reqwest::Response, ManagementError> {
        let n = self.endpoints.len();
        let start = self.current.load(Ordering::Relaxed) % n;
        let mut last_error = None;
        for k in 0..n {
            let i = (start + k) % n;
            let endpoint = &self.endpoints[i];
            let mut url = endpoint.url_for(segments);
            url.set_query(query);
            let mut request = self
                .http
                .request(method.clone(), url)
                .basic_auth(&endpoint.user, Some(&endpoint.password));
            if let Some(reason) = reason {
                request = request.header("X-Reason", reason);
            }
            match request.send().await {
                Ok(response) => {
                    if i != start {
                        self.current.store(i, Ordering::Relaxed);
                    }
                    return Ok(response);
                }
                Err(source) => last_error = Some(source),
            }
        }
        match last_error {
            Some(source) => Err(ManagementError::Unreachable {
                url: self.urls(),
                source,
            }),
            // `endpoints` is never empty, so the loop ran.
            None => Err(ManagementError::InvalidUrl("no address".into())),
        }
    }

    async fn get<T: for<'de> Deserialize<'de>>(
        &self,
        segments: &[&str],
        query: Option<&str>,
        what: &str,
    ) -> Result<Option<T>, ManagementError> {
        let response = self
            .send(reqwest::Method::GET, segments, query, None)
            .await?;
        match response.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => {
                response
                    .json()
                    .await
                    .map(Some)
                    .map_err(|source| ManagementError::Decode {
                        what: what.to_owned(),
                        source,
                    })
            }
            status => Err(ManagementError::Status {
                status,
                what: what.to_owned(),
            }),
        }
    }

    async fn delete(
        &self,
        segments: &[&str],
        what: &str,
        reason: &str,
    ) -> Result<bool, ManagementError> {
        let response = self
            .send(reqwest::Method::DELETE, segments, None, Some(reason))
            .await?;
        match response.status() {
            StatusCode::NOT_FOUND => Ok(false),
            s if s.is_success() => Ok(true),
            status => Err(ManagementError::Status {
                status,
                what: what.to_owned(),
            }),
        }
    }

    /// Checks that the API answers and the credentials work.
    pub async fn check(&self) -> Result<(), ManagementError> {
        #[derive(Deserialize)]
        struct Overview {}
        self.get::<Overview>(&["overview"], None, "overview")
            .await?
            .ok_or(ManagementError::Status {
                status: StatusCode::NOT_FOUND,
                what: "overview".into(),
            })
            .map(|_| ())
    }

    /// `RabbitMQ <version> (Erlang <version>)`, from the overview.
    pub async fn broker_version(&self) -> Result<String, ManagementError> {
        #[derive(Deserialize)]
        struct Overview {
            rabbitmq_version: Option<String>,
            erlang_version: Option<String>,
        }
        let o = self
            .get::<Overview>(&["overview"], None, "overview")
            .await?
            .ok_or(ManagementError::Status {
                status: StatusCode::NOT_FOUND,
                what: "overview".into(),
            })?;
        let unknown = || "unknown".to_string();
        Ok(format!(
            "RabbitMQ {} (Erlang {})",
            o.rabbitmq_version.unwrap_or_else(unknown),
            o.erlang_version.unwrap_or_else(unknown)
        ))
    }

    /// One queue's counts; `None` if it does not exist.
    pub async fn queue(&self, name: &str) -> Result<Option<QueueInfo>, ManagementError> {
        self.get(
            &["queues", &self.vhost, name],
            None,
            &format!("queue {name}"),
        )
        .await
    }

    /// Every queue of the virtual host whose name starts with `prefix`.
    pub async fn queues_with_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<QueueInfo>, ManagementError> {
        let columns = "columns=name,messages_ready,messages_unacknowledged,consumers";
        let all: Vec<QueueInfo> = self
            .get(&["queues", &self.vhost], Some(columns), "queues")
            .await?
            .unwrap_or_default();
        Ok(all
            .into_iter()
            .filter(|q| q.name.starts_with(prefix))
            .collect())
    }

    /// Every exchange of the virtual host whose name starts with `prefix`.
    pub async fn exchanges_with_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<String>, ManagementError> {
        let all: Vec<Named> = self
            .get(
                &["exchanges", &self.vhost],
                Some("columns=name"),
                "exchanges",
            )
            .await?
            .unwrap_or_default();
        Ok(all
            .into_iter()
            .map(|e| e.name)
            .filter(|n| n.starts_with(prefix))
            .collect())
    }

    /// Every client connection to this client's vhost (another vhost may
    /// hold another deployment's agent of the same id: never touch it).
    pub async fn connections(&self) -> Result<Vec<ConnectionInfo>, ManagementError> {
        let columns = "columns=name,user_provided_name";
        let segments = ["vhosts", &self.vhost, "connections"];
        Ok(self
            .get(&segments, Some(columns), "connections")
            .await?
            .unwrap_or_default())
    }

    /// Closes connections whose client-given name is `user_provided_name`.
    /// Returns how many were closed.
    pub async fn close_connections_named(
        &self,
        user_provided_name: &str,
        reason: &str,
    ) -> Result<usize, ManagementError> {
        let mut closed = 0;
        for conn in self.connections().await? {
            if conn.user_provided_name.as_deref() == Some(user_provided_name)
                && self
                    .delete(&["connections", &conn.name], "connection", reason)
                    .await?
            {
                closed += 1;
            }
        }
        Ok(closed)
    }

    /// Deletes a queue; `false` if it did not exist.
    pub async fn delete_queue(&self, name: &str) -> Result<bool, ManagementError> {
        let segments = ["queues", &self.vhost, name];
        self.delete(&segments, &format!("queue {name}"), "deleted")
            .await
    }

    /// Deletes an exchange; `false` if it did not exist.
    pub async fn delete_exchange(&self, name: &str) -> Result<bool, ManagementError> {
        let segments = ["exchanges", &self.vhost, name];
        self.delete(&segments, &format!("exchange {name}"), "deleted")
            .await
    }

    /// Deletes every queue and exchange whose name starts with `prefix`
    /// (`<ns>.`): how tests and `demo --clean` leave nothing behind. Carries
    /// on past a failed delete (a live agent's exclusive queue, say) and
    /// returns the first error after trying everything.
    pub async fn delete_all_with_prefix(&self, prefix: &str) -> Result<usize, ManagementError> {
        let mut n = 0;
        let mut first_error = None;
        for q in self.queues_with_prefix(prefix).await? {
            match self.delete_queue(&q.name).await {
                Ok(deleted) => n += usize::from(deleted),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        for e in self.exchanges_with_prefix(prefix).await? {
            match self.delete_exchange(&e).await {
                Ok(deleted) => n += usize::from(deleted),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_percent_encoded_and_credentials_kept_apart() {
        let m = Management::new("http://u%40x:p%2Fw@127.0.0.1:15672", "/").unwrap();
        assert_eq!(m.endpoint().user, "u@x");
        assert_eq!(m.endpoint().password, "p/w");
        assert!(!m.url().contains("u%40x"));
        let url = m.endpoint().url_for(&["queues", "/", "ns.stage.a"]);
        assert_eq!(url.path(), "/api/queues/%2F/ns.stage.a");
        let url = m
            .endpoint()
            .url_for(&["connections", "127.0.0.1:1 -> 127.0.0.1:5672"]);
        assert_eq!(
            url.path(),
            "/api/connections/127.0.0.1:1%20-%3E%20127.0.0.1:5672"
        );
    }

    #[test]
    fn several_urls_are_each_parsed_and_errors_show_no_credentials() {
        let m = Management::new("http://a:pa@h1:15672, http://b:pb@h2:15672", "/").unwrap();
        assert_eq!(m.urls(), "http://h1:15672/,http://h2:15672/");
        assert_eq!(m.endpoint().user, "a");
        for bad in [
            "http://u:s3cr3t@h1:15672,",
            "http://u:s3cr3t@h1:15672,,http://u:s3cr3t@h2:15672",
            // A comma in the password, unencoded.
            "http://u:s3,cr3t@h1:15672",
            "http://u:s3cr3t@h1:15672,amqp://u:s3cr3t@h2",
            "http://u:s3cr3t@h1:15672,http://u:s3cr3t@h2:notaport",
        ] {
            let err = Management::new(bad, "/").unwrap_err().to_string();
            assert!(err.contains("entry "), "{bad}: {err}");
            assert!(!err.contains("s3") && !err.contains("cr3t"), "{bad}: {err}");
        }
        let err = Management::new("http://u:s3,cr3t@h1:15672", "/")
            .unwrap_err()
            .to_string();
        assert!(err.contains("%2C"), "{err}");
    }

    #[tokio::test]
    async fn a_call_moves_on_to_the_address_that_answers_and_stays_there() {
        // Port 1 refuses; the second address is the local broker's API.
        let m = Management::new(
            "http://guest:guest@127.0.0.1:1,http://guest:guest@127.0.0.1:15672",
            "/",
        )
        .unwrap();
        if m.check().await.is_err() {
            eprintln!("no management API at 127.0.0.1:15672: skipped");
            return;
        }
        assert_eq!(m.url(), "http://127.0.0.1:15672/");
        // None answers: one error naming both, without credentials.
        let m = Management::new(
            "http://guest:s3cr3t@127.0.0.1:1,http://guest:s3cr3t@127.0.0.1:9",
            "/",
        )
        .unwrap();
        let err = m.check().await.unwrap_err().to_string();
        assert!(err.contains("127.0.0.1:1/,http://127.0.0.1:9/"), "{err}");
        assert!(!err.contains("s3cr3t"), "{err}");
    }

    #[test]
    fn refuses_non_http_urls() {
        assert!(Management::new("amqp://h", "/").is_err());
        assert!(Management::new("not a url", "/").is_err());
    }
}

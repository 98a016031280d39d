//! A small client for the RabbitMQ management HTTP API: the only source of
//! unacked counts, and the way to close a frozen agent's connection.
//!
//! Plain HTTP calls rather than `rabbitmq_http_client`, whose types target
//! 3.13/4.x and lack `messages_ready` on 3.10. Over `https://`, the
//! certificate is verified against the system's roots plus an optional CA
//! bundle ([`Management::with_ca`]).

use reqwest::{Client, StatusCode, Url};
use serde::Deserialize;
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

/// Management API client for one broker and virtual host.
#[derive(Debug, Clone)]
pub struct Management {
    /// Base URL without credentials.
    base: Url,
    /// User name for basic auth.
    user: String,
    /// Password for basic auth.
    password: String,
    /// The virtual host everything is looked up in.
    vhost: String,
    /// HTTP client with a short timeout: callers poll, they must not hang.
    http: Client,
}

impl Management {
    /// A client for `url` (`http://user:pass@host:15672`), scoped to `vhost`.
    pub fn new(url: &str, vhost: &str) -> Result<Self, ManagementError> {
        Self::with_ca(url, vhost, None)
    }

    /// A client for `url` that also trusts the certificates of `ca` (for
    /// `https://` with a private CA; unused over `http://`).
    pub fn with_ca(
        url: &str,
        vhost: &str,
        ca: Option<&crate::tls::CaBundle>,
    ) -> Result<Self, ManagementError> {
        let mut base = Url::parse(url).map_err(|e| ManagementError::InvalidUrl(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(ManagementError::InvalidUrl(format!(
                "{}: expected http:// or https://",
                base.scheme()
            )));
        }
        let user = percent_decode(base.username());
        let password = percent_decode(base.password().unwrap_or(""));
        let _ = base.set_username("");
        let _ = base.set_password(None);
        let mut builder = Client::builder().timeout(Duration::from_secs(5));
        if let Some(ca) = ca {
            builder = builder.tls_certs_merge(ca.reqwest_certificates()?);
        }
        let http = builder
            .build()
            .map_err(|e| ManagementError::InvalidUrl(crate::error_chain(&e)))?;
        Ok(Self {
            base,
            user: if user.is_empty() {
                "guest".into()
            } else {
                user
            },
            password: if password.is_empty() {
                "guest".into()
            } else {
                password
            },
            vhost: vhost.to_owned(),
            http,
        })
    }

    /// An authenticated request to `/api/<segments...>` (each segment
    /// percent-encoded), for calls this client has no method of its own for
    /// (tests, admin tooling).
    pub fn request(&self, method: reqwest::Method, segments: &[&str]) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url_for(segments))
            .basic_auth(&self.user, Some(&self.password))
    }

    /// The base URL, without credentials.
    pub fn url(&self) -> String {
        self.base.to_string()
    }

    fn url_for(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty();
            path.push("api");
            path.extend(segments);
        }
        url
    }

    async fn get<T: for<'de> Deserialize<'de>>(
        &self,
        url: Url,
        what: &str,
    ) -> Result<Option<T>, ManagementError> {
        let response = self
            .http
            .get(url)
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .map_err(|source| ManagementError::Unreachable {
                url: self.url(),
                source,
            })?;
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

    async fn delete(&self, url: Url, what: &str, reason: &str) -> Result<bool, ManagementError> {
        let response = self
            .http
            .delete(url)
            .basic_auth(&self.user, Some(&self.password))
            .header("X-Reason", reason)
            .send()
            .await
            .map_err(|source| ManagementError::Unreachable {
                url: self.url(),
                source,
            })?;
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
        self.get::<Overview>(self.url_for(&["overview"]), "overview")
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
            .get::<Overview>(self.url_for(&["overview"]), "overview")
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
        let url = self.url_for(&["queues", &self.vhost, name]);
        self.get(url, &format!("queue {name}")).await
    }

    /// Every queue of the virtual host whose name starts with `prefix`.
    pub async fn queues_with_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<QueueInfo>, ManagementError> {
        let mut url = self.url_for(&["queues", &self.vhost]);
        url.set_query(Some(
            "columns=name,messages_ready,messages_unacknowledged,consumers",
        ));
        let all: Vec<QueueInfo> = self.get(url, "queues").await?.unwrap_or_default();
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
        let mut url = self.url_for(&["exchanges", &self.vhost]);
        url.set_query(Some("columns=name"));
        let all: Vec<Named> = self.get(url, "exchanges").await?.unwrap_or_default();
        Ok(all
            .into_iter()
            .map(|e| e.name)
            .filter(|n| n.starts_with(prefix))
            .collect())
    }

    /// Every client connection to this client's vhost (another vhost may
    /// hold another deployment's agent of the same id: never touch it).
    pub async fn connections(&self) -> Result<Vec<ConnectionInfo>, ManagementError> {
        let mut url = self.url_for(&["vhosts", &self.vhost, "connections"]);
        url.set_query(Some("columns=name,user_provided_name"));
        Ok(self.get(url, "connections").await?.unwrap_or_default())
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
            if conn.user_provided_name.as_deref() == Some(user_provided_name) {
                let url = self.url_for(&["connections", &conn.name]);
                if self.delete(url, "connection", reason).await? {
                    closed += 1;
                }
            }
        }
        Ok(closed)
    }

    /// Deletes a queue; `false` if it did not exist.
    pub async fn delete_queue(&self, name: &str) -> Result<bool, ManagementError> {
        let url = self.url_for(&["queues", &self.vhost, name]);
        self.delete(url, &format!("queue {name}"), "deleted").await
    }

    /// Deletes an exchange; `false` if it did not exist.
    pub async fn delete_exchange(&self, name: &str) -> Result<bool, ManagementError> {
        let url = self.url_for(&["exchanges", &self.vhost, name]);
        self.delete(url, &format!("exchange {name}"), "deleted")
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
        assert_eq!(m.user, "u@x");
        assert_eq!(m.password, "p/w");
        assert!(!m.url().contains("u%40x"));
        let url = m.url_for(&["queues", "/", "ns.stage.a"]);
        assert_eq!(url.path(), "/api/queues/%2F/ns.stage.a");
        let url = m.url_for(&["connections", "127.0.0.1:1 -> 127.0.0.1:5672"]);
        assert_eq!(
            url.path(),
            "/api/connections/127.0.0.1:1%20-%3E%20127.0.0.1:5672"
        );
    }

    #[test]
    fn refuses_non_http_urls() {
        assert!(Management::new("amqp://h", "/").is_err());
        assert!(Management::new("not a url", "/").is_err());
    }
}

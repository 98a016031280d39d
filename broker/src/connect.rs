//! Opening connections.

use crate::BrokerError;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use std::str::FromStr;

/// Default AMQP heartbeat (seconds) when the URL does not set one: short
/// enough that a dead TCP peer is noticed within half a minute.
pub const DEFAULT_HEARTBEAT_S: u16 = 10;

/// Default time allowed to establish a connection (ms).
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;

/// A parsed `amqp://` URL.
#[derive(Debug, Clone)]
pub struct AmqpUrl {
    /// The URL as given (may hold a password: never log it).
    raw: String,
    /// The parsed form, with heartbeat and timeout defaults filled in.
    uri: AMQPUri,
}

impl AmqpUrl {
    /// Parses and validates `raw`.
    pub fn parse(raw: &str) -> Result<Self, BrokerError> {
        let mut uri = AMQPUri::from_str(raw).map_err(|reason| BrokerError::InvalidUrl {
            url: redact(raw),
            reason,
        })?;
        uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_S);
        uri.query
            .connection_timeout
            .get_or_insert(DEFAULT_CONNECT_TIMEOUT_MS);
        Ok(Self {
            raw: raw.to_owned(),
            uri,
        })
    }

    /// The URL without its password, for log lines and errors.
    pub fn redacted(&self) -> String {
        redact(&self.raw)
    }

    /// The virtual host (`/` for `%2f`).
    pub fn vhost(&self) -> &str {
        &self.uri.vhost
    }

    /// The host name or address of the broker.
    pub fn host(&self) -> &str {
        &self.uri.authority.host
    }

    /// The port (5672 for `amqp://` unless given).
    pub fn port(&self) -> u16 {
        self.uri.authority.port
    }

    /// The user name.
    pub fn username(&self) -> &str {
        &self.uri.authority.userinfo.username
    }

    /// The password.
    pub fn password(&self) -> &str {
        &self.uri.authority.userinfo.password
    }
}

/// Replaces the password in a URL with `***`.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}://{}:***@{}", &url[..scheme_end], user, &rest[at + 1..])
        }
        None => url.to_owned(),
    }
}

/// Opens a connection named `name` (shown in the management UI, and how the
/// coordinator finds an agent's connection).
pub async fn connect(url: &AmqpUrl, name: &str) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect_uri(url.uri.clone(), props)
        .await
        .map_err(|source| BrokerError::Connect {
            url: url.redacted(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1/%2f"), "amqp://127.0.0.1/%2f");
        assert_eq!(redact("not a url"), "not a url");
    }

    #[test]
    fn parses_vhost_and_fills_defaults() {
        let url = AmqpUrl::parse("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(url.vhost(), "/");
        assert_eq!(url.uri.query.heartbeat, Some(DEFAULT_HEARTBEAT_S));
        let url = AmqpUrl::parse("amqp://u:p@h:5672/v?heartbeat=3").unwrap();
        assert_eq!(url.vhost(), "v");
        assert_eq!(url.uri.query.heartbeat, Some(3));
        assert_eq!(url.username(), "u");
    }

    #[test]
    fn refuses_garbage_without_leaking_the_password() {
        let err = AmqpUrl::parse("http://u:secret@h/")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
        assert!(AmqpUrl::parse("nonsense").is_err());
    }
}

//! Guildhall's RabbitMQ glue, shared by the agent, the coordinator and the
//! command line: everything that turns [`guildhall_proto`] names and types
//! into AMQP and management-API calls.
//!
//! # Layout
//!
//! - [`connect()`]: open a named connection from an `amqp://` or `amqps://`
//!   URL, with a heartbeat and connect timeout filled in, and a password-free
//!   form of the URL for log lines.
//! - [`addrs`]: several addresses (the nodes of a cluster) as one
//!   [`AmqpUrls`], from repeated flags and comma lists, and [`connect_any`],
//!   which tries them in a shuffled order and returns the first that answers.
//! - [`tls`]: the CA bundle and client identity of `amqps://` (and of the
//!   management API over https), read from PEM files and checked at start.
//! - [`topology`]: idempotent declarations (task exchange, stage, retry and
//!   dead-letter queues, the events stream, the control exchange) and the
//!   passive probe that tells whether a queue exists.
//! - [`publish`]: publish with `mandatory` and wait for the confirm, turning a
//!   nack or a returned (unroutable) message into an error.
//! - [`task`]: the AMQP properties of a task message (id, attempt, times,
//!   traceparent), written and read in one place.
//! - [`events`]: the batching event publisher agents use: flush by time, count
//!   and size, with a confirm the caller can wait for; batches that could not
//!   be published wait in a bounded buffer and are resent, in order and with
//!   their sequence numbers, after a reconnect.
//! - [`management`]: a small client for the RabbitMQ management HTTP API
//!   (queue depths with unacked counts, connections, deletes).
//! - [`one_line`] and [`error_chain`]: errors as the one line both binaries
//!   print and log.
//!
//! **Nothing here is acked or published without a confirm**: every helper
//! that sends a message returns only after the broker took responsibility for
//! it, or returns an error.

pub mod addrs;
pub mod connect;
pub mod events;
pub mod management;
pub mod publish;
pub mod task;
pub mod tls;
pub mod topology;

pub use addrs::{AmqpUrls, connect_any};
pub use connect::{AmqpUrl, connect};
pub use events::{EventPublisher, EventPublisherConfig};
pub use management::Management;
pub use publish::{PublishError, Publisher};
pub use task::TaskMeta;

/// Collapses a message to one line (errors from libraries may hold newlines).
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// An error and its causes, `: `-separated (reqwest's and hyper's own
/// messages are terse; the cause says what happened).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Errors talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The URL is not a valid `amqp://` or `amqps://` URL.
    #[error("invalid AMQP URL {url}: {reason}")]
    InvalidUrl {
        /// The URL, without its password.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Could not connect (refused, DNS, auth, timeout, TLS).
    #[error("cannot reach RabbitMQ at {url}: {source}{}", tls_hint(source))]
    Connect {
        /// The URL, without its password.
        url: String,
        /// The client's error.
        source: lapin::Error,
    },
    /// A list of addresses is malformed (the reason shows no entry).
    #[error("invalid AMQP URL list: {0}")]
    InvalidUrlList(String),
    /// A connection attempt took longer than the URL's connect timeout
    /// (a node that accepts connections but does not answer).
    #[error("cannot reach RabbitMQ at {url}: no answer within {ms} ms")]
    ConnectTimeout {
        /// The URL, without its password.
        url: String,
        /// The timeout.
        ms: u64,
    },
    /// Several addresses, none of which answered: each one's error
    /// ([`BrokerError::Connect`] or [`BrokerError::ConnectTimeout`]).
    #[error("cannot reach RabbitMQ at any of {} addresses: {}", .0.len(), connect_failures(.0))]
    ConnectAny(Vec<BrokerError>),
    /// An AMQP operation failed.
    #[error("{what}: {source}")]
    Amqp {
        /// What was being done.
        what: String,
        /// The client's error.
        source: lapin::Error,
    },
}

/// Each address's failure, `; `-separated, without the repeated preamble.
fn connect_failures(failures: &[BrokerError]) -> String {
    failures
        .iter()
        .map(|f| {
            let text = one_line(&f.to_string());
            text.strip_prefix("cannot reach RabbitMQ at ")
                .map(str::to_owned)
                .unwrap_or(text)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// What to check when a TLS handshake failed over certificates (rustls's
/// own words name the error, not the flag that fixes it); "" otherwise.
fn tls_hint(err: &lapin::Error) -> &'static str {
    use rustls::{AlertDescription as Alert, CertificateError as Cert};
    let lapin::ErrorKind::IOError(io) = err.kind() else {
        return "";
    };
    match io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(Cert::UnknownIssuer | Cert::BadSignature)) => {
            " (no CA this client trusts signed the broker's certificate: is --amqp-ca-file its CA?)"
        }
        Some(rustls::Error::InvalidCertificate(
            Cert::NotValidForName | Cert::NotValidForNameContext { .. },
        )) => " (the broker's certificate does not name the URL's host)",
        Some(rustls::Error::AlertReceived(
            Alert::CertificateRequired
            | Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateUnknown
            | Alert::UnsupportedCertificate
            | Alert::CertificateExpired,
        )) => {
            " (the broker wants a client certificate it trusts: --amqp-cert-file and --amqp-key-file)"
        }
        _ => "",
    }
}

impl BrokerError {
    pub(crate) fn amqp(what: impl Into<String>) -> impl FnOnce(lapin::Error) -> BrokerError {
        let what = what.into();
        move |source| BrokerError::Amqp { what, source }
    }
}

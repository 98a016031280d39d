//! Opening connections: `amqp://` and `amqps://` URLs, the latter with the
//! TLS files of [`crate::tls`], named in the URL with RabbitMQ's own query
//! parameters (`cacertfile`, `certfile`, `keyfile`) or given by flags
//! ([`AmqpUrl::with_tls_files`]).

use crate::BrokerError;
use crate::tls::{CaBundle, ClientTls, TlsError, TlsFiles, TlsLabels};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties, DefaultConnectionBuilder};
use std::str::FromStr;

/// Default AMQP heartbeat (seconds) when the URL does not set one: short
/// enough that a dead TCP peer is noticed within half a minute.
pub const DEFAULT_HEARTBEAT_S: u16 = 10;

/// Default time allowed to establish a connection (ms).
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;

/// The URI query parameters naming TLS files (RabbitMQ's names).
const TLS_FILE_PARAMS: [&str; 3] = ["cacertfile", "certfile", "keyfile"];

/// RabbitMQ URI query parameters for TLS that Guildhall does not honour:
/// refused rather than ignored, so nobody believes verification is off
/// (`verify=verify_none`) or a key password is used.
const UNSUPPORTED_TLS_PARAMS: [&str; 4] = [
    "fail_if_no_peer_cert",
    "server_name_indication",
    "password",
    "depth",
];

/// A parsed `amqp://` or `amqps://` URL, with its TLS files loaded.
///
/// `Debug` shows the password-free URL only.
#[derive(Clone)]
pub struct AmqpUrl {
    /// The URL as given, TLS files from flags added as query parameters
    /// (may hold a password: never log it).
    raw: String,
    /// The parsed form, with heartbeat and timeout defaults filled in.
    uri: AMQPUri,
    /// The TLS files named, so [`AmqpUrl::with_tls_files`] can merge flags
    /// with the URL's own parameters.
    files: TlsFiles,
    /// The TLS files, loaded and checked (empty for `amqp://`, and for an
    /// `amqps://` broker whose certificate a system root signs).
    tls: ClientTls,
}

impl std::fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpUrl")
            .field("url", &self.redacted())
            .field("tls", &self.tls)
            .finish()
    }
}

impl AmqpUrl {
    /// Parses and validates `raw`; for `amqps://`, reads and checks the TLS
    /// files its `cacertfile`, `certfile` and `keyfile` parameters name.
    /// Without a port, `amqp://` means 5672 and `amqps://` 5671.
    pub fn parse(raw: &str) -> Result<Self, BrokerError> {
        let invalid = |reason: String| BrokerError::InvalidUrl {
            url: redact(raw),
            reason,
        };
        let mut uri = AMQPUri::from_str(raw).map_err(invalid)?;
        let files = tls_params(raw).map_err(invalid)?;
        let tls = if files.is_empty() {
            ClientTls::default()
        } else if uri.scheme != AMQPScheme::AMQPS {
            return Err(invalid(
                "cacertfile, certfile and keyfile need an amqps:// URL".into(),
            ));
        } else {
            ClientTls::load(&files, &TlsLabels::URL_PARAMS).map_err(|e| invalid(e.to_string()))?
        };
        uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_S);
        uri.query
            .connection_timeout
            .get_or_insert(DEFAULT_CONNECT_TIMEOUT_MS);
        Ok(Self {
            raw: raw.to_owned(),
            uri,
            files,
            tls,
        })
    }

    /// The same URL with an AMQP heartbeat of `seconds` (the coordinator's
    /// lock connection wants a short one: issue 20).
    pub fn with_heartbeat(mut self, seconds: u16) -> Self {
        self.uri.query.heartbeat = Some(seconds);
        self
    }

    /// The same URL with the TLS files given by flags (`--amqp-ca-file`,
    /// `--amqp-cert-file`, `--amqp-key-file`), which replace those the URL
    /// names. The files are read and checked; they are also written into
    /// [`AmqpUrl::raw`] as query parameters, so an agent or a child process
    /// given that string gets them too. No files: `self` unchanged.
    pub fn with_tls_files(mut self, files: &TlsFiles) -> Result<Self, TlsError> {
        if files.is_empty() {
            return Ok(self);
        }
        if !self.is_tls() {
            return Err(TlsError::Usage(format!(
                "{}, {} and {} need an amqps:// URL (got {})",
                TlsLabels::FLAGS.ca,
                TlsLabels::FLAGS.cert,
                TlsLabels::FLAGS.key,
                self.redacted()
            )));
        }
        let given = ClientTls::load(files, &TlsLabels::FLAGS)?;
        let given_files = files.normalized();
        if given.ca.is_some() {
            self.tls.ca = given.ca;
            self.files.ca = given_files.ca;
        }
        if given.identity.is_some() {
            self.tls.identity = given.identity;
            self.files.cert = given_files.cert;
            self.files.key = given_files.key;
        }
        self.raw = with_tls_params(&self.raw, &self.files)
            .map_err(|e| TlsError::Usage(format!("cannot add the TLS files to the URL: {e}")))?;
        Ok(self)
    }

    /// The URL as given, with the TLS files of [`AmqpUrl::with_tls_files`]
    /// as query parameters: what to hand to an agent's config or a child
    /// process. **Holds the password**: never log it (use
    /// [`AmqpUrl::redacted`]).
    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// Whether this is an `amqps://` URL.
    pub fn is_tls(&self) -> bool {
        self.uri.scheme == AMQPScheme::AMQPS
    }

    /// The TLS settings (CA, client identity) connections use.
    pub fn tls(&self) -> &ClientTls {
        &self.tls
    }

    /// The extra CA certificates, if any: the management API client uses
    /// them too unless given its own.
    pub fn ca(&self) -> Option<&CaBundle> {
        self.tls.ca.as_ref()
    }

    /// The port (the scheme's default when the URL names none).
    pub fn port(&self) -> u16 {
        self.uri.authority.port
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

    /// The user name.
    pub fn username(&self) -> &str {
        &self.uri.authority.userinfo.username
    }

    /// The user the broker knows this connection by, when the URL says it
    /// (a user in the URL, logging in with a password): what a message's
    /// `user_id` must be, which RabbitMQ checks. `None` for a URL without
    /// a user or with `auth_mechanism=external` (the user then comes from
    /// the client certificate).
    pub fn user_id(&self) -> Option<&str> {
        let authority = self.raw.split_once("://")?.1.split('/').next()?;
        let external = matches!(
            self.uri.query.auth_mechanism,
            Some(lapin::uri::SASLMechanism::External)
        );
        (authority.contains('@') && !external).then(|| self.username())
    }

    /// The password.
    pub fn password(&self) -> &str {
        &self.uri.authority.userinfo.password
    }

    /// The connect timeout (ms): the URL's `connection_timeout`, else
    /// [`DEFAULT_CONNECT_TIMEOUT_MS`].
    pub fn connect_timeout_ms(&self) -> u64 {
        self.uri
            .query
            .connection_timeout
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT_MS)
    }
}

/// The TLS files a URL's query names (`cacertfile`, `certfile`, `keyfile`);
/// an error for TLS parameters that are not honoured.
fn tls_params(raw: &str) -> Result<TlsFiles, String> {
    let Ok(url) = reqwest::Url::parse(raw) else {
        return Ok(TlsFiles::default());
    };
    let mut files = TlsFiles::default();
    for (key, value) in url.query_pairs() {
        let path = || Some(std::path::PathBuf::from(value.as_ref()));
        match key.as_ref() {
            "cacertfile" => files.ca = path(),
            "certfile" => files.cert = path(),
            "keyfile" => files.key = path(),
            "verify" if value == "verify_peer" => {}
            "verify" => {
                return Err(format!(
                    "verify={value} is not supported: the broker's certificate is always verified"
                ));
            }
            k if UNSUPPORTED_TLS_PARAMS.contains(&k) => {
                return Err(format!("the {k} parameter is not supported"));
            }
            _ => {}
        }
    }
    Ok(files)
}

/// `raw` with `files` as its `cacertfile`, `certfile` and `keyfile` query
/// parameters (replacing any it had).
fn with_tls_params(raw: &str, files: &TlsFiles) -> Result<String, String> {
    let mut url = reqwest::Url::parse(raw).map_err(|e| e.to_string())?;
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| !TLS_FILE_PARAMS.contains(&k.as_ref()))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    {
        let mut query = url.query_pairs_mut();
        query.clear();
        for (k, v) in &kept {
            query.append_pair(k, v);
        }
        for (k, path) in [
            ("cacertfile", &files.ca),
            ("certfile", &files.cert),
            ("keyfile", &files.key),
        ] {
            if let Some(path) = path {
                let path = path
                    .to_str()
                    .ok_or_else(|| format!("{} is not UTF-8", path.display()))?;
                query.append_pair(k, path);
            }
        }
    }
    Ok(url.to_string())
}

/// Replaces the password in a URL with `***`, and leaves out the TLS file
/// parameters (paths, long once percent-encoded; the flags show them). A
/// URL that does not parse is masked from its scheme to its last `@`, user
/// name included, so a password that breaks the syntax (an unescaped `/`
/// or `#`) is not shown either.
pub fn redact(url: &str) -> String {
    if let Ok(mut parsed) = reqwest::Url::parse(url)
        && !parsed.cannot_be_a_base()
    {
        let tls_params = parsed
            .query_pairs()
            .any(|(k, _)| TLS_FILE_PARAMS.contains(&k.as_ref()));
        if parsed.password().is_none() && !tls_params {
            return url.to_owned();
        }
        if parsed.password().is_none() || parsed.set_password(Some("***")).is_ok() {
            if tls_params {
                let kept: Vec<(String, String)> = parsed
                    .query_pairs()
                    .filter(|(k, _)| !TLS_FILE_PARAMS.contains(&k.as_ref()))
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect();
                parsed.set_query(None);
                if !kept.is_empty() {
                    parsed.query_pairs_mut().extend_pairs(kept);
                }
            }
            return parsed.to_string();
        }
    }
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    match url.rfind('@') {
        Some(at) if at > scheme_end => format!("{}://***{}", &url[..scheme_end], &url[at..]),
        _ => url.to_owned(),
    }
}

/// Opens a connection named `name` (shown in the management UI, and how the
/// coordinator finds an agent's connection), over TLS for `amqps://`.
pub async fn connect(url: &AmqpUrl, name: &str) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let connected = match DefaultConnectionBuilder::new() {
        Ok(builder) => {
            builder
                .with_uri(url.uri.clone())
                .with_properties(props)
                .with_tls_config(url.tls.lapin_config())
                .connect()
                .await
        }
        Err(e) => Err(e),
    };
    connected.map_err(|source| BrokerError::Connect {
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
        assert_eq!(url.clone().with_heartbeat(1).uri.query.heartbeat, Some(1));
        assert_eq!(url.username(), "u");
    }

    #[test]
    fn redacts_amqps_urls_and_passwords_that_break_the_syntax() {
        assert_eq!(
            redact("amqps://guest:secret@broker:5671/%2f?cacertfile=%2Fetc%2Fca%40x.pem"),
            "amqps://guest:***@broker:5671/%2f"
        );
        assert_eq!(
            redact("amqps://broker/%2f?heartbeat=5&certfile=/c.pem&keyfile=/k.pem"),
            "amqps://broker/%2f?heartbeat=5"
        );
        assert_eq!(
            redact("amqps://guest:secret@broker?heartbeat=5"),
            "amqps://guest:***@broker?heartbeat=5"
        );
        // Unescaped `/` and `#` in the password: the URL does not parse as
        // meant, and nothing of the password may show.
        for raw in ["amqps://u:pa/ss@h:5671/%2f", "amqp://u:se#cret@h/"] {
            let r = redact(raw);
            assert!(
                !r.contains("pa/ss") && !r.contains("se#cret") && !r.contains("cret"),
                "{r}"
            );
        }
        let err = AmqpUrl::parse("amqps://u:pa/ss@h:5671/%2f").map(|_| ());
        if let Err(e) = err {
            assert!(!e.to_string().contains("pa/ss"), "{e}");
        }
    }

    #[test]
    fn amqps_defaults_to_port_5671() {
        let url = AmqpUrl::parse("amqps://guest:guest@broker/%2f").unwrap();
        assert!(url.is_tls());
        assert_eq!(url.port(), 5671);
        assert!(url.tls().is_default());
        let url = AmqpUrl::parse("amqp://guest:guest@broker/%2f").unwrap();
        assert!(!url.is_tls());
        assert_eq!(url.port(), 5672);
    }

    #[test]
    fn tls_parameters_need_amqps_and_unsupported_ones_are_refused() {
        let err = AmqpUrl::parse("amqp://u:secret@h/%2f?cacertfile=/etc/ca.pem")
            .unwrap_err()
            .to_string();
        assert!(err.contains("need an amqps:// URL"), "{err}");
        assert!(!err.contains("secret"), "{err}");
        for (raw, expect) in [
            ("amqps://h/%2f?verify=verify_none", "always verified"),
            ("amqps://h/%2f?server_name_indication=x", "not supported"),
            ("amqps://h/%2f?password=x", "not supported"),
        ] {
            let err = AmqpUrl::parse(raw).unwrap_err().to_string();
            assert!(err.contains(expect), "{raw}: {err}");
        }
        assert!(AmqpUrl::parse("amqps://h/%2f?verify=verify_peer").is_ok());
    }

    #[test]
    fn a_url_naming_a_missing_ca_file_is_refused_with_the_parameter_name() {
        let err = AmqpUrl::parse("amqps://u:secret@h/%2f?cacertfile=/nonexistent/ca.pem")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cacertfile /nonexistent/ca.pem: cannot read it"),
            "{err}"
        );
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn flag_files_need_amqps_and_are_named_by_their_flag() {
        let files = TlsFiles {
            ca: Some("/nonexistent/ca.pem".into()),
            ..TlsFiles::default()
        };
        let url = AmqpUrl::parse("amqp://u:secret@h/%2f").unwrap();
        let err = url.with_tls_files(&files).unwrap_err().to_string();
        assert!(err.contains("need an amqps:// URL"), "{err}");
        assert!(!err.contains("secret"), "{err}");
        let url = AmqpUrl::parse("amqps://u:secret@h/%2f").unwrap();
        let err = url.with_tls_files(&files).unwrap_err().to_string();
        assert!(
            err.starts_with("--amqp-ca-file /nonexistent/ca.pem: cannot read it"),
            "{err}"
        );
        // No files: unchanged, whatever the scheme.
        let url = AmqpUrl::parse("amqp://u:p@h/%2f").unwrap();
        let url = url.with_tls_files(&TlsFiles::default()).unwrap();
        assert_eq!(url.raw(), "amqp://u:p@h/%2f");
    }

    #[test]
    fn tls_params_are_rewritten_into_the_raw_url() {
        let files = TlsFiles {
            ca: Some("/etc/ssl/my ca.pem".into()),
            ..TlsFiles::default()
        };
        let raw =
            with_tls_params("amqps://u:p@h:5671/%2f?heartbeat=5&cacertfile=/old", &files).unwrap();
        assert_eq!(
            raw,
            "amqps://u:p@h:5671/%2f?heartbeat=5&cacertfile=%2Fetc%2Fssl%2Fmy+ca.pem"
        );
        let back = tls_params(&raw).unwrap();
        assert_eq!(back, files);
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

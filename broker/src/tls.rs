//! TLS to the broker: the CA certificates to trust and the client identity
//! (mutual TLS), read from PEM files and checked when they are loaded, at
//! start, so a bad file is a flag error (exit status 2) rather than a
//! connection that fails later.
//!
//! A CA bundle is trusted **in addition to** the system's roots: lapin and
//! reqwest both verify through `rustls-platform-verifier` (their default
//! features), which takes extra roots but cannot drop the system's. A broker
//! with a certificate from a public CA therefore needs no CA file at all.
//! Verification (chain and host name, IP addresses included) is always on;
//! there is no switch to turn it off.

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest PEM file read: a CA bundle of every public root is ~250 KB; a
/// larger file (or `/dev/zero`) is not a certificate file.
pub const MAX_PEM_BYTES: u64 = 1 << 20;

/// A TLS file that cannot be used, or TLS options that do not go together.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file cannot be opened or read.
    #[error("{label} {path}: cannot read it: {source}")]
    Read {
        /// The flag or URL parameter that named it.
        label: &'static str,
        /// The path as given.
        path: String,
        /// The system's error.
        source: std::io::Error,
    },
    /// The file was read but holds no usable certificate or key.
    #[error("{label} {path}: {reason}")]
    Invalid {
        /// The flag or URL parameter that named it.
        label: &'static str,
        /// The path as given.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Options that do not go together (a certificate without its key, TLS
    /// files for a plain `amqp://` or `http://` URL).
    #[error("{0}")]
    Usage(String),
}

/// What the three TLS files are called where they came from, for errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsLabels {
    /// The CA bundle.
    pub ca: &'static str,
    /// The client certificate.
    pub cert: &'static str,
    /// The client's private key.
    pub key: &'static str,
}

impl TlsLabels {
    /// RabbitMQ's own URI query parameters
    /// (`amqps://host/vhost?cacertfile=...&certfile=...&keyfile=...`).
    pub const URL_PARAMS: TlsLabels = TlsLabels {
        ca: "cacertfile",
        cert: "certfile",
        key: "keyfile",
    };
    /// The flags both binaries take.
    pub const FLAGS: TlsLabels = TlsLabels {
        ca: "--amqp-ca-file",
        cert: "--amqp-cert-file",
        key: "--amqp-key-file",
    };
}

/// Paths of the TLS files of a broker connection, as given (flags, URL).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM CA certificates to trust besides the system's roots.
    pub ca: Option<PathBuf>,
    /// PEM client certificate (chain), for brokers that require one.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// Whether no file is named (an empty path counts as none, so an empty
    /// environment variable is not an error).
    pub fn is_empty(&self) -> bool {
        [&self.ca, &self.cert, &self.key]
            .iter()
            .all(|p| p.as_ref().is_none_or(|p| p.as_os_str().is_empty()))
    }

    /// The same without empty paths.
    pub(crate) fn normalized(&self) -> TlsFiles {
        let keep = |p: &Option<PathBuf>| p.clone().filter(|p| !p.as_os_str().is_empty());
        TlsFiles {
            ca: keep(&self.ca),
            cert: keep(&self.cert),
            key: keep(&self.key),
        }
    }
}

/// CA certificates from a PEM file, checked to be X.509 trust anchors.
#[derive(Clone)]
pub struct CaBundle {
    /// Where they were read from (for logs).
    path: PathBuf,
    /// The file's text: lapin takes the PEM, reqwest parses it again.
    pem: Arc<str>,
    /// How many certificates it holds.
    count: usize,
}

impl fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaBundle")
            .field("path", &self.path)
            .field("certificates", &self.count)
            .finish()
    }
}

impl CaBundle {
    /// Reads and checks `path` (named `label` in errors): PEM text holding
    /// at least one certificate, each a valid X.509 trust anchor.
    pub fn load(path: &Path, label: &'static str) -> Result<Self, TlsError> {
        let bytes = read_pem_file(path, label)?;
        let invalid = |reason: String| TlsError::Invalid {
            label,
            path: path.display().to_string(),
            reason,
        };
        let certs = certificates(&bytes).map_err(invalid)?;
        let mut store = rustls::RootCertStore::empty();
        for (i, cert) in certs.iter().enumerate() {
            store.add(cert.clone()).map_err(|e| {
                invalid(format!(
                    "certificate {} of {} is not a usable CA certificate: {e}",
                    i + 1,
                    certs.len()
                ))
            })?;
        }
        let pem = String::from_utf8(bytes)
            .map_err(|_| invalid("is not PEM text (it is not UTF-8)".into()))?;
        Ok(Self {
            path: path.to_owned(),
            pem: pem.into(),
            count: certs.len(),
        })
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The PEM text.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The certificates as reqwest takes them.
    pub fn reqwest_certificates(&self) -> Result<Vec<reqwest::Certificate>, TlsError> {
        reqwest::Certificate::from_pem_bundle(self.pem.as_bytes()).map_err(|e| TlsError::Invalid {
            label: "CA file",
            path: self.path.display().to_string(),
            reason: e.to_string(),
        })
    }
}

/// A client certificate chain and its private key, for brokers that
/// require clients to present one (`ssl_options.fail_if_no_peer_cert`).
#[derive(Clone)]
pub struct ClientIdentity {
    /// Where the certificate was read from (for logs).
    cert_path: PathBuf,
    /// The certificate chain, PEM.
    cert_pem: Arc<[u8]>,
    /// The private key, PEM. Never printed (see the `Debug` impl).
    key_pem: Arc<[u8]>,
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

impl ClientIdentity {
    /// Reads and checks a certificate file (at least one PEM certificate)
    /// and a key file (a PEM private key: PKCS#8, PKCS#1 or SEC1).
    /// Whether the key matches the certificate is found out by the TLS
    /// handshake (a connection error, not a flag error).
    pub fn load(cert: &Path, key: &Path, labels: &TlsLabels) -> Result<Self, TlsError> {
        let cert_pem = read_pem_file(cert, labels.cert)?;
        certificates(&cert_pem).map_err(|reason| TlsError::Invalid {
            label: labels.cert,
            path: cert.display().to_string(),
            reason,
        })?;
        let key_pem = read_pem_file(key, labels.key)?;
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Invalid {
            label: labels.key,
            path: key.display().to_string(),
            reason: format!("no PEM private key in it ({e})"),
        })?;
        Ok(Self {
            cert_path: cert.to_owned(),
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
        })
    }
}

/// The TLS settings of a broker connection, loaded and checked.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// Extra CA certificates to trust.
    pub ca: Option<CaBundle>,
    /// The client identity, for mutual TLS.
    pub identity: Option<ClientIdentity>,
}

impl ClientTls {
    /// Loads the files named in `files` (`labels` names them in errors).
    /// A certificate needs its key and the other way round.
    pub fn load(files: &TlsFiles, labels: &TlsLabels) -> Result<Self, TlsError> {
        let files = files.normalized();
        let ca = files
            .ca
            .as_deref()
            .map(|p| CaBundle::load(p, labels.ca))
            .transpose()?;
        let identity = match (&files.cert, &files.key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(ClientIdentity::load(cert, key, labels)?),
            (Some(_), None) => {
                return Err(TlsError::Usage(format!(
                    "{} needs {} (the certificate's private key)",
                    labels.cert, labels.key
                )));
            }
            (None, Some(_)) => {
                return Err(TlsError::Usage(format!(
                    "{} needs {} (the client certificate)",
                    labels.key, labels.cert
                )));
            }
        };
        Ok(Self { ca, identity })
    }

    /// Whether there is nothing to add to the defaults.
    pub fn is_default(&self) -> bool {
        self.ca.is_none() && self.identity.is_none()
    }

    /// What lapin takes.
    pub(crate) fn lapin_config(&self) -> OwnedTLSConfig {
        OwnedTLSConfig {
            cert_chain: self.ca.as_ref().map(|ca| ca.pem().to_owned()),
            identity: self.identity.as_ref().map(|id| OwnedIdentity::PKCS8 {
                pem: id.cert_pem.to_vec(),
                key: id.key_pem.to_vec(),
            }),
        }
    }
}

/// Reads a regular file of at most [`MAX_PEM_BYTES`].
fn read_pem_file(path: &Path, label: &'static str) -> Result<Vec<u8>, TlsError> {
    let shown = || path.display().to_string();
    let read_error = |source| TlsError::Read {
        label,
        path: shown(),
        source,
    };
    // Checked before opening: opening a FIFO blocks until it has a writer,
    // and a device may never end.
    let meta = std::fs::metadata(path).map_err(read_error)?;
    if !meta.is_file() {
        return Err(TlsError::Invalid {
            label,
            path: shown(),
            reason: "is not a regular file".into(),
        });
    }
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsError::Invalid {
            label,
            path: shown(),
            reason: format!("is larger than {MAX_PEM_BYTES} bytes: not a PEM certificate file"),
        });
    }
    Ok(bytes)
}

/// The certificates of a PEM file; an error if there is none or a block is
/// malformed.
fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("is not valid PEM ({e})"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed CA certificate (EC P-256, made once with `openssl req
    /// -x509`; loading does not check validity periods).
    const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBmDCCAT2gAwIBAgIUf4h6I+V7XN8sP5GnlVM0Ha9H3x4wCgYIKoZIzj0EAwIw
ITEfMB0GA1UEAwwWZ3VpbGRoYWxsLXVuaXQtdGVzdC1jYTAeFw0yNjEyMDYyMzQw
NTVaFw0zNjEyMDMyMzQwNTVaMCExHzAdBgNVBAMMFmd1aWxkaGFsbC11bml0LXRl
c3QtY2EwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAARDSByJsIcpvX1L0BV9QaYW
5myUQdZSuq51bNr/m69oHoJdQ0Ihx8XjgKMCOV6fiQ/fVjDteT5UuQmJav55bpto
o1MwUTAdBgNVHQ4EFgQUuu21dSBjrAW619tROzU0NZtbtBgwHwYDVR0jBBgwFoAU
uu21dSBjrAW619tROzU0NZtbtBgwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQD
AgNJADBGAiEAqOOUDRH+b+UaFAnQQC/ONLpMuUOrR9O31EK7a0DQgYoCIQCbqjGJ
tZB0pR04bE53jpqiRaK1J0vd6yGIReaM2zV6wg==
-----END CERTIFICATE-----
";

    /// A directory of its own for a test's files, deleted on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!(
                "guildhall-tls-unit-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, contents).unwrap();
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_ca_file_loads_and_reaches_both_clients() {
        let scratch = Scratch::new();
        let path = scratch.file("ca.pem", format!("comment line\n{CA_PEM}").as_bytes());
        let ca = CaBundle::load(&path, "--amqp-ca-file").unwrap();
        assert_eq!(ca.count, 1);
        assert_eq!(ca.reqwest_certificates().unwrap().len(), 1);
        let tls = ClientTls {
            ca: Some(ca),
            identity: None,
        };
        let config = tls.lapin_config();
        assert!(config.cert_chain.unwrap().contains("BEGIN CERTIFICATE"));
        assert!(config.identity.is_none());
        // Debug shows the path, not the PEM.
        assert!(!format!("{tls:?}").contains("MIIB"));
    }

    #[test]
    fn a_key_file_without_a_key_is_refused() {
        let scratch = Scratch::new();
        let cert = scratch.file("client.pem", CA_PEM.as_bytes());
        let key = scratch.file("client.key", CA_PEM.as_bytes());
        let err = ClientIdentity::load(&cert, &key, &TlsLabels::FLAGS)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("--amqp-key-file "), "{err}");
        assert!(err.contains("no PEM private key"), "{err}");
    }

    #[test]
    fn a_missing_file_names_the_flag_and_the_path() {
        let err = CaBundle::load(Path::new("/nonexistent/ca.pem"), "--amqp-ca-file").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("--amqp-ca-file /nonexistent/ca.pem: cannot read it"),
            "{text}"
        );
        assert!(!text.contains('\n'));
    }

    #[test]
    fn garbage_empty_and_key_only_files_are_refused() {
        let scratch = Scratch::new();
        for (name, contents, expect) in [
            ("garbage.pem", &b"this is not a certificate\n"[..], "holds no PEM certificate"),
            ("empty.pem", b"", "holds no PEM certificate"),
            (
                "key.pem",
                b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
                "holds no PEM certificate",
            ),
            (
                "broken.pem",
                b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
                "",
            ),
            (
                "notx509.pem",
                b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                "not a usable CA certificate",
            ),
        ] {
            let path = scratch.file(name, contents);
            let err = CaBundle::load(&path, "--amqp-ca-file").unwrap_err().to_string();
            assert!(err.contains(expect), "{name}: {err}");
            assert!(err.starts_with("--amqp-ca-file "), "{name}: {err}");
            assert!(!err.contains('\n'), "{name}: {err}");
        }
    }

    #[test]
    fn directories_devices_and_huge_files_are_refused_without_hanging() {
        let dir = std::env::temp_dir();
        let err = CaBundle::load(&dir, "--amqp-ca-file")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("regular file") || err.contains("cannot read"),
            "{err}"
        );
        let err = CaBundle::load(Path::new("/dev/zero"), "--amqp-ca-file")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a regular file"), "{err}");
        let scratch = Scratch::new();
        let fifo = scratch.0.join("ca.fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            let err = CaBundle::load(&fifo, "--amqp-ca-file")
                .unwrap_err()
                .to_string();
            assert!(err.contains("not a regular file"), "{err}");
        }
        let big = scratch.file("big.pem", &vec![b'A'; MAX_PEM_BYTES as usize + 10]);
        let err = CaBundle::load(&big, "--amqp-ca-file")
            .unwrap_err()
            .to_string();
        assert!(err.contains("larger than"), "{err}");
    }

    #[test]
    fn a_certificate_needs_its_key_and_the_other_way_round() {
        let files = TlsFiles {
            cert: Some("/x/cert.pem".into()),
            ..TlsFiles::default()
        };
        let err = ClientTls::load(&files, &TlsLabels::FLAGS)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "--amqp-cert-file needs --amqp-key-file (the certificate's private key)"
        );
        let files = TlsFiles {
            key: Some("/x/key.pem".into()),
            ..TlsFiles::default()
        };
        let err = ClientTls::load(&files, &TlsLabels::URL_PARAMS)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "keyfile needs certfile (the client certificate)");
    }

    #[test]
    fn empty_paths_count_as_none() {
        let files = TlsFiles {
            ca: Some(PathBuf::new()),
            cert: Some(PathBuf::new()),
            key: None,
        };
        assert!(files.is_empty());
        let tls = ClientTls::load(&files, &TlsLabels::FLAGS).unwrap();
        assert!(tls.is_default());
    }
}

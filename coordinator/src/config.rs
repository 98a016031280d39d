//! Configuration shared by the command line, the simulator and the
//! benchmarks (`guildhall-bench`): the broker flags and their validation,
//! the error a bad flag value gives, and the defaults. Nothing here knows
//! the `guildhall` command line's subcommands.
//!
//! # Layout
//!
//! One file: [`BrokerArgs`] (the broker URL, namespace and TLS files, a
//! clap `Args` group any command flattens), [`ConfigError`], [`any_path`]
//! and [`management_ca`].

use clap::Args;
use guildhall_broker::AmqpUrls;
use guildhall_broker::tls::{CaBundle, TlsFiles};
use guildhall_proto::{Names, Namespace};
use std::path::PathBuf;

/// The broker every command defaults to.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The management API `serve` and `demo` default to.
pub const DEFAULT_MANAGEMENT_URL: &str = "http://guest:guest@127.0.0.1:15672";

/// A flag value that failed validation: printed as one line, exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Where the broker is and which namespace to use.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// RabbitMQ URL; several (the nodes of a cluster) as a comma-separated
    /// list or by repeating the flag: connections go to one that answers,
    /// chosen at random. A comma in a password must be written %2C.
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true, action = clap::ArgAction::Append)]
    pub amqp_url: Vec<String>,
    /// Prefix of every broker name, so deployments can share a broker.
    #[arg(long, env = "GUILDHALL_NAMESPACE", default_value = guildhall_proto::names::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// PEM CA certificates to trust, besides the system's, for an amqps://
    /// broker (and the management API, unless --management-ca-file).
    #[arg(long, env = "GUILDHALL_AMQP_CA_FILE", value_parser = any_path)]
    pub amqp_ca_file: Option<PathBuf>,
    /// PEM client certificate for a broker that requires one (mutual TLS);
    /// needs --amqp-key-file.
    #[arg(long, env = "GUILDHALL_AMQP_CERT_FILE", value_parser = any_path)]
    pub amqp_cert_file: Option<PathBuf>,
    /// PEM private key of --amqp-cert-file (not encrypted).
    #[arg(long, env = "GUILDHALL_AMQP_KEY_FILE", value_parser = any_path)]
    pub amqp_key_file: Option<PathBuf>,
}

impl BrokerArgs {
    /// Parses the URLs and namespace, and reads and checks the TLS files
    /// (which apply to every URL).
    pub fn validate(&self) -> Result<(AmqpUrls, Names), ConfigError> {
        let url = AmqpUrls::from_values(&self.amqp_url)
            .map_err(|e| ConfigError(format!("--amqp-url: {e}")))?;
        let url = url
            .with_tls_files(&TlsFiles {
                ca: self.amqp_ca_file.clone(),
                cert: self.amqp_cert_file.clone(),
                key: self.amqp_key_file.clone(),
            })
            .map_err(|e| ConfigError(e.to_string()))?;
        let ns = Namespace::new(self.namespace.as_str())
            .map_err(|e| ConfigError(format!("--namespace: {e}")))?;
        Ok((url, Names::new(ns)))
    }
}

/// A path, the empty one included (it means "none", as `""` does for
/// `--management-url`), so an empty environment variable is not an error.
pub fn any_path(s: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}

/// The CA bundle the management API client trusts: `--management-ca-file`
/// (only with an https:// URL), else the broker's `--amqp-ca-file`.
pub fn management_ca(
    management_url: &str,
    ca_file: Option<&std::path::Path>,
    amqp: &AmqpUrls,
) -> Result<Option<CaBundle>, ConfigError> {
    match ca_file.filter(|p| !p.as_os_str().is_empty()) {
        Some(path) => {
            if !management_url
                .split(',')
                .all(|u| u.trim_start().starts_with("https://"))
            {
                return Err(ConfigError(
                    "--management-ca-file needs an https:// --management-url".into(),
                ));
            }
            CaBundle::load(path, "--management-ca-file")
                .map(Some)
                .map_err(|e| ConfigError(e.to_string()))
        }
        None => Ok(amqp.ca().cloned()),
    }
}

/// The shape both binaries (`guildhall`, `guildhall-bench`) share: logging
/// on stderr at `log_default` (`RUST_LOG` overrides), `body` on a tokio
/// runtime, its output on stdout. An error ends the process with one line
/// on stderr, `<program>: error: ...`: status 2 for a [`ConfigError`] (bad
/// flags), 1 for everything else.
pub fn run_binary(
    program: &str,
    log_default: &str,
    body: impl std::future::Future<Output = anyhow::Result<String>>,
) -> std::process::ExitCode {
    init_logging(log_default);
    let result = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(body),
        Err(e) => Err(anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    match result {
        Ok(output) => {
            print!("{output}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            // Error types here carry their cause in their own message: print it once.
            let line = e.to_string().replace('\n', " ");
            eprintln!("{program}: error: {line}");
            if e.downcast_ref::<ConfigError>().is_some() {
                std::process::ExitCode::from(2)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}

fn init_logging(default: &str) {
    // lapin logs expected events (a passive probe's 404, a returned message
    // we handle) as errors; its failures reach us as values anyway, as do
    // the certificate errors rustls-platform-verifier also logs.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            "{default},lapin=off,rustls_platform_verifier=off"
        ))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

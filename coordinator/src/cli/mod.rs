//! The `guildhall` command line: flags (each with an environment fallback),
//! their validation, and the client commands.
//!
//! # Layout
//!
//! - this file: the clap definitions and their conversion into runtime configs;
//! - [`client`]: `status` and `trace`, which read the coordinator's API;
//! - [`submit`]: `submit`, which publishes straight to the broker;
//! - [`render`]: terminal tables and time formatting.

pub mod client;
pub mod render;
pub mod submit;

use crate::core::CoreConfig;
use crate::serve::ServeConfig;
use clap::{Args, Parser, Subcommand};
use guildhall_broker::AmqpUrl;
use guildhall_broker::topology::StreamRetention;
use guildhall_proto::{Names, Namespace};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The broker every command defaults to.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The management API `serve` and `demo` default to.
pub const DEFAULT_MANAGEMENT_URL: &str = "http://guest:guest@127.0.0.1:15672";

/// A flag value that failed validation: printed as one line, exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Guildhall: watch and steer a fleet of workers processing tasks through
/// multi-stage pipelines on RabbitMQ.
#[derive(Debug, Parser)]
#[command(name = "guildhall", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordinator: consume the events stream, serve the API, metrics and health.
    Serve(ServeArgs),
    /// Run a self-contained demo: coordinator, a three-stage pipeline of simulated workers, and a feed of tasks.
    Demo(DemoArgs),
    /// Put a task on a stage's queue.
    Submit(SubmitArgs),
    /// Show workers and stages (from a running coordinator).
    Status(ClientArgs),
    /// Show one task's pipeline, stage by stage (from a running coordinator).
    Trace(TraceArgs),
}

/// Where the broker is and which namespace to use.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// RabbitMQ URL.
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub amqp_url: String,
    /// Prefix of every broker name, so deployments can share a broker.
    #[arg(long, env = "GUILDHALL_NAMESPACE", default_value = guildhall_proto::names::DEFAULT_NAMESPACE)]
    pub namespace: String,
}

impl BrokerArgs {
    /// Parses the URL and namespace.
    pub fn validate(&self) -> Result<(AmqpUrl, Names), ConfigError> {
        let url =
            AmqpUrl::parse(&self.amqp_url).map_err(|e| ConfigError(format!("--amqp-url: {e}")))?;
        let ns = Namespace::new(self.namespace.as_str())
            .map_err(|e| ConfigError(format!("--namespace: {e}")))?;
        Ok((url, Names::new(ns)))
    }
}

/// Flags of the coordinator (`serve` and `demo`).
#[derive(Debug, Clone, Args)]
pub struct CoordinatorArgs {
    /// Address the HTTP API, dashboard and metrics listen on.
    #[arg(long, env = "GUILDHALL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// RabbitMQ management API (for unacked counts); "" to go without.
    #[arg(long, env = "GUILDHALL_MANAGEMENT_URL", default_value = DEFAULT_MANAGEMENT_URL, hide_env_values = true)]
    pub management_url: String,
    /// Heartbeat intervals of silence after which a worker is suspect.
    #[arg(long, env = "GUILDHALL_SUSPECT_HEARTBEATS", default_value_t = 2)]
    pub suspect_heartbeats: u32,
    /// Heartbeat intervals of silence after which a worker is dead (its
    /// connection is then closed so the broker requeues its tasks).
    #[arg(long, env = "GUILDHALL_MISSED_HEARTBEATS", default_value_t = 3)]
    pub missed_heartbeats: u32,
    /// POST a JSON alert (Slack-compatible `text`) here when a worker dies or
    /// comes back and when a task is dead-lettered.
    #[arg(long, env = "GUILDHALL_ALERT_WEBHOOK", hide_env_values = true)]
    pub alert_webhook: Option<String>,
    /// Most finished tasks kept in memory.
    #[arg(long, env = "GUILDHALL_KEEP_COMPLETED", default_value_t = 100_000)]
    pub keep_completed: usize,
    /// Longest a finished task is kept in memory.
    #[arg(long, env = "GUILDHALL_KEEP_COMPLETED_FOR", default_value = "1h", value_parser = humantime::parse_duration)]
    pub keep_completed_for: Duration,
    /// How long dead or stopped workers stay listed.
    #[arg(long, env = "GUILDHALL_WORKER_RETENTION", default_value = "10m", value_parser = humantime::parse_duration)]
    pub worker_retention: Duration,
    /// Export per-worker metric series (switch off for very large fleets).
    #[arg(long, env = "GUILDHALL_PER_WORKER_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub per_worker_metrics: bool,
    /// Events stream retention by age, if the coordinator creates the stream (RabbitMQ syntax: 7D, 12h).
    #[arg(long, env = "GUILDHALL_STREAM_MAX_AGE", default_value = "7D")]
    pub stream_max_age: String,
    /// Events stream retention by size in bytes, if the coordinator creates the stream.
    #[arg(
        long,
        env = "GUILDHALL_STREAM_MAX_BYTES",
        default_value_t = 2_000_000_000
    )]
    pub stream_max_bytes: u64,
    /// How often stage queue depths are polled.
    #[arg(long, env = "GUILDHALL_QUEUE_POLL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub queue_poll: Duration,
    /// Directory for snapshots of the state (`<namespace>.snapshot`), so a
    /// restart replays only the events stream's tail. Created if missing.
    /// Default (or ""): no snapshots; a restart replays the whole stream.
    #[arg(long, env = "GUILDHALL_DATA_DIR", value_parser = any_path)]
    pub data_dir: Option<PathBuf>,
    /// Time between two snapshots (with --data-dir), 1s to 1h.
    #[arg(long, env = "GUILDHALL_SNAPSHOT_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub snapshot_interval: Duration,
}

impl CoordinatorArgs {
    /// Validates the flags into a [`ServeConfig`] and the listen address.
    pub fn validate(&self, broker: &BrokerArgs) -> Result<(ServeConfig, SocketAddr), ConfigError> {
        let (url, names) = broker.validate()?;
        let listen: SocketAddr = self.listen.parse().map_err(|_| {
            ConfigError(format!(
                "--listen must be an address like 127.0.0.1:8080 (got '{}')",
                self.listen
            ))
        })?;
        if !(1..=100).contains(&self.missed_heartbeats) {
            return Err(ConfigError(format!(
                "--missed-heartbeats must be between 1 and 100 (got {})",
                self.missed_heartbeats
            )));
        }
        if self.suspect_heartbeats == 0 || self.suspect_heartbeats >= self.missed_heartbeats {
            return Err(ConfigError(format!(
                "--suspect-heartbeats must be at least 1 and below --missed-heartbeats ({}) (got {})",
                self.missed_heartbeats, self.suspect_heartbeats
            )));
        }
        if let Some(url) = &self.alert_webhook {
            let ok = reqwest::Url::parse(url)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
            if !ok {
                return Err(ConfigError(format!(
                    "--alert-webhook must be an http:// or https:// URL (got '{url}')"
                )));
            }
        }
        if self.queue_poll < Duration::from_millis(100)
            || self.queue_poll > Duration::from_secs(300)
        {
            return Err(ConfigError(format!(
                "--queue-poll must be between 100ms and 5m (got {})",
                humantime::format_duration(self.queue_poll)
            )));
        }
        if !valid_max_age(&self.stream_max_age) {
            return Err(ConfigError(format!(
                "--stream-max-age must be a number and a unit Y, M, D, h, m or s, like 7D (got '{}')",
                self.stream_max_age
            )));
        }
        if self.stream_max_bytes < 1_000_000 {
            return Err(ConfigError(format!(
                "--stream-max-bytes must be at least 1000000 (got {})",
                self.stream_max_bytes
            )));
        }
        if self.snapshot_interval < Duration::from_secs(1)
            || self.snapshot_interval > Duration::from_secs(3600)
        {
            return Err(ConfigError(format!(
                "--snapshot-interval must be between 1s and 1h (got {})",
                humantime::format_duration(self.snapshot_interval)
            )));
        }
        let data_dir = self.data_dir.clone().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = &data_dir {
            crate::serve::persist::prepare_dir(dir).map_err(|e| {
                ConfigError(format!(
                    "--data-dir: cannot write in {}: {e}",
                    dir.display()
                ))
            })?;
        }
        let management_url = if self.management_url.trim().is_empty() {
            None
        } else {
            guildhall_broker::Management::new(&self.management_url, url.vhost())
                .map_err(|e| ConfigError(format!("--management-url: {e}")))?;
            Some(self.management_url.clone())
        };
        let mut config = ServeConfig::new(url, names);
        config.management_url = management_url;
        config.alert_webhook = self.alert_webhook.clone();
        config.core = CoreConfig {
            suspect_heartbeats: self.suspect_heartbeats,
            missed_heartbeats: self.missed_heartbeats,
            completed_limit: self.keep_completed,
            completed_max_age_ms: duration_ms(self.keep_completed_for),
            worker_retention_ms: duration_ms(self.worker_retention),
            ..CoreConfig::default()
        };
        config.per_worker_metrics = self.per_worker_metrics;
        config.retention = StreamRetention {
            max_age: self.stream_max_age.clone(),
            max_bytes: self.stream_max_bytes,
        };
        config.queue_poll = self.queue_poll;
        config.data_dir = data_dir;
        config.snapshot_interval = self.snapshot_interval;
        Ok((config, listen))
    }
}

/// A path, the empty one included (it means "none", as `""` does for
/// `--management-url`), so an empty environment variable is not an error.
fn any_path(s: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}

fn valid_max_age(s: &str) -> bool {
    let Some(unit) = s.chars().last() else {
        return false;
    };
    let digits = &s[..s.len() - unit.len_utf8()];
    matches!(unit, 'Y' | 'M' | 'D' | 'h' | 'm' | 's')
        && !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `guildhall serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Broker.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Coordinator.
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

/// `guildhall demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Broker.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Coordinator.
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
    /// Tasks fed per second.
    #[arg(long, default_value_t = 4.0)]
    pub rate: f64,
    /// Agents per stage.
    #[arg(long, default_value_t = 2)]
    pub agents_per_stage: u32,
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Delete the demo's queues and stream when it stops.
    #[arg(long)]
    pub clean: bool,
}

/// `guildhall submit`.
#[derive(Debug, Clone, Args)]
pub struct SubmitArgs {
    /// Broker.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// The stage to queue the task on.
    #[arg(long)]
    pub stage: String,
    /// The task's id (default: a new UUIDv7).
    #[arg(long)]
    pub id: Option<String>,
    /// The payload: text, or @FILE to read a file, or @- for standard input.
    #[arg(long, default_value = "")]
    pub payload: String,
    /// Create the stage's queue if it does not exist yet.
    #[arg(long)]
    pub declare: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Flags of commands that read a running coordinator's API.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Broker (accepted for uniformity; these commands read the API).
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// The coordinator's HTTP address.
    #[arg(
        long,
        env = "GUILDHALL_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub api_url: String,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// `guildhall trace`.
#[derive(Debug, Clone, Args)]
pub struct TraceArgs {
    /// API access.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The task's id.
    pub id: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    fn serve(args: &[&str]) -> Result<(ServeConfig, SocketAddr), ConfigError> {
        let mut argv = vec!["guildhall", "serve"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Serve(s) => s.coordinator.validate(&s.broker),
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults_validate() {
        let (config, listen) = serve(&[]).unwrap();
        assert_eq!(listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.names.events_stream(), "guildhall.events");
        assert_eq!(config.core.missed_heartbeats, 3);
        assert!(config.management_url.is_some());
        assert_eq!(config.data_dir, None);
        assert_eq!(config.snapshot_interval, Duration::from_secs(10));
    }

    #[test]
    fn a_data_dir_is_created_and_must_be_writable() {
        let dir =
            std::env::temp_dir().join(format!("guildhall-cli-{:08x}/data", rand::random::<u32>()));
        let d = dir.display().to_string();
        let (config, _) = serve(&["--data-dir", &d, "--snapshot-interval", "1s"]).unwrap();
        assert_eq!(config.data_dir.as_deref(), Some(dir.as_path()));
        assert_eq!(config.snapshot_interval, Duration::from_secs(1));
        assert!(dir.is_dir());
        let (config, _) = serve(&["--data-dir", ""]).unwrap();
        assert_eq!(config.data_dir, None);
        let file = dir.join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let f = file.join("sub").display().to_string();
        let err = serve(&["--data-dir", &f]).unwrap_err().to_string();
        assert!(err.starts_with("--data-dir: cannot write in "), "{err}");
        assert!(!err.contains('\n'), "{err}");
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }

    #[test]
    fn bad_values_give_one_line_naming_the_flag() {
        for (args, needle) in [
            (vec!["--listen", "nowhere"], "--listen"),
            (vec!["--namespace", "a.b"], "--namespace"),
            (vec!["--amqp-url", "http://x"], "--amqp-url"),
            (vec!["--missed-heartbeats", "0"], "--missed-heartbeats"),
            (vec!["--suspect-heartbeats", "3"], "--suspect-heartbeats"),
            (vec!["--alert-webhook", "slack"], "--alert-webhook"),
            (vec!["--queue-poll", "1ms"], "--queue-poll"),
            (vec!["--stream-max-age", "7 days"], "--stream-max-age"),
            (vec!["--stream-max-bytes", "10"], "--stream-max-bytes"),
            (vec!["--management-url", "ftp://x"], "--management-url"),
            (vec!["--snapshot-interval", "500ms"], "--snapshot-interval"),
            (vec!["--snapshot-interval", "2h"], "--snapshot-interval"),
            (vec!["--data-dir", "/dev/null/guildhall"], "--data-dir"),
        ] {
            let err = serve(&args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
        let (config, _) = serve(&["--management-url", ""]).unwrap();
        assert!(config.management_url.is_none());
    }
}

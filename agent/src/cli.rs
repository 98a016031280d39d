//! The command line: every flag, its environment variable and its default,
//! and the conversion into a validated [`AgentConfig`].
//!
//! Values are kept raw here (durations as text, numbers signed) so that every
//! bad value is judged by [`AgentConfig::validate`] or [`Cli::into_config`]
//! and reported as one line naming the flag.

use crate::config::{
    self, AgentConfig, ConfigError, DEFAULT_AMQP_URL, RetryPolicy, WorkerSpec, limits,
    parse_duration,
};
use clap::Parser;
use clap::builder::FalseyValueParser;
use guildhall_broker::AmqpUrls;
use guildhall_broker::tls::TlsFiles;
use guildhall_proto::{AgentId, Namespace, Stage};
use std::path::PathBuf;
use std::str::FromStr;

/// Guildhall's agent: consumes a stage's queue, hands each task to a worker,
/// forwards results to the next stage and reports everything on the events
/// stream.
///
/// Not `Debug`: it holds the broker URL with its password.
#[derive(Clone, Parser)]
#[command(name = "guildhall-agent", version, about)]
pub struct Cli {
    /// Broker URL; several (the nodes of a cluster) as a comma-separated
    /// list or by repeating the flag: the agent connects to one that
    /// answers, chosen at random. A comma in a password must be written %2C.
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true, hide_default_value = true, action = clap::ArgAction::Append)]
    pub amqp_url: Vec<String>,

    /// PEM CA certificates to trust, besides the system's, for an amqps:// broker.
    #[arg(long, env = "GUILDHALL_AMQP_CA_FILE", value_name = "FILE")]
    pub amqp_ca_file: Option<String>,

    /// PEM client certificate for a broker that requires one (mutual TLS);
    /// needs --amqp-key-file.
    #[arg(long, env = "GUILDHALL_AMQP_CERT_FILE", value_name = "FILE")]
    pub amqp_cert_file: Option<String>,

    /// PEM private key of --amqp-cert-file (not encrypted).
    #[arg(long, env = "GUILDHALL_AMQP_KEY_FILE", value_name = "FILE")]
    pub amqp_key_file: Option<String>,

    /// Namespace: the prefix of every broker name.
    #[arg(long, env = "GUILDHALL_NAMESPACE", default_value = "guildhall")]
    pub namespace: String,

    /// The stage to consume (at start, with --stages) [default: the first of --stages].
    #[arg(long, env = "GUILDHALL_STAGE")]
    pub stage: Option<String>,

    /// Where results go by default; without it the pipeline ends after this
    /// stage [default with --stages: what --stage's entry says].
    #[arg(long, env = "GUILDHALL_NEXT")]
    pub next: Option<String>,

    /// Every stage this agent can serve (the coordinator may move it between
    /// them), each `stage>next` or `stage` alone to end the pipeline there,
    /// e.g. `build>report,report`.
    #[arg(long, env = "GUILDHALL_STAGES", value_name = "LIST")]
    pub stages: Option<String>,

    /// Agent id [default: <stage>-<hostname>-<4 random hex>].
    #[arg(long, env = "GUILDHALL_AGENT_ID")]
    pub id: Option<String>,

    /// Tasks processed at once (also the consumer prefetch), 1 to 1024.
    #[arg(
        long,
        env = "GUILDHALL_CONCURRENCY",
        default_value_t = 1,
        allow_negative_numbers = true
    )]
    pub concurrency: i64,

    /// Start at most this many tasks per second (`50/s`, `30/min`, `1/h`):
    /// the agent's own limit, until the coordinator sends it a share of
    /// its stage's limit (`guildhall serve --rate-limit`).
    #[arg(long, env = "GUILDHALL_RATE_LIMIT", value_name = "RATE")]
    pub rate_limit: Option<String>,

    /// Hand tasks to this URL by HTTP POST.
    #[arg(long, env = "GUILDHALL_WORKER_URL", value_name = "URL")]
    pub worker_url: Option<String>,

    /// Run `sh -c COMMAND` per task, payload on stdin, result on stdout.
    #[arg(long, env = "GUILDHALL_EXEC", value_name = "COMMAND")]
    pub exec: Option<String>,

    /// Use the built-in simulated worker, e.g. `median=200ms,spread=0.5,fail=0.02,permanent=0.005`.
    #[arg(long, env = "GUILDHALL_SIMULATE", value_name = "SPEC")]
    pub simulate: Option<String>,

    /// Longest a worker may take for one task.
    #[arg(long, env = "GUILDHALL_TASK_TIMEOUT", default_value = "300s")]
    pub task_timeout: String,

    /// Attempts at this stage before a retryable failure is dead-lettered.
    #[arg(
        long,
        env = "GUILDHALL_MAX_ATTEMPTS",
        default_value_t = 5,
        allow_negative_numbers = true
    )]
    pub max_attempts: i64,

    /// Delay before the second attempt; doubles with each further attempt.
    #[arg(long, env = "GUILDHALL_RETRY_DELAY", default_value = "1s")]
    pub retry_delay: String,

    /// Cap on the retry delay.
    #[arg(long, env = "GUILDHALL_RETRY_MAX_DELAY", default_value = "60s")]
    pub retry_max_delay: String,

    /// Heartbeat interval, 100ms to 60s.
    #[arg(long, env = "GUILDHALL_HEARTBEAT", default_value = "1s")]
    pub heartbeat: String,

    /// Longest an event waits before its batch is published.
    #[arg(long, env = "GUILDHALL_FLUSH_INTERVAL", default_value = "50ms")]
    pub flush_interval: String,

    /// Most events per published batch.
    #[arg(
        long,
        env = "GUILDHALL_BATCH_MAX",
        default_value_t = 500,
        allow_negative_numbers = true
    )]
    pub batch_max: i64,

    /// Lines of supervised worker output kept (for the logs command).
    #[arg(
        long,
        env = "GUILDHALL_LOG_LINES",
        default_value_t = 200,
        allow_negative_numbers = true
    )]
    pub log_lines: i64,

    /// Longest a stop waits for tasks in hand before requeueing them.
    #[arg(long, env = "GUILDHALL_SHUTDOWN_TIMEOUT", default_value = "30s")]
    pub shutdown_timeout: String,

    /// Cap on the delay between restarts of the supervised worker.
    #[arg(long, env = "GUILDHALL_RESTART_BACKOFF_MAX", default_value = "30s")]
    pub restart_backoff_max: String,

    /// Health-check URL of the supervised worker: polled with GET; failures
    /// in a row mean the worker is hung, and it is restarted. Needs `-- COMMAND`.
    #[arg(long, env = "GUILDHALL_HEALTH_URL", value_name = "URL")]
    pub health_url: Option<String>,

    /// Interval between health checks, and the time each may take.
    #[arg(long, env = "GUILDHALL_HEALTH_INTERVAL", default_value = "5s")]
    pub health_interval: String,

    /// Failed health checks in a row that make the worker count as hung.
    #[arg(
        long,
        env = "GUILDHALL_HEALTH_FAILURES",
        default_value_t = 3,
        allow_negative_numbers = true
    )]
    pub health_failures: i64,

    /// Serve the agent's own health probes here (`GET /livez`, `GET
    /// /readyz`) for an orchestrator's liveness and readiness checks, e.g.
    /// `0.0.0.0:9100`. Off unless given.
    #[arg(long, env = "GUILDHALL_PROBE_LISTEN", value_name = "ADDR")]
    pub probe_listen: Option<String>,

    /// Obey only commands the broker says this RabbitMQ user sent (the
    /// coordinator's): with a user per component, any other publisher that
    /// reaches the command queue through the default exchange is ignored.
    /// Default: obey every command.
    #[arg(long, env = "GUILDHALL_COMMAND_USER", value_name = "USER")]
    pub command_user: Option<String>,

    /// Declare any next stage a worker names (`x-guildhall-next-stage`).
    /// Default: only the agent's own stages and their next stages are
    /// declared; another stage must exist already, or the task is
    /// dead-lettered with class `unknown_stage`.
    #[arg(long, env = "GUILDHALL_ALLOW_NEW_STAGES", value_parser = FalseyValueParser::new())]
    pub allow_new_stages: bool,

    /// The least share of the stage's task starts each lower priority band
    /// gets while it has tasks waiting (0 to 0.45; 0 = strict priority).
    /// Default 0.1: a backlog of normal tasks still drains at a tenth of
    /// the stage's throughput during a flood of urgent ones.
    #[arg(long, env = "GUILDHALL_PRIORITY_SHARE", default_value_t = crate::core::bands::DEFAULT_SHARE)]
    pub priority_share: f64,

    /// Where the parent of a fan-out continues once its children have all
    /// finished, when its worker's answer names no join
    /// (`x-guildhall-join`); declared if missing, like --next. Default: no
    /// join (the parent is finished when its children are).
    #[arg(long, env = "GUILDHALL_JOIN", value_name = "STAGE")]
    pub join: Option<String>,

    /// Most children one fan-out may list, 1 to 10000; a worker listing
    /// more has its task dead-lettered (`invalid_fan_out`).
    #[arg(
        long,
        env = "GUILDHALL_MAX_CHILDREN",
        default_value_t = guildhall_proto::flow::MAX_CHILDREN as i64,
        allow_negative_numbers = true
    )]
    pub max_children: i64,

    /// Log as JSON lines instead of text.
    #[arg(long, env = "GUILDHALL_JSON_LOGS", value_parser = FalseyValueParser::new())]
    pub json_logs: bool,

    /// A worker process to start and supervise (restarted when it exits).
    #[arg(last = true, value_name = "COMMAND")]
    pub worker_command: Vec<String>,
}

impl Cli {
    /// Converts and validates; the error is one line naming the flag.
    pub fn into_config(self) -> Result<AgentConfig, ConfigError> {
        let stages = self
            .stages
            .as_deref()
            .map(config::parse_stages)
            .transpose()?
            .unwrap_or_default();
        let stage: Stage = match (self.stage.as_deref(), stages.first()) {
            (Some(stage), _) => id("--stage", stage)?,
            (None, Some(first)) => first.stage.clone(),
            (None, None) => {
                return Err(ConfigError::Missing(
                    "--stage is required (or set GUILDHALL_STAGE)".into(),
                ));
            }
        };
        let worker = self.worker()?;
        let mut config = AgentConfig::new(stage, worker).with_stages(stages);
        config.amqp_url = broker_url(
            &self.amqp_url,
            &TlsFiles {
                ca: self.amqp_ca_file.map(PathBuf::from),
                cert: self.amqp_cert_file.map(PathBuf::from),
                key: self.amqp_key_file.map(PathBuf::from),
            },
        )?;
        config.namespace = id::<Namespace>("--namespace", &self.namespace)?;
        if let Some(next) = self.next.as_deref() {
            config.next = Some(id("--next", next)?);
        }
        if let Some(agent) = &self.id {
            config.id = id::<AgentId>("--id", agent)?;
        }
        config.concurrency = int("--concurrency", self.concurrency, limits::CONCURRENCY)?;
        config.rate_limit = crate::config::rate_limit(self.rate_limit.as_deref())?;
        config.retry = RetryPolicy {
            max_attempts: int("--max-attempts", self.max_attempts, limits::MAX_ATTEMPTS)?,
            base_delay: parse_duration("--retry-delay", &self.retry_delay)?,
            max_delay: parse_duration("--retry-max-delay", &self.retry_max_delay)?,
        };
        config.task_timeout = parse_duration("--task-timeout", &self.task_timeout)?;
        config.heartbeat = parse_duration("--heartbeat", &self.heartbeat)?;
        config.flush_interval = parse_duration("--flush-interval", &self.flush_interval)?;
        config.batch_max = int("--batch-max", self.batch_max, limits::BATCH_MAX)?;
        config.log_lines = int("--log-lines", self.log_lines, limits::LOG_LINES)?;
        config.shutdown_timeout = parse_duration("--shutdown-timeout", &self.shutdown_timeout)?;
        config.restart_backoff_max =
            parse_duration("--restart-backoff-max", &self.restart_backoff_max)?;
        config.health_url = self.health_url;
        config.health_interval = parse_duration("--health-interval", &self.health_interval)?;
        config.health_failures = int(
            "--health-failures",
            self.health_failures,
            limits::HEALTH_FAILURES,
        )?;
        config.probe_listen = self
            .probe_listen
            .as_deref()
            .map(|addr| {
                addr.parse::<std::net::SocketAddr>().map_err(|e| {
                    ConfigError::invalid(
                        "--probe-listen",
                        format!("{addr:?} is not an address like 0.0.0.0:9100 ({e})"),
                    )
                })
            })
            .transpose()?;
        config.command_user = match self.command_user {
            Some(user) if user.trim().is_empty() => {
                return Err(ConfigError::invalid(
                    "--command-user",
                    "must name the coordinator's RabbitMQ user (or be left out)",
                ));
            }
            other => other,
        };
        config.allow_new_stages = self.allow_new_stages;
        config.priority_share = self.priority_share;
        if let Some(join) = self.join.as_deref() {
            config.join = Some(id("--join", join)?);
        }
        config.max_children = int("--max-children", self.max_children, limits::MAX_CHILDREN)?;
        config.supervise = self.worker_command;
        config.validate()?;
        Ok(config)
    }

    fn worker(&self) -> Result<WorkerSpec, ConfigError> {
        let given: Vec<&str> = [
            ("--worker-url", self.worker_url.is_some()),
            ("--exec", self.exec.is_some()),
            ("--simulate", self.simulate.is_some()),
        ]
        .iter()
        .filter(|(_, set)| *set)
        .map(|(flag, _)| *flag)
        .collect();
        if given.len() > 1 {
            return Err(ConfigError::Missing(format!(
                "only one of --worker-url, --exec or --simulate may be given (got {})",
                given.join(" and ")
            )));
        }
        if let Some(url) = &self.worker_url {
            return Ok(WorkerSpec::Http { url: url.clone() });
        }
        if let Some(command) = &self.exec {
            return Ok(WorkerSpec::Exec {
                command: command.clone(),
            });
        }
        if let Some(spec) = &self.simulate {
            let spec = crate::handoff::simulated::SimulateSpec::from_str(spec)
                .map_err(|e| ConfigError::invalid("--simulate", e.to_string()))?;
            return Ok(WorkerSpec::Simulated(spec));
        }
        Err(ConfigError::Missing(
            "one of --worker-url, --exec or --simulate is required".into(),
        ))
    }
}

/// The broker URLs (each flag's value one URL or a comma-separated list)
/// as one comma-separated list, with the TLS files of the flags (which
/// replace those the URLs name) as query parameters, read and checked: the
/// string the agent connects with.
fn broker_url(values: &[String], files: &TlsFiles) -> Result<String, ConfigError> {
    let urls = AmqpUrls::from_values(values)
        .map_err(|e| ConfigError::invalid("--amqp-url", e.to_string()))?;
    Ok(urls.with_tls_files(files)?.raw())
}

fn id<T: FromStr<Err = guildhall_proto::InvalidId>>(
    flag: &'static str,
    value: &str,
) -> Result<T, ConfigError> {
    value
        .parse()
        .map_err(|source| ConfigError::InvalidId { flag, source })
}

fn int<T: TryFrom<i64>>(
    flag: &'static str,
    value: i64,
    allowed: std::ops::RangeInclusive<i64>,
) -> Result<T, ConfigError> {
    config::range(flag, value, allowed.clone())?;
    T::try_from(value).map_err(|_| ConfigError::OutOfRange {
        flag,
        min: allowed.start().to_string(),
        max: allowed.end().to_string(),
        got: value.to_string(),
    })
}

/// A clap parse error as one line, without the usage block.
pub fn clap_error_line(err: &clap::Error) -> String {
    let text = err.to_string();
    let head = text.split("\n\n").next().unwrap_or(&text);
    let line = config::one_line(head);
    line.strip_prefix("error: ").unwrap_or(&line).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn parse(args: &[&str]) -> Result<AgentConfig, String> {
        let mut argv = vec!["guildhall-agent"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| clap_error_line(&e))?;
        cli.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn several_broker_urls_by_repeating_or_commas_become_one_list() {
        let a = "amqp://guest:s3cret@node1:5672/%2f";
        let b = "amqp://guest:s3cret@node2:5672/%2f";
        let c = "amqp://guest:s3cret@node3:5672/%2f";
        let base = ["--stage", "build", "--exec", "true"];
        let both = format!("{b}, {c}");
        let mut args = base.to_vec();
        args.extend(["--amqp-url", a, "--amqp-url", &both]);
        let config = parse(&args).unwrap();
        assert_eq!(config.amqp_url, format!("{a},{b},{c}"));
        config.validate().unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        for bad in [
            format!("{a},amqp://guest:s3cret@node2:port/%2f"),
            format!("{a},,{b}"),
            "amqp://guest:s3,cret@node1/%2f".to_owned(),
        ] {
            let mut args = base.to_vec();
            args.extend(["--amqp-url", &bad]);
            let err = parse(&args).unwrap_err();
            assert!(err.starts_with("--amqp-url: invalid AMQP URL"), "{err}");
            assert!(!err.contains("s3"), "{err}");
        }
    }

    #[test]
    fn a_full_command_line_converts() {
        let c = parse(&[
            "--stage",
            "build",
            "--next",
            "report",
            "--id",
            "b-1",
            "--namespace",
            "ns1",
            "--concurrency",
            "8",
            "--exec",
            "tr a-z A-Z",
            "--task-timeout",
            "5m",
            "--max-attempts",
            "3",
            "--retry-delay",
            "250ms",
            "--retry-max-delay",
            "2s",
            "--heartbeat",
            "500ms",
            "--batch-max",
            "100",
            "--health-url",
            "http://127.0.0.1:8080/health",
            "--health-interval",
            "2s",
            "--health-failures",
            "4",
            "--probe-listen",
            "0.0.0.0:9100",
            "--command-user",
            "coordinator",
            "--allow-new-stages",
            "--",
            "my-worker",
            "--port",
            "8080",
        ])
        .unwrap();
        assert_eq!(c.stage.as_str(), "build");
        assert_eq!(c.next.as_ref().map(|s| s.as_str()), Some("report"));
        assert_eq!(c.id.as_str(), "b-1");
        assert_eq!(c.namespace.as_str(), "ns1");
        assert_eq!(c.concurrency, 8);
        assert_eq!(
            c.worker,
            WorkerSpec::Exec {
                command: "tr a-z A-Z".into()
            }
        );
        assert_eq!(c.task_timeout, Duration::from_secs(300));
        assert_eq!(c.retry.max_attempts, 3);
        assert_eq!(c.retry.delay(2), Duration::from_millis(500));
        assert_eq!(c.heartbeat, Duration::from_millis(500));
        assert_eq!(c.batch_max, 100);
        assert_eq!(c.supervise, ["my-worker", "--port", "8080"]);
        assert_eq!(
            c.health_url.as_deref(),
            Some("http://127.0.0.1:8080/health")
        );
        assert_eq!(c.health_interval, Duration::from_secs(2));
        assert_eq!(c.health_failures, 4);
        assert_eq!(c.probe_listen, Some("0.0.0.0:9100".parse().unwrap()));
        let defaults = parse(&["--stage", "s", "--exec", "cat"]).unwrap();
        assert_eq!(defaults.health_url, None);
        assert_eq!(defaults.health_interval, Duration::from_secs(5));
        assert_eq!(defaults.health_failures, 3);
        assert_eq!(defaults.probe_listen, None);
        assert_eq!(c.command_user.as_deref(), Some("coordinator"));
        assert_eq!(defaults.command_user, None);
        assert!(c.allow_new_stages);
        assert!(!defaults.allow_new_stages);
        assert_eq!(defaults.join, None);
        assert_eq!(defaults.max_children, 10_000);
    }

    #[test]
    fn fan_out_flags_set_the_join_and_the_most_children() {
        let c = parse(&[
            "--stage",
            "s",
            "--exec",
            "cat",
            "--join",
            "merge",
            "--max-children",
            "50",
        ])
        .unwrap();
        assert_eq!(c.join.as_ref().map(|s| s.as_str()), Some("merge"));
        assert_eq!(c.max_children, 50);
        for (args, expected) in [
            (
                &["--max-children", "0"][..],
                "--max-children must be between 1 and 10000 (got 0)",
            ),
            (
                &["--max-children", "10001"],
                "--max-children must be between 1 and 10000 (got 10001)",
            ),
            (&["--join", "a b"], "--join"),
        ] {
            let mut all = vec!["--stage", "s", "--exec", "cat"];
            all.extend_from_slice(args);
            let err = parse(&all).unwrap_err().to_string();
            assert!(err.contains(expected), "{args:?}: {err}");
        }
    }

    #[test]
    fn bad_command_lines_give_one_line() {
        for (args, expected) in [
            (
                &["--exec", "cat"][..],
                "--stage is required (or set GUILDHALL_STAGE)",
            ),
            (
                &["--stage", "s"],
                "one of --worker-url, --exec or --simulate is required",
            ),
            (
                &["--stage", "s", "--exec", "cat", "--simulate", ""],
                "only one of --worker-url, --exec or --simulate may be given (got --exec and --simulate)",
            ),
            (
                &["--stage", "s", "--exec", "cat", "--concurrency", "0"],
                "--concurrency must be between 1 and 1024 (got 0)",
            ),
            (
                &["--stage", "s", "--exec", "cat", "--concurrency", "-3"],
                "--concurrency must be between 1 and 1024 (got -3)",
            ),
            (
                &["--stage", "s", "--exec", "cat", "--concurrency", "many"],
                "invalid value 'many' for '--concurrency <CONCURRENCY>'",
            ),
            (
                &["--stage", "s", "--exec", "cat", "--rate-limit", "0/s"],
                "--rate-limit: invalid rate limit \"0/s\": write a positive number of tasks per second, minute or hour, such as 50/s, 30/min or 1/h",
            ),
            (
                &["--stage", "s", "--exec", "cat", "--rate-limit", "fast"],
                "--rate-limit: invalid rate limit \"fast\": write a positive number of tasks per second, minute or hour, such as 50/s, 30/min or 1/h",
            ),
            (
                &["--stage", "a b", "--exec", "cat"],
                "--stage: invalid stage \"a b\"",
            ),
            (
                &["--stage", "s", "--exec", "cat", "--next", "x/y"],
                "--next: invalid stage",
            ),
            (
                &["--stage", "s", "--exec", "cat", "--id", "a b"],
                "--id: invalid agent id",
            ),
            (
                &["--stage", "s", "--exec", "cat", "--command-user", " "],
                "--command-user: must name the coordinator's RabbitMQ user",
            ),
            (
                &["--stage", "s", "--exec", "cat", "--probe-listen", "9100"],
                "--probe-listen: \"9100\" is not an address like 0.0.0.0:9100",
            ),
            (
                &["--stage", "s", "--exec", "cat", "--heartbeat", "10ms"],
                "--heartbeat must be between 100ms and 1m (got 10ms)",
            ),
            (
                &["--stage", "s", "--exec", "cat", "--task-timeout", "later"],
                "--task-timeout: invalid duration \"later\"",
            ),
            (
                &["--stage", "s", "--simulate", "fast=1"],
                "--simulate: unknown key \"fast\"",
            ),
            (
                &["--stage", "s", "--worker-url", "localhost:80"],
                "--worker-url: \"localhost:80\" is not an http:// or https:// URL with a host",
            ),
            (
                &["--stage", "s", "--exec", "cat", "--bogus"],
                "unexpected argument '--bogus' found",
            ),
            (
                &[
                    "--stage",
                    "s",
                    "--exec",
                    "cat",
                    "--health-url",
                    "http://h/x",
                ],
                "--health-url: only works with a supervised worker (add `-- COMMAND ARGS`)",
            ),
            (
                &[
                    "--stage",
                    "s",
                    "--exec",
                    "cat",
                    "--health-failures",
                    "-1",
                    "--",
                    "w",
                ],
                "--health-failures must be between 1 and 1000 (got -1)",
            ),
            (
                &[
                    "--stage",
                    "s",
                    "--exec",
                    "cat",
                    "--health-interval",
                    "often",
                    "--",
                    "w",
                ],
                "--health-interval: invalid duration \"often\"",
            ),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.starts_with(expected), "{args:?}: {err:?}");
            assert!(!err.contains('\n'), "{err:?}");
        }
    }

    #[test]
    fn stages_list_what_the_agent_can_serve() {
        let c = parse(&["--stages", "build>report,report", "--exec", "cat"]).unwrap();
        assert_eq!(c.stage.as_str(), "build", "the first entry by default");
        assert_eq!(c.next.as_ref().map(|s| s.as_str()), Some("report"));
        let listed: Vec<String> = c.routes().iter().map(ToString::to_string).collect();
        assert_eq!(listed, ["build>report", "report"]);

        let c = parse(&[
            "--stage",
            "report",
            "--stages",
            "build>report,report",
            "--exec",
            "cat",
        ])
        .unwrap();
        assert_eq!((c.stage.as_str(), c.next.as_ref()), ("report", None));
        let c = parse(&[
            "--stage",
            "build",
            "--next",
            "report",
            "--stages",
            "build>report,report",
            "--exec",
            "cat",
        ])
        .unwrap();
        assert_eq!(c.next.as_ref().map(|s| s.as_str()), Some("report"));

        let plain = parse(&["--stage", "s", "--next", "t", "--exec", "cat"]).unwrap();
        assert!(plain.stages.is_empty());
        assert_eq!(plain.routes().len(), 1);
    }

    #[test]
    fn bad_stages_give_one_line() {
        for (args, expected) in [
            (
                &["--stages", "a,a", "--exec", "cat"][..],
                "--stages: stage \"a\" is listed twice",
            ),
            (
                &["--stages", "a>", "--exec", "cat"],
                "--stages: \"a>\" names no stage after '>'",
            ),
            (
                &["--stages", "", "--exec", "cat"],
                "--stages: the list is empty",
            ),
            (
                &["--stage", "c", "--stages", "a>b,b", "--exec", "cat"],
                "--stage: \"c\" is not one of --stages (a, b)",
            ),
            (
                &[
                    "--stage", "a", "--next", "x", "--stages", "a>b,b", "--exec", "cat",
                ],
                "--next: \"x\" disagrees with --stages, which sends a's results to b",
            ),
            (
                &[
                    "--stage", "b", "--next", "x", "--stages", "a>b,b", "--exec", "cat",
                ],
                "--next: \"x\" disagrees with --stages, which ends the pipeline at b",
            ),
            (
                &["--stages", "a>b/c", "--exec", "cat"],
                "--stages: invalid stage \"b/c\"",
            ),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.starts_with(expected), "{args:?}: {err:?}");
            assert!(!err.contains('\n'), "{err:?}");
        }
    }
}

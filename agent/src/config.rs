//! The agent's configuration as a plain struct ([`AgentConfig`]), its
//! validation, and the retry policy.
//!
//! Everything here is usable without clap: the coordinator's demo builds
//! configs in code with [`AgentConfig::new`] and the `with_*` setters. The
//! command line ([`crate::cli`]) converts into the same struct, so both go
//! through [`AgentConfig::validate`], whose errors read as one line naming the
//! flag (`--concurrency must be between 1 and 1024 (got 0)`).

use crate::handoff::simulated::SimulateSpec;
use guildhall_proto::{AgentId, InvalidId, Namespace, Stage, WorkerMode};
use std::time::Duration;

/// Default broker URL (the local RabbitMQ with the guest account).
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Largest accepted `--concurrency` (also the consumer prefetch).
pub const MAX_CONCURRENCY: u32 = 1024;

/// Largest accepted prefetch (`SetPrefetch`): messages the broker may hand
/// the agent ahead of its concurrency, to hide the round trip.
pub const MAX_PREFETCH: u32 = 10_000;

/// Most stages one agent can be able to serve (`--stages`).
pub const MAX_STAGES: usize = 64;

/// Allowed ranges of the integer settings, shared by [`AgentConfig::validate`]
/// and the command line (which reads them as signed numbers so that `-1`
/// gets the same message as `0`).
pub(crate) mod limits {
    use std::ops::RangeInclusive;

    /// `--concurrency`.
    pub const CONCURRENCY: RangeInclusive<i64> = 1..=super::MAX_CONCURRENCY as i64;
    /// `--max-attempts`.
    pub const MAX_ATTEMPTS: RangeInclusive<i64> = 1..=10_000;
    /// `--batch-max`.
    pub const BATCH_MAX: RangeInclusive<i64> = 1..=100_000;
    /// `--log-lines`.
    pub const LOG_LINES: RangeInclusive<i64> = 0..=100_000;
    /// `--health-failures`.
    pub const HEALTH_FAILURES: RangeInclusive<i64> = 1..=1000;
    /// `--max-children`.
    pub const MAX_CHILDREN: RangeInclusive<i64> = 1..=guildhall_proto::flow::MAX_CHILDREN as i64;
}

/// How tasks reach the worker.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerSpec {
    /// HTTP POST of each payload to this URL.
    Http {
        /// The worker's URL (`http://127.0.0.1:8080/task`).
        url: String,
    },
    /// One `sh -c COMMAND` process per task, payload on stdin.
    Exec {
        /// The shell command line.
        command: String,
    },
    /// The built-in simulated worker (demos, benchmarks).
    Simulated(SimulateSpec),
}

impl WorkerSpec {
    /// The form reported in `Hello` events.
    pub fn mode(&self) -> WorkerMode {
        match self {
            WorkerSpec::Http { url } => WorkerMode::Http { url: url.clone() },
            WorkerSpec::Exec { command } => WorkerMode::Exec {
                command: command.clone(),
            },
            WorkerSpec::Simulated(_) => WorkerMode::Simulated,
        }
    }
}

/// One stage an agent can serve, and where that stage's results go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StageRoute {
    /// The stage whose queue is consumed while the agent serves it.
    pub stage: Stage,
    /// Where its successful results go unless the worker says otherwise;
    /// `None` ends the pipeline after this stage.
    pub next: Option<Stage>,
}

impl std::fmt::Display for StageRoute {
    /// The `--stages` form: `stage>next`, or `stage` alone.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.next {
            Some(next) => write!(f, "{}>{next}", self.stage),
            None => write!(f, "{}", self.stage),
        }
    }
}

/// How `--stages` is written, for error messages.
const STAGES_EXAMPLE: &str = "write it like 'build>report,report': a comma-separated list of \
     stages, each `stage>next` or `stage` alone to end the pipeline there";

/// Parses `--stages`: comma-separated entries, each `stage>next` (results
/// go to `next`) or `stage` alone (the pipeline ends there). Spaces around
/// names are ignored. Refuses empty entries, invalid names, more than one
/// `>`, a stage listed twice and more than [`MAX_STAGES`] entries.
pub fn parse_stages(value: &str) -> Result<Vec<StageRoute>, ConfigError> {
    const FLAG: &str = "--stages";
    if value.trim().is_empty() {
        return Err(ConfigError::invalid(
            FLAG,
            format!("the list is empty ({STAGES_EXAMPLE})"),
        ));
    }
    let stage = |name: &str| -> Result<Stage, ConfigError> {
        name.trim()
            .parse()
            .map_err(|source| ConfigError::InvalidId { flag: FLAG, source })
    };
    let mut routes = Vec::new();
    for (i, entry) in value.split(',').enumerate() {
        let entry = entry.trim();
        if entry.is_empty() {
            return Err(ConfigError::invalid(
                FLAG,
                format!("entry {} is empty ({STAGES_EXAMPLE})", i + 1),
            ));
        }
        let mut parts = entry.split('>');
        let name = parts.next().unwrap_or_default();
        let next = parts.next();
        if parts.next().is_some() {
            return Err(ConfigError::invalid(
                FLAG,
                format!("{entry:?} has more than one '>' ({STAGES_EXAMPLE})"),
            ));
        }
        let next = match next.map(str::trim) {
            Some("") => {
                return Err(ConfigError::invalid(
                    FLAG,
                    format!(
                        "{entry:?} names no stage after '>' (write {:?} alone to end the pipeline there)",
                        name.trim()
                    ),
                ));
            }
            Some(next) => Some(stage(next)?),
            None => None,
        };
        routes.push(StageRoute {
            stage: stage(name)?,
            next,
        });
    }
    check_routes(&routes)?;
    Ok(routes)
}

/// The rules of a route list whatever its origin: not too long, no stage twice.
fn check_routes(routes: &[StageRoute]) -> Result<(), ConfigError> {
    if routes.len() > MAX_STAGES {
        return Err(ConfigError::invalid(
            "--stages",
            format!("at most {MAX_STAGES} stages (got {})", routes.len()),
        ));
    }
    for (i, route) in routes.iter().enumerate() {
        if routes[..i].iter().any(|r| r.stage == route.stage) {
            return Err(ConfigError::invalid(
                "--stages",
                format!("stage {:?} is listed twice", route.stage.as_str()),
            ));
        }
    }
    Ok(())
}

/// When and how often a failed task is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts at one stage before a retryable failure is dead-lettered.
    pub max_attempts: u32,
    /// Delay after the first failed attempt; doubles with each attempt.
    pub base_delay: Duration,
    /// Cap on the doubled delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The delay before attempt `failed_attempt + 1`: `base * 2^(failed_attempt - 1)`,
    /// capped at `max_delay`. Deterministic (no jitter) because each distinct
    /// delay is a retry queue of its own.
    pub fn delay(&self, failed_attempt: u32) -> Duration {
        let doublings = failed_attempt.saturating_sub(1).min(63);
        let factor = 1u128 << doublings;
        let ms = self.base_delay.as_millis().saturating_mul(factor);
        let capped = ms.min(self.max_delay.as_millis());
        Duration::from_millis(u64::try_from(capped).unwrap_or(u64::MAX))
    }

    /// Whether a retryable failure of `attempt` gets another try.
    pub fn should_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }
}

/// Everything an agent needs to run. Build it with [`AgentConfig::new`] and
/// the `with_*` setters, or from the command line; [`crate::run`] validates it.
/// Its `Debug` form hides the broker password.
#[derive(Clone)]
pub struct AgentConfig {
    /// Broker URL, or several (the nodes of a cluster) comma-separated
    /// ([`guildhall_broker::AmqpUrls`]); may hold passwords, so it is only
    /// ever logged redacted.
    pub amqp_url: String,
    /// Prefix of every broker name, so deployments (and tests) share a broker.
    pub namespace: Namespace,
    /// The stage whose queue this agent consumes at start (an `Assign`
    /// command may move it to another of `stages`).
    pub stage: Stage,
    /// Where successful results of `stage` go unless the worker says
    /// otherwise; `None` ends the pipeline after it. With `stages`, it must
    /// agree with `stage`'s entry there.
    pub next: Option<Stage>,
    /// Every stage this agent can serve, each with where its results go, so
    /// that the coordinator can move it between them (`Assign`). Empty means
    /// `stage` (with `next`) alone; otherwise `stage` must be one of them.
    pub stages: Vec<StageRoute>,
    /// This agent's id; its connection is named `guildhall-agent/<namespace>/<id>`.
    pub id: AgentId,
    /// Tasks processed at once, and the consumer prefetch (a `SetPrefetch`
    /// command may raise the prefetch above it).
    pub concurrency: u32,
    /// How tasks reach the worker.
    pub worker: WorkerSpec,
    /// A worker process to start and keep running (`-- COMMAND ARGS`);
    /// empty when the worker runs on its own.
    pub supervise: Vec<String>,
    /// Longest a worker may take for one task before it counts as failed.
    pub task_timeout: Duration,
    /// Attempts and delays of retries.
    pub retry: RetryPolicy,
    /// Interval between heartbeats (liveness is judged on it).
    pub heartbeat: Duration,
    /// Longest an event waits in a batch before it is published.
    pub flush_interval: Duration,
    /// Most events in one published batch.
    pub batch_max: usize,
    /// Lines of supervised worker output kept for the `Logs` command.
    pub log_lines: usize,
    /// Longest a stop waits for tasks in hand before requeueing them.
    pub shutdown_timeout: Duration,
    /// Cap on the delay between restarts of the supervised worker.
    pub restart_backoff_max: Duration,
    /// A URL of the supervised worker polled with GET: a worker process can
    /// hang without exiting, and only an answer tells it is alive. `None`
    /// for no health checks.
    pub health_url: Option<String>,
    /// Interval between health checks, and how long each may take.
    pub health_interval: Duration,
    /// Consecutive failed health checks after which the worker counts as
    /// hung and is restarted (one slow answer is not a hang).
    pub health_failures: u32,
    /// Where to serve `/livez` and `/readyz` for an orchestrator (a
    /// Kubernetes probe, a compose healthcheck); `None` serves nothing.
    pub probe_listen: Option<std::net::SocketAddr>,
    /// The RabbitMQ user whose commands are obeyed (the broker vouches for
    /// a message's `user_id`); `None` obeys every command. Anyone allowed
    /// to publish to the default exchange can reach a command queue, so a
    /// deployment with a user per component sets this.
    pub command_user: Option<String>,
    /// Declare any next stage a worker names (`x-guildhall-next-stage`),
    /// as agents did before: off, a stage that is neither the agent's own
    /// nor already declared fails the task (`unknown_stage`) instead of
    /// creating a queue nobody consumes.
    pub allow_new_stages: bool,
    /// Least share of the starts owed to each lower priority band with
    /// tasks waiting (`--priority-share`), so they never starve.
    pub priority_share: f64,
    /// The agent's own start rate limit (`--rate-limit`), in force until
    /// the coordinator sends a share of its stage's limit.
    pub rate_limit: Option<guildhall_proto::Rate>,
    /// Where a fan-out's parent continues once its children have finished,
    /// when its worker names no join (`--join`, issue 19); `None`: no join.
    /// Declared if missing, like a next stage.
    pub join: Option<Stage>,
    /// Most children one fan-out may have (`--max-children`, at most
    /// [`guildhall_proto::flow::MAX_CHILDREN`]); more dead-letters the
    /// parent (`invalid_fan_out`).
    pub max_children: u32,
}

impl AgentConfig {
    /// A config with every default: local broker, namespace `guildhall`, no
    /// next stage, concurrency 1, a generated id `<stage>-<host>-<4 hex>`.
    pub fn new(stage: Stage, worker: WorkerSpec) -> Self {
        let id = default_agent_id(&stage);
        Self {
            amqp_url: DEFAULT_AMQP_URL.to_owned(),
            namespace: Namespace::default(),
            stage,
            next: None,
            stages: Vec::new(),
            id,
            concurrency: 1,
            worker,
            supervise: Vec::new(),
            task_timeout: Duration::from_secs(300),
            retry: RetryPolicy::default(),
            heartbeat: Duration::from_secs(1),
            flush_interval: Duration::from_millis(50),
            batch_max: 500,
            log_lines: 200,
            shutdown_timeout: Duration::from_secs(30),
            restart_backoff_max: Duration::from_secs(30),
            health_url: None,
            health_interval: Duration::from_secs(5),
            health_failures: 3,
            probe_listen: None,
            command_user: None,
            allow_new_stages: false,
            priority_share: crate::core::bands::DEFAULT_SHARE,
            rate_limit: None,
            join: None,
            max_children: guildhall_proto::flow::MAX_CHILDREN,
        }
    }

    /// Sets the broker URL (or a comma-separated list of them).
    pub fn with_amqp_url(mut self, url: impl Into<String>) -> Self {
        self.amqp_url = url.into();
        self
    }

    /// Sets the namespace.
    pub fn with_namespace(mut self, namespace: Namespace) -> Self {
        self.namespace = namespace;
        self
    }

    /// Sets the default next stage.
    pub fn with_next(mut self, next: Option<Stage>) -> Self {
        self.next = next;
        self
    }

    /// Sets every stage the agent can serve (see [`parse_stages`] for the
    /// command-line form). If `stage` is among them, `next` is set from its
    /// entry, so a later [`with_next`](Self::with_next) must agree with it.
    pub fn with_stages(mut self, stages: Vec<StageRoute>) -> Self {
        if let Some(route) = stages.iter().find(|r| r.stage == self.stage) {
            self.next = route.next.clone();
        }
        self.stages = stages;
        self
    }

    /// Every stage the agent can serve with where its results go: `stages`,
    /// or `stage` with `next` alone when `stages` is empty. The first is not
    /// necessarily `stage`.
    pub fn routes(&self) -> Vec<StageRoute> {
        if self.stages.is_empty() {
            vec![StageRoute {
                stage: self.stage.clone(),
                next: self.next.clone(),
            }]
        } else {
            self.stages.clone()
        }
    }

    /// Sets the agent id.
    pub fn with_id(mut self, id: AgentId) -> Self {
        self.id = id;
        self
    }

    /// Sets the concurrency (and prefetch).
    pub fn with_concurrency(mut self, concurrency: u32) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// Sets the retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Sets the per-task timeout.
    pub fn with_task_timeout(mut self, timeout: Duration) -> Self {
        self.task_timeout = timeout;
        self
    }

    /// Sets the heartbeat interval.
    pub fn with_heartbeat(mut self, interval: Duration) -> Self {
        self.heartbeat = interval;
        self
    }

    /// Sets the shutdown timeout.
    pub fn with_shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Supervises a worker process (`argv[0]` and its arguments).
    pub fn with_supervised(mut self, argv: Vec<String>) -> Self {
        self.supervise = argv;
        self
    }

    /// Sets the default join stage of a fan-out (`--join`, issue 19).
    pub fn with_join(mut self, join: Option<Stage>) -> Self {
        self.join = join;
        self
    }

    /// Sets the most children one fan-out may have (`--max-children`).
    pub fn with_max_children(mut self, max: u32) -> Self {
        self.max_children = max;
        self
    }

    /// Health-checks the supervised worker: GET `url` every `interval`;
    /// `failures` failed checks in a row restart it.
    pub fn with_health_check(
        mut self,
        url: impl Into<String>,
        interval: Duration,
        failures: u32,
    ) -> Self {
        self.health_url = Some(url.into());
        self.health_interval = interval;
        self.health_failures = failures;
        self
    }

    /// Checks every value; the error is one line naming the flag at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        range(
            "--concurrency",
            self.concurrency.into(),
            limits::CONCURRENCY,
        )?;
        range(
            "--max-attempts",
            self.retry.max_attempts.into(),
            limits::MAX_ATTEMPTS,
        )?;
        range("--batch-max", as_i64(self.batch_max), limits::BATCH_MAX)?;
        if !crate::core::bands::valid_share(self.priority_share) {
            return Err(ConfigError::OutOfRange {
                flag: "--priority-share",
                min: "0".into(),
                max: crate::core::bands::MAX_SHARE.to_string(),
                got: self.priority_share.to_string(),
            });
        }
        range("--log-lines", as_i64(self.log_lines), limits::LOG_LINES)?;
        range(
            "--max-children",
            self.max_children.into(),
            limits::MAX_CHILDREN,
        )?;
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        duration_range("--task-timeout", self.task_timeout, ms(1), s(86_400))?;
        duration_range("--retry-delay", self.retry.base_delay, ms(1), s(86_400))?;
        duration_range(
            "--retry-max-delay",
            self.retry.max_delay,
            self.retry.base_delay,
            s(86_400),
        )?;
        duration_range("--heartbeat", self.heartbeat, ms(100), s(60))?;
        duration_range("--flush-interval", self.flush_interval, ms(1), s(10))?;
        duration_range("--shutdown-timeout", self.shutdown_timeout, ms(0), s(3600))?;
        duration_range(
            "--restart-backoff-max",
            self.restart_backoff_max,
            ms(500),
            s(3600),
        )?;
        duration_range("--health-interval", self.health_interval, ms(100), s(3600))?;
        range(
            "--health-failures",
            self.health_failures.into(),
            limits::HEALTH_FAILURES,
        )?;
        guildhall_broker::AmqpUrls::parse(&self.amqp_url)
            .map_err(|e| ConfigError::invalid("--amqp-url", e.to_string()))?;
        match &self.worker {
            WorkerSpec::Http { url } => {
                check_worker_url(url)?;
            }
            WorkerSpec::Exec { command } => {
                if command.trim().is_empty() {
                    return Err(ConfigError::invalid("--exec", "the command is empty"));
                }
            }
            WorkerSpec::Simulated(spec) => spec
                .validate()
                .map_err(|e| ConfigError::invalid("--simulate", e.to_string()))?,
        }
        if self.supervise.first().is_some_and(|c| c.is_empty()) {
            return Err(ConfigError::invalid(
                "worker command",
                "the program after `--` is empty",
            ));
        }
        self.check_stages()?;
        if let Some(url) = &self.health_url {
            if self.supervise.is_empty() {
                return Err(ConfigError::invalid(
                    "--health-url",
                    "only works with a supervised worker (add `-- COMMAND ARGS`)",
                ));
            }
            check_http_url("--health-url", url)?;
        }
        Ok(())
    }
}

impl AgentConfig {
    /// `stages` is a valid list holding `stage`, whose entry agrees with `next`.
    fn check_stages(&self) -> Result<(), ConfigError> {
        if self.stages.is_empty() {
            return Ok(());
        }
        check_routes(&self.stages)?;
        let listed = || {
            self.stages
                .iter()
                .map(|r| r.stage.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let Some(route) = self.stages.iter().find(|r| r.stage == self.stage) else {
            return Err(ConfigError::invalid(
                "--stage",
                format!(
                    "{:?} is not one of --stages ({})",
                    self.stage.as_str(),
                    listed()
                ),
            ));
        };
        if route.next != self.next {
            let given = match &self.next {
                Some(next) => format!("{:?}", next.as_str()),
                None => "no next stage".to_owned(),
            };
            let listed = match &route.next {
                Some(next) => format!("sends {}'s results to {next}", route.stage),
                None => format!("ends the pipeline at {}", route.stage),
            };
            return Err(ConfigError::invalid(
                "--next",
                format!("{given} disagrees with --stages, which {listed}"),
            ));
        }
        Ok(())
    }
}

/// `--rate-limit`: a rate such as `50/s` (the error names the flag).
pub fn rate_limit(value: Option<&str>) -> Result<Option<guildhall_proto::Rate>, ConfigError> {
    value
        .map(|v| {
            v.parse().map_err(
                |e: guildhall_proto::schedule::InvalidRate| ConfigError::Invalid {
                    flag: "--rate-limit",
                    message: e.to_string(),
                },
            )
        })
        .transpose()
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field(
                "amqp_url",
                &guildhall_broker::addrs::redact_list(&self.amqp_url),
            )
            .field("namespace", &self.namespace)
            .field("stage", &self.stage)
            .field("next", &self.next)
            .field("stages", &self.stages)
            .field("id", &self.id)
            .field("concurrency", &self.concurrency)
            .field("worker", &self.worker)
            .field("supervise", &self.supervise)
            .field("task_timeout", &self.task_timeout)
            .field("retry", &self.retry)
            .field("heartbeat", &self.heartbeat)
            .field("flush_interval", &self.flush_interval)
            .field("batch_max", &self.batch_max)
            .field("log_lines", &self.log_lines)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("restart_backoff_max", &self.restart_backoff_max)
            .field("health_url", &self.health_url)
            .field("health_interval", &self.health_interval)
            .field("health_failures", &self.health_failures)
            .field("allow_new_stages", &self.allow_new_stages)
            .field("priority_share", &self.priority_share)
            .field("rate_limit", &self.rate_limit)
            .field("join", &self.join)
            .field("max_children", &self.max_children)
            .finish()
    }
}

/// A configuration value that cannot be used. Displays as one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A number or duration outside its allowed range.
    #[error("{flag} must be between {min} and {max} (got {got})")]
    OutOfRange {
        /// The flag, as written on the command line.
        flag: &'static str,
        /// Smallest allowed value, as written.
        min: String,
        /// Largest allowed value, as written.
        max: String,
        /// The refused value, as written.
        got: String,
    },
    /// An identifier (stage, namespace, agent id) that breaks its rule.
    #[error("{flag}: {source}")]
    InvalidId {
        /// The flag.
        flag: &'static str,
        /// What rule it broke.
        source: InvalidId,
    },
    /// Any other refused value.
    #[error("{flag}: {message}")]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// What is wrong, in words a user can act on.
        message: String,
    },
    /// A TLS file that cannot be used (`--amqp-ca-file`, ...), or TLS
    /// flags with an `amqp://` URL; the message names the flag.
    #[error("{0}")]
    Tls(String),
    /// A flag that must be given is missing.
    #[error("{0}")]
    Missing(String),
}

impl ConfigError {
    /// An [`ConfigError::Invalid`] for `flag`.
    pub fn invalid(flag: &'static str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            flag,
            message: one_line(&message.into()),
        }
    }
}

impl From<guildhall_broker::tls::TlsError> for ConfigError {
    fn from(e: guildhall_broker::tls::TlsError) -> Self {
        ConfigError::Tls(one_line(&e.to_string()))
    }
}

pub use guildhall_broker::one_line;

fn as_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Checks an integer setting against its range.
pub(crate) fn range(
    flag: &'static str,
    got: i64,
    allowed: std::ops::RangeInclusive<i64>,
) -> Result<(), ConfigError> {
    if allowed.contains(&got) {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange {
            flag,
            min: allowed.start().to_string(),
            max: allowed.end().to_string(),
            got: got.to_string(),
        })
    }
}

fn duration_range(
    flag: &'static str,
    got: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), ConfigError> {
    if (min..=max).contains(&got) {
        Ok(())
    } else {
        let show = |d: Duration| humantime::format_duration(d).to_string();
        Err(ConfigError::OutOfRange {
            flag,
            min: show(min),
            max: show(max),
            got: show(got),
        })
    }
}

/// Checks a worker URL: `http(s)://host[:port]/...`.
pub(crate) fn check_worker_url(url: &str) -> Result<reqwest::Url, ConfigError> {
    check_http_url("--worker-url", url)
}

/// Checks that `url` (given with `flag`) is `http(s)://host[:port]/...`.
pub(crate) fn check_http_url(flag: &'static str, url: &str) -> Result<reqwest::Url, ConfigError> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| ConfigError::invalid(flag, format!("{url:?} is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(ConfigError::invalid(
            flag,
            format!("{url:?} is not an http:// or https:// URL with a host"),
        ));
    }
    Ok(parsed)
}

/// Parses a duration written like `250ms`, `1s`, `5m`.
pub fn parse_duration(flag: &'static str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value.trim()).map_err(|e| {
        ConfigError::invalid(
            flag,
            format!("invalid duration {value:?} ({e}; write it like 250ms, 1s or 5m)"),
        )
    })
}

/// `<stage>-<hostname>-<4 random hex>`, with the host name cut to the
/// characters an [`AgentId`] allows.
pub fn default_agent_id(stage: &Stage) -> AgentId {
    let host: String = hostname()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(48)
        .collect();
    let suffix: u16 = rand::random();
    let candidate = if host.is_empty() {
        format!("{stage}-{suffix:04x}")
    } else {
        format!("{stage}-{host}-{suffix:04x}")
    };
    // The stage starts with a letter or digit, every other character is one
    // an agent id allows, and the whole is at most 64 + 1 + 48 + 1 + 4 = 118
    // bytes, so the candidate is valid; the stage alone is the fallback (its
    // rule is a subset of the agent id's).
    AgentId::new(candidate)
        .or_else(|_| AgentId::new(stage.as_str()))
        .expect("a stage name is always a valid agent id")
}

/// This machine's host name (empty if unknown).
pub fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AgentConfig {
        AgentConfig::new(
            "build".parse().unwrap(),
            WorkerSpec::Exec {
                command: "cat".into(),
            },
        )
    }

    #[test]
    fn retry_delay_doubles_and_caps() {
        let p = RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
        };
        let secs: Vec<u64> = (1..=8).map(|a| p.delay(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(p.delay(0), Duration::from_secs(1));
        assert_eq!(p.delay(u32::MAX), Duration::from_secs(60));
        let fine = RetryPolicy {
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_millis(900),
            ..p
        };
        assert_eq!(fine.delay(2), Duration::from_millis(500));
        assert_eq!(fine.delay(3), Duration::from_millis(900));
        assert!(p.should_retry(4));
        assert!(!p.should_retry(5));
        assert!(!p.should_retry(9));
    }

    #[test]
    fn defaults_are_valid_and_the_id_is_derived_from_stage_and_host() {
        let c = config();
        c.validate().unwrap();
        let id = c.id.as_str();
        assert!(id.starts_with("build-"), "{id}");
        let hex = id.rsplit('-').next().unwrap();
        assert_eq!(hex.len(), 4);
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn every_bad_value_gives_a_one_line_message_naming_the_flag() {
        type Change = Box<dyn Fn(&mut AgentConfig)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|c| c.concurrency = 0),
                "--concurrency must be between 1 and 1024 (got 0)",
            ),
            (
                Box::new(|c| c.concurrency = 1025),
                "--concurrency must be between 1 and 1024 (got 1025)",
            ),
            (
                Box::new(|c| c.retry.max_attempts = 0),
                "--max-attempts must be between 1 and 10000 (got 0)",
            ),
            (
                Box::new(|c| c.batch_max = 0),
                "--batch-max must be between 1 and 100000 (got 0)",
            ),
            (
                Box::new(|c| c.log_lines = 1_000_000),
                "--log-lines must be between 0 and 100000 (got 1000000)",
            ),
            (
                Box::new(|c| c.heartbeat = Duration::from_millis(50)),
                "--heartbeat must be between 100ms and 1m (got 50ms)",
            ),
            (
                Box::new(|c| c.heartbeat = Duration::from_secs(61)),
                "--heartbeat must be between 100ms and 1m (got 1m 1s)",
            ),
            (
                Box::new(|c| c.task_timeout = Duration::ZERO),
                "--task-timeout must be between 1ms and 1day (got 0s)",
            ),
            (
                Box::new(|c| c.retry.base_delay = Duration::ZERO),
                "--retry-delay must be between 1ms and 1day (got 0s)",
            ),
            (
                Box::new(|c| c.retry.max_delay = Duration::from_millis(500)),
                "--retry-max-delay must be between 1s and 1day (got 500ms)",
            ),
            (
                Box::new(|c| c.flush_interval = Duration::ZERO),
                "--flush-interval must be between 1ms and 10s (got 0s)",
            ),
            (
                Box::new(|c| c.restart_backoff_max = Duration::from_millis(10)),
                "--restart-backoff-max must be between 500ms and 1h (got 10ms)",
            ),
            (
                Box::new(|c| c.shutdown_timeout = Duration::from_secs(7200)),
                "--shutdown-timeout must be between 0s and 1h (got 2h)",
            ),
            (
                Box::new(|c| c.health_url = Some("http://127.0.0.1:9/health".into())),
                "--health-url: only works with a supervised worker (add `-- COMMAND ARGS`)",
            ),
            (
                Box::new(|c| {
                    c.supervise = vec!["w".into()];
                    c.health_url = Some("localhost:9/health".into());
                }),
                "--health-url: \"localhost:9/health\" is not an http:// or https:// URL with a host",
            ),
            (
                Box::new(|c| c.health_interval = Duration::from_millis(10)),
                "--health-interval must be between 100ms and 1h (got 10ms)",
            ),
            (
                Box::new(|c| c.health_failures = 0),
                "--health-failures must be between 1 and 1000 (got 0)",
            ),
            (
                Box::new(|c| c.amqp_url = "http://x".into()),
                "--amqp-url: invalid AMQP URL",
            ),
            (
                Box::new(|c| {
                    c.worker = WorkerSpec::Http {
                        url: "ftp://x/".into(),
                    }
                }),
                "--worker-url: \"ftp://x/\" is not an http:// or https:// URL with a host",
            ),
            (
                Box::new(|c| {
                    c.worker = WorkerSpec::Http {
                        url: "nonsense".into(),
                    }
                }),
                "--worker-url: \"nonsense\" is not a URL",
            ),
            (
                Box::new(|c| {
                    c.worker = WorkerSpec::Exec {
                        command: "  ".into(),
                    }
                }),
                "--exec: the command is empty",
            ),
            (
                Box::new(|c| {
                    c.worker = WorkerSpec::Simulated(SimulateSpec {
                        fail: 2.0,
                        ..SimulateSpec::default()
                    })
                }),
                "--simulate: fail must be between 0 and 1 (got 2)",
            ),
        ];
        for (change, expected) in cases {
            let mut c = config();
            change(&mut c);
            let msg = c.validate().unwrap_err().to_string();
            assert!(msg.starts_with(expected), "{msg:?} !~ {expected:?}");
            assert!(!msg.contains('\n'), "{msg:?}");
        }
    }

    #[test]
    fn debug_output_hides_the_broker_password() {
        let c = config().with_amqp_url("amqp://guest:hunter2@broker:5672/%2f");
        let shown = format!("{c:?}");
        assert!(shown.contains("guest:***@broker"), "{shown}");
        assert!(!shown.contains("hunter2"));
        let c = config()
            .with_amqp_url("amqp://guest:hunter2@a:5672/%2f,amqp://guest:hunter3@b:5672/%2f");
        let shown = format!("{c:?}");
        assert!(shown.contains("guest:***@b"), "{shown}");
        assert!(!shown.contains("hunter"), "{shown}");
        c.validate().unwrap();
        let msg = config()
            .with_amqp_url("amqp://guest:hunter2@a:5672/%2f,http://guest:hunter3@b/")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("--amqp-url: invalid AMQP URL"), "{msg}");
        assert!(!msg.contains("hunter"), "{msg}");
    }

    #[test]
    fn durations_parse_like_humans_write_them() {
        assert_eq!(
            parse_duration("--x", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(
            parse_duration("--x", "5m").unwrap(),
            Duration::from_secs(300)
        );
        let err = parse_duration("--task-timeout", "soon")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("--task-timeout: invalid duration \"soon\""),
            "{err}"
        );
    }

    fn route(stage: &str, next: Option<&str>) -> StageRoute {
        StageRoute {
            stage: stage.parse().unwrap(),
            next: next.map(|n| n.parse().unwrap()),
        }
    }

    #[test]
    fn stages_parse_as_routes_in_order() {
        assert_eq!(
            parse_stages("build>report,report").unwrap(),
            [route("build", Some("report")), route("report", None)]
        );
        assert_eq!(
            parse_stages(" a > b , c>d,e ").unwrap(),
            [
                route("a", Some("b")),
                route("c", Some("d")),
                route("e", None)
            ],
            "spaces around names are ignored"
        );
        assert_eq!(parse_stages("solo").unwrap(), [route("solo", None)]);
        let routes = parse_stages("x>out,y").unwrap();
        let shown: Vec<String> = routes.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["x>out", "y"], "displayed as written");
        let many = (0..MAX_STAGES)
            .map(|i| format!("s{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(parse_stages(&many).unwrap().len(), MAX_STAGES);
    }

    #[test]
    fn bad_stage_lists_give_one_line_naming_the_flag() {
        let too_many = (0..=MAX_STAGES)
            .map(|i| format!("s{i}"))
            .collect::<Vec<_>>()
            .join(",");
        for (value, expected) in [
            (
                "",
                "--stages: the list is empty (write it like 'build>report,report'",
            ),
            ("  ", "--stages: the list is empty"),
            ("a,,b", "--stages: entry 2 is empty (write it like"),
            ("a,", "--stages: entry 2 is empty"),
            (
                "a>",
                "--stages: \"a>\" names no stage after '>' (write \"a\" alone to end the pipeline there)",
            ),
            ("a>b>c", "--stages: \"a>b>c\" has more than one '>'"),
            (">b", "--stages: invalid stage \"\""),
            ("a b>c", "--stages: invalid stage \"a b\""),
            ("a>c/d", "--stages: invalid stage \"c/d\""),
            ("a>b,a", "--stages: stage \"a\" is listed twice"),
            (&too_many, "--stages: at most 64 stages (got 65)"),
        ] {
            let err = parse_stages(value).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{value:?}: {err:?}");
            assert!(!err.contains('\n'), "{err:?}");
        }
    }

    #[test]
    fn stages_must_hold_the_stage_and_agree_with_next() {
        let ok = config().with_stages(parse_stages("x>out,build>report").unwrap());
        ok.validate().unwrap();
        assert_eq!(
            ok.next,
            Some("report".parse().unwrap()),
            "next from the entry"
        );
        assert_eq!(
            ok.routes(),
            [route("x", Some("out")), route("build", Some("report"))]
        );
        let plain = config().with_next(Some("n".parse().unwrap()));
        assert_eq!(
            plain.routes(),
            [route("build", Some("n"))],
            "without stages"
        );

        let cases: [(AgentConfig, &str); 4] = [
            (
                config().with_stages(parse_stages("x,y").unwrap()),
                "--stage: \"build\" is not one of --stages (x, y)",
            ),
            (
                config()
                    .with_stages(parse_stages("build>report").unwrap())
                    .with_next(Some("other".parse().unwrap())),
                "--next: \"other\" disagrees with --stages, which sends build's results to report",
            ),
            (
                config()
                    .with_stages(parse_stages("build").unwrap())
                    .with_next(Some("other".parse().unwrap())),
                "--next: \"other\" disagrees with --stages, which ends the pipeline at build",
            ),
            (
                config().with_stages(vec![route("build", None), route("build", None)]),
                "--stages: stage \"build\" is listed twice",
            ),
        ];
        for (c, expected) in cases {
            assert_eq!(c.validate().unwrap_err().to_string(), expected);
        }
    }
}

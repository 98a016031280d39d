//! The integration-test harness: real RabbitMQ, real `guildhall` and
//! `guildhall-agent` binaries, real worker processes.
//!
//! # Layout
//!
//! - [`TestNs`]: a random namespace per test, whose queues and exchanges are
//!   deleted when it is dropped, so tests run in parallel and leave nothing.
//! - `spawn_*`: one helper per real process ([`spawn_coordinator`],
//!   [`spawn_agent`], [`spawn_http_worker`]); each child is killed when its
//!   handle is dropped and its output goes to a log file named in failures.
//! - [`eventually`]: poll a condition until it holds, instead of sleeping.
//! - [`TestNs::exclusive`]: for the one test that restarts RabbitMQ; every
//!   other test holds the broker lock shared for its lifetime.
//! - [`WebhookSink`]: an HTTP endpoint that records the alerts it receives.
//! - [`Api`]: the coordinator's JSON API and metrics.
//! - [`Broker`] (`broker`): a test's own connection: declare stages,
//!   publish tasks, take and drain messages, probe queues, command agents,
//!   close an agent's connection as the coordinator does; [`raw_amqp`]:
//!   publish what proper clients refuse to (short strings that are not UTF-8).
//! - [`events`]: [`EventReader`] reads the events stream by sender, and the
//!   summaries tests compare ([`events::task_story`], ...).
//! - [`inproc`]: agents run in this process through the library API, for
//!   tests that read their exit counters: [`inproc::agent_config`] holds the
//!   arguments they share, [`inproc::start_agent`] starts one.
//! - [`node`]: a private RabbitMQ node with TLS listeners, stopped on drop
//!   ([`spawn_rabbitmq_node`]); [`certs`]: throw-away CAs for it.
//! - [`cluster`]: a private 3-node RabbitMQ cluster
//!   ([`spawn_rabbitmq_cluster`]): kill, start, stop and start all of it,
//!   where each queue's replicas are; torn down on drop.
//!
//! Binaries are found next to the test executable (`target/<profile>/`);
//! `cargo test --workspace` builds them.

mod broker;
pub mod events;
pub mod inproc;
pub mod proxy;
pub mod raw_amqp;
pub mod rig;

use anyhow::{Context, anyhow, bail};
use guildhall_broker::{AmqpUrl, Management};
use guildhall_proto::names::AGENT_CONNECTION_PREFIX;
use guildhall_proto::{Names, Namespace, Stage};
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

pub mod certs;
pub mod cluster;
pub mod node;
pub use broker::{Broker, ladder_ready};
pub use certs::{CertFiles, CertUse, TestCa};
pub use cluster::{RabbitCluster, spawn_rabbitmq_cluster};
pub use events::EventReader;
pub use node::{NodeTls, RabbitNode, spawn_rabbitmq_node};

/// The broker the tests use (`AMQP_URL` overrides).
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The management API the tests use (`GUILDHALL_MANAGEMENT_URL` overrides).
pub fn management_url() -> String {
    std::env::var("GUILDHALL_MANAGEMENT_URL")
        .unwrap_or_else(|_| "http://guest:guest@127.0.0.1:15672".into())
}

/// A management API client for the test broker's vhost.
pub fn management() -> Management {
    let vhost = AmqpUrl::parse(&amqp_url())
        .map(|u| u.vhost().to_owned())
        .unwrap_or_else(|_| "/".to_owned());
    Management::new(&management_url(), &vhost).expect("a management API client")
}

/// A workspace binary, next to the running test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace` (or `cargo test --workspace`)",
        path.display()
    );
    path
}

/// Runs the `guildhall` command line with `args` and captures its output.
/// The broker, namespace and API token come from the flags alone: the
/// environment variables that would stand in for them are removed.
pub async fn run_guildhall(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(bin("guildhall"))
        .args(args)
        .env_remove("AMQP_URL")
        .env_remove("GUILDHALL_NAMESPACE")
        .env_remove("GUILDHALL_API_TOKEN")
        .output()
        .await
        .expect("run guildhall")
}

/// Tests share the broker; the one that restarts it must run alone.
static BROKER_LOCK: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// A test's hold on the broker: shared by ordinary tests, exclusive for
/// tests that stop RabbitMQ or need the machine to themselves for timings.
enum BrokerHold {
    /// Held by ordinary tests for their lifetime.
    Shared(#[allow(dead_code)] std::sync::RwLockReadGuard<'static, ()>),
    /// Held by a test that must run alone.
    Exclusive(#[allow(dead_code)] std::sync::RwLockWriteGuard<'static, ()>),
}

/// A data directory of its own (for `--data-dir`), under the temporary
/// directory, named `guildhall-<label>-<random>`; removed on drop. Not
/// created: the coordinator creates it.
pub struct DataDir(pub PathBuf);

impl DataDir {
    /// A new name for `label`.
    pub fn new(label: &str) -> Self {
        Self(std::env::temp_dir().join(format!("guildhall-{label}-{:08x}", rand::random::<u32>())))
    }

    /// The path, as a command-line flag's value.
    pub fn flag(&self) -> String {
        self.0.display().to_string()
    }

    /// The snapshot file a coordinator of `ns` writes there.
    pub fn snapshot(&self, ns: &TestNs) -> PathBuf {
        self.0.join(format!("{}.snapshot", ns.name()))
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A namespace of its own for one test; everything in it is deleted on drop.
pub struct TestNs {
    /// The namespace.
    pub ns: Namespace,
    /// Its broker names.
    pub names: Names,
    /// Where process logs of this test go.
    pub log_dir: PathBuf,
    /// Keeps the broker from being restarted under this test (or, for an
    /// exclusive test, keeps every other test out).
    _hold: BrokerHold,
}

impl TestNs {
    /// A fresh random namespace, `t-<label>-<8 hex>`.
    pub fn new(label: &str) -> Self {
        let hold = BrokerHold::Shared(BROKER_LOCK.read().unwrap_or_else(|e| e.into_inner()));
        Self::with_hold(label, hold)
    }

    /// A namespace for a test that needs the broker to itself (it restarts
    /// RabbitMQ, or measures timings): waits until every other test is done.
    pub fn exclusive(label: &str) -> Self {
        let hold = BrokerHold::Exclusive(BROKER_LOCK.write().unwrap_or_else(|e| e.into_inner()));
        Self::with_hold(label, hold)
    }

    fn with_hold(label: &str, hold: BrokerHold) -> Self {
        let ns = Namespace::new(format!("t-{label}-{:08x}", rand::random::<u32>()))
            .expect("valid namespace");
        let log_dir = std::env::temp_dir()
            .join("guildhall-tests")
            .join(ns.as_str());
        std::fs::create_dir_all(&log_dir).expect("log dir");
        Self {
            names: Names::new(ns.clone()),
            ns,
            log_dir,
            _hold: hold,
        }
    }

    /// The namespace as a string.
    pub fn name(&self) -> &str {
        self.ns.as_str()
    }

    /// A stage name.
    pub fn stage(s: &str) -> Stage {
        Stage::new(s).expect("valid stage")
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let prefix = self.names.prefix();
        let agents = format!("{AGENT_CONNECTION_PREFIX}{}/", self.ns);
        // Drop is synchronous: run the clean-up on a runtime of its own.
        let result = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().ok()?;
            rt.block_on(async {
                let m = management();
                // Killed agents' exclusive queues linger until the broker
                // notices their connections are gone: retry a little. An
                // agent still running (in this process, after a failed test)
                // holds its command queue: close its connection. A new
                // connection is listed only after its next stats refresh
                // (~5 s): retry for up to 20 s.
                for _ in 0..80 {
                    if let Ok(n) = m.delete_all_with_prefix(&prefix).await {
                        return Some(n);
                    }
                    for c in m.connections().await.unwrap_or_default() {
                        if let Some(name) = c.user_provided_name.filter(|n| n.starts_with(&agents))
                        {
                            let _ = m.close_connections_named(&name, "test over").await;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                None
            })
        })
        .join();
        if !matches!(result, Ok(Some(_))) {
            eprintln!("warning: could not clean up namespace {}", self.ns);
        }
    }
}

/// Polls `check` every 100 ms until it returns `Ok`, or fails with its last
/// error after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    match try_eventually(timeout, what, check).await {
        Ok(v) => v,
        Err(e) => panic!("{e:#}"),
    }
}

/// [`eventually`] for harness code that returns its errors: the error names
/// `what`, `timeout` and `check`'s last error instead of panicking.
pub async fn try_eventually<T, F, Fut>(
    timeout: Duration,
    what: &str,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                bail!("timed out after {timeout:?} waiting for {what}: {e:#}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A child process killed on drop, with its output in a log file.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// Its log file.
    pub log: PathBuf,
}

impl Proc {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Sends a signal (`"KILL"`, `"STOP"`, `"CONT"`, `"TERM"`).
    pub fn signal(&self, sig: &str) {
        signal_pid(self.pid(), sig);
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub async fn terminate(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.pid();
        if pid != 0 {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .context("process did not exit after SIGTERM")?
            .context("wait")
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub async fn wait(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .context("process did not exit")?
            .context("wait")
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Sends a signal (`"KILL"`, `"STOP"`, `"CONT"`, `"TERM"`) to a process.
pub fn signal_pid(pid: u32, sig: &str) {
    if pid != 0 {
        let _ = std::process::Command::new("kill")
            .args([format!("-{sig}"), pid.to_string()])
            .status();
    }
}

/// A TCP port free right now on 127.0.0.1 (for a worker whose agent must
/// know its URL before it starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// An HTTP endpoint that records every JSON body POSTed to it (a stand-in
/// for Slack or any alert webhook).
pub struct WebhookSink {
    /// Where to POST.
    pub url: String,
    /// What was received, in order.
    pub received: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
}

impl WebhookSink {
    /// Starts one on a free port; it lives as long as the test's runtime.
    pub async fn start() -> Self {
        let received: std::sync::Arc<std::sync::Mutex<Vec<Value>>> = Default::default();
        let store = received.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
                let store = store.clone();
                async move {
                    store.lock().unwrap_or_else(|e| e.into_inner()).push(body);
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, received }
    }

    /// Every body received so far, in order.
    pub fn received(&self) -> Vec<Value> {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The bodies received so far whose `kind` is `kind`.
    pub fn of_kind(&self, kind: &str) -> Vec<Value> {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|b| b["kind"] == kind)
            .cloned()
            .collect()
    }
}

/// Starts `program` with `args`, sending stdout and stderr to `<log_dir>/<name>.log`.
/// If `ready` is given, waits until an output line contains it and returns that line.
pub async fn spawn_logged(
    ns: &TestNs,
    name: &str,
    program: &PathBuf,
    args: &[String],
    env: &[(&str, String)],
    ready: Option<&str>,
) -> anyhow::Result<(Proc, Option<String>)> {
    // A second process of the same name (another coordinator) gets a log
    // of its own: `<name>-2.log`, ...
    let log = (1..)
        .map(|n| match n {
            1 => ns.log_dir.join(format!("{name}.log")),
            n => ns.log_dir.join(format!("{name}-{n}.log")),
        })
        .find(|p| !p.exists())
        .expect("a free log name");
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .env(
            "RUST_LOG",
            std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info,lapin=off".into()),
        );
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawn {}", program.display()))?;
    let file = tokio::fs::File::create(&log).await?;
    let file = std::sync::Arc::new(tokio::sync::Mutex::new(file));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stdout = child.stdout.take().context("stdout")?;
    let stderr = child.stderr.take().context("stderr")?;
    for (tag, pipe) in [
        (
            "out",
            Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        ),
        ("err", Box::new(stderr)),
    ] {
        let file = file.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = file
                    .lock()
                    .await
                    .write_all(format!("[{tag}] {line}\n").as_bytes())
                    .await;
                let _ = tx.send(line);
            }
        });
    }
    drop(tx);
    let mut found = None;
    if let Some(needle) = ready {
        let wait = async {
            while let Some(line) = rx.recv().await {
                if line.contains(needle) {
                    return Some(line);
                }
            }
            None
        };
        found = tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .ok()
            .flatten();
        if found.is_none() {
            bail!(
                "{name} did not print {needle:?} (log: {})\n{}",
                log.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
    }
    Ok((Proc { child, log }, found))
}

fn url_in(line: &str) -> anyhow::Result<String> {
    let start = line
        .find("http://")
        .ok_or_else(|| anyhow!("no URL in {line:?}"))?;
    Ok(line[start..]
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// A running `guildhall serve`.
pub struct Coordinator {
    /// The process.
    pub proc: Proc,
    /// Its API.
    pub api: Api,
}

/// `first`, then each default flag that `extra` does not give itself, then
/// `extra`: a test may replace any default.
fn with_defaults(first: &[&str], defaults: Vec<(&str, String)>, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = first.iter().map(|s| s.to_string()).collect();
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag.to_owned(), value]);
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Starts `guildhall <command>` (serve or demo) for `ns` on a free port with
/// extra flags (which may replace the default `--namespace`, `--amqp-url`,
/// `--listen` and `--management-url`); returns it once it listens.
async fn spawn_listening(
    ns: &TestNs,
    command: &str,
    extra: &[&str],
) -> anyhow::Result<(Proc, Api)> {
    let defaults = vec![
        ("--namespace", ns.name().to_owned()),
        ("--amqp-url", amqp_url()),
        ("--listen", "127.0.0.1:0".to_owned()),
        ("--management-url", management_url()),
    ];
    let args = with_defaults(&[command], defaults, extra);
    let name = if command == "serve" {
        "coordinator"
    } else {
        command
    };
    let (proc, line) = spawn_logged(
        ns,
        name,
        &bin("guildhall"),
        &args,
        &[],
        Some("listening on http://"),
    )
    .await?;
    let url = url_in(&line.unwrap_or_default())?;
    Ok((proc, Api::new(&url)))
}

/// Starts `guildhall serve` for `ns` on a free port, with extra flags (which
/// may replace the default `--namespace`, `--amqp-url`, `--listen` and
/// `--management-url`).
pub async fn spawn_coordinator(ns: &TestNs, extra: &[&str]) -> anyhow::Result<Coordinator> {
    let (proc, api) = spawn_listening(ns, "serve", extra).await?;
    Ok(Coordinator { proc, api })
}

/// Starts `guildhall demo` for `ns` on a free port with extra flags; returns
/// the process and its API once it listens.
pub async fn spawn_demo(ns: &TestNs, extra: &[&str]) -> anyhow::Result<(Proc, Api)> {
    spawn_listening(ns, "demo", extra).await
}

/// A running `guildhall-agent`.
pub struct Agent {
    /// The process.
    pub proc: Proc,
    /// Its id.
    pub id: String,
}

/// Starts `guildhall-agent --id <id> --stage <stage>` with extra flags (which
/// may replace the default `--namespace` and `--amqp-url`).
pub async fn spawn_agent(
    ns: &TestNs,
    id: &str,
    stage: &str,
    extra: &[&str],
) -> anyhow::Result<Agent> {
    let defaults = vec![
        ("--namespace", ns.name().to_owned()),
        ("--amqp-url", amqp_url()),
    ];
    let args = with_defaults(&["--id", id, "--stage", stage], defaults, extra);
    let (proc, _) = spawn_logged(ns, id, &bin("guildhall-agent"), &args, &[], None).await?;
    Ok(Agent {
        proc,
        id: id.to_owned(),
    })
}

/// A running HTTP test worker.
pub struct HttpWorker {
    /// The process.
    pub proc: Proc,
    /// Where to POST tasks.
    pub url: String,
}

impl HttpWorker {
    /// How many times each `task/stage/attempt` reached this worker.
    pub async fn calls(&self) -> anyhow::Result<HashMap<String, u32>> {
        Ok(reqwest::get(format!("{}calls", self.url))
            .await?
            .json()
            .await?)
    }

    /// The last payload each `task/stage/attempt` was given.
    pub async fn inputs(&self) -> anyhow::Result<HashMap<String, String>> {
        Ok(reqwest::get(format!("{}inputs", self.url))
            .await?
            .json()
            .await?)
    }
}

/// Starts `guildhall-test-worker http` on a free port.
pub async fn spawn_http_worker(ns: &TestNs, name: &str) -> anyhow::Result<HttpWorker> {
    let args = vec!["http".to_owned()];
    let (proc, line) = spawn_logged(
        ns,
        name,
        &bin("guildhall-test-worker"),
        &args,
        &[],
        Some("listening on http://"),
    )
    .await?;
    let url = format!("{}/", url_in(&line.unwrap_or_default())?);
    Ok(HttpWorker { proc, url })
}

/// The exec command of the test worker, for `guildhall-agent --exec`.
pub fn exec_worker_command() -> String {
    format!("{} exec", bin("guildhall-test-worker").display())
}

/// A response body as JSON, `Null` if it is not (empty, plain text).
fn json_or_null(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

/// The coordinator's HTTP API.
#[derive(Clone)]
pub struct Api {
    /// Base URL, without a trailing slash.
    pub base: String,
    /// HTTP client.
    client: reqwest::Client,
    /// Sent as `Authorization: Bearer` when set.
    token: Option<String>,
}

impl Api {
    /// An API client for `base`.
    pub fn new(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("HTTP client"),
            token: None,
        }
    }

    /// The same client, sending `token` as a bearer token.
    pub fn with_token(&self, token: &str) -> Self {
        Self {
            token: Some(token.to_owned()),
            ..self.clone()
        }
    }

    fn auth(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// GET `path`: status and JSON body.
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let r = self
            .auth(self.client.get(format!("{}{path}", self.base)))
            .send()
            .await?;
        let status = r.status().as_u16();
        let body = r.json().await.context("JSON body")?;
        Ok((status, body))
    }

    /// GET `path`, which must answer 200.
    pub async fn get_ok(&self, path: &str) -> anyhow::Result<Value> {
        let (status, body) = self.get(path).await?;
        if status != 200 {
            bail!("GET {path}: {status} {body}");
        }
        Ok(body)
    }

    /// POST a raw body to `path`: status and JSON body.
    pub async fn post_raw(&self, path: &str, body: &str) -> anyhow::Result<(u16, Value)> {
        let r = self
            .auth(self.client.post(format!("{}{path}", self.base)))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await?;
        let status = r.status().as_u16();
        let body = r.json().await.context("JSON body")?;
        Ok((status, body))
    }

    /// DELETE `path`: status and JSON body (`Null` if the body is not JSON).
    pub async fn delete(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let r = self
            .auth(self.client.delete(format!("{}{path}", self.base)))
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, json_or_null(&r.bytes().await?)))
    }

    /// PUT `body` (JSON) to `path`: status and JSON body (`Null` if the
    /// body is not JSON).
    pub async fn put_raw(&self, path: &str, body: &str) -> anyhow::Result<(u16, Value)> {
        let r = self
            .auth(self.client.put(format!("{}{path}", self.base)))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, json_or_null(&r.bytes().await?)))
    }

    /// `/metrics`, parsed by an independent parser of the text format.
    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        let text = self
            .auth(self.client.get(format!("{}/metrics", self.base)))
            .send()
            .await?
            .text()
            .await?;
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).context("parse /metrics")?;
        Ok(Metrics { scrape, text })
    }
}

/// A parsed scrape.
pub struct Metrics {
    /// The parsed samples.
    pub scrape: prometheus_parse::Scrape,
    /// The raw text.
    pub text: String,
}

impl Metrics {
    /// The value of the sample `name` whose labels include all of `labels`
    /// (summed if several match); `None` if none matches.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for s in &self.scrape.samples {
            if s.metric != name || !labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)) {
                continue;
            }
            let v = match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                prometheus_parse::Value::Histogram(h) => h.last().map(|b| b.count).unwrap_or(0.0),
                prometheus_parse::Value::Summary(_) => continue,
            };
            *found.get_or_insert(0.0) += v;
        }
        found
    }
}

/// A running `chromedriver` and a headless Chromium session on it.
pub struct Browser {
    /// The WebDriver session.
    pub client: fantoccini::Client,
    /// The driver process (Chromium is its child).
    pub driver: Proc,
    /// Chromium's profile, deleted on drop.
    profile: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Starts `chromedriver` on a free port and a headless Chromium session
/// with a fresh profile (Debian packages `chromium` and `chromium-driver`).
pub async fn spawn_browser(ns: &TestNs) -> anyhow::Result<Browser> {
    let port = free_port();
    let driver_bin = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| {
            anyhow!(
                "chromedriver not found: install the Debian packages chromium and chromium-driver"
            )
        })?;
    let (driver, _) = spawn_logged(
        ns,
        "chromedriver",
        &driver_bin,
        &[format!("--port={port}")],
        &[],
        Some("started successfully"),
    )
    .await?;
    let profile = ns.log_dir.join("chromium-profile");
    std::fs::create_dir_all(&profile)?;
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--window-size=1400,1000",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let client = fantoccini::ClientBuilder::rustls()?
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .context("start a Chromium session")?;
    Ok(Browser {
        client,
        driver,
        profile,
    })
}

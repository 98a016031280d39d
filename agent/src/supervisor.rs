//! The supervised worker process (`guildhall-agent ... -- COMMAND ARGS`).
//!
//! A background task starts the process in its own process group, captures
//! its stdout and stderr lines into a ring buffer (for the `Logs` command),
//! and restarts it whenever it exits, with a backoff of 500 ms doubling up to
//! `--restart-backoff-max`, back to 500 ms once a run lasted 60 s. Each exit
//! is reported as a `WorkerExited` event.
//!
//! A process can also hang without exiting. The supervisor then kills it
//! (SIGTERM to its group, SIGKILL 5 s later) and restarts it with the same
//! backoff, when:
//!
//! - its health URL (`--health-url`, polled with GET every
//!   `--health-interval`, each check allowed that long) failed
//!   `--health-failures` times in a row: non-2xx, no connection, or no answer
//!   in time. Checks start once the worker is ready.
//! - a task handed to it hit the task timeout ([`WorkerControl::hung`]).
//!
//! The runner follows [`WorkerStatus`] through a watch channel: it consumes
//! only while the worker is ready (in HTTP mode: once the worker URL's
//! host:port accepts TCP connections), and a task handler gives its task back
//! to the queue when the run of the worker it was handed to ends, reporting
//! [`Ended::reason`]. The end is published before the process is signalled,
//! so a task whose worker call fails because of the kill is given back, not
//! counted as failed.

use crate::config::{ConfigError, check_http_url};
use crate::handoff::http::error_chain;
use crate::pgroup::signal_group;
use crate::state::Shared;
use guildhall_broker::{EventPublisher, now_ms};
use guildhall_proto::{Event, WorkerExited};
use rustix::process::Signal;
use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// Time between SIGTERM and SIGKILL when stopping the worker.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// Interval between readiness probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// Longest kept output line; the rest of a longer line is dropped.
const MAX_LINE_BYTES: usize = 4096;

// The supervised run as the agent's core sees it: plain data, defined in
// the core (which does no IO) and re-exported here for the supervisor.
pub use crate::core::worker::{
    AGENT_STOPPING, Ended, RestartBackoff, WORKER_EXITED, WORKER_HUNG, WORKER_RESTARTED,
    WORKER_UNHEALTHY, WorkerStatus,
};

/// Health checks of the worker: GET a URL, a 2xx answer in time is healthy.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    /// Client without proxy, each request bounded by the interval.
    client: reqwest::Client,
    /// What is polled.
    url: reqwest::Url,
    /// Time between checks, and the most one may take.
    interval: Duration,
    /// Failed checks in a row that mean the worker is hung.
    failures: u32,
}

impl HealthCheck {
    /// Checks of `url` every `interval`; `failures` in a row mean hung.
    pub fn new(url: &str, interval: Duration, failures: u32) -> Result<Self, ConfigError> {
        let url = check_http_url("--health-url", url)?;
        let client = reqwest::Client::builder()
            .timeout(interval)
            .no_proxy()
            .build()
            .map_err(|e| ConfigError::invalid("--health-url", e.to_string()))?;
        Ok(Self {
            client,
            url,
            interval,
            failures: failures.max(1),
        })
    }

    /// One check: `Err` says what went wrong.
    async fn check(&self) -> Result<(), String> {
        match self.client.get(self.url.clone()).send().await {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(format!("HTTP {}", response.status().as_u16())),
            Err(err) if err.is_timeout() => Err(format!(
                "no answer within {}",
                humantime::format_duration(self.interval)
            )),
            Err(err) => Err(crate::config::one_line(&error_chain(&err))),
        }
    }

    /// Checks every interval; returns once `failures` checks in a row failed.
    /// `failed` carries the count across cancellations.
    async fn until_unhealthy(&self, failed: &mut u32) {
        loop {
            tokio::time::sleep(self.interval).await;
            match self.check().await {
                Ok(()) => {
                    if *failed > 0 {
                        tracing::info!("worker health check passed again");
                    }
                    *failed = 0;
                }
                Err(why) => {
                    *failed += 1;
                    tracing::warn!(
                        failed = *failed,
                        of = self.failures,
                        url = %self.url,
                        "worker health check failed: {why}"
                    );
                    if *failed >= self.failures {
                        return;
                    }
                }
            }
        }
    }
}

/// What the supervisor needs to know.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// `(host, port)` that must accept TCP connections before the worker
    /// counts as ready (HTTP mode); `None` = ready once started.
    pub ready_addr: Option<(String, u16)>,
    /// Cap on the restart delay.
    pub backoff_max: Duration,
    /// Output lines kept.
    pub log_lines: usize,
    /// Health checks, if configured.
    pub health: Option<HealthCheck>,
}

/// The last lines a worker wrote, shared with the `Logs` command.
#[derive(Debug, Clone)]
pub struct LogBuffer {
    /// The lines, oldest first.
    lines: Arc<Mutex<VecDeque<String>>>,
    /// Most lines kept.
    capacity: usize,
}

impl LogBuffer {
    /// An empty buffer of `capacity` lines.
    pub fn new(capacity: usize) -> Self {
        Self {
            lines: Arc::new(Mutex::new(VecDeque::with_capacity(capacity.min(1024)))),
            capacity,
        }
    }

    /// Appends a line, dropping the oldest when full.
    pub fn push(&self, line: String) {
        if self.capacity == 0 {
            return;
        }
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == self.capacity {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// The last `n` lines, oldest first.
    pub fn last(&self, n: usize) -> Vec<String> {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines
            .iter()
            .skip(lines.len().saturating_sub(n))
            .cloned()
            .collect()
    }
}

/// Requests to the supervising task.
enum Request {
    /// Stop the worker and start it again at once.
    Restart,
    /// A task handed to this run hit the task timeout: kill the run (if it
    /// is still the current one) and restart it with the backoff.
    Hung(u64),
    /// Stop the worker for good; answered once it is gone.
    Stop(oneshot::Sender<()>),
}

/// Lets task handlers report a hung worker. Cheap to clone.
#[derive(Debug, Clone)]
pub struct WorkerControl {
    /// Requests to the supervising task.
    requests: mpsc::UnboundedSender<Request>,
}

impl WorkerControl {
    /// Reports that run `generation` is hung (a task timed out on it); only
    /// the first report of a run counts.
    pub fn hung(&self, generation: u64) {
        let _ = self.requests.send(Request::Hung(generation));
    }
}

/// Handle to the supervising task.
#[derive(Debug)]
pub struct Supervisor {
    /// Requests to the task.
    requests: mpsc::UnboundedSender<Request>,
    /// The worker's status, as the task publishes it.
    status: watch::Receiver<WorkerStatus>,
    /// Its recent output.
    logs: LogBuffer,
    /// The task itself.
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Request::Restart => "Restart",
            Request::Hung(_) => "Hung",
            Request::Stop(_) => "Stop",
        })
    }
}

impl Supervisor {
    /// Starts supervising `config.argv`.
    pub fn spawn(config: SupervisorConfig, events: EventPublisher, shared: Arc<Shared>) -> Self {
        let (requests, rx) = mpsc::unbounded_channel();
        let (status_tx, status) = watch::channel(WorkerStatus::default());
        let logs = LogBuffer::new(config.log_lines);
        let task = tokio::spawn(
            Supervising {
                config,
                events,
                shared,
                logs: logs.clone(),
                status: status_tx,
                requests: rx,
                generation: 0,
            }
            .run(),
        );
        Self {
            requests,
            status,
            logs,
            task,
        }
    }

    /// Follows the worker's status.
    pub fn status(&self) -> watch::Receiver<WorkerStatus> {
        self.status.clone()
    }

    /// A handle for task handlers to report a hung worker.
    pub fn control(&self) -> WorkerControl {
        WorkerControl {
            requests: self.requests.clone(),
        }
    }

    /// The last `n` output lines.
    pub fn logs(&self, n: usize) -> Vec<String> {
        self.logs.last(n)
    }

    /// Asks for a restart; returns at once. `false` if the supervisor is gone.
    pub fn restart(&self) -> bool {
        self.requests.send(Request::Restart).is_ok()
    }

    /// Stops the worker (SIGTERM, then SIGKILL after 5 s) and the supervisor.
    pub async fn stop(self) {
        let (done, wait) = oneshot::channel();
        if self.requests.send(Request::Stop(done)).is_ok() {
            let _ = wait.await;
        }
        let _ = self.task.await;
    }
}

/// How one run of the worker ended.
enum RunEnd {
    /// It exited by itself.
    Exited(Option<ExitStatus>),
    /// It was killed as hung ([`WORKER_UNHEALTHY`] or [`WORKER_HUNG`]); it is
    /// restarted with the backoff, as after an exit.
    Killed(&'static str, Option<ExitStatus>),
    /// A restart was asked for; it was stopped.
    Restarted(Option<ExitStatus>),
    /// A stop was asked for (or the handle dropped); it was stopped.
    Stopped(Option<ExitStatus>, Option<oneshot::Sender<()>>),
}

/// The supervising task's state.
struct Supervising {
    /// What to run and how.
    config: SupervisorConfig,
    /// Where `WorkerExited` goes.
    events: EventPublisher,
    /// Where restarts are counted.
    shared: Arc<Shared>,
    /// Where output lines go.
    logs: LogBuffer,
    /// Published status.
    status: watch::Sender<WorkerStatus>,
    /// Requests from the handle.
    requests: mpsc::UnboundedReceiver<Request>,
    /// Starts so far.
    generation: u64,
}

impl Supervising {
    async fn run(mut self) {
        let mut backoff = RestartBackoff::new(self.config.backoff_max);
        loop {
            let started = Instant::now();
            let end = match self.start() {
                Ok(child) => self.watch(child).await,
                Err(err) => {
                    let program = self.config.argv.first().map_or("", String::as_str);
                    tracing::error!(%program, "cannot start the worker: {err}");
                    RunEnd::Exited(None)
                }
            };
            let reason = match &end {
                RunEnd::Exited(_) => WORKER_EXITED,
                RunEnd::Killed(reason, _) => reason,
                RunEnd::Restarted(_) => WORKER_RESTARTED,
                RunEnd::Stopped(..) => AGENT_STOPPING,
            };
            let pid = self.status.borrow().pid;
            self.status.send_replace(WorkerStatus {
                generation: self.generation,
                pid: None,
                ready: false,
                ended: Some(Ended {
                    generation: self.generation,
                    reason,
                }),
            });
            let uptime = started.elapsed();
            match end {
                RunEnd::Stopped(status, done) => {
                    self.report_exit(pid, status, reason, None);
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
                RunEnd::Restarted(status) => {
                    backoff.after_restart(uptime);
                    self.report_exit(pid, status, reason, Some(Duration::ZERO))
                }
                RunEnd::Exited(status) | RunEnd::Killed(_, status) => {
                    let delay = backoff.after_failed_run(uptime);
                    self.report_exit(pid, status, reason, Some(delay));
                    let wait = tokio::time::sleep(delay);
                    tokio::pin!(wait);
                    loop {
                        tokio::select! {
                            () = &mut wait => break,
                            request = self.requests.recv() => match request {
                                Some(Request::Restart) => break,
                                // About a run that is already over.
                                Some(Request::Hung(_)) => {}
                                Some(Request::Stop(done)) => {
                                    let _ = done.send(());
                                    return;
                                }
                                None => return,
                            },
                        }
                    }
                }
            }
            self.shared.count_worker_restart();
        }
    }

    fn start(&mut self) -> std::io::Result<Child> {
        let Some((program, args)) = self.config.argv.split_first() else {
            return Err(std::io::Error::other("no worker command"));
        };
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        self.generation += 1;
        let pid = child.id();
        tracing::info!(pid, %program, "worker started");
        if let Some(out) = child.stdout.take() {
            tokio::spawn(capture(out, "stdout", self.logs.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(capture(err, "stderr", self.logs.clone()));
        }
        let ended = self.status.borrow().ended;
        self.status.send_replace(WorkerStatus {
            generation: self.generation,
            pid,
            ready: self.config.ready_addr.is_none(),
            ended,
        });
        Ok(child)
    }

    /// Waits for the run to end, probing readiness and then health meanwhile.
    async fn watch(&mut self, mut child: Child) -> RunEnd {
        let pid = child.id();
        let generation = self.generation;
        let ready_addr = self.config.ready_addr.clone();
        let health = self.config.health.clone();
        // Failed health checks in a row, kept across loop turns.
        let mut failed = 0;
        loop {
            let ready = self.status.borrow().ready;
            tokio::select! {
                status = child.wait() => return RunEnd::Exited(status.ok()),
                request = self.requests.recv() => match request {
                    Some(Request::Hung(g)) if g != generation => {}
                    Some(Request::Hung(_)) => {
                        tracing::warn!(pid, "a task timed out: the worker is hung, killing it");
                        return self.kill(&mut child, pid, WORKER_HUNG).await;
                    }
                    Some(Request::Restart) => {
                        self.mark_ending(WORKER_RESTARTED);
                        return RunEnd::Restarted(terminate(&mut child, pid).await);
                    }
                    Some(Request::Stop(done)) => {
                        self.mark_ending(AGENT_STOPPING);
                        return RunEnd::Stopped(terminate(&mut child, pid).await, Some(done));
                    }
                    None => {
                        self.mark_ending(AGENT_STOPPING);
                        return RunEnd::Stopped(terminate(&mut child, pid).await, None);
                    }
                },
                () = probe(ready_addr.as_ref()), if !ready => {
                    tracing::info!(pid, "worker is accepting connections");
                    self.status.send_modify(|s| s.ready = true);
                }
                () = until_unhealthy(health.as_ref(), &mut failed), if ready => {
                    tracing::warn!(pid, "the worker failed {failed} health checks in a row: it is hung, killing it");
                    return self.kill(&mut child, pid, WORKER_UNHEALTHY).await;
                }
            }
        }
    }

    /// Publishes that the current run is ending and why, before it is
    /// signalled: no new tasks for it, and tasks in hand are given back.
    fn mark_ending(&self, reason: &'static str) {
        let generation = self.generation;
        self.status.send_modify(|s| {
            s.ready = false;
            s.ended = Some(Ended { generation, reason });
        });
    }

    /// Kills a hung run.
    async fn kill(&self, child: &mut Child, pid: Option<u32>, reason: &'static str) -> RunEnd {
        self.mark_ending(reason);
        RunEnd::Killed(reason, terminate(child, pid).await)
    }

    fn report_exit(
        &self,
        pid: Option<u32>,
        status: Option<ExitStatus>,
        reason: &'static str,
        restart_in: Option<Duration>,
    ) {
        let code = status.and_then(|s| s.code());
        let signal = status.and_then(|s| s.signal());
        let restart_in_ms = restart_in.map(|d| d.as_millis() as u64);
        if reason == AGENT_STOPPING {
            tracing::info!(code, signal, "worker stopped");
        } else {
            tracing::warn!(code, signal, reason, restart_in_ms, "worker exited");
        }
        self.events.emit(Event::WorkerExited(WorkerExited {
            at_ms: now_ms(),
            pid: pid.unwrap_or(0),
            code,
            signal,
            restarts: self.shared.worker_restarts(),
            restart_in_ms,
        }));
    }
}

/// SIGTERM to the group, SIGKILL after [`TERM_GRACE`]; reaps the leader.
async fn terminate(child: &mut Child, pid: Option<u32>) -> Option<ExitStatus> {
    let Some(pid) = pid else {
        return child.wait().await.ok();
    };
    signal_group(pid, Signal::TERM);
    match tokio::time::timeout(TERM_GRACE, child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => {
            tracing::warn!(pid, "worker ignored SIGTERM for 5s: killing it");
            signal_group(pid, Signal::KILL);
            child.wait().await.ok()
        }
    }
}

/// Returns once the health checks say the worker is hung (never without
/// health checks).
async fn until_unhealthy(health: Option<&HealthCheck>, failed: &mut u32) {
    match health {
        Some(health) => health.until_unhealthy(failed).await,
        None => std::future::pending().await,
    }
}

/// Returns once `addr` accepts a TCP connection (never if `addr` is `None`:
/// such a worker is ready from the start).
async fn probe(addr: Option<&(String, u16)>) {
    let Some((host, port)) = addr else {
        return std::future::pending().await;
    };
    loop {
        let connect = tokio::net::TcpStream::connect((host.as_str(), *port));
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), connect).await {
            return;
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// Copies a worker's output lines into the log buffer (and the debug log).
async fn capture(mut stream: impl AsyncRead + Unpin, name: &'static str, logs: LogBuffer) {
    let mut buf = vec![0u8; 8 * 1024];
    let mut line = Vec::new();
    let emit = |line: &mut Vec<u8>| {
        let text = String::from_utf8_lossy(line).trim_end().to_owned();
        tracing::debug!(target: "guildhall_agent::worker", stream = name, "{text}");
        logs.push(text);
        line.clear();
    };
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                for &b in &buf[..n] {
                    if b == b'\n' {
                        emit(&mut line);
                    } else if line.len() < MAX_LINE_BYTES {
                        line.push(b);
                    }
                }
            }
        }
    }
    if !line.is_empty() {
        emit(&mut line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_buffer_keeps_the_last_lines() {
        let logs = LogBuffer::new(3);
        for i in 0..5 {
            logs.push(format!("line {i}"));
        }
        assert_eq!(logs.last(2), ["line 3", "line 4"]);
        assert_eq!(logs.last(10), ["line 2", "line 3", "line 4"]);
        let none = LogBuffer::new(0);
        none.push("x".into());
        assert!(none.last(5).is_empty());
    }

    #[tokio::test]
    async fn the_readiness_probe_waits_for_the_port_to_accept() {
        // Find a free port, then open it only after a while.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = ("127.0.0.1".to_owned(), port);
        let started = Instant::now();
        let opener = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .unwrap()
        });
        tokio::time::timeout(Duration::from_secs(5), probe(Some(&addr)))
            .await
            .expect("the probe sees the port open");
        assert!(started.elapsed() >= Duration::from_millis(250));
        drop(opener.await);
    }

    /// A server answering GET with the status `statuses` gives, in turn
    /// (the last one forever); `None` never answers.
    async fn health_server(statuses: Vec<Option<u16>>) -> (String, tokio::task::JoinHandle<()>) {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/health", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            for i in 0.. {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = socket.read(&mut buf).await;
                match statuses[i.min(statuses.len() - 1)] {
                    Some(status) => {
                        let reply = format!(
                            "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        );
                        let _ = socket.write_all(reply.as_bytes()).await;
                    }
                    None => held.push(socket),
                }
            }
        });
        (url, server)
    }

    #[tokio::test]
    async fn health_checks_report_a_hang_after_failures_in_a_row() {
        // Healthy, then a 500, healthy again (the count restarts), then a
        // 503 and no answer at all: the third failure in a row is the hang.
        let (url, server) =
            health_server(vec![Some(200), Some(500), Some(204), Some(503), None]).await;
        let check = HealthCheck::new(&url, Duration::from_millis(100), 2).unwrap();
        let mut failed = 0;
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), check.until_unhealthy(&mut failed))
            .await
            .expect("judged hung");
        assert_eq!(failed, 2);
        // 5 checks at 100 ms intervals, the last one timing out.
        assert!(
            started.elapsed() >= Duration::from_millis(550),
            "{:?}",
            started.elapsed()
        );
        server.abort();
    }

    #[tokio::test]
    async fn a_healthy_worker_is_never_judged_hung() {
        let (url, server) = health_server(vec![Some(200)]).await;
        let check = HealthCheck::new(&url, Duration::from_millis(100), 1).unwrap();
        let mut failed = 0;
        let judged = tokio::time::timeout(
            Duration::from_millis(700),
            check.until_unhealthy(&mut failed),
        )
        .await;
        assert!(judged.is_err(), "a healthy worker was judged hung");
        assert_eq!(failed, 0);
        server.abort();
    }

    #[test]
    fn a_run_knows_why_it_ended() {
        let status = WorkerStatus {
            generation: 3,
            pid: Some(10),
            ready: false,
            ended: Some(Ended {
                generation: 3,
                reason: WORKER_UNHEALTHY,
            }),
        };
        assert_eq!(status.end_of(3), Some(WORKER_UNHEALTHY));
        assert_eq!(status.end_of(2), Some(WORKER_EXITED), "an earlier run");
        assert_eq!(status.end_of(4), None, "not started yet");
        assert_eq!(WorkerStatus::default().end_of(1), None);
    }
}

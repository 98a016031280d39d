//! The supervised worker process (`guildhall-agent ... -- COMMAND ARGS`).
//!
//! A background task starts the process in its own process group, captures
//! its stdout and stderr lines into a ring buffer (for the `Logs` command),
//! and restarts it whenever it exits, with a backoff of 500 ms doubling up to
//! `--restart-backoff-max`, back to 500 ms once a run lasted 60 s. Each exit
//! is reported as a `WorkerExited` event.
//!
//! The runner follows [`WorkerStatus`] through a watch channel: it consumes
//! only while the worker is ready (in HTTP mode: once the worker URL's
//! host:port accepts TCP connections), and a task handler gives its task back
//! to the queue when the process it was handed to exits.

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

/// First delay before restarting a worker that exited.
const INITIAL_BACKOFF: Duration = Duration::from_millis(500);

/// A run this long resets the backoff.
const HEALTHY_UPTIME: Duration = Duration::from_secs(60);

/// Time between SIGTERM and SIGKILL when stopping the worker.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// Interval between readiness probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// Longest kept output line; the rest of a longer line is dropped.
const MAX_LINE_BYTES: usize = 4096;

/// The supervised process as the rest of the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkerStatus {
    /// +1 at each start: a task knows which run of the worker it was handed to.
    pub generation: u64,
    /// The running process, `None` between runs.
    pub pid: Option<u32>,
    /// Whether tasks may be handed to it.
    pub ready: bool,
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
    /// Stop the worker for good; answered once it is gone.
    Stop(oneshot::Sender<()>),
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
        let mut backoff = INITIAL_BACKOFF;
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
            let pid = self.status.borrow().pid;
            self.status.send_replace(WorkerStatus {
                generation: self.generation,
                pid: None,
                ready: false,
            });
            if started.elapsed() >= HEALTHY_UPTIME {
                backoff = INITIAL_BACKOFF;
            }
            match end {
                RunEnd::Stopped(status, done) => {
                    self.report_exit(pid, status, None);
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
                RunEnd::Restarted(status) => self.report_exit(pid, status, Some(Duration::ZERO)),
                RunEnd::Exited(status) => {
                    self.report_exit(pid, status, Some(backoff));
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        request = self.requests.recv() => match request {
                            Some(Request::Restart) => {}
                            Some(Request::Stop(done)) => {
                                let _ = done.send(());
                                return;
                            }
                            None => return,
                        },
                    }
                    backoff = (backoff * 2).min(self.config.backoff_max);
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
        self.status.send_replace(WorkerStatus {
            generation: self.generation,
            pid,
            ready: self.config.ready_addr.is_none(),
        });
        Ok(child)
    }

    /// Waits for the run to end, probing readiness meanwhile.
    async fn watch(&mut self, mut child: Child) -> RunEnd {
        let pid = child.id();
        let ready_addr = self.config.ready_addr.clone();
        loop {
            let ready = self.status.borrow().ready;
            tokio::select! {
                status = child.wait() => return RunEnd::Exited(status.ok()),
                request = self.requests.recv() => {
                    let status = terminate(&mut child, pid).await;
                    return match request {
                        Some(Request::Restart) => RunEnd::Restarted(status),
                        Some(Request::Stop(done)) => RunEnd::Stopped(status, Some(done)),
                        None => RunEnd::Stopped(status, None),
                    };
                }
                () = probe(ready_addr.as_ref()), if !ready => {
                    tracing::info!(pid, "worker is accepting connections");
                    self.status.send_modify(|s| s.ready = true);
                }
            }
        }
    }

    fn report_exit(
        &self,
        pid: Option<u32>,
        status: Option<ExitStatus>,
        restart_in: Option<Duration>,
    ) {
        let code = status.and_then(|s| s.code());
        let signal = status.and_then(|s| s.signal());
        tracing::warn!(
            code,
            signal,
            restart_in_ms = restart_in.map(|d| d.as_millis() as u64),
            "worker exited"
        );
        self.events.emit(Event::WorkerExited(WorkerExited {
            at_ms: now_ms(),
            pid: pid.unwrap_or(0),
            code,
            signal,
            restarts: self.shared.worker_restarts(),
            restart_in_ms: restart_in.map(|d| d.as_millis() as u64),
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
}

//! The no-op HTTP workers `bench pipeline` runs its stages against, all on
//! 127.0.0.1: each answers 200 with the body it was sent.
//!
//! - `rust`: an axum (hyper) server in this process, one for every stage;
//!   hyper writes a small response's head and body in one write.
//! - `python`: the demo worker (`deploy/demo-worker/worker.py`, embedded at
//!   build time) with no service time, one process per stage; HTTP/1.0, a
//!   connection per task.
//! - `python-two-writes`: a Python `http.server` worker that keeps the
//!   connection alive and writes the head and the body in two writes with
//!   Nagle's algorithm on: the second write waits for the client's ACK of
//!   the first, which a client that delays its ACKs holds for up to ~40 ms.
//! - `python-nodelay`: the same with `disable_nagle_algorithm = True`.

use anyhow::{Context, anyhow};
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// The demo worker, as shipped.
const DEMO_WORKER: &str = include_str!("../../../deploy/demo-worker/worker.py");

/// A keep-alive `http.server` echo worker; `nodelay` as its first argument
/// sets TCP_NODELAY on its connections, anything else leaves Nagle on.
const TWO_WRITES_WORKER: &str = r#"
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = sys.argv[1:] == ["nodelay"]

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()      # first write: the head
        self.wfile.write(body)  # second write: the body

class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

server = Server(("127.0.0.1", 0), Handler)
print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
server.serve_forever()
"#;

/// Which worker serves the stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkerKind {
    /// An in-process hyper (axum) echo server.
    Rust,
    /// `deploy/demo-worker/worker.py` with no service time.
    Python,
    /// A keep-alive Python `http.server` writing head and body apart, Nagle on.
    PythonTwoWrites,
    /// The same with TCP_NODELAY.
    PythonNodelay,
}

/// The workers, running; stopped on drop.
pub struct Workers {
    /// One URL per stage.
    pub urls: Vec<String>,
    /// The in-process server's stop switch.
    stop: Option<CancellationToken>,
    /// Worker processes (killed on drop).
    children: Vec<Child>,
    /// The Python scripts written for this run.
    scripts: Vec<PathBuf>,
}

impl Workers {
    /// Starts `kind` for `stages` stages with `python` as the interpreter.
    pub async fn start(kind: WorkerKind, stages: usize, python: &str) -> anyhow::Result<Self> {
        let mut w = Workers {
            urls: Vec::new(),
            stop: None,
            children: Vec::new(),
            scripts: Vec::new(),
        };
        match kind {
            WorkerKind::Rust => {
                let (url, stop) = crate::overhead::spawn_echo_worker().await?;
                w.urls = vec![url; stages];
                w.stop = Some(stop);
            }
            WorkerKind::Python | WorkerKind::PythonTwoWrites | WorkerKind::PythonNodelay => {
                let (source, arg) = match kind {
                    WorkerKind::Python => (DEMO_WORKER, None),
                    WorkerKind::PythonNodelay => (TWO_WRITES_WORKER, Some("nodelay")),
                    _ => (TWO_WRITES_WORKER, Some("nagle")),
                };
                let script = std::env::temp_dir().join(format!(
                    "guildhall-bench-worker-{:08x}.py",
                    rand::random::<u32>()
                ));
                std::fs::write(&script, source)
                    .with_context(|| format!("cannot write {}", script.display()))?;
                w.scripts.push(script.clone());
                for _ in 0..stages {
                    let (child, url) = python_worker(python, &script, arg).await?;
                    w.children.push(child);
                    w.urls.push(url);
                }
            }
        }
        Ok(w)
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        if let Some(stop) = &self.stop {
            stop.cancel();
        }
        for c in &mut self.children {
            let _ = c.start_kill();
        }
        for s in &self.scripts {
            let _ = std::fs::remove_file(s);
        }
    }
}

/// Starts one Python worker on a free port of 127.0.0.1 and reads its URL
/// off its `listening on` line.
async fn python_worker(
    python: &str,
    script: &std::path::Path,
    arg: Option<&str>,
) -> anyhow::Result<(Child, String)> {
    let mut cmd = Command::new(python);
    cmd.arg(script)
        .args(arg)
        .env("PORT", "0")
        .env("HOST", "127.0.0.1")
        .env("MEDIAN_MS", "0")
        .env("SPREAD", "0")
        .env("QUIET", "1")
        .env("WORKER_NAME", "bench")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start the Python worker ({python})"))?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout from the Python worker"))?;
    let mut lines = BufReader::new(out).lines();
    let url = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.split("listening on ").nth(1) {
                return Some(format!("{}/task", rest.trim()));
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .ok_or_else(|| anyhow!("the Python worker did not say where it listens"))?;
    // Keep reading its output so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, url))
}

//! A coordinator under test, as a child process, and what the benchmarks
//! read off it: CPU time and peak memory from `/proc`, its state from
//! `/healthz`, histograms from `/metrics`.
//!
//! The coordinator runs as its own process (`guildhall serve`, this very
//! binary) so its CPU and memory are its own, not the simulated agents'.

use anyhow::{Context, anyhow, bail};
use guildhall_proto::Names;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Lines of the child's stderr kept to explain a failure.
const KEPT_LINES: usize = 20;

/// A `guildhall serve` child process.
pub struct ChildCoordinator {
    /// The process; killed if this is dropped.
    child: Child,
    /// Its pid, for `/proc`.
    pid: u32,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// HTTP client for its API.
    http: reqwest::Client,
    /// Its last stderr lines, for error messages.
    stderr: Arc<Mutex<VecDeque<String>>>,
}

/// What `/healthz` says of the core.
#[derive(Debug, Clone, Copy, Default)]
pub struct CoreState {
    /// Events applied.
    pub events: u64,
    /// Envelopes applied.
    pub batches: u64,
    /// Whether it has read its own start marker (the replay is over).
    pub caught_up: bool,
    /// Workers tracked.
    pub workers: u64,
    /// Of them, alive.
    pub workers_alive: u64,
}

/// A Guildhall binary installed next to this one (`guildhall`,
/// `guildhall-agent`: `cargo build --workspace` puts them side by side),
/// else found on `PATH`.
pub fn sibling_bin(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    if let Some(dir) = exe.parent() {
        let path = dir.join(name);
        if path.is_file() {
            return Ok(path);
        }
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| {
            anyhow!(
                "cannot find `{name}` next to this program or on PATH (run `cargo build --workspace`)"
            )
        })
}

impl ChildCoordinator {
    /// Starts `guildhall serve` for `names` on the broker at `amqp_url`,
    /// with `extra` flags, on a free local port, without the management API.
    pub async fn spawn(amqp_url: &str, names: &Names, extra: &[String]) -> anyhow::Result<Self> {
        let exe = sibling_bin("guildhall")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("cannot find a free local port")?
            .port();
        let mut child = Command::new(exe)
            .arg("serve")
            .args(["--amqp-url", amqp_url])
            .args(["--namespace", names.namespace().as_str()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--management-url", ""])
            .args(extra)
            .env("RUST_LOG", "warn,lapin=off")
            .env_remove("GUILDHALL_DATA_DIR")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the coordinator (guildhall serve)")?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("the coordinator exited at once"))?;
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(pipe) = child.stderr.take() {
            let kept = stderr.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
                    if kept.len() == KEPT_LINES {
                        kept.pop_front();
                    }
                    kept.push_back(line);
                }
            });
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .context("cannot build an HTTP client")?;
        Ok(Self {
            child,
            pid,
            base: format!("http://127.0.0.1:{port}"),
            http,
            stderr,
        })
    }

    /// Its last stderr lines, joined.
    pub fn last_words(&self) -> String {
        let kept = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        kept.iter().cloned().collect::<Vec<_>>().join(" | ")
    }

    /// How it exited, if it has.
    pub fn try_exit_status(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            _ => None,
        }
    }

    fn exited(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.try_exit_status() {
            bail!("the coordinator exited ({status}): {}", self.last_words());
        }
        Ok(())
    }

    /// Waits until it has replayed the stream up to its start marker.
    pub async fn wait_caught_up(&mut self, timeout: Duration) -> anyhow::Result<CoreState> {
        let deadline = Instant::now() + timeout;
        loop {
            self.exited()?;
            if let Ok(state) = self.state().await
                && state.caught_up
            {
                return Ok(state);
            }
            if Instant::now() > deadline {
                bail!(
                    "the coordinator did not catch up with the stream within {timeout:?}: {}",
                    self.last_words()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its core's counters, from `/healthz`.
    pub async fn state(&self) -> anyhow::Result<CoreState> {
        let body: serde_json::Value = self
            .http
            .get(format!("{}/healthz", self.base))
            .send()
            .await?
            .json()
            .await?;
        let core = &body["core"];
        let n = |k: &str| core[k].as_u64().unwrap_or(0);
        Ok(CoreState {
            events: n("events"),
            batches: n("batches"),
            caught_up: core["caught_up"].as_bool().unwrap_or(false),
            workers: n("workers"),
            workers_alive: n("workers_alive"),
        })
    }

    /// GETs `path`; the body's size and how long the answer took.
    pub async fn time_get(&self, path: &str) -> anyhow::Result<(Duration, usize)> {
        let t0 = Instant::now();
        let resp = self.http.get(format!("{}{path}", self.base)).send().await?;
        let status = resp.status();
        let body = resp.bytes().await?;
        let took = t0.elapsed();
        if !status.is_success() {
            bail!("GET {path}: {status}");
        }
        Ok((took, body.len()))
    }

    /// GETs `path` as JSON; `None` when it answers 404.
    pub async fn get_json(&self, path: &str) -> anyhow::Result<Option<serde_json::Value>> {
        let resp = self.http.get(format!("{}{path}", self.base)).send().await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Ok(Some(resp.error_for_status()?.json().await?))
    }

    /// `/metrics` as text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    /// CPU seconds (user + system) it has used so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(self.pid)
    }

    /// Its peak resident memory so far, in bytes.
    pub fn peak_rss(&self) -> Option<u64> {
        status_kib(self.pid, "VmHWM:").map(|k| k * 1024)
    }

    /// Its resident memory now, in bytes.
    pub fn rss(&self) -> Option<u64> {
        status_kib(self.pid, "VmRSS:").map(|k| k * 1024)
    }

    /// Stops it (SIGTERM, then SIGKILL after 10 s).
    pub async fn stop(mut self) {
        #[cfg(unix)]
        if let Ok(pid) = i32::try_from(self.pid) {
            // SAFETY: kill(2) with a pid this process spawned and still owns.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// CPU seconds (user + system) used by process `pid`, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields start after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ')'.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    Some((utime + stime) / ticks)
}

/// A `kB` line of `/proc/<pid>/status` (`VmHWM:`, `VmRSS:`).
pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A histogram read from Prometheus text: cumulative `(le, count)` pairs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Buckets(pub Vec<(f64, f64)>);

impl Buckets {
    /// The `<name>_bucket` series of `text` (without other labels).
    pub fn parse(text: &str, name: &str) -> Self {
        let prefix = format!("{name}_bucket{{le=\"");
        let mut out = Vec::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(&prefix) else {
                continue;
            };
            let Some((le, rest)) = rest.split_once("\"}") else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                match le.parse() {
                    Ok(v) => v,
                    Err(_) => continue,
                }
            };
            if let Ok(count) = rest.trim().parse::<f64>() {
                out.push((le, count));
            }
        }
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        Self(out)
    }

    /// What was observed between `earlier` and `self` (counts subtracted).
    pub fn since(&self, earlier: &Buckets) -> Buckets {
        Buckets(
            self.0
                .iter()
                .map(|&(le, c)| {
                    let before = earlier
                        .0
                        .iter()
                        .find(|(l, _)| *l == le)
                        .map_or(0.0, |&(_, c)| c);
                    (le, (c - before).max(0.0))
                })
                .collect(),
        )
    }

    /// Observations in all.
    pub fn count(&self) -> f64 {
        self.0.last().map_or(0.0, |&(_, c)| c)
    }

    /// The `q` quantile, interpolated linearly inside its bucket as
    /// Prometheus's `histogram_quantile` does; `None` with no observations.
    /// Past the last finite bound it answers that bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total;
        let mut prev = (0.0, 0.0);
        for &(le, c) in &self.0 {
            if c >= rank {
                if le.is_infinite() {
                    return Some(prev.0);
                }
                let width = c - prev.1;
                let into = if width > 0.0 {
                    (rank - prev.1) / width
                } else {
                    1.0
                };
                return Some(prev.0 + (le - prev.0) * into);
            }
            prev = (le, c);
        }
        Some(prev.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_interpolate_inside_buckets() {
        let text = "# HELP x_seconds lag\n\
                    x_seconds_bucket{le=\"0.001\"} 0\n\
                    x_seconds_bucket{le=\"0.01\"} 50\n\
                    x_seconds_bucket{le=\"0.1\"} 99\n\
                    x_seconds_bucket{le=\"+Inf\"} 100\n\
                    x_seconds_sum 3\nx_seconds_count 100\n";
        let b = Buckets::parse(text, "x_seconds");
        assert_eq!(b.0.len(), 4);
        assert_eq!(b.count(), 100.0);
        let p50 = b.quantile(0.5).unwrap();
        assert!((p50 - 0.01).abs() < 1e-9, "{p50}");
        let p25 = b.quantile(0.25).unwrap();
        assert!((p25 - 0.0055).abs() < 1e-9, "{p25}");
        assert_eq!(b.quantile(1.0), Some(0.1), "past the last bound: the bound");
        assert_eq!(Buckets::default().quantile(0.5), None);
        let earlier = Buckets(vec![
            (0.001, 0.0),
            (0.01, 50.0),
            (0.1, 50.0),
            (f64::INFINITY, 50.0),
        ]);
        let d = b.since(&earlier);
        assert_eq!(d.count(), 50.0);
        assert!(d.quantile(0.5).unwrap() > 0.01);
    }

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).is_some());
        assert!(status_kib(pid, "VmHWM:").unwrap() > 0);
    }
}

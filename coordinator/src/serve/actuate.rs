//! Acting on scaling decisions: a webhook (`--scale-webhook`) and a command
//! template (`--scale-command`, e.g. `docker compose up -d --no-recreate
//! --scale {stage}={workers}`), or only reporting them (`--scale-dry-run`).
//!
//! The core decides; this module carries decisions out, off the core's path.
//! Decisions queue per stage and only the latest counts (a stage that changed
//! twice while a command ran is acted on once, with its newest count). Each
//! stage is acted on at most once per `min_interval`. A failed command or
//! webhook is logged with its exit status and output and retried once
//! `min_interval` has passed (with the stage's newest decision, if one came
//! meanwhile), until it succeeds; nothing here ever blocks the core.

use guildhall_proto::Stage;
use serde_json::json;
use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Longest a scale command may run before it is killed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Output of a failed command kept in the log line.
const OUTPUT_TAIL: usize = 2_000;

/// A stage's new recommended worker count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleDecision {
    /// The stage.
    pub stage: Stage,
    /// Workers before.
    pub from: u32,
    /// Workers recommended now.
    pub to: u32,
    /// Why, in words.
    pub reason: String,
    /// Asked by a person (`POST /api/stages/{stage}/scale`): carried out
    /// at once, whatever `min_interval` says.
    pub manual: bool,
}

/// How decisions are carried out.
#[derive(Debug, Clone, Default)]
pub struct ActuatorConfig {
    /// POST each decision here.
    pub webhook: Option<String>,
    /// Run this (through `sh -c`) with `{stage}` and `{workers}` replaced.
    pub command: Option<String>,
    /// Only log what would be done.
    pub dry_run: bool,
    /// Least time between two actions on one stage.
    pub min_interval: Duration,
    /// The namespace, in webhook bodies.
    pub namespace: String,
}

/// Handle for queueing decisions; cheap to clone.
#[derive(Debug, Clone)]
pub struct Actuator {
    /// Queue to the acting task.
    tx: mpsc::UnboundedSender<ScaleDecision>,
}

impl Actuator {
    /// Starts the acting task; it ends when `stop` flips.
    pub fn spawn(
        config: ActuatorConfig,
        outcomes: prometheus::IntCounterVec,
        stop: watch::Receiver<bool>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(act(config, rx, outcomes, stop));
        (Self { tx }, task)
    }

    /// Queues a decision (never waits).
    pub fn decide(&self, decision: ScaleDecision) {
        let _ = self.tx.send(decision);
    }
}

/// `template` with `{stage}` and `{workers}` filled in. Stage names are
/// restricted to `A-Z a-z 0-9 _ -`, so they are safe in a shell command.
pub fn expand(template: &str, stage: &Stage, workers: u32) -> String {
    template
        .replace("{stage}", stage.as_str())
        .replace("{workers}", &workers.to_string())
}

async fn act(
    config: ActuatorConfig,
    mut rx: mpsc::UnboundedReceiver<ScaleDecision>,
    outcomes: prometheus::IntCounterVec,
    mut stop: watch::Receiver<bool>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .ok();
    // Latest decision per stage not yet carried out.
    let mut waiting: BTreeMap<Stage, ScaleDecision> = BTreeMap::new();
    // When each stage was last acted on.
    let mut last: BTreeMap<Stage, Instant> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            d = rx.recv() => match d {
                Some(d) => {
                    waiting.insert(d.stage.clone(), d);
                    // Take everything already queued: only the latest per stage counts.
                    while let Ok(d) = rx.try_recv() {
                        waiting.insert(d.stage.clone(), d);
                    }
                }
                None => return,
            },
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let due: Vec<Stage> = waiting
            .keys()
            .filter(|s| {
                waiting.get(*s).is_some_and(|d| d.manual)
                    || last
                        .get(*s)
                        .is_none_or(|t| t.elapsed() >= config.min_interval)
            })
            .cloned()
            .collect();
        for stage in due {
            let Some(d) = waiting.remove(&stage) else {
                continue;
            };
            last.insert(stage.clone(), Instant::now());
            let ok = carry_out(&config, http.as_ref(), &d).await;
            outcomes
                .with_label_values(&[if config.dry_run {
                    "dry_run"
                } else if ok {
                    "done"
                } else {
                    "failed"
                }])
                .inc();
            if !ok {
                // Tried again once the interval has passed, unless a newer
                // decision for the stage arrived meanwhile (that one wins).
                waiting.entry(stage).or_insert(d);
            }
        }
    }
}

/// Does what `config` says for one decision; `false` if anything failed.
async fn carry_out(
    config: &ActuatorConfig,
    http: Option<&reqwest::Client>,
    d: &ScaleDecision,
) -> bool {
    let (stage, to) = (&d.stage, d.to);
    if config.dry_run {
        tracing::info!(%stage, from = d.from, to, reason = %d.reason, "scale (dry run): would scale");
        return true;
    }
    let mut ok = true;
    if let (Some(url), Some(http)) = (&config.webhook, http) {
        let body = json!({
            "text": format!("[{}] scale {stage}: {} -> {to} workers ({})", config.namespace, d.from, d.reason),
            "namespace": config.namespace,
            "stage": stage.as_str(),
            "from": d.from,
            "to": to,
            "reason": d.reason,
        });
        match http.post(url).json(&body).send().await {
            Ok(r) if r.status().is_success() => {
                tracing::info!(%stage, from = d.from, to, "scale webhook notified");
            }
            Ok(r) => {
                ok = false;
                tracing::warn!(%stage, to, "scale webhook answered {}; retried later", r.status());
            }
            Err(e) => {
                ok = false;
                tracing::warn!(%stage, to, "scale webhook unreachable: {e}; retried later");
            }
        }
    }
    if let Some(template) = &config.command {
        let line = expand(template, stage, to);
        ok &= run(&line, stage, to).await;
    }
    ok
}

async fn run(line: &str, stage: &Stage, to: u32) -> bool {
    let child = Command::new("sh")
        .arg("-c")
        .arg(line)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%stage, to, command = line, "scale command could not start: {e}; retried later");
            return false;
        }
    };
    match tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => {
            tracing::info!(%stage, to, command = line, "scale command done");
            true
        }
        Ok(Ok(out)) => {
            let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
            output.push_str(&String::from_utf8_lossy(&out.stderr));
            let tail: String = output
                .chars()
                .rev()
                .take(OUTPUT_TAIL)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            tracing::warn!(
                %stage, to, command = line, status = %out.status, output = %tail.trim(),
                "scale command failed; retried later"
            );
            false
        }
        Ok(Err(e)) => {
            tracing::warn!(%stage, to, command = line, "scale command failed: {e}; retried later");
            false
        }
        Err(_) => {
            tracing::warn!(%stage, to, command = line, "scale command still running after {COMMAND_TIMEOUT:?}: killed; retried later");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(stage: &str, to: u32) -> ScaleDecision {
        ScaleDecision {
            stage: stage.parse().unwrap(),
            from: 1,
            to,
            reason: "test".into(),
            manual: false,
        }
    }

    fn counter() -> prometheus::IntCounterVec {
        prometheus::IntCounterVec::new(prometheus::Opts::new("x", "x"), &["outcome"]).unwrap()
    }

    /// A fresh directory for a test's command log.
    fn scratch_dir() -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("guildhall-actuate-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Waits (up to 4 s) until `outcome` was counted at least `n` times.
    async fn wait_counted(outcomes: &prometheus::IntCounterVec, outcome: &str, n: u64) {
        for _ in 0..80 {
            if outcomes.with_label_values(&[outcome]).get() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[test]
    fn templates_are_filled() {
        let s: Stage = "build".parse().unwrap();
        assert_eq!(
            expand("docker compose up -d --scale {stage}={workers}", &s, 4),
            "docker compose up -d --scale build=4"
        );
    }

    #[tokio::test]
    async fn commands_run_with_the_latest_count_and_failures_are_retried() {
        let dir = scratch_dir();
        let log = dir.join("log");
        let outcomes = counter();
        let (stop_tx, stop_rx) = watch::channel(false);
        let config = ActuatorConfig {
            // Fails the first time it is asked for 9 workers, then succeeds.
            command: Some(format!(
                "echo {{stage}}={{workers}} >> {log}; test {{workers}} -lt 9 || test -e {mark} || {{ touch {mark}; echo boom >&2; exit 3; }}",
                log = log.display(),
                mark = dir.join("mark").display(),
            )),
            min_interval: Duration::from_millis(200),
            ..Default::default()
        };
        let (a, task) = Actuator::spawn(config, outcomes.clone(), stop_rx);
        // Three decisions for one stage at once: only the latest is carried out.
        a.decide(decision("build", 2));
        a.decide(decision("build", 3));
        a.decide(decision("build", 4));
        a.decide(decision("report", 9)); // fails once, then is retried
        wait_counted(&outcomes, "done", 2).await;
        let lines = std::fs::read_to_string(&log).unwrap();
        assert_eq!(lines, "build=4\nreport=9\nreport=9\n");
        assert_eq!(outcomes.with_label_values(&["done"]).get(), 2);
        assert_eq!(outcomes.with_label_values(&["failed"]).get(), 1);
        let _ = stop_tx.send(true);
        let _ = task.await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_manual_decision_is_not_held_back_by_the_interval() {
        let dir = scratch_dir();
        let log = dir.join("log");
        let outcomes = counter();
        let (stop_tx, stop_rx) = watch::channel(false);
        let config = ActuatorConfig {
            command: Some(format!("echo {{stage}}={{workers}} >> {}", log.display())),
            min_interval: Duration::from_secs(3600),
            ..Default::default()
        };
        let (a, task) = Actuator::spawn(config, outcomes.clone(), stop_rx);
        a.decide(decision("build", 2));
        wait_counted(&outcomes, "done", 1).await;
        // An automatic one waits an hour; a manual one goes at once.
        a.decide(decision("build", 3));
        a.decide(ScaleDecision {
            manual: true,
            ..decision("build", 5)
        });
        wait_counted(&outcomes, "done", 2).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "build=2\nbuild=5\n");
        let _ = stop_tx.send(true);
        let _ = task.await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_dry_run_does_nothing_but_count() {
        let outcomes = counter();
        let (_stop_tx, stop_rx) = watch::channel(false);
        let config = ActuatorConfig {
            command: Some("exit 1".into()),
            dry_run: true,
            ..Default::default()
        };
        let (a, _task) = Actuator::spawn(config, outcomes.clone(), stop_rx);
        a.decide(decision("build", 2));
        wait_counted(&outcomes, "dry_run", 1).await;
        assert_eq!(outcomes.with_label_values(&["dry_run"]).get(), 1);
        assert_eq!(outcomes.with_label_values(&["failed"]).get(), 0);
    }
}

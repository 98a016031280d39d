//! Webhook alerts (`--alert-webhook URL`): a JSON POST when a worker dies or
//! comes back, when a task is dead-lettered, when a stage fails with an error
//! class it had not failed with before (`error_class_new`) and when a class's
//! failure rate jumps (`error_class_rising`).
//!
//! The body has a Slack-compatible `text` plus structured fields (`kind`,
//! `namespace`, `at_ms` and the notice's own). A worker's error message is
//! escaped for Slack in `text` (`&`, `<`, `>`: a message must not mention
//! `@channel` or forge a link) and verbatim in its structured field. Sending
//! never blocks the core: notices go into a bounded queue (the oldest are
//! dropped, and counted, when it is full) and a task of its own delivers
//! them, retrying failures with exponential backoff.

use crate::core::Notice;
use guildhall_broker::now_ms;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Alerts waiting to be sent before new ones are dropped.
const QUEUE: usize = 1_000;
/// Attempts per alert.
const ATTEMPTS: u32 = 5;
/// First retry delay; doubles each time.
const FIRST_RETRY: Duration = Duration::from_millis(500);

/// Where alerts go, and what they say about this deployment.
#[derive(Debug, Clone)]
pub struct AlertConfig {
    /// The webhook URL.
    pub url: String,
    /// The namespace, in every alert.
    pub namespace: String,
}

/// Handle for queueing alerts; cheap to clone.
#[derive(Debug, Clone)]
pub struct Alerts {
    /// Queue to the sending task.
    tx: mpsc::Sender<Value>,
    /// Counts alerts sent, failed and dropped.
    outcomes: prometheus::IntCounterVec,
}

impl Alerts {
    /// Starts the sending task; it ends when `stop` flips.
    pub fn spawn(
        config: AlertConfig,
        outcomes: prometheus::IntCounterVec,
        stop: watch::Receiver<bool>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(send_all(config, rx, outcomes.clone(), stop));
        (Self { tx, outcomes }, task)
    }

    /// Queues the alert for `notice`, if it is one that alerts (never waits).
    pub fn notify(&self, namespace: &str, notice: &Notice) {
        let Some(body) = body(namespace, notice, now_ms()) else {
            return;
        };
        if self.tx.try_send(body).is_err() {
            self.outcomes.with_label_values(&["dropped"]).inc();
            tracing::warn!("alert queue full: alert dropped");
        }
    }
}

/// `text` made inert inside a Slack message: `&`, `<` and `>` are the only
/// characters Slack gives a meaning (links, mentions, `<!channel>`).
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The JSON body for a notice that alerts (deaths, returns, dead letters,
/// new and rising error classes).
pub fn body(namespace: &str, notice: &Notice, at_ms: u64) -> Option<Value> {
    Some(match notice {
        Notice::WorkerDead {
            worker,
            stage,
            last_seen_ms,
            tasks_requeued,
        } => json!({
            "text": format!(
                ":red_circle: [{namespace}] worker {worker} ({stage}) is dead: silent for {:.1} s; {} task(s) it held are back in the queue",
                at_ms.saturating_sub(*last_seen_ms) as f64 / 1000.0,
                tasks_requeued.len()
            ),
            "kind": "worker_dead",
            "namespace": namespace,
            "worker": worker.as_str(),
            "stage": stage.as_str(),
            "last_seen_ms": last_seen_ms,
            "tasks_requeued": tasks_requeued.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
            "at_ms": at_ms,
        }),
        Notice::WorkerReturned {
            worker,
            stage,
            dead_for_ms,
        } => json!({
            "text": format!(
                ":large_green_circle: [{namespace}] worker {worker} ({stage}) is back after {:.1} s",
                *dead_for_ms as f64 / 1000.0
            ),
            "kind": "worker_returned",
            "namespace": namespace,
            "worker": worker.as_str(),
            "stage": stage.as_str(),
            "dead_for_ms": dead_for_ms,
            "at_ms": at_ms,
        }),
        Notice::TaskDeadLettered { task, stage, error } => json!({
            "text": format!(":warning: [{namespace}] task {task} dead-lettered at {stage}: {error}"),
            "kind": "task_dead_lettered",
            "namespace": namespace,
            "task": task.as_str(),
            "stage": stage.as_str(),
            "error": error,
            "at_ms": at_ms,
        }),
        Notice::ErrorClassNew {
            stage,
            error_class,
            message_sample,
            task_id,
        } => json!({
            "text": format!(
                ":new: [{namespace}] new error class {error_class} at stage {stage} (task {task_id}): {}",
                slack_escape(message_sample)
            ),
            "kind": "error_class_new",
            "namespace": namespace,
            "stage": stage.as_str(),
            "error_class": error_class,
            "message_sample": message_sample,
            "task": task_id.as_str(),
            "at_ms": at_ms,
        }),
        Notice::ErrorClassRising {
            stage,
            error_class,
            last_5m,
            previous_rate_per_min,
        } => json!({
            "text": format!(
                ":chart_with_upwards_trend: [{namespace}] error class {error_class} rising at stage {stage}: {last_5m} failure(s) in the last 5 min ({:.1}/min), {previous_rate_per_min:.1}/min in the 10 min before",
                *last_5m as f64 / 5.0
            ),
            "kind": "error_class_rising",
            "namespace": namespace,
            "stage": stage.as_str(),
            "error_class": error_class,
            "last_5m": last_5m,
            "rate_per_min": *last_5m as f64 / 5.0,
            "previous_rate_per_min": previous_rate_per_min,
            "at_ms": at_ms,
        }),
        Notice::Scale { .. }
        | Notice::Assign { .. }
        | Notice::SetPrefetch { .. }
        | Notice::FireTick(_)
        | Notice::SetRateLimit { .. } => return None,
    })
}

async fn send_all(
    config: AlertConfig,
    mut rx: mpsc::Receiver<Value>,
    outcomes: prometheus::IntCounterVec,
    mut stop: watch::Receiver<bool>,
) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("alerts disabled: cannot build an HTTP client: {e}");
            return;
        }
    };
    loop {
        let body = tokio::select! {
            b = rx.recv() => match b {
                Some(b) => b,
                None => return,
            },
            _ = stop.changed() => return,
        };
        let mut delay = FIRST_RETRY;
        let mut sent = false;
        for attempt in 1..=ATTEMPTS {
            match client.post(&config.url).json(&body).send().await {
                Ok(r) if r.status().is_success() => {
                    sent = true;
                    break;
                }
                Ok(r) => tracing::warn!(attempt, "alert webhook answered {}", r.status()),
                Err(e) => tracing::warn!(attempt, "alert webhook unreachable: {e}"),
            }
            if attempt < ATTEMPTS {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return,
                }
                delay *= 2;
            }
        }
        let outcome = if sent { "sent" } else { "failed" };
        outcomes.with_label_values(&[outcome]).inc();
        if !sent {
            tracing::error!(
                kind = body["kind"].as_str().unwrap_or(""),
                "alert not delivered after {ATTEMPTS} attempts"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_slack_compatible_and_structured() {
        let notice = Notice::WorkerDead {
            worker: "w1".parse().unwrap(),
            stage: "build".parse().unwrap(),
            last_seen_ms: 1_000,
            tasks_requeued: vec!["T1".parse().unwrap()],
        };
        let b = body("prod", &notice, 4_500).unwrap();
        assert_eq!(b["kind"], "worker_dead");
        assert_eq!(b["tasks_requeued"][0], "T1");
        let text = b["text"].as_str().unwrap();
        assert!(
            text.contains("[prod] worker w1 (build) is dead: silent for 3.5 s; 1 task(s)"),
            "{text}"
        );
        let b = body(
            "prod",
            &Notice::TaskDeadLettered {
                task: "T9".parse().unwrap(),
                stage: "build".parse().unwrap(),
                error: "HTTP 400".into(),
            },
            0,
        )
        .unwrap();
        assert_eq!(
            b["text"],
            ":warning: [prod] task T9 dead-lettered at build: HTTP 400"
        );
    }

    #[test]
    fn error_class_alerts_say_what_and_keep_the_message_out_of_slack_markup() {
        let notice = Notice::ErrorClassNew {
            stage: "build".parse().unwrap(),
            error_class: "http_503".into(),
            message_sample: "HTTP 503: <!channel> & <script>x</script>".into(),
            task_id: "T1".parse().unwrap(),
        };
        let b = body("prod", &notice, 7).unwrap();
        assert_eq!(b["kind"], "error_class_new");
        assert_eq!(b["stage"], "build");
        assert_eq!(b["error_class"], "http_503");
        assert_eq!(b["task"], "T1");
        assert_eq!(b["at_ms"], 7);
        assert_eq!(
            b["message_sample"],
            "HTTP 503: <!channel> & <script>x</script>"
        );
        assert_eq!(
            b["text"],
            ":new: [prod] new error class http_503 at stage build (task T1): HTTP 503: &lt;!channel&gt; &amp; &lt;script&gt;x&lt;/script&gt;"
        );
        let notice = Notice::ErrorClassRising {
            stage: "build".parse().unwrap(),
            error_class: "timeout".into(),
            last_5m: 12,
            previous_rate_per_min: 0.3,
        };
        let b = body("prod", &notice, 0).unwrap();
        assert_eq!(b["kind"], "error_class_rising");
        assert_eq!(b["error_class"], "timeout");
        assert_eq!(b["last_5m"], 12);
        assert_eq!(b["rate_per_min"], 2.4);
        assert_eq!(b["previous_rate_per_min"], 0.3);
        assert_eq!(
            b["text"],
            ":chart_with_upwards_trend: [prod] error class timeout rising at stage build: 12 failure(s) in the last 5 min (2.4/min), 0.3/min in the 10 min before"
        );
    }
}

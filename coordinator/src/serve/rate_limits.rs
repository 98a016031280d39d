//! Per-stage rate limits, the runtime's side: the `RateLimitSet` events this
//! coordinator writes (its `--rate-limit STAGE=RATE` flags at start, the
//! API at run time), and the agents' shares the core decided on, sent as
//! `Command::SetRateLimit` (routing key `agent.<id>` on the control
//! exchange) in order: each agent has one sender task that sends the
//! newest share it was given, one command at a time, so a share sent
//! later never arrives before one sent earlier.

use super::{App, send_command};
use guildhall_broker::now_ms;
use guildhall_proto::{AgentId, Command, Event, Rate, RateLimitSet, Stage};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Parses one `--rate-limit STAGE=RATE` flag value.
pub fn parse_flag(value: &str) -> Result<(Stage, Rate), String> {
    let shown: String = value.chars().take(80).collect();
    let (stage, rate) = value.split_once('=').ok_or_else(|| {
        format!("--rate-limit takes STAGE=RATE, like resize=50/s (got '{shown}')")
    })?;
    let stage = Stage::new(stage.trim().to_owned()).map_err(|e| format!("--rate-limit: {e}"))?;
    let rate = rate
        .parse::<Rate>()
        .map_err(|e| format!("--rate-limit: {e}"))?;
    Ok((stage, rate))
}

/// The newest share of each agent, and its sender task.
#[derive(Default)]
pub struct ShareSender {
    /// Per agent: where its newest share goes (`None` until the first).
    agents: Mutex<HashMap<AgentId, watch::Sender<Option<Option<Rate>>>>>,
}

impl ShareSender {
    /// Sends `worker` its share `limit`, after any share sent before.
    pub fn send(&self, app: &Arc<App>, worker: AgentId, limit: Option<Rate>) {
        let mut agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = agents.get(&worker)
            && tx.send(Some(limit)).is_ok()
        {
            return;
        }
        let (tx, rx) = watch::channel(Some(limit));
        agents.insert(worker.clone(), tx);
        tokio::spawn(send_shares(app.clone(), worker, rx));
    }
}

/// Sends `worker` each newest share, one at a time, until the app stops.
async fn send_shares(
    app: Arc<App>,
    worker: AgentId,
    mut rx: watch::Receiver<Option<Option<Rate>>>,
) {
    loop {
        let share = *rx.borrow_and_update();
        if let Some(limit) = share {
            send_command(&app, worker.clone(), Command::SetRateLimit { limit }).await;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// The `RateLimitSet` event that sets `stage`'s limit (the core applies it
/// when it reads it back from the events stream).
pub fn event(stage: Stage, limit: Option<Rate>, by: &str) -> Event {
    Event::RateLimitSet(RateLimitSet {
        at_ms: now_ms(),
        stage,
        limit,
        by: by.chars().take(100).collect(),
    })
}

/// Writes the `--rate-limit` flags' limits, retrying until the broker
/// takes them (or the coordinator stops).
pub async fn write_flags(
    app: Arc<App>,
    limits: Vec<(Stage, Rate)>,
    mut stop: watch::Receiver<bool>,
) {
    for (stage, rate) in limits {
        let written = app
            .write_events_retrying(
                vec![event(stage.clone(), Some(rate), "--rate-limit")],
                &mut stop,
                |e| {
                    tracing::warn!(%stage, "cannot write the stage's rate limit yet: {e}");
                },
            )
            .await;
        if !written {
            return;
        }
        tracing::info!(%stage, %rate, "stage rate limit set (--rate-limit)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_stage_equals_rate() {
        let (stage, rate) = parse_flag("resize=50/s").expect("valid");
        assert_eq!((stage.as_str(), rate.per_sec()), ("resize", 50.0));
        for (bad, why) in [
            ("resize", "takes STAGE=RATE"),
            ("resize=0/s", "invalid rate limit"),
            ("resize=fast", "invalid rate limit"),
            ("a b=5/s", "--rate-limit:"),
            ("=5/s", "--rate-limit:"),
        ] {
            let e = parse_flag(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
            assert!(!e.contains('\n'));
        }
    }
}

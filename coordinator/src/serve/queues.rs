//! Polls the broker for each known stage's queue counts.
//!
//! Ready messages and consumers come from a passive declare (exact and
//! immediate); unacked messages only exist in the management API (refreshed
//! by the broker every few seconds), so they are added when it answers.

use super::App;
use crate::core::stages::QueueStats;
use guildhall_broker::management::QueueInfo;
use guildhall_broker::now_ms;
use guildhall_broker::topology::probe_queue;
use guildhall_proto::Stage;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::watch;

/// Polls every `interval` until `stop` flips.
pub async fn run(app: Arc<App>, interval: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let stages: Vec<Stage> = app.core().stage_names().cloned().collect();
        if stages.is_empty() {
            continue;
        }
        let unacked = match &app.management {
            Some(m) => match m.queues_with_prefix(&app.names.prefix()).await {
                Ok(queues) => {
                    app.health.management_ok.store(true, Ordering::Relaxed);
                    warned = false;
                    Some(
                        queues
                            .into_iter()
                            .map(|q| (q.name.clone(), q))
                            .collect::<HashMap<String, QueueInfo>>(),
                    )
                }
                Err(e) => {
                    app.health.management_ok.store(false, Ordering::Relaxed);
                    if !warned {
                        tracing::warn!("{e}: unacked counts unavailable");
                        warned = true;
                    }
                    None
                }
            },
            None => None,
        };
        let conn = match app.link.get().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                tracing::debug!("queue poll skipped: {e}");
                continue;
            }
        };
        let mut results = Vec::with_capacity(stages.len());
        for stage in stages {
            let name = app.names.stage_queue(&stage);
            match probe_queue(&conn, &name).await {
                Ok(Some(probe)) => {
                    let stats = QueueStats {
                        ready: u64::from(probe.ready),
                        unacked: unacked
                            .as_ref()
                            .and_then(|m| m.get(&name))
                            .map(|q| q.messages_unacknowledged),
                        consumers: u64::from(probe.consumers),
                    };
                    results.push((stage, stats));
                }
                Ok(None) => {}
                Err(e) => tracing::debug!("probe of {name} failed: {e}"),
            }
        }
        let now = now_ms();
        let mut core = app.core();
        for (stage, stats) in results {
            core.handle_queue_stats(now, &stage, stats);
        }
    }
}

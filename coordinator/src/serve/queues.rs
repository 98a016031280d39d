//! Polls the broker for each known stage's queue counts: its intake queue
//! and its three priority band queues (issue 18), added up for the stage's
//! totals and kept apart for its bands.
//!
//! Ready messages and consumers come from a passive declare (exact and
//! immediate); unacked messages only exist in the management API (refreshed
//! by the broker every few seconds), so they are added when it answers.

use super::App;
use crate::core::scheduling::queued::StageQueues;
use crate::core::stages::QueueStats;
use guildhall_broker::management::QueueInfo;
use guildhall_broker::now_ms;
use guildhall_broker::topology::probe_queue;
use guildhall_proto::Stage;
use guildhall_proto::schedule::Band;
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
            let probe = |name: String| {
                let conn = &conn;
                let unacked = &unacked;
                async move {
                    match probe_queue(conn, &name).await {
                        Ok(Some(probe)) => Some(QueueStats {
                            ready: u64::from(probe.ready),
                            unacked: unacked
                                .as_ref()
                                .and_then(|m| m.get(&name))
                                .map(|q| q.messages_unacknowledged),
                            consumers: u64::from(probe.consumers),
                        }),
                        Ok(None) => None,
                        Err(e) => {
                            tracing::debug!("probe of {name} failed: {e}");
                            None
                        }
                    }
                }
            };
            let mut queues = StageQueues {
                intake: probe(app.names.stage_queue(&stage)).await,
                ..StageQueues::default()
            };
            for band in Band::ALL {
                queues.bands[band.index()] = probe(app.names.band_queue(&stage, band)).await;
            }
            results.push((stage, queues));
        }
        let now = now_ms();
        let mut core = app.core();
        for (stage, queues) in results {
            core.handle_stage_queues(now, &stage, queues);
        }
    }
}

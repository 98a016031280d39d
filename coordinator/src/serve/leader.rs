//! Leadership among the coordinators of one namespace (issue 20).
//!
//! Every coordinator follows the events stream and keeps the same state; it
//! serves the whole read API and the dashboard, and performs the control
//! requests it receives (commands, submissions, cancels, schedules: they go
//! through the broker and the stream, whoever sends them). **Only the
//! leader acts on its own**: it closes dead workers' connections, sends the
//! rebalancing and prefetch commands the core decides, sends rate-limit
//! shares and relayed cancels to agents, fires cron ticks, releases held
//! tasks and joins, carries out scaling decisions and sends alerts
//! ([`Leadership::acting`] gates each of them).
//!
//! # The lock
//!
//! Leadership is an exclusive queue, `<ns>.coordinator.lock`, declared on a
//! connection of its own with a [`LOCK_HEARTBEAT_S`] AMQP heartbeat: the
//! broker lets one connection declare it, answers every other one
//! `RESOURCE_LOCKED`, and deletes it the moment that connection is gone (a
//! killed process, its broker node lost) or, for a frozen process, once
//! two heartbeats were missed. A follower tries again every
//! [`TRY_EVERY`], and only once its core has caught up with the stream (so
//! it knows the last epoch). No delivery is ever held, so the broker's
//! consumer timeout plays no part.
//!
//! # The lease and the epoch
//!
//! The leader confirms it still holds the lock every [`CONFIRM_EVERY`] (a
//! passive declare of the queue on its connection) and acts only while its
//! last confirmation is younger than [`LEASE`]. A leader that was frozen
//! (SIGSTOP) and wakes up finds its confirmation old: it does nothing until
//! it has confirmed again, which fails, because the broker closed its
//! connection, and it steps down. On taking the lead it writes
//! `LeaderElected` with the next **epoch** (one more than the last the
//! stream said); every coordinator's core records the leader in stream
//! order and ignores an election with an older epoch, and a leader that
//! reads a newer epoch than its own steps down.
//!
//! On taking the lead, it closes the connections of workers its core shows
//! dead for less than [`TAKEOVER_LOOKBACK`] (the previous leader may have
//! died before it did), and wakes the release executor.

use super::App;
use guildhall_broker::{connect_any, now_ms};
use guildhall_proto::{Event, LeaderElected};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;

/// The lock connection's AMQP heartbeat: a frozen leader's lock is freed
/// after about two of them.
pub const LOCK_HEARTBEAT_S: u16 = 1;

/// How often a follower asks for the lock.
pub const TRY_EVERY: Duration = Duration::from_millis(500);

/// How often a coordinator that is still replaying the stream looks whether
/// it is done (to ask for the lock at once).
const CATCH_UP_LOOK: Duration = Duration::from_millis(20);

/// How often the leader confirms it still holds the lock.
pub const CONFIRM_EVERY: Duration = Duration::from_millis(250);

/// How long a confirmation lets the leader act: shorter than the time the
/// broker takes to free a frozen leader's lock (two heartbeats).
pub const LEASE: Duration = Duration::from_millis(1_500);

/// Workers dead for less than this when a coordinator takes the lead have
/// their connections closed (again) by it.
pub const TAKEOVER_LOOKBACK: Duration = Duration::from_secs(300);

/// Longest wait for the lock connection to close.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Longest wait between reconnections of the lock connection.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// This coordinator's part in the leadership.
#[derive(Debug, Default)]
pub struct Leadership {
    /// Whether it holds the lock (as far as it knows).
    leading: AtomicBool,
    /// When it last confirmed the lock (`now_ms`); acting needs it within
    /// [`LEASE`].
    confirmed_ms: AtomicU64,
    /// Its epoch while leading (0 otherwise).
    epoch: AtomicU64,
    /// Times it took the lead.
    pub takeovers: AtomicU64,
}

impl Leadership {
    /// Whether this coordinator may act now: it holds the lock and
    /// confirmed it within the lease.
    pub fn acting(&self) -> bool {
        self.leading.load(Ordering::Acquire)
            && now_ms().saturating_sub(self.confirmed_ms.load(Ordering::Acquire))
                < LEASE.as_millis() as u64
    }

    /// Whether it holds the lock (it may not act: see [`Self::acting`]).
    pub fn leading(&self) -> bool {
        self.leading.load(Ordering::Acquire)
    }

    /// Its epoch while leading, else 0.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    fn lead(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Release);
        self.confirmed_ms.store(now_ms(), Ordering::Release);
        self.leading.store(true, Ordering::Release);
        self.takeovers.fetch_add(1, Ordering::Relaxed);
    }

    fn step_down(&self) {
        self.leading.store(false, Ordering::Release);
        self.epoch.store(0, Ordering::Release);
    }
}

/// How holding the lock ended.
enum Ended {
    /// The coordinator is stopping.
    Stopped,
    /// The lock connection failed, or the lock was lost: why.
    Lost(String),
}

/// Takes and holds the lead whenever it can, until `stop` flips.
pub async fn run(app: Arc<App>, conn_name: String, mut stop: watch::Receiver<bool>) {
    let urls = app.amqp_url.with_heartbeat(LOCK_HEARTBEAT_S);
    let mut last = None;
    let mut backoff = Duration::from_millis(200);
    loop {
        let conn = tokio::select! {
            c = connect_any(&urls, &conn_name, last) => c,
            _ = stop.changed() => return,
        };
        let ended = match conn {
            Ok((conn, index)) => {
                last = Some(index);
                backoff = Duration::from_millis(200);
                let ended = hold(&app, &conn, &mut stop).await;
                // Not leading any more before anything else: closing a
                // connection the broker already dropped (a frozen process
                // woken up) can wait for an answer that never comes.
                step_down(&app);
                let _ =
                    tokio::time::timeout(CLOSE_WAIT, conn.close(200, "coordinator lock".into()))
                        .await;
                ended
            }
            Err(e) => Ended::Lost(e.to_string()),
        };
        step_down(&app);
        match ended {
            Ended::Stopped => return,
            Ended::Lost(why) => {
                tracing::warn!("coordinator lock: {why}; again in {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Marks this coordinator as not leading (logged once).
fn step_down(app: &App) {
    if app.leadership.leading() {
        app.leadership.step_down();
        app.metrics.leader.set(0);
        app.metrics.leader_epoch.set(0);
        tracing::warn!("no longer leading");
    }
}

/// Follows until the lock is free, then leads until it is lost.
async fn hold(app: &Arc<App>, conn: &Connection, stop: &mut watch::Receiver<bool>) -> Ended {
    let lock = app.names.coordinator_lock_queue();
    let channel = loop {
        let caught_up = app.core().is_caught_up();
        let wait = if caught_up {
            // Bounded: a connection the broker dropped while this process
            // was frozen may never answer.
            match tokio::time::timeout(LEASE, try_lock(conn, &lock)).await {
                Ok(Ok(Some(channel))) => break channel,
                Ok(Ok(None)) => TRY_EVERY,
                Ok(Err(e)) => return Ended::Lost(e.to_string()),
                Err(_) => return Ended::Lost("the lock connection does not answer".into()),
            }
        } else {
            // Starting: ask as soon as the replay is done.
            CATCH_UP_LOOK
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return Ended::Stopped,
        }
    };
    let epoch = app.core().leader().map_or(0, |l| l.epoch) + 1;
    let elected = Event::LeaderElected(LeaderElected {
        at_ms: now_ms(),
        epoch,
    });
    if let Err(e) = app.write_events(vec![elected]).await {
        let _ = tokio::time::timeout(CLOSE_WAIT, channel.close(200, "not elected".into())).await;
        return Ended::Lost(format!("could not write LeaderElected: {e}"));
    }
    app.leadership.lead(epoch);
    app.metrics.leader.set(1);
    app.metrics
        .leader_epoch
        .set(i64::try_from(epoch).unwrap_or(i64::MAX));
    app.metrics
        .leader_actions
        .with_label_values(&["take_over"])
        .inc();
    tracing::info!(epoch, "leading the namespace's coordinators");
    take_over(app);
    let mut tick = tokio::time::interval(CONFIRM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => {
                // Hand over at once rather than when the connection closes.
                let _ = tokio::time::timeout(
                    CLOSE_WAIT,
                    channel.queue_delete(lock.as_str().into(), QueueDeleteOptions::default()),
                )
                .await;
                return Ended::Stopped;
            }
        }
        let newer = app.core().leader().filter(|l| l.epoch > epoch).cloned();
        if let Some(l) = newer {
            return Ended::Lost(format!(
                "{} leads with epoch {} (ours: {epoch})",
                l.id, l.epoch
            ));
        }
        let passive = QueueDeclareOptions {
            passive: true,
            ..lock_options()
        };
        let confirmed = tokio::time::timeout(
            LEASE / 2,
            channel.queue_declare(lock.as_str().into(), passive, FieldTable::default()),
        )
        .await;
        match confirmed {
            Ok(Ok(_)) => app
                .leadership
                .confirmed_ms
                .store(now_ms(), Ordering::Release),
            Ok(Err(e)) => return Ended::Lost(format!("the lock is gone: {e}")),
            Err(_) => return Ended::Lost("the lock did not confirm in time".into()),
        }
    }
}

fn lock_options() -> QueueDeclareOptions {
    QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        durable: false,
        ..QueueDeclareOptions::default()
    }
}

/// Declares the lock queue on a new channel: the channel if this
/// connection now holds it, `None` if another does (`RESOURCE_LOCKED`,
/// which closes the channel).
async fn try_lock(conn: &Connection, lock: &str) -> Result<Option<Channel>, lapin::Error> {
    let channel = conn.create_channel().await?;
    match channel
        .queue_declare(lock.into(), lock_options(), FieldTable::default())
        .await
    {
        Ok(_) => Ok(Some(channel)),
        Err(e) if is_locked(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether the broker refused because another connection holds the queue.
fn is_locked(e: &lapin::Error) -> bool {
    // 405 RESOURCE_LOCKED: the channel is closed with it.
    e.to_string().contains("RESOURCE_LOCKED") || e.to_string().contains("405")
}

/// What a new leader does first: close the connections of workers that
/// died lately (the previous leader may not have), and wake the release
/// executor.
fn take_over(app: &Arc<App>) {
    let now = now_ms();
    let recent = now.saturating_sub(TAKEOVER_LOOKBACK.as_millis() as u64);
    let dead = app.core().dead_workers_since(recent);
    for worker in dead {
        tokio::spawn(super::close_connection(app.clone(), worker, 0));
    }
    app.flows.wake();
    // Rate-limit shares and prefetches its core took as sent while it
    // followed.
    {
        let mut core = app.core();
        core.resend_rate_shares();
        core.forget_asked_prefetches();
    }
    app.wake.notify_one();
}

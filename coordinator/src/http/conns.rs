//! Open HTTP connections: what each one is doing, when it must be cut, and
//! which one to shed when the connection limit is reached.
//!
//! Every accepted connection registers a [`Conn`] with the [`Tracker`]. Its
//! state is a few atomics, written where things happen (the socket's reads
//! and writes, the request handed to the router, the response body) and read
//! by the sweeper, which cuts connections past their time-outs:
//!
//! - **header time-out**: a connection that has not sent a complete request
//!   head within `header_timeout` of its accept (its first request), or of
//!   the first byte of a later request (a pipelined one too), is cut
//!   (slowloris);
//! - **idle time-out**: a kept-alive connection with no request for
//!   `idle_timeout` is cut;
//! - **stalled**: a response whose client stopped reading (nothing written
//!   and the body not asked for more for `idle_timeout`) is cut.
//!
//! A request being handled is never cut here: handlers bound their own work
//! (the broker and command time-outs, the body time-out).
//!
//! At the limit, a new connection sheds an idle one ([`pick_victim`]): one
//! that never completed a request first, then the longest idle, oldest first,
//! so a flood of idle sockets cannot lock a real client out. Only when every
//! connection is busy with a request is the new one refused.

use prometheus::{IntCounterVec, IntGauge};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// What a connection is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for a request (before the first one, or between two).
    Idle,
    /// A request is with the router (its body may still be arriving).
    Handling,
    /// The response is being written.
    Responding,
}

impl Phase {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Phase::Handling,
            2 => Phase::Responding,
            _ => Phase::Idle,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            Phase::Idle => 0,
            Phase::Handling => 1,
            Phase::Responding => 2,
        }
    }
}

/// Why the server cut a connection (the `reason` label of
/// `guildhall_http_connections_closed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// No complete request head in time.
    HeaderTimeout,
    /// Kept alive without a request for too long.
    IdleTimeout,
    /// The client stopped reading its response.
    Stalled,
    /// Closed to make room for a new connection at the limit.
    Shed,
}

impl CloseReason {
    /// Every reason, and `refused` (a connection turned away at the limit).
    pub const LABELS: [&'static str; 5] = [
        "header_timeout",
        "idle_timeout",
        "stalled",
        "shed",
        "refused",
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::HeaderTimeout => "header_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Stalled => "stalled",
            CloseReason::Shed => "shed",
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            CloseReason::HeaderTimeout => 1,
            CloseReason::IdleTimeout => 2,
            CloseReason::Stalled => 3,
            CloseReason::Shed => 4,
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(CloseReason::HeaderTimeout),
            2 => Some(CloseReason::IdleTimeout),
            3 => Some(CloseReason::Stalled),
            4 => Some(CloseReason::Shed),
            _ => None,
        }
    }
}

/// The time-outs the sweeper applies, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Longest wait for a complete request head.
    pub header_ms: u64,
    /// Longest a kept-alive connection may wait for its next request, and a
    /// response may make no progress.
    pub idle_ms: u64,
}

/// A connection's state at one moment; times are milliseconds of the
/// tracker's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// What it is doing.
    pub phase: Phase,
    /// When that phase began (the accept, for a connection's first wait).
    pub since_ms: u64,
    /// Whether a request was ever received on it.
    pub served: bool,
    /// When the first byte of the next request arrived, if it did.
    pub first_byte_ms: Option<u64>,
    /// While responding: the last write or body poll.
    pub progress_ms: u64,
}

/// Whether a connection must be cut now, and why.
pub fn verdict(s: &Snapshot, now_ms: u64, t: Timeouts) -> Option<CloseReason> {
    let past = |from: u64, limit: u64| now_ms.saturating_sub(from) > limit;
    match s.phase {
        Phase::Handling => None,
        Phase::Responding => {
            past(s.progress_ms.max(s.since_ms), t.idle_ms).then_some(CloseReason::Stalled)
        }
        // A new connection owes its first request head within the header
        // time-out of its accept, however it dribbles bytes.
        Phase::Idle if !s.served => {
            past(s.since_ms, t.header_ms).then_some(CloseReason::HeaderTimeout)
        }
        Phase::Idle => match s.first_byte_ms {
            // A later request has begun: its head must be complete in time.
            Some(first) => past(first, t.header_ms).then_some(CloseReason::HeaderTimeout),
            None => past(s.since_ms, t.idle_ms).then_some(CloseReason::IdleTimeout),
        },
    }
}

/// The order in which idle connections are shed (smallest first): those that
/// never completed a request before those kept alive, then the longest idle.
/// `None` for a connection busy with a request, which is never shed.
pub fn shed_rank(s: &Snapshot) -> Option<(bool, u64)> {
    (s.phase == Phase::Idle).then_some((s.served, s.since_ms))
}

/// The connection to shed among `conns`, if any is idle.
pub fn pick_victim<K: Copy>(conns: impl IntoIterator<Item = (K, Snapshot)>) -> Option<K> {
    conns
        .into_iter()
        .filter_map(|(k, s)| Some((shed_rank(&s)?, k)))
        .min_by_key(|(rank, _)| *rank)
        .map(|(_, k)| k)
}

/// One open connection.
#[derive(Debug)]
pub struct Conn {
    /// Its key in the tracker.
    id: u64,
    /// The tracker's clock origin, to stamp events.
    origin: Instant,
    /// [`Phase`] as a number.
    phase: AtomicU8,
    /// When the phase began.
    since_ms: AtomicU64,
    /// Whether a request was ever received.
    served: AtomicBool,
    /// First byte of the next request, read while idle or responding (0:
    /// none yet).
    first_byte_ms: AtomicU64,
    /// While responding: the last write or body poll.
    progress_ms: AtomicU64,
    /// Why it is being closed ([`CloseReason`] as a number, 0: it is not).
    close_reason: AtomicU8,
    /// Wakes the connection's task when it must close.
    close: Notify,
}

impl Conn {
    fn now(&self) -> u64 {
        clock_ms(self.origin)
    }

    /// Bytes were read from the socket: unless a request is with the
    /// router (its body), they begin the next request (read while a
    /// response is written, they are a pipelined one).
    pub fn on_read(&self) {
        if self.phase.load(Ordering::Relaxed) != Phase::Handling.as_u8()
            && self.first_byte_ms.load(Ordering::Relaxed) == 0
        {
            self.first_byte_ms.store(self.now(), Ordering::Relaxed);
        }
    }

    /// Bytes were written to the socket, or the response body was polled.
    pub fn on_progress(&self) {
        self.progress_ms.store(self.now(), Ordering::Relaxed);
    }

    /// A complete request head arrived and goes to the router.
    pub fn request_started(&self) {
        self.first_byte_ms.store(0, Ordering::Relaxed);
        self.set_phase(Phase::Handling);
        self.served.store(true, Ordering::Relaxed);
    }

    /// The router answered: the response is being written.
    pub fn response_started(&self) {
        self.on_progress();
        self.set_phase(Phase::Responding);
    }

    /// The response is written (or dropped): waiting for the next request.
    pub fn response_done(&self) {
        self.set_phase(Phase::Idle);
    }

    fn set_phase(&self, phase: Phase) {
        self.since_ms.store(self.now(), Ordering::Relaxed);
        self.phase.store(phase.as_u8(), Ordering::Relaxed);
    }

    /// The state now.
    pub fn snapshot(&self) -> Snapshot {
        let first = self.first_byte_ms.load(Ordering::Relaxed);
        Snapshot {
            phase: Phase::from_u8(self.phase.load(Ordering::Relaxed)),
            since_ms: self.since_ms.load(Ordering::Relaxed),
            served: self.served.load(Ordering::Relaxed),
            first_byte_ms: (first != 0).then_some(first),
            progress_ms: self.progress_ms.load(Ordering::Relaxed),
        }
    }

    /// Asks the connection's task to drop it; the first reason wins.
    /// Answers whether this call was the first.
    fn close(&self, reason: CloseReason) -> bool {
        let first = self
            .close_reason
            .compare_exchange(0, reason.as_u8(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            self.close.notify_one();
        }
        first
    }

    /// Resolves once the connection must close, with the reason.
    pub async fn closed(&self) -> CloseReason {
        loop {
            if let Some(r) = CloseReason::from_u8(self.close_reason.load(Ordering::Acquire)) {
                return r;
            }
            self.close.notified().await;
        }
    }
}

/// Milliseconds since `origin`, from 1 (0 means "not set" in a [`Conn`]).
fn clock_ms(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

/// The metric handles the tracker keeps current.
#[derive(Clone)]
pub struct ConnMetrics {
    /// `guildhall_http_connections`.
    pub open: IntGauge,
    /// `guildhall_http_connections_closed_total{reason}`.
    pub closed: IntCounterVec,
}

/// Every open connection.
pub struct Tracker {
    /// The clock's origin.
    origin: Instant,
    /// The time-outs.
    timeouts: Timeouts,
    /// Most connections open at once.
    max: usize,
    /// Open connections by id.
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    /// The next id.
    next_id: AtomicU64,
    /// Wakes [`Tracker::wait_empty`] when the last connection goes.
    emptied: Notify,
    /// Gauges and counters.
    metrics: ConnMetrics,
}

impl Tracker {
    /// A tracker for at most `max` connections.
    pub fn new(max: usize, header: Duration, idle: Duration, metrics: ConnMetrics) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self {
            origin: Instant::now(),
            timeouts: Timeouts {
                header_ms: ms(header),
                idle_ms: ms(idle),
            },
            max,
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            emptied: Notify::new(),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection limit.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections open now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers a new connection. At the limit, an idle one is shed first;
    /// `None` if every open connection is busy (the new one is refused).
    pub fn admit(&self) -> Option<Arc<Conn>> {
        let now = clock_ms(self.origin);
        let mut conns = self.lock();
        if conns.len() >= self.max {
            let victim = pick_victim(conns.iter().map(|(id, c)| (*id, c.snapshot())));
            let Some(victim) = victim.and_then(|id| conns.remove(&id)) else {
                self.metrics.closed.with_label_values(&["refused"]).inc();
                return None;
            };
            self.metrics.open.dec();
            if victim.close(CloseReason::Shed) {
                self.metrics.closed.with_label_values(&["shed"]).inc();
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            id,
            origin: self.origin,
            phase: AtomicU8::new(Phase::Idle.as_u8()),
            since_ms: AtomicU64::new(now),
            served: AtomicBool::new(false),
            first_byte_ms: AtomicU64::new(0),
            progress_ms: AtomicU64::new(now),
            close_reason: AtomicU8::new(0),
            close: Notify::new(),
        });
        conns.insert(id, conn.clone());
        self.metrics.open.inc();
        Some(conn)
    }

    /// Sheds the idle connection [`pick_victim`] chooses, if any: to free a
    /// file descriptor when the process has none left. Answers whether one was.
    pub fn shed_one(&self) -> bool {
        let mut conns = self.lock();
        let victim = pick_victim(conns.iter().map(|(id, c)| (*id, c.snapshot())));
        let Some(victim) = victim.and_then(|id| conns.remove(&id)) else {
            return false;
        };
        self.metrics.open.dec();
        if victim.close(CloseReason::Shed) {
            self.metrics.closed.with_label_values(&["shed"]).inc();
        }
        true
    }

    /// Forgets a connection that ended (a no-op if it was shed).
    pub fn remove(&self, conn: &Conn) {
        let mut conns = self.lock();
        if conns.remove(&conn.id).is_some() {
            self.metrics.open.dec();
        }
        if conns.is_empty() {
            self.emptied.notify_waiters();
        }
    }

    /// Cuts every connection past a time-out; answers how many.
    pub fn sweep(&self) -> usize {
        let now = clock_ms(self.origin);
        let conns = self.lock();
        let mut cut = 0;
        for conn in conns.values() {
            if let Some(reason) = verdict(&conn.snapshot(), now, self.timeouts)
                && conn.close(reason)
            {
                self.metrics
                    .closed
                    .with_label_values(&[reason.label()])
                    .inc();
                cut += 1;
            }
        }
        cut
    }

    /// How often [`Tracker::sweep`] should run: a quarter of the shortest
    /// time-out, between 50 ms and 1 s.
    pub fn sweep_period(&self) -> Duration {
        let shortest = self.timeouts.header_ms.min(self.timeouts.idle_ms) / 4;
        Duration::from_millis(shortest.clamp(50, 1_000))
    }

    /// Resolves once no connection is open.
    pub async fn wait_empty(&self) {
        loop {
            let emptied = self.emptied.notified();
            if self.is_empty() {
                return;
            }
            emptied.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        header_ms: 10_000,
        idle_ms: 60_000,
    };

    fn idle(since_ms: u64, served: bool, first_byte_ms: Option<u64>) -> Snapshot {
        Snapshot {
            phase: Phase::Idle,
            since_ms,
            served,
            first_byte_ms,
            progress_ms: since_ms,
        }
    }

    #[test]
    fn a_new_connection_owes_its_first_request_within_the_header_timeout() {
        let s = idle(1_000, false, None);
        assert_eq!(verdict(&s, 11_000, T), None);
        assert_eq!(verdict(&s, 11_001, T), Some(CloseReason::HeaderTimeout));
        // Dribbling bytes does not buy time (slowloris).
        let s = idle(1_000, false, Some(9_000));
        assert_eq!(verdict(&s, 11_001, T), Some(CloseReason::HeaderTimeout));
    }

    #[test]
    fn a_kept_alive_connection_may_idle_then_owes_a_head_from_its_first_byte() {
        let s = idle(1_000, true, None);
        assert_eq!(verdict(&s, 61_000, T), None);
        assert_eq!(verdict(&s, 61_001, T), Some(CloseReason::IdleTimeout));
        let s = idle(1_000, true, Some(50_000));
        assert_eq!(verdict(&s, 60_000, T), None);
        assert_eq!(verdict(&s, 60_001, T), Some(CloseReason::HeaderTimeout));
    }

    #[test]
    fn a_request_being_handled_is_never_cut_and_a_stalled_response_is() {
        let handling = Snapshot {
            phase: Phase::Handling,
            ..idle(0, true, None)
        };
        assert_eq!(verdict(&handling, u64::MAX, T), None);
        let responding = Snapshot {
            phase: Phase::Responding,
            since_ms: 1_000,
            progress_ms: 30_000,
            ..idle(0, true, None)
        };
        assert_eq!(verdict(&responding, 90_000, T), None);
        assert_eq!(verdict(&responding, 90_001, T), Some(CloseReason::Stalled));
    }

    #[test]
    fn shedding_takes_a_never_served_connection_first_oldest_first() {
        let busy = Snapshot {
            phase: Phase::Handling,
            ..idle(1, false, None)
        };
        let conns = [
            ("busy-oldest", busy),
            ("kept-alive-old", idle(2, true, None)),
            ("fresh-new", idle(50, false, None)),
            ("fresh-old", idle(10, false, Some(11))),
            ("fresh-newest", idle(90, false, None)),
        ];
        assert_eq!(pick_victim(conns), Some("fresh-old"));
        // Without a never-served one, the longest idle of the kept-alive.
        let conns = [
            ("busy", busy),
            ("a", idle(20, true, None)),
            ("b", idle(5, true, None)),
        ];
        assert_eq!(pick_victim(conns), Some("b"));
        // Every connection busy: nothing to shed.
        assert_eq!(pick_victim([("busy", busy)]), None);
        assert_eq!(pick_victim::<&str>([]), None);
    }

    fn tracker(max: usize) -> Tracker {
        let open = IntGauge::new("open", "open").unwrap();
        let closed =
            IntCounterVec::new(prometheus::Opts::new("closed", "closed"), &["reason"]).unwrap();
        Tracker::new(
            max,
            Duration::from_secs(10),
            Duration::from_secs(60),
            ConnMetrics { open, closed },
        )
    }

    #[tokio::test]
    async fn at_the_limit_an_idle_connection_is_shed_and_a_busy_one_never() {
        let t = tracker(2);
        let a = t.admit().unwrap();
        let b = t.admit().unwrap();
        b.request_started();
        // At the limit: `a` (idle) makes room for `c`.
        let c = t.admit().unwrap();
        assert_eq!(a.closed().await, CloseReason::Shed);
        assert_eq!(t.len(), 2);
        assert_eq!(t.metrics.closed.with_label_values(&["shed"]).get(), 1);
        // Both busy now: the next one is refused.
        c.request_started();
        assert!(t.admit().is_none());
        assert_eq!(t.metrics.closed.with_label_values(&["refused"]).get(), 1);
        // A finished response makes `c` idle, and sheddable, again.
        c.response_started();
        c.response_done();
        let _d = t.admit().unwrap();
        assert_eq!(c.closed().await, CloseReason::Shed);
        t.remove(&a);
        t.remove(&c);
        assert_eq!(t.len(), 2);
        assert_eq!(t.metrics.open.get(), 2);
    }

    #[tokio::test]
    async fn the_first_byte_of_each_request_is_stamped_and_a_body_is_not_one() {
        let t = tracker(4);
        let c = t.admit().unwrap();
        assert_eq!(c.snapshot().first_byte_ms, None);
        c.on_read();
        let first = c.snapshot().first_byte_ms.unwrap();
        c.on_read();
        assert_eq!(c.snapshot().first_byte_ms, Some(first));
        // The head is complete: its body's bytes begin nothing.
        c.request_started();
        c.on_read();
        assert_eq!(c.snapshot().first_byte_ms, None);
        c.response_started();
        c.response_done();
        let s = c.snapshot();
        assert_eq!(
            (s.phase, s.served, s.first_byte_ms),
            (Phase::Idle, true, None)
        );
        // A pipelined request begun while the response was written counts
        // from its first byte once the connection is idle again.
        c.request_started();
        c.response_started();
        c.on_read();
        c.response_done();
        assert!(c.snapshot().first_byte_ms.is_some());
        t.remove(&c);
        tokio::time::timeout(Duration::from_secs(1), t.wait_empty())
            .await
            .unwrap();
    }
}

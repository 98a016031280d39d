//! Times from the wire brought into a plausible range before they are used.
//!
//! Event times come from agents' clocks and producers' AMQP timestamps. A
//! broken or hostile one (a `timestamp` of 2^62 seconds, multiplied by 1000
//! and wrapped) must not become a stage's mean wait of 49 days or a
//! duration that overflows. A time outside [`MAX_PAST_MS`] before the
//! coordinator's clock to [`MAX_FUTURE_MS`] after it is **saturated**: a
//! required time becomes the coordinator's now, an optional one (enqueued,
//! submitted) is dropped, and each is counted in
//! `guildhall_events_clamped_total{field="time"}`. A retry delay is capped
//! at [`MAX_PAST_MS`] the same way.

use guildhall_proto::Event;

/// Oldest time taken: more than a stream's retention, and more than any
/// task waits in a queue.
pub const MAX_PAST_MS: u64 = 400 * 24 * 3_600_000;

/// Farthest ahead of the coordinator's clock a time may be (clock skew).
pub const MAX_FUTURE_MS: u64 = 24 * 3_600_000;

/// The plausible range of times at `now_ms`.
#[derive(Debug, Clone, Copy)]
struct Range {
    /// Earliest plausible time.
    low: u64,
    /// Latest plausible time.
    high: u64,
    /// The coordinator's now, which replaces a required time out of range.
    now: u64,
}

impl Range {
    fn at(now_ms: u64) -> Self {
        Self {
            low: now_ms.saturating_sub(MAX_PAST_MS),
            high: now_ms.saturating_add(MAX_FUTURE_MS),
            now: now_ms,
        }
    }

    fn fits(&self, t: u64) -> bool {
        (self.low..=self.high).contains(&t)
    }

    /// A required time: kept if plausible, else now (counted in `n`).
    fn required(&self, t: &mut u64, n: &mut u32) {
        if !self.fits(*t) {
            *t = self.now;
            *n += 1;
        }
    }

    /// An optional time: kept if plausible, else dropped (counted in `n`).
    fn optional(&self, t: &mut Option<u64>, n: &mut u32) {
        if t.is_some_and(|v| !self.fits(v)) {
            *t = None;
            *n += 1;
        }
    }
}

/// Brings every time in `event` into the plausible range at `now_ms`;
/// returns how many it had to change.
pub fn clamp_times(event: &mut Event, now_ms: u64) -> u32 {
    let r = Range::at(now_ms);
    let mut n = 0;
    match event {
        Event::Hello(e) => r.required(&mut e.at_ms, &mut n),
        Event::Heartbeat(e) => {
            r.required(&mut e.at_ms, &mut n);
            for t in &mut e.in_hand {
                r.required(&mut t.started_at_ms, &mut n);
            }
        }
        Event::TaskSubmitted(e) => r.required(&mut e.at_ms, &mut n),
        Event::TaskStarted(e) => {
            r.required(&mut e.at_ms, &mut n);
            r.optional(&mut e.enqueued_at_ms, &mut n);
            r.optional(&mut e.submitted_at_ms, &mut n);
        }
        Event::TaskProgress(e) => r.required(&mut e.at_ms, &mut n),
        Event::TaskSucceeded(e) => {
            r.required(&mut e.at_ms, &mut n);
            r.required(&mut e.started_at_ms, &mut n);
            r.optional(&mut e.submitted_at_ms, &mut n);
        }
        Event::TaskFailed(e) => {
            r.required(&mut e.at_ms, &mut n);
            r.required(&mut e.started_at_ms, &mut n);
        }
        Event::TaskRetrying(e) => {
            r.required(&mut e.at_ms, &mut n);
            if e.delay_ms > MAX_PAST_MS {
                e.delay_ms = MAX_PAST_MS;
                n += 1;
            }
        }
        Event::TaskDeadLettered(e) => r.required(&mut e.at_ms, &mut n),
        Event::WorkerExited(e) => r.required(&mut e.at_ms, &mut n),
        Event::AgentStopping(e) => r.required(&mut e.at_ms, &mut n),
        Event::TaskAbandoned(e) => {
            r.required(&mut e.at_ms, &mut n);
            r.required(&mut e.started_at_ms, &mut n);
        }
        Event::Reassigned(e) => r.required(&mut e.at_ms, &mut n),
        Event::DeliveryRejected(e) => r.required(&mut e.at_ms, &mut n),
        Event::TaskQueued(e) => {
            r.required(&mut e.at_ms, &mut n);
            // A priority is 0-9; a forged byte past 9 counts as 9.
            if e.priority.get() > guildhall_proto::schedule::MAX_PRIORITY {
                e.priority = guildhall_proto::schedule::Priority::new(
                    guildhall_proto::schedule::MAX_PRIORITY,
                )
                .unwrap_or_default();
                n += 1;
            }
            // A due time may be up to the ladder's longest delay ahead.
            if let Some(due) = &mut e.due_at_ms {
                let latest = e
                    .at_ms
                    .saturating_add(guildhall_proto::schedule::MAX_DELAY_MS);
                if *due > latest {
                    *due = latest;
                    n += 1;
                }
            }
        }
        Event::TaskCancelled(e) => r.required(&mut e.at_ms, &mut n),
        Event::TaskHeld(e) => {
            r.required(&mut e.at_ms, &mut n);
            clamp_priority(&mut e.priority, &mut n);
        }
        Event::TaskFannedOut(e) => {
            r.required(&mut e.at_ms, &mut n);
            clamp_priority(&mut e.priority, &mut n);
        }
        Event::TaskResult(e) => r.required(&mut e.at_ms, &mut n),
        // The coordinator's own: its time is read as written.
        Event::TaskCancelRequested(_)
        | Event::ScheduleChanged(_)
        | Event::ScheduleFired(_)
        | Event::RateLimitSet(_)
        | Event::TaskReleased(_)
        | Event::LeaderElected(_)
        | Event::Marker(_) => {}
    }
    n
}

/// A priority is 0-9; a forged byte past 9 counts as 9.
fn clamp_priority(p: &mut guildhall_proto::Priority, n: &mut u32) {
    if p.get() > guildhall_proto::schedule::MAX_PRIORITY {
        *p = guildhall_proto::Priority::new(guildhall_proto::schedule::MAX_PRIORITY)
            .unwrap_or_default();
        *n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guildhall_proto::{TaskRetrying, TaskStarted};

    const NOW: u64 = 1_700_000_000_000;

    fn started(at_ms: u64, enqueued: Option<u64>) -> Event {
        Event::TaskStarted(TaskStarted {
            at_ms,
            task_id: "t".parse().unwrap(),
            stage: "s".parse().unwrap(),
            attempt: 1,
            enqueued_at_ms: enqueued,
            submitted_at_ms: enqueued,
            redelivered: false,
        })
    }

    #[test]
    fn plausible_times_are_kept() {
        let mut e = started(NOW - 5, Some(NOW - 3_600_000));
        assert_eq!(clamp_times(&mut e, NOW), 0);
        assert_eq!(e, started(NOW - 5, Some(NOW - 3_600_000)));
    }

    #[test]
    fn a_wrapped_amqp_timestamp_is_dropped_and_counted() {
        // 2^62 s x 1000, wrapped: what a producer's timestamp of 2^62 gave.
        let wrapped = (1u64 << 62).wrapping_mul(1000);
        let mut e = started(NOW, Some(wrapped));
        assert_eq!(clamp_times(&mut e, NOW), 2, "enqueued and submitted");
        assert_eq!(e, started(NOW, None));
        // Saturated instead of wrapped, it is as implausible.
        let mut e = started(NOW, Some(u64::MAX));
        assert_eq!(clamp_times(&mut e, NOW), 2);
    }

    #[test]
    fn a_required_time_out_of_range_becomes_now() {
        let mut e = started(u64::MAX, None);
        assert_eq!(clamp_times(&mut e, NOW), 1);
        assert_eq!(e, started(NOW, None));
        let mut e = started(0, None);
        assert_eq!(clamp_times(&mut e, NOW), 1);
        assert_eq!(e, started(NOW, None));
    }

    #[test]
    fn a_retry_delay_is_capped() {
        let mut e = Event::TaskRetrying(TaskRetrying {
            at_ms: NOW,
            task_id: "t".parse().unwrap(),
            stage: "s".parse().unwrap(),
            attempt: 1,
            delay_ms: u64::MAX,
        });
        assert_eq!(clamp_times(&mut e, NOW), 1);
        let Event::TaskRetrying(r) = e else {
            unreachable!()
        };
        assert_eq!(r.delay_ms, MAX_PAST_MS);
    }
}

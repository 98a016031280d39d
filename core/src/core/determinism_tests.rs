//! Deterministic output: one recorded input sequence (agents on three
//! stages, flexible agents the planner moves and sizes, tasks that succeed,
//! fail, retry, are dead-lettered, abandoned and rejected, a worker that
//! dies holding tasks, a duplicate batch, an unreadable message, the
//! stream consumer lost and back, queue polls, scrapes and snapshots;
//! and issue 18's inputs: a rate limit split between two agents, tasks
//! with priorities and a due time, a cron schedule firing, cancel requests
//! decided, recorded, forged and settled, band queue polls) fed
//! twice, through two fresh cores, gives the same outputs in the same
//! order: notices, deadlines, views, per-worker rows, every metric handed
//! over, and snapshot bytes. The workers table is a `HashMap` whose order
//! differs between two maps even in one process, so an output that walks
//! it unsorted fails here.

use super::scheduling::queued::StageQueues;
use super::scheduling::schedules::tick_task_id;
use super::stages::QueueStats;
use super::telemetry::Recorder;
use super::test_support::{Sim, T0, st, tid};
use super::*;
use guildhall_proto::*;

/// One input to the core, as the runtime would give it.
#[derive(Debug, Clone)]
enum Input {
    /// An envelope read from the stream at an offset.
    Envelope {
        now: u64,
        envelope: Envelope,
        offset: u64,
    },
    /// The runtime's timer fired.
    Timeout(u64),
    /// A queue poll's counts.
    Queue {
        now: u64,
        stage: &'static str,
        ready: u64,
        consumers: u64,
    },
    /// A poll of a stage's intake and band queues.
    StageQueues {
        now: u64,
        stage: &'static str,
        queues: StageQueues,
    },
    /// A cancel request decided (the API, before its event is written).
    Cancel { now: u64, ids: Vec<TaskId> },
    /// A stream message that could not be decoded.
    Unreadable { offset: u64 },
    /// The stream consumer disconnected or reconnected.
    Listening { now: u64, on: bool },
    /// A `/metrics` scrape.
    Scrape(u64),
    /// A snapshot written.
    Snapshot(u64),
}

/// Build stage agents (with round trips, so prefetch is sized), test and
/// report agents, and flexible ones the planner may move.
const AGENTS: [(&str, &str, &[&str], Option<u32>); 8] = [
    ("b1", "build", &["build"], Some(20)),
    ("b2", "build", &["build"], Some(30)),
    ("b3", "build", &["build"], Some(40)),
    ("t1", "test", &["test"], Some(25)),
    ("t2", "test", &["test"], Some(35)),
    ("r1", "report", &["report"], Some(15)),
    ("flex1", "report", &["build", "test", "report"], Some(10)),
    ("flex2", "report", &["build", "test", "report"], Some(12)),
];

/// Records the inputs: the scenario uses a driver's clock and event
/// constructors only (its core is never fed).
struct Script {
    /// Clock and event constructors.
    b: Sim,
    /// The inputs so far.
    inputs: Vec<Input>,
    /// Batch numbers per sender.
    seqs: std::collections::BTreeMap<String, u64>,
    /// Stream offset of the last message.
    offset: u64,
}

impl Script {
    fn send(&mut self, sender: &str, events: Vec<Event>) {
        let seq = self.seqs.entry(sender.to_owned()).or_insert(0);
        *seq += 1;
        let seq = *seq;
        self.resend(sender, seq, events);
    }

    fn resend(&mut self, sender: &str, seq: u64, events: Vec<Event>) {
        self.offset += 1;
        self.inputs.push(Input::Envelope {
            now: self.b.now,
            envelope: Envelope {
                sender: sender.parse().expect("valid id"),
                incarnation: 1,
                seq,
                sent_at_ms: self.b.now.saturating_sub(3),
                events,
            },
            offset: self.offset,
        });
    }

    fn tick(&mut self, ms: u64) {
        self.b.now += ms;
        self.inputs.push(Input::Timeout(self.b.now));
    }

    fn heartbeat(&self, id: &str, stage: &str, rtt: Option<u32>, in_hand: &[&str]) -> Event {
        let mut e = self.b.heartbeat(stage, AgentState::Processing, in_hand);
        if let Event::Heartbeat(h) = &mut e {
            h.rtt_ms = rtt;
            h.concurrency = 2;
            h.hostname = format!("host-{id}");
        }
        e
    }
}

/// The recorded input sequence: about three minutes of a busy pipeline.
fn script() -> Vec<Input> {
    let mut s = Script {
        b: Sim::new(),
        inputs: Vec::new(),
        seqs: Default::default(),
        offset: 0,
    };
    for (id, stage, stages, _) in AGENTS {
        let ev = vec![s.b.hello(stage, stages, 2)];
        s.send(id, ev);
    }
    let pipeline = |stage: &str| match stage {
        "build" => Some("test"),
        "test" => Some("report"),
        _ => None,
    };
    let mut task = 0;
    for second in 0..180u64 {
        // Every agent heartbeats, but b3 after 60 s: it dies holding tasks.
        for (id, stage, _, rtt) in AGENTS {
            if id == "b3" && second >= 60 {
                continue;
            }
            let held: &[&str] = if id == "b3" { &["H1", "H2"] } else { &[] };
            let hb = s.heartbeat(id, stage, rtt, held);
            s.send(id, vec![hb]);
        }
        issue_18(&mut s, second);
        // Six tasks a second through build, test, report.
        for _ in 0..6 {
            task += 1;
            let t = format!("T{task}");
            let mut ev = vec![s.b.submitted(&t, "build")];
            if task % 7 == 0 {
                // Some with a priority of their own.
                ev.push(s.b.queued(&t, "build", (task % 10) as u8, None));
            }
            s.send("producer", ev);
            for (i, stage) in ["build", "test", "report"].into_iter().enumerate() {
                let worker = match stage {
                    "build" => ["b1", "b2"][task % 2],
                    "test" => ["t1", "t2"][task % 2],
                    _ => ["r1", "flex1", "flex2"][task % 3],
                };
                let start = s.b.now;
                let mut ev = vec![s.b.started(&t, stage, 1, start.saturating_sub(5))];
                if task % 17 == 0 && i == 1 {
                    // Fails once at test, retried.
                    ev.push(s.b.failed(&t, stage, 1, start, true));
                    ev.push(Event::TaskRetrying(TaskRetrying {
                        at_ms: start,
                        task_id: tid(&t),
                        stage: st(stage),
                        attempt: 1,
                        delay_ms: 100,
                    }));
                    ev.push(s.b.started(&t, stage, 2, start));
                    ev.push(s.b.succeeded(&t, stage, 2, start, pipeline(stage)));
                } else if task % 41 == 0 && i == 0 {
                    // Fails for good at build.
                    ev.push(s.b.failed(&t, stage, 1, start, false));
                    ev.push(Event::TaskDeadLettered(TaskDeadLettered {
                        at_ms: start,
                        task_id: tid(&t),
                        stage: st(stage),
                        attempt: 1,
                        error: "HTTP 422: bad input".into(),
                    }));
                    s.send(worker, ev);
                    break;
                } else if task % 53 == 0 && i == 2 {
                    // The worker process died under it.
                    ev.push(Event::TaskAbandoned(TaskAbandoned {
                        at_ms: start,
                        task_id: tid(&t),
                        stage: st(stage),
                        attempt: 1,
                        started_at_ms: start,
                        reason: "worker process exited (exit code 2)".into(),
                        result: WorkerResult::Unfinished,
                    }));
                } else {
                    ev.push(s.b.succeeded(&t, stage, 1, start, pipeline(stage)));
                }
                s.send(worker, ev);
            }
        }
        if second == 30 {
            let ev = vec![Event::DeliveryRejected(DeliveryRejected {
                at_ms: s.b.now,
                stage: st("build"),
                reason: RejectReason::InvalidMessageId,
                detail: "message_id 'x'".into(),
                dead_lettered: true,
            })];
            s.send("b1", ev);
            // A batch resent after a lost confirm.
            let seq = s.seqs["b1"];
            let hb = s.heartbeat("b1", "build", Some(20), &[]);
            s.resend("b1", seq, vec![hb]);
            s.offset += 1;
            s.inputs.push(Input::Unreadable { offset: s.offset });
        }
        if second == 90 {
            // flex1 carries out a move to build.
            let ev = vec![Event::Reassigned(Reassigned {
                at_ms: s.b.now,
                from: st("report"),
                to: st("build"),
                reason: "rebalance".into(),
            })];
            s.send("flex1", ev);
        }
        if second == 100 {
            s.inputs.push(Input::Listening {
                now: s.b.now,
                on: false,
            });
        }
        if second == 104 {
            s.inputs.push(Input::Listening {
                now: s.b.now,
                on: true,
            });
        }
        if second % 5 == 0 {
            for (stage, ready) in [("build", 40 - second / 5), ("test", 3), ("report", 0)] {
                s.inputs.push(Input::Queue {
                    now: s.b.now,
                    stage,
                    ready,
                    consumers: 2,
                });
            }
        }
        if second % 20 == 0 {
            s.inputs.push(Input::Scrape(s.b.now));
        }
        if second % 60 == 59 {
            s.inputs.push(Input::Snapshot(s.b.now));
        }
        s.tick(1_000);
    }
    s.inputs
}

/// The schedule the script sets (every 10 s, on the report stage).
const SCHEDULE: &str = "tick";

/// Issue 18's inputs at `second` of the script: a rate limit on `test`
/// (split between t1 and t2), a cron schedule the coordinator fires (its
/// `ScheduleFired` written a little after each tick, as the runtime does),
/// a task held in the delay ladder that comes due and runs, cancel
/// requests (decided, recorded, forged, settled by an agent), and polls of
/// the band queues.
fn issue_18(s: &mut Script, second: u64) {
    let coord = "coordinator-1";
    match second {
        1 => {
            let ev = vec![Event::RateLimitSet(RateLimitSet {
                at_ms: s.b.now,
                stage: st("test"),
                limit: Some("40/s".parse().expect("a valid rate")),
                by: "flag".into(),
            })];
            s.send(coord, ev);
        }
        2 => {
            let spec = ScheduleSpec {
                cron: "*/10 * * * * *".into(),
                timezone: "UTC".into(),
                stage: st("report"),
                payload: b"{}".to_vec(),
                priority: Priority::new(6).expect("a priority"),
                missed: Missed::Skip,
                paused: false,
            };
            let ev = vec![Event::ScheduleChanged(Box::new(ScheduleChanged {
                at_ms: s.b.now,
                name: st(SCHEDULE),
                spec: Some(spec),
                by: "api".into(),
            }))];
            s.send(coord, ev);
        }
        5 => {
            // Held in the delay ladder for 35 s, high priority.
            let due = s.b.now + 35_000;
            let ev = vec![
                s.b.submitted("D1", "build"),
                s.b.queued("D1", "build", 8, Some(due)),
            ];
            s.send("producer", ev);
        }
        41 => {
            let start = s.b.now;
            let ev = vec![
                s.b.started("D1", "build", 1, start - 1_000),
                s.b.succeeded("D1", "build", 1, start, None),
            ];
            s.send("b1", ev);
        }
        48 => {
            let ev = vec![s.b.submitted("C1", "build"), s.b.submitted("C2", "build")];
            s.send("producer", ev);
        }
        50 => {
            s.inputs.push(Input::Cancel {
                now: s.b.now,
                ids: vec![tid("C1"), tid("C2"), tid("T5"), tid("nope")],
            });
            let request = |by: &str, id: &str| {
                Event::TaskCancelRequested(TaskCancelRequested {
                    at_ms: s.b.now,
                    task_id: tid(id),
                    by: by.into(),
                })
            };
            let ev = vec![request("alice", "C1"), request("alice", "C2")];
            let forged = vec![request("mallory", "T9")];
            s.send(coord, ev);
            s.send("producer", forged);
        }
        52 => {
            let ev = vec![Event::TaskCancelled(TaskCancelled {
                at_ms: s.b.now,
                task_id: tid("C1"),
                stage: st("build"),
                attempt: 1,
                point: CancelPoint::Queued,
            })];
            s.send("b1", ev);
        }
        _ => {}
    }
    // The runtime writes each tick's ScheduleFired (then its task).
    if second >= 13 && second % 10 == 3 {
        let tick_ms = T0 + (second / 10) * 10_000;
        let ev = vec![Event::ScheduleFired(ScheduleFired {
            at_ms: s.b.now,
            name: st(SCHEDULE),
            tick_ms,
            task_id: tick_task_id(&st(SCHEDULE), tick_ms),
        })];
        s.send(coord, ev);
    }
    if second % 5 == 2 {
        for (stage, ready) in [("build", second % 7), ("test", 2)] {
            let q = |ready| {
                Some(QueueStats {
                    ready,
                    unacked: Some(1),
                    consumers: 2,
                })
            };
            s.inputs.push(Input::StageQueues {
                now: s.b.now,
                stage,
                queues: StageQueues {
                    intake: q(1),
                    bands: [q(ready), q(0), q(ready / 2)],
                },
            });
        }
    }
}

/// Feeds `inputs` to a fresh core; every output, in order, as text, and
/// every snapshot's bytes.
fn run(inputs: &[Input]) -> (Vec<String>, Vec<Vec<u8>>, Recorder) {
    let recorder = Recorder::new(true);
    let config = CoreConfig {
        sync_period_ms: 15_000,
        min_dwell_ms: 30_000,
        ..CoreConfig::default()
    };
    let mut core = Core::new(config, recorder.clone(), T0);
    core.set_caught_up(T0);
    let ns = Namespace::new("det").expect("valid namespace");
    let (mut out, mut snapshots) = (Vec::new(), Vec::new());
    for input in inputs {
        match input.clone() {
            Input::Envelope {
                now,
                envelope,
                offset,
            } => core.handle_envelope(
                now,
                Decoded {
                    envelope,
                    skipped: 0,
                },
                Some(offset),
            ),
            Input::Timeout(now) => core.handle_timeout(now),
            Input::Queue {
                now,
                stage,
                ready,
                consumers,
            } => core.handle_queue_stats(
                now,
                &st(stage),
                QueueStats {
                    ready,
                    unacked: Some(1),
                    consumers,
                },
            ),
            Input::StageQueues { now, stage, queues } => {
                core.handle_stage_queues(now, &st(stage), queues)
            }
            Input::Cancel { now, ids } => out.push(format!("cancel {:?}", core.cancel(now, &ids))),
            Input::Unreadable { offset } => core.handle_unreadable("unparsable", Some(offset)),
            Input::Listening { now, on } => core.set_listening(now, on),
            Input::Scrape(now) => {
                core.export_worker_counters();
                core.refresh_metrics(now);
                out.push(format!("rows {:?}", core.worker_series()));
                out.push(format!("workers {:?}", core.workers_view(now)));
                out.push(format!("stages {:?}", core.stages_view(now)));
                out.push(format!("scaling {:?}", core.scaling_view(now)));
                out.push(format!("limits {:?}", core.rate_limits_view(now)));
                out.push(format!("schedules {:?}", core.schedules(now)));
                out.push(format!("cancel {:?}", core.cancel_view("C1")));
            }
            Input::Snapshot(now) => {
                snapshots.push(core.encode_snapshot(&ns, now).expect("the state encodes"));
            }
        }
        out.push(format!("timeout {:?}", core.poll_timeout()));
        while let Some(n) = core.poll_notice() {
            out.push(format!("notice {n:?}"));
        }
    }
    (out, snapshots, recorder)
}

#[test]
fn one_input_sequence_twice_gives_the_same_outputs_in_the_same_order() {
    let inputs = script();
    let (out_a, snaps_a, rec_a) = run(&inputs);
    let (out_b, snaps_b, rec_b) = run(&inputs);
    // The scenario does what it says: the outputs worth comparing exist.
    let has = |what: &str| out_a.iter().any(|o| o.starts_with(what));
    assert!(has("notice WorkerDead"), "b3 dies");
    assert!(has("notice SetPrefetch"), "prefetch is sized");
    assert!(has("notice TaskDeadLettered"));
    assert!(has("notice ErrorClassNew"));
    assert!(has("notice SetRateLimit"), "the limit is split");
    assert!(has("notice FireTick"), "the schedule fires");
    assert!(has("cancel [Requested"), "cancels are decided");
    let prefetch_asks = out_a
        .iter()
        .filter(|o| o.starts_with("notice SetPrefetch"))
        .count();
    assert!(prefetch_asks >= 3, "several agents asked at once");
    assert_eq!(snaps_a.len(), 3);
    for (i, (a, b)) in out_a.iter().zip(&out_b).enumerate() {
        assert_eq!(a, b, "output {i} differs");
    }
    assert_eq!(out_a.len(), out_b.len());
    assert!(snaps_a == snaps_b, "snapshot bytes differ");
    let (log_a, log_b) = (rec_a.recorded(), rec_b.recorded());
    assert!(log_a.log.len() > 1_000, "metrics were handed over");
    for (i, (a, b)) in log_a.log.iter().zip(&log_b.log).enumerate() {
        assert_eq!(a, b, "metric call {i} differs");
    }
    assert_eq!(log_a, log_b);
}

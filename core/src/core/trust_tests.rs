//! What the core believes, on virtual time: a deaf coordinator judges no
//! one, and forged batches (jumps, stops, restarts, intervals, times) do no
//! lasting harm.

use super::telemetry::Count;
use super::test_support::{Sim, T0, aid};
use super::*;
use guildhall_proto::*;

/// The nonce of the simulated coordinator's marker (its echo).
const NONCE: u64 = 0xec40;

/// Echo interval of the simulated runtime.
const ECHO_MS: u64 = 250;

/// A core that needs its echoes, caught up and hearing itself at `T0`.
fn with_echoes() -> Sim {
    let mut sim = Sim::with(CoreConfig {
        marker_nonce: Some(NONCE),
        echo_interval_ms: Some(ECHO_MS),
        ..CoreConfig::default()
    });
    echo(&mut sim);
    sim
}

/// The runtime's echo, written now and read back now.
fn echo(sim: &mut Sim) {
    let now = sim.now;
    sim.send(
        "coordinator-1",
        vec![Event::Marker(Marker {
            at_ms: now,
            nonce: NONCE,
        })],
    );
}

/// Runs `ms` of virtual time with the runtime's echoes read back every
/// [`ECHO_MS`], and `w1` heartbeating every second if `w1_alive`.
fn run(sim: &mut Sim, ms: u64, w1_alive: bool) {
    let end = sim.now + ms;
    while sim.now < end {
        sim.advance(ECHO_MS);
        echo(sim);
        if w1_alive && (sim.now - T0).is_multiple_of(1_000) {
            let hb = sim.heartbeat("build", AgentState::Idle, &[]);
            sim.send("w1", vec![hb]);
        }
    }
}

fn dead_notices(sim: &mut Sim) -> Vec<String> {
    sim.notices()
        .into_iter()
        .filter_map(|n| match n {
            Notice::WorkerDead { worker, .. } => Some(worker.to_string()),
            _ => None,
        })
        .collect()
}

/// Sends `events` as `sender` with a header of the test's choosing.
fn forge(sim: &mut Sim, sender: &str, incarnation: u64, seq: u64, events: Vec<Event>) {
    let now = sim.now;
    sim.core.handle_envelope(
        now,
        Decoded {
            envelope: Envelope {
                sender: aid(sender),
                incarnation,
                seq,
                sent_at_ms: now,
                events,
            },
            skipped: 0,
        },
        None,
    );
}

/// Whether the core last said it hears the fleet (it says so on a change;
/// the runtime's gauge starts at 1).
fn listening(sim: &Sim) -> bool {
    sim.recorder
        .recorded()
        .gauges
        .get("Listening")
        .is_none_or(|g| g == "Listening(true)")
}

/// The total of a counter the core handed over.
fn counted(sim: &Sim, count: Count<'_>) -> u64 {
    sim.recorder.count_of(count)
}

fn stopping() -> Event {
    Event::AgentStopping(AgentStopping {
        at_ms: T0,
        reason: "forged".into(),
    })
}

#[test]
fn a_deaf_coordinator_judges_no_one() {
    let mut sim = with_echoes();
    run(&mut sim, 5_000, true);
    assert_eq!(sim.worker("w1").status, "idle");
    assert!(listening(&sim));

    // The stream consumer stalls: no heartbeat, no echo, for 30 s. The
    // worker is silent to the core, but so is the core's own echo.
    sim.advance(30_000);
    assert!(dead_notices(&mut sim).is_empty(), "judged while deaf");
    assert_ne!(sim.worker("w1").status, "dead");
    assert!(!listening(&sim));

    // The stream flows again: the worker was alive all along.
    run(&mut sim, 10_000, true);
    assert!(dead_notices(&mut sim).is_empty());
    assert_eq!(sim.worker("w1").status, "idle");
    assert!(listening(&sim));

    // Now it really goes silent while the core hears itself: dead, within
    // 3 heartbeat intervals plus an echo.
    run(&mut sim, 2_900, false);
    assert!(dead_notices(&mut sim).is_empty(), "not yet");
    run(&mut sim, 1_000, false);
    assert_eq!(dead_notices(&mut sim), vec!["w1"]);
}

#[test]
fn a_verdict_waits_for_an_echo_written_after_the_deadline() {
    let mut sim = with_echoes();
    run(&mut sim, 2_000, true);
    let silent_from = sim.now;
    // Echoes keep coming but lag: each is read 600 ms after it is
    // written, so the core reads past the worker's deadline late.
    let mut written = Vec::new();
    while sim.now < silent_from + 3_500 {
        sim.advance(ECHO_MS);
        written.push(sim.now);
        let now = sim.now;
        for at in written.iter().filter(|&&w| w + 600 <= now) {
            sim.send(
                "coordinator-1",
                vec![Event::Marker(Marker {
                    at_ms: *at,
                    nonce: NONCE,
                })],
            );
        }
        written.retain(|&w| w + 600 > now);
    }
    // The deadline (silent_from + 3 s) passed 500 ms ago, but the newest
    // echo read was written before it.
    assert!(dead_notices(&mut sim).is_empty());
    run(&mut sim, 500, false);
    assert_eq!(dead_notices(&mut sim), vec!["w1"]);
}

#[test]
fn silence_while_the_consumer_was_disconnected_is_not_the_workers() {
    let mut sim = Sim::new();
    let hb = sim.heartbeat("build", AgentState::Idle, &[]);
    sim.send("w1", vec![hb]);
    sim.core.set_listening(sim.now, false);
    sim.advance(20_000);
    assert!(
        dead_notices(&mut sim).is_empty(),
        "judged while disconnected"
    );
    assert!(!listening(&sim));
    // Reconnected: silence counts from now.
    sim.core.set_listening(sim.now, true);
    sim.advance(2_500);
    assert!(
        dead_notices(&mut sim).is_empty(),
        "too soon after reconnecting"
    );
    sim.advance(1_000);
    assert_eq!(dead_notices(&mut sim), vec!["w1"]);
}

#[test]
fn a_forged_jump_does_not_blind_a_real_agent_even_across_a_restart() {
    let mut sim = Sim::new();
    for _ in 0..5 {
        let hb = sim.heartbeat("build", AgentState::Idle, &[]);
        sim.send("w1", vec![hb]);
    }
    // envelope('w1', seq=10**15, [AgentStopping]) in the agent's own run.
    forge(&mut sim, "w1", 1, 1_000_000_000_000_000, vec![stopping()]);
    assert_eq!(counted(&sim, Count::Malformed { reason: "seq_jump" }), 1);
    assert_eq!(sim.worker("w1").status, "idle", "the stop was not applied");
    // The agent's next real batches are applied.
    let e = sim.started("T1", "build", 1, T0);
    sim.send("w1", vec![e]);
    assert_eq!(sim.worker("w1").status, "processing");

    // Across a coordinator restart (snapshot, restore): the same.
    let mut sim = sim.resume(CoreConfig::default());
    sim.core.set_caught_up(sim.now);
    forge(&mut sim, "w1", 1, 1_000_000_000_000_001, vec![stopping()]);
    let hb = sim.heartbeat("build", AgentState::Processing, &["T1"]);
    sim.send("w1", vec![hb]);
    assert_eq!(sim.worker("w1").status, "processing");
}

#[test]
fn a_forged_stop_is_undone_by_the_agent_at_work() {
    let mut sim = Sim::new();
    let hb = sim.heartbeat("build", AgentState::Idle, &[]);
    sim.send("w1", vec![hb]);
    // A forger who read the stream uses the agent's run and next number.
    forge(&mut sim, "w1", 1, 2, vec![stopping()]);
    assert_eq!(sim.worker("w1").status, "stopped");
    // The agent's own batch 2 is now a "repeat"; its batch 3 shows it at work.
    sim.seqs.insert("w1".into(), 2);
    let hb = sim.heartbeat("build", AgentState::Idle, &[]);
    sim.send("w1", vec![hb]);
    assert_eq!(sim.worker("w1").status, "idle");
    // A real stop is not undone by what the agent sends while stopping.
    let real_stop = stopping();
    sim.send("w1", vec![real_stop]);
    sim.send(
        "w1",
        vec![Event::WorkerExited(WorkerExited {
            at_ms: sim.now,
            pid: 1,
            code: Some(0),
            signal: None,
            restarts: 0,
            restart_in_ms: None,
        })],
    );
    assert_eq!(sim.worker("w1").status, "stopped");
}

fn hello(sim: &Sim, heartbeat_ms: u32) -> Event {
    let mut e = sim.hello("build", &["build"], 1);
    if let Event::Hello(h) = &mut e {
        h.heartbeat_ms = heartbeat_ms;
        h.version = "forged".into();
        h.hostname = "forger".into();
        h.pid = 666;
    }
    e
}

#[test]
fn a_forged_restart_blinds_no_one_and_shows_as_a_conflict() {
    let mut sim = with_echoes();
    run(&mut sim, 3_000, true);
    // A forged restart: a Hello of a run of its own, with a 1 ms interval,
    // then a stop.
    let h = hello(&sim, 1);
    forge(&mut sim, "w1", 666, 1, vec![h, stopping()]);
    assert_eq!(sim.worker("w1").status, "stopped");
    // The real agent's next heartbeat, in its own run: applied (alive
    // again), and two runs under one id are counted.
    run(&mut sim, 1_000, true);
    assert_eq!(sim.worker("w1").status, "idle");
    assert_eq!(counted(&sim, Count::SenderConflict), 1);
    // Forged heartbeats of yet other runs, without a Hello: refused.
    for forged in 1_000..1_010 {
        let hb = sim.heartbeat("build", AgentState::Idle, &[]);
        forge(&mut sim, "w1", forged, 2, vec![hb]);
    }
    assert_eq!(
        counted(
            &sim,
            Count::Malformed {
                reason: "incarnation"
            }
        ),
        10
    );
    // Nobody was judged dead on the forged 1 ms interval.
    run(&mut sim, 10_000, true);
    assert!(dead_notices(&mut sim).is_empty());
    assert_eq!(sim.worker("w1").status, "idle");
}

#[test]
fn forged_short_intervals_do_not_make_a_healthy_agent_flap() {
    let mut sim = with_echoes();
    run(&mut sim, 2_000, true);
    // For 30 s a forger who read the stream sends, between the agent's
    // heartbeats, heartbeats in its run saying the interval is 1 ms.
    let mut seq = 1_000;
    for _ in 0..30 {
        run(&mut sim, 500, true);
        let mut hb = sim.heartbeat("build", AgentState::Idle, &[]);
        if let Event::Heartbeat(h) = &mut hb {
            h.heartbeat_ms = 1;
        }
        seq += 1;
        forge(&mut sim, "w1", 1, seq, vec![hb]);
        run(&mut sim, 500, true);
    }
    assert!(dead_notices(&mut sim).is_empty(), "flapped");
    assert_eq!(sim.worker("w1").status, "idle");
    assert_eq!(
        counted(
            &sim,
            Count::Clamped {
                field: "heartbeat_interval"
            }
        ),
        30
    );
}

#[test]
fn an_implausible_enqueue_time_is_dropped_and_counted() {
    let mut sim = Sim::new();
    // A producer's AMQP timestamp of 2^62 s, multiplied by 1000 and wrapped.
    let wrapped = (1u64 << 62).wrapping_mul(1000);
    let e = sim.started("T1", "build", 1, wrapped);
    sim.send("w1", vec![e]);
    assert_eq!(counted(&sim, Count::Clamped { field: "time" }), 1);
    // No queue wait was made up from it (the start itself counts).
    assert_eq!(sim.recorder.buffered(Some("build"), "started"), 1);
    assert_eq!(sim.recorder.buffered(Some("build"), "queue_waits"), 0);
}

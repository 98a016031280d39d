//! Cron schedules on virtual time: each tick once, missed ticks per policy
//! across restarts (replay and snapshot), pause, time zones and DST.

use super::*;
use crate::core::test_support::{Sim, T0, st};
use crate::core::{CoreConfig, Notice};
use guildhall_proto::Event;

const COORD: &str = "coordinator-a";

/// 2026-12-07T00:00:00Z, a Monday.
const DAY: u64 = 1_796_601_600_000;

fn spec(cron: &str, tz: &str, missed: Missed) -> ScheduleSpec {
    ScheduleSpec {
        cron: cron.into(),
        timezone: tz.into(),
        stage: st("build"),
        payload: b"{}".to_vec(),
        priority: Priority::new(5).unwrap(),
        missed,
        paused: false,
    }
}

fn changed(at_ms: u64, name: &str, spec: Option<ScheduleSpec>) -> Event {
    Event::ScheduleChanged(Box::new(ScheduleChanged {
        at_ms,
        name: st(name),
        spec,
        by: "test".into(),
    }))
}

/// A coordinator's runtime around a core: it writes `ScheduleFired` for
/// each tick (here: at once) and keeps the stream so a restart replays it.
struct Coord {
    sim: Sim,
    /// The stream: (sender, sent at, events).
    log: Vec<(String, u64, Vec<Event>)>,
    /// Every tick fired, in order.
    fired: Vec<(String, u64, String)>,
    /// Ticks republished after a restart (task ids).
    republished: Vec<String>,
    /// The runtime dies after writing the next `ScheduleFired`, before the
    /// task is published.
    die_before_publish: bool,
}

impl Coord {
    fn new(start: u64) -> Self {
        let mut sim = Sim::replaying(CoreConfig::default());
        sim.now = start;
        sim.core.set_caught_up(start);
        Self {
            sim,
            log: Vec::new(),
            fired: Vec::new(),
            republished: Vec::new(),
            die_before_publish: false,
        }
    }

    fn send(&mut self, sender: &str, events: Vec<Event>) {
        self.log.push((sender.into(), self.sim.now, events.clone()));
        self.sim.send(sender, events);
        self.pump();
    }

    /// Hands ticks on like the runtime: `ScheduleFired` into the stream.
    fn pump(&mut self) {
        loop {
            let ticks: Vec<Tick> = self
                .sim
                .all_notices()
                .into_iter()
                .filter_map(|n| match n {
                    Notice::FireTick(t) => Some(t),
                    _ => None,
                })
                .collect();
            if ticks.is_empty() {
                return;
            }
            for t in ticks {
                if t.republish {
                    self.republished.push(t.task_id.to_string());
                    let e = self.sim.submitted(t.task_id.as_str(), t.stage.as_str());
                    self.log.push((COORD.into(), self.sim.now, vec![e.clone()]));
                    self.sim.send(COORD, vec![e]);
                    continue;
                }
                self.fired
                    .push((t.schedule.to_string(), t.tick_ms, t.task_id.to_string()));
                let e = Event::ScheduleFired(ScheduleFired {
                    at_ms: self.sim.now,
                    name: t.schedule,
                    tick_ms: t.tick_ms,
                    task_id: t.task_id.clone(),
                });
                self.log.push((COORD.into(), self.sim.now, vec![e.clone()]));
                self.sim.send(COORD, vec![e]);
                if std::mem::take(&mut self.die_before_publish) {
                    continue;
                }
                let e = self.sim.submitted(t.task_id.as_str(), t.stage.as_str());
                self.log.push((COORD.into(), self.sim.now, vec![e.clone()]));
                self.sim.send(COORD, vec![e]);
            }
        }
    }

    /// Runs the clock to `t`, firing as it goes.
    fn run_to(&mut self, t: u64) {
        while let Some(next) = self.sim.core.poll_timeout()
            && next <= t
        {
            self.sim.advance_to(next);
            self.pump();
        }
        self.sim.advance_to(t);
        self.pump();
    }

    /// A new coordinator at `at`: replays the stream, then catches up.
    fn restart_at(&mut self, at: u64) {
        let mut sim = Sim::replaying(CoreConfig::default());
        sim.now = at;
        for (sender, sent_at, events) in &self.log {
            sim.send_at(sender, *sent_at, events.clone());
        }
        assert!(
            sim.all_notices()
                .iter()
                .all(|n| !matches!(n, Notice::FireTick(_))),
            "no tick while replaying"
        );
        sim.core.set_caught_up(at);
        self.sim = sim;
        self.pump();
    }

    /// A new coordinator at `at` from a snapshot taken now (nothing replayed
    /// after it).
    fn restart_from_snapshot_at(&mut self, at: u64) {
        let mut sim = self.sim.resume_at(CoreConfig::default(), at);
        sim.core.set_caught_up(at);
        self.sim = sim;
        self.pump();
    }

    fn ticks_of(&self, name: &str) -> Vec<u64> {
        self.fired
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, t, _)| *t)
            .collect()
    }
}

fn secs(from: u64, to: u64) -> Vec<u64> {
    (from..=to).map(|s| s * 1000).collect()
}

#[test]
fn an_every_second_schedule_fires_each_tick_once_with_its_id() {
    let start = DAY + 500;
    let mut c = Coord::new(start);
    c.send(
        COORD,
        vec![changed(
            start,
            "tick",
            Some(spec("* * * * * *", "UTC", Missed::RunAll)),
        )],
    );
    c.run_to(DAY + 5_000);
    assert_eq!(c.ticks_of("tick"), secs(DAY / 1000 + 1, DAY / 1000 + 5));
    assert_eq!(c.fired[0].2, "tick@2026-12-07T00:00:01Z");
    assert!(TaskId::new(&c.fired[0].2).is_ok());
    // The next timeout is the next tick.
    assert!(c.sim.core.poll_timeout().is_some_and(|t| t <= DAY + 6_000));
    let v = c.sim.core.schedule("tick", c.sim.now).unwrap();
    assert_eq!(v.fired_total, 5);
    assert_eq!(v.last_tick_ms, Some(DAY + 5_000));
    assert_eq!(v.next_ticks_ms, vec![DAY + 6_000, DAY + 7_000, DAY + 8_000]);
}

#[test]
fn a_tick_handed_over_is_not_fired_again_before_it_is_read_back() {
    let mut sim = Sim::with(CoreConfig::default());
    let s = spec("* * * * * *", "UTC", Missed::RunAll);
    sim.send(COORD, vec![changed(sim.now, "t", Some(s))]);
    sim.advance(1_000);
    let first: Vec<_> = sim.all_notices();
    assert_eq!(
        first
            .iter()
            .filter(|n| matches!(n, Notice::FireTick(_)))
            .count(),
        1
    );
    // No ScheduleFired read back yet: the same time again decides nothing.
    sim.core.handle_timeout(sim.now);
    sim.core.handle_timeout(sim.now + 10);
    assert!(
        sim.all_notices()
            .iter()
            .all(|n| !matches!(n, Notice::FireTick(_)))
    );
}

#[test]
fn only_a_coordinator_may_change_or_fire_a_schedule() {
    let mut c = Coord::new(DAY);
    let s = spec("* * * * * *", "UTC", Missed::RunAll);
    c.send("agent-1", vec![changed(DAY, "x", Some(s.clone()))]);
    assert_eq!(c.sim.core.schedule_count(), 0);
    c.send(COORD, vec![changed(DAY, "x", Some(s))]);
    let forged = Event::ScheduleFired(ScheduleFired {
        at_ms: DAY,
        name: st("x"),
        tick_ms: DAY + 60_000,
        task_id: tick_task_id(&st("x"), DAY + 60_000),
    });
    c.send("agent-1", vec![forged]);
    assert_eq!(c.sim.core.schedule_counters().1, 2);
    // The forged "fired up to a minute ahead" is ignored: ticks still fire.
    c.run_to(DAY + 3_000);
    assert_eq!(c.ticks_of("x"), secs(DAY / 1000 + 1, DAY / 1000 + 3));
}

#[test]
fn nothing_fires_before_the_core_is_caught_up() {
    let mut sim = Sim::replaying(CoreConfig::default());
    sim.send(
        COORD,
        vec![changed(
            T0,
            "x",
            Some(spec("* * * * * *", "UTC", Missed::RunAll)),
        )],
    );
    sim.advance(10_000);
    assert!(
        sim.all_notices()
            .iter()
            .all(|n| !matches!(n, Notice::FireTick(_)))
    );
    sim.core.set_caught_up(sim.now);
    let n = sim
        .all_notices()
        .into_iter()
        .filter(|n| matches!(n, Notice::FireTick(_)))
        .count();
    assert_eq!(n, 10, "every tick since it was set (run-all)");
}

/// Runs `policy` through an outage from 3.2 s to 8.5 s after the start.
fn outage(policy: Missed, snapshot: bool) -> Vec<u64> {
    let mut c = Coord::new(DAY);
    c.send(
        COORD,
        vec![changed(DAY, "s", Some(spec("* * * * * *", "UTC", policy)))],
    );
    c.run_to(DAY + 3_200);
    assert_eq!(c.ticks_of("s"), secs(DAY / 1000 + 1, DAY / 1000 + 3));
    if snapshot {
        c.restart_from_snapshot_at(DAY + 8_500);
    } else {
        c.restart_at(DAY + 8_500);
    }
    c.run_to(DAY + 10_000);
    c.ticks_of("s")
}

#[test]
fn run_all_fires_every_missed_tick_once_after_a_restart() {
    let d = DAY / 1000;
    for snapshot in [false, true] {
        assert_eq!(
            outage(Missed::RunAll, snapshot),
            secs(d + 1, d + 10),
            "{snapshot}"
        );
    }
}

#[test]
fn run_once_fires_the_latest_missed_tick() {
    let d = DAY / 1000;
    for snapshot in [false, true] {
        let mut want = secs(d + 1, d + 3);
        want.push((d + 8) * 1000);
        want.extend(secs(d + 9, d + 10));
        assert_eq!(outage(Missed::RunOnce, snapshot), want, "{snapshot}");
    }
}

#[test]
fn skip_fires_no_missed_tick() {
    let d = DAY / 1000;
    for snapshot in [false, true] {
        let mut want = secs(d + 1, d + 3);
        want.extend(secs(d + 9, d + 10));
        assert_eq!(outage(Missed::Skip, snapshot), want, "{snapshot}");
    }
}

#[test]
fn a_restart_does_not_fire_what_its_predecessor_fired() {
    let mut c = Coord::new(DAY);
    c.send(
        COORD,
        vec![changed(
            DAY,
            "s",
            Some(spec("* * * * * *", "UTC", Missed::RunAll)),
        )],
    );
    c.run_to(DAY + 5_000);
    // Restarted straight away (no tick fell in between), several times.
    for k in 0..3 {
        c.restart_at(DAY + 5_100 + k * 100);
    }
    c.run_to(DAY + 7_000);
    assert_eq!(c.ticks_of("s"), secs(DAY / 1000 + 1, DAY / 1000 + 7));
}

#[test]
fn run_all_is_capped_and_counts_what_it_drops() {
    let mut c = Coord::new(DAY);
    c.send(
        COORD,
        vec![changed(
            DAY,
            "s",
            Some(spec("* * * * * *", "UTC", Missed::RunAll)),
        )],
    );
    // Down for an hour: 3,600 missed ticks.
    c.restart_at(DAY + 3_600_000 + 500);
    c.run_to(DAY + 3_601_000);
    let ticks = c.ticks_of("s");
    assert_eq!(ticks.len(), MAX_MISSED_TICKS + 1);
    assert_eq!(ticks[0], DAY + (3_600 - MAX_MISSED_TICKS as u64 + 1) * 1000);
    assert_eq!(*ticks.last().unwrap(), DAY + 3_601_000);
    assert!(ticks.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(
        c.sim.core.schedule_counters().0,
        3_600 - MAX_MISSED_TICKS as u64
    );
}

#[test]
fn a_paused_schedule_fires_nothing_and_resumes_per_its_policy() {
    let d = DAY / 1000;
    for (policy, during_pause) in [
        (Missed::Skip, vec![]),
        (Missed::RunOnce, vec![6]),
        (Missed::RunAll, vec![3, 4, 5, 6]),
    ] {
        let mut c = Coord::new(DAY);
        let mut s = spec("* * * * * *", "UTC", policy);
        c.send(COORD, vec![changed(DAY, "p", Some(s.clone()))]);
        c.run_to(DAY + 2_500);
        s.paused = true;
        c.send(COORD, vec![changed(c.sim.now, "p", Some(s.clone()))]);
        c.run_to(DAY + 6_500);
        assert_eq!(
            c.sim.core.schedule("p", c.sim.now).unwrap().next_ticks_ms,
            Vec::<u64>::new()
        );
        s.paused = false;
        c.send(COORD, vec![changed(c.sim.now, "p", Some(s))]);
        c.run_to(DAY + 8_000);
        let mut want = secs(d + 1, d + 2);
        want.extend(during_pause.into_iter().map(|x| (d + x) * 1000));
        want.extend(secs(d + 7, d + 8));
        assert_eq!(c.ticks_of("p"), want, "{policy:?}");
    }
}

#[test]
fn a_removed_schedule_stops_and_a_changed_one_counts_from_the_change() {
    let mut c = Coord::new(DAY);
    c.send(
        COORD,
        vec![changed(
            DAY,
            "r",
            Some(spec("* * * * * *", "UTC", Missed::RunAll)),
        )],
    );
    c.run_to(DAY + 2_000);
    // Every 2 s from now on.
    c.send(
        COORD,
        vec![changed(
            c.sim.now,
            "r",
            Some(spec("*/2 * * * * *", "UTC", Missed::RunAll)),
        )],
    );
    c.run_to(DAY + 6_000);
    let d = DAY / 1000;
    assert_eq!(
        c.ticks_of("r"),
        vec![
            (d + 1) * 1000,
            (d + 2) * 1000,
            (d + 4) * 1000,
            (d + 6) * 1000
        ]
    );
    c.send(COORD, vec![changed(c.sim.now, "r", None)]);
    c.run_to(DAY + 10_000);
    assert_eq!(c.ticks_of("r").len(), 4);
    assert_eq!(c.sim.core.schedule_count(), 0);
}

#[test]
fn five_fields_read_in_a_time_zone() {
    // 03:00 in Berlin is 02:00 UTC in winter (CET, +1).
    let p = Parsed::new("0 3 * * *", "Europe/Berlin").unwrap();
    assert_eq!(p.next_after(DAY), Some(DAY + 2 * 3_600_000));
    // ... and 01:00 UTC in summer (CEST, +2): 2026-07-01T00:00:00Z.
    let july = 1_782_864_000_000;
    assert_eq!(p.next_after(july), Some(july + 3_600_000));
    // New York: 03:00 EST = 08:00 UTC.
    let ny = Parsed::new("0 3 * * *", "America/New_York").unwrap();
    assert_eq!(ny.next_after(DAY), Some(DAY + 8 * 3_600_000));
}

#[test]
fn daylight_saving_gap_and_overlap_fire_once() {
    // Berlin springs forward on 2026-03-29 at 02:00 CET -> 03:00 CEST: a
    // daily 02:30 does not exist that day and fires at 03:00 CEST (01:00Z).
    let mar29 = 1_774_742_400_000; // 2026-03-29T00:00:00Z
    let p = Parsed::new("30 2 * * *", "Europe/Berlin").unwrap();
    let ticks = p.upcoming(mar29 - 86_400_000, 3);
    assert_eq!(
        ticks,
        vec![
            mar29 - 86_400_000 + 3_600_000 + 1_800_000, // 28th 02:30 CET = 01:30Z
            mar29 + 3_600_000,                          // 29th: 03:00 CEST = 01:00Z
            mar29 + 86_400_000 + 1_800_000,             // 30th 02:30 CEST = 00:30Z
        ]
    );
    // Berlin falls back on 2026-10-25 at 03:00 CEST -> 02:00 CET: 02:30
    // happens twice and fires once (the first, 00:30Z).
    let oct25 = 1_792_886_400_000; // 2026-10-25T00:00:00Z
    let ticks = p.upcoming(oct25, 2);
    assert_eq!(
        ticks,
        vec![oct25 + 1_800_000, oct25 + 86_400_000 + 5_400_000]
    );
    // An hourly schedule follows real time across the overlap: 25 ticks.
    let hourly = Parsed::new("0 * * * *", "Europe/Berlin").unwrap();
    let day = hourly.upcoming(oct25 - 2 * 3_600_000 - 1, 25);
    assert!(day.windows(2).all(|w| w[1] - w[0] == 3_600_000), "{day:?}");
}

#[test]
fn a_berlin_schedule_fires_across_a_dst_change_on_virtual_time() {
    let mar28 = 1_774_656_000_000; // 2026-03-28T00:00:00Z
    let mut c = Coord::new(mar28);
    c.send(
        COORD,
        vec![changed(
            mar28,
            "n",
            Some(spec("30 2 * * *", "Europe/Berlin", Missed::RunAll)),
        )],
    );
    c.run_to(mar28 + 3 * 86_400_000);
    let ticks = c.ticks_of("n");
    assert_eq!(ticks.len(), 3);
    assert_eq!(c.fired[1].2, "n@2026-03-29T01:00:00Z");
}

#[test]
fn bad_expressions_and_time_zones_are_refused() {
    for bad in [
        "",
        "* * *",
        "61 * * * *",
        "* * * * * * * *",
        "nonsense",
        "0 0 30 2 *",
    ] {
        assert!(Parsed::new(bad, "UTC").is_err(), "{bad}");
    }
    for bad in ["Mars/Olympus", "", "utc+25", "../../etc/passwd"] {
        assert!(
            matches!(
                Parsed::new("* * * * *", bad),
                Err(ScheduleError::TimeZone(_))
            ),
            "{bad}"
        );
    }
    assert!(Parsed::new("*/5 * * * * *", "Asia/Kolkata").is_ok());
    assert!(Parsed::new("0 9 * * MON-FRI", "UTC").is_ok());
}

#[test]
fn tick_ids_are_valid_task_ids_for_the_longest_name() {
    let name = st(&"a".repeat(64));
    let id = tick_task_id(&name, u64::from(u32::MAX) * 1000);
    assert!(id.as_str().ends_with("@2106-02-07T06:28:15Z"), "{id}");
}

#[test]
fn a_restart_republishes_a_fired_tick_whose_task_never_got_out() {
    let mut c = Coord::new(DAY);
    c.send(
        COORD,
        vec![changed(
            DAY,
            "s",
            Some(spec("* * * * * *", "UTC", Missed::Skip)),
        )],
    );
    c.run_to(DAY + 2_000);
    c.die_before_publish = true;
    c.run_to(DAY + 3_000);
    // Restarted at once: tick 3 is not decided again, its task republished.
    c.restart_at(DAY + 3_100);
    assert_eq!(c.republished, vec!["s@2026-12-07T00:00:03Z".to_string()]);
    c.run_to(DAY + 4_000);
    assert_eq!(c.ticks_of("s"), secs(DAY / 1000 + 1, DAY / 1000 + 4));
    // Its task is known now: another restart republishes nothing.
    c.restart_at(DAY + 4_100);
    c.restart_from_snapshot_at(DAY + 4_200);
    assert_eq!(c.republished.len(), 1);
}

#[test]
fn a_change_while_missed_ticks_drain_keeps_them() {
    let mut c = Coord::new(DAY);
    let mut s = spec("* * * * * *", "UTC", Missed::RunAll);
    c.send(COORD, vec![changed(DAY, "s", Some(s.clone()))]);
    // Down for 300 s: 300 missed ticks, handed over 100 per timeout.
    c.restart_at(DAY + 300_500);
    assert_eq!(c.ticks_of("s").len(), MAX_TICKS_PER_TIMEOUT);
    // The priority changes before the rest are handed over.
    s.priority = Priority::new(9).unwrap();
    c.send(COORD, vec![changed(c.sim.now, "s", Some(s))]);
    c.run_to(DAY + 301_000);
    assert_eq!(c.ticks_of("s"), secs(DAY / 1000 + 1, DAY / 1000 + 301));
}

//! The planner on virtual time.

use super::*;

fn st(s: &str) -> Stage {
    s.parse().unwrap()
}

fn obs(workers: u32, backlog: u64) -> Observation {
    Observation {
        workers,
        slots_per_worker: 1.0,
        backlog,
    }
}

/// `per_s` arrivals every second from `from_s` to `to_s` (exclusive), and
/// one service sample of `service_ms` per arrival (alternating ±20%).
fn feed(p: &mut Planner, stage: &Stage, from_s: u64, to_s: u64, per_s: u32, service_ms: u64) {
    for s in from_s..to_s {
        p.record_arrivals(stage, s * 1000 + 500, per_s);
        for i in 0..per_s {
            let d = if i % 2 == 0 {
                service_ms * 12 / 10
            } else {
                service_ms * 8 / 10
            };
            p.record_service(stage, d);
        }
    }
}

#[test]
fn config_errors_are_one_line_and_name_the_value() {
    let ok = CapacityConfig::default();
    assert_eq!(ok.validate(), Ok(()));
    let cases: Vec<(CapacityConfig, &str)> = vec![
        (
            CapacityConfig {
                wait_target_ms: 0,
                ..ok.clone()
            },
            "--wait-target",
        ),
        (
            CapacityConfig {
                wait_quantile: 1.0,
                ..ok.clone()
            },
            "--wait-quantile",
        ),
        (
            CapacityConfig {
                wait_quantile: f64::NAN,
                ..ok.clone()
            },
            "--wait-quantile",
        ),
        (
            CapacityConfig {
                stage_wait_targets: [(st("build"), 0)].into(),
                ..ok.clone()
            },
            "stage build",
        ),
        (
            CapacityConfig {
                bucket_ms: 10,
                ..ok.clone()
            },
            "bucket",
        ),
        (
            CapacityConfig {
                season_buckets: 1,
                ..ok.clone()
            },
            "season",
        ),
        (
            CapacityConfig {
                min_workers: 5,
                max_workers: 2,
                ..ok.clone()
            },
            "min workers",
        ),
        (
            CapacityConfig {
                tolerance: 1.5,
                ..ok.clone()
            },
            "tolerance",
        ),
        (
            CapacityConfig {
                lead_time_ms: 7_200_000,
                ..ok.clone()
            },
            "--lead-time",
        ),
    ];
    for (config, needle) in cases {
        let e = config.validate().unwrap_err().to_string();
        assert!(e.contains(needle), "{needle}: {e}");
        assert!(!e.contains('\n'));
    }
    let c = CapacityConfig {
        stage_wait_targets: [(st("build"), 5_000)].into(),
        ..ok
    };
    assert_eq!(c.wait_target_for(&st("build")), 5_000);
    assert_eq!(c.wait_target_for(&st("report")), 30_000);
}

#[test]
fn a_steady_stage_is_sized_by_erlang_c() {
    let stage = st("build");
    let mut p = Planner::new(CapacityConfig::default());
    // 4 tasks/s of 1 s each: 4 Erlangs.
    feed(&mut p, &stage, 0, 120, 4, 1000);
    p.observe(&stage, 120_000, obs(10, 4));
    let plans = p.plan(120_000);
    assert_eq!(plans.len(), 1);
    let plan = &plans[0];
    assert!((plan.arrival_rate - 4.0).abs() < 0.1, "{plan:?}");
    assert_eq!(plan.forecast.source, ForecastSource::RecentRate);
    assert!(plan.forecast.upper > 4.0);
    // Regular arrivals (4 every second) have almost no dispersion; the
    // service SCV of ±20% is 0.04 (sample variance).
    assert!(plan.arrival_scv <= 0.2, "{plan:?}");
    assert!((plan.service_scv.unwrap() - 0.04).abs() < 0.01, "{plan:?}");
    let mean = plan.service_mean_ms.unwrap();
    let expected = queueing::servers_for_target(
        plan.sizing_rate,
        mean,
        plan.arrival_scv,
        plan.service_scv.unwrap(),
        30_000.0,
        0.05,
        1000,
    );
    assert_eq!(plan.desired_workers, expected.servers);
    assert!(
        plan.desired_workers >= 5 && plan.desired_workers <= 6,
        "{plan:?}"
    );
    assert!((plan.utilisation.unwrap() - 0.4).abs() < 0.02);
    assert!(plan.p_wait_over_target.unwrap() < 1e-6);
    // 10 workers and 5 wanted: a scale-down, not held back by a higher
    // recommendation (this is the first one).
    assert_eq!(plan.recommended_workers, plan.desired_workers);
    assert!(plan.changed);
    assert!(plan.reason.contains("4.00/s arriving"), "{}", plan.reason);
    assert!(
        plan.reason.contains("P(wait > 30 s) ≤ 5%"),
        "{}",
        plan.reason
    );
    assert_eq!(p.stage(&stage), Some(plan));
}

#[test]
fn a_queue_adds_capacity_to_clear_it() {
    let stage = st("build");
    let mut p = Planner::new(CapacityConfig::default());
    feed(&mut p, &stage, 0, 60, 2, 1000);
    p.observe(&stage, 60_000, obs(3, 3));
    let calm = p.plan(60_000)[0].desired_workers;
    // 300 tasks waiting beyond the 3 in hand: 10/s more to clear them in 30 s.
    p.observe(&stage, 60_000, obs(3, 303));
    let plan = p.plan(60_000).remove(0);
    assert!(plan.sizing_rate > 11.0, "{plan:?}");
    assert!(plan.desired_workers > calm + 8, "{calm} {plan:?}");
    assert!(plan.reason.contains("300 queued"), "{}", plan.reason);
}

#[test]
fn scale_down_waits_for_the_window_and_small_changes_are_ignored() {
    let stage = st("build");
    let mut p = Planner::new(CapacityConfig::default());
    feed(&mut p, &stage, 0, 60, 8, 1000);
    p.observe(&stage, 60_000, obs(2, 2));
    let high = p.plan(60_000)[0].recommended_workers;
    assert!(high >= 9, "{high}");
    // The load drops to 1/s: desired falls, the recommendation holds.
    feed(&mut p, &stage, 60, 180, 1, 1000);
    p.observe(&stage, 180_000, obs(high, 1));
    let plan = p.plan(180_000).remove(0);
    assert!(plan.desired_workers < high / 2, "{plan:?}");
    assert_eq!(plan.recommended_workers, high);
    assert!(!plan.changed);
    assert!(
        plan.reason.contains("highest recommendation"),
        "{}",
        plan.reason
    );
    // Past the window (300 s after the high one), it follows.
    feed(&mut p, &stage, 180, 400, 1, 1000);
    p.observe(&stage, 400_000, obs(high, 1));
    let plan = p.plan(400_000).remove(0);
    assert_eq!(plan.recommended_workers, plan.desired_workers);
    assert!(plan.changed);
    // A desired count within 10% of the current one changes nothing.
    let current = plan.desired_workers * 10;
    let mut q = Planner::new(CapacityConfig {
        min_workers: 0,
        ..CapacityConfig::default()
    });
    feed(&mut q, &stage, 0, 60, 100, 1000);
    q.observe(&stage, 60_000, obs(current, 100));
    let plan = q.plan(60_000).remove(0);
    if (f64::from(plan.desired_workers) / f64::from(current) - 1.0).abs() <= 0.1 {
        assert_eq!(plan.recommended_workers, current);
    }
}

#[test]
fn concurrency_converts_servers_to_agents() {
    let stage = st("build");
    let mut p = Planner::new(CapacityConfig::default());
    feed(&mut p, &stage, 0, 60, 8, 1000);
    p.observe(
        &stage,
        60_000,
        Observation {
            workers: 1,
            slots_per_worker: 4.0,
            backlog: 0,
        },
    );
    let plan = p.plan(60_000).remove(0);
    let servers = queueing::servers_for_target(
        plan.sizing_rate,
        plan.service_mean_ms.unwrap(),
        plan.arrival_scv,
        plan.service_scv.unwrap(),
        30_000.0,
        0.05,
        4000,
    )
    .servers;
    assert_eq!(plan.desired_workers, servers.div_ceil(4));
    assert!((plan.utilisation.unwrap() - 2.0).abs() < 0.1, "{plan:?}");
}

#[test]
fn without_service_times_workers_are_kept() {
    let stage = st("intake");
    let mut p = Planner::new(CapacityConfig::default());
    p.record_arrivals(&stage, 1_000, 5);
    p.observe(&stage, 2_000, obs(3, 5));
    let plan = p.plan(2_000).remove(0);
    assert_eq!(plan.desired_workers, 3);
    assert_eq!(plan.service_mean_ms, None);
    assert!(plan.reason.contains("no service times"), "{}", plan.reason);
    // Nobody there and work waiting: at least one.
    p.observe(&stage, 3_000, obs(0, 5));
    assert_eq!(p.plan(3_000)[0].desired_workers, 1);
    // A stage with nothing at all keeps the minimum.
    let idle = st("idle");
    p.observe(&idle, 3_000, obs(0, 0));
    assert_eq!(p.stage(&idle), None, "no plan before plan()");
    let plans = p.plan(4_000);
    let idle_plan = plans.iter().find(|x| x.stage == idle).unwrap();
    assert_eq!(idle_plan.recommended_workers, 1);
}

/// A noisy seasonal series with a short season, so the model warms up in
/// minutes: buckets of 1 s, seasons of 60 buckets.
#[test]
fn holt_winters_takes_over_once_it_beats_the_naive_forecast() {
    let stage = st("build");
    let config = CapacityConfig {
        bucket_ms: 1_000,
        season_buckets: 60,
        ..CapacityConfig::default()
    };
    let mut p = Planner::new(config);
    let mut seed: u64 = 7;
    let mut source_at = Vec::new();
    for s in 0..600u64 {
        let phase = (s % 60) as f64 / 60.0 * std::f64::consts::TAU;
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let noise = ((seed >> 33) % 7) as f64 - 3.0;
        let n = (20.0 + 10.0 * phase.sin() + noise).max(0.0) as u32;
        p.record_arrivals(&stage, s * 1000, n);
        p.record_service(&stage, 100);
        if s % 15 == 14 {
            p.observe(&stage, (s + 1) * 1000, obs(5, 0));
            let plan = p.plan((s + 1) * 1000).remove(0);
            source_at.push((s, plan.forecast.source, plan.forecast.mase));
        }
    }
    // First two seasons (and the error window's minimum): the recent rate.
    assert!(
        source_at
            .iter()
            .filter(|(s, _, _)| *s < 119)
            .all(|(_, src, _)| *src == ForecastSource::RecentRate)
    );
    let (_, src, mase) = source_at.last().copied().unwrap();
    assert_eq!(src, ForecastSource::HoltWinters, "{source_at:?}");
    assert!(mase.unwrap() < 1.0);
}

#[test]
fn the_planner_round_trips_through_a_snapshot_encoding() {
    let stage = st("build");
    let mut p = Planner::new(CapacityConfig::default());
    feed(&mut p, &stage, 0, 90, 3, 700);
    p.observe(&stage, 90_000, obs(4, 2));
    let before = p.plan(90_000);
    let bytes = postcard::to_stdvec(&p).unwrap();
    let mut q: Planner = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(q.stage(&stage), Some(&before[0]));
    assert_eq!(q.plan(105_000), p.plan(105_000));
}

#[test]
fn stages_are_bounded() {
    let mut p = Planner::new(CapacityConfig::default());
    for i in 0..(MAX_STAGES + 10) {
        p.record_arrivals(&st(&format!("s{i}")), 0, 1);
    }
    assert_eq!(p.plan(1_000).len(), MAX_STAGES);
}

//! `guildhall-bench`: each benchmark runs against the real broker, prints a
//! well-formed result, and leaves nothing behind; bad flags are one line.
//! No timing is asserted: the figures belong in BENCHMARKS.md.

use guildhall_broker::Management;
use guildhall_tests::*;
use serde_json::Value;
use std::process::Output;

/// `guildhall-bench WHICH` on the test broker, under the test's namespace,
/// with `extra` flags.
async fn bench(ns: &TestNs, which: &str, extra: &[&str]) -> Output {
    let url = amqp_url();
    let mut args = vec![which, "--amqp-url", &url, "--namespace", ns.name()];
    args.extend_from_slice(extra);
    run_bench(&args).await
}

/// Runs `guildhall-bench` with `args`; the broker and namespace come from
/// the flags alone.
async fn run_bench(args: &[&str]) -> Output {
    tokio::process::Command::new(bin("guildhall-bench"))
        .args(args)
        .env_remove("AMQP_URL")
        .env_remove("GUILDHALL_NAMESPACE")
        .output()
        .await
        .expect("guildhall-bench runs")
}

/// The table form of `bench WHICH extra`: it succeeds and names each of
/// `needles`.
async fn assert_table(ns: &TestNs, which: &str, extra: &[&str], needles: &[&str]) {
    let o = bench(ns, which, extra).await;
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for needle in needles {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
}

/// `bench WHICH extra` as JSON, ended within `limit`: a target out of reach
/// is reported, never waited out.
async fn json_within(
    ns: &TestNs,
    which: &str,
    extra: &[&str],
    limit: std::time::Duration,
) -> Value {
    let t0 = std::time::Instant::now();
    let r = json(&bench(ns, which, extra).await);
    assert!(t0.elapsed() < limit, "took {:?}", t0.elapsed());
    r
}

fn json(o: &Output) -> Value {
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "status {:?}; stderr: {err}", o.status);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn num(v: &Value, path: &str) -> f64 {
    let mut cur = v;
    for key in path.split('.') {
        cur = &cur[key];
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number in {v}"))
}

/// Nothing named after the benchmark's namespaces is left on the broker.
async fn assert_nothing_left(ns: &TestNs) {
    let m = Management::new(&management_url(), "/").unwrap();
    let prefix = format!("{}-bench-", ns.name());
    let left = m.queues_with_prefix(&prefix).await.unwrap();
    assert!(left.is_empty(), "left behind: {left:?}");
    let left = m.exchanges_with_prefix(&prefix).await.unwrap();
    assert!(left.is_empty(), "exchanges left behind: {left:?}");
}

#[tokio::test]
async fn ingest_quick_prints_a_well_formed_result() {
    let ns = TestNs::new("bench");
    let o = bench(
        &ns,
        "ingest",
        &[
            "--quick",
            "--json",
            "--drain-timeout",
            "60s",
            "--drain-rounds",
            "2",
        ],
    )
    .await;
    let r = json(&o);
    assert!(
        r["broker"].as_str().unwrap().starts_with("RabbitMQ 3."),
        "{r}"
    );
    assert_eq!(num(&r, "agents"), 30.0);
    // Live: something published and applied, lag measured, backlog cleared.
    assert!(num(&r, "live.published_events") > 0.0, "{r}");
    assert!(num(&r, "live.applied_events_per_s") > 0.0, "{r}");
    assert!(
        num(&r, "live.lag_p50_ms") <= num(&r, "live.lag_p99_ms"),
        "{r}"
    );
    assert!(r["live"]["caught_up_after_s"].is_number(), "{r}");
    // Drain: the bare consumer and the replaying coordinator read the same
    // messages; the coordinator reached the end.
    let events = num(&r, "drain.events");
    assert!(events >= 200_000.0, "{r}");
    assert!(num(&r, "drain.messages") >= events / 250.0, "{r}");
    assert_eq!(r["drain"]["complete"], true, "{r}");
    assert!(num(&r, "drain.coordinator_events") >= events, "{r}");
    assert!(num(&r, "drain.bare_events_per_s") > 0.0, "{r}");
    let ratio = num(&r, "drain.ratio");
    let expect = num(&r, "drain.coordinator_events_per_s") / num(&r, "drain.bare_events_per_s");
    assert!((ratio - expect).abs() < 1e-6, "{r}");
    assert!(num(&r, "drain.coordinator_peak_rss_bytes") > 1e6, "{r}");
    // Two alternate reads each; the figures are their medians.
    let rounds = r["drain"]["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{r}");
    for field in ["bare_events_per_s", "coordinator_events_per_s"] {
        let values: Vec<f64> = rounds.iter().map(|x| x[field].as_f64().unwrap()).collect();
        assert!(values.iter().all(|v| *v > 0.0), "{field}: {r}");
        let m = num(&r, &format!("drain.{field}"));
        assert!(values.contains(&m), "{field} is one of the rounds': {r}");
    }
    assert!(rounds.iter().all(|x| x["complete"] == true), "{r}");
    assert_nothing_left(&ns).await;

    // The table form names each phase.
    assert_table(
        &ns,
        "ingest",
        &["--quick", "--events", "20000", "--duration", "1s"],
        &[
            "live (",
            "lag p99",
            "fill (",
            "bare lapin consumer",
            "ratio",
        ],
    )
    .await;
    assert_nothing_left(&ns).await;
}

#[tokio::test]
async fn ingest_beyond_what_the_machine_sustains_reports_the_shortfall() {
    let ns = TestNs::new("bench");
    // Far more than one process can publish: the run ends on time and
    // says what it achieved and what was left behind.
    let r = json_within(
        &ns,
        "ingest",
        &[
            "--json",
            "--rate",
            "10000000",
            "--duration",
            "1s",
            "--events",
            "1000",
            "--drain-timeout",
            "5s",
        ],
        std::time::Duration::from_secs(90),
    )
    .await;
    assert_eq!(num(&r, "live.target_events_per_s"), 10_000_000.0);
    assert!(num(&r, "live.published_events_per_s") < 10_000_000.0, "{r}");
    assert!(r["live"]["backlog_events"].is_number(), "{r}");
    assert!(r["live"]["dropped_events"].is_number(), "{r}");
    assert_nothing_left(&ns).await;
}

#[tokio::test]
async fn fleet_and_memory_quick_print_well_formed_results() {
    let ns = TestNs::new("bench");
    let o = bench(&ns, "fleet", &["--quick", "--json", "--duration", "2s"]).await;
    let r = json(&o);
    let run = &r["runs"][0];
    assert_eq!(num(run, "agents"), 201.0, "{r}");
    assert_eq!(num(run, "workers_tracked"), 201.0, "{r}");
    assert!(num(run, "envelopes_per_s") > 0.0, "{r}");
    assert!(num(run, "envelopes_per_s_slowest_second") > 0.0, "{r}");
    assert!(
        num(run, "envelopes_per_s_slowest_second") <= num(run, "envelopes_per_s") * 1.5,
        "{r}"
    );
    assert!(num(run, "lag_p50_ms") <= num(run, "lag_p99_ms"), "{r}");
    assert!(num(run, "metrics_bytes") > 10_000.0, "{r}");
    assert!(num(run, "workers_api_bytes") > 10_000.0, "{r}");
    assert!(num(run, "coordinator_peak_rss_bytes") > 1e6, "{r}");
    assert_nothing_left(&ns).await;

    let o = run_bench(&["memory", "--quick", "--json"]).await;
    let r = json(&o);
    assert!(r.is_object() || r.is_array(), "{r}");
}

#[tokio::test]
async fn agent_quick_compares_the_agent_with_a_bare_consumer() {
    let ns = TestNs::new("bench");
    let o = bench(
        &ns,
        "agent",
        &["--quick", "--json", "--tasks", "100", "--burst", "50"],
    )
    .await;
    let r = json(&o);
    assert!(
        r["broker"].as_str().unwrap().starts_with("RabbitMQ 3."),
        "{r}"
    );
    // Both paths carried every task from a to b, and were timed.
    for path in ["agent", "bare"] {
        let p = &r[path];
        assert_eq!(num(p, "measured"), 100.0, "{path}: {r}");
        assert_eq!(num(p, "missing"), 0.0, "{path}: {r}");
        assert!(num(p, "p50_ms") > 0.0, "{path}: {r}");
        assert!(num(p, "p50_ms") <= num(p, "p99_ms"), "{path}: {r}");
        assert!(num(p, "p99_ms") <= num(p, "max_ms"), "{path}: {r}");
        assert!(num(p, "burst_tasks_per_s") > 0.0, "{path}: {r}");
    }
    let overhead = num(&r, "overhead_p99_ms");
    let expect = num(&r, "agent.p99_ms") - num(&r, "bare.p99_ms");
    assert!((overhead - expect).abs() < 1e-9, "{r}");
    assert_eq!(num(&r, "overhead_p99_target_ms"), 1.0);
    assert_nothing_left(&ns).await;

    // The table names both paths and the difference.
    assert_table(
        &ns,
        "agent",
        &["--quick", "--tasks", "20", "--burst", "10"],
        &[
            "agent: stage latency",
            "bare lapin consumer",
            "agent overhead",
        ],
    )
    .await;
    assert_nothing_left(&ns).await;
}

#[tokio::test]
async fn agent_beyond_what_the_broker_takes_reports_the_rate_achieved() {
    let ns = TestNs::new("bench");
    // 100,000 confirmed publishes a second to a quorum queue is more than
    // this broker takes: the run ends on time and says what it achieved.
    let r = json_within(
        &ns,
        "agent",
        &[
            "--json",
            "--rounds",
            "1",
            "--tasks",
            "3000",
            "--burst",
            "10",
            "--rate",
            "100000",
            "--drain-timeout",
            "20s",
        ],
        std::time::Duration::from_secs(120),
    )
    .await;
    for path in ["agent", "bare"] {
        let achieved = num(&r[path], "published_per_s");
        assert!(achieved > 0.0 && achieved < 100_000.0, "{path}: {r}");
        // Every paced task was timed or counted missing (missing also
        // counts the burst's).
        let (measured, missing) = (num(&r[path], "measured"), num(&r[path], "missing"));
        assert!(measured <= 3_000.0, "{path}: {r}");
        assert!(measured + missing >= 3_000.0, "{path}: {r}");
    }
    assert_nothing_left(&ns).await;
}

#[tokio::test]
async fn pipeline_quick_moves_every_task_through_real_agents() {
    let ns = TestNs::new("bench");
    let r = json_within(
        &ns,
        "pipeline",
        &[
            "--quick",
            "--json",
            "--stages",
            "2",
            "--tasks",
            "60",
            "--concurrency",
            "2,8",
            "--profile",
            "--drain-timeout",
            "60s",
        ],
        std::time::Duration::from_secs(120),
    )
    .await;
    assert_eq!(num(&r, "stages"), 2.0, "{r}");
    let series = r["series"].as_array().expect("series");
    assert_eq!(series.len(), 2, "{r}");
    for s in series {
        let run = &s["median_run"];
        assert_eq!(num(run, "arrived"), 60.0, "{s}");
        assert_eq!(num(run, "missing"), 0.0, "{s}");
        assert!(num(s, "tasks_per_s") > 0.0, "{s}");
        assert!(
            num(s, "tasks_per_s_min") <= num(s, "tasks_per_s_max"),
            "{s}"
        );
        assert!(
            num(run, "end_to_end_p50_ms") <= num(run, "end_to_end_p99_ms"),
            "{s}"
        );
        // Every task's two events were read back for every stage.
        let stages = run["stages"].as_array().expect("stages");
        assert_eq!(stages.len(), 2, "{s}");
        for st in stages {
            assert_eq!(num(st, "tasks"), 60.0, "{st}");
            assert!(
                num(st, "latency_p50_ms") <= num(st, "latency_p99_ms"),
                "{st}"
            );
        }
        // The model timed each step of every task.
        for variant in [
            "sequential",
            "concurrent_confirms",
            "concurrent_confirms_prefetch_2x",
            "slot_freed_at_answer",
        ] {
            let v = &s["profile"][variant];
            assert_eq!(num(v, "missing"), 0.0, "{variant}: {s}");
            assert_eq!(v["steps"].as_array().map(Vec::len), Some(5), "{s}");
            assert!(num(&v["steps"][4], "p50_us") > 0.0, "{variant}: {s}");
        }
    }
    assert_nothing_left(&ns).await;
}

#[tokio::test]
async fn flows_quick_holds_releases_and_joins_a_fan_out() {
    let ns = TestNs::new("bench");
    let r = json_within(
        &ns,
        "flows",
        &["--quick", "--json"],
        std::time::Duration::from_secs(240),
    )
    .await;
    assert!(
        r["broker"].as_str().unwrap().starts_with("RabbitMQ 3."),
        "{r}"
    );
    assert_eq!(num(&r, "runs"), 1.0, "{r}");
    // Held: every dependent held, the sample released one at a time, the
    // rest in a burst; the figures are the one run's.
    let h = &r["held"];
    assert_eq!(num(h, "held"), 2_000.0, "{r}");
    assert_eq!(num(h, "sample") + num(h, "burst"), 2_000.0, "{r}");
    assert_eq!(h["runs"].as_array().map(Vec::len), Some(1), "{r}");
    assert!(
        num(h, "release_p50_ms.median") <= num(h, "release_p99_ms.median"),
        "{r}"
    );
    assert!(
        num(h, "release_p99_ms.median") <= num(h, "release_max_ms.median"),
        "{r}"
    );
    assert!(num(h, "burst_per_s.median") > 0.0, "{r}");
    assert!(num(h, "peak_rss.median") > 1e6, "{r}");
    assert_eq!(
        num(h, "bytes_per_held_task.median"),
        num(&h["runs"][0], "bytes_per_held_task"),
        "{r}"
    );
    // Fan-out: every child ran and is in the join's payload, which the
    // merge stage got; the independent tasks all ran too.
    let f = &r["fan_out"];
    assert_eq!(num(f, "children"), 500.0, "{r}");
    let run = &f["fan_out_runs"][0];
    assert_eq!(f["fan_out_runs"].as_array().map(Vec::len), Some(1), "{r}");
    assert_eq!(num(run, "children_ended"), 500.0, "{r}");
    assert_eq!(num(run, "join_children"), 500.0, "{r}");
    assert_eq!(num(run, "join_children_succeeded"), 500.0, "{r}");
    assert!(num(run, "join_payload_bytes") > 500.0 * 20.0, "{r}");
    let total = num(run, "total_s");
    assert!(total > 0.0, "{r}");
    for phase in ["fan_out_s", "children_s", "release_s", "join_s"] {
        let p = num(run, phase);
        assert!((0.0..=total).contains(&p), "{phase}: {r}");
    }
    assert!(num(run, "coordinator.peak_rss") > 1e6, "{r}");
    assert!(num(run, "agents.split_peak_rss") > 1e6, "{r}");
    let ind = &f["independent_runs"][0];
    assert_eq!(num(ind, "ended"), 500.0, "{r}");
    assert!(num(ind, "total_s") > 0.0, "{r}");
    assert!(num(ind, "publish_s") > 0.0, "{r}");
    assert!(num(ind, "coordinator.peak_rss") > 1e6, "{r}");
    assert_eq!(num(f, "fan_out_total_s.median"), total, "{r}");
    assert!(num(f, "time_ratio") > 0.0, "{r}");
    assert_nothing_left(&ns).await;

    // The table names both parts and the fan-out's phases.
    assert_table(
        &ns,
        "flows",
        &[
            "--quick",
            "--held",
            "200",
            "--sample",
            "10",
            "--children",
            "50",
        ],
        &[
            "held dependents",
            "release latency",
            "fan-out and join",
            "join release",
            "independent, first publish",
        ],
    )
    .await;
    assert_nothing_left(&ns).await;
}

#[tokio::test]
async fn bench_flags_out_of_range_are_one_line() {
    for (args, needle) in [
        (vec!["ingest", "--agents", "0"], "--agents"),
        (vec!["ingest", "--batch", "0"], "--batch"),
        (vec!["ingest", "--rate", "1"], "--rate"),
        (vec!["ingest", "--duration", "0s"], "--duration"),
        (vec!["ingest", "--events", "5"], "--events"),
        (vec!["ingest", "--drain-rounds", "0"], "--drain-rounds"),
        (vec!["ingest", "--drain-rounds", "21"], "--drain-rounds"),
        (vec!["ingest", "--connections", "1000"], "--connections"),
        (vec!["fleet", "--agents", "1"], "--agents"),
        (
            vec!["fleet", "--agents-per-connection", "0"],
            "--agents-per-connection",
        ),
        (vec!["memory", "--tasks", "0"], "--tasks"),
        (vec!["agent", "--payload", "4"], "--payload"),
        (vec!["agent", "--rate", "0"], "--rate"),
        (vec!["agent", "--concurrency", "0"], "--concurrency"),
        (vec!["agent", "--tasks", "1"], "--tasks"),
        (vec!["agent", "--rounds", "0"], "--rounds"),
        (vec!["pipeline", "--stages", "0"], "--stages"),
        (vec!["pipeline", "--concurrency", "0"], "--concurrency"),
        (vec!["pipeline", "--tasks", "5"], "--tasks"),
        (vec!["pipeline", "--payload", "4"], "--payload"),
        (vec!["flows", "--runs", "0"], "--runs"),
        (vec!["flows", "--held", "1"], "--held"),
        (vec!["flows", "--children", "0"], "--children"),
        (vec!["flows", "--children", "10001"], "--children"),
        (vec!["flows", "--work-agents", "0"], "--work-agents"),
        (vec!["flows", "--sample-rate", "0"], "--sample-rate"),
    ] {
        let o = run_bench(&args).await;
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[tokio::test]
async fn guildhall_bench_says_where_it_moved() {
    let o = run_guildhall(&["bench", "ingest", "--quick"]).await;
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("guildhall-bench"), "{err}");
}

//! Criterion benchmarks of the coordinator's ingest path, with no broker:
//!
//! - `envelope/encode/<stage>` and `envelope/decode/<stage>`: one agent's
//!   250-event batch of the simulated mix ([`guildhall_bench::mix`]) in
//!   steady state, through [`EnvelopeBuilder`] and [`guildhall_proto::decode`];
//!   the first stage's batch announces, starts and finishes tasks, the
//!   middle stage's has the planted failures and retries;
//! - `core/apply`: 100,000 events of the mix, already decoded, applied to a
//!   fresh core (three stages, four agents each, in stream order, see
//!   [`Feeder`]), with housekeeping when due as the runtime would run it;
//! - `replay/decode_apply`: what the coordinator does per stream message
//!   when it replays the stream, with no broker: 1,000,000 events of the mix
//!   as encoded envelopes, decoded and applied in stream order to a core
//!   with the default retention (100,000 finished tasks), not caught up;
//! - `scrape/locked` and `scrape/text`: `/metrics` for 10,002 workers (the
//!   first agent of each stage with tasks, the rest heartbeating) and
//!   ~100,000 retained tasks, per-worker series on: what is done under
//!   the core's lock (counters exported, gauges refreshed, the per-worker
//!   rows copied out), then the text written after it;
//! - `snapshot/encode`, `snapshot/decode`, `snapshot/restore`: a core
//!   holding ~100,000 finished three-stage tasks written as a snapshot
//!   (under the core's lock in the coordinator), read back, and restored.
//!
//! Throughput is in events. `cargo bench -p guildhall-bench --bench ingest`; add
//! `-- --profile-time 5` to run without analysis (for a profiler).

use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use guildhall::core::{Core, CoreConfig, snapshot};
use guildhall::metrics::Metrics;
use guildhall_bench::memory::{BATCH, START_MS};
use guildhall_bench::mix::{Feeder, MixConfig, SimFleet};
use guildhall_proto::{Decoded, EnvelopeBuilder, Event};
use std::hint::black_box;
use std::time::Duration;

/// Events applied per `core/apply` iteration.
const APPLY_EVENTS: usize = 100_000;
/// Agents per stage of the simulated fleet.
const AGENTS_PER_STAGE: usize = 4;

/// One steady-state batch of `BATCH` events per stage: the first agent of
/// each stage, after its first batch (which says `Hello`).
fn stage_batches() -> Vec<(String, guildhall_proto::AgentId, Vec<Event>)> {
    let config = MixConfig::three_stages(AGENTS_PER_STAGE, 1);
    let mut fleet = SimFleet::new(&config);
    let mut out = Vec::new();
    for agent in fleet.agents.iter_mut().step_by(AGENTS_PER_STAGE) {
        let mut warm_up = Vec::new();
        agent.take(START_MS, BATCH, &mut warm_up);
        let mut events = Vec::with_capacity(BATCH);
        agent.take(START_MS + 100, BATCH, &mut events);
        out.push((agent.stage().to_string(), agent.id.clone(), events));
    }
    out
}

fn envelope(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope");
    group.throughput(Throughput::Elements(BATCH as u64));
    for (stage, sender, events) in stage_batches() {
        let mut builder = EnvelopeBuilder::default();
        let encode = |builder: &mut EnvelopeBuilder| {
            for e in &events {
                builder.push(e).expect("a mix event encodes");
            }
            builder
                .finish(&sender, 1, 1, START_MS)
                .expect("a 250-event batch fits an envelope")
        };
        let bytes = encode(&mut builder);
        group.bench_function(format!("encode/{stage}"), |b| {
            b.iter(|| black_box(encode(&mut builder)))
        });
        group.bench_function(format!("decode/{stage}"), |b| {
            b.iter(|| black_box(guildhall_proto::decode(black_box(&bytes))))
        });
    }
    group.finish();
}

/// A group whose every iteration is long (a whole core's worth): few
/// samples, throughput in `elements` (events or tasks).
fn slow_group<'a>(
    c: &'a mut Criterion,
    name: &str,
    elements: usize,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .throughput(Throughput::Elements(elements as u64))
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10);
    group
}

/// A core as the coordinator runs it once caught up with the stream.
fn fresh_core() -> Core {
    let config = CoreConfig {
        completed_limit: 1_000_000,
        ..CoreConfig::default()
    };
    let mut core = Core::new(config, Metrics::new(false), START_MS);
    core.set_caught_up(START_MS);
    core
}

/// Applies `envelopes` as the runtime would: each at its send time, then
/// whatever housekeeping is due.
fn apply(core: &mut Core, envelopes: Vec<Decoded>) {
    for (offset, d) in envelopes.into_iter().enumerate() {
        let now_ms = d.envelope.sent_at_ms;
        core.handle_envelope(now_ms, d, Some(offset as u64));
        if core.poll_timeout().is_some_and(|t| t <= now_ms) {
            core.handle_timeout(now_ms);
        }
    }
}

fn core_apply(c: &mut Criterion) {
    let config = MixConfig::three_stages(AGENTS_PER_STAGE, 1);
    let envelopes = Feeder::new(&config, u64::MAX, START_MS, BATCH).envelopes(APPLY_EVENTS);
    let events: usize = envelopes.iter().map(|d| d.envelope.events.len()).sum();
    let mut group = slow_group(c, "core", events);
    group.bench_function("apply", |b| {
        b.iter_batched(
            || (fresh_core(), envelopes.clone()),
            |(mut core, envelopes)| {
                apply(&mut core, envelopes);
                core
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// Events in one `replay` iteration.
const REPLAY_EVENTS: usize = 1_000_000;
/// Agents per stage in `replay`: `guildhall bench ingest`'s 30 agents.
const REPLAY_AGENTS_PER_STAGE: usize = 10;

fn replay(c: &mut Criterion) {
    let config = MixConfig::three_stages(REPLAY_AGENTS_PER_STAGE, 1);
    let decoded = Feeder::new(&config, u64::MAX, START_MS, BATCH).envelopes(REPLAY_EVENTS);
    let events: usize = decoded.iter().map(|d| d.envelope.events.len()).sum();
    let messages: Vec<Vec<u8>> = decoded
        .iter()
        .map(|d| d.envelope.encode().expect("a batch fits an envelope"))
        .collect();
    drop(decoded);
    let now_ms = START_MS + 3_600_000;
    let mut group = slow_group(c, "replay", events);
    group.bench_function("decode_apply", |b| {
        b.iter_batched(
            || Core::new(CoreConfig::default(), Metrics::new(false), now_ms),
            |mut core| {
                for (offset, bytes) in messages.iter().enumerate() {
                    match guildhall_proto::decode(bytes) {
                        Ok(d) => core.handle_envelope(now_ms, d, Some(offset as u64)),
                        Err(e) => panic!("a mix envelope decodes: {e}"),
                    }
                    if offset % 1_000 == 0 && core.poll_timeout().is_some_and(|t| t <= now_ms) {
                        core.handle_timeout(now_ms);
                    }
                }
                core
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// Workers in the `scrape` group: `bench fleet`'s large size.
const SCRAPE_AGENTS_PER_STAGE: usize = 3_334;

fn scrape(c: &mut Criterion) {
    let config = MixConfig::three_stages(SCRAPE_AGENTS_PER_STAGE, 1);
    let metrics = Metrics::new(true);
    let mut core = Core::new(CoreConfig::default(), metrics.clone(), START_MS);
    core.set_caught_up(START_MS);
    // Every agent says Hello; tasks flow through the first agent of each
    // stage until ~100,000 are retained.
    let mut fleet = SimFleet::new(&config);
    let (mut scratch, mut builder) = (Vec::new(), EnvelopeBuilder::default());
    for agent in &mut fleet.agents {
        let bytes = agent
            .envelope(START_MS, 1, &mut scratch, &mut builder)
            .expect("a Hello encodes");
        let hello = guildhall_proto::decode(&bytes).expect("a Hello decodes");
        core.handle_envelope(START_MS, hello, None);
    }
    let small = MixConfig::three_stages(1, 1);
    apply(
        &mut core,
        Feeder::new(&small, 100_000, START_MS, BATCH).envelopes(usize::MAX),
    );
    let now = START_MS + 1_000;
    let workers = core.overview().workers;
    assert!(workers > 10_000, "{workers} workers");
    let mut group = c.benchmark_group("scrape");
    group.sampling_mode(SamplingMode::Flat).sample_size(20);
    group.bench_function("locked", |b| {
        b.iter(|| {
            core.export_worker_counters();
            core.refresh_metrics(now);
            black_box(core.worker_series())
        })
    });
    let rows = core.worker_series();
    group.bench_function("text", |b| {
        b.iter_batched(
            || rows.clone(),
            |rows| black_box(metrics.encode_with(rows)),
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

/// Events fed to the core the `snapshot` group saves: ~100,000 tasks.
const SNAPSHOT_EVENTS: usize = 1_000_000;

fn snapshot(c: &mut Criterion) {
    let config = MixConfig::three_stages(AGENTS_PER_STAGE, 1);
    let envelopes = Feeder::new(&config, u64::MAX, START_MS, BATCH).envelopes(SNAPSHOT_EVENTS);
    let now = envelopes.last().map_or(START_MS, |d| d.envelope.sent_at_ms);
    let mut core = fresh_core();
    apply(&mut core, envelopes);
    let tasks = core.overview().tasks_finished + core.overview().tasks_in_flight;
    let ns: guildhall_proto::Namespace = "bench".parse().expect("a valid namespace");
    let bytes = core.encode_snapshot(&ns, now).expect("the state encodes");
    eprintln!("snapshot: {tasks} tasks, {} bytes", bytes.len());
    let mut group = slow_group(c, "snapshot", tasks);
    group.bench_function("encode", |b| {
        b.iter(|| black_box(core.encode_snapshot(&ns, now)))
    });
    group.bench_function("decode", |b| {
        b.iter(|| black_box(snapshot::decode(&bytes, &ns)))
    });
    group.bench_function("restore", |b| {
        b.iter_batched(
            || snapshot::decode(&bytes, &ns).expect("the snapshot decodes"),
            |snap| Core::restore(snap, CoreConfig::default(), Metrics::new(false), now),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .without_plots();
    targets = envelope, core_apply, replay, scrape, snapshot
}
criterion_main!(benches);

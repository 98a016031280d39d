//! `guildhall simulate`: a discrete-event simulation of a pipeline under an
//! arrival trace, comparing scaling policies. The `predictive` policy is the
//! coordinator's own [`crate::capacity::Planner`], fed what the core feeds
//! it; `reactive` is KEDA's RabbitMQ `QueueLength` rule through the HPA;
//! `static` provisions for the trace's peak.
//!
//! ```sh
//! guildhall simulate --generate diurnal --days 7 --seed 1 --policy all
//! guildhall simulate --generate spike --write spike.csv
//! guildhall simulate --trace spike.csv --stages 'build:median=10s;report:dist=exponential,mean=1s' --json
//! ```
//!
//! For each policy it reports the share of minutes in which the wait target
//! held at the chosen quantile, the p50/p95/p99 queue waits, worker-minutes,
//! the peak worker count, scale actions and (predictive) the forecast's
//! MASE, as a table or JSON (`--json`). Runs are deterministic for a seed.
//!
//! Defaults, and why: one stage of lognormal service times (median 4 s,
//! σ 0.6: mean 4.8 s); wait target 30 s for 95% of tasks; start-up 60 s (also
//! the predictive lead time); sync every 15 s; HPA tolerance 10% and
//! scale-down window 300 s for both scaling policies; 1 to 1,000 workers.
//! The reactive queue target defaults to what one worker clears within the
//! wait target (⌊target × slots / mean service⌋, 6 for the defaults): the
//! value a user would pick for a 30 s target. Reactive and predictive start
//! with the workers the first bucket's rate needs, ready (as if the system
//! had been running).
//!
//! # Layout
//!
//! - this file: the flags ([`SimulateArgs`]), their validation and [`run`];
//! - the engine, in `guildhall-core` (`guildhall_core::sim`), re-exported:
//! - [`trace`]: the trace format, its parser and the generators;
//! - [`spec`]: `--stages` and service-time distributions;
//! - [`engine`]: the event loop, workers, accounting;
//! - [`policy`]: static, reactive and predictive;
//! - [`report`]: results, the table and JSON;
//! - [`rng`]: the seeded random-number generator.

pub use guildhall_core::sim::{engine, policy, report, rng, spec, trace};

#[cfg(test)]
mod tests;

use crate::capacity::{CapacityConfig, format_wait, queueing};
use crate::config::ConfigError;
use clap::Args;
use engine::{SYNC_MS, Setup};
use policy::{Policy, PolicyKind};
use report::{PolicyReport, thousands};
use serde::Serialize;
use spec::StageSpec;
use std::path::PathBuf;
use std::time::Duration;
use trace::{Generate, Trace};

/// `guildhall simulate`. Values are read as text and checked here, so every
/// bad value is one line (exit status 2).
#[derive(Debug, Clone, Default, Args)]
pub struct SimulateArgs {
    /// Arrival trace: lines of `seconds,rate_per_second` (`#` comments).
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Generate the trace instead: diurnal, spike, step or noisy.
    #[arg(long, value_name = "KIND")]
    pub generate: Option<String>,
    /// Days to generate (default: 7 for diurnal, 1 for the others).
    #[arg(long, allow_hyphen_values = true)]
    pub days: Option<String>,
    /// Seed of the generated trace and of the simulation's random streams.
    #[arg(long, default_value = "1", allow_hyphen_values = true)]
    pub seed: String,
    /// Save the generated trace to FILE instead of simulating.
    #[arg(long, value_name = "FILE")]
    pub write: Option<PathBuf>,
    /// Policy: static, reactive, predictive or all (repeatable; default all).
    #[arg(long = "policy", value_name = "POLICY")]
    pub policies: Vec<String>,
    /// The pipeline, in order: NAME[:key=value,...] per stage, separated by
    /// ';'. Keys: dist (lognormal|exponential|constant), median, spread,
    /// mean, slots, workers, target. Default: work:median=4s,spread=0.6.
    #[arg(long, value_name = "SPEC", allow_hyphen_values = true)]
    pub stages: Vec<String>,
    /// static: workers per stage (default: sized for the trace's peak rate).
    #[arg(long, allow_hyphen_values = true)]
    pub workers: Option<String>,
    /// reactive: ready messages per worker, KEDA's `value` (default: what
    /// one worker clears within the wait target).
    #[arg(long, allow_hyphen_values = true)]
    pub queue_target: Option<String>,
    /// Time from starting a worker to its first task (the predictive lead time).
    #[arg(long, default_value = "60s", allow_hyphen_values = true)]
    pub startup: String,
    /// Queue wait target (per stage: `target=` in --stages).
    #[arg(long, default_value = "30s", allow_hyphen_values = true)]
    pub wait_target: String,
    /// Share of tasks allowed to wait longer than the target.
    #[arg(long, default_value = "0.05", allow_hyphen_values = true)]
    pub wait_quantile: String,
    /// Scale down only to the highest recommendation of this window (both
    /// scaling policies).
    #[arg(long, default_value = "300s", allow_hyphen_values = true)]
    pub scale_down_window: String,
    /// Most workers per stage.
    #[arg(long, default_value = "1000", allow_hyphen_values = true)]
    pub max_workers: String,
    /// Forecast bucket width.
    #[arg(long, default_value = "1m", allow_hyphen_values = true)]
    pub bucket: String,
    /// Forecast season (a whole number of buckets).
    #[arg(long, default_value = "1d", allow_hyphen_values = true)]
    pub season: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Validated flags.
#[derive(Debug, Clone)]
pub struct Simulation {
    /// What every run shares.
    pub setup: Setup,
    /// The policies, in report order.
    pub policies: Vec<PolicyKind>,
    /// The planner's configuration (predictive).
    pub capacity: CapacityConfig,
    /// static: workers per stage.
    pub static_workers: Vec<u32>,
    /// reactive: ready messages per worker, per stage.
    pub queue_targets: Vec<u32>,
    /// JSON output.
    pub json: bool,
    /// `--write`: save the generated trace here instead of simulating.
    pub write: Option<PathBuf>,
}

fn bad(msg: String) -> ConfigError {
    ConfigError(msg)
}

fn duration_ms(flag: &str, value: &str, allow_zero: bool) -> Result<u64, ConfigError> {
    let d: Duration = humantime::parse_duration(value.trim()).map_err(|_| {
        bad(format!(
            "{flag} must be a duration like 30s or 2m (got '{value}')"
        ))
    })?;
    if !allow_zero && d.is_zero() {
        return Err(bad(format!("{flag} must be more than 0 (got '{value}')")));
    }
    Ok(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn whole(flag: &str, value: &str, lo: u64, hi: u64) -> Result<u64, ConfigError> {
    value
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|v| (lo..=hi).contains(v))
        .ok_or_else(|| {
            bad(format!(
                "{flag} must be a whole number from {lo} to {hi} (got '{value}')"
            ))
        })
}

impl SimulateArgs {
    /// Checks the flags, reads or generates the trace.
    pub fn validate(&self) -> Result<Simulation, ConfigError> {
        let seed = whole("--seed", &self.seed, 0, u64::MAX)?;
        let trace = self.load_trace(seed)?;
        let policies = self.policy_kinds()?;
        let stages = spec::parse_stages(&self.stages).map_err(|e| bad(e.to_string()))?;
        let startup_ms = duration_ms("--startup", &self.startup, true)?;
        if startup_ms > 3_600_000 {
            return Err(bad(format!(
                "--startup must be at most 1h (got '{}')",
                self.startup
            )));
        }
        let wait_target_ms = duration_ms("--wait-target", &self.wait_target, false)?;
        let quantile = self
            .wait_quantile
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|q| *q > 0.0 && *q < 1.0)
            .ok_or_else(|| {
                bad(format!(
                    "--wait-quantile must be a number between 0 and 1, exclusive (got '{}')",
                    self.wait_quantile
                ))
            })?;
        let window_ms = duration_ms("--scale-down-window", &self.scale_down_window, true)?;
        let max_workers = whole("--max-workers", &self.max_workers, 1, 100_000)? as u32;
        let bucket_ms = duration_ms("--bucket", &self.bucket, false)?;
        if !(1_000..=86_400_000).contains(&bucket_ms) {
            return Err(bad(format!(
                "--bucket must be between 1s and 1d (got '{}')",
                self.bucket
            )));
        }
        let season_ms = duration_ms("--season", &self.season, false)?;
        let season_buckets = season_ms / bucket_ms;
        if season_ms % bucket_ms != 0 || !(2..=10_080).contains(&season_buckets) {
            return Err(bad(format!(
                "--season must be 2 to 10080 whole --bucket widths (got '{}' with buckets of '{}')",
                self.season, self.bucket
            )));
        }
        let capacity = CapacityConfig {
            bucket_ms,
            season_buckets: season_buckets as u32,
            wait_target_ms,
            stage_wait_targets: stages
                .iter()
                .filter_map(|s| Some((s.name.clone(), s.target_ms?)))
                .collect(),
            wait_quantile: quantile,
            lead_time_ms: startup_ms,
            scale_down_window_ms: window_ms,
            max_workers,
            ..CapacityConfig::default()
        };
        capacity.validate().map_err(|e| bad(e.to_string()))?;
        let targets_ms: Vec<u64> = stages
            .iter()
            .map(|s| capacity.wait_target_for(&s.name))
            .collect();
        let size = |s: &StageSpec, target: u64, rate: f64| -> u32 {
            let max_servers = max_workers.saturating_mul(s.slots);
            let servers = queueing::servers_for_target(
                rate,
                s.dist.mean_ms(),
                1.0,
                s.dist.scv(),
                target as f64,
                quantile,
                max_servers,
            )
            .servers;
            servers.div_ceil(s.slots).clamp(1, max_workers)
        };
        let static_default = match &self.workers {
            Some(v) => Some(whole("--workers", v, 1, u64::from(max_workers))? as u32),
            None => None,
        };
        let static_workers = stages
            .iter()
            .zip(&targets_ms)
            .map(|(s, &t)| {
                s.workers
                    .or(static_default)
                    .unwrap_or_else(|| size(s, t, trace.peak_rate()))
            })
            .collect();
        let queue_default = match &self.queue_target {
            Some(v) => Some(whole("--queue-target", v, 1, 1_000_000)? as u32),
            None => None,
        };
        let queue_targets = stages
            .iter()
            .zip(&targets_ms)
            .map(|(s, &t)| {
                queue_default.unwrap_or_else(|| {
                    let per_worker = t as f64 * f64::from(s.slots) / s.dist.mean_ms();
                    (per_worker.floor() as u32).max(1)
                })
            })
            .collect();
        let first_rate = trace.buckets.first().map_or(0.0, |b| b.1);
        let initial_workers = stages
            .iter()
            .zip(&targets_ms)
            .map(|(s, &t)| size(s, t, first_rate))
            .collect();
        if self.write.is_some() && self.generate.is_none() {
            return Err(bad("--write applies to --generate only".into()));
        }
        Ok(Simulation {
            setup: Setup {
                trace,
                stages,
                targets_ms,
                quantile,
                startup_ms,
                seed,
                initial_workers,
            },
            policies,
            capacity,
            static_workers,
            queue_targets,
            json: self.json,
            write: self.write.clone(),
        })
    }

    fn load_trace(&self, seed: u64) -> Result<Trace, ConfigError> {
        match (&self.trace, &self.generate) {
            (Some(_), Some(_)) => Err(bad("--trace and --generate cannot be used together".into())),
            (None, None) => Err(bad(
                "give --trace FILE or --generate diurnal|spike|step|noisy".into(),
            )),
            (Some(path), None) => {
                if self.days.is_some() {
                    return Err(bad("--days applies to --generate only".into()));
                }
                let text = std::fs::read_to_string(path)
                    .map_err(|e| bad(format!("--trace: cannot read {}: {e}", path.display())))?;
                Trace::parse(&path.display().to_string(), &text).map_err(|e| bad(e.to_string()))
            }
            (None, Some(kind)) => {
                let Some(g) = Generate::parse(kind.trim()) else {
                    return Err(bad(format!(
                        "--generate must be diurnal, spike, step or noisy (got '{kind}')"
                    )));
                };
                let days = match &self.days {
                    Some(d) => whole("--days", d, 1, 90)? as u32,
                    None => g.default_days(),
                };
                Ok(Trace::generate(g, days, seed))
            }
        }
    }

    fn policy_kinds(&self) -> Result<Vec<PolicyKind>, ConfigError> {
        let mut kinds = Vec::new();
        for value in self.policies.iter().flat_map(|v| v.split(',')) {
            match value.trim() {
                "all" => kinds.extend(PolicyKind::ALL),
                "static" => kinds.push(PolicyKind::Static),
                "reactive" => kinds.push(PolicyKind::Reactive),
                "predictive" => kinds.push(PolicyKind::Predictive),
                other => {
                    return Err(bad(format!(
                        "--policy must be static, reactive, predictive or all (got '{other}')"
                    )));
                }
            }
        }
        if kinds.is_empty() {
            kinds.extend(PolicyKind::ALL);
        }
        kinds.sort();
        kinds.dedup();
        Ok(kinds)
    }
}

impl Simulation {
    /// Runs one policy.
    pub fn run_policy(&self, kind: PolicyKind) -> PolicyReport {
        let policy = match kind {
            PolicyKind::Static => Policy::fixed(self.static_workers.clone()),
            PolicyKind::Reactive => Policy::reactive(
                self.queue_targets.clone(),
                &self.capacity,
                &self.setup.initial_workers,
            ),
            PolicyKind::Predictive => Policy::predictive(
                self.setup.stages.iter().map(|s| s.name.clone()).collect(),
                self.capacity.clone(),
            ),
        };
        engine::simulate(&self.setup, policy, kind.name())
    }

    /// Runs every policy asked for.
    pub fn run_all(&self) -> Vec<PolicyReport> {
        self.policies.iter().map(|&k| self.run_policy(k)).collect()
    }

    /// The lines above the table.
    fn header(&self) -> String {
        let t = &self.setup.trace;
        let mut out = format!(
            "trace: {} ({} buckets over {:.1} days, about {} tasks, peak {:.2}/s)\n",
            t.label,
            t.buckets.len(),
            t.end_ms as f64 / 86_400_000.0,
            thousands(t.expected_tasks()),
            t.peak_rate()
        );
        for (i, s) in self.setup.stages.iter().enumerate() {
            out.push_str(&format!(
                "stage {}: {}, {} slot(s) per worker, wait target {}; static {} worker(s), reactive queue target {}/worker\n",
                s.name,
                s.dist.describe(),
                s.slots,
                format_wait(self.setup.targets_ms[i] as f64),
                self.static_workers[i],
                self.queue_targets[i],
            ));
        }
        out.push_str(&format!(
            "target met = share of minutes whose tasks' p{} queue wait is within the target; start-up {}, sync every {}, scale-down window {}\n\n",
            100.0 - self.setup.quantile * 100.0,
            format_wait(self.setup.startup_ms as f64),
            format_wait(SYNC_MS as f64),
            format_wait(self.capacity.scale_down_window_ms as f64),
        ));
        out
    }

    /// The JSON document.
    fn json(&self, reports: &[PolicyReport]) -> serde_json::Value {
        #[derive(Serialize)]
        struct StageJson<'a> {
            stage: &'a str,
            service: String,
            service_mean_ms: f64,
            slots: u32,
            wait_target_ms: u64,
            static_workers: u32,
            queue_target: u32,
        }
        let t = &self.setup.trace;
        serde_json::json!({
            "trace": {
                "label": t.label,
                "buckets": t.buckets.len(),
                "seconds": t.end_ms as f64 / 1000.0,
                "expected_tasks": t.expected_tasks().round(),
                "peak_rate": t.peak_rate(),
            },
            "stages": self.setup.stages.iter().enumerate().map(|(i, s)| StageJson {
                stage: s.name.as_str(),
                service: s.dist.describe(),
                service_mean_ms: s.dist.mean_ms(),
                slots: s.slots,
                wait_target_ms: self.setup.targets_ms[i],
                static_workers: self.static_workers[i],
                queue_target: self.queue_targets[i],
            }).collect::<Vec<_>>(),
            "wait_quantile": self.setup.quantile,
            "startup_ms": self.setup.startup_ms,
            "sync_ms": SYNC_MS,
            "scale_down_window_ms": self.capacity.scale_down_window_ms,
            "seed": self.setup.seed,
            "policies": reports,
        })
    }
}

/// `guildhall simulate`: the report as text (or JSON). Bad flags and
/// malformed traces are [`ConfigError`]s (exit status 2).
pub fn run(args: &SimulateArgs) -> anyhow::Result<String> {
    let sim = args.validate()?;
    if let Some(path) = &sim.write {
        std::fs::write(path, sim.setup.trace.to_csv())
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        return Ok(format!(
            "wrote {} ({} buckets) to {}\n",
            sim.setup.trace.label,
            sim.setup.trace.buckets.len(),
            path.display()
        ));
    }
    let reports = sim.run_all();
    if sim.json {
        let mut out = serde_json::to_string_pretty(&sim.json(&reports))?;
        out.push('\n');
        Ok(out)
    } else {
        Ok(format!("{}{}", sim.header(), report::table(&reports)))
    }
}

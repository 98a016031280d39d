//! `--stages`: the simulated pipeline.
//!
//! Stages are given in pipeline order, separated by `;` (or with `--stages`
//! given several times). Each is `NAME` or `NAME:key=value,key=value...`:
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `dist` | service-time distribution: `lognormal`, `exponential` or `constant` | `lognormal` |
//! | `median` | lognormal: the median service time | `4s` |
//! | `spread` | lognormal: σ of the log (0 = always the median), 0 to 5 | `0.6` |
//! | `mean` | exponential or constant: the mean service time | `4s` |
//! | `slots` | tasks one worker handles at once (its concurrency), 1 to 1024 | `1` |
//! | `workers` | the `static` policy's worker count for this stage | `--workers`, else sized to the trace's peak |
//! | `target` | this stage's wait target | `--wait-target` |
//!
//! For example `--stages 'build:median=10s,spread=0.8;report:dist=exponential,mean=1s'`.
//! The default is one stage, `work:median=4s,spread=0.6` (mean 4.8 s, service
//! SCV 0.43).

use super::rng::SimRng;
use guildhall_proto::Stage;
use rand_distr::{Distribution, LogNormal};
use std::time::Duration;

/// Most stages in a simulated pipeline.
pub const MAX_STAGES: usize = 16;

/// A bad `--stages` value: one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--stages: {0}")]
pub struct SpecError(pub String);

/// A service-time distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ServiceDist {
    /// Lognormal with this median (ms) and σ of the log.
    LogNormal {
        /// Median, ms.
        median_ms: f64,
        /// σ of ln(service time).
        spread: f64,
    },
    /// Exponential with this mean (ms).
    Exponential {
        /// Mean, ms.
        mean_ms: f64,
    },
    /// Always this long (ms).
    Constant {
        /// The time, ms.
        mean_ms: f64,
    },
}

impl ServiceDist {
    /// Mean service time, ms.
    pub fn mean_ms(&self) -> f64 {
        match *self {
            ServiceDist::LogNormal { median_ms, spread } => {
                median_ms * (spread * spread / 2.0).exp()
            }
            ServiceDist::Exponential { mean_ms } | ServiceDist::Constant { mean_ms } => mean_ms,
        }
    }

    /// Squared coefficient of variation.
    pub fn scv(&self) -> f64 {
        match *self {
            ServiceDist::LogNormal { spread, .. } => (spread * spread).exp() - 1.0,
            ServiceDist::Exponential { .. } => 1.0,
            ServiceDist::Constant { .. } => 0.0,
        }
    }

    /// For the report: "lognormal median 4 s spread 0.6 (mean 4.8 s)".
    pub fn describe(&self) -> String {
        let f = |ms: f64| crate::capacity::format_wait(ms);
        match *self {
            ServiceDist::LogNormal { median_ms, spread } => format!(
                "lognormal median {} spread {spread} (mean {})",
                f(median_ms),
                f(self.mean_ms())
            ),
            ServiceDist::Exponential { mean_ms } => format!("exponential mean {}", f(mean_ms)),
            ServiceDist::Constant { mean_ms } => format!("constant {}", f(mean_ms)),
        }
    }
}

/// Draws service times (ms) from a [`ServiceDist`].
#[derive(Debug, Clone)]
pub struct ServiceSampler {
    /// The distribution.
    dist: ServiceDist,
    /// The lognormal, built once.
    lognormal: Option<LogNormal<f64>>,
    /// Its own random stream.
    rng: SimRng,
}

impl ServiceSampler {
    /// A sampler with its own stream.
    pub fn new(dist: ServiceDist, rng: SimRng) -> Self {
        let lognormal = match dist {
            ServiceDist::LogNormal { median_ms, spread } if median_ms > 0.0 && spread > 0.0 => {
                LogNormal::new(median_ms.ln(), spread).ok()
            }
            _ => None,
        };
        Self {
            dist,
            lognormal,
            rng,
        }
    }

    /// One service time, ms (at least 1).
    pub fn sample(&mut self) -> u64 {
        let ms = match self.dist {
            ServiceDist::LogNormal { median_ms, .. } => match &self.lognormal {
                Some(d) => d.sample(&mut self.rng),
                None => median_ms,
            },
            ServiceDist::Exponential { mean_ms } => mean_ms * self.rng.exp1(),
            ServiceDist::Constant { mean_ms } => mean_ms,
        };
        (ms.round() as u64).max(1)
    }
}

/// One simulated stage.
#[derive(Debug, Clone, PartialEq)]
pub struct StageSpec {
    /// Its name.
    pub name: Stage,
    /// Service times.
    pub dist: ServiceDist,
    /// Concurrency of one worker.
    pub slots: u32,
    /// The static policy's count, if given for this stage.
    pub workers: Option<u32>,
    /// This stage's wait target, if it differs from `--wait-target`.
    pub target_ms: Option<u64>,
}

/// The default pipeline.
pub const DEFAULT_STAGES: &str = "work:median=4s,spread=0.6";

fn duration_ms(key: &str, value: &str, entry: &str) -> Result<f64, SpecError> {
    let d: Duration = humantime::parse_duration(value).map_err(|_| {
        SpecError(format!(
            "{key} must be a duration like 4s or 250ms (got {value:?} in {entry:?})"
        ))
    })?;
    if d.is_zero() || d > Duration::from_secs(86_400) {
        return Err(SpecError(format!(
            "{key} must be more than 0 and at most 1d (got {value:?} in {entry:?})"
        )));
    }
    Ok(d.as_secs_f64() * 1000.0)
}

/// Parses every `--stages` value (each may hold several stages separated by
/// `;`); the default pipeline when there are none.
pub fn parse_stages(values: &[String]) -> Result<Vec<StageSpec>, SpecError> {
    let entries: Vec<&str> = if values.is_empty() {
        vec![DEFAULT_STAGES]
    } else {
        values
            .iter()
            .flat_map(|v| v.split(';'))
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect()
    };
    if entries.is_empty() {
        return Err(SpecError("no stage given".into()));
    }
    if entries.len() > MAX_STAGES {
        return Err(SpecError(format!(
            "at most {MAX_STAGES} stages (got {})",
            entries.len()
        )));
    }
    let mut out: Vec<StageSpec> = Vec::new();
    for entry in entries {
        let spec = parse_stage(entry)?;
        if out.iter().any(|s| s.name == spec.name) {
            return Err(SpecError(format!("stage {} is given twice", spec.name)));
        }
        out.push(spec);
    }
    Ok(out)
}

fn parse_stage(entry: &str) -> Result<StageSpec, SpecError> {
    let (name, rest) = entry.split_once(':').unwrap_or((entry, ""));
    let name: Stage = name
        .trim()
        .parse()
        .map_err(|e| SpecError(format!("{e} (in {entry:?})")))?;
    let mut dist = "lognormal".to_string();
    let (mut median, mut spread, mut mean) = (None, None, None);
    let mut spec = StageSpec {
        name,
        dist: ServiceDist::Constant { mean_ms: 0.0 },
        slots: 1,
        workers: None,
        target_ms: None,
    };
    for pair in rest.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(SpecError(format!(
                "expected key=value (got {pair:?} in {entry:?})"
            )));
        };
        let (key, value) = (key.trim(), value.trim());
        let count = |lo: u32, hi: u32| {
            value
                .parse::<u32>()
                .ok()
                .filter(|v| (lo..=hi).contains(v))
                .ok_or_else(|| {
                    SpecError(format!(
                        "{key} must be a whole number from {lo} to {hi} (got {value:?} in {entry:?})"
                    ))
                })
        };
        match key {
            "dist" => dist = value.to_string(),
            "median" => median = Some(duration_ms(key, value, entry)?),
            "mean" => mean = Some(duration_ms(key, value, entry)?),
            "spread" => {
                let v = value
                    .parse::<f64>()
                    .ok()
                    .filter(|v| (0.0..=5.0).contains(v))
                    .ok_or_else(|| {
                        SpecError(format!(
                            "spread must be a number from 0 to 5 (got {value:?} in {entry:?})"
                        ))
                    })?;
                spread = Some(v);
            }
            "slots" => spec.slots = count(1, 1024)?,
            "workers" => spec.workers = Some(count(1, 100_000)?),
            "target" => spec.target_ms = Some(duration_ms(key, value, entry)?.round() as u64),
            other => {
                return Err(SpecError(format!(
                    "unknown key {other:?} in {entry:?} (expected dist, median, spread, mean, slots, workers or target)"
                )));
            }
        }
    }
    spec.dist = match dist.as_str() {
        "lognormal" => {
            if mean.is_some() {
                return Err(SpecError(format!(
                    "a lognormal stage takes median and spread, not mean (in {entry:?})"
                )));
            }
            ServiceDist::LogNormal {
                median_ms: median.unwrap_or(4000.0),
                spread: spread.unwrap_or(0.6),
            }
        }
        "exponential" | "constant" => {
            if median.is_some() || spread.is_some() {
                return Err(SpecError(format!(
                    "an {dist} stage takes mean, not median or spread (in {entry:?})"
                )));
            }
            let mean_ms = mean.unwrap_or(4000.0);
            if dist == "exponential" {
                ServiceDist::Exponential { mean_ms }
            } else {
                ServiceDist::Constant { mean_ms }
            }
        }
        other => {
            return Err(SpecError(format!(
                "unknown distribution {other:?} in {entry:?} (expected lognormal, exponential or constant)"
            )));
        }
    };
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &[&str]) -> Result<Vec<StageSpec>, SpecError> {
        parse_stages(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn stages_parse() {
        let d = parse(&[]).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].name.as_str(), "work");
        assert!((d[0].dist.mean_ms() - 4000.0 * 0.18f64.exp()).abs() < 1e-6);
        let s = parse(&[
            "build:median=10s,spread=0.8,slots=4,workers=7,target=20s; report:dist=exponential,mean=1s",
            "ship:dist=constant,mean=250ms",
        ])
        .unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].slots, 4);
        assert_eq!(s[0].workers, Some(7));
        assert_eq!(s[0].target_ms, Some(20_000));
        assert_eq!(s[1].dist, ServiceDist::Exponential { mean_ms: 1000.0 });
        assert_eq!(s[2].dist.scv(), 0.0);
        assert_eq!(s[1].dist.scv(), 1.0);
    }

    #[test]
    fn bad_stages_are_one_line() {
        for (v, want) in [
            ("a b", "--stages: invalid stage"),
            ("build:speed=3", "unknown key \"speed\""),
            ("build:dist=gamma", "unknown distribution \"gamma\""),
            ("build:median=fast", "median must be a duration"),
            ("build:median=0s", "median must be more than 0"),
            ("build:spread=9", "spread must be a number from 0 to 5"),
            (
                "build:slots=0",
                "slots must be a whole number from 1 to 1024",
            ),
            ("build:target=-5s", "target must be a duration"),
            ("build:target=0s", "target must be more than 0"),
            ("build:dist=exponential,median=1s", "takes mean"),
            ("build:mean=1s", "takes median and spread"),
            ("build;build", "stage build is given twice"),
            ("build:median", "expected key=value"),
            (";", "no stage given"),
        ] {
            let e = parse(&[v]).unwrap_err().to_string();
            assert!(e.contains(want), "{v}: {e}");
            assert!(e.starts_with("--stages: ") && !e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn samples_follow_the_distribution() {
        let mut s = ServiceSampler::new(
            ServiceDist::LogNormal {
                median_ms: 4000.0,
                spread: 0.6,
            },
            SimRng::new(1, 1),
        );
        let mut xs: Vec<u64> = (0..20_000).map(|_| s.sample()).collect();
        xs.sort_unstable();
        let median = xs[10_000] as f64;
        assert!((median - 4000.0).abs() < 150.0, "{median}");
        let mean = xs.iter().sum::<u64>() as f64 / xs.len() as f64;
        assert!((mean - 4000.0 * 0.18f64.exp()).abs() < 150.0, "{mean}");
        let mut e = ServiceSampler::new(
            ServiceDist::Exponential { mean_ms: 1000.0 },
            SimRng::new(1, 2),
        );
        let mean = (0..20_000).map(|_| e.sample()).sum::<u64>() as f64 / 20_000.0;
        assert!((mean - 1000.0).abs() < 40.0, "{mean}");
    }
}

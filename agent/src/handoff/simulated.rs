//! The built-in simulated worker, for demos and benchmarks: it "works" for a
//! lognormal time, fails now and then, and returns its input as output.
//!
//! Configured by a SPEC of comma-separated `key=value` pairs, for example
//! `median=200ms,spread=0.5,fail=0.02,permanent=0.005`:
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `median` | median service time (a duration) | `200ms` |
//! | `spread` | sigma of the lognormal (0 = always the median) | `0.5` |
//! | `fail` | probability of a retryable failure (class `simulated`) | `0` |
//! | `permanent` | probability of a permanent failure (class `simulated_permanent`) | `0` |

use super::{Failure, NextStage, Outcome, TaskInput};
use rand::Rng;
use rand_distr::{Distribution, LogNormal};
use std::str::FromStr;
use std::time::Duration;

/// Why a SPEC was refused. Displays as one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SimulateSpecError(String);

/// Parameters of the simulated worker.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulateSpec {
    /// Median service time.
    pub median: Duration,
    /// Sigma of the lognormal service time: the spread around the median.
    pub spread: f64,
    /// Probability that an attempt fails retryably.
    pub fail: f64,
    /// Probability that an attempt fails permanently.
    pub permanent: f64,
}

impl Default for SimulateSpec {
    fn default() -> Self {
        Self {
            median: Duration::from_millis(200),
            spread: 0.5,
            fail: 0.0,
            permanent: 0.0,
        }
    }
}

impl SimulateSpec {
    /// Checks the ranges: probabilities in 0..=1 adding up to at most 1,
    /// spread in 0..=5, median at most an hour.
    pub fn validate(&self) -> Result<(), SimulateSpecError> {
        let probability = |key: &str, p: f64| {
            if (0.0..=1.0).contains(&p) {
                Ok(())
            } else {
                Err(SimulateSpecError(format!(
                    "{key} must be between 0 and 1 (got {p})"
                )))
            }
        };
        probability("fail", self.fail)?;
        probability("permanent", self.permanent)?;
        if self.fail + self.permanent > 1.0 {
            return Err(SimulateSpecError(format!(
                "fail + permanent must be at most 1 (got {})",
                self.fail + self.permanent
            )));
        }
        if !(0.0..=5.0).contains(&self.spread) {
            return Err(SimulateSpecError(format!(
                "spread must be between 0 and 5 (got {})",
                self.spread
            )));
        }
        if self.median > Duration::from_secs(3600) {
            return Err(SimulateSpecError(format!(
                "median must be at most 1h (got {})",
                humantime::format_duration(self.median)
            )));
        }
        Ok(())
    }
}

impl FromStr for SimulateSpec {
    type Err = SimulateSpecError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut out = SimulateSpec::default();
        for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(SimulateSpecError(format!(
                    "expected key=value, got {pair:?}"
                )));
            };
            let (key, value) = (key.trim(), value.trim());
            let number = || {
                value
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| SimulateSpecError(format!("{key}: {value:?} is not a number")))
            };
            match key {
                "median" => {
                    out.median = humantime::parse_duration(value).map_err(|e| {
                        SimulateSpecError(format!("median: invalid duration {value:?} ({e})"))
                    })?
                }
                "spread" => out.spread = number()?,
                "fail" => out.fail = number()?,
                "permanent" => out.permanent = number()?,
                other => {
                    return Err(SimulateSpecError(format!(
                        "unknown key {other:?} (expected median, spread, fail or permanent)"
                    )));
                }
            }
        }
        out.validate()?;
        Ok(out)
    }
}

/// What the simulation decided for one attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Draw {
    /// How long the attempt "works".
    pub service_time: Duration,
    /// `None` for success.
    pub failure: Option<Failure>,
}

/// The simulated worker.
#[derive(Debug)]
pub struct SimulatedWorker {
    /// Its parameters.
    spec: SimulateSpec,
    /// The service time distribution; `None` when the median is zero.
    service: Option<LogNormal<f64>>,
    /// Longest an attempt may take; longer draws become timeouts.
    timeout: Duration,
}

impl SimulatedWorker {
    /// A worker for `spec` (assumed validated), bounded by `timeout`.
    pub fn new(spec: SimulateSpec, timeout: Duration) -> Self {
        let median = spec.median.as_secs_f64();
        let service = (median > 0.0)
            .then(|| LogNormal::new(median.ln(), spec.spread).ok())
            .flatten();
        Self {
            spec,
            service,
            timeout,
        }
    }

    /// Draws one attempt's service time and result.
    pub fn draw<R: Rng + ?Sized>(&self, rng: &mut R) -> Draw {
        let service_time = match &self.service {
            Some(dist) => Duration::try_from_secs_f64(dist.sample(rng)).unwrap_or(self.timeout),
            None => self.spec.median,
        };
        let u: f64 = rng.random();
        let failure = if u < self.spec.permanent {
            Some(Failure::permanent(
                "simulated_permanent",
                "simulated permanent failure",
            ))
        } else if u < self.spec.permanent + self.spec.fail {
            Some(Failure::retryable("simulated", "simulated failure"))
        } else {
            None
        };
        Draw {
            service_time,
            failure,
        }
    }

    /// "Processes" one task: waits the drawn time, then echoes the payload.
    pub async fn handle(&self, task: &TaskInput) -> Outcome {
        let draw = self.draw(&mut rand::rng());
        if draw.service_time > self.timeout {
            tokio::time::sleep(self.timeout).await;
            return Outcome::Failure(Failure::timeout(format!(
                "simulated work took over {}",
                humantime::format_duration(self.timeout)
            )));
        }
        tokio::time::sleep(draw.service_time).await;
        match draw.failure {
            Some(failure) => Outcome::Failure(failure),
            None => Outcome::Success {
                payload: task.payload.clone(),
                next: NextStage::Default,
                priority: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn specs_parse_with_defaults_for_missing_keys() {
        let spec: SimulateSpec = "median=50ms, spread=0.2,fail=0.02,permanent=0.005"
            .parse()
            .unwrap();
        assert_eq!(
            spec,
            SimulateSpec {
                median: Duration::from_millis(50),
                spread: 0.2,
                fail: 0.02,
                permanent: 0.005
            }
        );
        assert_eq!("".parse::<SimulateSpec>().unwrap(), SimulateSpec::default());
        let spec: SimulateSpec = "fail=0.5".parse().unwrap();
        assert_eq!(spec.median, Duration::from_millis(200));
        assert_eq!(spec.fail, 0.5);
    }

    #[test]
    fn bad_specs_say_what_is_wrong_on_one_line() {
        for (spec, expected) in [
            (
                "speed=3",
                "unknown key \"speed\" (expected median, spread, fail or permanent)",
            ),
            ("median", "expected key=value, got \"median\""),
            ("fail=lots", "fail: \"lots\" is not a number"),
            ("fail=1.5", "fail must be between 0 and 1 (got 1.5)"),
            (
                "permanent=-0.1",
                "permanent must be between 0 and 1 (got -0.1)",
            ),
            (
                "fail=0.6,permanent=0.6",
                "fail + permanent must be at most 1",
            ),
            ("spread=NaN", "spread: \"NaN\" is not a number"),
            ("spread=9", "spread must be between 0 and 5 (got 9)"),
            ("median=fast", "median: invalid duration \"fast\""),
            ("median=2h", "median must be at most 1h (got 2h)"),
        ] {
            let err = spec.parse::<SimulateSpec>().unwrap_err().to_string();
            assert!(err.starts_with(expected), "{spec}: {err:?}");
            assert!(!err.contains('\n'));
        }
    }

    #[test]
    fn draws_follow_the_spec() {
        let spec: SimulateSpec = "median=100ms,spread=0.5,fail=0.2,permanent=0.1"
            .parse()
            .unwrap();
        let worker = SimulatedWorker::new(spec, Duration::from_secs(60));
        let mut rng = StdRng::seed_from_u64(7);
        let draws: Vec<Draw> = (0..10_000).map(|_| worker.draw(&mut rng)).collect();
        let mut times: Vec<Duration> = draws.iter().map(|d| d.service_time).collect();
        times.sort();
        let median = times[times.len() / 2].as_secs_f64();
        assert!((0.09..0.11).contains(&median), "median {median}");
        let share = |class: &str| {
            draws
                .iter()
                .filter(|d| d.failure.as_ref().is_some_and(|f| f.class == class))
                .count() as f64
                / draws.len() as f64
        };
        assert!((0.18..0.22).contains(&share("simulated")));
        assert!((0.08..0.12).contains(&share("simulated_permanent")));
    }

    #[tokio::test]
    async fn success_echoes_the_payload() {
        let worker = SimulatedWorker::new("median=0ms".parse().unwrap(), Duration::from_secs(1));
        let task = TaskInput {
            task_id: "t".parse().unwrap(),
            stage: "s".parse().unwrap(),
            attempt: 1,
            idempotency_key: "t/s/1".into(),
            traceparent: None,
            priority: Default::default(),
            payload: b"same".to_vec(),
            parent: None,
        };
        assert_eq!(
            worker.handle(&task).await,
            Outcome::Success {
                payload: b"same".to_vec(),
                next: NextStage::Default,
                priority: None,
            }
        );
    }
}

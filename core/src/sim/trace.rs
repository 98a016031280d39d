//! Arrival traces: a rate per time bucket, read from a small text format or
//! generated from a seed.
//!
//! # Format
//!
//! One row per bucket, `seconds,rate_per_second`: from `seconds` (after the
//! start of the trace) on, tasks arrive at `rate_per_second` (Poisson within
//! the bucket), until the next row. The last bucket is as wide as the one
//! before it (60 s if there is only one row), and the trace ends there.
//! Lines starting with `#` and blank lines are ignored, as is a header line
//! `seconds,rate_per_second`. Seconds must increase; both numbers must be
//! non-negative.
//!
//! ```text
//! # a step from 1 to 3 tasks/s after ten minutes
//! seconds,rate_per_second
//! 0,1.0
//! 600,3.0
//! 1200,3.0
//! ```

use super::rng::SimRng;
use rand_distr::{Distribution, Normal};
use std::fmt::Write as _;

/// Highest rate accepted in a trace, per second.
pub const MAX_RATE: f64 = 100_000.0;
/// Longest trace accepted, seconds (90 days).
pub const MAX_SECONDS: f64 = 90.0 * 86_400.0;
/// Most tasks a trace may imply (the simulation's cost is linear in them).
pub const MAX_TASKS: f64 = 50_000_000.0;
/// Width of generated buckets, ms.
const GENERATED_BUCKET_MS: u64 = 60_000;

/// A malformed trace: one line naming the file and line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TraceError(pub String);

/// Arrival rates over time.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// `(start ms, rate per second)`, starts increasing.
    pub buckets: Vec<(u64, f64)>,
    /// When the trace ends, ms.
    pub end_ms: u64,
    /// Where it came from, for the report ("diurnal, 7 days, seed 1" or a path).
    pub label: String,
}

impl Trace {
    /// Parses the text of a trace; `name` prefixes error messages
    /// (`trace.csv:17: ...`).
    pub fn parse(name: &str, text: &str) -> Result<Trace, TraceError> {
        let mut rows: Vec<(f64, f64)> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            let at = |msg: String| TraceError(format!("{name}:{}: {msg}", i + 1));
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if rows.is_empty() && line.replace(' ', "") == "seconds,rate_per_second" {
                continue;
            }
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let [seconds, rate] = fields[..] else {
                return Err(at(format!(
                    "expected seconds,rate_per_second (got {:?})",
                    shorten(line)
                )));
            };
            let number = |s: &str| s.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0);
            let Some(t) = number(seconds) else {
                return Err(at(format!(
                    "seconds must be a non-negative number (got {:?})",
                    shorten(seconds)
                )));
            };
            let Some(r) = number(rate) else {
                return Err(at(format!(
                    "rate must be a non-negative number (got {:?})",
                    shorten(rate)
                )));
            };
            if r > MAX_RATE {
                return Err(at(format!(
                    "rate must be at most {MAX_RATE} per second (got {r})"
                )));
            }
            if t > MAX_SECONDS {
                return Err(at(format!(
                    "seconds must be at most {MAX_SECONDS} (90 days) (got {t})"
                )));
            }
            if let Some(&(prev, _)) = rows.last()
                && t <= prev
            {
                return Err(at(format!("seconds must increase (got {t} after {prev})")));
            }
            rows.push((t, r));
        }
        if rows.is_empty() {
            return Err(TraceError(format!(
                "{name}: no data rows (expected lines of seconds,rate_per_second)"
            )));
        }
        let last_width = match rows[..] {
            [.., (a, _), (b, _)] => b - a,
            _ => 60.0,
        };
        let end = rows.last().map_or(0.0, |r| r.0) + last_width;
        let trace = Trace {
            buckets: rows
                .iter()
                .map(|&(t, r)| ((t * 1000.0).round() as u64, r))
                .collect(),
            end_ms: (end * 1000.0).round() as u64,
            label: name.to_string(),
        };
        let tasks = trace.expected_tasks();
        if tasks > MAX_TASKS {
            return Err(TraceError(format!(
                "{name}: about {tasks:.0} tasks; at most {MAX_TASKS:.0} can be simulated"
            )));
        }
        Ok(trace)
    }

    /// End of bucket `i`, ms.
    pub fn bucket_end(&self, i: usize) -> u64 {
        self.buckets.get(i + 1).map_or(self.end_ms, |b| b.0)
    }

    /// Expected number of arrivals (Σ rate × width).
    pub fn expected_tasks(&self) -> f64 {
        (0..self.buckets.len())
            .map(|i| self.buckets[i].1 * (self.bucket_end(i) - self.buckets[i].0) as f64 / 1000.0)
            .sum()
    }

    /// Highest bucket rate, per second.
    pub fn peak_rate(&self) -> f64 {
        self.buckets.iter().map(|b| b.1).fold(0.0, f64::max)
    }

    /// The trace in its text format.
    pub fn to_csv(&self) -> String {
        let mut out = format!(
            "# guildhall trace: {}\nseconds,rate_per_second\n",
            self.label
        );
        for &(t, r) in &self.buckets {
            let _ = writeln!(out, "{},{:.4}", t as f64 / 1000.0, r);
        }
        out
    }

    /// Generates a trace of `kind` over `days` days from `seed` (see
    /// [`Generate`]).
    pub fn generate(kind: Generate, days: u32, seed: u64) -> Trace {
        let buckets_per_day = 86_400_000 / GENERATED_BUCKET_MS;
        let n = u64::from(days) * buckets_per_day;
        let mut rng = SimRng::new(seed, 0x7ace);
        let noise = |rng: &mut SimRng, sigma: f64| {
            Normal::new(0.0, sigma).map_or(1.0, |d| d.sample(rng).exp())
        };
        let mut day_level = 1.0;
        let mut buckets = Vec::with_capacity(n as usize);
        for i in 0..n {
            let day = i / buckets_per_day;
            let hour = (i % buckets_per_day) as f64 * GENERATED_BUCKET_MS as f64 / 3_600_000.0;
            if i % buckets_per_day == 0 {
                day_level = noise(&mut rng, 0.05);
            }
            let t_day = i as f64 / buckets_per_day as f64; // days since start
            let rate = match kind {
                Generate::Diurnal => {
                    // Monday first; Saturday and Sunday are quieter.
                    let weekend = day % 7 >= 5;
                    let (night, peak) = if weekend { (0.3, 1.6) } else { (0.3, 4.0) };
                    let shape = (-((hour - 13.0) / 4.0).powi(2)).exp();
                    (night + (peak - night) * shape) * day_level * noise(&mut rng, 0.1)
                }
                Generate::Spike => {
                    // Flat, with a flash spike to 8× at 14:00 of the last
                    // day: up in a minute, ten minutes on top, five down.
                    let start = f64::from(days.max(1) - 1) + 14.0 / 24.0;
                    let minutes = (t_day - start) * 1440.0;
                    let boost = if (0.0..1.0).contains(&minutes) {
                        1.0 + 7.0 * minutes
                    } else if (1.0..11.0).contains(&minutes) {
                        8.0
                    } else if (11.0..16.0).contains(&minutes) {
                        8.0 - 7.0 * (minutes - 11.0) / 5.0
                    } else {
                        1.0
                    };
                    boost * noise(&mut rng, 0.1)
                }
                Generate::Step => {
                    // 1/s, then 3/s from the middle of the trace on.
                    let level = if t_day >= f64::from(days.max(1)) / 2.0 {
                        3.0
                    } else {
                        1.0
                    };
                    level * noise(&mut rng, 0.05)
                }
                Generate::Noisy => 2.0 * noise(&mut rng, 0.5),
            };
            buckets.push((i * GENERATED_BUCKET_MS, rate));
        }
        Trace {
            buckets,
            end_ms: n * GENERATED_BUCKET_MS,
            label: format!("{}, {days} day(s), seed {seed}", kind.name()),
        }
    }
}

/// The generated traces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generate {
    /// Daily cycle (night 0.3/s, weekday peak 4/s at 13:00, weekend peak
    /// 1.6/s), ±5% day to day, ±10% minute to minute; Monday first.
    Diurnal,
    /// Flat 1/s with a flash spike to 8/s for ten minutes.
    Spike,
    /// 1/s, then 3/s from halfway on.
    Step,
    /// 2/s with ±50% (lognormal σ = 0.5) noise minute to minute.
    Noisy,
}

impl Generate {
    /// Parses `diurnal`, `spike`, `step` or `noisy`.
    pub fn parse(s: &str) -> Option<Generate> {
        match s {
            "diurnal" => Some(Generate::Diurnal),
            "spike" => Some(Generate::Spike),
            "step" => Some(Generate::Step),
            "noisy" => Some(Generate::Noisy),
            _ => None,
        }
    }

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Generate::Diurnal => "diurnal",
            Generate::Spike => "spike",
            Generate::Step => "step",
            Generate::Noisy => "noisy",
        }
    }

    /// Days generated when `--days` is not given.
    pub fn default_days(self) -> u32 {
        match self {
            Generate::Diurnal => 7,
            _ => 1,
        }
    }
}

/// At most 40 characters of `s`, for error messages.
fn shorten(s: &str) -> String {
    if s.chars().count() <= 40 {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(40).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_parses_with_comments_and_a_header() {
        let t = Trace::parse(
            "t.csv",
            "# step\nseconds,rate_per_second\n0,1\n\n600, 3.5\n1200,3\n",
        )
        .unwrap();
        assert_eq!(t.buckets, vec![(0, 1.0), (600_000, 3.5), (1_200_000, 3.0)]);
        assert_eq!(t.end_ms, 1_800_000);
        assert!((t.expected_tasks() - (600.0 + 2100.0 + 1800.0)).abs() < 1e-9);
        assert_eq!(t.peak_rate(), 3.5);
        // A single row lasts a minute.
        assert_eq!(Trace::parse("t", "0,2").unwrap().end_ms, 60_000);
    }

    #[test]
    fn malformed_traces_name_the_line() {
        for (text, want) in [
            (
                "0,1\n60,x\n",
                "t.csv:2: rate must be a non-negative number (got \"x\")",
            ),
            (
                "0,1\n60,-2\n",
                "t.csv:2: rate must be a non-negative number (got \"-2\")",
            ),
            (
                "# c\nabc,1\n",
                "t.csv:2: seconds must be a non-negative number (got \"abc\")",
            ),
            (
                "0,1\n60\n",
                "t.csv:2: expected seconds,rate_per_second (got \"60\")",
            ),
            (
                "0,1,2\n",
                "t.csv:1: expected seconds,rate_per_second (got \"0,1,2\")",
            ),
            (
                "0,1\n60,1\n30,1\n",
                "t.csv:3: seconds must increase (got 30 after 60)",
            ),
            (
                "0,NaN\n",
                "t.csv:1: rate must be a non-negative number (got \"NaN\")",
            ),
            (
                "0,1e9\n",
                "t.csv:1: rate must be at most 100000 per second (got 1000000000)",
            ),
            (
                "# nothing\n\n",
                "t.csv: no data rows (expected lines of seconds,rate_per_second)",
            ),
        ] {
            let e = Trace::parse("t.csv", text).unwrap_err().to_string();
            assert_eq!(e, want);
        }
        let e = Trace::parse("t.csv", "0,90000\n7000000,1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 50000000 can be simulated"), "{e}");
    }

    #[test]
    fn generated_traces_round_trip_and_have_their_shape() {
        let d = Trace::generate(Generate::Diurnal, 7, 1);
        assert_eq!(d.buckets.len(), 7 * 1440);
        assert_eq!(d.end_ms, 7 * 86_400_000);
        let back = Trace::parse("d", &d.to_csv()).unwrap();
        assert_eq!(back.buckets.len(), d.buckets.len());
        assert_eq!(back.end_ms, d.end_ms);
        for (a, b) in back.buckets.iter().zip(&d.buckets) {
            assert_eq!(a.0, b.0);
            assert!((a.1 - b.1).abs() < 1e-4);
        }
        // Weekday afternoons are busier than weekend ones, nights quiet.
        let at = |day: u64, hour: u64| d.buckets[(day * 1440 + hour * 60) as usize].1;
        assert!(at(2, 13) > 3.0 && at(2, 13) < 5.0, "{}", at(2, 13));
        assert!(at(5, 13) < 2.2 && at(5, 13) > 1.0, "{}", at(5, 13));
        assert!(at(2, 3) < 0.5);
        // Same seed, same trace; another seed, another.
        assert_eq!(Trace::generate(Generate::Diurnal, 7, 1), d);
        assert_ne!(Trace::generate(Generate::Diurnal, 7, 2).buckets, d.buckets);

        let s = Trace::generate(Generate::Spike, 1, 1);
        assert!(s.peak_rate() > 6.0);
        assert!(s.buckets[60].1 < 1.5);
        let st = Trace::generate(Generate::Step, 1, 1);
        assert!(st.buckets[100].1 < 1.3 && st.buckets[1000].1 > 2.5);
        let n = Trace::generate(Generate::Noisy, 1, 1);
        let mean = n.buckets.iter().map(|b| b.1).sum::<f64>() / n.buckets.len() as f64;
        assert!((1.8..2.6).contains(&mean), "{mean}");
    }
}

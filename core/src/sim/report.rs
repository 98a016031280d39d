//! What a simulation run reports, as a table or JSON.

use super::policy::ForecastStats;
use crate::capacity::format_wait;
use serde::Serialize;
use std::fmt::Write as _;

/// Nearest-rank quantiles (`qs` in 0..=1) of `values`, which are reordered.
pub fn quantiles<const N: usize>(values: &mut [u32], qs: [f64; N]) -> Option<[u64; N]> {
    if values.is_empty() {
        return None;
    }
    let n = values.len();
    Some(qs.map(|q| {
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as usize).clamp(1, n);
        let (_, v, _) = values.select_nth_unstable(rank - 1);
        u64::from(*v)
    }))
}

/// Queue waits, ms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Waits {
    /// Median.
    pub p50: u64,
    /// 95th percentile.
    pub p95: u64,
    /// 99th percentile.
    pub p99: u64,
}

impl Waits {
    fn of(values: &mut [u32]) -> Waits {
        let [p50, p95, p99] = quantiles(values, [0.5, 0.95, 0.99]).unwrap_or([0; 3]);
        Waits { p50, p95, p99 }
    }
}

/// One stage under one policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageReport {
    /// The stage.
    pub stage: String,
    /// Its wait target, ms.
    pub wait_target_ms: u64,
    /// Share of minutes in which the target held at the quantile.
    pub target_met_share: f64,
    /// Queue waits of its tasks.
    pub wait_ms: Waits,
    /// Workers provisioned (starting, ready, draining) × minutes.
    pub worker_minutes: f64,
    /// Times the policy changed the worker count.
    pub scale_actions: u64,
    /// Tasks it finished.
    pub tasks: u64,
    /// Most workers provisioned at once.
    pub peak_workers: u32,
    /// Mean rolling MASE of the forecasts the planner made (predictive).
    pub mase: Option<f64>,
    /// Share of plans driven by Holt-Winters rather than the recent rate
    /// (predictive).
    pub holt_winters_share: Option<f64>,
}

impl StageReport {
    /// Assembles a stage's figures (`waits` is reordered).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stage: String,
        wait_target_ms: u64,
        target_met_share: f64,
        waits: &mut [u32],
        worker_minutes: f64,
        scale_actions: u64,
        tasks: u64,
        peak_workers: u32,
        forecast: Option<&ForecastStats>,
    ) -> Self {
        Self {
            stage,
            wait_target_ms,
            target_met_share,
            wait_ms: Waits::of(waits),
            worker_minutes,
            scale_actions,
            tasks,
            peak_workers,
            mase: forecast
                .filter(|f| f.mase_count > 0)
                .map(|f| f.mase_sum / f.mase_count as f64),
            holt_winters_share: forecast
                .filter(|f| f.plans > 0)
                .map(|f| f.holt_winters as f64 / f.plans as f64),
        }
    }
}

/// One policy over the whole pipeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyReport {
    /// The policy.
    pub policy: String,
    /// Share of minutes in which every stage met its target.
    pub target_met_share: f64,
    /// Queue waits of every task at every stage.
    pub wait_ms: Waits,
    /// Worker-minutes of all stages.
    pub worker_minutes: f64,
    /// Scale actions of all stages.
    pub scale_actions: u64,
    /// Mean MASE over the stages that have one (predictive).
    pub mase: Option<f64>,
    /// Per stage.
    pub stages: Vec<StageReport>,
}

impl PolicyReport {
    /// Sums the stages (`all_waits` is reordered).
    pub fn new(
        policy: &str,
        target_met_share: f64,
        all_waits: &mut [u32],
        stages: Vec<StageReport>,
    ) -> Self {
        let mases: Vec<f64> = stages.iter().filter_map(|s| s.mase).collect();
        Self {
            policy: policy.to_string(),
            target_met_share,
            wait_ms: Waits::of(all_waits),
            worker_minutes: stages.iter().map(|s| s.worker_minutes).sum(),
            scale_actions: stages.iter().map(|s| s.scale_actions).sum(),
            mase: (!mases.is_empty()).then(|| mases.iter().sum::<f64>() / mases.len() as f64),
            stages,
        }
    }
}

/// `1234567.8` → "1,234,568".
pub fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The table: one row per policy (and per stage when there are several).
pub fn table(reports: &[PolicyReport]) -> String {
    let mut rows: Vec<[String; 9]> = vec![[
        "policy".into(),
        "target met".into(),
        "p50 wait".into(),
        "p95 wait".into(),
        "p99 wait".into(),
        "worker-min".into(),
        "peak".into(),
        "scale actions".into(),
        "MASE".into(),
    ]];
    let wait = |ms: u64| format_wait(ms as f64);
    let mase = |m: Option<f64>| m.map_or("-".to_string(), |m| format!("{m:.2}"));
    for r in reports {
        let several = r.stages.len() > 1;
        rows.push([
            r.policy.clone(),
            format!("{:.1}%", r.target_met_share * 100.0),
            wait(r.wait_ms.p50),
            wait(r.wait_ms.p95),
            wait(r.wait_ms.p99),
            thousands(r.worker_minutes),
            if several {
                String::new()
            } else {
                r.stages.first().map_or(0, |s| s.peak_workers).to_string()
            },
            r.scale_actions.to_string(),
            mase(r.mase),
        ]);
        if several {
            for s in &r.stages {
                rows.push([
                    format!("  {}", s.stage),
                    format!("{:.1}%", s.target_met_share * 100.0),
                    wait(s.wait_ms.p50),
                    wait(s.wait_ms.p95),
                    wait(s.wait_ms.p99),
                    thousands(s.worker_minutes),
                    s.peak_workers.to_string(),
                    s.scale_actions.to_string(),
                    mase(s.mase),
                ]);
            }
        }
    }
    let mut widths = [0usize; 9];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            let pad = w - cell.chars().count();
            if i == 0 {
                let _ = write!(line, "{cell}{}", " ".repeat(pad));
            } else {
                let _ = write!(line, "  {}{cell}", " ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let mut v: Vec<u32> = (1..=100).rev().collect();
        assert_eq!(
            quantiles(&mut v, [0.5, 0.95, 0.99, 1.0, 0.0]),
            Some([50, 95, 99, 100, 1])
        );
        let mut one = vec![7];
        assert_eq!(quantiles(&mut one, [0.95]), Some([7]));
        assert_eq!(quantiles(&mut [], [0.5]), None);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1234567.8), "1,234,568");
    }
}

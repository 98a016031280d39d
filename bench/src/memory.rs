//! `guildhall-bench memory`: resident bytes per tracked task.
//!
//! No broker: the coordinator's core is fed the simulated agents' mix
//! ([`super::mix`]) directly, on a virtual clock, in this very process. Each
//! case runs in a fresh process (this binary, re-executed with the hidden
//! `--case KIND:TASKS` flag) so the memory one case freed cannot flatter the
//! next; the child prints one JSON line ([`CaseResult`]) and the parent
//! renders them all.
//!
//! The cases, for each task count `N` of `--tasks`:
//!
//! - `completed`: `N` tasks through all three stages (one in 50 retried
//!   once at the middle stage), every one retained with its whole stage
//!   trace (`completed_limit` = `N`, a 30-day age limit);
//! - `inflight`: `N` tasks submitted and started at the first stage, never
//!   finished;
//! - `limit`: `3 × N` completed tasks into a core keeping `N / 10`:
//!   retention must hold the count at the limit and memory must stay
//!   bounded (by the limit plus what arrives between two housekeeping runs).
//!
//! Each case reports resident memory (`VmRSS`) before and after feeding, the
//! peak (`VmHWM`), and, with glibc, the heap bytes in use (`mallinfo2`),
//! which page granularity and freed-but-kept memory do not blur.
//!
//! The mix is fed in stream order ([`Feeder`](super::mix::Feeder)): each round, every
//! first-stage agent sends a batch, then every later stage's agent reports
//! the tasks the stage before it has finished. A task's later stages never
//! overtake its earlier ones, as in a pipeline where a stage only gets a
//! task once the previous stage is done with it.

use super::mix::{Feeder, MixConfig};
use super::{MemoryArgs, in_range, thousands};
use anyhow::{Context, bail};
use guildhall::config::ConfigError;
use guildhall::core::{Core, CoreConfig};
use guildhall::metrics::Metrics;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Instant;

/// The issue's target: resident bytes per completed three-stage task.
pub const TARGET_BYTES_PER_COMPLETED_TASK: u64 = 300;
/// Fewest tasks a case may have (below it the figures are noise).
pub const MIN_TASKS: u64 = 1_000;
/// Most tasks a case may have.
pub const MAX_TASKS: u64 = 10_000_000;
/// Most events in one envelope, as an agent batches them.
pub const BATCH: usize = 250;
/// Simulated agents per stage.
pub const AGENTS_PER_STAGE: usize = 4;
/// Heartbeat interval of the agents of the in-flight case. Their tasks are
/// never finished, so the coordinator's list of what each agent holds grows
/// until the agent's next heartbeat replaces it; a short interval keeps that
/// list as short as a real agent's (bounded by its concurrency), so the
/// case measures the task store, not a list no real agent would send.
pub const INFLIGHT_HEARTBEAT_MS: u32 = 10;
/// When the virtual clock starts (2026-01-01T00:00:00Z).
pub const START_MS: u64 = 1_767_225_600_000;
/// Age limit of finished tasks in the cases: nothing is evicted by age.
const MAX_AGE_MS: u64 = 30 * 24 * 3_600_000;
/// Default task counts.
const DEFAULT_TASKS: [u64; 2] = [100_000, 1_000_000];
/// Task count of `--quick`.
const QUICK_TASKS: u64 = 20_000;

/// What a case measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Tasks through all three stages, all retained.
    Completed,
    /// Tasks started at the first stage, never finished.
    Inflight,
    /// Three times the tasks into a core keeping a tenth of them.
    Limit,
}

impl Kind {
    /// Every kind, in the order the report lists them.
    pub const ALL: [Kind; 3] = [Kind::Completed, Kind::Inflight, Kind::Limit];

    /// Its name on the command line and in the report.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Completed => "completed",
            Kind::Inflight => "inflight",
            Kind::Limit => "limit",
        }
    }
}

/// One measurement: a kind and a task count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    /// What is measured.
    pub kind: Kind,
    /// The task count `N` (the `limit` case feeds `3 × N` and keeps `N / 10`).
    pub tasks: u64,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.tasks)
    }
}

impl Case {
    /// Parses `--case KIND:TASKS`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let bad = || {
            ConfigError(format!(
                "--case must be KIND:TASKS with KIND completed, inflight or limit (got {s:?})"
            ))
        };
        let (kind, tasks) = s.split_once(':').ok_or_else(bad)?;
        let kind = Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == kind)
            .ok_or_else(bad)?;
        let tasks: u64 = tasks.parse().map_err(|_| bad())?;
        let tasks = in_range("--case tasks", tasks, MIN_TASKS, MAX_TASKS)?;
        Ok(Self { kind, tasks })
    }

    /// Tasks fed to the core.
    pub fn fed(&self) -> u64 {
        match self.kind {
            Kind::Completed | Kind::Inflight => self.tasks,
            Kind::Limit => 3 * self.tasks,
        }
    }

    /// The core's `completed_limit`.
    pub fn completed_limit(&self) -> u64 {
        match self.kind {
            Kind::Completed | Kind::Inflight => self.tasks,
            Kind::Limit => self.tasks / 10,
        }
    }

    /// The simulated fleet of the case.
    pub fn mix(&self) -> MixConfig {
        let mut config = MixConfig::three_stages(AGENTS_PER_STAGE, 1);
        if self.kind == Kind::Inflight {
            config.finish = false;
            config.heartbeat_ms = INFLIGHT_HEARTBEAT_MS;
        }
        config
    }
}

/// The cases `args` asks for, in the order they run.
pub fn cases(args: &MemoryArgs) -> Result<Vec<Case>, ConfigError> {
    let tasks = if !args.tasks.is_empty() {
        args.tasks.clone()
    } else if args.common.quick {
        vec![QUICK_TASKS]
    } else {
        DEFAULT_TASKS.to_vec()
    };
    let mut out = Vec::new();
    for n in tasks {
        let n = in_range("--tasks", n, MIN_TASKS, MAX_TASKS)?;
        out.extend(Kind::ALL.into_iter().map(|kind| Case { kind, tasks: n }));
    }
    Ok(out)
}

/// What one case measured: the JSON line a child prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    /// What was measured.
    pub kind: Kind,
    /// The case's task count `N`.
    pub tasks: u64,
    /// Tasks fed to the core.
    pub tasks_fed: u64,
    /// The core's `completed_limit`.
    pub completed_limit: u64,
    /// Tasks the core holds at the end (in flight and finished).
    pub retained: u64,
    /// Of those, tasks in flight.
    pub in_flight: u64,
    /// Of those, finished tasks.
    pub finished: u64,
    /// Events applied.
    pub events: u64,
    /// Envelopes applied.
    pub envelopes: u64,
    /// Resident memory once the core was built, before feeding.
    pub rss_before_bytes: u64,
    /// Resident memory after feeding and a last housekeeping run.
    pub rss_after_bytes: u64,
    /// Peak resident memory of the process.
    pub rss_peak_bytes: u64,
    /// Heap bytes in use before feeding (glibc only).
    pub heap_before_bytes: Option<u64>,
    /// Heap bytes in use after feeding (glibc only).
    pub heap_after_bytes: Option<u64>,
    /// Wall time spent feeding.
    pub seconds: f64,
}

impl CaseResult {
    /// Resident memory the fed tasks added (negative if the process shrank).
    pub fn rss_delta_bytes(&self) -> i64 {
        self.rss_after_bytes as i64 - self.rss_before_bytes as i64
    }

    /// Resident bytes per retained task.
    pub fn bytes_per_task(&self) -> Option<f64> {
        (self.retained > 0).then(|| self.rss_delta_bytes() as f64 / self.retained as f64)
    }

    /// Heap bytes in use per retained task, when the allocator says.
    pub fn heap_bytes_per_task(&self) -> Option<f64> {
        let (before, after) = (self.heap_before_bytes?, self.heap_after_bytes?);
        (self.retained > 0).then(|| (after as f64 - before as f64) / self.retained as f64)
    }

    /// Events applied per second of feeding.
    pub fn events_per_second(&self) -> Option<f64> {
        (self.seconds > 0.0).then(|| self.events as f64 / self.seconds)
    }
}

/// The whole report (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The target for a completed three-stage task, bytes.
    pub target_bytes_per_completed_task: u64,
    /// Events per envelope.
    pub batch: usize,
    /// Simulated agents per stage.
    pub agents_per_stage: usize,
    /// Every case, in the order it ran.
    pub cases: Vec<CaseResult>,
}

/// Runs the benchmark and renders it; with `--case`, measures that one case
/// in this process and answers its JSON line.
pub async fn run(args: &MemoryArgs) -> anyhow::Result<String> {
    if let Some(case) = &args.case {
        let case = Case::parse(case)?;
        let result = measure(case)?;
        return Ok(serde_json::to_string(&result)? + "\n");
    }
    let cases = cases(args)?;
    let mut results = Vec::with_capacity(cases.len());
    for case in cases {
        tracing::info!(%case, "measuring");
        results.push(run_child(case).await?);
    }
    let report = Report {
        target_bytes_per_completed_task: TARGET_BYTES_PER_COMPLETED_TASK,
        batch: BATCH,
        agents_per_stage: AGENTS_PER_STAGE,
        cases: results,
    };
    Ok(super::render(&report, args.common.json, table))
}

/// Runs `case` in a fresh process of this binary and reads its JSON line.
async fn run_child(case: Case) -> anyhow::Result<CaseResult> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let out = tokio::process::Command::new(exe)
        .args(["memory", "--case", &case.to_string()])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("cannot run the {case} case"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        bail!(
            "the {case} case failed ({}): {}",
            out.status,
            last.unwrap_or("no message")
        );
    }
    parse_case_line(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| format!("the {case} case printed no result"))
}

/// The result a child printed: its last line that is a JSON object.
pub fn parse_case_line(stdout: &str) -> anyhow::Result<CaseResult> {
    let line = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('{'))
        .context("no JSON line in the output")?;
    serde_json::from_str(line).context("unreadable JSON line")
}

/// Measures one case in this process.
pub fn measure(case: Case) -> anyhow::Result<CaseResult> {
    let pid = std::process::id();
    let config = CoreConfig {
        completed_limit: usize::try_from(case.completed_limit())
            .context("--case tasks too large for this machine")?,
        completed_max_age_ms: MAX_AGE_MS,
        ..CoreConfig::default()
    };
    let mut now_ms = START_MS;
    let mut core = Core::new(config, Metrics::new(false), now_ms);
    core.set_caught_up(now_ms);
    let mut feeder = Feeder::new(&case.mix(), case.fed(), now_ms, BATCH);
    let rss = |key| super::probe::status_kib(pid, key).map(|k| k * 1024);
    let rss_before = rss("VmRSS:").context("cannot read VmRSS from /proc")?;
    let heap_before = heap_in_use();
    let t0 = Instant::now();
    let (mut events, mut envelopes) = (0u64, 0u64);
    while let Some(decoded) = feeder.next_envelope() {
        now_ms = decoded.envelope.sent_at_ms;
        events += decoded.envelope.events.len() as u64;
        core.handle_envelope(now_ms, decoded, Some(envelopes));
        envelopes += 1;
        if core.poll_timeout().is_some_and(|t| t <= now_ms) {
            core.handle_timeout(now_ms);
        }
    }
    // The last housekeeping run, as the runtime's next timer would do.
    now_ms += 1_000;
    core.handle_timeout(now_ms);
    let seconds = t0.elapsed().as_secs_f64();
    let rss_after = rss("VmRSS:").context("cannot read VmRSS from /proc")?;
    let heap_after = heap_in_use();
    let overview = core.overview();
    Ok(CaseResult {
        kind: case.kind,
        tasks: case.tasks,
        tasks_fed: case.fed(),
        completed_limit: case.completed_limit(),
        retained: (overview.tasks_in_flight + overview.tasks_finished) as u64,
        in_flight: overview.tasks_in_flight as u64,
        finished: overview.tasks_finished as u64,
        events,
        envelopes,
        rss_before_bytes: rss_before,
        rss_after_bytes: rss_after,
        rss_peak_bytes: rss("VmHWM:").unwrap_or(rss_after),
        heap_before_bytes: heap_before,
        heap_after_bytes: heap_after,
        seconds,
    })
}

/// Heap bytes in use (small chunks and mmapped ones), from glibc.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap_in_use() -> Option<u64> {
    // SAFETY: mallinfo2 has no preconditions; it only reads allocator state.
    let info = unsafe { libc::mallinfo2() };
    Some((info.uordblks + info.hblkhd) as u64)
}

/// Heap bytes in use: unknown off glibc.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn heap_in_use() -> Option<u64> {
    None
}

/// `12345678` bytes as `11.8 MiB`.
fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

fn per_task(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), thousands)
}

/// The report as a table.
pub fn table(r: &Report) -> String {
    let header = [
        "case",
        "fed",
        "retained",
        "RSS delta",
        "peak delta",
        "B/task RSS",
        "B/task heap",
        "target",
        "feed time",
        "events/s",
    ];
    let mut rows: Vec<[String; 10]> = Vec::new();
    for c in &r.cases {
        let target = match c.kind {
            Kind::Completed => {
                let over = c
                    .bytes_per_task()
                    .is_some_and(|b| b > r.target_bytes_per_completed_task as f64);
                format!(
                    "{} ({})",
                    r.target_bytes_per_completed_task,
                    if over { "over" } else { "met" }
                )
            }
            Kind::Inflight => "-".into(),
            Kind::Limit => format!(
                "kept {}",
                if c.finished == c.completed_limit && c.in_flight == 0 {
                    "= limit"
                } else {
                    "!= limit"
                }
            ),
        };
        rows.push([
            format!("{}:{}", c.kind.as_str(), thousands(c.tasks as f64)),
            thousands(c.tasks_fed as f64),
            thousands(c.retained as f64),
            mib(c.rss_delta_bytes() as f64),
            mib(c.rss_peak_bytes as f64 - c.rss_before_bytes as f64),
            per_task(c.bytes_per_task()),
            per_task(c.heap_bytes_per_task()),
            target,
            format!("{:.2} s", c.seconds),
            per_task(c.events_per_second()),
        ]);
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[&str]| {
        let mut out = String::from(" ");
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            // The first column reads left to right, the figures line up right.
            if i == 0 {
                out.push_str(&format!(" {cell:<w$}"));
            } else {
                out.push_str(&format!("  {cell:>w$}"));
            }
        }
        out.push('\n');
        out
    };
    let mut out = format!(
        "bench memory: bytes per tracked task (each case in a fresh process; \
         {} agents per stage, {}-event batches)\n",
        r.agents_per_stage, r.batch
    );
    out.push_str(&line(&header));
    for row in &rows {
        out.push_str(&line(&row.iter().map(String::as_str).collect::<Vec<_>>()));
    }
    out.push_str(
        "  completed: three stages, full trace kept; inflight: started at the first stage, \
         never finished;\n  limit: 3 x N completed into a core keeping N/10 (B/task of limit \
         rows includes what eviction freed but the process kept).\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CommonArgs;

    fn args(tasks: Vec<u64>, quick: bool) -> MemoryArgs {
        MemoryArgs {
            common: CommonArgs { json: false, quick },
            tasks,
            case: None,
        }
    }

    #[test]
    fn flags_give_cases_or_a_one_line_config_error() {
        let all = cases(&args(vec![], false)).unwrap();
        assert_eq!(all.len(), 6);
        assert_eq!(
            all[0],
            Case {
                kind: Kind::Completed,
                tasks: 100_000
            }
        );
        assert_eq!(
            all[5],
            Case {
                kind: Kind::Limit,
                tasks: 1_000_000
            }
        );
        let quick = cases(&args(vec![], true)).unwrap();
        assert_eq!(quick.len(), 3);
        assert!(quick.iter().all(|c| c.tasks == QUICK_TASKS));
        assert_eq!(cases(&args(vec![5_000], true)).unwrap()[0].tasks, 5_000);
        for bad in [0, 999, 10_000_001] {
            let e = cases(&args(vec![50_000, bad], false)).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("--tasks {bad} is out of range (1000 to 10000000)")
            );
        }
    }

    #[test]
    fn case_flags_parse_and_bad_ones_are_refused() {
        let c = Case::parse("limit:30000").unwrap();
        assert_eq!(
            c,
            Case {
                kind: Kind::Limit,
                tasks: 30_000
            }
        );
        assert_eq!((c.fed(), c.completed_limit()), (90_000, 3_000));
        assert_eq!(c.to_string(), "limit:30000");
        assert_eq!(Case::parse(&c.to_string()).unwrap(), c);
        assert!(!Case::parse("inflight:2000").unwrap().mix().finish);
        for bad in [
            "",
            "completed",
            "done:5000",
            "completed:",
            "completed:x",
            "completed:-1",
        ] {
            let e = Case::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("--case must be KIND:TASKS"), "{bad:?}: {e}");
            assert!(!e.contains('\n'));
        }
        let e = Case::parse("completed:0").unwrap_err().to_string();
        assert_eq!(e, "--case tasks 0 is out of range (1000 to 10000000)");
    }

    #[test]
    fn a_childs_json_line_parses_back() {
        let r = CaseResult {
            kind: Kind::Inflight,
            tasks: 2_000,
            tasks_fed: 2_000,
            completed_limit: 2_000,
            retained: 2_000,
            in_flight: 2_000,
            finished: 0,
            events: 4_100,
            envelopes: 17,
            rss_before_bytes: 10 << 20,
            rss_after_bytes: 12 << 20,
            rss_peak_bytes: 12 << 20,
            heap_before_bytes: Some(1 << 20),
            heap_after_bytes: None,
            seconds: 0.5,
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.contains(r#""kind":"inflight""#), "{line}");
        let stdout = format!("some noise\n{line}\n\n");
        assert_eq!(parse_case_line(&stdout).unwrap(), r);
        assert_eq!(r.rss_delta_bytes(), 2 << 20);
        assert_eq!(r.bytes_per_task(), Some(f64::from(2 << 20) / 2_000.0));
        assert_eq!(r.heap_bytes_per_task(), None);
        assert_eq!(r.events_per_second(), Some(8_200.0));
        assert!(parse_case_line("no json here\n").is_err());
        assert!(parse_case_line("{\"kind\": \"completed\"}").is_err());
        let report = Report {
            target_bytes_per_completed_task: 300,
            batch: BATCH,
            agents_per_stage: AGENTS_PER_STAGE,
            cases: vec![r],
        };
        assert!(table(&report).contains("inflight:2,000"));
    }

    #[test]
    fn cases_run_in_process_with_sane_numbers() {
        let completed = measure(Case {
            kind: Kind::Completed,
            tasks: 2_000,
        })
        .unwrap();
        assert_eq!((completed.finished, completed.in_flight), (2_000, 0));
        // Seven events a task, give or take retries and heartbeats.
        assert!(
            (13_000..16_000).contains(&completed.events),
            "{}",
            completed.events
        );
        assert!(
            completed.rss_before_bytes > 0 && completed.rss_peak_bytes >= completed.rss_after_bytes
        );
        assert!(completed.seconds > 0.0);
        assert!(completed.events_per_second().is_some_and(f64::is_finite));
        if let Some(heap) = completed.heap_bytes_per_task() {
            // Other tests allocate concurrently: only an order of magnitude.
            assert!(heap > 50.0, "{heap} heap bytes per completed task");
        }

        let inflight = measure(Case {
            kind: Kind::Inflight,
            tasks: 2_000,
        })
        .unwrap();
        assert_eq!((inflight.in_flight, inflight.finished), (2_000, 0));
        assert!(
            (4_000..5_000).contains(&inflight.events),
            "{}",
            inflight.events
        );

        let limit = measure(Case {
            kind: Kind::Limit,
            tasks: 2_000,
        })
        .unwrap();
        assert_eq!(limit.tasks_fed, 6_000);
        assert_eq!(
            (limit.finished, limit.in_flight),
            (200, 0),
            "retention holds the limit"
        );
        assert!(limit.events > 3 * 13_000);
    }
}

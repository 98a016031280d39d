//! CPU and memory of a process, read from `/proc` (Linux), for heartbeats.
//!
//! CPU is reported as a share of one core since the previous sample of the
//! same process, so a sampler keeps the last reading. Elsewhere than Linux
//! (no `/proc`) every sample is `None`.

use guildhall_proto::ProcStats;
use std::time::Instant;

/// Samples one process at a time; a new pid starts afresh.
#[derive(Debug, Default)]
pub struct ProcSampler {
    /// The last reading: pid, CPU time in clock ticks, when it was taken.
    last: Option<(u32, u64, Instant)>,
}

impl ProcSampler {
    /// A sampler with no history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Measures `pid` now. The first sample of a pid reports 0 CPU.
    pub fn sample(&mut self, pid: u32) -> Option<ProcStats> {
        let (ticks, rss_bytes) = read(pid)?;
        let now = Instant::now();
        let cpu_ratio = match self.last {
            Some((last_pid, last_ticks, at)) if last_pid == pid => {
                let secs = now.duration_since(at).as_secs_f64();
                let cpu = ticks.saturating_sub(last_ticks) as f64
                    / rustix::param::clock_ticks_per_second() as f64;
                if secs > 0.0 { (cpu / secs) as f32 } else { 0.0 }
            }
            _ => 0.0,
        };
        self.last = Some((pid, ticks, now));
        Some(ProcStats {
            pid,
            cpu_ratio,
            rss_bytes,
        })
    }
}

/// CPU ticks (user + system) and resident bytes of `pid`.
fn read(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    Some((
        parse_cpu_ticks(&stat)?,
        parse_rss_pages(&statm)? * rustix::param::page_size() as u64,
    ))
}

/// utime + stime from `/proc/<pid>/stat`. The command name (field 2) may
/// hold spaces and parentheses, so fields are counted after its last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    // After the name: state(3) ppid pgrp session tty_nr tpgid flags minflt
    // cminflt majflt cmajflt utime(14) stime(15).
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Resident pages: the second field of `/proc/<pid>/statm`.
fn parse_rss_pages(statm: &str) -> Option<u64> {
    statm.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_even_with_odd_process_names() {
        let stat = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 1 0 100 1000 200";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_rss_pages("1000 250 30 1 0 100 0"), Some(250));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn samples_this_process() {
        let mut sampler = ProcSampler::new();
        let pid = std::process::id();
        let first = sampler.sample(pid).expect("/proc is readable");
        assert_eq!(first.cpu_ratio, 0.0);
        assert!(first.rss_bytes > 0);
        // Burn a little CPU so the second sample has something to show.
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed().as_millis() < 50 {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let second = sampler.sample(pid).unwrap();
        assert!(second.cpu_ratio > 0.0, "{second:?} after {x}");
        assert!(sampler.sample(u32::MAX).is_none());
    }
}

//! When and in what order work runs: priorities and their bands, the delay
//! ladder's arithmetic, and rate limits. Pure data and arithmetic, shared by
//! the agent (which enforces them), submitters (which set them) and the
//! coordinator (which shows and splits them).
//!
//! # Priorities and bands
//!
//! A task's priority is the standard AMQP `priority` property, 0-9, higher
//! first; a message without one has priority 0 (RabbitMQ's and Celery's
//! convention). Stage queues are quorum queues, which have no per-message
//! priority on RabbitMQ 3.x, so a stage has one quorum queue per [`Band`]
//! and agents consume the bands with preference.
//!
//! # The delay ladder
//!
//! A delayed task is held by the broker, not by a Guildhall process, in a
//! ladder of [`DELAY_LEVELS`] TTL queues (NServiceBus's design): level `n`
//! holds a message for `2^n` seconds. The delay in whole seconds is written
//! as bits in the routing key ([`delay_routing_key`]); each level's topic
//! exchange sends a message whose bit `n` is set through the level's queue
//! and one whose bit is clear straight on to the level below. The last level
//! hands the message to the delivery exchange, bound to every band queue.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Highest priority.
pub const MAX_PRIORITY: u8 = 9;

/// The priority of a message that has none.
pub const DEFAULT_PRIORITY: u8 = 0;

/// A task priority, 0 to 9, higher first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Priority(u8);

/// A priority outside 0-9, or not a number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid priority {0:?}: a priority is a whole number from 0 to 9, higher first")]
pub struct InvalidPriority(pub String);

impl Priority {
    /// The priority of a message that has none.
    pub const DEFAULT: Priority = Priority(DEFAULT_PRIORITY);

    /// `value` if it is 0-9.
    pub fn new(value: u8) -> Result<Self, InvalidPriority> {
        if value <= MAX_PRIORITY {
            Ok(Self(value))
        } else {
            Err(InvalidPriority(value.to_string()))
        }
    }

    /// The number.
    pub fn get(self) -> u8 {
        self.0
    }

    /// The band this priority is queued in.
    pub fn band(self) -> Band {
        Band::of(self)
    }
}

impl Default for Priority {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Priority {
    type Err = InvalidPriority;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidPriority(s.chars().take(40).collect());
        let n: u8 = s.trim().parse().map_err(|_| bad())?;
        Self::new(n).map_err(|_| bad())
    }
}

/// A range of priorities that share one quorum queue per stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Band {
    /// Priorities 0-3, and messages without one.
    Low,
    /// Priorities 4-6.
    Mid,
    /// Priorities 7-9.
    High,
}

impl Band {
    /// Every band, highest first (the order an agent prefers them in).
    pub const ALL: [Band; 3] = [Band::High, Band::Mid, Band::Low];

    /// The band of `priority`.
    pub fn of(priority: Priority) -> Band {
        match priority.get() {
            0..=3 => Band::Low,
            4..=6 => Band::Mid,
            _ => Band::High,
        }
    }

    /// Position in [`Band::ALL`] (0 is the highest), for arrays indexed by band.
    pub fn index(self) -> usize {
        match self {
            Band::High => 0,
            Band::Mid => 1,
            Band::Low => 2,
        }
    }

    /// The priorities it holds, as a metric label and in queue names: `7-9`.
    pub fn label(self) -> &'static str {
        match self {
            Band::Low => "0-3",
            Band::Mid => "4-6",
            Band::High => "7-9",
        }
    }

    /// The band whose [`label`](Self::label) is `s`.
    pub fn from_label(s: &str) -> Option<Band> {
        Band::ALL.into_iter().find(|b| b.label() == s)
    }

    /// The lowest priority of the band (what a task re-queued into it gets
    /// when only the band is known).
    pub fn lowest(self) -> Priority {
        Priority(match self {
            Band::Low => 0,
            Band::Mid => 4,
            Band::High => 7,
        })
    }
}

impl fmt::Display for Band {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Levels of the delay ladder: level `n` holds a message `2^n` seconds, so
/// the longest delay is `2^DELAY_LEVELS - 1` seconds (about 97 days).
pub const DELAY_LEVELS: u32 = 23;

/// The longest delay accepted, in milliseconds (`2^23 - 1` seconds).
pub const MAX_DELAY_MS: u64 = ((1u64 << DELAY_LEVELS) - 1) * 1000;

/// The delay, in whole seconds, a message spends in the ladder for a due
/// time `delay_ms` away: rounded to the nearest second, so it fires within
/// half a second of its time plus the broker's hops. 0 means "not delayed".
pub fn ladder_seconds(delay_ms: u64) -> u64 {
    (delay_ms.min(MAX_DELAY_MS) + 500) / 1000
}

/// The routing key that walks a message down the ladder for `seconds`
/// (below `2^DELAY_LEVELS`) and then to `target` (a band's routing key on
/// the task exchange): one `0`/`1` word per level, highest first.
pub fn delay_routing_key(seconds: u64, target: &str) -> String {
    let mut key = String::with_capacity(DELAY_LEVELS as usize * 2 + target.len());
    for level in (0..DELAY_LEVELS).rev() {
        key.push(if seconds >> level & 1 == 1 { '1' } else { '0' });
        key.push('.');
    }
    key.push_str(target);
    key
}

/// The binding pattern on level `level`'s exchange that matches messages
/// whose bit `level` is `bit`.
pub fn delay_binding(level: u32, bit: bool) -> String {
    let mut key = "*.".repeat((DELAY_LEVELS - 1 - level) as usize);
    key.push(if bit { '1' } else { '0' });
    key.push_str(".#");
    key
}

/// A rate: tasks per hour, kept in millionths so that it is exact for every
/// rate a user writes (`50/s`, `30/min`, `1/h`, `2.5/s`) and compares as an
/// integer on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Rate {
    /// Tasks per hour, times 1,000,000. Never 0.
    micro_per_hour: u64,
}

/// A rate that is 0, negative, too large, or not `N/s`, `N/min`, `N/h`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid rate limit {0:?}: write a positive number of tasks per second, minute or hour, such as 50/s, 30/min or 1/h"
)]
pub struct InvalidRate(pub String);

/// The highest rate accepted: a million tasks per second.
pub const MAX_RATE_PER_SEC: u64 = 1_000_000;

const MICRO_PER_HOUR_PER_SEC: u64 = 3_600_000_000;

impl Rate {
    /// A rate of `micro_per_hour` millionths of a task per hour (at least 1).
    pub fn from_micro_per_hour(micro_per_hour: u64) -> Option<Rate> {
        (1..=MAX_RATE_PER_SEC * MICRO_PER_HOUR_PER_SEC)
            .contains(&micro_per_hour)
            .then_some(Rate { micro_per_hour })
    }

    /// Tasks per hour, times 1,000,000.
    pub fn micro_per_hour(self) -> u64 {
        self.micro_per_hour
    }

    /// Tasks per second.
    pub fn per_sec(self) -> f64 {
        self.micro_per_hour as f64 / MICRO_PER_HOUR_PER_SEC as f64
    }

    /// This rate times `num / den` (an agent's share), at least one
    /// millionth of a task per hour.
    pub fn share(self, num: u64, den: u64) -> Rate {
        let den = den.max(1);
        let v = (u128::from(self.micro_per_hour) * u128::from(num) / u128::from(den)) as u64;
        Rate {
            micro_per_hour: v.max(1),
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.micro_per_hour;
        if m.is_multiple_of(MICRO_PER_HOUR_PER_SEC) {
            write!(f, "{}/s", m / MICRO_PER_HOUR_PER_SEC)
        } else if m.is_multiple_of(60_000_000) {
            write!(f, "{}/min", m / 60_000_000)
        } else if m.is_multiple_of(1_000_000) {
            write!(f, "{}/h", m / 1_000_000)
        } else {
            write!(f, "{:.6}/s", self.per_sec())
        }
    }
}

impl FromStr for Rate {
    type Err = InvalidRate;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidRate(s.chars().take(40).collect());
        let (count, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let per_hour: u64 = match unit.trim() {
            "s" | "sec" | "second" => 3600,
            "m" | "min" | "minute" => 60,
            "h" | "hour" => 1,
            _ => return Err(bad()),
        };
        let count = count.trim();
        // A decimal count (`2.5/s`) is parsed exactly in millionths.
        let (whole, frac) = count.split_once('.').unwrap_or((count, ""));
        if whole.is_empty() && frac.is_empty()
            || !whole.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
            || frac.len() > 6
        {
            return Err(bad());
        }
        let whole: u64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| bad())?
        };
        let frac_micro: u64 = if frac.is_empty() {
            0
        } else {
            format!("{frac:0<6}").parse().map_err(|_| bad())?
        };
        let micro = whole
            .checked_mul(1_000_000)
            .and_then(|w| w.checked_add(frac_micro))
            .and_then(|c| c.checked_mul(per_hour))
            .ok_or_else(bad)?;
        Rate::from_micro_per_hour(micro).ok_or_else(bad)
    }
}

/// What a schedule does with ticks that fell while no coordinator ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Missed {
    /// Fire every missed tick, oldest first (the default: nothing is skipped).
    #[default]
    RunAll,
    /// Fire the most recent missed tick only.
    RunOnce,
    /// Fire none of them; wait for the next tick.
    Skip,
}

impl Missed {
    /// The flag value: `run-all`, `run-once`, `skip`.
    pub fn as_str(self) -> &'static str {
        match self {
            Missed::RunAll => "run-all",
            Missed::RunOnce => "run-once",
            Missed::Skip => "skip",
        }
    }
}

impl FromStr for Missed {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "run-all" => Ok(Missed::RunAll),
            "run-once" => Ok(Missed::RunOnce),
            "skip" => Ok(Missed::Skip),
            _ => Err(format!(
                "invalid missed-tick policy {:?}: use run-all, run-once or skip",
                s.chars().take(40).collect::<String>()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_and_bands() {
        assert_eq!("9".parse::<Priority>().unwrap().band(), Band::High);
        assert_eq!("0".parse::<Priority>().unwrap().band(), Band::Low);
        assert_eq!(Priority::new(5).unwrap().band(), Band::Mid);
        for bad in ["10", "-1", "", "x", "255", "1.5"] {
            assert!(bad.parse::<Priority>().is_err(), "{bad}");
        }
        assert!(Priority::new(10).is_err());
        for b in Band::ALL {
            assert_eq!(Band::from_label(b.label()), Some(b));
            assert_eq!(b.lowest().band(), b);
            assert_eq!(Band::ALL[b.index()], b);
        }
        assert_eq!(Priority::default().band(), Band::Low);
    }

    #[test]
    fn ladder_keys_spell_the_delay_in_bits() {
        assert_eq!(ladder_seconds(0), 0);
        assert_eq!(ladder_seconds(499), 0);
        assert_eq!(ladder_seconds(1_500), 2);
        assert_eq!(ladder_seconds(90_000), 90);
        assert_eq!(ladder_seconds(u64::MAX), (1 << DELAY_LEVELS) - 1);
        let key = delay_routing_key(5, "build.p0-3");
        assert_eq!(key.matches('.').count(), DELAY_LEVELS as usize + 1);
        assert!(key.ends_with("1.0.1.build.p0-3"), "{key}");
        // Level 0's "set" pattern has 22 wildcards before it.
        assert_eq!(delay_binding(0, true), format!("{}1.#", "*.".repeat(22)));
        assert_eq!(delay_binding(22, false), "0.#");
    }

    #[test]
    fn rates_parse_exactly_and_refuse_nonsense() {
        assert_eq!("50/s".parse::<Rate>().unwrap().per_sec(), 50.0);
        assert_eq!("30/min".parse::<Rate>().unwrap().to_string(), "30/min");
        assert_eq!("1/h".parse::<Rate>().unwrap().to_string(), "1/h");
        assert_eq!("2.5/s".parse::<Rate>().unwrap().per_sec(), 2.5);
        assert_eq!("2.5/s".parse::<Rate>().unwrap().to_string(), "150/min");
        for bad in [
            "0/s",
            "-1/s",
            "",
            "50",
            "50/d",
            "x/s",
            "1e3/s",
            "0.0000001/s",
            "1000001/s",
            "99999999999999999/s",
            "/s",
            "./s",
        ] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
        let r: Rate = "10/s".parse().unwrap();
        assert_eq!(r.share(1, 2).to_string(), "5/s");
        assert_eq!(r.share(0, 3).micro_per_hour(), 1);
    }
}

//! Which batches of a sender are applied: the run (incarnation) followed,
//! its batch numbers, and what a forged batch cannot do.
//!
//! Anyone who may publish to the events stream can write an envelope under
//! any sender id. Without per-agent broker users (the strong mode, checked
//! by the runtime against RabbitMQ's validated `user_id`), the rules here
//! keep such a batch from doing lasting harm:
//!
//! - **A jump is not adopted.** A batch numbered more than [`MAX_SEQ_JUMP`]
//!   past the last one seen is dropped: an agent numbers its batches one by
//!   one, and the most it can skip is what its bounded resend buffer
//!   dropped. (Adopted, a forged `seq = 10^15` made every later real batch
//!   look old, for good.)
//! - **A run is an incarnation, numbered on its own.** Envelopes of version
//!   2 carry the random start id of the process that wrote them, and each
//!   run has its own window of batch numbers, so no batch of one run can
//!   make another's look old. A new run starts when its batch says `Hello`
//!   early in its numbering (a restart), or when every known run has gone
//!   quiet; any other batch of an unknown run is dropped.
//! - **No run is blinded.** A forged `Hello` starts a run, but the real one
//!   keeps being applied; its next batch shows two runs under one id
//!   (counted, logged). At most [`MAX_RUNS`] runs are remembered, and the
//!   one with the least history goes first, so fresh forged runs never
//!   push out a long-lived real one.
//!
//! Version 1 envelopes (incarnation 0) keep the old rules, with the jump
//! bound: a `Hello` starts the numbering again.

use serde::{Deserialize, Serialize};

/// How many recent sequence numbers a [`SeqWindow`] remembers.
const SEQ_WINDOW: u64 = 64;

/// Largest step from the last batch number seen that is adopted. An agent
/// skips numbers only when its resend buffer (100,000 events by default,
/// at least one per batch) drops batches during an outage.
pub const MAX_SEQ_JUMP: u64 = 1 << 18;

/// The last 64 envelope sequence numbers seen from one sender.
///
/// Agents number their batches and resend unconfirmed ones after an outage,
/// so a batch may arrive twice, or late (after later ones). A late batch is
/// applied; a repeated one is dropped; a number that slides out of the window
/// without having been seen is a lost batch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqWindow {
    /// Highest number seen, if any.
    last: Option<u64>,
    /// First number seen since the last reset: nothing below it is missing.
    first: u64,
    /// Bit `i` set: `last - i` was seen.
    seen: u64,
}

/// What [`SeqWindow::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqCheck {
    /// Not seen before: apply it. `missing` numbers slid out of the window
    /// unseen because of it.
    New {
        /// Batches now known to be lost.
        missing: u64,
    },
    /// Seen already (or too old to tell): drop it.
    Repeat,
    /// Too far ahead of the last number seen to be real: drop it.
    Jump,
}

impl SeqWindow {
    /// Forgets everything (the sender restarted and counts from 1 again).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Records `seq` and says whether it is new.
    pub fn check(&mut self, seq: u64) -> SeqCheck {
        let Some(last) = self.last else {
            *self = Self {
                last: Some(seq),
                first: seq,
                seen: 1,
            };
            return SeqCheck::New { missing: 0 };
        };
        if seq > last {
            let shift = seq - last;
            if shift > MAX_SEQ_JUMP {
                return SeqCheck::Jump;
            }
            let mut missing = shift.saturating_sub(SEQ_WINDOW);
            // Old positions pushed out of the window: lost if never seen.
            for j in SEQ_WINDOW.saturating_sub(shift)..SEQ_WINDOW {
                let unseen = self.seen & (1 << j) == 0;
                if unseen && last.checked_sub(j).is_some_and(|p| p >= self.first) {
                    missing += 1;
                }
            }
            self.seen = if shift >= SEQ_WINDOW {
                1
            } else {
                (self.seen << shift) | 1
            };
            self.last = Some(seq);
            return SeqCheck::New { missing };
        }
        let age = last - seq;
        if age >= SEQ_WINDOW || seq < self.first || self.seen & (1 << age) != 0 {
            return SeqCheck::Repeat;
        }
        self.seen |= 1 << age;
        SeqCheck::New { missing: 0 }
    }
}

/// Runs of one sender remembered at once.
const MAX_RUNS: usize = 4;

/// One run (incarnation) of a sender.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// Its random start id (0: a sender of version 1 envelopes).
    pub incarnation: u64,
    /// Its batch numbers.
    pub window: SeqWindow,
    /// Batches of it applied: a run with a history is not evicted by
    /// fresh ones.
    pub batches: u64,
    /// When it was last heard from (coordinator clock).
    pub last_heard_ms: u64,
    /// Another run started after it was last heard: if it speaks again,
    /// two runs send under one id.
    pub superseded: bool,
}

/// The runs of one sender the coordinator accepts batches from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SenderState {
    /// At most [`MAX_RUNS`], each with its own batch numbers, so a batch of
    /// one run never makes another's look old.
    pub runs: Vec<Run>,
}

/// A batch's header, as far as admission goes.
#[derive(Debug, Clone, Copy)]
pub struct BatchHead {
    /// The writing process's start id (0: version 1 envelope).
    pub incarnation: u64,
    /// Its number.
    pub seq: u64,
    /// Whether it carries a `Hello`.
    pub hello: bool,
}

/// What to do with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Apply it.
    Apply {
        /// Batches now known to be lost.
        missing: u64,
        /// What changed about the sender's runs, if anything.
        change: RunChange,
    },
    /// A batch seen already: drop it (counted as a duplicate).
    Repeat,
    /// Refused: drop it, counted under this reason
    /// (`guildhall_events_malformed_total{reason}`).
    Refused(&'static str),
}

/// A change in a sender's runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunChange {
    /// None.
    Same,
    /// A new run started (a restart, or a forged `Hello`).
    Started {
        /// The run heard from last before it (0 if none or unknown).
        after: u64,
    },
    /// A run that another had superseded spoke again: two runs send under
    /// one id (a forged `Hello`, or two processes with one id).
    Conflict,
}

impl SenderState {
    /// Decides on a batch read at `now_ms`, and records it if applied.
    /// `quiet_ms`: the silence after which every known run counts as gone,
    /// so that a new run may start without a `Hello` (the batch holding it
    /// may have been dropped by its resend buffer).
    pub fn admit(&mut self, b: BatchHead, now_ms: u64, quiet_ms: u64) -> Admission {
        let starts = b.hello && b.seq <= SEQ_WINDOW;
        if let Some(run) = self
            .runs
            .iter_mut()
            .find(|r| r.incarnation == b.incarnation)
        {
            if b.incarnation == 0 && starts {
                // A version 1 sender restarted: its numbering starts again.
                run.window.reset();
            }
            return match run.window.check(b.seq) {
                SeqCheck::New { missing } => {
                    run.batches += 1;
                    run.last_heard_ms = run.last_heard_ms.max(now_ms);
                    let change = if std::mem::take(&mut run.superseded) {
                        RunChange::Conflict
                    } else {
                        RunChange::Same
                    };
                    Admission::Apply { missing, change }
                }
                SeqCheck::Repeat => Admission::Repeat,
                SeqCheck::Jump => Admission::Refused("seq_jump"),
            };
        }
        let all_quiet = self
            .runs
            .iter()
            .all(|r| now_ms.saturating_sub(r.last_heard_ms) >= quiet_ms);
        if !(self.runs.is_empty() || starts || all_quiet) {
            return Admission::Refused("incarnation");
        }
        let after = self
            .runs
            .iter()
            .max_by_key(|r| r.last_heard_ms)
            .map_or(0, |r| r.incarnation);
        let change = if self.runs.is_empty() {
            RunChange::Same
        } else {
            RunChange::Started { after }
        };
        for r in &mut self.runs {
            r.superseded = true;
        }
        if self.runs.len() >= MAX_RUNS
            && let Some(i) = self
                .runs
                .iter()
                .enumerate()
                .min_by_key(|(_, r)| (r.batches, r.last_heard_ms))
                .map(|(i, _)| i)
        {
            // The run with the least history goes: a long-lived real run
            // outlasts any number of fresh forged ones.
            self.runs.swap_remove(i);
        }
        let mut run = Run {
            incarnation: b.incarnation,
            last_heard_ms: now_ms,
            batches: 1,
            ..Run::default()
        };
        run.window.check(b.seq);
        self.runs.push(run);
        Admission::Apply { missing: 0, change }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_dropped_and_late_batches_kept() {
        let mut w = SeqWindow::default();
        assert_eq!(w.check(1), SeqCheck::New { missing: 0 });
        assert_eq!(w.check(3), SeqCheck::New { missing: 0 }, "2 may still come");
        assert_eq!(w.check(3), SeqCheck::Repeat);
        assert_eq!(w.check(2), SeqCheck::New { missing: 0 }, "late, applied");
        assert_eq!(w.check(2), SeqCheck::Repeat);
        assert_eq!(w.check(1), SeqCheck::Repeat);
    }

    #[test]
    fn a_number_is_missing_once_it_leaves_the_window_unseen() {
        let mut w = SeqWindow::default();
        w.check(1);
        // 2 never comes; it leaves the window when 66 arrives.
        for n in 3..=65 {
            assert_eq!(w.check(n), SeqCheck::New { missing: 0 }, "{n}");
        }
        assert_eq!(w.check(66), SeqCheck::New { missing: 1 });
        // A jump far ahead: 67..=136 left the window unseen at once;
        // 137..=199 are still inside it and may yet come.
        assert_eq!(w.check(200), SeqCheck::New { missing: 70 });
        assert_eq!(w.check(150), SeqCheck::New { missing: 0 });
        assert_eq!(w.check(10), SeqCheck::Repeat, "too old to tell: dropped");
    }

    #[test]
    fn a_restart_counts_from_the_start_again() {
        let mut w = SeqWindow::default();
        w.check(5);
        assert_eq!(w.check(1), SeqCheck::Repeat);
        w.reset();
        assert_eq!(w.check(1), SeqCheck::New { missing: 0 });
        // Numbers below the first one seen are not missing.
        assert_eq!(
            w.check(100),
            SeqCheck::New {
                missing: 100 - 1 - 64
            }
        );
    }

    #[test]
    fn a_jump_beyond_the_bound_is_not_adopted() {
        let mut w = SeqWindow::default();
        w.check(100);
        assert_eq!(w.check(1_000_000_000_000_000), SeqCheck::Jump);
        // Nothing moved: the sender's next real batch is new.
        assert_eq!(w.check(101), SeqCheck::New { missing: 0 });
        // The largest step a resend buffer can explain is still taken.
        assert_eq!(
            w.check(101 + MAX_SEQ_JUMP),
            SeqCheck::New {
                // The 63 newest may still come, late.
                missing: MAX_SEQ_JUMP - 64
            }
        );
    }

    const NOW: u64 = 1_700_000_000_000;
    const QUIET: u64 = 3_000;

    fn head(incarnation: u64, seq: u64, hello: bool) -> BatchHead {
        BatchHead {
            incarnation,
            seq,
            hello,
        }
    }

    fn applied(a: Admission) -> RunChange {
        match a {
            Admission::Apply { change, .. } => change,
            other => panic!("not applied: {other:?}"),
        }
    }

    #[test]
    fn a_restart_with_hello_is_followed() {
        let mut s = SenderState::default();
        assert_eq!(
            applied(s.admit(head(7, 1, true), NOW, QUIET)),
            RunChange::Same
        );
        for seq in 2..=50 {
            applied(s.admit(head(7, seq, false), NOW, QUIET));
        }
        // Restarted: numbers from 1 again, Hello first.
        assert_eq!(
            applied(s.admit(head(9, 1, true), NOW + 10, QUIET)),
            RunChange::Started { after: 7 }
        );
        assert_eq!(
            applied(s.admit(head(9, 2, false), NOW + 20, QUIET)),
            RunChange::Same
        );
    }

    #[test]
    fn another_runs_batch_without_hello_is_refused_while_a_known_run_lives() {
        let mut s = SenderState::default();
        applied(s.admit(head(7, 1, true), NOW, QUIET));
        applied(s.admit(head(7, 2, false), NOW, QUIET));
        // A forged batch (an incarnation of its own, no Hello).
        assert_eq!(
            s.admit(head(666, 10, false), NOW + 1, QUIET),
            Admission::Refused("incarnation")
        );
        // A Hello far into its numbering is no start either.
        assert_eq!(
            s.admit(head(666, 1_000, true), NOW + 2, QUIET),
            Admission::Refused("incarnation")
        );
        assert_eq!(
            applied(s.admit(head(7, 3, false), NOW + 3, QUIET)),
            RunChange::Same
        );
        // Once every known run has been quiet long enough, a new one starts
        // without Hello (its Hello batch may have been dropped).
        assert_eq!(
            applied(s.admit(head(8, 40, false), NOW + 3 + QUIET, QUIET)),
            RunChange::Started { after: 7 }
        );
    }

    #[test]
    fn a_forged_start_blinds_no_run_and_shows_as_a_conflict() {
        let mut s = SenderState::default();
        applied(s.admit(head(7, 1, true), NOW, QUIET));
        applied(s.admit(head(7, 2, false), NOW, QUIET));
        // A forged Hello with an incarnation of its own starts a run...
        assert_eq!(
            applied(s.admit(head(666, 1, true), NOW + 1, QUIET)),
            RunChange::Started { after: 7 }
        );
        // ... but the real run keeps its own numbering: its next batch is
        // applied, and shows two runs under one id.
        assert_eq!(
            applied(s.admit(head(7, 3, false), NOW + 2, QUIET)),
            RunChange::Conflict
        );
        assert_eq!(
            applied(s.admit(head(7, 4, false), NOW + 3, QUIET)),
            RunChange::Same
        );
        assert_eq!(
            s.admit(head(7, 4, false), NOW + 4, QUIET),
            Admission::Repeat
        );
        // The forged run's numbers cannot make the real ones look old.
        applied(s.admit(head(666, 60, false), NOW + 5, QUIET));
        assert_eq!(
            applied(s.admit(head(7, 5, false), NOW + 6, QUIET)),
            RunChange::Same
        );
    }

    #[test]
    fn fresh_runs_never_evict_a_run_with_a_history() {
        let mut s = SenderState::default();
        for seq in 1..=100 {
            applied(s.admit(head(7, seq, seq == 1), NOW + seq, QUIET));
        }
        // Many forged starts between two real batches.
        for forged in 1_000..1_020 {
            applied(s.admit(head(forged, 1, true), NOW + 200, QUIET));
        }
        assert_eq!(s.runs.len(), MAX_RUNS);
        assert_eq!(
            applied(s.admit(head(7, 101, false), NOW + 300, QUIET)),
            RunChange::Conflict
        );
    }

    #[test]
    fn version_1_senders_keep_the_old_rules_and_the_jump_bound() {
        let mut s = SenderState::default();
        applied(s.admit(head(0, 5, true), NOW, QUIET));
        assert_eq!(s.admit(head(0, 5, false), NOW, QUIET), Admission::Repeat);
        // A Hello early in the numbering starts it again.
        applied(s.admit(head(0, 1, true), NOW, QUIET));
        assert_eq!(
            s.admit(head(0, 1 << 40, false), NOW, QUIET),
            Admission::Refused("seq_jump")
        );
        applied(s.admit(head(0, 2, false), NOW, QUIET));
        // A Hello far into the numbering does not open the door to a jump.
        assert_eq!(
            s.admit(head(0, 1 << 40, true), NOW, QUIET),
            Admission::Refused("seq_jump")
        );
        applied(s.admit(head(0, 3, false), NOW, QUIET));
    }
}

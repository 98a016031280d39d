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
//! - **A run is an incarnation.** Envelopes of version 2 carry the random
//!   start id of the process that wrote them. A new incarnation is adopted
//!   when its batch says `Hello` early in its numbering (a restart), or when
//!   the one followed has gone silent; any other batch of an incarnation
//!   that is not followed is dropped.
//! - **The run that keeps talking wins.** If the incarnation left behind at
//!   a switch sends again, the switch was no restart (a forged `Hello`, or
//!   two processes with one id): the coordinator goes back to it and
//!   refuses the other from then on. A forgery costs one heartbeat
//!   interval of confusion, not the agent.
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

/// Incarnations refused after a conflict that are remembered.
const MAX_REFUSED: usize = 4;

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

/// What the coordinator follows of one sender.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SenderState {
    /// The incarnation followed (0: unknown, or a sender of version 1
    /// envelopes).
    pub incarnation: u64,
    /// Its batch numbers.
    pub window: SeqWindow,
    /// The incarnation followed before the last switch, and its window: if
    /// it sends again, the switch was not a restart.
    pub previous: Option<(u64, SeqWindow)>,
    /// Incarnations refused after a conflict, newest last.
    pub refused: Vec<u64>,
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
    /// Whether the incarnation followed has been silent long enough to be
    /// judged dead (or said it was stopping): a new one may take over
    /// without a `Hello` (the batch holding it may have been lost).
    pub followed_gone: bool,
}

/// What to do with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Apply it.
    Apply {
        /// Batches now known to be lost.
        missing: u64,
        /// What changed about the run followed, if anything.
        change: RunChange,
    },
    /// A batch seen already: drop it (counted as a duplicate).
    Repeat,
    /// Refused: drop it, counted under this reason
    /// (`guildhall_events_malformed_total{reason}`).
    Refused(&'static str),
}

/// A change of the incarnation followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunChange {
    /// None.
    Same,
    /// A new run took over (a restart).
    Restarted {
        /// The run left behind (0 if unknown).
        from: u64,
    },
    /// The run left at the last switch is still sending: followed again,
    /// and the one that replaced it refused.
    Conflict {
        /// The run refused from now on.
        refused: u64,
    },
}

impl SenderState {
    /// Decides on a batch, and records it if it is applied.
    pub fn admit(&mut self, b: BatchHead) -> Admission {
        if b.incarnation == 0 {
            // A version 1 sender: a Hello early in its numbering starts it
            // again (a Hello far into it would let a jump in).
            if b.hello && b.seq <= SEQ_WINDOW {
                self.window.reset();
            }
            return self.check(RunChange::Same, b.seq);
        }
        if self.refused.contains(&b.incarnation) {
            return Admission::Refused("incarnation_refused");
        }
        if b.incarnation == self.incarnation {
            return self.check(RunChange::Same, b.seq);
        }
        if let Some((prev, _)) = self.previous
            && prev == b.incarnation
        {
            // Left behind at the last switch, yet still sending.
            let Some((_, window)) = self.previous.take() else {
                return Admission::Refused("incarnation");
            };
            let refused = std::mem::replace(&mut self.incarnation, prev);
            self.window = window;
            if self.refused.len() >= MAX_REFUSED {
                self.refused.remove(0);
            }
            self.refused.push(refused);
            return self.check(RunChange::Conflict { refused }, b.seq);
        }
        let starts = b.hello && b.seq <= SEQ_WINDOW;
        if self.incarnation == 0 || starts || b.followed_gone {
            let from = self.incarnation;
            let window = std::mem::take(&mut self.window);
            self.previous = (from != 0).then_some((from, window));
            self.incarnation = b.incarnation;
            let change = if from == 0 {
                RunChange::Same
            } else {
                RunChange::Restarted { from }
            };
            return self.check(change, b.seq);
        }
        Admission::Refused("incarnation")
    }

    fn check(&mut self, change: RunChange, seq: u64) -> Admission {
        match self.window.check(seq) {
            SeqCheck::New { missing } => Admission::Apply { missing, change },
            SeqCheck::Repeat => Admission::Repeat,
            SeqCheck::Jump => Admission::Refused("seq_jump"),
        }
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

    fn head(incarnation: u64, seq: u64, hello: bool) -> BatchHead {
        BatchHead {
            incarnation,
            seq,
            hello,
            followed_gone: false,
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
        assert_eq!(applied(s.admit(head(7, 1, true))), RunChange::Same);
        for seq in 2..=50 {
            applied(s.admit(head(7, seq, false)));
        }
        // Restarted: numbers from 1 again, Hello first.
        assert_eq!(
            applied(s.admit(head(9, 1, true))),
            RunChange::Restarted { from: 7 }
        );
        assert_eq!(applied(s.admit(head(9, 2, false))), RunChange::Same);
        assert_eq!(s.incarnation, 9);
    }

    #[test]
    fn another_runs_batch_without_hello_is_refused_while_the_followed_one_lives() {
        let mut s = SenderState::default();
        applied(s.admit(head(7, 1, true)));
        applied(s.admit(head(7, 2, false)));
        // A forged batch (an incarnation of its own, no Hello).
        assert_eq!(
            s.admit(head(666, 10, false)),
            Admission::Refused("incarnation")
        );
        // A Hello far into its numbering is no restart either.
        assert_eq!(
            s.admit(head(666, 1_000, true)),
            Admission::Refused("incarnation")
        );
        assert_eq!(applied(s.admit(head(7, 3, false))), RunChange::Same);
        // Once the followed run is gone, a new one takes over without Hello
        // (its Hello batch may have been dropped by its resend buffer).
        let gone = BatchHead {
            followed_gone: true,
            ..head(8, 40, false)
        };
        assert_eq!(applied(s.admit(gone)), RunChange::Restarted { from: 7 });
    }

    #[test]
    fn a_forged_restart_is_undone_when_the_real_run_speaks_again() {
        let mut s = SenderState::default();
        applied(s.admit(head(7, 1, true)));
        applied(s.admit(head(7, 2, false)));
        // A forged Hello with an incarnation of its own is taken for a restart...
        assert_eq!(
            applied(s.admit(head(666, 1, true))),
            RunChange::Restarted { from: 7 }
        );
        // ... until the real run sends its next batch: followed again.
        assert_eq!(
            applied(s.admit(head(7, 3, false))),
            RunChange::Conflict { refused: 666 }
        );
        assert_eq!(s.incarnation, 7);
        // Its window was kept: a repeat is still a repeat.
        assert_eq!(s.admit(head(7, 3, false)), Admission::Repeat);
        // The forger's run is refused from now on, Hello or not.
        assert_eq!(
            s.admit(head(666, 2, true)),
            Admission::Refused("incarnation_refused")
        );
        // Another forged restart: undone the same way.
        assert_eq!(
            applied(s.admit(head(667, 1, true))),
            RunChange::Restarted { from: 7 }
        );
        assert_eq!(
            applied(s.admit(head(7, 4, false))),
            RunChange::Conflict { refused: 667 }
        );
    }

    #[test]
    fn refused_runs_are_remembered_up_to_a_bound() {
        let mut s = SenderState::default();
        applied(s.admit(head(7, 1, true)));
        for (i, forged) in (100..110).enumerate() {
            applied(s.admit(head(forged, 1, true)));
            applied(s.admit(head(7, 2 + i as u64, false)));
        }
        assert_eq!(s.refused, vec![106, 107, 108, 109]);
    }

    #[test]
    fn version_1_senders_keep_the_old_rules_and_the_jump_bound() {
        let mut s = SenderState::default();
        applied(s.admit(head(0, 5, true)));
        assert_eq!(s.admit(head(0, 5, false)), Admission::Repeat);
        // A Hello starts the numbering again.
        applied(s.admit(head(0, 1, true)));
        assert_eq!(
            s.admit(head(0, 1 << 40, false)),
            Admission::Refused("seq_jump")
        );
        applied(s.admit(head(0, 2, false)));
        // A Hello far into the numbering does not open the door to a jump.
        assert_eq!(
            s.admit(head(0, 1 << 40, true)),
            Admission::Refused("seq_jump")
        );
        applied(s.admit(head(0, 3, false)));
    }
}

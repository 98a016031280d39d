//! The task store's compact storage: how a task's record and its stage
//! attempts are laid out in memory, and the read-only views the rest of the
//! core (queries, ETAs, snapshots) sees them through.
//!
//! A coordinator keeps up to a million finished tasks with their whole
//! stage trace, so a record is packed: **names are `u32` symbols** into the
//! store's stage and worker tables ([`Interner`]), **times are 48-bit**
//! ([`Ms48`], milliseconds since 1970 up to the year 10889), **errors live
//! out of line** (most attempts have none), **a three-stage trace fits in
//! the record** (no allocation for rows) and **task ids in the canonical
//! UUID form Guildhall issues take 16 bytes** ([`TaskKey`]). The owned
//! [`TaskRecord`](super::tasks::TaskRecord) and
//! [`AttemptRow`](super::tasks::AttemptRow) are what the API and snapshots
//! show; [`TaskRef`] and [`RowRef`] read the packed form in place.

use super::tasks::{AttemptOutcome, AttemptRow, TaskRecord, TaskStatus};
use guildhall_proto::{AgentId, Stage, TaskId, WorkerResult};
use smallvec::SmallVec;
use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// Rows kept in the record itself: a three-stage pipeline's.
pub(super) const INLINE_ROWS: usize = 3;

/// An optional time in milliseconds since 1970, in 6 bytes. `None` is all
/// ones; a time past 2^48 - 2 ms (the year 10889) is kept as that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ms48([u16; 3]);

impl Ms48 {
    /// The largest time kept.
    const MAX: u64 = (1 << 48) - 2;
    /// No time.
    pub(super) const NONE: Ms48 = Ms48([u16::MAX; 3]);

    pub(super) fn new(at: Option<u64>) -> Self {
        match at {
            None => Self::NONE,
            Some(ms) => {
                let ms = ms.min(Self::MAX);
                Self([ms as u16, (ms >> 16) as u16, (ms >> 32) as u16])
            }
        }
    }

    pub(super) fn get(self) -> Option<u64> {
        (self != Self::NONE).then(|| {
            let [a, b, c] = self.0;
            u64::from(a) | u64::from(b) << 16 | u64::from(c) << 32
        })
    }
}

/// A task id as stored: the canonical lower-case hyphenated UUID text
/// (what [`new_task_id`](guildhall_broker::task::new_task_id) issues) as its
/// 16 bytes, anything else as its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum TaskKey {
    /// A canonical UUID.
    Uuid([u8; 16]),
    /// Any other id.
    Text(Box<str>),
}

/// A [`TaskKey`] borrowed from an id's text, for lookups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyRef<'a> {
    /// A canonical UUID.
    Uuid([u8; 16]),
    /// Any other id.
    Text(&'a str),
}

impl<'a> KeyRef<'a> {
    /// The key of the id `id`. Only the exact text a UUID formats back to
    /// is packed, so the id reads back byte for byte.
    pub(super) fn of(id: &'a str) -> Self {
        if id.len() == 36
            && !id.bytes().any(|b| b.is_ascii_uppercase())
            && let Ok(u) = uuid::Uuid::try_parse(id)
        {
            return KeyRef::Uuid(u.into_bytes());
        }
        KeyRef::Text(id)
    }

    pub(super) fn to_owned(self) -> TaskKey {
        match self {
            KeyRef::Uuid(b) => TaskKey::Uuid(b),
            KeyRef::Text(s) => TaskKey::Text(s.into()),
        }
    }
}

impl Hash for KeyRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            KeyRef::Uuid(b) => {
                state.write_u8(0);
                state.write(b);
            }
            KeyRef::Text(s) => {
                state.write_u8(1);
                s.hash(state);
            }
        }
    }
}

impl TaskKey {
    pub(super) fn as_ref(&self) -> KeyRef<'_> {
        match self {
            TaskKey::Uuid(b) => KeyRef::Uuid(*b),
            TaskKey::Text(s) => KeyRef::Text(s),
        }
    }

    /// Runs `f` on the id's text (formatted on the stack for a UUID).
    pub(super) fn with_str<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        match self {
            TaskKey::Uuid(b) => {
                let mut buf = uuid::Uuid::encode_buffer();
                f(uuid::Uuid::from_bytes(*b)
                    .hyphenated()
                    .encode_lower(&mut buf))
            }
            TaskKey::Text(s) => f(s),
        }
    }

    /// The id.
    pub(super) fn to_id(&self) -> TaskId {
        self.with_str(|s| TaskId::new(s).expect("a stored task id was valid when it came in"))
    }

    /// Orders as the ids' texts do.
    pub(super) fn cmp_text(&self, other: &TaskKey) -> Ordering {
        match (self, other) {
            // Lower-case hex digits and hyphens at fixed places: the bytes
            // order as the text does.
            (TaskKey::Uuid(a), TaskKey::Uuid(b)) => a.cmp(b),
            (TaskKey::Text(a), TaskKey::Text(b)) => a.cmp(b),
            _ => self.with_str(|a| other.with_str(|b| a.cmp(b))),
        }
    }
}

/// A symbol table for names many rows share (stages, workers): each
/// distinct name is stored once and rows hold its `u32` index. Names no
/// row uses any more are dropped by [`Interner::compact`].
#[derive(Debug)]
pub(super) struct Interner<T> {
    /// The names, by symbol.
    names: Vec<T>,
    /// Symbols by name.
    index: HashMap<T, u32>,
    /// The symbol found last: consecutive events mostly name the same stage
    /// and worker (an envelope is one agent's), so most look-ups end here,
    /// without hashing the name.
    last: Option<u32>,
    /// How many names the last compaction kept: the next one is due when
    /// the table has doubled since.
    kept: usize,
}

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Self {
            names: Vec::new(),
            index: HashMap::new(),
            last: None,
            kept: 0,
        }
    }
}

/// Whether `a` and `b` are the same text, at once if they are one string.
#[inline]
fn same_text(a: &str, b: &str) -> bool {
    (std::ptr::eq(a.as_ptr(), b.as_ptr()) && a.len() == b.len()) || a == b
}

impl<T: Clone + Eq + Hash + Borrow<str>> Interner<T> {
    /// Fewest names before a compaction is considered.
    const COMPACT_FLOOR: usize = 256;

    /// The symbol of `name`, added if new.
    pub(super) fn intern(&mut self, name: &T) -> u32 {
        if let Some(sym) = self.last_is(name.borrow()) {
            return sym;
        }
        let sym = match self.index.get(name.borrow()) {
            Some(&sym) => sym,
            None => {
                let sym = u32::try_from(self.names.len()).expect("fewer than 2^32 distinct names");
                self.names.push(name.clone());
                self.index.insert(name.clone(), sym);
                sym
            }
        };
        self.last = Some(sym);
        sym
    }

    /// The symbol of `name`, if it has one.
    pub(super) fn lookup(&self, name: &str) -> Option<u32> {
        self.last_is(name).or_else(|| self.index.get(name).copied())
    }

    /// The last symbol found, if it is `name`'s.
    #[inline]
    fn last_is(&self, name: &str) -> Option<u32> {
        let sym = self.last?;
        same_text(self.names.get(sym as usize)?.borrow(), name).then_some(sym)
    }

    /// The name of `sym`.
    pub(super) fn name(&self, sym: u32) -> &T {
        &self.names[sym as usize]
    }

    /// Whether enough names were added since the last compaction to look
    /// for unused ones.
    pub(super) fn compaction_due(&self) -> bool {
        self.names.len() > Self::COMPACT_FLOOR.max(2 * self.kept)
    }

    /// Keeps only the names `used` marks (indexed by symbol) and returns
    /// each old symbol's new one (`u32::MAX` for dropped names).
    pub(super) fn compact(&mut self, used: &[bool]) -> Vec<u32> {
        let mut remap = vec![u32::MAX; self.names.len()];
        let old = std::mem::take(&mut self.names);
        self.index.clear();
        self.last = None;
        for (sym, name) in old.into_iter().enumerate() {
            if used.get(sym).copied().unwrap_or(false) {
                remap[sym] = self.intern(&name);
            }
        }
        self.kept = self.names.len();
        remap
    }

    /// Names held.
    pub(super) fn len(&self) -> usize {
        self.names.len()
    }
}

/// No worker (a row only known as queued).
pub(super) const NO_WORKER: u32 = u32::MAX;

/// One stage attempt, packed (40 bytes).
#[derive(Debug, Clone, Copy)]
pub(super) struct Row {
    /// The stage's symbol.
    pub(super) stage: u32,
    /// The holder's symbol, or [`NO_WORKER`].
    pub(super) worker: u32,
    /// Attempt number at the stage, from 1.
    pub(super) attempt: u32,
    /// Progress reported, 0..=1; NaN for none (progress is clamped, never NaN).
    pub(super) progress: f32,
    /// When it was queued.
    pub(super) queued: Ms48,
    /// When a worker got it.
    pub(super) started: Ms48,
    /// When it ended.
    pub(super) finished: Ms48,
    /// How it went.
    pub(super) outcome: AttemptOutcome,
    /// The broker had delivered it before.
    pub(super) redelivered: bool,
    /// A result reported after it was cut off.
    pub(super) stale: Option<WorkerResult>,
}

impl Row {
    /// Attempt `attempt` at `stage`, queued at `queued_at_ms`.
    pub(super) fn queued(stage: u32, attempt: u32, queued_at_ms: Option<u64>) -> Self {
        Self {
            stage,
            worker: NO_WORKER,
            attempt,
            progress: f32::NAN,
            queued: Ms48::new(queued_at_ms),
            started: Ms48::NONE,
            finished: Ms48::NONE,
            outcome: AttemptOutcome::Queued,
            redelivered: false,
            stale: None,
        }
    }

    /// Whether this is a row of attempt `attempt` at `stage`.
    pub(super) fn is(&self, stage: u32, attempt: u32) -> bool {
        self.attempt == attempt && self.stage == stage
    }

    pub(super) fn progress(&self) -> Option<f32> {
        (!self.progress.is_nan()).then_some(self.progress)
    }

    pub(super) fn set_progress(&mut self, p: Option<f32>) {
        self.progress = p.filter(|p| !p.is_nan()).unwrap_or(f32::NAN);
    }
}

/// A failed attempt's error, out of the row (most rows have none).
#[derive(Debug, Clone)]
pub(super) struct RowError {
    /// Index of the row in its record.
    pub(super) row: u8,
    /// The error.
    pub(super) error: Option<Box<str>>,
    /// Its class.
    pub(super) class: Option<Box<str>>,
}

/// A task's record, packed.
#[derive(Debug, Clone)]
pub(super) struct Rec {
    /// The task.
    pub(super) key: TaskKey,
    /// Time of the last event about it.
    pub(super) updated_at_ms: u64,
    /// Event time of the change that set `status` and `stage`.
    pub(super) status_at_ms: u64,
    /// When it entered the pipeline.
    pub(super) submitted: Ms48,
    /// When it finished.
    pub(super) finished: Ms48,
    /// Its current (or last) stage's symbol.
    pub(super) stage: u32,
    /// Where it is.
    pub(super) status: TaskStatus,
    /// Its priority, 0-9 (from `TaskQueued`; 0 when none came): the band
    /// it is counted in and its place in the ETA's queue.
    pub(super) priority: u8,
    /// When it becomes due, if it was queued in the delay ladder: it is
    /// `scheduled` until then (and until it starts).
    pub(super) due: Ms48,
    /// Errors of its failed attempts, by row (boxed: most records have none).
    #[allow(
        clippy::box_collection,
        reason = "8 bytes in every record, not a Vec's 24: most records have no errors"
    )]
    pub(super) errors: Option<Box<Vec<RowError>>>,
    /// Its stage attempts, oldest first.
    pub(super) rows: SmallVec<[Row; INLINE_ROWS]>,
}

impl Rec {
    /// The error of row `i`, if any.
    pub(super) fn error(&self, i: usize) -> Option<&RowError> {
        self.errors
            .as_ref()?
            .iter()
            .find(|e| usize::from(e.row) == i)
    }

    /// The error entry of row `i`, made if absent.
    pub(super) fn error_mut(&mut self, i: usize) -> &mut RowError {
        let row = u8::try_from(i).expect("rows are bounded below 256");
        let errors = self.errors.get_or_insert_with(Default::default);
        match errors.iter().position(|e| e.row == row) {
            Some(at) => &mut errors[at],
            None => {
                errors.push(RowError {
                    row,
                    error: None,
                    class: None,
                });
                errors.last_mut().expect("just pushed")
            }
        }
    }

    /// Sets row `i`'s error and class.
    pub(super) fn set_error(&mut self, i: usize, error: &str, class: &str) {
        let e = self.error_mut(i);
        e.error = Some(error.into());
        e.class = Some(class.into());
    }

    /// Drops the first row (and its error; the others' indexes move down).
    pub(super) fn drop_first_row(&mut self) {
        self.rows.remove(0);
        if let Some(errors) = self.errors.as_mut() {
            errors.retain_mut(|e| {
                if e.row == 0 {
                    return false;
                }
                e.row -= 1;
                true
            });
            if errors.is_empty() {
                self.errors = None;
            }
        }
    }

    /// Index of the row of the current stage with the highest attempt.
    pub(super) fn current_row(&self) -> Option<usize> {
        self.rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.stage == self.stage)
            .max_by_key(|(_, r)| (r.attempt, r.started.get().or(r.queued.get())))
            .map(|(i, _)| i)
    }
}

/// Records per slab chunk.
const CHUNK: usize = 4096;

/// Records by `u32` slot, in chunks of [`CHUNK`] that never grow or move:
/// the slab has at most one chunk of room to spare (a doubling `Vec` can
/// have as much spare as it holds), and growing never copies records.
#[derive(Debug, Default)]
pub(super) struct Slab {
    /// The chunks, each allocated at its full size once.
    chunks: Vec<Vec<Option<Rec>>>,
    /// Free slots, reused first.
    free: Vec<u32>,
}

impl Slab {
    /// The record in `slot`.
    pub(super) fn get(&self, slot: u32) -> Option<&Rec> {
        let slot = slot as usize;
        self.chunks.get(slot / CHUNK)?.get(slot % CHUNK)?.as_ref()
    }

    /// The record in `slot`, to change.
    pub(super) fn get_mut(&mut self, slot: u32) -> Option<&mut Rec> {
        let slot = slot as usize;
        self.chunks
            .get_mut(slot / CHUNK)?
            .get_mut(slot % CHUNK)?
            .as_mut()
    }

    /// Puts `rec` in a free slot and returns it.
    pub(super) fn insert(&mut self, rec: Rec) -> u32 {
        if let Some(slot) = self.free.pop() {
            let s = slot as usize;
            self.chunks[s / CHUNK][s % CHUNK] = Some(rec);
            return slot;
        }
        if self.chunks.last().is_none_or(|c| c.len() == CHUNK) {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        let full = (self.chunks.len() - 1) * CHUNK;
        let chunk = self.chunks.last_mut().expect("a chunk with room");
        let slot = u32::try_from(full + chunk.len()).expect("fewer than 2^32 tasks held");
        chunk.push(Some(rec));
        slot
    }

    /// Replaces the record in `slot` (which holds one).
    pub(super) fn replace(&mut self, slot: u32, rec: Rec) {
        if let Some(held) = self.get_mut(slot) {
            *held = rec;
        }
    }

    /// Takes the record out of `slot`, freeing it.
    pub(super) fn take(&mut self, slot: u32) -> Option<Rec> {
        let s = slot as usize;
        let rec = self.chunks.get_mut(s / CHUNK)?.get_mut(s % CHUNK)?.take()?;
        self.free.push(slot);
        Some(rec)
    }

    /// Records held.
    pub(super) fn len(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum::<usize>() - self.free.len()
    }

    /// Slots ever used (held or free).
    #[cfg(test)]
    pub(super) fn slots_used(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }

    /// Every record held.
    pub(super) fn iter(&self) -> impl Iterator<Item = &Rec> {
        self.chunks.iter().flatten().flatten()
    }

    /// Every record held, to change.
    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Rec> {
        self.chunks.iter_mut().flatten().flatten()
    }
}

/// What a view needs of the store to read a record: its name tables.
#[derive(Debug, Clone, Copy)]
pub(super) struct Names<'a> {
    /// Stage names by symbol.
    pub(super) stages: &'a Interner<Stage>,
    /// Worker names by symbol.
    pub(super) workers: &'a Interner<AgentId>,
}

/// A task's record, read in place.
#[derive(Debug, Clone, Copy)]
pub struct TaskRef<'a> {
    /// The store's name tables.
    names: Names<'a>,
    /// The packed record.
    rec: &'a Rec,
}

impl<'a> TaskRef<'a> {
    pub(super) fn new(names: Names<'a>, rec: &'a Rec) -> Self {
        Self { names, rec }
    }

    /// The task's id.
    pub fn id(&self) -> TaskId {
        self.rec.key.to_id()
    }

    /// Orders two records by id, as the ids' texts order.
    pub fn cmp_id(&self, other: &TaskRef<'_>) -> Ordering {
        self.rec.key.cmp_text(&other.rec.key)
    }

    /// Where it is.
    pub fn status(&self) -> TaskStatus {
        self.rec.status
    }

    /// Its current (or last) stage.
    pub fn stage(&self) -> &'a Stage {
        self.names.stages.name(self.rec.stage)
    }

    /// When it entered the pipeline, if known.
    pub fn submitted_at_ms(&self) -> Option<u64> {
        self.rec.submitted.get()
    }

    /// Time of the last event about it.
    pub fn updated_at_ms(&self) -> u64 {
        self.rec.updated_at_ms
    }

    /// When it finished.
    pub fn finished_at_ms(&self) -> Option<u64> {
        self.rec.finished.get()
    }

    /// Its priority, 0-9.
    pub fn priority(&self) -> u8 {
        self.rec.priority
    }

    /// The band its priority is queued in.
    pub fn band(&self) -> guildhall_proto::schedule::Band {
        guildhall_proto::schedule::Priority::new(self.rec.priority)
            .unwrap_or_default()
            .band()
    }

    /// When it becomes due, if it was queued in the delay ladder and has not
    /// started yet.
    pub fn due_at_ms(&self) -> Option<u64> {
        self.rec.due.get()
    }

    /// Whether it waits in the delay ladder at `now_ms`: queued, with a due
    /// time still ahead (a task has none once an attempt started, even one
    /// that started early: [`super::tasks::TaskStore::started`]).
    pub fn is_scheduled(&self, now_ms: u64) -> bool {
        self.rec.status == TaskStatus::Queued && self.rec.due.get().is_some_and(|d| d > now_ms)
    }

    /// How many stage attempts it has.
    pub fn attempts(&self) -> usize {
        self.rec.rows.len()
    }

    /// The row of its current stage with the highest attempt.
    pub fn current_row(&self) -> Option<RowRef<'a>> {
        let i = self.rec.current_row()?;
        Some(self.row(i))
    }

    /// Its stage attempts, oldest first.
    pub fn rows(&self) -> impl Iterator<Item = RowRef<'a>> + 'a {
        let this = *self;
        (0..self.rec.rows.len()).map(move |i| this.row(i))
    }

    fn row(&self, i: usize) -> RowRef<'a> {
        RowRef {
            names: self.names,
            rec: self.rec,
            i,
        }
    }

    /// The owned record (what the API and snapshots show).
    pub fn to_record(&self) -> TaskRecord {
        TaskRecord {
            id: self.id(),
            status: self.status(),
            stage: self.stage().clone(),
            submitted_at_ms: self.submitted_at_ms(),
            updated_at_ms: self.rec.updated_at_ms,
            status_at_ms: self.rec.status_at_ms,
            finished_at_ms: self.finished_at_ms(),
            rows: self.rows().map(|r| r.to_row()).collect(),
            priority: self.rec.priority,
            due_at_ms: self.due_at_ms(),
        }
    }
}

/// One stage attempt, read in place.
#[derive(Debug, Clone, Copy)]
pub struct RowRef<'a> {
    /// The store's name tables.
    names: Names<'a>,
    /// The record holding it.
    rec: &'a Rec,
    /// Its index there.
    i: usize,
}

impl<'a> RowRef<'a> {
    fn row(&self) -> &'a Row {
        &self.rec.rows[self.i]
    }

    /// The stage.
    pub fn stage(&self) -> &'a Stage {
        self.names.stages.name(self.row().stage)
    }

    /// Attempt number at the stage.
    pub fn attempt(&self) -> u32 {
        self.row().attempt
    }

    /// The worker that took it, once one did.
    pub fn worker(&self) -> Option<&'a AgentId> {
        let w = self.row().worker;
        (w != NO_WORKER).then(|| self.names.workers.name(w))
    }

    /// When it was queued.
    pub fn queued_at_ms(&self) -> Option<u64> {
        self.row().queued.get()
    }

    /// When the worker got it.
    pub fn started_at_ms(&self) -> Option<u64> {
        self.row().started.get()
    }

    /// When it ended.
    pub fn finished_at_ms(&self) -> Option<u64> {
        self.row().finished.get()
    }

    /// How it went.
    pub fn outcome(&self) -> AttemptOutcome {
        self.row().outcome
    }

    /// The owned row.
    pub fn to_row(&self) -> AttemptRow {
        let row = self.row();
        let error = self.rec.error(self.i);
        AttemptRow {
            stage: self.stage().clone(),
            attempt: row.attempt,
            worker: self.worker().cloned(),
            queued_at_ms: row.queued.get(),
            started_at_ms: row.started.get(),
            finished_at_ms: row.finished.get(),
            outcome: row.outcome,
            error: error.and_then(|e| e.error.clone()),
            error_class: error.and_then(|e| e.class.clone()),
            redelivered: row.redelivered,
            progress: row.progress(),
            stale: row.stale,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interner_remembers_its_last_symbol_only_while_it_is_right() {
        let st = |s: &str| Stage::new(s).unwrap();
        let mut names: Interner<Stage> = Interner::default();
        let (a, b) = (st("a"), st("b"));
        assert_eq!(names.intern(&a), 0);
        assert_eq!(names.intern(&b), 1);
        // The last one found, by its own text or an equal copy.
        assert_eq!(names.lookup("b"), Some(1));
        assert_eq!(names.intern(&st("b")), 1);
        assert_eq!(names.intern(&a), 0);
        assert_eq!(names.lookup("a"), Some(0));
        assert_eq!(names.lookup("c"), None);
        // A compaction renumbers: the remembered symbol must not survive it.
        let remap = names.compact(&[false, true]);
        assert_eq!(remap, [u32::MAX, 0]);
        assert_eq!(
            names.lookup("a"),
            None,
            "dropped, though it was the last found"
        );
        assert_eq!(names.intern(&b), 0);
        assert_eq!(names.intern(&a), 1, "a new symbol, not the old one");
        assert_eq!(names.name(1).as_str(), "a");
    }

    #[test]
    fn the_packed_layout_stays_small() {
        // A completed three-stage task's rows sit in its record: record,
        // key and rows are most of its memory.
        assert_eq!(std::mem::size_of::<Row>(), 40);
        assert!(
            std::mem::size_of::<Rec>() <= 200,
            "{}",
            std::mem::size_of::<Rec>()
        );
        assert!(std::mem::size_of::<Option<Rec>>() <= 200);
    }

    #[test]
    fn times_round_trip_through_48_bits() {
        for t in [
            None,
            Some(0),
            Some(1),
            Some(1_767_225_600_123),
            Some(Ms48::MAX),
        ] {
            assert_eq!(Ms48::new(t).get(), t);
        }
        assert_eq!(Ms48::new(Some(u64::MAX)).get(), Some(Ms48::MAX));
    }

    #[test]
    fn only_canonical_uuids_are_packed_and_every_id_reads_back() {
        let ids = [
            "0195f3a2-7c1e-7b3a-9f00-00000000002a",
            "0195F3A2-7C1E-7B3A-9F00-00000000002A",
            "0195f3a27c1e7b3a9f0000000000002a",
            "0195f3a2-7c1e-7b3a-9f00-00000000002a-x",
            "T1",
        ];
        for id in ids {
            let key = KeyRef::of(id).to_owned();
            assert_eq!(key.to_id().as_str(), id);
            assert_eq!(matches!(key, TaskKey::Uuid(_)), id == ids[0], "{id}");
        }
        let mut keys: Vec<_> = ids.iter().map(|id| KeyRef::of(id).to_owned()).collect();
        keys.sort_by(TaskKey::cmp_text);
        let mut texts = ids.to_vec();
        texts.sort();
        let sorted: Vec<_> = keys.iter().map(|k| k.to_id().to_string()).collect();
        assert_eq!(sorted, texts);
    }

    #[test]
    fn a_slab_grows_by_whole_chunks_and_reuses_freed_slots() {
        let rec = |i: usize| Rec {
            key: TaskKey::Text(format!("T{i}").into()),
            updated_at_ms: i as u64,
            status_at_ms: 0,
            submitted: Ms48::NONE,
            finished: Ms48::NONE,
            stage: 0,
            status: TaskStatus::Queued,
            priority: 0,
            due: Ms48::NONE,
            errors: None,
            rows: SmallVec::new(),
        };
        let mut slab = Slab::default();
        let slots: Vec<u32> = (0..CHUNK + 10).map(|i| slab.insert(rec(i))).collect();
        assert_eq!(slots.last().copied(), Some((CHUNK + 9) as u32));
        assert_eq!(slab.chunks.len(), 2);
        assert!(slab.chunks.iter().all(|c| c.capacity() == CHUNK));
        assert_eq!(
            slab.get(CHUNK as u32).map(|r| r.updated_at_ms),
            Some(CHUNK as u64)
        );
        assert_eq!(slab.take(5).map(|r| r.updated_at_ms), Some(5));
        assert!(slab.get(5).is_none() && slab.take(5).is_none());
        assert_eq!(slab.len(), CHUNK + 9);
        assert_eq!(slab.insert(rec(99_999)), 5, "a freed slot is reused first");
        assert_eq!(slab.iter().count(), CHUNK + 10);
        assert!(slab.get(u32::MAX).is_none());
    }

    #[test]
    fn an_interner_drops_names_no_row_uses() {
        let mut names: Interner<Stage> = Interner::default();
        let a = names.intern(&"a".parse().unwrap());
        let b = names.intern(&"b".parse().unwrap());
        assert_eq!(names.intern(&"a".parse().unwrap()), a);
        let remap = names.compact(&[false, true]);
        assert_eq!(remap[a as usize], u32::MAX);
        let b2 = remap[b as usize];
        assert_eq!(names.name(b2).as_str(), "b");
        assert_eq!(names.lookup("a"), None);
        assert_eq!(names.len(), 1);
    }
}

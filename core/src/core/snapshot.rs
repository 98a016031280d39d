//! Snapshots of the core: its state, its counters and the stream offset they
//! cover, as bytes. Pure: no file access here (`serve::persist` does the IO).
//!
//! # Format
//!
//! ```text
//! offset  size  field
//! 0       8     magic "GHSNAP\r\n"
//! 8       4     format version, u32 little-endian (FORMAT_VERSION)
//! 12      8     payload length N, u64 little-endian
//! 20      N     payload: postcard(SnapshotHeader), then postcard(CoreState)
//! 20+N    4     CRC-32 (IEEE) of bytes 0..20+N, u32 little-endian
//! ```
//!
//! The format version is checked right after the magic, before anything it
//! could change. postcard is not self-describing, so **any change to a type
//! saved in a snapshot must bump [`FORMAT_VERSION`]**; the test
//! `the_body_layout_is_pinned` (in the coordinator's `core_metrics_tests`,
//! where the real counters are) fails until it is done.
//!
//! # What is saved, what is rebuilt
//!
//! Saved: workers; stages, each with its band state (the broker's last
//! depth of each band queue and of the intake, recent queue waits per band,
//! last start per band); tasks, each with its priority and due time; ingest
//! counts (with the last offset applied); every counter series of the
//! telemetry; the capacity planner (arrival histories and forecasts: kept
//! only if the capacity settings are the same when restored); the error
//! tracker (classes, counts, samples, per-minute rates and whether a rise
//! was reported; its limits come from the restoring core's configuration);
//! and the scheduling state ([`Scheduling`], format 6): cancel requests
//! (live and the last settled ones, and the forged count), cron schedules
//! (each with its last fired tick, that tick's task id and when it was
//! written, its fired count; dropped and refused counts) and stage rate
//! limits (limit, who set it, when).
//!
//! Rebuilt on restore: the stages' metric series (announced to the
//! restoring core's telemetry), the liveness deadline heap (every live
//! worker re-armed), the task store's finished count and eviction queue.
//!
//! Not kept: notices (already acted on), histograms (they restart at
//! zero), `caught_up` (the runtime replays from the offset and reads its
//! new marker back); of the scheduling state, what this run of the core
//! did and the next one redoes: the ticks handed over and not yet read
//! back, and when the core caught up (each run catches up anew); the rate
//! limit shares sent (a restarted coordinator sends every share again), the
//! agents still holding a share, the achieved start rates (they restart
//! empty) and the count of forged `RateLimitSet` events.

use super::errors::ErrorTracker;
use super::scheduling::Scheduling;
use super::stages::StageState;
use super::tasks::{TaskRecord, TaskStore};
use super::telemetry::{CounterSample, Telemetry, WORKER_TASKS_TOTAL};
use super::workers::Worker;
use super::{Core, CoreConfig, IngestStats};
use crate::capacity::Planner;
use guildhall_proto::{AgentId, Namespace, Stage, TaskId};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};

/// The first bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"GHSNAP\r\n";
/// The layout of the payload. Bump it with any change to a saved type.
pub const FORMAT_VERSION: u32 = 8;
/// Magic, format version, payload length.
const PREFIX_LEN: usize = 8 + 4 + 8;
/// The trailing checksum.
const CRC_LEN: usize = 4;

/// What a snapshot says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    /// Version of the coordinator that wrote it, for the log.
    pub crate_version: String,
    /// The namespace it belongs to: another one's state must not be loaded.
    pub namespace: String,
    /// The last stream offset applied to the state: replay resumes after it.
    pub offset: Option<u64>,
    /// When it was written (coordinator clock), for its age in the log.
    pub written_at_ms: u64,
}

/// The core's state as saved. Borrowed from the core when writing, owned
/// when read back: one type, so writer and reader cannot drift apart.
#[derive(Serialize, Deserialize)]
struct CoreState<'a> {
    /// Every tracked worker, written in id order (the same state gives
    /// the same bytes; read back in any order).
    #[serde(serialize_with = "workers_in_id_order")]
    workers: Cow<'a, HashMap<AgentId, Worker>>,
    /// Every known stage, with its counts, rates and samples.
    stages: Cow<'a, BTreeMap<Stage, StageState>>,
    /// Every tracked task.
    tasks: Tasks<'a>,
    /// Ingest counts and the last offset applied.
    stats: Cow<'a, IngestStats>,
    /// Every counter series, which live in the runtime's metrics (its
    /// [`Telemetry`]), not the core.
    counters: Vec<CounterSample>,
    /// Arrival histories, forecasts and stabiliser windows: days of history
    /// the forecasts need.
    planner: Cow<'a, Planner>,
    /// Failures by stage and error class.
    errors: Cow<'a, ErrorTracker>,
    /// Cancels, cron schedules, rate limits (format 6).
    scheduling: Cow<'a, Scheduling>,
    /// Held tasks with their payloads, joins with their children's
    /// results (format 7; a stored result's digest: format 8).
    flows: Cow<'a, super::flows::Flows>,
}

/// The tasks as saved: a map of id to [`TaskRecord`]. Written from the live
/// store one record at a time (the packed records are unpacked as they are
/// encoded, never all at once), read back as the map.
enum Tasks<'a> {
    /// The core's store, being written.
    Live(&'a TaskStore),
    /// Read back from a file.
    Read(HashMap<TaskId, TaskRecord>),
}

impl Tasks<'_> {
    /// How many tasks.
    fn len(&self) -> usize {
        match self {
            Tasks::Live(store) => store.len(),
            Tasks::Read(map) => map.len(),
        }
    }

    /// The records read back.
    fn into_records(self) -> Vec<TaskRecord> {
        match self {
            Tasks::Live(store) => store.iter().map(|t| t.to_record()).collect(),
            Tasks::Read(map) => {
                // In id order: the same file restores the same store.
                let mut records: Vec<(TaskId, TaskRecord)> = map.into_iter().collect();
                records.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                records.into_iter().map(|(_, r)| r).collect()
            }
        }
    }
}

impl Serialize for Tasks<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            Tasks::Live(store) => {
                let mut map = serializer.serialize_map(Some(store.len()))?;
                for task in store.iter() {
                    map.serialize_entry(&task.id(), &task.to_record())?;
                }
                map.end()
            }
            Tasks::Read(records) => in_key_order(records, serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Tasks<'_> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        HashMap::deserialize(deserializer).map(Tasks::Read)
    }
}

/// Writes a map in key order, so the bytes do not depend on a `HashMap`'s
/// iteration order (the format is the same: a map, in any order).
fn in_key_order<K, V, S>(map: &HashMap<K, V>, serializer: S) -> Result<S::Ok, S::Error>
where
    K: Ord + Serialize,
    V: Serialize,
    S: serde::Serializer,
{
    let mut entries: Vec<(&K, &V)> = map.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    serializer.collect_map(entries)
}

/// The workers table in id order (see [`in_key_order`]). serde hands
/// `serialize_with` the field's own type, a `&Cow`.
#[allow(clippy::ptr_arg)]
fn workers_in_id_order<S: serde::Serializer>(
    workers: &Cow<'_, HashMap<AgentId, Worker>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    in_key_order(workers, serializer)
}

/// A snapshot read back, ready for [`Core::restore`].
pub struct Snapshot {
    /// What it says about itself.
    pub header: SnapshotHeader,
    /// The state.
    state: CoreState<'static>,
}

impl Snapshot {
    /// Workers, stages and tasks it holds, for the log.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.state.workers.len(),
            self.state.stages.len(),
            self.state.tasks.len(),
        )
    }
}

/// Why a snapshot could not be used. Every reason is one line.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Not a snapshot at all.
    #[error("not a Guildhall snapshot (wrong magic bytes)")]
    BadMagic,
    /// Cut short (a torn write, a full disk).
    #[error("truncated: {found} bytes, expected {expected}")]
    Truncated {
        /// Bytes present.
        found: usize,
        /// Bytes the header announces (or the least a snapshot has).
        expected: u64,
    },
    /// More bytes than the header announces.
    #[error("corrupt: {found} bytes, expected {expected}")]
    TrailingBytes {
        /// Bytes present.
        found: usize,
        /// Bytes the header announces.
        expected: u64,
    },
    /// Written in a layout this coordinator does not read.
    #[error("snapshot format version {found}; this coordinator reads version {expected}")]
    Format {
        /// The file's format version.
        found: u32,
        /// The one this build reads.
        expected: u32,
    },
    /// The bytes changed after they were written.
    #[error("corrupt: checksum mismatch")]
    Checksum,
    /// The header does not decode.
    #[error("corrupt header: {0}")]
    Header(postcard::Error),
    /// Another deployment's state.
    #[error("snapshot of namespace '{found}', not '{expected}'")]
    Namespace {
        /// The file's namespace.
        found: String,
        /// The namespace served.
        expected: String,
    },
    /// The state does not decode (or breaks an invariant).
    #[error("corrupt state: {0}")]
    Body(postcard::Error),
    /// The state could not be encoded.
    #[error("cannot encode the state: {0}")]
    Encode(postcard::Error),
}

impl Core {
    /// The last stream offset applied: what a snapshot taken now covers.
    pub fn snapshot_offset(&self) -> Option<u64> {
        self.stats.last_offset
    }

    /// Encodes the state, the counters and the offset they cover, as the
    /// bytes of a snapshot file. Called under the core's lock, so state,
    /// counters and offset agree; the file is written outside it.
    pub fn encode_snapshot(
        &self,
        namespace: &Namespace,
        written_at_ms: u64,
    ) -> Result<Vec<u8>, SnapshotError> {
        let header = SnapshotHeader {
            crate_version: env!("CARGO_PKG_VERSION").to_owned(),
            namespace: namespace.to_string(),
            offset: self.stats.last_offset,
            written_at_ms,
        };
        let state = CoreState {
            workers: Cow::Borrowed(&self.workers),
            stages: Cow::Borrowed(&self.stages),
            tasks: Tasks::Live(&self.tasks),
            stats: Cow::Borrowed(&self.stats),
            counters: self.counter_samples(),
            planner: Cow::Borrowed(&self.planner),
            errors: Cow::Borrowed(&self.errors),
            scheduling: Cow::Borrowed(&self.scheduling),
            flows: Cow::Borrowed(&self.flows),
        };
        let mut out = Vec::with_capacity(64 * 1024);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&[0; 8]);
        let out = postcard::to_extend(&header, out).map_err(SnapshotError::Encode)?;
        let mut out = postcard::to_extend(&state, out).map_err(SnapshotError::Encode)?;
        let payload_len = (out.len() - PREFIX_LEN) as u64;
        out[12..PREFIX_LEN].copy_from_slice(&payload_len.to_le_bytes());
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// A core with a snapshot's state: counters added back to `telemetry`
    /// (which must be fresh), its stages announced to it, every live
    /// worker's liveness deadline armed again. It is not caught up: the
    /// runtime replays the stream from the snapshot's offset first.
    pub fn restore(
        snapshot: Snapshot,
        config: CoreConfig,
        telemetry: impl Into<Box<dyn Telemetry>>,
        now_ms: u64,
    ) -> Self {
        let CoreState {
            workers,
            stages,
            tasks,
            stats,
            counters,
            planner,
            errors,
            scheduling,
            flows,
        } = snapshot.state;
        // Per-worker counters are not in the registry: they go back to
        // their workers (once those are restored, below).
        let (worker_counters, counters): (Vec<_>, Vec<_>) = counters
            .into_iter()
            .partition(|c| c.name == WORKER_TASKS_TOTAL);
        let mut core = Core::new(config, telemetry, now_ms);
        core.tasks = TaskStore::restore(
            tasks.into_records(),
            core.config.completed_limit,
            core.config.completed_max_age_ms,
        );
        core.stages = stages
            .into_owned()
            .into_iter()
            .map(|(name, mut s)| {
                s.name = name.clone();
                (name, s)
            })
            .collect();
        for name in core.stages.keys() {
            core.telemetry.stage_added(name.as_str());
        }
        core.workers = workers
            .into_owned()
            .into_values()
            .map(|w| (w.id.clone(), w))
            .collect();
        if core.telemetry.per_worker() {
            core.restore_worker_counters(&worker_counters);
        }
        let suspect = core.config.suspect_heartbeats;
        for w in core.workers.values_mut() {
            w.liveness_scheduled = w.is_alive();
            if w.liveness_scheduled {
                let deadline = w.last_seen_ms.saturating_add(w.dead_after_ms(suspect));
                core.deadlines.push(Reverse((deadline, w.id.clone())));
            }
        }
        core.stats = stats.into_owned();
        core.scheduling = scheduling.into_owned();
        core.flows = flows.into_owned();
        core.flows.rebuild();
        core.errors = errors.into_owned().with_limits(
            core.config.max_error_classes_per_stage,
            core.config.max_stages,
        );
        let planner = planner.into_owned();
        if planner.config() == &core.config.capacity {
            core.planner = planner;
        } else {
            // Other settings: the history may not fit them (bucket width,
            // season). Start the forecasts afresh rather than mislead.
            tracing::info!("capacity settings changed since the snapshot: forecasts start afresh");
        }
        // Last: the registry is shared, so nothing that could still fail
        // (and send the runtime back to a fresh core) comes after it.
        let skipped = core.telemetry.restore_counters(&counters);
        if skipped > 0 {
            tracing::info!(skipped, "counter series from the snapshot not restored");
        }
        core
    }
}

impl Core {
    /// Every counter series a snapshot carries: the telemetry's, and each
    /// worker's `guildhall_worker_tasks_total` (written from the workers
    /// table, not the registry), in one sorted list as before.
    fn counter_samples(&self) -> Vec<CounterSample> {
        let mut out = self.telemetry.counter_values();
        for w in self.workers.values() {
            for (stage, ok, failed) in w.task_counters() {
                for (outcome, value) in [("failed", failed), ("succeeded", ok)] {
                    if value == 0 {
                        continue;
                    }
                    out.push(CounterSample {
                        name: WORKER_TASKS_TOTAL.to_owned(),
                        labels: vec![
                            ("outcome".to_owned(), outcome.to_owned()),
                            ("stage".to_owned(), stage.as_str().to_owned()),
                            ("worker".to_owned(), w.id.as_str().to_owned()),
                        ],
                        value,
                    });
                }
            }
        }
        out.sort();
        out
    }

    /// Puts saved `guildhall_worker_tasks_total` series back on their
    /// workers; series of workers no longer in the table are dropped.
    fn restore_worker_counters(&mut self, samples: &[CounterSample]) {
        for c in samples {
            let label = |k: &str| {
                c.labels
                    .iter()
                    .find(|(name, _)| name == k)
                    .map(|(_, v)| v.as_str())
            };
            let (Some(worker), Some(stage), Some(outcome)) =
                (label("worker"), label("stage"), label("outcome"))
            else {
                continue;
            };
            let (Some(w), Ok(stage)) = (self.workers.get_mut(worker), Stage::new(stage)) else {
                continue;
            };
            let pos = match w.tasks_exported.iter().position(|(s, _, _)| *s == stage) {
                Some(i) => i,
                None => {
                    w.tasks_exported.push((stage, 0, 0));
                    w.tasks_exported.len() - 1
                }
            };
            let entry = &mut w.tasks_exported[pos];
            match outcome {
                "succeeded" => entry.1 += c.value,
                "failed" => entry.2 += c.value,
                _ => {}
            }
        }
    }
}

/// Reads a snapshot of `namespace` from the bytes of its file. Never
/// panics; anything wrong is a [`SnapshotError`].
pub fn decode(bytes: &[u8], namespace: &Namespace) -> Result<Snapshot, SnapshotError> {
    let (header, rest) = open(bytes, namespace)?;
    let (state, rest): (CoreState<'static>, _) =
        postcard::take_from_bytes(rest).map_err(SnapshotError::Body)?;
    if !rest.is_empty() {
        return Err(SnapshotError::Body(postcard::Error::DeserializeBadEncoding));
    }
    Ok(Snapshot { header, state })
}

/// Reads only the header of a snapshot of `namespace`, after checking the
/// whole file's framing and checksum as [`decode`] does: what a runtime
/// needs to know before it decides to restore the state.
pub fn decode_header(bytes: &[u8], namespace: &Namespace) -> Result<SnapshotHeader, SnapshotError> {
    open(bytes, namespace).map(|(header, _)| header)
}

/// Checks a snapshot file's framing, checksum and namespace; its header
/// and the state's bytes.
fn open<'a>(
    bytes: &'a [u8],
    namespace: &Namespace,
) -> Result<(SnapshotHeader, &'a [u8]), SnapshotError> {
    let min = (PREFIX_LEN + CRC_LEN) as u64;
    if bytes.len() < MAGIC.len() {
        return Err(if MAGIC.starts_with(bytes) {
            SnapshotError::Truncated {
                found: bytes.len(),
                expected: min,
            }
        } else {
            SnapshotError::BadMagic
        });
    }
    if bytes[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let Some(&[a, b, c, d]) = bytes.get(8..12) else {
        return Err(SnapshotError::Truncated {
            found: bytes.len(),
            expected: min,
        });
    };
    let format = u32::from_le_bytes([a, b, c, d]);
    if format != FORMAT_VERSION {
        return Err(SnapshotError::Format {
            found: format,
            expected: FORMAT_VERSION,
        });
    }
    let payload_len = bytes
        .get(12..PREFIX_LEN)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_le_bytes)
        .ok_or(SnapshotError::Truncated {
            found: bytes.len(),
            expected: min,
        })?;
    let expected = payload_len.saturating_add(min);
    let found = bytes.len();
    if (found as u64) < expected {
        return Err(SnapshotError::Truncated { found, expected });
    }
    if found as u64 > expected {
        return Err(SnapshotError::TrailingBytes { found, expected });
    }
    let (body, crc) = bytes.split_at(found - CRC_LEN);
    let stored = crc
        .try_into()
        .map(u32::from_le_bytes)
        .map_err(|_| SnapshotError::Checksum)?;
    if crc32fast::hash(body) != stored {
        return Err(SnapshotError::Checksum);
    }
    let payload = &body[PREFIX_LEN..];
    let (header, rest): (SnapshotHeader, _) =
        postcard::take_from_bytes(payload).map_err(SnapshotError::Header)?;
    if header.namespace != namespace.as_str() {
        return Err(SnapshotError::Namespace {
            found: header.namespace,
            expected: namespace.to_string(),
        });
    }
    Ok((header, rest))
}

//! Snapshot files: one per namespace in the data directory,
//! `<data-dir>/<namespace>.snapshot`, replaced atomically (temp file in the
//! same directory, fsync, rename, fsync of the directory), so a crash at any
//! moment leaves the old snapshot or the new one, never half of one.
//!
//! The bytes come from [`crate::core::Core::encode_snapshot`] (under the
//! core's lock); this module only moves them to and from the disk, and runs
//! the periodic writer.

use super::App;
use crate::core::snapshot::{self, Snapshot, SnapshotError, SnapshotHeader};
use guildhall_broker::now_ms;
use guildhall_proto::Namespace;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The snapshot file of `namespace` in `dir`.
pub fn snapshot_path(dir: &Path, namespace: &Namespace) -> PathBuf {
    dir.join(format!("{namespace}.snapshot"))
}

/// Creates `dir` if needed and checks that files can be written in it, so
/// a bad `--data-dir` is an error at start rather than a warning later.
pub fn prepare_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".guildhall-probe-{}", std::process::id()));
    fs::write(&probe, b"probe")?;
    fs::remove_file(&probe)
}

/// Why the snapshot file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// It could not be read.
    #[error("snapshot {}: cannot read it: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Its contents are not a usable snapshot.
    #[error("snapshot {}: {source}", path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// Why.
        source: SnapshotError,
    },
    /// It covers no stream offset, so replay could not resume after it.
    #[error("snapshot {}: covers no offset of the events stream", path.display())]
    NoOffset {
        /// The file.
        path: PathBuf,
    },
}

/// A snapshot file read and checked, its state not decoded yet.
#[derive(Debug)]
pub struct Loaded {
    /// What it says about itself; it covers an offset.
    pub header: SnapshotHeader,
    /// The whole file, for [`Loaded::decode`].
    bytes: Vec<u8>,
    /// The namespace it was checked against.
    namespace: Namespace,
    /// Where it was read from, for errors.
    path: PathBuf,
}

impl Loaded {
    /// The snapshot's state.
    pub fn decode(&self) -> Result<Snapshot, LoadError> {
        snapshot::decode(&self.bytes, &self.namespace).map_err(|source| LoadError::Decode {
            path: self.path.clone(),
            source,
        })
    }
}

/// Reads the snapshot of `namespace` in `dir` and checks it (framing,
/// checksum, namespace, an offset): `Ok(None)` when there is none. Its
/// state is decoded by [`Loaded::decode`], once the runtime knows it will
/// use it.
pub fn load(dir: &Path, namespace: &Namespace) -> Result<Option<Loaded>, LoadError> {
    let path = snapshot_path(dir, namespace);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LoadError::Read { path, source }),
    };
    let header = match snapshot::decode_header(&bytes, namespace) {
        Ok(h) => h,
        Err(source) => return Err(LoadError::Decode { path, source }),
    };
    if header.offset.is_none() {
        return Err(LoadError::NoOffset { path });
    }
    Ok(Some(Loaded {
        header,
        bytes,
        namespace: namespace.clone(),
        path,
    }))
}

/// Replaces the snapshot of `namespace` in `dir` with `bytes`, atomically.
pub fn write(dir: &Path, namespace: &Namespace, bytes: &[u8]) -> io::Result<()> {
    let path = snapshot_path(dir, namespace);
    let tmp = dir.join(format!("{namespace}.snapshot.tmp"));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Makes the rename durable: the directory entry is on disk too.
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Where and how often the runtime writes snapshots.
#[derive(Debug, Clone)]
pub struct Persist {
    /// The data directory.
    pub dir: PathBuf,
    /// The namespace served (names the file, and is checked on load).
    pub namespace: Namespace,
    /// Time between two snapshots.
    pub interval: Duration,
}

impl Persist {
    /// Writes a snapshot every `interval` until `stop` flips. Failures are
    /// logged when they start and when they end, and counted.
    pub async fn run(self, app: Arc<App>, mut stop: watch::Receiver<bool>) {
        let start = tokio::time::Instant::now() + self.interval;
        let mut tick = tokio::time::interval_at(start, self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            match self.save(&app).await {
                Ok(_) if failing => {
                    failing = false;
                    tracing::info!("snapshots are written again");
                }
                Ok(_) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!("{e}");
                }
                Err(e) => tracing::debug!("{e}"),
            }
        }
    }

    /// Writes a snapshot now. `Ok(None)` if there was nothing to save (no
    /// event read from the stream yet), else the offset it covers.
    pub async fn save(&self, app: &App) -> Result<Option<u64>, SaveError> {
        let result = self.encode_and_write(app).await;
        let outcome = match result {
            Ok(None) => return result,
            Ok(Some(_)) => "written",
            Err(_) => "failed",
        };
        app.metrics
            .snapshot_writes
            .with_label_values(&[outcome])
            .inc();
        result
    }

    async fn encode_and_write(&self, app: &App) -> Result<Option<u64>, SaveError> {
        let path = snapshot_path(&self.dir, &self.namespace);
        // Encoded under the lock, so state, counters and offset agree;
        // written outside it.
        let (offset, bytes) = {
            let core = app.core();
            let Some(offset) = core.snapshot_offset() else {
                return Ok(None);
            };
            let bytes = core
                .encode_snapshot(&self.namespace, now_ms())
                .map_err(|e| SaveError::Encode {
                    path: path.clone(),
                    source: e,
                })?;
            (offset, bytes)
        };
        let len = bytes.len();
        let (dir, ns) = (self.dir.clone(), self.namespace.clone());
        tokio::task::spawn_blocking(move || write(&dir, &ns, &bytes))
            .await
            .map_err(|e| SaveError::Write {
                path: path.clone(),
                source: io::Error::other(e),
            })?
            .map_err(|e| SaveError::Write { path, source: e })?;
        app.metrics
            .snapshot_bytes
            .set(i64::try_from(len).unwrap_or(i64::MAX));
        tracing::debug!(offset, bytes = len, "snapshot written");
        Ok(Some(offset))
    }
}

/// Why a snapshot could not be written. The previous file, if any, is intact.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The state could not be encoded.
    #[error("cannot write snapshot {}: {source}", path.display())]
    Encode {
        /// The file.
        path: PathBuf,
        /// Why.
        source: SnapshotError,
    },
    /// The file could not be written.
    #[error("cannot write snapshot {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{Core, CoreConfig};
    use crate::metrics::Metrics;

    fn temp_dir() -> PathBuf {
        std::env::temp_dir().join(format!("guildhall-persist-{:08x}", rand::random::<u32>()))
    }

    fn encoded(ns: &Namespace, offset: Option<u64>) -> Vec<u8> {
        let mut core = Core::new(CoreConfig::default(), Metrics::new(true), 1_000);
        core.handle_unreadable("malformed", offset);
        core.encode_snapshot(ns, 2_000).unwrap()
    }

    #[test]
    fn a_snapshot_file_is_replaced_whole_and_read_back() {
        let dir = temp_dir();
        let ns = Namespace::new("persist").unwrap();
        prepare_dir(&dir).unwrap();
        assert!(load(&dir, &ns).unwrap().is_none(), "no file yet");
        write(&dir, &ns, &encoded(&ns, Some(7))).unwrap();
        write(&dir, &ns, &encoded(&ns, Some(9))).unwrap();
        let snap = load(&dir, &ns).unwrap().unwrap();
        assert_eq!(snap.header.offset, Some(9));
        let state = snap.decode().expect("the state decodes");
        assert_eq!(state.header.offset, Some(9));
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["persist.snapshot"], "no temp file left");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unusable_file_is_an_error_naming_it() {
        let dir = temp_dir();
        let ns = Namespace::new("persist").unwrap();
        prepare_dir(&dir).unwrap();
        let path = snapshot_path(&dir, &ns);
        let mut bytes = encoded(&ns, Some(7));
        bytes.truncate(bytes.len() - 1);
        fs::write(&path, &bytes).unwrap();
        let err = load(&dir, &ns).err().unwrap().to_string();
        assert!(
            err.starts_with(&format!("snapshot {}: truncated", path.display())),
            "{err}"
        );
        fs::write(&path, encoded(&ns, None)).unwrap();
        let err = load(&dir, &ns).err().unwrap().to_string();
        assert!(err.contains("covers no offset"), "{err}");
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        let err = load(&dir, &ns).err().unwrap().to_string();
        assert!(err.contains("cannot read it"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_data_dir_must_be_a_writable_directory() {
        let dir = temp_dir();
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("file");
        fs::write(&file, b"x").unwrap();
        assert!(prepare_dir(&file).is_err());
        assert!(prepare_dir(&file.join("below")).is_err());
        let ns = Namespace::new("persist").unwrap();
        assert!(write(&file, &ns, b"bytes").is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}

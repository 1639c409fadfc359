//! The write-ahead log: segment files under `<data_dir>/wal/` of framed records, each
//! a message as it came off the broker (topic, payload, `received_at`), so replay goes
//! through the same decoders and rebuilds rows and rejects alike.
//!
//! - [`record`]: the framing and the scan that tells a torn tail from damage;
//! - [`writer`]: the group-commit writer (appends from every connection, one fdatasync
//!   per group, segment rotation);
//! - [`segments`]: the files and their recovery at start.
//!
//! **Checkpoints.** A flush to Parquet covers the WAL up to a segment: every record of
//! the segments before it is in the Parquet files (or the aggregator's state) written
//! by that flush, none after. The flush names its files and the state set with the
//! checkpoint, then [`commit`] records it in `wal/checkpoint` (the commit point) and
//! deletes the covered segments. At start, files of a checkpoint that never committed
//! are removed (their records are still in the log and are replayed).

pub mod record;
pub mod segments;
pub mod writer;

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};

use crate::parquet_files::{TMP_PREFIX, publish};
pub use record::Record;
pub use segments::Recovered;
pub use writer::{AppendError, Durable, SyncPolicy};
use writer::{Current, GroupCommit, SegmentDir, SegmentFile};

/// The file that says which checkpoint the data directory holds.
const CHECKPOINT_FILE: &str = "checkpoint";

/// The WAL's directory in a data directory.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("wal")
}

/// The last committed checkpoint of `data_dir`: the first segment not covered by the
/// Parquet files (0: none, replay every segment).
pub fn committed(data_dir: &Path) -> io::Result<u64> {
    let path = dir(data_dir).join(CHECKPOINT_FILE);
    let mut text = String::new();
    match File::open(&path) {
        Ok(mut file) => file.read_to_string(&mut text)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    text.trim().parse().map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e} (holds {:?})", path.display(), text.trim()),
        )
    })
}

/// Records `checkpoint` as committed (written, fsynced, renamed into place), then
/// deletes the segments it covers.
fn commit(data_dir: &Path, checkpoint: u64) -> io::Result<()> {
    let wal = dir(data_dir);
    fs::create_dir_all(&wal)?;
    let staged = [(
        wal.join(format!("{TMP_PREFIX}{CHECKPOINT_FILE}")),
        wal.join(CHECKPOINT_FILE),
    )];
    publish(&staged, |_, tmp| {
        let mut file = File::create(tmp)?;
        io::Write::write_all(&mut file, format!("{checkpoint}\n").as_bytes())?;
        file.sync_all()
    })?;
    for id in segments::list(&wal)? {
        if id < checkpoint {
            fs::remove_file(segments::segment_path(&wal, id))?;
        }
    }
    Ok(())
}

/// Counters of the log.
#[derive(Clone)]
pub struct WalMetrics {
    records: IntCounter,
    bytes: IntCounter,
    failed: IntCounter,
    pub(crate) segments: IntGauge,
    healthy: IntGauge,
    append_seconds: Histogram,
    replayed: IntCounter,
    replay_seconds: IntGauge,
    damaged: IntCounter,
}

impl WalMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<WalMetrics> {
        let m = WalMetrics::unregistered()?;
        registry.register(Box::new(m.records.clone()))?;
        registry.register(Box::new(m.bytes.clone()))?;
        registry.register(Box::new(m.failed.clone()))?;
        registry.register(Box::new(m.segments.clone()))?;
        registry.register(Box::new(m.healthy.clone()))?;
        registry.register(Box::new(m.append_seconds.clone()))?;
        registry.register(Box::new(m.replayed.clone()))?;
        registry.register(Box::new(m.replay_seconds.clone()))?;
        registry.register(Box::new(m.damaged.clone()))?;
        Ok(m)
    }

    pub fn unregistered() -> prometheus::Result<WalMetrics> {
        Ok(WalMetrics {
            records: IntCounter::new(
                "sluice_wal_records_total",
                "Records appended to the WAL and durable",
            )?,
            bytes: IntCounter::new(
                "sluice_wal_bytes_total",
                "Bytes appended to the WAL and durable",
            )?,
            failed: IntCounter::new(
                "sluice_wal_failed_records_total",
                "Records the WAL could not store (disk full, I/O error): their PUBACKs were withheld",
            )?,
            segments: IntGauge::new("sluice_wal_segments", "WAL segment files on disk")?,
            healthy: IntGauge::new(
                "sluice_wal_healthy",
                "1 while the WAL stores appends; 0 after a failed write or sync, until one succeeds",
            )?,
            append_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "sluice_wal_append_seconds",
                    "Time from an append to its record being durable (the wait before a PUBACK)",
                )
                .buckets(prometheus::exponential_buckets(0.000_1, 2.0, 16)?),
            )?,
            replayed: IntCounter::new(
                "sluice_wal_replayed_records_total",
                "Records replayed from the WAL at start",
            )?,
            replay_seconds: IntGauge::new(
                "sluice_wal_replay_milliseconds",
                "How long the replay at start took, in milliseconds",
            )?,
            damaged: IntCounter::new(
                "sluice_wal_damaged_total",
                "Torn tails cut off, damaged ranges and unreadable segments set aside at start",
            )?,
        })
    }
}

/// How the log syncs (`[wal]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalConfig {
    pub policy: SyncPolicy,
}

/// The directory as the writer's segment maker.
struct Dir {
    path: PathBuf,
    segments: IntGauge,
}

impl SegmentDir for Dir {
    fn create(&mut self, id: u64) -> io::Result<Box<dyn SegmentFile>> {
        let file = segments::create(&self.path, id)?;
        self.segments.inc();
        Ok(Box::new(file))
    }
}

/// The open log: appends, rotations. Cheap to clone.
#[derive(Clone)]
pub struct Wal {
    inner: Arc<Inner>,
}

struct Inner {
    data_dir: PathBuf,
    writer: std::sync::RwLock<GroupCommit>,
    healthy: Arc<std::sync::atomic::AtomicBool>,
    fsync: bool,
    metrics: WalMetrics,
}

/// What replay found, for the log line and `/status`.
#[derive(Debug, Clone)]
pub struct Replayed {
    pub recovered: Recovered,
    pub checkpoint: u64,
    pub took: Duration,
}

impl Wal {
    /// Recovers the log of `data_dir`: segments covered by the committed checkpoint are
    /// deleted, every record of the others goes to `replay` in log order (with the bytes
    /// of its segment, which its slices are of), damage is handled as
    /// [`segments::recover`] says; then a new segment is started for appends.
    pub fn open(
        data_dir: &Path,
        config: WalConfig,
        metrics: WalMetrics,
        mut replay: impl FnMut(Record<'_>, &Bytes),
    ) -> io::Result<(Wal, Replayed)> {
        let started = Instant::now();
        let path = dir(data_dir);
        let checkpoint = committed(data_dir)?;
        let recovered = segments::recover(&path, checkpoint, |_, record, segment| {
            replay(record, segment)
        })?;
        let took = started.elapsed();
        metrics.replayed.inc_by(recovered.records);
        metrics.replay_seconds.set(took.as_millis() as i64);
        metrics.damaged.inc_by(
            (recovered.torn_tails.len() + recovered.corrupt.len() + recovered.unreadable.len())
                as u64,
        );
        metrics.segments.set(segments::list(&path)?.len() as i64);
        let id = recovered.next_id;
        let mut dir = Dir {
            path,
            segments: metrics.segments.clone(),
        };
        let file = dir.create(id)?;
        let writer = GroupCommit::start(dir, Current { id, file, len: 0 }, config.policy)?;
        let healthy = writer.health();
        metrics.healthy.set(1);
        let wal = Wal {
            inner: Arc::new(Inner {
                data_dir: data_dir.to_owned(),
                writer: std::sync::RwLock::new(writer),
                healthy,
                fsync: config.policy.fsync,
                metrics,
            }),
        };
        Ok((
            wal,
            Replayed {
                recovered,
                checkpoint,
                took,
            },
        ))
    }

    /// Appends records in order; never waits. The future resolves when they are durable
    /// (with `sync = off`: when written to the operating system).
    pub fn append<'a, I>(
        &self,
        records: I,
    ) -> impl std::future::Future<Output = Result<(), AppendError>> + Send + 'static
    where
        I: IntoIterator<Item = Record<'a>>,
        I::IntoIter: Clone,
    {
        let records = records.into_iter();
        // Sized once: growing it record by record copied the bytes already encoded.
        let mut bytes = Vec::with_capacity(records.clone().map(|r| record::framed_len(&r)).sum());
        let mut count = 0u64;
        let mut len = 0u64;
        let mut refused = None;
        for record in records {
            if let Err(e) = record::encode(&record, &mut bytes) {
                refused.get_or_insert(e);
            }
            count += 1;
        }
        len += bytes.len() as u64;
        let waiting = match refused {
            Some(e) => Err(AppendError::Io(e.to_string())),
            None => Ok(self.writer().append(bytes)),
        };
        let metrics = self.inner.metrics.clone();
        let started = Instant::now();
        async move {
            let answer = match waiting {
                Ok(durable) => durable.await,
                Err(e) => Err(e),
            };
            match &answer {
                Ok(()) => {
                    metrics.records.inc_by(count);
                    metrics.bytes.inc_by(len);
                    metrics.healthy.set(1);
                    metrics
                        .append_seconds
                        .observe(started.elapsed().as_secs_f64());
                }
                Err(_) => {
                    metrics.failed.inc_by(count);
                    metrics.healthy.set(0);
                }
            }
            answer
        }
    }

    /// Whether acknowledgements wait for a sync (`sync = always`).
    pub fn syncs(&self) -> bool {
        self.inner.fsync
    }

    /// Starts a new segment after everything appended so far; resolves to its id (the
    /// checkpoint a flush of what came before covers).
    pub fn rotate(&self) -> tokio::sync::oneshot::Receiver<io::Result<u64>> {
        self.writer().rotate()
    }

    /// One past the segment being written now (see [`crate::Checkpoints::next`]).
    pub fn next(&self) -> u64 {
        self.writer().current() + 1
    }

    /// False while appends fail (a full disk): `/ready` says so. Also sets
    /// `sluice_wal_healthy`.
    pub fn healthy(&self) -> bool {
        let healthy = self
            .inner
            .healthy
            .load(std::sync::atomic::Ordering::Relaxed);
        self.inner.metrics.healthy.set(healthy as i64);
        healthy
    }

    /// Records `checkpoint` as committed (the flush of everything before it is on disk)
    /// and deletes the segments it covers.
    pub fn commit(&self, checkpoint: u64) -> io::Result<()> {
        commit(&self.inner.data_dir, checkpoint)?;
        let left = segments::list(&dir(&self.inner.data_dir))?.len();
        self.inner.metrics.segments.set(left as i64);
        Ok(())
    }

    /// Syncs what was appended and stops the writer; later appends fail with `Closed`.
    /// A last segment left empty is removed (after a stop's last checkpoint the WAL
    /// holds nothing).
    pub fn close(&self) {
        let mut writer = self.inner.writer.write().unwrap_or_else(|p| p.into_inner());
        writer.close();
        let path = segments::segment_path(&dir(&self.inner.data_dir), writer.current());
        if fs::metadata(&path).is_ok_and(|m| m.len() == 0) && fs::remove_file(&path).is_ok() {
            self.inner.metrics.segments.dec();
        }
    }

    fn writer(&self) -> std::sync::RwLockReadGuard<'_, GroupCommit> {
        self.inner.writer.read().unwrap_or_else(|p| p.into_inner())
    }
}

//! "A PUBACK means the reading is on disk": the write-ahead log as the ingest journal,
//! the checkpoints that let a flush delete what it covers, and the replay at start.
//!
//! A checkpoint (a flush `storage.flush_interval` after the last one, and every explicit
//! flush or stop) goes: rotate the WAL to segment `c` and bring the decoders
//! to it (each seals what it holds from before); take the cut of `telemetry` and
//! `rejects`; queue the aggregator's checkpoint behind every batch from before; let the
//! decoders go on; once the aggregator has written its rows and taken a snapshot of its
//! state, take the cut of its tables and let it go on; once the snapshot is saved into
//! `state/checkpoint-c` (on a thread of its own, holding up no reading), flush every table
//! up to its cut into files named with `c`; commit `c` (`wal/checkpoint`), which
//! deletes the segments before `c` and the older state sets. A crash anywhere in
//! between leaves the last committed checkpoint whole: its files, its state set and the
//! segments from it on, which replay rebuilds the rest from.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::TimestampNanosecondType;
use sluice_aggregator::Aggregator;
use sluice_ingest::{Entry, IngestHandle, Journal, Logged, Message, Stored};
use sluice_storage::wal::{Record, Replayed, Wal};
use sluice_storage::{Checkpoints, Cut, StateDir, Storage};

/// How long a checkpoint waits for the decoders, then for the aggregator, before it
/// gives up (the flush then goes without it: see `Storage::flush`).
const CUT_TIMEOUT: Duration = Duration::from_secs(5);
const SAVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Messages handed to the decoders at once during replay.
const REPLAY_CHUNK: usize = 4096;

/// The WAL as the decoders' journal.
pub(crate) struct Log(pub(crate) Wal);

impl Journal for Log {
    fn append(&self, entries: &[Entry]) -> Logged {
        let records = entries.iter().map(|entry| match entry {
            Entry::Reading {
                received_at_ns,
                encoded,
            } => Record {
                received_at_ns: *received_at_ns,
                topic: b"",
                payload: encoded,
                denied: false,
                reading: true,
            },
            Entry::Reject { message, .. } => Record {
                received_at_ns: message.received_at_ns,
                topic: &message.topic,
                payload: &message.payload,
                denied: message.denied,
                reading: false,
            },
        });
        let durable = self.0.append(records);
        Box::pin(async move { durable.await.map_err(|e| e.to_string()) })
    }

    fn rotate(&self) -> futures::future::BoxFuture<'static, Result<u64, String>> {
        let rotated = self.0.rotate();
        Box::pin(async move {
            match rotated.await {
                Ok(Ok(id)) => Ok(id),
                Ok(Err(e)) => Err(format!("cannot start a new WAL segment: {e}")),
                Err(_) => Err("the WAL writer is gone".into()),
            }
        })
    }
}

/// A set of the aggregator's state files. A checkpoint's set is kept once taken back
/// (a crash before the next checkpoint needs it again); the next commit deletes it.
#[derive(Debug)]
pub(crate) struct StateFiles {
    dir: StateDir,
    keep: bool,
}

impl StateFiles {
    /// The sets saved by a stop before checkpoints existed (`<data_dir>/state/<set>`):
    /// taken back once, then removed.
    pub(crate) fn legacy(data_dir: &Path) -> StateFiles {
        StateFiles {
            dir: StateDir::legacy(data_dir),
            keep: false,
        }
    }

    /// The state of checkpoint `id`.
    pub(crate) fn checkpoint(data_dir: &Path, id: u64) -> StateFiles {
        StateFiles {
            dir: StateDir::of_checkpoint(data_dir, id),
            keep: true,
        }
    }
}

impl sluice_aggregator::StateStore for StateFiles {
    fn save(&self, set: &str, files: Vec<sluice_aggregator::StateFile<'_>>) -> std::io::Result<()> {
        self.dir.save(set, files)
    }
    fn load(&self, set: &str, names: &[&str]) -> Result<Option<Vec<Vec<RecordBatch>>>, String> {
        self.dir.load(set, names)
    }
    fn remove(&self, set: &str, names: &[&str], aside: bool) {
        if aside || !self.keep {
            self.dir.remove(set, names, aside)
        }
    }
}

/// Where the aggregator's state comes back from at start: the committed checkpoint's
/// set, or (a data directory from before checkpoints) the sets a stop saved.
pub(crate) fn restore_from(data_dir: &Path) -> anyhow::Result<Arc<StateFiles>> {
    let committed = sluice_storage::wal::committed(data_dir)
        .with_context(|| format!("reading {}", sluice_storage::wal::dir(data_dir).display()))?;
    if committed > 0 && StateDir::of_checkpoint(data_dir, committed).exists() {
        return Ok(Arc::new(StateFiles::checkpoint(data_dir, committed)));
    }
    Ok(Arc::new(StateFiles::legacy(data_dir)))
}

/// The checkpoints of a running server.
pub(crate) struct Checkpointer {
    pub(crate) data_dir: PathBuf,
    pub(crate) storage: Storage,
    pub(crate) wal: Wal,
    pub(crate) ingest: IngestHandle,
    pub(crate) aggregator: Arc<Aggregator>,
    /// Set at a stop, once the decoders and the aggregator are done: the last checkpoint
    /// covers everything.
    pub(crate) last: Mutex<Option<u64>>,
}

const INGEST_TABLES: [&str; 2] = [sluice_ingest::TELEMETRY_TABLE, sluice_ingest::REJECTS_TABLE];
const AGGREGATOR_TABLES: [&str; 4] = [
    sluice_aggregator::MINUTE_TABLE,
    sluice_aggregator::ROLLUP_TABLE,
    sluice_aggregator::LATE_TABLE,
    sluice_aggregator::ALERTS_TABLE,
];

impl Checkpointer {
    /// A stop: the WAL gets a last segment (empty: nothing is appended any more); the
    /// aggregator's state goes into that checkpoint's set. Returns where it goes.
    pub(crate) fn last(&self) -> anyhow::Result<StateFiles> {
        let id = futures::executor::block_on(Log(self.wal.clone()).rotate())
            .map_err(|e| anyhow::anyhow!(e))?;
        StateDir::of_checkpoint(&self.data_dir, id).clear()?;
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
        Ok(StateFiles::checkpoint(&self.data_dir, id))
    }
}

impl Checkpoints for Checkpointer {
    fn cut(&self) -> Result<Cut, String> {
        if let Some(id) = *self.last.lock().unwrap_or_else(|p| p.into_inner()) {
            return Ok(Cut {
                checkpoint: id,
                tables: Vec::new(),
            });
        }
        let storage = &self.storage;
        let (id, ingest_cut, checkpointing) = self.ingest.cut(CUT_TIMEOUT, |id| {
            let cut = storage
                .cut_tables(&INGEST_TABLES)
                .map_err(|e| e.to_string());
            // Queued while the decoders wait: behind every batch from before the cut,
            // ahead of every one after it.
            let queued = StateDir::of_checkpoint(&self.data_dir, id)
                .clear()
                .map_err(|e| format!("the state of checkpoint {id}: {e}"))
                .and_then(|()| {
                    let files = StateFiles::checkpoint(&self.data_dir, id);
                    self.aggregator.checkpoint(Arc::new(files), CUT_TIMEOUT)
                });
            (id, cut, queued)
        })?;
        let mut tables = ingest_cut?;
        let (paused, saving) = checkpointing?.paused(SAVE_TIMEOUT)?;
        tables.extend(
            storage
                .cut_tables(&AGGREGATOR_TABLES)
                .map_err(|e| e.to_string())?,
        );
        drop(paused);
        // The aggregator goes on while its snapshot is written; the checkpoint needs it.
        saving.saved(SAVE_TIMEOUT)?;
        Ok(Cut {
            checkpoint: id,
            tables,
        })
    }

    fn commit(&self, cut: &Cut) -> Result<(), String> {
        self.wal
            .commit(cut.checkpoint)
            .map_err(|e| format!("committing WAL checkpoint {}: {e}", cut.checkpoint))?;
        // Older state sets are not needed any more.
        StateDir::prune_checkpoints(&self.data_dir, cut.checkpoint);
        Ok(())
    }

    fn next(&self) -> u64 {
        self.wal.next()
    }
}

/// Makes the decoders remember the keys of readings stored within `window` before now
/// (a redelivery after a restart is still a duplicate). Returns how many.
pub(crate) fn remember_stored(
    storage: &Storage,
    ingest: &IngestHandle,
    window: Duration,
) -> anyhow::Result<usize> {
    if window.is_zero() {
        return Ok(0);
    }
    let since = std::time::SystemTime::now()
        .checked_sub(window)
        .unwrap_or(std::time::UNIX_EPOCH);
    let sql = format!(
        "SELECT device_id, ts, received_at FROM telemetry WHERE received_at >= TIMESTAMP '{}'",
        humantime::format_rfc3339_nanos(since)
    );
    // Streamed: ten minutes of the reference load is ~20 M keys, ~0.6 GB as one result.
    storage
        .sql_each(&sql, |batch| {
            let devices = batch.column(0).as_string::<i32>();
            let ts = batch.column(1).as_primitive::<TimestampNanosecondType>();
            let received = batch.column(2).as_primitive::<TimestampNanosecondType>();
            ingest
                .remember((0..batch.num_rows()).map(|i| Stored {
                    device_id: devices.value(i),
                    ts_ns: ts.value(i),
                    received_at_ns: received.value(i),
                }))
                .map_err(|_| "the ingest pipeline closed during start".to_string())
        })
        .context("reading the keys of recent readings for deduplication")
}

/// Replays the WAL into the decoders (before any client connects) and opens it for
/// appends.
pub(crate) fn open_and_replay(
    data_dir: &Path,
    config: sluice_storage::wal::WalConfig,
    metrics: sluice_storage::wal::WalMetrics,
    ingest: &IngestHandle,
) -> anyhow::Result<(Wal, Replayed)> {
    let mut chunk: Vec<Entry> = Vec::with_capacity(REPLAY_CHUNK);
    let mut closed = false;
    let mut send = |chunk: &mut Vec<Entry>| {
        if !closed && ingest.replay_blocking(std::mem::take(chunk)).is_err() {
            closed = true;
        }
    };
    let (wal, replayed) = Wal::open(data_dir, config, metrics, |record, segment| {
        // A reading was journaled decoded; a reject (or a record from before decoded
        // readings) as it came, and is decoded again.
        chunk.push(if record.reading {
            Entry::reading(record.received_at_ns, segment.slice_ref(record.payload))
        } else {
            ingest.entry(Message {
                topic: segment.slice_ref(record.topic),
                payload: segment.slice_ref(record.payload),
                received_at_ns: record.received_at_ns,
                denied: record.denied,
            })
        });
        if chunk.len() >= REPLAY_CHUNK {
            send(&mut chunk);
        }
    })
    .with_context(|| {
        format!(
            "recovering the write-ahead log in {}",
            sluice_storage::wal::dir(data_dir).display()
        )
    })?;
    send(&mut chunk);
    if closed {
        anyhow::bail!("the ingest pipeline closed during the replay");
    }
    // What was replayed is queryable before sluice says it is ready.
    ingest
        .seal(SAVE_TIMEOUT)
        .map_err(|e| anyhow::anyhow!("after the replay: {e}"))?;
    Ok((wal, replayed))
}

//! `[storage]`: the storage layer's settings as users write them, owned here beside
//! their defaults; the binary composes them and gets a [`StorageConfig`].

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::wal::{SyncPolicy, WalConfig};
use crate::{QueryLimits, StorageConfig, WriteOptions, default_max_memory};

/// `[query]`: what one query of the SQL endpoints (HTTP and PostgreSQL) may take.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueryOptions {
    /// Memory all running queries' operators may hold together; sorts, aggregations and
    /// joins spill to disk beyond where they can, the others fail. Unset: a quarter of
    /// the machine (or of its cgroup's limit), the rest is ingestion's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory_bytes: Option<usize>,
    /// Spill files (`<data_dir>/spill`) of all queries together. Unset: 4 × the memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_spill_bytes: Option<u64>,
    /// A query is cancelled after this long (its wait for a place included); "0s": never.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Queries running at once; more wait for a place, within their timeout.
    pub max_concurrent: usize,
    /// Result bytes one query may hand to its client; a larger result ends in an error.
    pub max_result_bytes: usize,
}

impl Default for QueryOptions {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        QueryOptions {
            max_memory_bytes: None,
            max_spill_bytes: None,
            timeout: Duration::from_secs(30),
            max_concurrent: (2 * cores).max(4),
            max_result_bytes: 128 << 20,
        }
    }
}

impl QueryOptions {
    /// The first setting out of range, as `key: why` (relative to `[query]`).
    pub fn validate(&self) -> Result<(), String> {
        if self.max_memory_bytes.is_some_and(|m| m < 16 << 20) {
            return Err("max_memory_bytes must be at least 16 MiB (16777216)".into());
        }
        if self.max_concurrent == 0 {
            return Err("max_concurrent must be at least 1".into());
        }
        if self.max_result_bytes == 0 {
            return Err("max_result_bytes must be at least 1".into());
        }
        Ok(())
    }

    pub fn limits(&self) -> QueryLimits {
        let memory = self.max_memory_bytes.unwrap_or_else(default_max_memory);
        QueryLimits {
            max_memory_bytes: memory,
            max_spill_bytes: self.max_spill_bytes.unwrap_or(4 * memory as u64),
            timeout: (!self.timeout.is_zero()).then_some(self.timeout),
            max_concurrent: self.max_concurrent,
            max_result_bytes: self.max_result_bytes,
        }
    }
}

/// `[wal]`: how the write-ahead log syncs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WalOptions {
    /// `always`: a PUBACK is sent once the reading is fdatasynced (nothing acknowledged is
    /// lost, even by a power cut). `off`: never fdatasync; a PUBACK is sent once the
    /// reading is written to the operating system: a crash of sluice (kill -9, OOM) still
    /// loses nothing acknowledged, a crash of the machine loses what the operating system
    /// had not written back (up to ~30 s with Linux defaults).
    pub sync: WalSync,
    /// With `always`: a group of appends is synced at most this long after its first…
    #[serde(with = "humantime_serde")]
    pub sync_interval: Duration,
    /// …or as soon as this many bytes wait.
    pub sync_bytes: usize,
    /// A segment file this big is closed and the next one started.
    pub segment_bytes: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WalSync {
    Always,
    Off,
}

impl Default for WalOptions {
    fn default() -> Self {
        // benches/wal.rs, BENCHMARKS.md: at the reference load a 2 ms interval keeps the
        // PUBACK wait's p99 at 3.5 ms with ~500 syncs a second.
        WalOptions {
            sync: WalSync::Always,
            sync_interval: Duration::from_millis(2),
            sync_bytes: 256 << 10,
            segment_bytes: 64 << 20,
        }
    }
}

impl WalOptions {
    /// The first setting out of range, as `key: why` (relative to `[wal]`).
    pub fn validate(&self) -> Result<(), String> {
        if self.sync_bytes == 0 {
            return Err("sync_bytes must be at least 1".into());
        }
        if self.segment_bytes < 1 << 20 {
            return Err(format!(
                "segment_bytes must be at least 1 MiB (1048576), got {}",
                self.segment_bytes
            ));
        }
        if self.sync_interval > Duration::from_secs(1) {
            return Err(format!(
                "sync_interval must be at most 1s (every PUBACK waits up to it), got {:?}",
                self.sync_interval
            ));
        }
        Ok(())
    }

    pub fn wal_config(&self) -> WalConfig {
        WalConfig {
            policy: SyncPolicy {
                // Without syncs there is nothing to group for: each append is answered
                // once written.
                interval: match self.sync {
                    WalSync::Always => self.sync_interval,
                    WalSync::Off => Duration::ZERO,
                },
                bytes: self.sync_bytes,
                segment_bytes: self.segment_bytes,
                fsync: self.sync == WalSync::Always,
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageOptions {
    /// In-memory rows are written to Parquet at least this often.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// …and as soon as a table holds this many in-memory rows…
    pub flush_rows: usize,
    /// …or all tables together this many bytes.
    pub flush_bytes: usize,
    /// Ingestion waits while a table holds this many in-memory rows (flushes failing).
    pub max_hot_rows: usize,
    pub row_group_rows: usize,
    pub zstd_level: i32,
}

impl Default for StorageOptions {
    fn default() -> Self {
        let storage = StorageConfig::new("");
        StorageOptions {
            flush_interval: storage.flush_interval,
            flush_rows: storage.flush_rows,
            flush_bytes: storage.flush_bytes,
            max_hot_rows: storage.max_hot_rows,
            row_group_rows: storage.write.row_group_rows,
            zstd_level: storage.write.zstd_level,
        }
    }
}

impl StorageOptions {
    /// The first setting out of range, as `key: why` (relative to `[storage]`).
    pub fn validate(&self) -> Result<(), String> {
        for (key, value) in [
            ("flush_rows", self.flush_rows),
            ("flush_bytes", self.flush_bytes),
            ("row_group_rows", self.row_group_rows),
        ] {
            if value == 0 {
                return Err(format!("{key} must be at least 1"));
            }
        }
        if self.max_hot_rows < self.flush_rows {
            return Err(format!(
                "max_hot_rows ({}) must be at least flush_rows ({})",
                self.max_hot_rows, self.flush_rows
            ));
        }
        if !(1..=22).contains(&self.zstd_level) {
            return Err(format!(
                "zstd_level must be 1..=22, got {}",
                self.zstd_level
            ));
        }
        if self.flush_interval.is_zero() {
            return Err("flush_interval must be more than 0".into());
        }
        Ok(())
    }

    pub fn storage_config(&self, data_dir: &Path) -> StorageConfig {
        StorageConfig {
            data_dir: data_dir.to_owned(),
            flush_interval: self.flush_interval,
            flush_rows: self.flush_rows,
            flush_bytes: self.flush_bytes,
            max_hot_rows: self.max_hot_rows,
            write: WriteOptions {
                row_group_rows: self.row_group_rows,
                zstd_level: self.zstd_level,
            },
            query: QueryLimits::unlimited(),
        }
    }
}

//! `[storage]`: the storage layer's settings as users write them, owned here beside
//! their defaults; the binary composes them and gets a [`StorageConfig`].

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{StorageConfig, WriteOptions};

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
        }
    }
}

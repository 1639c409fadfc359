//! One table's data: sealed in-memory batches (hot) and Parquet files (cold), published
//! together as an immutable [`Version`].
//!
//! Invariant: a row is in exactly one place of any version. A flush writes the hot
//! batches it took to files, then swaps in a version that adds those files and drops
//! those batches in one step, under the version lock. A query reads one version, so it
//! never sees a row twice or misses one while data moves from hot to cold.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use std::ops::Range;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array, RecordBatch};
use arrow::compute::{SortColumn, SortOptions, concat, lexsort_to_indices};
use arrow::datatypes::{DataType, SchemaRef, TimestampNanosecondType};

use crate::StorageError;
use crate::parquet_files::{self, ColdFile, WriteOptions};

/// What a table is and how its files are laid out.
#[derive(Debug, Clone)]
pub struct TableSpec {
    pub name: String,
    pub schema: SchemaRef,
    /// A `Timestamp(Nanosecond, "UTC")` column: files are partitioned by its date and hour.
    pub time_column: String,
    /// Rows within a file are sorted by these columns (ascending).
    pub sort_columns: Vec<String>,
    /// Columns that get a Parquet bloom filter (point lookups such as one device).
    pub bloom_filter_columns: Vec<String>,
}

/// One sealed batch waiting in memory, numbered in arrival order.
#[derive(Debug, Clone)]
pub(crate) struct HotBatch {
    seq: u64,
    pub(crate) batch: RecordBatch,
}

/// An immutable view of a table: what a query reads.
#[derive(Debug, Clone, Default)]
pub(crate) struct Version {
    pub(crate) hot: Arc<Vec<HotBatch>>,
    pub(crate) files: Arc<Vec<ColdFile>>,
    /// Sums over `hot`, taken once when the version is made: every append reads them
    /// (flush and back-pressure thresholds), and a batch's memory size walks its buffers.
    hot_rows: usize,
    hot_bytes: usize,
}

impl Version {
    fn new(hot: Vec<HotBatch>, files: Arc<Vec<ColdFile>>) -> Version {
        Version {
            hot_rows: hot.iter().map(|h| h.batch.num_rows()).sum(),
            hot_bytes: hot.iter().map(|h| h.batch.get_array_memory_size()).sum(),
            hot: Arc::new(hot),
            files,
        }
    }

    pub(crate) fn hot_rows(&self) -> usize {
        self.hot_rows
    }

    pub(crate) fn cold_rows(&self) -> u64 {
        self.files.iter().map(|f| f.rows).sum()
    }

    fn hot_bytes(&self) -> usize {
        self.hot_bytes
    }
}

/// Row and file counts of a table at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableStats {
    pub hot_rows: usize,
    pub hot_bytes: usize,
    pub cold_rows: u64,
    pub files: usize,
}

/// What one flush of one table wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushReport {
    pub rows: u64,
    pub files: usize,
    pub bytes: u64,
}

pub(crate) struct Table {
    pub(crate) spec: TableSpec,
    dir: PathBuf,
    version: RwLock<Arc<Version>>,
    /// One flush at a time per table.
    flush_lock: Mutex<()>,
    next_seq: AtomicU64,
    time_index: usize,
    sort_indices: Vec<usize>,
}

impl Table {
    /// Opens the table under `data_dir/<name>`, loading the files already there.
    pub(crate) fn open(
        data_dir: &Path,
        spec: TableSpec,
        writable: bool,
        committed: u64,
    ) -> Result<Table, StorageError> {
        let schema_error = |what: String| StorageError::Schema {
            table: spec.name.clone(),
            what,
        };
        let time_index = spec
            .schema
            .index_of(&spec.time_column)
            .map_err(|e| schema_error(e.to_string()))?;
        if !matches!(
            spec.schema.field(time_index).data_type(),
            DataType::Timestamp(arrow::datatypes::TimeUnit::Nanosecond, _)
        ) {
            return Err(schema_error(format!(
                "time column {} is not a nanosecond timestamp",
                spec.time_column
            )));
        }
        let sort_indices = spec
            .sort_columns
            .iter()
            .map(|c| spec.schema.index_of(c))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| schema_error(e.to_string()))?;
        let dir = data_dir.join(&spec.name);
        let files = parquet_files::discover(&dir, writable, committed)?;
        Ok(Table {
            spec,
            dir,
            version: RwLock::new(Arc::new(Version::new(Vec::new(), Arc::new(files)))),
            flush_lock: Mutex::new(()),
            next_seq: AtomicU64::new(0),
            time_index,
            sort_indices,
        })
    }

    pub(crate) fn snapshot(&self) -> Arc<Version> {
        self.version
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub(crate) fn stats(&self) -> TableStats {
        let version = self.snapshot();
        TableStats {
            hot_rows: version.hot_rows(),
            hot_bytes: version.hot_bytes(),
            cold_rows: version.cold_rows(),
            files: version.files.len(),
        }
    }

    /// Makes `batch` visible to queries. Returns the hot row count after the append.
    pub(crate) fn append(&self, batch: RecordBatch) -> Result<usize, StorageError> {
        if batch.schema() != self.spec.schema {
            return Err(StorageError::Schema {
                table: self.spec.name.clone(),
                what: format!("appended batch has schema {:?}", batch.schema()),
            });
        }
        if batch.num_rows() == 0 {
            return Ok(self.snapshot().hot_rows());
        }
        let mut current = self
            .version
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let mut hot = Vec::with_capacity(current.hot.len() + 1);
        hot.extend(current.hot.iter().cloned());
        hot.push(HotBatch { seq, batch });
        let next = Version::new(hot, current.files.clone());
        let rows = next.hot_rows();
        *current = Arc::new(next);
        Ok(rows)
    }

    /// The cut of the table now: a flush [`up to`](Self::flush) it takes every batch
    /// appended so far and none appended later.
    pub(crate) fn cut(&self) -> u64 {
        let _current = self
            .version
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.next_seq.load(Ordering::Relaxed)
    }

    /// Writes the hot batches before `up_to` (every one: `None`) to Parquet, files named
    /// with `checkpoint`, and publishes them in place of the batches.
    pub(crate) fn flush(
        &self,
        options: &WriteOptions,
        up_to: Option<u64>,
        checkpoint: Option<u64>,
    ) -> Result<FlushReport, StorageError> {
        let _one_flush = self
            .flush_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let taken: Vec<HotBatch> = self
            .snapshot()
            .hot
            .iter()
            .filter(|h| up_to.is_none_or(|cut| h.seq < cut))
            .cloned()
            .collect();
        let Some(last_seq) = taken.last().map(|h| h.seq) else {
            return Ok(FlushReport::default());
        };
        let batches: Vec<&RecordBatch> = taken.iter().map(|h| &h.batch).collect();
        let order = self.flush_order(&batches)?;
        let written = parquet_files::write_partitions(
            &self.dir, &self.spec, &batches, &order, options, checkpoint,
        )
        .map_err(|source| StorageError::Flush {
            table: self.spec.name.clone(),
            source: Box::new(source),
        })?;
        let report = FlushReport {
            rows: written.iter().map(|f| f.rows).sum(),
            files: written.len(),
            bytes: written.iter().map(|f| f.size).sum(),
        };

        let mut current = self
            .version
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut files = Vec::with_capacity(current.files.len() + written.len());
        files.extend(current.files.iter().cloned());
        files.extend(written);
        let hot: Vec<HotBatch> = current
            .hot
            .iter()
            .filter(|h| h.seq > last_seq)
            .cloned()
            .collect();
        *current = Arc::new(Version::new(hot, Arc::new(files)));
        Ok(report)
    }

    /// The order in which the rows of `batches` are written: grouped by UTC hour of the
    /// time column, sorted by the sort columns within an hour.
    ///
    /// Only the key columns are concatenated and sorted; the rows themselves are gathered
    /// slice by slice while writing, so a flush needs little memory beyond the hot batches
    /// it writes (a copy of the whole table, sorted, would double the hot store's peak).
    fn flush_order(&self, batches: &[&RecordBatch]) -> Result<FlushOrder, StorageError> {
        const HOUR_NS: i64 = 3_600_000_000_000;
        let internal = |e: arrow::error::ArrowError| {
            StorageError::internal(format!("sorting {} for a flush: {e}", self.spec.name))
        };
        let column = |index: usize| -> Result<ArrayRef, StorageError> {
            let parts: Vec<&dyn Array> = batches.iter().map(|b| b.column(index).as_ref()).collect();
            concat(&parts).map_err(internal)
        };
        let time = column(self.time_index)?;
        let hours: Int64Array = time
            .as_primitive::<TimestampNanosecondType>()
            .unary(|ns| ns.div_euclid(HOUR_NS));
        let mut keys = vec![SortColumn {
            values: Arc::new(hours.clone()),
            options: None,
        }];
        for &index in &self.sort_indices {
            keys.push(SortColumn {
                values: column(index)?,
                options: Some(SortOptions {
                    descending: false,
                    nulls_first: false,
                }),
            });
        }
        let indices = lexsort_to_indices(&keys, None).map_err(internal)?;
        let mut offsets = Vec::with_capacity(batches.len() + 1);
        offsets.push(0);
        for batch in batches {
            offsets.push(offsets.last().copied().unwrap_or(0) + batch.num_rows());
        }
        let rows: Vec<u32> = indices.values().to_vec();
        let mut partitions = Vec::new();
        let mut start = 0;
        while start < rows.len() {
            let hour = hours.value(rows[start] as usize);
            let mut end = start + 1;
            while end < rows.len() && hours.value(rows[end] as usize) == hour {
                end += 1;
            }
            partitions.push((hour, start..end));
            start = end;
        }
        Ok(FlushOrder {
            offsets,
            rows,
            partitions,
        })
    }
}

/// Where each written row comes from: positions in the concatenation of the flushed
/// batches, in write order, and the range of them that makes each hour's file.
pub(crate) struct FlushOrder {
    /// `offsets[i]` is the position of batch `i`'s first row; the last entry is the total.
    offsets: Vec<usize>,
    rows: Vec<u32>,
    pub(crate) partitions: Vec<(i64, Range<usize>)>,
}

impl FlushOrder {
    /// `(batch, row)` pairs of the written rows `range`, as `interleave` takes them.
    pub(crate) fn locate(&self, range: Range<usize>) -> Vec<(usize, usize)> {
        self.rows[range]
            .iter()
            .map(|&position| {
                let position = position as usize;
                let batch = self.offsets.partition_point(|&o| o <= position) - 1;
                (batch, position - self.offsets[batch])
            })
            .collect()
    }
}

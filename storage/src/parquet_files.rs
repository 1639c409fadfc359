//! Parquet files on disk: Hive-style layout `<table>/date=YYYY-MM-DD/hour=HH/part-*.parquet`,
//! written through a hidden temporary name, fsynced and renamed, so a reader never sees a
//! partial file.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use std::ops::Range;

use arrow::array::RecordBatch;
use arrow::compute::interleave_record_batch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::schema::types::ColumnPath;

use crate::StorageError;
use crate::paced::Paced;
use crate::table::{FlushOrder, TableSpec};

/// A published Parquet file.
#[derive(Debug, Clone)]
pub(crate) struct ColdFile {
    pub(crate) path: PathBuf,
    pub(crate) size: u64,
    pub(crate) rows: u64,
}

/// How files are encoded.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    /// Rows per Parquet row group.
    pub row_group_rows: usize,
    /// zstd level (1..=22).
    pub zstd_level: i32,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            row_group_rows: 100_000,
            zstd_level: 3,
        }
    }
}

/// Prefix of a file being written; what a crash leaves with it was never published.
pub(crate) const TMP_PREFIX: &str = ".tmp-";

/// The checkpoint a file's name says it was written by (`part-c<checkpoint>-<id>.parquet`);
/// `None` for a file written outside checkpoints.
fn checkpoint_of(name: &str) -> Option<u64> {
    name.strip_prefix("part-c")?.split('-').next()?.parse().ok()
}

/// The name of a new file, tagged with the checkpoint writing it.
fn file_name(checkpoint: Option<u64>) -> String {
    let id = uuid::Uuid::new_v4().simple();
    match checkpoint {
        Some(c) => format!("part-c{c:020}-{id}.parquet"),
        None => format!("part-{id}.parquet"),
    }
}

/// Finds the table's published files. In writable mode, temporary files left by a crash
/// mid-flush are removed (their rows were never published), and so are files of a
/// checkpoint after `committed` (a crash came before it committed: their rows are
/// still in the write-ahead log and are replayed); read-only, such files are skipped.
pub(crate) fn discover(
    dir: &Path,
    writable: bool,
    committed: u64,
) -> Result<Vec<ColdFile>, StorageError> {
    let data_dir_error = |source: io::Error| StorageError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    if writable {
        fs::create_dir_all(dir).map_err(data_dir_error)?;
    } else if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut paths = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in fs::read_dir(&current).map_err(data_dir_error)? {
            let entry = entry.map_err(data_dir_error)?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if entry.file_type().map_err(data_dir_error)?.is_dir() {
                pending.push(path);
            } else if name.starts_with(TMP_PREFIX) {
                if writable {
                    tracing::warn!(path = %path.display(), "removing an unpublished file left by an interrupted flush");
                    fs::remove_file(&path).map_err(data_dir_error)?;
                }
            } else if name.ends_with(".parquet") {
                match checkpoint_of(&name) {
                    Some(c) if c > committed => {
                        if writable {
                            tracing::warn!(path = %path.display(), checkpoint = c, committed, "removing a file of a checkpoint that never committed (its rows are replayed from the WAL)");
                            fs::remove_file(&path).map_err(data_dir_error)?;
                        }
                    }
                    _ => paths.push(path),
                }
            }
        }
    }
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let file = File::open(&path).map_err(data_dir_error)?;
            let size = file.metadata().map_err(data_dir_error)?.len();
            let reader =
                SerializedFileReader::new(file).map_err(|source| StorageError::ReadFile {
                    path: path.clone(),
                    source,
                })?;
            let rows = reader.metadata().file_metadata().num_rows() as u64;
            Ok(ColdFile { path, size, rows })
        })
        .collect()
}

/// Writes one file per hour partition of `order`, gathering rows from `batches`. Either
/// every file is published (renamed into place) or none is: on error, what was written is
/// removed.
pub(crate) fn write_partitions(
    dir: &Path,
    spec: &TableSpec,
    batches: &[&RecordBatch],
    order: &FlushOrder,
    options: &WriteOptions,
    checkpoint: Option<u64>,
) -> io::Result<Vec<ColdFile>> {
    let props = writer_properties(spec, options)?;
    let mut staged: Vec<(PathBuf, PathBuf)> = Vec::new();
    for hour in order.partitions.iter().map(|(hour, _)| *hour) {
        let partition_dir = dir.join(partition_path(hour));
        fs::create_dir_all(&partition_dir)?;
        let name = file_name(checkpoint);
        staged.push((
            partition_dir.join(format!("{TMP_PREFIX}{name}")),
            partition_dir.join(&name),
        ));
    }
    let mut sizes = Vec::with_capacity(staged.len());
    publish(&staged, |i, tmp| {
        let rows = order.partitions[i].1.clone();
        write_file(tmp, spec, batches, order, rows, options, props.clone())?;
        sizes.push(fs::metadata(tmp)?.len());
        Ok(())
    })?;
    Ok(staged
        .into_iter()
        .zip(sizes)
        .zip(&order.partitions)
        .map(|(((_, path), size), (_, rows))| ColdFile {
            path,
            size,
            rows: rows.len() as u64,
        })
        .collect())
}

/// The one way storage puts files in place. `write(i, tmp)` writes and fsyncs file `i`
/// at its temporary path; once all are written they are renamed to their paths, in
/// order, and every directory that got one is fsynced. On error nothing of it is left:
/// the temporary files and those already renamed are removed.
pub(crate) fn publish(
    staged: &[(PathBuf, PathBuf)],
    mut write: impl FnMut(usize, &Path) -> io::Result<()>,
) -> io::Result<()> {
    let result = (|| {
        for (i, (tmp, _)) in staged.iter().enumerate() {
            write(i, tmp)?;
        }
        for (tmp, path) in staged {
            fs::rename(tmp, path)?;
        }
        let mut dirs: Vec<&Path> = staged.iter().filter_map(|(_, p)| p.parent()).collect();
        dirs.dedup();
        for dir in dirs {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        for (tmp, path) in staged {
            let _ = fs::remove_file(tmp);
            let _ = fs::remove_file(path);
        }
    }
    result
}

/// Writes the rows `rows` of `order` to one file, gathered one row group at a time.
fn write_file(
    path: &Path,
    spec: &TableSpec,
    batches: &[&RecordBatch],
    order: &FlushOrder,
    rows: Range<usize>,
    options: &WriteOptions,
    props: WriterProperties,
) -> io::Result<()> {
    // Synced in steps, at full speed: a PUBACK's fdatasync waits for a step, not the file.
    let file = Paced::new(File::create(path)?, None);
    let mut writer =
        ArrowWriter::try_new(file, spec.schema.clone(), Some(props)).map_err(io::Error::other)?;
    let step = options.row_group_rows.max(1);
    let mut start = rows.start;
    while start < rows.end {
        let end = (start + step).min(rows.end);
        let slice = interleave_record_batch(batches, &order.locate(start..end))
            .map_err(io::Error::other)?;
        writer.write(&slice).map_err(io::Error::other)?;
        start = end;
    }
    let file = writer.into_inner().map_err(io::Error::other)?;
    file.into_inner().sync_all()
}

fn writer_properties(spec: &TableSpec, options: &WriteOptions) -> io::Result<WriterProperties> {
    let level = ZstdLevel::try_new(options.zstd_level).map_err(io::Error::other)?;
    let sorting = spec
        .sort_columns
        .iter()
        .filter_map(|c| spec.schema.index_of(c).ok())
        .map(|i| SortingColumn {
            column_idx: i as i32,
            descending: false,
            nulls_first: false,
        })
        .collect();
    let mut builder = WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_max_row_group_row_count(Some(options.row_group_rows))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_sorting_columns(Some(sorting));
    for column in &spec.bloom_filter_columns {
        builder = builder.set_column_bloom_filter_enabled(ColumnPath::from(column.as_str()), true);
    }
    Ok(builder.build())
}

/// `date=YYYY-MM-DD/hour=HH` for an hour counted from the epoch.
fn partition_path(hour: i64) -> PathBuf {
    let start = chrono::DateTime::from_timestamp(hour * 3600, 0).unwrap_or_default();
    PathBuf::from(start.format("date=%Y-%m-%d/hour=%H").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_paths_are_utc_dates_and_hours() {
        assert_eq!(
            partition_path(1_705_314_600 / 3600),
            PathBuf::from("date=2024-01-15/hour=10")
        );
        assert_eq!(partition_path(0), PathBuf::from("date=1970-01-01/hour=00"));
        assert_eq!(partition_path(-1), PathBuf::from("date=1969-12-31/hour=23"));
    }

    #[test]
    fn a_file_name_says_which_checkpoint_wrote_it() {
        assert_eq!(checkpoint_of(&file_name(Some(42))), Some(42));
        assert_eq!(checkpoint_of(&file_name(None)), None);
        assert_eq!(checkpoint_of("part-0123abc.parquet"), None);
    }
}

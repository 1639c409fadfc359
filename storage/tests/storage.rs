//! The storage layer through its public API: appends, flushes, SQL, files on disk.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arrow::array::{
    Array, AsArray, Float64Array, RecordBatch, StringArray, TimestampNanosecondArray,
};
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, SchemaRef, TimeUnit};
use sluice_storage::{Storage, StorageConfig, StorageMetrics, TableSpec};

const HOUR_NS: i64 = 3_600_000_000_000;
const T0: i64 = 1_705_314_600_000_000_000; // 2024-01-15T10:30:00Z

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
            false,
        ),
        Field::new("value", DataType::Float64, true),
    ]))
}

fn spec() -> TableSpec {
    TableSpec {
        name: "readings".into(),
        schema: schema(),
        time_column: "ts".into(),
        sort_columns: vec!["device_id".into(), "ts".into()],
        bloom_filter_columns: vec!["device_id".into()],
    }
}

fn batch(rows: &[(&str, i64, f64)]) -> RecordBatch {
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(
                TimestampNanosecondArray::from_iter_values(rows.iter().map(|r| r.1))
                    .with_timezone("UTC"),
            ),
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.2))),
        ],
    )
    .unwrap()
}

fn open(dir: &std::path::Path) -> (Storage, sluice_storage::Flusher) {
    let mut config = StorageConfig::new(dir);
    config.flush_interval = Duration::from_secs(3600);
    Storage::open(config, vec![spec()], StorageMetrics::unregistered()).unwrap()
}

async fn count(storage: &Storage) -> i64 {
    let out = storage.sql("SELECT count(*) FROM readings").await.unwrap();
    out.batches[0]
        .column(0)
        .as_primitive::<Int64Type>()
        .value(0)
}

async fn per_device(storage: &Storage) -> Vec<(String, i64, f64)> {
    let out = storage
        .sql("SELECT device_id, count(*), sum(value) FROM readings GROUP BY device_id ORDER BY device_id")
        .await
        .unwrap();
    let mut rows = Vec::new();
    for b in &out.batches {
        for i in 0..b.num_rows() {
            rows.push((
                b.column(0).as_string::<i32>().value(i).to_owned(),
                b.column(1).as_primitive::<Int64Type>().value(i),
                b.column(2).as_primitive::<Float64Type>().value(i),
            ));
        }
    }
    rows
}

fn parquet_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                pending.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn the_same_query_answers_the_same_before_and_after_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let (storage, flusher) = open(dir.path());
    storage
        .append("readings", batch(&[("b", T0, 1.0), ("a", T0 + 1, 2.0)]))
        .unwrap();
    storage
        .append(
            "readings",
            batch(&[("a", T0 + HOUR_NS, 3.0), ("c", T0, 4.5)]),
        )
        .unwrap();
    let before = per_device(&storage).await;
    assert_eq!(
        before,
        vec![
            ("a".into(), 2, 5.0),
            ("b".into(), 1, 1.0),
            ("c".into(), 1, 4.5)
        ]
    );
    let report = storage.flush().unwrap();
    assert_eq!((report.rows, report.files), (4, 2), "two hours, two files");
    let stats = storage.stats("readings").unwrap();
    assert_eq!((stats.hot_rows, stats.cold_rows, stats.files), (0, 4, 2));
    assert_eq!(per_device(&storage).await, before);

    // Half hot, half cold: still one table.
    storage
        .append("readings", batch(&[("a", T0 + 5, 1.0)]))
        .unwrap();
    assert_eq!(count(&storage).await, 5);
    flusher.shutdown().unwrap();
    assert_eq!(storage.stats("readings").unwrap().hot_rows, 0);
}

#[tokio::test]
async fn files_are_hive_partitioned_by_hour_and_sorted_by_device_then_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StorageConfig::new(dir.path());
    config.flush_interval = Duration::from_secs(3600);
    // Rows are gathered from several hot batches into row groups of 3: the sort must hold
    // across batches and across row groups of one file.
    config.write.row_group_rows = 3;
    let (storage, _flusher) =
        Storage::open(config, vec![spec()], StorageMetrics::unregistered()).unwrap();
    for rows in [
        &[("z", T0 + 2, 1.0), ("a", T0 + 9, 2.0)][..],
        &[("z", T0 + 1, 3.0), ("m", T0 - HOUR_NS, 5.0)][..],
        &[("b", T0 + 5, 6.0), ("a", T0 + 3, 4.0), ("z", T0, 7.0)][..],
    ] {
        storage.append("readings", batch(rows)).unwrap();
    }
    storage.flush().unwrap();
    let files = parquet_files(&dir.path().join("readings"));
    let relative: Vec<String> = files
        .iter()
        .map(|p| {
            p.parent()
                .unwrap()
                .strip_prefix(dir.path())
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(
        relative,
        [
            "readings/date=2024-01-15/hour=09",
            "readings/date=2024-01-15/hour=10"
        ]
    );
    let file = std::fs::File::open(&files[1]).unwrap();
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    assert_eq!(reader.metadata().num_row_groups(), 2);
    let batches: Vec<RecordBatch> = reader.build().unwrap().map(|b| b.unwrap()).collect();
    let b = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    let devices: Vec<&str> = b.column(0).as_string::<i32>().iter().flatten().collect();
    let ts: Vec<i64> = b
        .column(1)
        .as_primitive::<arrow::datatypes::TimestampNanosecondType>()
        .values()
        .to_vec();
    assert_eq!(devices, ["a", "a", "b", "z", "z", "z"]);
    assert_eq!(ts, [T0 + 3, T0 + 9, T0 + 5, T0, T0 + 1, T0 + 2]);
    assert_eq!(
        b.schema().field(1).data_type(),
        &DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_racing_flushes_never_see_a_row_twice_or_miss_one() {
    let dir = tempfile::tempdir().unwrap();
    let (storage, _flusher) = open(dir.path());
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let storage = storage.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            for round in 0..40i64 {
                let rows: Vec<(String, i64, f64)> = (0..50)
                    .map(|i| (format!("d{}", i % 7), T0 + round * 1000 + i, 1.0))
                    .collect();
                let rows: Vec<(&str, i64, f64)> =
                    rows.iter().map(|(d, t, v)| (d.as_str(), *t, *v)).collect();
                storage.append("readings", batch(&rows)).unwrap();
                if round % 3 == 0 {
                    storage.flush().unwrap();
                }
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut checks = 0;
    let mut last = 0;
    while !done.load(Ordering::SeqCst) {
        // Appends come in whole batches of 50 rows: any other count is a gap or a duplicate.
        let n = count(&storage).await;
        assert_eq!(n % 50, 0, "saw {n} rows");
        assert!(n >= last, "rows went from {last} to {n}");
        last = n;
        checks += 1;
    }
    writer.join().unwrap();
    storage.flush().unwrap();
    assert_eq!(count(&storage).await, 2000);
    assert!(checks > 0);
}

#[tokio::test]
async fn a_reopened_or_read_only_store_sees_the_published_files() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (storage, flusher) = open(dir.path());
        storage
            .append("readings", batch(&[("a", T0, 1.0), ("b", T0, 2.0)]))
            .unwrap();
        flusher.shutdown().unwrap();
    }
    // A file left half-written by a crash is not data.
    let partition = dir.path().join("readings/date=2024-01-15/hour=10");
    std::fs::write(partition.join(".tmp-part-crashed.parquet"), b"garbage").unwrap();

    let read_only = Storage::open_read_only(dir.path(), vec![spec()]).unwrap();
    assert_eq!(count(&read_only).await, 2);
    assert!(
        partition.join(".tmp-part-crashed.parquet").exists(),
        "read-only writes nothing"
    );

    let (reopened, _flusher) = open(dir.path());
    assert_eq!(count(&reopened).await, 2);
    assert!(!partition.join(".tmp-part-crashed.parquet").exists());
}

#[tokio::test]
async fn a_failed_flush_keeps_the_rows_in_memory_and_a_later_flush_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let (storage, _flusher) = open(dir.path());
    // A plain file where the partition directory must go makes every write fail
    // (works as root too, unlike permission bits).
    std::fs::create_dir_all(dir.path().join("readings")).unwrap();
    let blocker = dir.path().join("readings/date=2024-01-15");
    std::fs::write(&blocker, b"in the way").unwrap();
    storage
        .append("readings", batch(&[("a", T0, 1.0)]))
        .unwrap();

    let error = storage.flush().unwrap_err();
    assert!(error.to_string().contains("rows stay in memory"), "{error}");
    assert_eq!(storage.stats("readings").unwrap().hot_rows, 1);
    assert_eq!(count(&storage).await, 1);
    assert!(parquet_files(&dir.path().join("readings")).is_empty());

    std::fs::remove_file(&blocker).unwrap();
    assert_eq!(storage.flush().unwrap().rows, 1);
    assert_eq!(count(&storage).await, 1);
}

#[tokio::test]
async fn bad_sql_is_a_user_error_and_writes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (storage, _flusher) = open(dir.path());
    for sql in [
        "SELEC 1",
        "SELECT nope FROM readings",
        "SELECT * FROM missing",
        "CREATE TABLE t AS SELECT 1",
        "INSERT INTO readings VALUES ('a', now(), 1.0)",
        "COPY readings TO '/tmp/out.parquet'",
        "CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '/etc'",
        "SET datafusion.execution.batch_size = 1",
    ] {
        let error = storage.sql(sql).await.unwrap_err();
        assert!(error.is_user_error(), "{sql}: {error}");
    }
    let out = storage
        .sql("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        .await
        .unwrap();
    assert_eq!(
        out.batches[0].column(0).as_string::<i32>().value(0),
        "readings"
    );
    assert!(out.batches[0].column(0).is_valid(0));
}

#[test]
fn a_result_streamed_batch_by_batch_holds_every_row_and_stops_at_an_error() {
    fn as_refs(rows: &[(String, i64, f64)]) -> Vec<(&str, i64, f64)> {
        rows.iter().map(|r| (r.0.as_str(), r.1, r.2)).collect()
    }
    let dir = tempfile::tempdir().unwrap();
    let (storage, _flusher) = open(dir.path());
    // Many more rows than a batch (8,192), half cold and half hot.
    let rows: Vec<(String, i64, f64)> = (0..50_000)
        .map(|i| (format!("d{}", i % 97), T0 + i, i as f64))
        .collect();
    storage
        .append("readings", batch(&as_refs(&rows[..25_000])))
        .unwrap();
    storage.flush().unwrap();
    storage
        .append("readings", batch(&as_refs(&rows[25_000..])))
        .unwrap();

    let (mut batches, mut sum) = (0, 0.0);
    let streamed = storage
        .sql_each("SELECT value FROM readings", |b| {
            batches += 1;
            sum += arrow::compute::sum(b.column(0).as_primitive::<Float64Type>()).unwrap_or(0.0);
            Ok(())
        })
        .unwrap();
    assert_eq!(streamed, 50_000);
    assert!(
        batches > 4,
        "handed on as made, not as one result: {batches}"
    );
    assert_eq!(sum, rows.iter().map(|r| r.2).sum::<f64>());

    // The caller stops: the query stops with it, and the caller's reason comes back.
    let mut taken = 0;
    let error = storage
        .sql_each("SELECT * FROM readings", |_| {
            taken += 1;
            Err("enough".into())
        })
        .unwrap_err();
    assert_eq!(taken, 1);
    assert!(error.to_string().contains("enough"), "{error}");

    // Bad SQL and forbidden statements: the same user errors as `sql`.
    for sql in [
        "SELECT nope FROM readings",
        "INSERT INTO readings VALUES ('a', now(), 1.0)",
    ] {
        let error = storage.sql_each(sql, |_| Ok(())).unwrap_err();
        assert!(error.is_user_error(), "{sql}: {error}");
    }
}

#[test]
fn the_hot_store_is_flushed_when_its_memory_reaches_flush_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StorageConfig::new(dir.path());
    config.flush_interval = Duration::from_secs(3600);
    let one_batch = batch(&[("a", T0, 1.0), ("b", T0, 2.0)]);
    let size = one_batch.get_array_memory_size();
    // Two batches fit under the limit, the third reaches it.
    config.flush_bytes = 3 * size;
    let (storage, _flusher) =
        Storage::open(config, vec![spec()], StorageMetrics::unregistered()).unwrap();
    for _ in 0..2 {
        storage.append("readings", one_batch.clone()).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        storage.stats("readings").unwrap().hot_rows,
        4,
        "under the limit"
    );
    storage.append("readings", one_batch).unwrap();
    wait_for_cold_rows(&storage, 6, "no flush");
}

/// Waits up to 10 s for `readings` to hold `rows` rows in files; fails with `why`.
fn wait_for_cold_rows(storage: &Storage, rows: u64, why: &str) {
    let started = std::time::Instant::now();
    while storage.stats("readings").unwrap().cold_rows < rows {
        assert!(started.elapsed() < Duration::from_secs(10), "{why}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn held_flushes_wait_for_three_quarters_of_the_cap_and_go_when_released() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StorageConfig::new(dir.path());
    config.flush_interval = Duration::from_secs(3600);
    config.flush_rows = 2;
    config.max_hot_rows = 8;
    let (storage, _flusher) =
        Storage::open(config, vec![spec()], StorageMetrics::unregistered()).unwrap();
    let two = batch(&[("a", T0, 1.0), ("b", T0, 2.0)]);
    let held = storage.hold_flushes();
    for _ in 0..2 {
        storage.append("readings", two.clone()).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let stats = storage.stats("readings").unwrap();
    assert_eq!(
        (stats.hot_rows, stats.cold_rows),
        (4, 0),
        "past flush_rows, under 3/4 of the cap"
    );
    drop(held);
    wait_for_cold_rows(&storage, 4, "no flush on release");
    // Held again: three quarters of the cap (6 rows) still flushes.
    let _held = storage.hold_flushes();
    for _ in 0..3 {
        storage.append("readings", two.clone()).unwrap();
    }
    wait_for_cold_rows(&storage, 10, "no flush at 3/4 of the cap");
}

/// Counts the checkpoints a storage takes; every cut covers every hot row.
#[derive(Default)]
struct Counting {
    cuts: std::sync::atomic::AtomicU64,
    commits: std::sync::atomic::AtomicU64,
}

impl sluice_storage::Checkpoints for Counting {
    fn cut(&self) -> Result<sluice_storage::Cut, String> {
        let n = self.cuts.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(sluice_storage::Cut {
            checkpoint: 10 * n,
            tables: Vec::new(),
        })
    }
    fn commit(&self, _: &sluice_storage::Cut) -> Result<(), String> {
        self.commits.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn next(&self) -> u64 {
        10 * self.cuts.load(Ordering::SeqCst) + 10
    }
}

#[test]
fn flushes_for_room_between_checkpoints_write_files_of_the_next_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StorageConfig::new(dir.path());
    config.flush_interval = Duration::from_secs(3600);
    let one_batch = batch(&[("a", T0, 1.0), ("b", T0, 2.0)]);
    config.flush_bytes = one_batch.get_array_memory_size();
    let (storage, _flusher) =
        Storage::open(config, vec![spec()], StorageMetrics::unregistered()).unwrap();
    let checkpoints = Arc::new(Counting::default());
    storage.set_checkpoints(checkpoints.clone());
    // Each append reaches flush_bytes: the flusher flushes, but an hour has not passed
    // since the last checkpoint, so none is taken.
    for i in 0..3 {
        storage.append("readings", one_batch.clone()).unwrap();
        wait_for_cold_rows(&storage, 2 * (i + 1), "no flush");
    }
    assert_eq!(checkpoints.cuts.load(Ordering::SeqCst), 0);
    let files = parquet_files(dir.path());
    assert_eq!(files.len(), 3, "{files:?}");
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with(&format!("part-c{:020}-", 10)),
            "named with the next checkpoint: {name}"
        );
    }
    // An explicit flush (POST /flush, a stop) is always a checkpoint.
    storage.append("readings", one_batch).unwrap();
    storage.flush().unwrap();
    assert_eq!(checkpoints.cuts.load(Ordering::SeqCst), 1);
    assert_eq!(checkpoints.commits.load(Ordering::SeqCst), 1);
}

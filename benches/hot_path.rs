//! Criterion benchmarks of the hot path, each through the real code:
//! decode + validate, Arrow batch building, a flush to Parquet on disk, a dashboard
//! query over a table that is half in memory, half in Parquet, and the write-ahead log's
//! recovery of a segment from disk (records/s: the replay goal is ≥ 1,000,000).
//!
//! `cargo bench --bench hot_path` (add `-- <name>` to run one).

use std::hint::black_box;
use std::time::Duration;

use arrow::array::RecordBatch;
use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use sluice_ingest::{DecodeLimits, RowBuilder, TelemetryBuilder, decode};
use sluice_loadgen::{Fleet, device_id};
use sluice_storage::{Storage, StorageConfig, StorageMetrics, TableSpec};

const MESSAGES: usize = 10_000;
const T0: i64 = 1_705_312_800; // 2024-01-15T10:00:00Z

/// Seed-schema messages from a simulated fleet, one reading per device every 30 s.
fn messages(n: usize, devices: u64) -> Vec<(Bytes, Bytes)> {
    let mut fleet = Fleet::new(1, (0..devices).collect());
    (0..n)
        .map(|i| {
            let slot = i % devices as usize;
            let seconds = T0 as f64
                + (i / devices as usize) as f64 * 30.0
                + slot as f64 * 30.0 / devices as f64;
            let reading = fleet.next_reading(slot, seconds);
            let id = device_id(reading.device_index);
            let ts = chrono::DateTime::from_timestamp_nanos((seconds * 1e9) as i64)
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            (
                Bytes::from(format!("devices/{id}/telemetry")),
                Bytes::from(fleet.payload(&reading, &id, &ts)),
            )
        })
        .collect()
}

fn telemetry_batch(messages: &[(Bytes, Bytes)]) -> RecordBatch {
    let limits = DecodeLimits::default();
    let mut builder = TelemetryBuilder::default();
    for (i, (topic, payload)) in messages.iter().enumerate() {
        let reading = decode(topic, payload, &limits).expect("loadgen messages are valid");
        // Received a few milliseconds after the event, with jitter, as on a real link.
        let received_at = reading.ts_ns + 3_000_000 + (i as i64 * 7919) % 2_000_000;
        builder.append(&reading, received_at);
    }
    builder.finish()
}

fn decode_validate(c: &mut Criterion) {
    let messages = messages(MESSAGES, 1000);
    let bytes: usize = messages.iter().map(|(_, p)| p.len()).sum();
    let limits = DecodeLimits::default();
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(MESSAGES as u64));
    group.bench_function(format!("seed_schema_{}B_avg", bytes / MESSAGES), |b| {
        b.iter(|| {
            for (topic, payload) in &messages {
                black_box(decode(topic, payload, &limits).is_ok());
            }
        })
    });
    group.finish();
}

fn batch_building(c: &mut Criterion) {
    let messages = messages(MESSAGES, 1000);
    let limits = DecodeLimits::default();
    let readings: Vec<_> = messages
        .iter()
        .map(|(t, p)| decode(t, p, &limits).unwrap())
        .collect();
    let mut group = c.benchmark_group("batch");
    group.throughput(Throughput::Elements(MESSAGES as u64));
    group.bench_function("append_and_finish", |b| {
        let mut builder = TelemetryBuilder::default();
        b.iter(|| {
            for r in &readings {
                builder.append(r, 1);
            }
            black_box(builder.finish().num_rows())
        })
    });
    group.finish();
}

fn telemetry_spec() -> TableSpec {
    TableSpec {
        name: "telemetry".into(),
        schema: sluice_ingest::telemetry_schema(),
        time_column: "ts".into(),
        sort_columns: vec!["device_id".into(), "ts".into()],
        bloom_filter_columns: vec!["device_id".into()],
    }
}

fn open_storage(dir: &std::path::Path) -> (Storage, sluice_storage::Flusher) {
    let mut config = StorageConfig::new(dir);
    config.flush_interval = Duration::from_secs(3600);
    config.flush_rows = usize::MAX / 2;
    config.max_hot_rows = usize::MAX / 2;
    Storage::open(
        config,
        vec![telemetry_spec()],
        StorageMetrics::unregistered(),
    )
    .unwrap()
}

fn parquet_flush(c: &mut Criterion) {
    const ROWS: usize = 100_000;
    let batch = telemetry_batch(&messages(ROWS, 10_000));
    let mut group = c.benchmark_group("parquet");
    group.throughput(Throughput::Elements(ROWS as u64));
    group.sample_size(10);
    let mut bytes_per_row = 0.0;
    group.bench_function("flush_100k_rows_sorted_zstd_fsync", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().unwrap();
                let (storage, flusher) = open_storage(dir.path());
                storage.append("telemetry", batch.clone()).unwrap();
                (dir, storage, flusher)
            },
            |(dir, storage, flusher)| {
                let report = storage.flush().unwrap();
                bytes_per_row = report.bytes as f64 / report.rows as f64;
                (dir, storage, flusher)
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
    println!("parquet: {bytes_per_row:.1} bytes per reading (10,000 devices, 100,000 readings)");
}

fn dashboard_query(c: &mut Criterion) {
    // One hour of a 10,000-device fleet (1.2M readings): 1M in Parquet, 200k in memory.
    let dir = tempfile::tempdir().unwrap();
    let (storage, _flusher) = open_storage(dir.path());
    let all = messages(1_200_000, 10_000);
    for chunk in all[..1_000_000].chunks(50_000) {
        storage.append("telemetry", telemetry_batch(chunk)).unwrap();
    }
    storage.flush().unwrap();
    for chunk in all[1_000_000..].chunks(8192) {
        storage.append("telemetry", telemetry_batch(chunk)).unwrap();
    }
    drop(all);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut group = c.benchmark_group("query");
    group.sample_size(20);
    for (name, sql) in [
        (
            "readings_per_minute_1h",
            "SELECT date_bin(INTERVAL '1 minute', ts) AS minute, count(*), avg(temperature) \
             FROM telemetry GROUP BY 1 ORDER BY 1",
        ),
        (
            "one_device_1h",
            "SELECT ts, temperature, battery FROM telemetry WHERE device_id = 'device-004242' ORDER BY ts",
        ),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| black_box(runtime.block_on(storage.sql(sql)).unwrap().num_rows()))
        });
    }
    group.finish();
}

/// Recovery of one WAL segment of 100,000 seed-schema messages from a real file: read,
/// CRC-check and hand every record on (what replay does before decoding).
fn wal_recovery(c: &mut Criterion) {
    use sluice_storage::wal::{record, segments};
    let messages = messages(MESSAGES, 1000);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut data = Vec::new();
    for i in 0..10 {
        for (n, (topic, payload)) in messages.iter().enumerate() {
            let r = record::Record {
                received_at_ns: T0 * 1_000_000_000 + (i * MESSAGES + n) as i64,
                topic,
                payload,
                denied: false,
                reading: false,
            };
            record::encode(&r, &mut data).expect("a message fits a record");
        }
    }
    std::fs::write(segments::segment_path(dir.path(), 1), &data).expect("the segment");
    let mut group = c.benchmark_group("wal");
    group.throughput(Throughput::Elements(10 * MESSAGES as u64));
    group.bench_function(format!("recover_{}MiB_segment", data.len() >> 20), |b| {
        b.iter(|| {
            let mut bytes = 0;
            let recovered = segments::recover(dir.path(), 0, |_, r, _| bytes += r.payload.len())
                .expect("recovery");
            black_box((recovered.records, bytes))
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    decode_validate,
    batch_building,
    parquet_flush,
    dashboard_query,
    wal_recovery
);
criterion_main!(benches);

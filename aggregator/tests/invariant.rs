//! For on-time data, aggregating `telemetry` with SQL gives exactly the rows of
//! `telemetry_1m` (and of `telemetry_1h`): the real aggregator stage, the real storage,
//! DataFusion, before and after the rows move to Parquet.
//!
//! Values are multiples of 1/64 within ±1000, as sensor readings with a few fractional
//! bits are: their sums are exact in f64 whatever the order of addition, so `sum` can be
//! compared bit for bit with DataFusion's (which adds in its own order).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type};
use proptest::prelude::*;
use sluice_aggregator::{
    Aggregator, AggregatorConfig, AggregatorMetrics, LATE_TABLE, MINUTE_TABLE, ROLLUP_TABLE,
    TableSink, WindowConfig, late_schema, window_schema,
};
use sluice_ingest::{Reading, RowBuilder, TelemetryBuilder, telemetry_schema};
use sluice_storage::{Storage, StorageConfig, StorageMetrics, TableSpec};

/// 2024-01-15T10:00:00Z
const T0: i64 = 1_705_312_800_000_000_000;
const MS: i64 = 1_000_000;

fn spec(name: &str, schema: arrow::datatypes::SchemaRef, time: &str) -> TableSpec {
    TableSpec {
        name: name.into(),
        schema,
        time_column: time.into(),
        sort_columns: vec!["device_id".into(), time.into()],
        bloom_filter_columns: vec![],
    }
}

struct Sink(Storage);

impl TableSink for Sink {
    fn append(&self, table: &str, batch: RecordBatch) -> Result<(), sluice_ingest::Refused> {
        self.0.append(table, batch).unwrap();
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Generated {
    device: u8,
    /// Milliseconds after T0; readings arrive in this order (on time).
    at_ms: i64,
    /// Values in 1/64ths.
    temperature: Option<i32>,
    humidity: Option<i32>,
    co2: Option<i32>,
}

fn readings() -> impl Strategy<Value = Vec<Generated>> {
    let value = prop::option::weighted(0.9, -64_000..64_000i32);
    prop::collection::vec(
        (
            0..5u8,
            0..150_000i64,
            value.clone(),
            value,
            prop::option::of(0..64_000i32),
        ),
        1..400,
    )
    .prop_map(|mut v| {
        v.sort_by_key(|r| r.1);
        // Steps of 50 ms over up to ~2 hours: minute and hour boundaries are crossed.
        v.into_iter()
            .map(|(device, t, temperature, humidity, co2)| Generated {
                device,
                at_ms: t * 50,
                temperature,
                humidity,
                co2,
            })
            .collect()
    })
}

fn value(v: Option<i32>) -> Option<f64> {
    v.map(|x| f64::from(x) / 64.0)
}

fn query(storage: &Storage, sql: &str) -> Vec<RecordBatch> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(storage.sql(sql))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .batches
}

/// The first column as text and the others as f64 (null as NaN), row by row.
fn rows(storage: &Storage, sql: &str) -> Vec<(String, Vec<f64>)> {
    let mut out = Vec::new();
    for batch in query(storage, sql) {
        let names = cast(batch.column(0), &DataType::Utf8).unwrap();
        let numbers: Vec<_> = batch.columns()[1..]
            .iter()
            .map(|c| cast(c, &DataType::Float64).unwrap())
            .collect();
        for row in 0..batch.num_rows() {
            let values = numbers
                .iter()
                .map(|c| {
                    let c = c.as_primitive::<Float64Type>();
                    if c.is_null(row) {
                        f64::NAN
                    } else {
                        c.value(row)
                    }
                })
                .collect();
            out.push((names.as_string::<i32>().value(row).to_owned(), values));
        }
    }
    out
}

/// Equal numbers, bit for bit, but for the `avg` columns (indexes into the numbers),
/// which must agree within 1e-9 relative.
fn assert_same(
    sql: &[(String, Vec<f64>)],
    windows: &[(String, Vec<f64>)],
    avg: &[usize],
    what: &str,
) {
    assert_eq!(sql.len(), windows.len(), "{what}: row count");
    for (a, b) in sql.iter().zip(windows) {
        assert_eq!(a.0, b.0, "{what}: device");
        for (i, (x, y)) in a.1.iter().zip(&b.1).enumerate() {
            let same = if x.is_nan() || y.is_nan() {
                x.is_nan() && y.is_nan()
            } else if avg.contains(&i) {
                (x - y).abs() <= 1e-9 * x.abs().max(y.abs())
            } else {
                x.to_bits() == y.to_bits()
            };
            assert!(
                same,
                "{what}: column {i}: {x} vs {y}\nSQL:     {a:?}\nwindows: {b:?}"
            );
        }
    }
}

fn check(generated: &[Generated]) {
    let dir = tempfile::tempdir().unwrap();
    let registry = prometheus::Registry::new();
    let (storage, _flusher) = Storage::open(
        StorageConfig::new(dir.path()),
        vec![
            spec("telemetry", telemetry_schema(), "ts"),
            spec(MINUTE_TABLE, window_schema(), "window_start"),
            spec(ROLLUP_TABLE, window_schema(), "window_start"),
            spec(LATE_TABLE, late_schema(), "ts"),
        ],
        StorageMetrics::new(&registry).unwrap(),
    )
    .unwrap();
    let aggregator = Aggregator::start(
        AggregatorConfig {
            // Nothing closes by the server clock while the test runs: the readings are
            // from 2024, so the idle rule would close every window at once.
            windows: Some(WindowConfig {
                idle_timeout: Duration::from_secs(100 * 365 * 24 * 3600),
                ..WindowConfig::default()
            }),
            ..AggregatorConfig::default()
        },
        Arc::new(Sink(storage.clone())),
        AggregatorMetrics::new(&registry).unwrap(),
        None,
    )
    .unwrap();
    let names: Vec<String> = (0..5).map(|d| format!("device-{d}")).collect();
    // Several batches, as the decoders seal them.
    for chunk in generated.chunks(97) {
        let mut builder = TelemetryBuilder::default();
        for g in chunk {
            let ts = T0 + g.at_ms * MS;
            let extra = value(g.co2).map(|v| (Cow::Borrowed("co2"), v));
            builder.append(
                &Reading {
                    device_id: Cow::Borrowed(&names[g.device as usize]),
                    ts_ns: ts,
                    temperature: value(g.temperature),
                    humidity: value(g.humidity),
                    battery: None,
                    signal_strength: None,
                    firmware_version: None,
                    lat: None,
                    lng: None,
                    extra: extra.into_iter().collect(),
                },
                ts + MS,
            );
        }
        let batch = builder.finish();
        storage.append("telemetry", batch.clone()).unwrap();
        aggregator.observe(batch).unwrap();
    }
    // On-time data: the stop closes every window and none is late.
    aggregator.finish();

    let metric = |e: &str| format!("count({e}), min({e}), max({e}), sum({e}), avg({e})");
    let from_sql = |bin: &str| {
        format!(
            "SELECT device_id, \
             CAST(date_bin(INTERVAL '{bin}', ts, TIMESTAMP '1970-01-01T00:00:00Z') AS BIGINT), \
             count(*), {}, {}, {} FROM telemetry GROUP BY 1, 2 ORDER BY 1, 2",
            metric("temperature"),
            metric("humidity"),
            metric("extra['co2']"),
        )
    };
    let from_windows = |table: &str| {
        let co2 = |f: &str| format!("extra['co2']['{f}']");
        format!(
            "SELECT device_id, CAST(window_start AS BIGINT), readings, \
             temperature_count, temperature_min, temperature_max, temperature_sum, temperature_avg, \
             humidity_count, humidity_min, humidity_max, humidity_sum, humidity_avg, \
             coalesce({}, 0), {}, {}, {}, {} FROM {table} ORDER BY 1, 2",
            co2("count"),
            co2("min"),
            co2("max"),
            co2("sum"),
            co2("avg"),
        )
    };
    let avg = [6, 11, 16];
    for moment in ["in memory", "in Parquet"] {
        for (bin, table) in [("1 minute", MINUTE_TABLE), ("1 hour", ROLLUP_TABLE)] {
            assert_same(
                &rows(&storage, &from_sql(bin)),
                &rows(&storage, &from_windows(table)),
                &avg,
                &format!("{table} {moment}"),
            );
        }
        let late = rows(
            &storage,
            &format!("SELECT 'late', count(*) FROM {LATE_TABLE}"),
        );
        assert_eq!(late, vec![("late".to_owned(), vec![0.0])]);
        storage.flush().unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn windows_equal_sql_over_telemetry(generated in readings()) {
        check(&generated);
    }
}

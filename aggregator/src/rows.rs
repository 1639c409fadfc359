//! Arrow schemas and batches of the `telemetry_1m` / `telemetry_1h`, `telemetry_late` and
//! `alerts` tables.
//!
//! A window row has `window_start`, `window_end`, `device_id`, `readings`, then for each
//! known metric `m`: `m_count`, `m_min`, `m_max`, `m_sum`, `m_avg`, `m_first`,
//! `m_first_ts`, `m_last`, `m_last_ts` (all but the count null when the metric had no
//! value in the window), and `extra`: a map from each other metric's name to a struct of
//! the same nine fields (`extra['co2'].max` in SQL).

use std::sync::{Arc, LazyLock};

use arrow::array::{
    Array, ArrayRef, Float64Array, Float64Builder, Int64Array, Int64Builder, MapBuilder,
    StringArray, StringBuilder, StructBuilder, TimestampNanosecondArray,
    TimestampNanosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;

use crate::METRICS;
use crate::acc::{MetricAcc, WindowAcc};
use crate::alert::AlertEvent;
use crate::window::Observation;

fn timestamp() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
}

/// The nine per-metric fields, named `{prefix}count` … `{prefix}last_ts`.
fn metric_fields(prefix: &str) -> Vec<Field> {
    let f = |name: &str, t: DataType, nullable| Field::new(format!("{prefix}{name}"), t, nullable);
    vec![
        f("count", DataType::Int64, false),
        f("min", DataType::Float64, true),
        f("max", DataType::Float64, true),
        f("sum", DataType::Float64, true),
        f("avg", DataType::Float64, true),
        f("first", DataType::Float64, true),
        f("first_ts", timestamp(), true),
        f("last", DataType::Float64, true),
        f("last_ts", timestamp(), true),
    ]
}

fn extra_builder(capacity: usize) -> MapBuilder<StringBuilder, StructBuilder> {
    MapBuilder::new(
        None,
        StringBuilder::new(),
        StructBuilder::from_fields(Fields::from(metric_fields("")), capacity),
    )
}

static WINDOW_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields = vec![
        Field::new("window_start", timestamp(), false),
        Field::new("window_end", timestamp(), false),
        Field::new("device_id", DataType::Utf8, false),
        Field::new("readings", DataType::Int64, false),
    ];
    for m in METRICS {
        fields.extend(metric_fields(&format!("{m}_")));
    }
    let extra_type = extra_builder(0).finish().data_type().clone();
    fields.push(Field::new("extra", extra_type, true));
    Arc::new(Schema::new(fields))
});

static LATE_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("ts", timestamp(), false),
        Field::new("received_at", timestamp(), false),
    ]))
});

/// Schema of `telemetry_1m` and `telemetry_1h`.
pub fn window_schema() -> SchemaRef {
    WINDOW_SCHEMA.clone()
}

/// Schema of `telemetry_late`: readings that arrived after their window closed.
pub fn late_schema() -> SchemaRef {
    LATE_SCHEMA.clone()
}

/// A closed window waiting to be written.
#[derive(Debug, Clone, PartialEq)]
pub struct ClosedWindow {
    pub device: Box<str>,
    pub end: i64,
    pub acc: WindowAcc,
}

/// A late reading waiting to be written.
#[derive(Debug, Clone, PartialEq)]
pub struct LateReading {
    pub device: Box<str>,
    pub ts: i64,
    pub received_at: i64,
}

fn metric_columns(metrics: &[&MetricAcc]) -> Vec<ArrayRef> {
    let present = |m: &MetricAcc| m.count > 0;
    let value = |pick: fn(&MetricAcc) -> f64| -> ArrayRef {
        Arc::new(
            metrics
                .iter()
                .map(|m| present(m).then(|| pick(m)))
                .collect::<Float64Array>(),
        )
    };
    let time = |pick: fn(&MetricAcc) -> i64| -> ArrayRef {
        Arc::new(
            metrics
                .iter()
                .map(|m| present(m).then(|| pick(m)))
                .collect::<TimestampNanosecondArray>()
                .with_timezone("UTC"),
        )
    };
    vec![
        Arc::new(Int64Array::from_iter_values(
            metrics.iter().map(|m| m.count as i64),
        )),
        value(|m| m.min),
        value(|m| m.max),
        value(|m| m.sum),
        Arc::new(metrics.iter().map(|m| m.avg()).collect::<Float64Array>()),
        value(|m| m.first),
        time(|m| m.first_ts),
        value(|m| m.last),
        time(|m| m.last_ts),
    ]
}

fn append_metric(values: &mut StructBuilder, m: &MetricAcc) {
    macro_rules! field {
        ($i:expr, $builder:ty) => {
            values
                .field_builder::<$builder>($i)
                .expect("the struct's field types are fixed above")
        };
    }
    field!(0, Int64Builder).append_value(m.count as i64);
    field!(1, Float64Builder).append_value(m.min);
    field!(2, Float64Builder).append_value(m.max);
    field!(3, Float64Builder).append_value(m.sum);
    field!(4, Float64Builder).append_option(m.avg());
    field!(5, Float64Builder).append_value(m.first);
    field!(6, TimestampNanosecondBuilder).append_value(m.first_ts);
    field!(7, Float64Builder).append_value(m.last);
    field!(8, TimestampNanosecondBuilder).append_value(m.last_ts);
    values.append(true);
}

/// The rows of a window table.
pub fn window_batch(rows: &[ClosedWindow]) -> RecordBatch {
    let start = |w: &ClosedWindow| w.acc.start;
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(
            TimestampNanosecondArray::from_iter_values(rows.iter().map(start)).with_timezone("UTC"),
        ),
        Arc::new(
            TimestampNanosecondArray::from_iter_values(rows.iter().map(|w| w.end))
                .with_timezone("UTC"),
        ),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|w| &*w.device),
        )),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|w| w.acc.readings as i64),
        )),
    ];
    for i in 0..METRICS.len() {
        let metric: Vec<&MetricAcc> = rows.iter().map(|w| &w.acc.known[i]).collect();
        columns.extend(metric_columns(&metric));
    }
    let mut extra = extra_builder(rows.len());
    for w in rows {
        for (name, m) in &w.acc.extra {
            extra.keys().append_value(name);
            append_metric(extra.values(), m);
        }
        extra
            .append(!w.acc.extra.is_empty())
            .expect("keys and values are appended in pairs");
    }
    columns.push(Arc::new(extra.finish()));
    RecordBatch::try_new(window_schema(), columns).expect("columns follow the schema")
}

/// The rows of `telemetry_late`.
pub fn late_batch(rows: &[LateReading]) -> RecordBatch {
    RecordBatch::try_new(
        late_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| &*r.device),
            )),
            Arc::new(
                TimestampNanosecondArray::from_iter_values(rows.iter().map(|r| r.ts))
                    .with_timezone("UTC"),
            ),
            Arc::new(
                TimestampNanosecondArray::from_iter_values(rows.iter().map(|r| r.received_at))
                    .with_timezone("UTC"),
            ),
        ],
    )
    .expect("columns follow the schema")
}

static ALERTS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("ts", timestamp(), false),
        Field::new("rule", DataType::Utf8, false),
        Field::new("device_id", DataType::Utf8, false),
        Field::new("state", DataType::Utf8, false),
        Field::new("severity", DataType::Utf8, false),
        Field::new("metric", DataType::Utf8, true),
        Field::new("value", DataType::Float64, true),
        Field::new("threshold", DataType::Float64, true),
        Field::new("started_at", timestamp(), false),
        Field::new("duration_s", DataType::Float64, true),
        Field::new("reason", DataType::Utf8, true),
    ]))
});

/// Schema of the `alerts` table: one row per transition (`firing` or `resolved`) at its
/// event time `ts`; a resolved row has the `duration_s` since `started_at`.
pub fn alerts_schema() -> SchemaRef {
    ALERTS_SCHEMA.clone()
}

/// Rows of the `alerts` table.
pub fn alerts_batch(events: &[AlertEvent]) -> RecordBatch {
    let time = |f: fn(&AlertEvent) -> i64| -> ArrayRef {
        Arc::new(
            TimestampNanosecondArray::from_iter_values(events.iter().map(f)).with_timezone("UTC"),
        )
    };
    let text = |f: fn(&AlertEvent) -> Option<&str>| -> ArrayRef {
        Arc::new(events.iter().map(f).collect::<StringArray>())
    };
    let number = |f: fn(&AlertEvent) -> Option<f64>| -> ArrayRef {
        Arc::new(events.iter().map(f).collect::<Float64Array>())
    };
    RecordBatch::try_new(
        alerts_schema(),
        vec![
            time(|e| e.event_time),
            text(|e| Some(&e.rule)),
            text(|e| Some(&e.device)),
            text(|e| Some(e.state.as_str())),
            text(|e| Some(&e.severity)),
            text(|e| e.metric.as_deref()),
            number(|e| e.value),
            number(|e| e.threshold),
            time(|e| e.started_at),
            number(AlertEvent::duration_s),
            text(|e| e.reason),
        ],
    )
    .expect("columns follow the schema")
}

/// The columns of a `telemetry` batch that windows read, row by row.
pub(crate) struct TelemetryColumns<'a> {
    devices: &'a arrow::array::StringArray,
    ts: &'a TimestampNanosecondArray,
    received: &'a TimestampNanosecondArray,
    known: [&'a Float64Array; 4],
    extra: &'a arrow::array::MapArray,
    keys: &'a arrow::array::StringArray,
    values: &'a Float64Array,
}

impl<'a> TelemetryColumns<'a> {
    pub(crate) fn new(batch: &'a RecordBatch) -> Self {
        use arrow::array::AsArray;
        use arrow::datatypes::{Float64Type, TimestampNanosecondType};
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .unwrap_or_else(|| panic!("telemetry batches have a {name} column"))
        };
        let extra = column("extra").as_map();
        TelemetryColumns {
            devices: column("device_id").as_string::<i32>(),
            ts: column("ts").as_primitive::<TimestampNanosecondType>(),
            received: column("received_at").as_primitive::<TimestampNanosecondType>(),
            known: METRICS.map(|m| column(m).as_primitive::<Float64Type>()),
            extra,
            keys: extra.keys().as_string::<i32>(),
            values: extra.values().as_primitive::<Float64Type>(),
        }
    }

    /// Row `row` as the windows see it; its extra metrics are put in `extras`.
    pub(crate) fn observation<'b>(
        &'b self,
        row: usize,
        extras: &'b mut Vec<(&'a str, f64)>,
    ) -> Observation<'b> {
        extras.clear();
        if self.extra.is_valid(row) {
            let offsets = self.extra.value_offsets();
            for i in offsets[row] as usize..offsets[row + 1] as usize {
                extras.push((self.keys.value(i), self.values.value(i)));
            }
        }
        Observation {
            device: self.devices.value(row),
            ts: self.ts.value(row),
            received_at: self.received.value(row),
            known: self.known.map(|k| k.is_valid(row).then(|| k.value(row))),
            extra: extras,
        }
    }
}

/// Reads window rows back (state saved at a stop): device and accumulators per row.
pub fn windows_from_batch(batch: &RecordBatch) -> Vec<(Box<str>, WindowAcc)> {
    use arrow::array::{AsArray, Float64Array, Int64Array, TimestampNanosecondArray};
    use arrow::datatypes::{Float64Type, Int64Type, TimestampNanosecondType};

    /// The nine fields of one metric (`metric_fields` order), downcast once per batch: a
    /// restart reads a million devices' windows through here.
    struct MetricColumns<'a> {
        count: &'a Int64Array,
        /// min, max, sum, first, last (`avg` is derived, not read back).
        values: [&'a Float64Array; 5],
        first_ts: &'a TimestampNanosecondArray,
        last_ts: &'a TimestampNanosecondArray,
    }

    impl<'a> MetricColumns<'a> {
        fn new(columns: &[&'a ArrayRef]) -> Self {
            let f = |i: usize| columns[i].as_primitive::<Float64Type>();
            MetricColumns {
                count: columns[0].as_primitive::<Int64Type>(),
                values: [f(1), f(2), f(3), f(5), f(7)],
                first_ts: columns[6].as_primitive::<TimestampNanosecondType>(),
                last_ts: columns[8].as_primitive::<TimestampNanosecondType>(),
            }
        }

        fn at(&self, row: usize) -> MetricAcc {
            let count = self.count.value(row) as u64;
            if count == 0 {
                return MetricAcc::EMPTY;
            }
            let [min, max, sum, first, last] = self.values.map(|c| c.value(row));
            MetricAcc {
                count,
                min,
                max,
                sum,
                first,
                first_ts: self.first_ts.value(row),
                last,
                last_ts: self.last_ts.value(row),
            }
        }
    }

    let col = |name: &str| {
        batch
            .column_by_name(name)
            .unwrap_or_else(|| panic!("a window batch has {name}"))
    };
    let starts = col("window_start").as_primitive::<TimestampNanosecondType>();
    let devices = col("device_id").as_string::<i32>();
    let readings = col("readings").as_primitive::<Int64Type>();
    let known: Vec<MetricColumns> = METRICS
        .iter()
        .map(|m| {
            let fields = metric_fields(&format!("{m}_"));
            MetricColumns::new(&fields.iter().map(|f| col(f.name())).collect::<Vec<_>>())
        })
        .collect();
    let extra = col("extra").as_map();
    let (keys, values) = (extra.keys().as_string::<i32>(), extra.values().as_struct());
    let value_columns: Vec<&ArrayRef> = values.columns().iter().collect();
    let extra_values = MetricColumns::new(&value_columns);
    let offsets = extra.value_offsets();
    (0..batch.num_rows())
        .map(|row| {
            let mut acc = WindowAcc::new(starts.value(row));
            acc.readings = readings.value(row) as u64;
            for (slot, columns) in acc.known.iter_mut().zip(&known) {
                *slot = columns.at(row);
            }
            if extra.is_valid(row) {
                for i in offsets[row] as usize..offsets[row + 1] as usize {
                    acc.extra.push((keys.value(i).into(), extra_values.at(i)));
                }
            }
            (devices.value(row).into(), acc)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;

    #[test]
    fn a_window_row_carries_every_aggregate_and_null_for_absent_metrics() {
        let mut acc = WindowAcc::new(60_000_000_000);
        acc.readings = 2;
        acc.known[0].add(20.5, 61_000_000_000);
        acc.known[0].add(22.5, 62_000_000_000);
        acc.add_extra("co2", 410.0, 61_000_000_000);
        let batch = window_batch(&[ClosedWindow {
            device: "d1".into(),
            end: 120_000_000_000,
            acc,
        }]);
        assert_eq!(batch.schema(), window_schema());
        let col = |name: &str| batch.column_by_name(name).unwrap().clone();
        assert_eq!(
            col("temperature_count")
                .as_primitive::<arrow::datatypes::Int64Type>()
                .value(0),
            2
        );
        let f = |name: &str| {
            col(name)
                .as_primitive::<arrow::datatypes::Float64Type>()
                .clone()
        };
        assert_eq!(f("temperature_avg").value(0), 21.5);
        assert_eq!(f("temperature_last").value(0), 22.5);
        assert!(f("humidity_min").is_null(0), "no humidity in the window");
        let extra = col("extra");
        let extra = extra.as_map();
        assert_eq!(extra.keys().as_string::<i32>().value(0), "co2");
        let values = extra.values().as_struct();
        assert_eq!(
            values
                .column_by_name("max")
                .unwrap()
                .as_primitive::<arrow::datatypes::Float64Type>()
                .value(0),
            410.0
        );
    }

    #[test]
    fn window_rows_read_back_into_the_same_accumulators() {
        let mut a = WindowAcc::new(0);
        a.readings = 3;
        a.known[2].add(87.0, 5);
        a.known[2].add(86.5, 9);
        a.add_extra("co2", 400.0, 5);
        a.add_extra("pm25", -1.5, 7);
        let b = WindowAcc::new(60);
        let rows = vec![
            ClosedWindow {
                device: "x".into(),
                end: 60,
                acc: a.clone(),
            },
            ClosedWindow {
                device: "y".into(),
                end: 120,
                acc: b.clone(),
            },
        ];
        let back = windows_from_batch(&window_batch(&rows));
        assert_eq!(back, vec![("x".into(), a), ("y".into(), b)]);
    }
}

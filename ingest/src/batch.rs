//! Arrow batch builders for the `telemetry` and `rejects` tables, and the policy that
//! seals a batch by row count or by age.
//!
//! Time is passed in (`now`) rather than read from a clock, so sealing is tested
//! without sleeping.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use arrow::array::{
    Array, ArrayRef, BinaryBuilder, Float64Builder, MapBuilder, StringBuilder,
    TimestampNanosecondBuilder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;

use crate::decode::{Reading, Rejection};

const UTC: &str = "UTC";

fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some(UTC.into()))
}

fn extra_builder() -> MapBuilder<StringBuilder, Float64Builder> {
    MapBuilder::new(None, StringBuilder::new(), Float64Builder::new())
}

static TELEMETRY_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let extra_type = extra_builder().finish().data_type().clone();
    Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("ts", timestamp_type(), false),
        Field::new("received_at", timestamp_type(), false),
        Field::new("temperature", DataType::Float64, true),
        Field::new("humidity", DataType::Float64, true),
        Field::new("battery", DataType::Float64, true),
        Field::new("signal_strength", DataType::Float64, true),
        Field::new("firmware_version", DataType::Utf8, true),
        Field::new("lat", DataType::Float64, true),
        Field::new("lng", DataType::Float64, true),
        Field::new("extra", extra_type, true),
    ]))
});

static REJECTS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("received_at", timestamp_type(), false),
        Field::new("topic", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("detail", DataType::Utf8, false),
        Field::new("payload", DataType::Binary, false),
        Field::new("payload_bytes", DataType::UInt64, false),
    ]))
});

/// Schema of the `telemetry` table: one row per accepted reading.
pub fn telemetry_schema() -> SchemaRef {
    TELEMETRY_SCHEMA.clone()
}

/// Schema of the `rejects` table: one row per refused message.
pub fn rejects_schema() -> SchemaRef {
    REJECTS_SCHEMA.clone()
}

/// A builder of rows of one table.
pub trait RowBuilder {
    /// Rows appended since the last `finish`.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Returns the appended rows as a batch and starts a new one.
    fn finish(&mut self) -> RecordBatch;
}

/// Builds `telemetry` rows.
pub struct TelemetryBuilder {
    device_id: StringBuilder,
    ts: TimestampNanosecondBuilder,
    received_at: TimestampNanosecondBuilder,
    temperature: Float64Builder,
    humidity: Float64Builder,
    battery: Float64Builder,
    signal_strength: Float64Builder,
    firmware_version: StringBuilder,
    lat: Float64Builder,
    lng: Float64Builder,
    extra: MapBuilder<StringBuilder, Float64Builder>,
    rows: usize,
}

impl Default for TelemetryBuilder {
    fn default() -> Self {
        TelemetryBuilder {
            device_id: StringBuilder::new(),
            ts: TimestampNanosecondBuilder::new().with_timezone(UTC),
            received_at: TimestampNanosecondBuilder::new().with_timezone(UTC),
            temperature: Float64Builder::new(),
            humidity: Float64Builder::new(),
            battery: Float64Builder::new(),
            signal_strength: Float64Builder::new(),
            firmware_version: StringBuilder::new(),
            lat: Float64Builder::new(),
            lng: Float64Builder::new(),
            extra: extra_builder(),
            rows: 0,
        }
    }
}

impl TelemetryBuilder {
    /// Appends one reading received at `received_at_ns` (ns since the epoch, UTC).
    pub fn append(&mut self, reading: &Reading<'_>, received_at_ns: i64) {
        self.device_id.append_value(&reading.device_id);
        self.ts.append_value(reading.ts_ns);
        self.received_at.append_value(received_at_ns);
        self.temperature.append_option(reading.temperature);
        self.humidity.append_option(reading.humidity);
        self.battery.append_option(reading.battery);
        self.signal_strength.append_option(reading.signal_strength);
        self.firmware_version
            .append_option(reading.firmware_version.as_deref());
        self.lat.append_option(reading.lat);
        self.lng.append_option(reading.lng);
        if reading.extra.is_empty() {
            // A null map: the reading has no metric beyond the known four.
            self.extra
                .append(false)
                .expect("keys and values are appended in pairs");
        } else {
            for (name, value) in &reading.extra {
                self.extra.keys().append_value(name);
                self.extra.values().append_value(*value);
            }
            self.extra
                .append(true)
                .expect("keys and values are appended in pairs");
        }
        self.rows += 1;
    }
}

impl RowBuilder for TelemetryBuilder {
    fn len(&self) -> usize {
        self.rows
    }

    fn finish(&mut self) -> RecordBatch {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.device_id.finish()),
            Arc::new(self.ts.finish()),
            Arc::new(self.received_at.finish()),
            Arc::new(self.temperature.finish()),
            Arc::new(self.humidity.finish()),
            Arc::new(self.battery.finish()),
            Arc::new(self.signal_strength.finish()),
            Arc::new(self.firmware_version.finish()),
            Arc::new(self.lat.finish()),
            Arc::new(self.lng.finish()),
            Arc::new(self.extra.finish()),
        ];
        self.rows = 0;
        RecordBatch::try_new(telemetry_schema(), columns)
            .expect("builder columns match the telemetry schema")
    }
}

/// Builds `rejects` rows.
pub struct RejectsBuilder {
    received_at: TimestampNanosecondBuilder,
    topic: StringBuilder,
    reason: StringBuilder,
    detail: StringBuilder,
    payload: BinaryBuilder,
    payload_bytes: UInt64Builder,
    max_payload_bytes: usize,
    rows: usize,
}

impl RejectsBuilder {
    /// Stored payloads are cut to `max_payload_bytes`; `payload_bytes` keeps the full size.
    pub fn new(max_payload_bytes: usize) -> Self {
        RejectsBuilder {
            received_at: TimestampNanosecondBuilder::new().with_timezone(UTC),
            topic: StringBuilder::new(),
            reason: StringBuilder::new(),
            detail: StringBuilder::new(),
            payload: BinaryBuilder::new(),
            payload_bytes: UInt64Builder::new(),
            max_payload_bytes,
            rows: 0,
        }
    }

    pub fn append(
        &mut self,
        topic: &[u8],
        payload: &[u8],
        received_at_ns: i64,
        rejection: &Rejection,
    ) {
        self.received_at.append_value(received_at_ns);
        self.topic.append_value(String::from_utf8_lossy(topic));
        self.reason.append_value(rejection.reason.as_str());
        self.detail.append_value(&rejection.detail);
        self.payload
            .append_value(&payload[..payload.len().min(self.max_payload_bytes)]);
        self.payload_bytes.append_value(payload.len() as u64);
        self.rows += 1;
    }
}

impl RowBuilder for RejectsBuilder {
    fn len(&self) -> usize {
        self.rows
    }

    fn finish(&mut self) -> RecordBatch {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.received_at.finish()),
            Arc::new(self.topic.finish()),
            Arc::new(self.reason.finish()),
            Arc::new(self.detail.finish()),
            Arc::new(self.payload.finish()),
            Arc::new(self.payload_bytes.finish()),
        ];
        self.rows = 0;
        RecordBatch::try_new(rejects_schema(), columns)
            .expect("builder columns match the rejects schema")
    }
}

/// When an open batch is sealed and handed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealPolicy {
    /// Seal as soon as the batch holds this many rows.
    pub max_rows: usize,
    /// Seal once the oldest row in the batch has waited this long.
    pub max_age: Duration,
}

impl Default for SealPolicy {
    fn default() -> Self {
        SealPolicy {
            max_rows: 8192,
            max_age: Duration::from_millis(200),
        }
    }
}

/// Why a batch was sealed (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealReason {
    Rows,
    Age,
    Drain,
    /// A checkpoint (a flush covering the write-ahead log) came.
    Checkpoint,
}

impl SealReason {
    /// Every reason (for metrics).
    pub const ALL: [SealReason; 4] = [
        SealReason::Rows,
        SealReason::Age,
        SealReason::Drain,
        SealReason::Checkpoint,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SealReason::Rows => "rows",
            SealReason::Age => "age",
            SealReason::Drain => "drain",
            SealReason::Checkpoint => "checkpoint",
        }
    }
}

/// A row builder with its sealing policy: tracks when the open batch got its first row.
pub struct Batcher<B> {
    builder: B,
    policy: SealPolicy,
    opened_at: Option<Instant>,
}

impl<B: RowBuilder> Batcher<B> {
    pub fn new(builder: B, policy: SealPolicy) -> Self {
        Batcher {
            builder,
            policy,
            opened_at: None,
        }
    }

    /// The builder to append to; call [`Batcher::appended`] after each append.
    pub fn builder(&mut self) -> &mut B {
        &mut self.builder
    }

    /// Records that a row was appended at `now`; returns a sealed batch if it is now full.
    pub fn appended(&mut self, now: Instant) -> Option<RecordBatch> {
        self.opened_at.get_or_insert(now);
        (self.builder.len() >= self.policy.max_rows).then(|| self.seal())
    }

    /// When the open batch must be sealed by age, if one is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.opened_at.map(|opened| opened + self.policy.max_age)
    }

    /// Seals the open batch if it has reached its age at `now`.
    pub fn poll(&mut self, now: Instant) -> Option<RecordBatch> {
        match self.deadline() {
            Some(deadline) if now >= deadline => Some(self.seal()),
            _ => None,
        }
    }

    /// Seals whatever is open (on shutdown); `None` if the batch is empty.
    pub fn drain(&mut self) -> Option<RecordBatch> {
        (!self.builder.is_empty()).then(|| self.seal())
    }

    fn seal(&mut self) -> RecordBatch {
        self.opened_at = None;
        self.builder.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{DecodeLimits, RejectReason, decode};
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float64Type, TimestampNanosecondType};

    fn reading(device: &str, ts_ns: i64) -> Reading<'static> {
        Reading {
            device_id: device.to_owned().into(),
            ts_ns,
            temperature: Some(20.5),
            humidity: None,
            battery: Some(87.0),
            signal_strength: None,
            firmware_version: None,
            lat: None,
            lng: None,
            extra: vec![],
        }
    }

    fn policy(max_rows: usize, max_age_ms: u64) -> SealPolicy {
        SealPolicy {
            max_rows,
            max_age: Duration::from_millis(max_age_ms),
        }
    }

    #[test]
    fn seals_when_the_row_count_is_reached() {
        let mut batcher = Batcher::new(TelemetryBuilder::default(), policy(3, 60_000));
        let t0 = Instant::now();
        for i in 0..2 {
            batcher.builder().append(&reading("d", i), 0);
            assert!(batcher.appended(t0).is_none());
        }
        batcher.builder().append(&reading("d", 2), 0);
        let batch = batcher.appended(t0).expect("third row seals");
        assert_eq!(batch.num_rows(), 3);
        assert_eq!(batcher.deadline(), None, "a new batch is not open yet");
        assert!(batcher.drain().is_none());
    }

    #[test]
    fn seals_by_age_counted_from_the_first_row() {
        let mut batcher = Batcher::new(TelemetryBuilder::default(), policy(1000, 200));
        let t0 = Instant::now();
        assert!(
            batcher.poll(t0 + Duration::from_secs(10)).is_none(),
            "nothing open"
        );
        batcher.builder().append(&reading("d", 1), 0);
        batcher.appended(t0);
        batcher.builder().append(&reading("d", 2), 0);
        batcher.appended(t0 + Duration::from_millis(150));
        assert_eq!(batcher.deadline(), Some(t0 + Duration::from_millis(200)));
        assert!(batcher.poll(t0 + Duration::from_millis(199)).is_none());
        let batch = batcher.poll(t0 + Duration::from_millis(200)).expect("aged");
        assert_eq!(batch.num_rows(), 2);
        assert!(batcher.poll(t0 + Duration::from_secs(10)).is_none());
    }

    #[test]
    fn drain_seals_a_partial_batch() {
        let mut batcher = Batcher::new(TelemetryBuilder::default(), policy(1000, 60_000));
        batcher.builder().append(&reading("d", 1), 0);
        batcher.appended(Instant::now());
        assert_eq!(batcher.drain().map(|b| b.num_rows()), Some(1));
    }

    #[test]
    fn telemetry_rows_carry_every_field() {
        let payload = br#"{"deviceId":"s","timestamp":"2024-01-15T10:30:00Z","type":"telemetry","payload":{"temperature":21.5,"co2":612},"metadata":{"firmwareVersion":"1.0","location":{"lat":1.5,"lng":-2.5}}}"#;
        let r = decode(b"devices/s/telemetry", payload, &DecodeLimits::default()).unwrap();
        let mut builder = TelemetryBuilder::default();
        builder.append(&r, 42);
        builder.append(&reading("t", 7), 43);
        let batch = builder.finish();
        assert_eq!(batch.schema(), telemetry_schema());
        assert_eq!(batch.num_rows(), 2);
        let ts = batch.column(1).as_primitive::<TimestampNanosecondType>();
        assert_eq!(ts.value(0), 1_705_314_600_000_000_000);
        let received = batch.column(2).as_primitive::<TimestampNanosecondType>();
        assert_eq!((received.value(0), received.value(1)), (42, 43));
        let humidity = batch.column(4).as_primitive::<Float64Type>();
        assert!(humidity.is_null(0));
        assert_eq!(batch.column(7).as_string::<i32>().value(0), "1.0");
        let extra = batch.column(10).as_map();
        assert!(extra.is_valid(0) && extra.is_null(1));
        let entries = extra.value(0);
        assert_eq!(entries.column(0).as_string::<i32>().value(0), "co2");
        assert_eq!(
            entries.column(1).as_primitive::<Float64Type>().value(0),
            612.0
        );
    }

    #[test]
    fn rejects_keep_a_truncated_payload_and_its_full_size() {
        let mut builder = RejectsBuilder::new(4);
        let rejection = Rejection {
            reason: RejectReason::InvalidJson,
            detail: "bad".into(),
        };
        builder.append(b"devices/d/telemetry", b"not json", 9, &rejection);
        let batch = builder.finish();
        assert_eq!(batch.schema(), rejects_schema());
        assert_eq!(batch.column(2).as_string::<i32>().value(0), "invalid_json");
        assert_eq!(batch.column(4).as_binary::<i32>().value(0), b"not ");
        assert_eq!(
            batch
                .column(5)
                .as_primitive::<arrow::datatypes::UInt64Type>()
                .value(0),
            8
        );
    }
}

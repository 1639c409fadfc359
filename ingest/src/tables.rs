//! Tables as the pipeline's stages see them: where their batches go ([`TableSink`]) and
//! how each stage's tables are laid out in files ([`TableLayout`]: the storage layer
//! takes it as its `TableSpec`). Each crate declares the tables it produces (this one
//! `telemetry` and `rejects`), so the binary only lists them.

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use crate::{BatchSink, Refused, rejects_schema, telemetry_schema};

pub const TELEMETRY_TABLE: &str = "telemetry";
pub const REJECTS_TABLE: &str = "rejects";

/// Where finished batches go, by table (the storage's hot store). May block
/// (back-pressure); an `Err` says the batch was not stored, and its rows are counted by
/// the caller.
pub trait TableSink: Send + Sync {
    fn append(&self, table: &str, batch: RecordBatch) -> Result<(), Refused>;
}

/// How a table is laid out in files.
#[derive(Debug, Clone)]
pub struct TableLayout {
    pub name: &'static str,
    pub schema: SchemaRef,
    /// Files are partitioned by this column's UTC hour.
    pub time_column: &'static str,
    /// Rows are sorted by these within a file…
    pub sort_columns: &'static [&'static str],
    /// …and these get Bloom filters.
    pub bloom_filter_columns: &'static [&'static str],
}

/// `telemetry` (sorted by device, then time; a Bloom filter on the device) and
/// `rejects` (by arrival).
pub fn tables() -> Vec<TableLayout> {
    vec![
        TableLayout {
            name: TELEMETRY_TABLE,
            schema: telemetry_schema(),
            time_column: "ts",
            sort_columns: &["device_id", "ts"],
            bloom_filter_columns: &["device_id"],
        },
        TableLayout {
            name: REJECTS_TABLE,
            schema: rejects_schema(),
            time_column: "received_at",
            sort_columns: &["received_at"],
            bloom_filter_columns: &[],
        },
    ]
}

/// The batching stage's batches into their tables of a [`TableSink`].
pub struct IntoTables<T>(pub T);

impl<T: TableSink + 'static> BatchSink for IntoTables<T> {
    fn append_telemetry(&self, batch: RecordBatch) -> Result<(), Refused> {
        self.0.append(TELEMETRY_TABLE, batch)
    }
    fn append_rejects(&self, batch: RecordBatch) -> Result<(), Refused> {
        self.0.append(REJECTS_TABLE, batch)
    }
}

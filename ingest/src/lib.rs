//! Decode, validate and batch device telemetry.
//!
//! `ingest` knows the message contract and Arrow; it knows nothing of files, the broker or
//! SQL. Raw messages come in as [`Message`]s through an [`IngestHandle`] (bounded queues, one
//! per decoder, a device always on the same one); sealed Arrow batches for the `telemetry`
//! and `rejects` tables go out to a [`BatchSink`].

mod batch;
mod decode;
mod dedup;
mod journal;
mod options;
mod pipeline;
mod tables;

pub use batch::{
    Batcher, RejectsBuilder, RowBuilder, SealPolicy, SealReason, TelemetryBuilder, rejects_schema,
    telemetry_schema,
};
pub use decode::{
    DecodeLimits, Reading, RejectReason, Rejection, TELEMETRY_TOPIC_FILTER, decode,
    device_id_from_topic,
};
pub use journal::Entry;
pub use options::IngestOptions;
pub use pipeline::{
    BatchSink, Closed, IngestHandle, IngestMetrics, Journal, Logged, Message, Pipeline,
    PipelineConfig, Refused, Stored,
};
pub use tables::{IntoTables, REJECTS_TABLE, TELEMETRY_TABLE, TableLayout, TableSink, tables};

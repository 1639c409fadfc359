//! Per-device event-time windows and threshold alerts, computed as telemetry flows.
//!
//! The aggregator reads the sealed `telemetry` batches the ingest stage produces and keeps,
//! per device, the open windows of `telemetry_1m` and the rollup of `telemetry_1h`
//! ([`Windows`]). Closed windows become rows of those tables; readings whose window had
//! already closed become rows of `telemetry_late`. Alert transitions become rows of
//! `alerts` and go, as they happen, to an [`AlertOutput`] (the `notify` crate delivers
//! them). It knows Arrow and the telemetry schema; it knows nothing of files, the
//! network, the broker or SQL: everything leaves through [`TableSink`], [`AlertOutput`]
//! and [`StateStore`].

mod acc;
mod alert;
mod options;
mod rows;
mod stage;
mod state;
mod window;

pub use acc::{MetricAcc, WindowAcc};
pub use alert::{
    AlertEvent, AlertSink, AlertState, Alerts, Check, Rule, RuleSpec, SEVERITIES, compile_rules,
};
pub use options::WindowsOptions;
pub use rows::{
    ClosedWindow, LateReading, alerts_batch, alerts_schema, late_batch, late_schema, window_batch,
    window_schema, windows_from_batch,
};
pub use sluice_ingest::TableSink;
pub use stage::{
    ALERTS_TABLE, Aggregator, AggregatorConfig, AggregatorMetrics, AlertOutput, Checkpointing,
    LATE_TABLE, MINUTE_TABLE, Paused, ROLLUP_TABLE, Saving, StoreThenAggregate,
};
pub use state::{StateFile, StateStore};
pub use window::{Extra, Observation, Sample, SavedDevice, WindowConfig, WindowSink, Windows};

use sluice_ingest::TableLayout;

/// The tables the aggregator writes, and how their files are laid out.
pub fn tables() -> Vec<TableLayout> {
    let window = |name| TableLayout {
        name,
        schema: window_schema(),
        time_column: "window_start",
        sort_columns: &["device_id", "window_start"],
        bloom_filter_columns: &["device_id"],
    };
    vec![
        window(MINUTE_TABLE),
        window(ROLLUP_TABLE),
        TableLayout {
            name: LATE_TABLE,
            schema: late_schema(),
            time_column: "ts",
            sort_columns: &["device_id", "ts"],
            bloom_filter_columns: &[],
        },
        TableLayout {
            name: ALERTS_TABLE,
            schema: alerts_schema(),
            time_column: "ts",
            sort_columns: &["rule", "device_id", "ts"],
            bloom_filter_columns: &[],
        },
    ]
}

/// The known metrics, in the order of [`WindowAcc::known`] and of the window tables'
/// column groups.
pub const METRICS: [&str; 4] = ["temperature", "humidity", "battery", "signal_strength"];
